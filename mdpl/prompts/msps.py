"""MSPs — modality-specific prompts (Jang et al., ICASSP 2024; docs/methods.md §16).

No code of the paper's authors is known; the reference is the baseline re-implementation in ``Jian-Lang/RAGPT``
(``src/baselines/msps/``), whose behaviour this file follows (MSPS-D1).

Two learnable tensors [N, L, width] per stream, one per *missing* modality: ``prompt_text_missing`` (the reference's
``text_prompt``, used when the text is absent, MSPS-D3) and ``prompt_image_missing`` (its ``img_prompt``). A row
gets, per prompted block, the tensor of its missing modality, and a complete row their **sum**; selection is tensor
indexing with the missing-type vector (§0: 0 complete, 1 text missing, 2 image missing; MSPS-D10).

* **Attention-level prompts** (the reference's ``prompt_type='attention'``): before block ``msps_layers[j]`` slice j
  of the selected tensor gives raw extra keys (first L/2 tokens) and values (last L/2), split into the stream's
  heads (as MAP's attention prompts, §3.3). Queries come from the tokens only; the sequence length is unchanged.
* **Orthogonality loss** (the paper's constraint): ``|<t, i>| / max(||t|| ||i||, 1e-8)``, the absolute cosine
  between the two tensors flattened over every block and both K/V halves (``msps_ortho_mode='global'``, the
  reference, MSPS-D4) or the mean of the per-block cosines (``'per_layer'``); weighted by
  ``msps_ortho_loss_weight`` (reference 1.0) and added to the training loss (``aux_losses``).
* **Image-key masking** (MSPS-D5): on the joint stream the image tokens of image-missing rows (the dummy image, its
  CLS included) are removed from the keys before block 0 (``msps_mask_missing_image``, the reference's behaviour);
  they still run as queries.

On a two-stream backbone (CLIP, CoCa; mdpl's mapping, not defined by the paper or the reference) each tower has its
own pair of tensors at its width, used as that tower's key/value prefixes; the loss is the mean of the towers'
terms, and no key is masked (a tower has only its own modality's tokens).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (MISSING_IMAGE, BackboneInfo, MethodConfig, PromptContext, PromptMethod, StreamInfo,
                               check_layers, check_positive)
from mdpl.prompts.layout import IMAGE, TokenLayout
from mdpl.prompts.registry import register_method

ORTHO_MODES = ("global", "per_layer")
ORTHO_EPS = 1e-8
"""Lower clamp of the product of the norms (the reference's)."""
_NAMES = ("prompt_text_missing", "prompt_image_missing")
_ONES_TOKEN = {"prompt_text_missing": 2, "prompt_image_missing": 1}
"""Token set to ones at init (and its value-half twin L/2 + k), as the reference's ``text_prompt`` / ``img_prompt``."""
_REFERENCE_NAMES = {"text_prompt": "prompt_text_missing", "img_prompt": "prompt_image_missing"}


@dataclass(frozen=True)
class MspsConfig(MethodConfig):
    """MSPs' keys with the reference's values (``msps_config.yaml``: the same on every dataset, §16.4)."""

    msps_length: int = 16                              # L tokens per prompted block: L/2 keys, then L/2 values
    msps_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # prompted blocks (the reference: the first prompt_num = 6)
    msps_ortho_loss_weight: float = 1.0                # weight of the orthogonality term in the training loss
    msps_ortho_mode: str = "global"                    # 'global': one cosine over all blocks (reference) | 'per_layer'
    msps_mask_missing_image: bool = True               # joint stream: image-missing rows do not attend to image keys

    TINY = {"msps_length": 4, "msps_layers": [0, 1]}

    def check(self, info: BackboneInfo) -> None:
        check_positive("msps_length", self.msps_length)
        if self.msps_length % 2:
            raise UserInputError(f"msps_length={self.msps_length} must be even: each block's prompts are split into "
                                 "key and value halves (e.g. msps_length=16; MSPS-D9)")
        if not self.msps_layers:
            raise UserInputError("msps_layers=[] prompts no block; give the blocks MSPs prompts (e.g. "
                                 "msps_layers=[0,1,2,3,4,5])")
        check_layers("msps_layers", self.msps_layers, info)
        weight = self.msps_ortho_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserInputError(f"msps_ortho_loss_weight must be a number >= 0, got {weight!r}")
        if self.msps_ortho_mode not in ORTHO_MODES:
            raise UserInputError(f"msps_ortho_mode={self.msps_ortho_mode!r}; choose global (the reference) or "
                                 "per_layer")


def msps_initial_prompts(num_layers: int, length: int, width: int, name: str) -> torch.Tensor:
    """The reference's deterministic init [N, L, width]: zeros, token k and token L/2 + k ones (k = 2 for the
    text-missing tensor, 1 for the image-missing one; silently absent when out of range, as slicing there)."""
    k = _ONES_TOKEN[name]
    init = torch.zeros(num_layers, length, width)
    init[:, k: k + 1] = 1.0
    init[:, length // 2 + k: length // 2 + k + 1] = 1.0
    return init


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|<a, b>| / max(||a|| ||b||, 1e-8) of the flattened tensors (the reference's ``ortho_loss``)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return torch.dot(a, b).abs() / torch.clamp(a.norm() * b.norm(), min=ORTHO_EPS)


@register_method("msps")
class ModalitySpecificPrompts(PromptMethod):
    """MSPs (§16) on every stream of the backbone."""

    title = "MSPs"
    preset = "msps"
    paper_run = (1e-3, 2024)
    config_class = MspsConfig
    aux_loss_names = ("msps_ortho",)
    paper_tables = "mdpl.experiments.papers.msps:tables"

    def __init__(self, config: MspsConfig, info: BackboneInfo):
        super().__init__(config, info)
        self._slice_of = {layer: j for j, layer in enumerate(config.msps_layers)}
        for stream in info.streams:
            holder = self if info.single_stream else nn.Module()
            for name in _NAMES:
                init = msps_initial_prompts(len(self._slice_of), config.msps_length, stream.width, name)
                holder.register_parameter(name, nn.Parameter(init))
            if holder is not self:
                self.add_module(f"{stream.name}_prompts", holder)

    def _holder(self, stream_name: str) -> nn.Module:
        return self if self.info.single_stream else getattr(self, f"{stream_name}_prompts")

    def pair(self, stream_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-missing, image-missing) tensors of a stream, each [N, L, width]."""
        holder = self._holder(stream_name)
        return holder.prompt_text_missing, holder.prompt_image_missing

    def select(self, stream: StreamInfo, layer: int, missing_type: torch.Tensor) -> torch.Tensor:
        """Per-row prompts of block `layer` [B, L, width]: the missing modality's tensor, the sum for a complete row
        (the reference's per-experiment stacking, read by mdpl type)."""
        text_missing, image_missing = (p[self._slice_of[layer]] for p in self.pair(stream.name))
        per_type = torch.stack([text_missing + image_missing, text_missing, image_missing])
        return per_type[missing_type]

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Before block 0 of a joint stream: the image keys of image-missing rows masked out (MSPS-D5)."""
        if index != 0 or not stream.joint or not self.config.msps_mask_missing_image:
            return x, mask, layout
        image = torch.zeros_like(mask)
        image[:, layout.span(IMAGE)] = True
        missing = (ctx.missing_type.to(mask.device) == MISSING_IMAGE)[:, None]
        return x, mask & ~(image & missing), layout

    def attention_prompts(self, stream: StreamInfo, index: int, x: torch.Tensor,
                          ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        if index not in self._slice_of:
            return None
        prompts = self.select(stream, index, ctx.missing_type)
        half = self.config.msps_length // 2
        return prompts[:, :half], prompts[:, half:]

    def aux_losses(self, prepared: Any) -> dict[str, torch.Tensor]:
        """The orthogonality term: mean over streams of the absolute cosine between the two tensors (global, or
        the mean over prompted blocks with ``per_layer``)."""
        terms = []
        for stream in self.info.streams:
            t, i = self.pair(stream.name)
            if self.config.msps_ortho_mode == "global":
                terms.append(abs_cosine(t, i))
            else:
                terms.append(torch.stack([abs_cosine(t[j], i[j]) for j in range(t.shape[0])]).mean())
        return {"msps_ortho": torch.stack(terms).mean()}

    @classmethod
    def upgrade_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference's names (``text_prompt``, ``img_prompt``, optionally under ``prompt.``) -> mdpl's
        (``prompt.prompt_text_missing``, ``prompt.prompt_image_missing``)."""
        out = {}
        for key, value in state.items():
            m = _REFERENCE_KEY.match(key)
            out[f"prompt.{_REFERENCE_NAMES[m.group('name')]}" if m else key] = value
        return out


_REFERENCE_KEY = re.compile(r"^(?:prompt\.)?(?P<name>text_prompt|img_prompt)$")
