"""MAP — missing-aware prompts (Lee et al., CVPR 2023; docs/methods.md §3).

Three learnable tensors [P, L, width] per stream, one per missing type (§0: 0 complete, 1 text missing, 2 image
missing), kept as separate Parameters so the reference state-dict keys (``complete_prompt``,
``missing_text_prompt``, ``missing_img_prompt``) load unchanged; they are stacked to [3, P, L, width] at forward
time and selected per sample by indexing with the missing-type vector (D-16).

* ``prompt_type='input'`` (§3.2): before block ``prompt_layers[j]`` the L prompts of slice j are prepended to the
  whole sequence and accumulate; the pooled token (text [CLS] / image CLS / text EOT) moves with the layout.
* ``prompt_type='attention'`` (§3.3): the prompts are raw extra keys (first L/2 tokens) and values (last L/2) of
  block ``prompt_layers[j]``'s self-attention, split into the stream's heads (D-17).

On a single-stream backbone (ViLT, the paper's setting) the tensors are the method's own (``complete_prompt``…).
On a two-stream backbone (CLIP; our mapping, not defined by the MAP paper) each stream has its own set,
``image_prompts.*`` and ``text_prompts.*`` with that stream's width; the text tower's causal mask grows with the
prompts (as DCP's, §6.4), and the classifier concatenates both features without zeroing the missing half: MAP's
prompts are its only missing-type signal, so both towers encode the (dummy) inputs, as MAP does on ViLT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (BackboneInfo, MethodConfig, PromptContext, PromptMethod, StreamInfo, check_layers,
                               check_positive)
from mdpl.prompts.layout import TokenLayout, splice_tokens
from mdpl.prompts.registry import register_method

PROMPT_TYPES = ("input", "attention")
_INIT_ONES_TOKEN = (0, 2, 1)
"""Token set to ones at init, per missing type (complete, text missing, image missing) — §3.1."""
_PER_TYPE_NAMES = ("complete_prompt", "missing_text_prompt", "missing_img_prompt")


@dataclass(frozen=True)
class MapConfig(MethodConfig):
    """MAP's keys with the paper's values (§3.1)."""

    prompt_type: str = "input"              # 'input' (paper) | 'attention'
    prompt_length: int = 16                 # prompt tokens per prompted block
    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    learnt_p: bool = True                   # False: the deterministic init stays frozen
    multi_layer_prompt: bool = True         # False: one prompt slice shared by every prompted block (D-19)

    TINY = {"prompt_length": 6, "prompt_layers": [0, 1]}

    def check(self, info: BackboneInfo) -> None:
        if self.prompt_type not in PROMPT_TYPES:
            raise UserInputError(f"prompt_type={self.prompt_type!r} is not a MAP prompt type; choose input or "
                                 "attention")
        check_positive("prompt_length", self.prompt_length)
        if not self.prompt_layers:
            raise UserInputError("prompt_layers=[] prompts no layer; give the layers MAP prompts (e.g. "
                                 "prompt_layers=[0,1,2,3,4,5])")
        check_layers("prompt_layers", self.prompt_layers, info)
        if self.prompt_type == "attention" and self.learnt_p and self.prompt_length % 2:
            raise UserInputError(f"prompt_length={self.prompt_length} must be even with prompt_type=attention: "
                                 "learnt attention prompts are split into key and value halves (e.g. "
                                 "prompt_length=16)")


def map_initial_prompts(num_slices: int, length: int, dim: int, prompt_type: str, learnt_p: bool) -> torch.Tensor:
    """Deterministic MAP init (§3.1) as a stacked [3, P, L, D] tensor.

    Type t gets token ``k_t`` = ones (k = 0, 2, 1 for types 0, 1, 2); in attention mode with learnt_p also token
    ``L//2 + k_t`` (silently absent when out of range, as in the reference).
    """
    init = torch.zeros(3, num_slices, length, dim)
    for t, k in enumerate(_INIT_ONES_TOKEN):
        init[t, :, k: k + 1] = 1.0
        if learnt_p and prompt_type == "attention":
            init[t, :, length // 2 + k: length // 2 + k + 1] = 1.0
    return init


@register_method("map")
class MissingAwarePrompts(PromptMethod):
    """MAP prompts (§3) on every stream of the backbone."""

    title = "MAP"
    in_demo = True
    preset = "map"
    paper_tables = "mdpl.experiments.papers.map:tables"
    reference_prompt_keys = ("complete_prompt", "missing_text_prompt", "missing_img_prompt")
    reference_config_keys = ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt")
    config_class = MapConfig

    def __init__(self, config: MapConfig, info: BackboneInfo):
        super().__init__(config, info)
        self.prompt_layers = list(config.prompt_layers)
        num_slices = len(self.prompt_layers) if config.multi_layer_prompt else 1
        # block -> prompt slice (a single shared slice without multi_layer_prompt; D-19)
        self._slice_of = {layer: (j if config.multi_layer_prompt else 0) for j, layer in enumerate(self.prompt_layers)}
        for stream in info.streams:
            holder = self if info.single_stream else nn.Module()
            init = map_initial_prompts(num_slices, config.prompt_length, stream.width, config.prompt_type,
                                       config.learnt_p)
            for t, name in enumerate(_PER_TYPE_NAMES):
                holder.register_parameter(name, nn.Parameter(init[t].clone(), requires_grad=config.learnt_p))
            if holder is not self:
                self.add_module(f"{stream.name}_prompts", holder)

    def _holder(self, stream: StreamInfo) -> nn.Module:
        return self if self.info.single_stream else getattr(self, f"{stream.name}_prompts")

    def select(self, stream: StreamInfo, layer: int, missing_type: torch.Tensor) -> torch.Tensor:
        """Per-sample prompts of block `layer` of `stream`: [B, L, width]."""
        holder = self._holder(stream)
        per_type = torch.stack([getattr(holder, n) for n in _PER_TYPE_NAMES])[:, self._slice_of[layer]]
        return per_type[missing_type]

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        if self.config.prompt_type != "input" or index not in self._slice_of:
            return x, mask, layout
        x, mask = splice_tokens(x, mask, 0, [self.select(stream, index, ctx.missing_type)])
        return x, mask, layout.prepend([(f"map.{index}", self.config.prompt_length)])

    def attention_prompts(self, stream: StreamInfo, index: int, x: torch.Tensor,
                          ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.prompt_type != "attention" or index not in self._slice_of:
            return None
        prompts = self.select(stream, index, ctx.missing_type)
        if not self.config.learnt_p:
            return prompts, prompts
        half = self.config.prompt_length // 2
        return prompts[:, :half], prompts[:, half:]

    @classmethod
    def added_tokens(cls, config: MapConfig, info: BackboneInfo) -> dict[str, int]:
        """Input prompts accumulate: every stream ends with len(prompt_layers) × prompt_length extra tokens."""
        count = len(config.prompt_layers) * config.prompt_length if config.prompt_type == "input" else 0
        return {stream.name: count for stream in info.streams}
