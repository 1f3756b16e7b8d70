"""Interface between the ViLT backbone and a prompt method (METHODS.md §3, §4, §12).

The backbone runs ``for i, block in enumerate(blocks)`` and, before block ``i``, calls

* ``method.before_block(i, x, mask, layout, missing_type) -> (x, mask, layout)`` — may insert tokens
  into the sequence (input-level prompting, MAP §3.2, MemPrompt §4.3);
* ``method.attention_prompts(i, x, missing_type) -> (k_prompt, v_prompt) | None`` — extra keys and
  values ([B, P, D] each, already "projected") concatenated in front of the block's K/V
  (attention-level prompting, MAP §3.3).

After the final LayerNorm the classifier pools the token at ``method.pooled_position(layout)``
(default: the text [CLS], i.e. the first token of the ``text`` segment).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from mdpl.errors import UserInputError

from mdpl.prompts.layout import TEXT, TokenLayout


@dataclass(frozen=True)
class BackboneInfo:
    """What a prompt method may know about the backbone it is attached to."""

    hidden_size: int
    num_layers: int
    num_heads: int


class PromptMethod(nn.Module):
    """Base class: a no-op method. Subclasses override the hooks they need."""

    name: ClassVar[str] = "base"

    def __init__(self, info: BackboneInfo):
        super().__init__()
        self.info = info

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: BackboneInfo) -> "PromptMethod":
        """Build from the resolved config; raise ValueError for invalid options."""
        return cls(info)

    def before_block(
        self,
        index: int,
        x: torch.Tensor,
        mask: torch.Tensor,
        layout: TokenLayout,
        missing_type: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Hook before block `index`. x [B,N,D], mask bool [B,N] (True = valid key)."""
        return x, mask, layout

    def attention_prompts(
        self, index: int, x: torch.Tensor, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra (K, V) for block `index`, each [B,P,D], or None."""
        return None

    def pooled_position(self, layout: TokenLayout) -> int:
        """Sequence index pooled by the ViLT pooler (text [CLS])."""
        return layout.offset(TEXT)


def check_layers(key: str, layers: Any, num_layers: int, allow_empty: bool = False) -> list[int]:
    """Validate a prompt-layer list: unique ints in [0, num_layers), non-empty unless allowed (D-19, D-28)."""
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise UserInputError(f"{key} must be a list of block indices, got {layers!r}")
    out = list(layers)
    if not out and not allow_empty:
        raise UserInputError(f"{key} must not be empty")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in out):
        raise UserInputError(f"{key} must contain ints, got {out!r}")
    if len(set(out)) != len(out):
        raise UserInputError(f"{key} has duplicate entries: {out!r}")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise UserInputError(f"{key} entries {bad} out of range: the backbone has blocks 0..{num_layers - 1}")
    return out


def check_positive(key: str, value: Any) -> int:
    """Validate a positive integer option."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserInputError(f"{key} must be a positive int, got {value!r}")
    return value
