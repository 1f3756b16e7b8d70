"""Multimodal classifier = ViLT backbone + prompt method + task head (METHODS.md §2-§4).

Freezing (§3.4, §4.1): ``backbone.transformer``, ``backbone.text_embeddings`` and
``backbone.token_type_embeddings`` are frozen; the pooler, the prompt method's parameters (unless the
method says otherwise, e.g. MAP ``learnt_p=False``) and the head are trained. ``finetune=True`` trains
everything. Frozen modules stay in train mode by default (reference behaviour, D-23);
``frozen_eval_mode=True`` puts them in eval mode via `set_frozen_modes`.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from mdpl.backbones.vilt import ViLTBackbone
from mdpl.backbones.vilt_weights import load_vilt_checkpoint
from mdpl.data.constants import NUM_CLASSES
from mdpl.models.heads import build_vilt_head, head_attribute
from mdpl.prompts.registry import build_prompt_method

FROZEN_BACKBONE_PARTS = ("transformer", "text_embeddings", "token_type_embeddings")


class MultimodalClassifier(nn.Module):
    """ViLT + prompt method + ``{dataset}_classifier`` head. ``forward(batch) -> {"logits", "pooled"}``."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        dataset = config.get("dataset", "mmimdb")
        if dataset not in NUM_CLASSES:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(NUM_CLASSES)}")
        if config.get("backbone", "vilt") != "vilt":
            raise ValueError(f"MultimodalClassifier needs backbone='vilt', got {config.get('backbone')!r}")
        self.dataset = dataset
        self.finetune = bool(config.get("finetune", False))
        self.frozen_eval_mode = bool(config.get("frozen_eval_mode", False))
        # Build order as in the references (backbone, checkpoint, head, prompts) for RNG parity (§4.1).
        self.backbone = ViLTBackbone.from_config(config)
        self._load_backbone_weights(config)
        self.head_name = head_attribute(dataset)
        self.add_module(self.head_name, build_vilt_head(self.backbone.hidden_size, NUM_CLASSES[dataset]))
        self.prompt = build_prompt_method(config, self.backbone.info)
        self._apply_freezing()

    # --- construction helpers ---------------------------------------------------------------------------
    def _load_backbone_weights(self, config: Mapping[str, Any]) -> None:
        path = config.get("load_path", "") or ""
        if config.get("test_only", False):
            return  # the fine-tuned checkpoint (all modules) is restored by the caller
        if path:
            self.weights_report = load_vilt_checkpoint(self.backbone, path)
        else:
            warnings.warn("load_path is empty: the ViLT backbone is randomly initialised (not a useful "
                          "model; set load_path to vilt_200k_mlm_itm.ckpt)")

    def _frozen_modules(self) -> list[nn.Module]:
        if self.finetune:
            return []
        return [getattr(self.backbone, name) for name in FROZEN_BACKBONE_PARTS]

    def _apply_freezing(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False)

    # --- public API -------------------------------------------------------------------------------------
    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def set_frozen_modes(self) -> None:
        """Frozen modules follow the model's mode (train, D-23) unless ``frozen_eval_mode``: then eval."""
        for module in self._frozen_modules():
            module.train(self.training and not self.frozen_eval_mode)

    def trainable_parameters_report(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits [B, C] and pooled feature [B, D] (text [CLS] through the pooler)."""
        out = self.backbone.forward_features(
            batch["text_ids"], batch["text_masks"], batch["image"], batch.get("image_sizes"),
            method=self.prompt, missing_type=batch.get("missing_type"), host_sizes=batch.get("image_sizes_host"))
        pooled = self.backbone.pool(out.hidden, self.prompt.pooled_position(out.layout))
        return {"logits": self.head(pooled), "pooled": pooled}


def build_classifier(config: Mapping[str, Any]) -> nn.Module:
    """Classifier for the resolved config; ``backbone`` and ``prompt_method`` are independent.

    ViLT + any method → `MultimodalClassifier` (DCP on ViLT: `mdpl.prompts.dcp.DCPViLT`); CLIP + 'dcp' →
    DCP's own model (mdpl.prompts.dcp); CLIP + another method → `TwoTowerClassifier` (tower hooks).
    """
    backbone = config.get("backbone", "vilt")
    if backbone == "clip" and config.get("prompt_method", "none") == "dcp":
        from mdpl.prompts.dcp import build_dcp_classifier
        return build_dcp_classifier(config)
    if backbone == "clip":
        from mdpl.models.clip_classifier import build_two_tower_classifier
        return build_two_tower_classifier(config)
    return MultimodalClassifier(config)
