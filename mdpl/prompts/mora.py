"""MoRA: missing-modality low-rank adaptation (Zhao et al., ICLR 2026), docs/methods.md §15.

No prompts and no missing-type conditioning: DoRA-style updates of attention projections (``mora_maps``, two of q / k
/ v) in the top blocks (``mora_start_layer`` ..) of both towers of a two-stream backbone. At block i, one low-rank
pair is shared by the towers, A_i [D_text, r_s] and B_i [D_image, r_s]; each adapted projection with frozen weight
W [d, d] (``[out, in]``) adds its own factors P [d, r], Q [r, d] and two per-column magnitudes m_s, m_p [1, d]
(initialised to the column norms of W):

    S_text = A (BᵀB) Aᵀ,  S_image = B (AᵀA) Bᵀ           (the other tower's Gram matrix in between)
    N_s = W + α Sᵀ,  N_p = W + α (P Q)ᵀ,  c(N) = max(column norms of N, 1e-5)
    W_eff = m_s ⊙ N_s / c(N_s) + m_p ⊙ N_p / c(N_p)
    y = linear(dropout(x), W_eff, b)                      (dropout on the projection's whole input, MoRA-D4)

Both magnitudes start at ‖W‖_col, so W_eff starts at W + ‖W‖_col ⊙ N_s / c(N_s), not at W (MoRA-D1). Merged into
the weights for testing (``PromptedClassifier.merge_adapters``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.adapters import QKV_MAPS, AdapterSite, AdapterSpec, WeightAdapter
from mdpl.prompts.base import BackboneInfo, MethodConfig, PromptMethod, check_positive
from mdpl.prompts.layout import IMAGE, TEXT
from mdpl.prompts.registry import register_method

NORM_EPS = 1e-5
"""Lower clamp of the column norms (the reference's)."""


@dataclass(frozen=True)
class MoRAConfig(MethodConfig):
    """MoRA's keys; defaults: the reference model config (Hateful Memes' values), per dataset in ``DATASETS``."""

    mora_maps: tuple[str, ...] = ("k", "v")      # adapted projections of every adapted block, both towers
    mora_start_layer: int = 10                   # blocks start.. of both towers (ViT-B/16: 10, 11)
    mora_shared_rank: int = 8                    # r_s of the pair shared by the towers
    mora_image_rank: int = 8                     # r of each image projection's own factors
    mora_text_rank: int = 8                      # r of each text projection's own factors
    mora_alpha: float = 0.1                      # α on both increments
    mora_dropout: float = 0.1                    # dropout on the adapted projections' input (training)

    TINY = {"mora_start_layer": 1, "mora_shared_rank": 2, "mora_image_rank": 2, "mora_text_rank": 3}
    DATASETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "food101": {"mora_maps": ("q", "v"), "mora_shared_rank": 4, "mora_image_rank": 4, "mora_text_rank": 4,
                    "mora_alpha": 0.01},
        "mmimdb": {"mora_maps": ("q", "k"), "mora_shared_rank": 4, "mora_image_rank": 4, "mora_text_rank": 4,
                   "mora_alpha": 0.001},
        "hatememes": {"mora_maps": ("k", "v"), "mora_shared_rank": 8, "mora_image_rank": 8, "mora_text_rank": 8,
                      "mora_alpha": 0.1},
    }

    def check(self, info: BackboneInfo) -> None:
        names = {s.name for s in info.streams}
        if names != {IMAGE, TEXT}:
            raise UserInputError(f"MoRA shares one low-rank pair between an image and a text tower; {info.what} has "
                                 f"the streams {sorted(names)} (use backbone=clip or coca)")
        maps = list(self.mora_maps)
        if not maps or any(m not in QKV_MAPS for m in maps) or len(set(maps)) != len(maps):
            raise UserInputError(f"mora_maps={maps} must name distinct attention projections among q, k, v (their "
                                 f"factors are square: MoRA-D3)")
        for key in ("mora_shared_rank", "mora_image_rank", "mora_text_rank"):
            check_positive(key, getattr(self, key))
        depth = min(s.num_layers for s in info.streams)
        if not isinstance(self.mora_start_layer, int) or not 0 <= self.mora_start_layer < depth:
            raise UserInputError(f"mora_start_layer={self.mora_start_layer!r} must be in 0..{depth - 1} (blocks of "
                                 f"both towers: {info.what})")
        if not isinstance(self.mora_alpha, (int, float)) or isinstance(self.mora_alpha, bool):
            raise UserInputError(f"mora_alpha must be a number, got {self.mora_alpha!r}")
        if not isinstance(self.mora_dropout, (int, float)) or not 0 <= self.mora_dropout < 1:
            raise UserInputError(f"mora_dropout must be in [0, 1), got {self.mora_dropout!r}")


