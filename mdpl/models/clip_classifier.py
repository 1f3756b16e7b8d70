"""Two-tower classifier: CLIP (METHODS.md §5) + any prompt method with tower hooks + linear head.

Runs MAP, MemPrompt and 'none' on CLIP (DCP on CLIP keeps its own model, `mdpl.prompts.dcp`).
Each tower is run block by block; before block ``i`` the method's ``tower_before_block`` may insert
tokens and ``tower_attention_prompts`` may add K/V (`mdpl.prompts.towers`). The text tower's causal
mask is rebuilt for the current length, so prompts in front attend only to earlier prompts and every
text token attends to all prompts (as DCP, §6.4).

Features (as DCP, §6.5): f_v = ln_post(image CLS at its shifted position) @ proj, f_t = ln_final(text
tokens) at the EOT @ text_projection, z = [f_v ; f_t] — **without** zeroing the missing half: these
methods carry the missing type in their prompts and encode the dummy inputs (as on ViLT, §1.4).
Head: ``{dataset}_classifier`` = Linear(2E, C), N(0, 0.02) / 0.
Trainable: the method's parameters, the head and CLIP's ``ln_post``, ``ln_final`` and visual ``proj``
(the backbone parts DCP trains, §6.6, so that methods on CLIP are compared with the same trainable
backbone parts); ``finetune=True`` trains everything but the unused ``logit_scale``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mdpl.backbones.clip import ClipBackbone, ClipTextTower, _Tower, check_state_dict
from mdpl.data.constants import NUM_CLASSES
from mdpl.prompts.base import BackboneInfo
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout
from mdpl.prompts.registry import build_two_tower_method
from mdpl.prompts.towers import TwoTowerInfo, TwoTowerPromptMethod


def tower_info(tower: _Tower) -> BackboneInfo:
    """Width, depth and heads of one CLIP tower."""
    return BackboneInfo(tower.width, len(tower.blocks), int(tower.blocks[0].attn.num_heads))


class TwoTowerClassifier(nn.Module):
    """CLIP + two-tower prompt method + ``{dataset}_classifier``; ``forward(batch) -> {"logits", "pooled"}``."""

    def __init__(self, config: Mapping[str, Any], backbone: ClipBackbone) -> None:
        super().__init__()
        self.dataset = str(config.get("dataset", "mmimdb"))
        if self.dataset not in NUM_CLASSES:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(NUM_CLASSES)}")
        self.finetune = bool(config.get("finetune", False))
        self.frozen_eval_mode = bool(config.get("frozen_eval_mode", False))
        self.backbone = backbone
        self.head_name = f"{self.dataset}_classifier"
        head = nn.Linear(2 * backbone.embed_dim, NUM_CLASSES[self.dataset])
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.add_module(self.head_name, head)
        info = TwoTowerInfo(tower_info(backbone.image_encoder), tower_info(backbone.text_encoder))
        self.prompt: TwoTowerPromptMethod = build_two_tower_method(config, info)
        self._apply_freezing()

    # --- freezing ---------------------------------------------------------------------------------
    def _trainable_backbone_parts(self) -> list[nn.Module | nn.Parameter]:
        enc = self.backbone
        return [enc.image_encoder.ln_post, enc.text_encoder.ln_final, enc.image_encoder.proj]

    def _apply_freezing(self) -> None:
        # CLIP's contrastive temperature is used by no classifier: trainable, it would never get a gradient (and
        # DDP stops on such a parameter), so it stays frozen even with finetune
        self.backbone.logit_scale.requires_grad_(False)
        if self.finetune:
            return
        self.backbone.requires_grad_(False)
        for item in self._trainable_backbone_parts():
            item.requires_grad_(True)

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def set_frozen_modes(self) -> None:
        """Frozen backbone follows the model's mode unless ``frozen_eval_mode`` (CLIP has no dropout)."""
        if not self.finetune:
            self.backbone.train(self.training and not self.frozen_eval_mode)

    def trainable_parameters_report(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    # --- forward ----------------------------------------------------------------------------------
    def _run_tower(self, name: str, tower: _Tower, x: torch.Tensor, mask: torch.Tensor,
                   missing_type: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
        layout = TokenLayout([(name, x.shape[1])])
        causal = isinstance(tower, ClipTextTower)
        for i in range(len(tower.blocks)):
            x, mask, layout = self.prompt.tower_before_block(name, i, x, mask, layout, missing_type)
            attn_mask = tower.causal_mask(x.shape[1], x.device, x.dtype) if causal else None
            kv = self.prompt.tower_attention_prompts(name, i, x, missing_type)
            x = tower.run_block(i, x, attn_mask, kv)
        return x, layout

    def encode_image(self, image: torch.Tensor, missing_type: torch.Tensor) -> torch.Tensor:
        """f_v [B, E]: the image CLS at its shifted position -> ln_post -> @proj."""
        tower = self.backbone.image_encoder
        x = tower.embed(image)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x, layout = self._run_tower(IMAGE, tower, x, mask, missing_type)
        return tower.pool(x, layout.offset(IMAGE))

    def encode_text(self, text_ids: torch.Tensor, missing_type: torch.Tensor) -> torch.Tensor:
        """f_t [B, E]: the 77 text positions -> ln_final -> EOT -> @text_projection."""
        tower = self.backbone.text_encoder
        x, layout = self._run_tower(TEXT, tower, tower.embed(text_ids), text_ids != 0, missing_type)
        return tower.pool(x[:, layout.span(TEXT)], text_ids)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: image [B,3,H,W], text_ids [B,77] (CLIP BPE), missing_type [B] -> logits, pooled [B, 2E]."""
        image = batch["image"]
        missing_type = batch.get("missing_type")
        if missing_type is None:
            missing_type = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        missing_type = missing_type.to(image.device).long()
        f_v = self.encode_image(image, missing_type)
        f_t = self.encode_text(batch["text_ids"], missing_type)
        z = torch.cat([f_v, f_t.to(f_v.dtype)], dim=1)
        return {"logits": self.head(z), "pooled": z}


def build_two_tower_classifier(config: Mapping[str, Any]) -> TwoTowerClassifier:
    """`TwoTowerClassifier` for ``backbone='clip'`` and a method other than 'dcp'.

    The backbone is read from ``clip_path`` (random init + warning if empty). ``load_path``, if set,
    is an mdpl checkpoint (or plain state dict) of this classifier, loaded strictly; with ``test_only``
    every weight comes from it and ``clip_path`` is not read.
    """
    from mdpl.prompts.dcp import clip_backbone_for_run, read_dcp_checkpoint  # shared CLIP setup / ckpt reader

    model = TwoTowerClassifier(config, clip_backbone_for_run(config))
    path = str(config.get("load_path", "") or "")
    if path:
        state = read_dcp_checkpoint(path)
        check_state_dict(state, model.state_dict(), what=f"checkpoint {path}")
        model.load_state_dict(state, strict=True)
    return model
