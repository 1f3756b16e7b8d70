"""Interface between a two-tower backbone (CLIP, METHODS.md §5) and a prompt method.

The two-tower classifier (`mdpl.models.clip_classifier`) runs each tower block by block and, before
block ``i`` of tower ``tower`` (``"image"`` or ``"text"``), calls

* ``method.tower_before_block(tower, i, x, mask, layout, missing_type) -> (x, mask, layout)`` — may
  insert tokens (input-level prompting); ``layout`` is that tower's `TokenLayout`, which starts as
  ``[("image", 1 + patches)]`` or ``[("text", 77)]``; ``mask`` is bool [B, N] (True = real token:
  all True in the image tower, ``text_ids != 0`` in the text tower). CLIP attention itself uses no
  padding mask; the text tower's causal mask grows with the inserted tokens (as in DCP, §6.4);
* ``method.tower_attention_prompts(tower, i, x, missing_type) -> (k, v) | None`` — extra keys and
  values [B, P, width] in front of the block's projected K/V (attention-level prompting).

This mirrors the ViLT interface of `mdpl.prompts.base` with one extra ``tower`` argument, so a
method file can hold its ViLT and CLIP variants side by side. Registration:
``@register_two_tower_method("name")`` (`mdpl.prompts.registry`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from mdpl.prompts.base import BackboneInfo
from mdpl.prompts.layout import TokenLayout

TOWERS = ("image", "text")


@dataclass(frozen=True)
class TwoTowerInfo:
    """Sizes of both towers (width = the tower's hidden size, not the joint embedding size)."""

    image: BackboneInfo
    text: BackboneInfo

    def tower(self, name: str) -> BackboneInfo:
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
        return getattr(self, name)

    @property
    def num_layers(self) -> int:
        """Blocks available in both towers."""
        return min(self.image.num_layers, self.text.num_layers)


class TwoTowerPromptMethod(nn.Module):
    """Base class: a no-op method on both towers (the CLIP 'none' baseline). Subclasses override hooks."""

    name: ClassVar[str] = "base"

    def __init__(self, info: TwoTowerInfo):
        super().__init__()
        self.info = info

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: TwoTowerInfo) -> "TwoTowerPromptMethod":
        return cls(info)

    def tower_before_block(
        self, tower: str, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
        missing_type: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        return x, mask, layout

    def tower_attention_prompts(
        self, tower: str, index: int, x: torch.Tensor, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None