class SharedFactors(nn.Module):
    """The pair of one block shared by the towers: A [D_text, r_s], B [D_image, r_s], each N(0, 1/r_s)."""

    def __init__(self, text_width: int, image_width: int, rank: int) -> None:
        super().__init__()
        self.shared_A = nn.Parameter(torch.randn(text_width, rank) / rank ** 0.5)
        self.shared_B = nn.Parameter(torch.randn(image_width, rank) / rank ** 0.5)

    def increment(self, stream: str) -> torch.Tensor:
        """S of `stream` [d, d]: A (BᵀB) Aᵀ for the text tower, B (AᵀA) Bᵀ for the image tower."""
        a, b = self.shared_A, self.shared_B
        return a @ (b.T @ b) @ a.T if stream == TEXT else b @ (a.T @ a) @ b.T


class MoRAAdapter(WeightAdapter):
    """One adapted projection (module docstring): own factors and magnitudes; the block's shared pair is read, not
    owned (it is registered once, in the method)."""

    def __init__(self, weight: torch.Tensor, stream: str, shared: SharedFactors, rank: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        if weight.shape[0] != weight.shape[1]:
            raise UserInputError(f"MoRA adapts square projections only, got a {tuple(weight.shape)} weight")
        d = weight.shape[1]
        norms = weight.detach().float().norm(p=2, dim=0, keepdim=True).to(weight.dtype)
        self.shared_magnitude = nn.Parameter(norms.clone())
        self.specific_magnitude = nn.Parameter(norms.clone())
        self.modality_A = nn.Parameter(torch.randn(d, rank) / rank ** 0.5)
        self.modality_B = nn.Parameter(torch.zeros(rank, d))
        self.dropout = nn.Dropout(dropout)
        self.stream, self.alpha = stream, float(alpha)
        self._shared = (shared,)   # a tuple: not a submodule, so its tensors keep one state-dict key

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        shared = weight + self.alpha * self._shared[0].increment(self.stream).T.to(weight.dtype)
        specific = weight + self.alpha * (self.modality_A @ self.modality_B).T.to(weight.dtype)
        return (self.shared_magnitude * (shared / shared.norm(p=2, dim=0, keepdim=True).clamp(min=NORM_EPS))
                + self.specific_magnitude * (specific / specific.norm(p=2, dim=0, keepdim=True).clamp(min=NORM_EPS)))

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(self.dropout(x), self.adapted_weight(weight).to(x.dtype), bias)


@register_method("mora")
class MoRA(PromptMethod):
    """Shared-plus-specific DoRA updates of ``mora_maps`` in blocks ``mora_start_layer``.. of both towers."""

    config_class = MoRAConfig
    title = "MoRA"
    preset = "mora"
    paper_run = (1e-2, 42)
    paper_backbone = "clip"
    paper_tables = "mdpl.experiments.papers.mora:tables"
    trains_backbone_parts = False   # the reference trains the adapters and the head only

    def __init__(self, config: MoRAConfig, info: BackboneInfo) -> None:
        super().__init__(config, info)
        text, image = info.stream(TEXT), info.stream(IMAGE)
        self.adapted_blocks = tuple(range(config.mora_start_layer, min(text.num_layers, image.num_layers)))
        self.shared = nn.ModuleDict({str(i): SharedFactors(text.width, image.width, config.mora_shared_rank)
                                     for i in self.adapted_blocks})

    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        """Per block: the image tower's maps, then the text tower's (the reference's construction order)."""
        maps = tuple(self.config.mora_maps)
        return tuple(AdapterSpec(stream, (i,), maps) for i in self.adapted_blocks for stream in (IMAGE, TEXT))

    def build_adapter(self, site: AdapterSite, spec: AdapterSpec, weight: torch.Tensor) -> WeightAdapter:
        c = self.config
        rank = c.mora_text_rank if site.stream == TEXT else c.mora_image_rank
        return MoRAAdapter(weight, site.stream, self.shared[str(site.block)], rank, c.mora_alpha, c.mora_dropout)
