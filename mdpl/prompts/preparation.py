"""What a method asks the preparation stage for, and what it gets back (docs/architecture.md, "Preparation").

Some methods read the training split with the frozen backbone before they train: prototypes by k-means over pooled
block inputs (AOEPT's memory tokens), nearest-neighbour lists for retrieval (RAGPT). A method declares that with
``PromptMethod.preparation_needs() -> PreparationNeed | None``; the engine (``mdpl.engine.preparation``) computes it
once per (data, backbone weights, need), stores it beside the data and hands it to ``PromptMethod.load_prepared``
before training and before testing. This module is the interface side only: plain dataclasses, no computation.

Layers are *block inputs*: layer ``l`` is the input of block ``l`` of the stream (``0`` = the embedding output), and
``l = num_layers`` is the output of the last block (before the backbone's final norm).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

POOLINGS = ("mean", "mean_all", "first", "tokens")
"""``mean``: over the real tokens of the span (the stream's key mask); ``mean_all``: over every position of the span
(padding included); ``first``: the span's first token; ``tokens``: no pooling, every position of the span (a span of
the same length in every batch: [N_train, layers, length, width])."""
DTYPES = ("float32", "float16", "bfloat16")
MISSING_MODES = ("table", "complete")
"""``table``: the training split's missing table applies (dummies as in training, without ``simulate_missing``);
``complete``: every sample with both modalities."""
METRICS = ("cosine", "l2")
SELF_EXCLUSIONS = ("index", "position")
"""``index``: a query that is itself a memory item never returns itself (the memory row of that item); ``position``:
query ``p`` of *any* split may not return memory row ``p`` (a list position taken for the item's identity: right
for the first memory split only)."""
TRAIN = "train"
OMIT_DEFAULT = {"omit_default": True}
"""Field metadata: left out of :meth:`PreparationNeed.as_dict` at its default, so that artefacts computed before the
field existed keep their key."""
NOT_IN_KEY = {"not_in_key": True}
"""Field metadata: never in :meth:`PreparationNeed.as_dict` (what only words a message)."""


def _as_plain(obj: Any) -> Any:
    """``dataclasses.asdict`` without the ``OMIT_DEFAULT`` fields that hold their default."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("not_in_key") or (f.metadata.get("omit_default") and value == f.default):
                continue
            out[f.name] = _as_plain(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_plain(v) for v in obj)
    return obj


def _check_splits(key: str, splits: tuple[str, ...]) -> None:
    if not splits or splits[0] != TRAIN or len(set(splits)) != len(splits):
        raise ValueError(f"{key}={splits}: distinct splits, the training split first")


