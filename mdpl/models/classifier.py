"""Multimodal classifier = ViLT backbone + prompt method + task head (METHODS.md §2-§4).

Freezing (§3.4, §4.1): ``backbone.transformer``, ``backbone.text_embeddings`` and
``backbone.token_type_embeddings`` are frozen; the pooler, the prompt method's parameters (unless the
method says otherwise, e.g. MAP ``learnt_p=False``) and the head are trained. ``finetune=True`` trains
everything. Frozen modules stay in train mode by default (reference behaviour, D-23);
``frozen_eval_mode=True`` puts them in eval mode via `set_frozen_modes`.

`build_classifier` fills the selected method's unset keys (`mdpl.prompts.keys.complete_method_keys`).
`load_trained_weights` loads, for ``test_only``, every weight from a trained checkpoint not written by mdpl
(the original MAP / MemPrompt code, a reference DCP checkpoint), strictly, or refuses the file in one line.
"""
from __future__ import annotations

import os

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from mdpl.backbones.vilt import ViLTBackbone
from mdpl.backbones.vilt_weights import load_reference_checkpoint, load_vilt_checkpoint
from mdpl.data.constants import NUM_CLASSES
from mdpl.errors import UserInputError
from mdpl.models.heads import build_vilt_head, head_attribute
from mdpl.prompts.registry import build_prompt_method
from mdpl.prompts.keys import complete_method_keys

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
            self.weights_report = load_vilt_checkpoint(
                self.backbone, path, interpolate_text_positions=bool(config.get("interpolate_text_positions", False)))
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
    Method keys that are None or absent take the method's defaults (``method_sizes``).
    """
    config = complete_method_keys(config)
    backbone = config.get("backbone", "vilt")
    if backbone == "clip" and config.get("prompt_method", "none") == "dcp":
        from mdpl.prompts.dcp import build_dcp_classifier
        return build_dcp_classifier(config)
    if backbone == "clip":
        from mdpl.models.clip_classifier import build_two_tower_classifier
        return build_two_tower_classifier(config)
    return MultimodalClassifier(config)


# Methods with a reference implementation on ViLT whose checkpoints `load_reference_checkpoint` reads.
VILT_REFERENCE_METHODS = ("none", "map", "memprompt")


def dynamic_queries_for_test(state: Mapping[str, torch.Tensor], model: nn.Module,
                             config: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The DCP dynamic queries a checkpoint lacks, read from ``dcp_dynamic_queries``; None if it has them.

    The reference DCP code draws these frozen queries at construction and never saves them, so its checkpoints
    alone do not define the model they were trained as: evaluating one with other queries would report another
    model's numbers. Without the side file this is a UserInputError. The file is a state dict holding exactly
    the model's ``*.prompts_dynamic_*`` keys (shapes checked when loading).
    """
    wanted = sorted(k for k in model.state_dict() if ".prompts_dynamic_" in k)
    if not wanted or all(k in state for k in wanted):
        return None
    path = config.get("dcp_dynamic_queries") or ""
    if not path:
        raise UserInputError("this DCP checkpoint lacks its dynamic prompt queries (the reference code draws them at "
                             "construction and never saves them), so it cannot be evaluated exactly: pass "
                             "dcp_dynamic_queries=<file holding the queries of that run>")
    if not os.path.isfile(path):
        raise UserInputError(f"dcp_dynamic_queries={path!r} does not exist")
    try:
        queries = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a tensor file
        raise UserInputError(f"dcp_dynamic_queries={path!r} cannot be read as a tensor file ({err})") from None
    if not isinstance(queries, Mapping) or sorted(queries) != wanted:
        found = sorted(queries) if isinstance(queries, Mapping) else type(queries).__name__
        raise UserInputError(f"dcp_dynamic_queries={path!r} must hold exactly the keys {', '.join(wanted)}; "
                             f"found {found}")
    return dict(queries)


def load_trained_weights(model: nn.Module, checkpoint: Any, config: Mapping[str, Any]) -> None:
    """Every weight of `model` from a trained checkpoint that mdpl did not write (``test_only``), strictly.

    ViLT + none / map / memprompt: a checkpoint of the original MAP / MemPrompt code (reference key names);
    CLIP + dcp: a reference DCP checkpoint, with its dynamic queries from ``dcp_dynamic_queries`` (the
    reference never saves them, :func:`dynamic_queries_for_test`); CLIP + another method: a plain state dict of this classifier. Anything else, or a file
    that does not fit, raises UserInputError (one line, naming the keys).
    """
    if not isinstance(checkpoint, Mapping):
        raise UserInputError(f"it holds a {type(checkpoint).__name__}, not a state dict or Lightning checkpoint")
    config = complete_method_keys(config)
    backbone, method = config.get("backbone", "vilt"), config.get("prompt_method")
    if backbone == "vilt":
        if method not in VILT_REFERENCE_METHODS:
            raise UserInputError(f"it was not written by mdpl, and {method!r} on ViLT has no reference code whose "
                                 f"checkpoints could be read; evaluate a checkpoint of an mdpl training run")
        load_reference_checkpoint(model, checkpoint, config)
        return
    state = checkpoint.get("state_dict", checkpoint)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        if method == "dcp":
            model.load_dcp_state_dict(state, dynamic_queries_for_test(state, model, config))
        else:
            from mdpl.backbones.clip import check_state_dict
            check_state_dict(state, model.state_dict(), what="the checkpoint")
            model.load_state_dict(state, strict=True)
    except ValueError as err:
        raise UserInputError(str(err)) from None
