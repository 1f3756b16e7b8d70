"""Weight adapters: learned changes of a stream's frozen linear maps, declared by a method (docs/architecture.md).

A method that adapts weights instead of (or besides) inserting tokens declares :class:`AdapterSpec` s in
:class:`~mdpl.prompts.base.StreamInfo` terms — a stream, some of its blocks, and named linear maps of those blocks:

* ``q``, ``k``, ``v``: the query, key and value projections (rows of a fused in-projection where the backbone has one);
* ``out``: the attention output projection;
* ``fc1``, ``fc2``: the block MLP's first and second linear layers.

The classifier asks the stream's encoder for each named map's frozen weight (a view: a fused in-projection is sliced,
never copied), has the method build one :class:`WeightAdapter` per (stream, block, map) from it, and the block loop
then computes that map through the adapter. Every adapter is a small protocol on the frozen weight ``W`` [out, in]:

* :meth:`WeightAdapter.adapted_weight` ``(W) -> W_eff``: the effective weight — ``W + delta`` (LoRA,
  :class:`LowRankAdapter`) or a reparametrised ``W`` (DoRA, :class:`DecomposedAdapter`: magnitude times the
  normalised ``W + delta``);
* ``forward(x, W, b)``: the adapted map on the input (default ``linear(x, W_eff, b)``; LoRA adds its low-rank branch
  instead of forming ``W_eff``);
* :meth:`WeightAdapter.merged_weight` ``(W)``: ``W_eff`` for evaluation (no dropout), computed in float32 and folded
  into the frozen weight by the classifier's ``merge_adapters`` — the merged model runs no adapter code.

Nothing here knows a backbone: the linear-map access is the encoder's (``StreamEncoder.linear_map``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError

QKV_MAPS = ("q", "k", "v")
MLP_MAPS = ("fc1", "fc2")
LINEAR_MAPS = (*QKV_MAPS, "out", *MLP_MAPS)
"""The linear maps of a block an adapter may target."""


@dataclass(frozen=True)
class AdapterSite:
    """One adapted linear map: block `block` of stream `stream`, map `map` (one of :data:`LINEAR_MAPS`)."""

    stream: str
    block: int
    map: str

    @property
    def key(self) -> str:
        """The adapter's name in the method's ``adapters`` (state-dict keys ``prompt.adapters.<key>.*``)."""
        return f"{self.stream}_{self.block}_{self.map}"


@dataclass(frozen=True)
class AdapterSpec:
    """Adapters on the maps `maps` of the blocks `blocks` of stream `stream`.

    The generic adapters (``PromptMethod.build_adapter``) read the other fields: `rank` of the low-rank update,
    its scale ``alpha / rank`` (`alpha` None: 1), `dropout` on the low-rank branch's input while training, and
    `magnitude` (DoRA) with its `norm` axis — ``"column"`` (per input feature, over the output axis) or ``"row"``
    (per output feature, PEFT's DoRA). A method with adapters of its own reads what it needs and ignores the rest."""

    stream: str
    blocks: tuple[int, ...]
    maps: tuple[str, ...]
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    magnitude: bool = False
    norm: str = "column"

    def sites(self) -> Iterator[AdapterSite]:
        for block in self.blocks:
            for name in self.maps:
                yield AdapterSite(self.stream, int(block), name)

    def check(self, streams: dict[str, int]) -> None:
        """UserInputError for a stream the backbone lacks, a block outside it, an unknown map or a bad rank.
        `streams`: stream name -> number of blocks."""
        if self.stream not in streams:
            raise UserInputError(f"an adapter names stream {self.stream!r}; the backbone has {sorted(streams)}")
        bad = [b for b in self.blocks if not isinstance(b, int) or not 0 <= b < streams[self.stream]]
        if bad or not self.blocks:
            raise UserInputError(f"adapter blocks {list(self.blocks)} of stream {self.stream!r} must be a non-empty "
                                 f"list in 0..{streams[self.stream] - 1}")
        unknown = [m for m in self.maps if m not in LINEAR_MAPS]
        if unknown or not self.maps:
            raise UserInputError(f"adapter maps {list(self.maps)}: each must be one of {', '.join(LINEAR_MAPS)}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise UserInputError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.norm not in ("column", "row"):
            raise UserInputError(f"adapter norm must be 'column' or 'row', got {self.norm!r}")


class WeightAdapter(nn.Module):
    """The protocol of one adapted linear map (module docstring). Subclasses implement :meth:`adapted_weight`."""

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective weight [out, in] from the frozen `weight` (differentiable in the adapter's parameters)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The adapted map on x [..., in] with the frozen `weight` and `bias`."""
        return F.linear(x, self.adapted_weight(weight).to(x.dtype), bias)

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The evaluation-mode effective weight, computed in float32, in `weight`'s dtype (what ``merge`` folds in)."""
        return self.adapted_weight(weight.float()).to(weight.dtype)


class LowRankAdapter(WeightAdapter):
    """LoRA: ``W_eff = W + (alpha / rank) B A`` with A [rank, in] (Kaiming-uniform) and B [out, rank] (zeros), so
    the adapted model starts as the frozen one. The forward adds the low-rank branch ``scale B A dropout(x)`` to
    the frozen map instead of forming ``W_eff``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = (rank if alpha is None else float(alpha)) / rank
        self.dropout = nn.Dropout(dropout)

    def delta(self) -> torch.Tensor:
        """``scale B A`` [out, in]."""
        return self.scale * (self.lora_B @ self.lora_A)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, weight, bias) + self.scale * low_rank


def normalised(weight: torch.Tensor, norm: str, eps: float = 0.0) -> torch.Tensor:
    """`weight` [out, in] divided by its column norms (``"column"``: per input feature) or row norms (``"row"``),
    each clamped below at `eps`."""
    return weight / weight_norm(weight, norm).clamp_min(eps)


def weight_norm(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """Column norms [1, in] (``"column"``) or row norms [out, 1] (``"row"``) of `weight` [out, in]."""
    return weight.norm(p=2, dim=0 if norm == "column" else 1, keepdim=True)


class DecomposedAdapter(LowRankAdapter):
    """DoRA: ``W_eff = m * (W + scale B A) / ||W + scale B A||`` with a learned magnitude `m` initialised to the
    norms of the frozen `weight`, so the adapted model starts as the frozen one. `norm` picks the axis:
    ``"column"`` (m [1, in], norms over the output axis) or ``"row"`` (m [out, 1], PEFT's DoRA). The dropout of
    the low-rank spec is not applied (the direction is normalised as a whole)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None, norm: str = "column",
                 eps: float = 0.0) -> None:
        super().__init__(weight.shape[0], weight.shape[1], rank, alpha)
        self.norm, self.eps = norm, eps
        self.magnitude = nn.Parameter(weight_norm(weight.detach().float(), norm).to(weight.dtype).clone())

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        direction = weight + self.delta().to(weight.dtype)
        return self.magnitude.to(weight.dtype) * normalised(direction, self.norm, self.eps)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return WeightAdapter.forward(self, x, weight, bias)


def build_generic_adapter(spec: AdapterSpec, weight: torch.Tensor) -> WeightAdapter:
    """LoRA, or DoRA with ``spec.magnitude``, for the frozen `weight` [out, in]."""
    if spec.magnitude:
        return DecomposedAdapter(weight, spec.rank, spec.alpha, spec.norm)
    return LowRankAdapter(weight.shape[0], weight.shape[1], spec.rank, spec.alpha, spec.dropout)