@dataclass(frozen=True)
class FeatureRequest:
    """Pooled block inputs of one stream: a tensor [N_train, len(layers), width] named ``name``."""

    name: str
    stream: str                          # StreamInfo.name: "joint" | "image" | "text"
    layers: tuple[int, ...]              # block inputs, 0..num_layers (num_layers: output of the last block)
    segment: str | None = None           # a TokenLayout segment ("text", "image"); None: the whole sequence
    pooling: str = "mean"                # POOLINGS
    zero_missing: bool = False           # rows whose modality (the segment's, or the stream's) is missing give zeros
    dtype: str = "float32"               # DTYPES: how the features are stored

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: one of {POOLINGS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: one of {DTYPES}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={self.layers}: a non-empty list of distinct block inputs")


@dataclass(frozen=True)
class KMeansRequest:
    """K-means per layer over a feature: centres [len(layers), k', width], k' = min(k, rows clustered).

    Lloyd iterations from k-means++ seeds (``n_init`` restarts, the lowest inertia kept), stopped after ``iters`` or
    when the squared centre shift is at most ``tol`` times the mean per-dimension variance (sklearn's rule).
    ``drop_zero_rows``: rows that are zero at every layer (``zero_missing`` rows) are not clustered."""

    feature: str
    k: int
    iters: int = 300
    seed: int = 0
    n_init: int = 1
    tol: float = 1e-4
    drop_zero_rows: bool = True


@dataclass(frozen=True)
class NeighbourRequest:
    """Exact top-``k`` neighbours among the training items of one layer of a feature: indices [N_train, k] (item
    indices, best first) and scores [N_train, k] (cosine similarity, or minus the squared L2 distance)."""

    feature: str
    layer: int
    k: int
    metric: str = "cosine"               # METRICS
    exclude_self: bool = True

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: one of {METRICS}")


@dataclass(frozen=True)
class RetrievalRequest:
    """Nearest training items of every item of ``splits``, per modality, by the features of another registered
    backbone (the *retriever*: a two-tower backbone such as CLIP, its frozen encoders from the local file
    ``weights``, at ``image_size``, its other sizes the run's keys of that backbone). Every item is embedded complete;
    an image query is compared with the memory's images only, a text query with its texts only. The memory is the
    items of ``memory`` (default the training split; in that order, the row order of the artefact's features and
    labels, ``PreparationNeed.splits``); ``self_exclusion`` (``SELF_EXCLUSIONS``) says which memory row a query may
    not return. ``text_features``: ``""`` the retriever's own text feature, or a variant it offers
    (``TwoTowerBackbone``'s ``text_feature_variants``). An empty ``weights`` (a random retriever) is refused when the
    run's backbone has pre-trained weights (its neighbours would be random; ``weights_key`` names the key to set).
    Result: split -> modality -> (indices long [N_split, k] into the memory, scores)."""

    name: str
    backbone: str
    weights: str
    image_size: int
    k: int
    splits: tuple[str, ...] = ("train", "val", "test")
    metric: str = "cosine"
    memory: tuple[str, ...] = field(default=(TRAIN,), metadata=OMIT_DEFAULT)
    self_exclusion: str = field(default="index", metadata=OMIT_DEFAULT)
    text_features: str = field(default="", metadata=OMIT_DEFAULT)
    weights_key: str = field(default="", metadata=NOT_IN_KEY)    # the config key naming `weights` (for messages)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "memory", tuple(self.memory))
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: one of {METRICS}")
        if self.self_exclusion not in SELF_EXCLUSIONS:
            raise ValueError(f"self_exclusion={self.self_exclusion!r}: one of {SELF_EXCLUSIONS}")
        _check_splits("memory", self.memory)


@dataclass(frozen=True)
class PreparationNeed:
    """Everything a method needs computed over the training split before it trains or tests.

    ``mask_missing``: on a joint stream the missing modality's tokens are masked as keys from block 0 on (a
    collection pass that ignores the dummies); no effect on single-modality streams. ``mask_keeps_first``: segments
    whose first token (the text [CLS]) stays a key when the rest is masked that way. ``keep_features``: the artefact
    keeps the pooled features themselves (otherwise only centres and neighbours), ``keep_labels`` the training items'
    labels. ``splits``: the items collected, split after split (the training split first; default only it): the rows
    of the features and labels (a retrieval's ``memory`` must name the same). ``version``: change it when the
    method's use of the artefact changes, so older artefacts are not reused."""

    features: tuple[FeatureRequest, ...]
    kmeans: tuple[KMeansRequest, ...] = ()
    neighbours: tuple[NeighbourRequest, ...] = ()
    retrieval: tuple[RetrievalRequest, ...] = ()
    missing: str = "table"               # MISSING_MODES
    mask_missing: bool = False
    keep_features: bool = False
    keep_labels: bool = False
    version: str = ""
    splits: tuple[str, ...] = field(default=(TRAIN,), metadata=OMIT_DEFAULT)
    mask_keeps_first: tuple[str, ...] = field(default=(), metadata=OMIT_DEFAULT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_keeps_first", tuple(self.mask_keeps_first))
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        unknown = sorted({r.feature for r in (*self.kmeans, *self.neighbours)} - set(names))
        if unknown:
            raise ValueError(f"k-means / neighbour requests name unknown features {unknown}")
        if self.missing not in MISSING_MODES:
            raise ValueError(f"missing={self.missing!r}: one of {MISSING_MODES}")
        object.__setattr__(self, "splits", tuple(self.splits))
        _check_splits("splits", self.splits)
        if any(r.memory != self.splits for r in self.retrieval):
            raise ValueError(f"a retrieval's memory must be the collected splits {self.splits}")

    def feature(self, name: str) -> FeatureRequest:
        return next(f for f in self.features if f.name == name)

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (part of the artefact's dependencies)."""
        return _as_plain(self)


@dataclass
class PreparedArtifact:
    """The preparation's result, as ``load_prepared`` receives it.

    ``item_index`` long [N_train]: the training items in dataset order (row i of every per-item tensor); with
    ``PreparationNeed.splits`` the rows run over those splits in turn (N_train then means their total).
    ``features``: name -> [N_train, layers, width] (only with ``keep_features``). ``centres``: feature name ->
    [layers, k', width]. ``neighbours``: feature name -> (indices long [N_train, k], scores [N_train, k]).
    ``retrieved``: retrieval name -> split -> modality -> (indices long [N_split, k], scores). ``labels``: the
    training items' labels (long [N_train] or float multi-hot [N_train, C]) with ``keep_labels``.
    ``key`` and ``dependencies``: what the artefact was computed from (``mdpl.engine.preparation``)."""

    key: str
    dependencies: dict[str, Any]
    item_index: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    centres: dict[str, torch.Tensor] = field(default_factory=dict)
    neighbours: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    retrieved: dict[str, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)
    labels: torch.Tensor | None = None
