"""MAP — missing-aware prompts on ViLT (Lee et al., CVPR 2023; METHODS.md §3).

Three learnable tensors [P, L, D], one per missing type (§0: 0 complete, 1 text missing, 2 image
missing), kept as separate Parameters so the reference state-dict keys (`complete_prompt`,
`missing_text_prompt`, `missing_img_prompt`) load unchanged; they are stacked to [3, P, L, D] at
forward time and selected per sample by indexing with the missing-type vector (D-16).

* ``prompt_type='input'`` (§3.2): before block ``prompt_layers[j]`` the L prompts of slice j are
  prepended to the whole sequence and accumulate; pooled token = text [CLS] (offset L·P).
* ``prompt_type='attention'`` (§3.3): the prompts are raw extra keys (first L/2 tokens) and values
  (last L/2) of block ``prompt_layers[j]``'s self-attention, split into the model's heads (D-17).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import BackboneInfo, PromptMethod, check_layers, check_positive
from mdpl.prompts.layout import TokenLayout, splice_tokens
from mdpl.prompts.registry import register_prompt_method, register_two_tower_method
from mdpl.prompts.towers import TwoTowerInfo, TwoTowerPromptMethod

PROMPT_TYPES = ("input", "attention")
# Token set to ones at init, per missing type (complete, text missing, image missing) — §3.1.
_INIT_ONES_TOKEN = (0, 2, 1)


def map_initial_prompts(num_slices: int, length: int, dim: int, prompt_type: str, learnt_p: bool) -> torch.Tensor:
    """Deterministic MAP init (§3.1) as a stacked [3, P, L, D] tensor.

    Type t gets token ``k_t`` = ones (k = 0, 2, 1 for types 0, 1, 2); in attention mode with
    learnt_p also token ``L//2 + k_t`` (silently absent when out of range, as in the reference).
    """
    init = torch.zeros(3, num_slices, length, dim)
    for t, k in enumerate(_INIT_ONES_TOKEN):
        init[t, :, k : k + 1] = 1.0
        if learnt_p and prompt_type == "attention":
            init[t, :, length // 2 + k : length // 2 + k + 1] = 1.0
    return init


def map_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor options of both MAP variants from the config (METHODS.md §3.1 defaults)."""
    return dict(
        prompt_type=config.get("prompt_type", "input"),
        prompt_length=config.get("prompt_length", 16),
        prompt_layers=config.get("prompt_layers", [0, 1, 2, 3, 4, 5]),
        learnt_p=config.get("learnt_p", True),
        multi_layer_prompt=config.get("multi_layer_prompt", True),
    )


@register_prompt_method("map")
class MissingAwarePrompts(PromptMethod):
    """MAP prompts (METHODS.md §3)."""

    def __init__(
        self,
        info: BackboneInfo,
        *,
        prompt_type: str = "input",
        prompt_length: int = 16,
        prompt_layers: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4, 5),
        learnt_p: bool = True,
        multi_layer_prompt: bool = True,
    ):
        super().__init__(info)
        if prompt_type not in PROMPT_TYPES:
            raise UserInputError(f"MAP prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}")
        self.prompt_type = prompt_type
        self.prompt_length = check_positive("prompt_length", prompt_length)
        self.prompt_layers = check_layers("prompt_layers", prompt_layers, info.num_layers)
        if prompt_type == "attention" and learnt_p and prompt_length % 2:
            raise UserInputError(
                f"MAP attention prompts with learnt_p split prompt_length into K and V halves; "
                f"prompt_length must be even, got {prompt_length}"
            )
        self.learnt_p = bool(learnt_p)
        self.multi_layer_prompt = bool(multi_layer_prompt)
        num_slices = len(self.prompt_layers) if self.multi_layer_prompt else 1
        # layer -> prompt slice (a single shared slice without multi_layer_prompt; D-19)
        self._slice_of = {l: (j if self.multi_layer_prompt else 0) for j, l in enumerate(self.prompt_layers)}

        init = map_initial_prompts(num_slices, prompt_length, info.hidden_size, prompt_type, self.learnt_p)
        self.complete_prompt = nn.Parameter(init[0].clone(), requires_grad=self.learnt_p)
        self.missing_text_prompt = nn.Parameter(init[1].clone(), requires_grad=self.learnt_p)
        self.missing_img_prompt = nn.Parameter(init[2].clone(), requires_grad=self.learnt_p)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: BackboneInfo) -> "MissingAwarePrompts":
        return cls(info, **map_options(config))

    # --- selection -----------------------------------------------------------------------------
    def stacked(self) -> torch.Tensor:
        """[3, P, L, D] prompts indexed by missing type."""
        return torch.stack([self.complete_prompt, self.missing_text_prompt, self.missing_img_prompt])

    def select(self, layer: int, missing_type: torch.Tensor) -> torch.Tensor:
        """Per-sample prompts of block `layer`: [B, L, D]."""
        per_type = self.stacked()[:, self._slice_of[layer]]  # [3, L, D]
        return per_type[missing_type.long()]

    # --- hooks -----------------------------------------------------------------------------------
    def before_block(
        self, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        if self.prompt_type != "input" or index not in self._slice_of:
            return x, mask, layout
        prompts = self.select(index, missing_type)
        x, mask = splice_tokens(x, mask, 0, [prompts])
        return x, mask, layout.prepend([(f"map.{index}", self.prompt_length)])

    def attention_prompts(
        self, index: int, x: torch.Tensor, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.prompt_type != "attention" or index not in self._slice_of:
            return None
        prompts = self.select(index, missing_type)
        if not self.learnt_p:
            return prompts, prompts
        half = self.prompt_length // 2
        return prompts[:, :half], prompts[:, half:]


@register_two_tower_method("map")
class MissingAwarePromptsTwoTower(TwoTowerPromptMethod):
    """MAP on CLIP (two towers) — our mapping, not defined by the MAP paper (METHODS.md §3 → §5).

    * One ViLT-style MAP prompt set per tower: ``image_prompts.*`` with the image width and
      ``text_prompts.*`` with the text width (keys ``{image,text}_prompts.{complete_prompt,
      missing_text_prompt,missing_img_prompt}``, each [P, L, width], same deterministic init, §3.1).
    * ``prompt_type='input'``: before block ``prompt_layers[j]`` the L prompts are prepended to that
      tower's sequence and accumulate (§3.2); the text tower's causal mask grows with them (as DCP's,
      §6.4), so text tokens see every prompt and prompts see only earlier prompts.
    * ``prompt_type='attention'``: raw extra K/V per tower (§3.3), split into that tower's heads.
    * Features: image CLS / text EOT at their shifted positions; the classifier concatenates
      [f_v ; f_t] with **no zeroing** of the missing half — MAP's missing-aware prompts are its
      only missing-type signal, so both towers encode the (dummy) inputs, as MAP does on ViLT.
    """

    def __init__(self, info: TwoTowerInfo, **options: Any):
        super().__init__(info)
        self.image_prompts = MissingAwarePrompts(info.image, **options)
        self.text_prompts = MissingAwarePrompts(info.text, **options)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: TwoTowerInfo) -> "MissingAwarePromptsTwoTower":
        return cls(info, **map_options(config))

    def _tower(self, tower: str) -> MissingAwarePrompts:
        return self.image_prompts if tower == "image" else self.text_prompts

    def tower_before_block(
        self, tower: str, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
        missing_type: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        return self._tower(tower).before_block(index, x, mask, layout, missing_type)

    def tower_attention_prompts(
        self, tower: str, index: int, x: torch.Tensor, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._tower(tower).attention_prompts(index, x, missing_type)
