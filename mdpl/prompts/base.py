"""The one interface between an encoder and a prompt method (docs/architecture.md, docs/methods.md §3, §4, §6).

A backbone is, to a method, a tuple of token *streams* (:class:`StreamInfo`): ViLT has one joint stream
(``"joint"``, text and image tokens together), CLIP two towers (``"image"``, ``"text"``). The block loop of
every stream (``mdpl.backbones.encoder.forward_blocks``) calls, before block ``i``:

* ``method.before_block(stream, i, x, mask, layout, ctx) -> (x, mask, layout)`` — may insert or replace tokens
  (input-level prompting, MAP §3.2, MemPrompt §4.3, DCP §6.4); ``mask`` is bool [B, N] (True = real token),
  ``layout`` the stream's :class:`~mdpl.prompts.layout.TokenLayout`;
* ``method.attention_prompts(stream, i, x, ctx) -> (k, v) | None`` — extra keys and values [B, P, width], already
  "projected", put in front of the block's own (attention-level prompting, MAP §3.3).

``ctx`` (:class:`PromptContext`) carries the missing-type vector of the rows the stream runs on, whatever
``method.prepare(missing_type)`` computed once per forward for all streams (DCP's correlated chain, §6.3), and two
read-only views of the stream: ``ctx.block_query(i, x)`` (block ``i``'s own frozen pre-attention norm and query
projection applied to tokens ``x``, SCP §14) and ``ctx.readout_positions(layout)`` (where each row's feature token,
e.g. ViLT's text [CLS], sits in a layout).

Optional pieces: a preparation need (``preparation_needs`` / ``load_prepared``, ``mdpl.prompts.preparation``:
computed over the training split with the frozen backbone before training), auxiliary loss terms (``aux_loss_names`` / ``aux_losses``, added to the training loss only)
and weight adapters on named linear maps of a stream's blocks (``adapter_specs`` / ``build_adapter``,
``mdpl.prompts.adapters``).

A method is a config dataclass (:class:`MethodConfig`: its keys, the papers' defaults, small ``tiny`` values,
validation) + a :class:`PromptMethod` subclass + one ``@register_method`` line (``mdpl.prompts.registry``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol

import torch
from torch import nn

from mdpl.data.constants import MISSING_COMPLETE, MISSING_IMAGE, MISSING_TEXT  # noqa: F401 (re-exported)
from mdpl.errors import UserInputError
from mdpl.prompts.adapters import AdapterSite, AdapterSpec, WeightAdapter, build_generic_adapter
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout
from mdpl.prompts.preparation import PreparationNeed, PreparedArtifact

JOINT = "joint"
"""Name of a single-stream backbone's stream (ViLT: ``[text ; image]``)."""

MISSING_TYPE_OF = {TEXT: MISSING_TEXT, IMAGE: MISSING_IMAGE}
"""The missing type that removes a modality."""


@dataclass(frozen=True)
class StreamInfo:
    """One token stream of a backbone, as a method sees it."""

    name: str                        # "joint" | "image" | "text"
    width: int                       # hidden size of the stream
    num_layers: int                  # blocks
    num_heads: int
    modalities: tuple[str, ...]      # ("text", "image") for the joint stream, else (name,)
    causal: bool = False             # CLIP text tower: causal attention (prompts in front see only earlier prompts)
    masks_padding: bool = True       # the stream's attention ignores padding keys (ViLT yes, CLIP no)

    @property
    def joint(self) -> bool:
        return len(self.modalities) > 1


@dataclass(frozen=True)
class BackboneInfo:
    """The streams of a backbone, in the order the classifier encodes them."""

    streams: tuple[StreamInfo, ...]
    what: str = "the backbone"        # how error messages name it, e.g. "the ViLT backbone (num_layers)"

    @property
    def num_layers(self) -> int:
        """Blocks available in every stream."""
        return min(s.num_layers for s in self.streams)

    def stream(self, name: str) -> StreamInfo:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream {name!r}; the backbone has {[s.name for s in self.streams]}")

    def width_of(self, modality: str) -> int:
        """Width of the stream that carries `modality` (text or image)."""
        return next(s.width for s in self.streams if modality in s.modalities)

    @property
    def single_stream(self) -> bool:
        return len(self.streams) == 1


class FrozenBlocks(Protocol):
    """Read-only operations with a stream's own frozen blocks (implemented by every backbone's stream encoder)."""

    def block_query(self, index: int, x: torch.Tensor, norm_eps: float | None = None) -> torch.Tensor:
        """Block `index`'s queries of tokens x [..., width]: its pre-attention norm, then the query rows of its
        (fused) in-projection; `norm_eps` replaces the norm's epsilon (None: the block's own)."""


@dataclass
class PromptContext:
    """What every hook of one forward sees: the missing types of the stream's rows, ``prepare``'s result and
    read-only views of the stream (its blocks' query projections, its read-out positions)."""

    missing_type: torch.Tensor       # long [B_rows]
    prepared: Any = None
    blocks: FrozenBlocks | None = None
    """The stream's blocks (set by the block loop, ``StreamEncoder.forward_blocks``)."""
    readout: Callable[[TokenLayout], torch.Tensor] | None = None
    """Layout -> long [B_rows], the position of each row's feature token (set by the classifier)."""
    token_ids: torch.Tensor | None = None
    """The ids of the stream's data tokens, long [B_rows, N] (CLIP's text stream; None elsewhere)."""

    def block_query(self, index: int, x: torch.Tensor, norm_eps: float | None = None) -> torch.Tensor:
        """Block `index`'s own query of x [..., width] (:class:`FrozenBlocks`); the frozen weights are read live,
        never copied."""
        if self.blocks is None:
            raise RuntimeError("this context has no stream blocks: run the hooks through StreamEncoder.forward_blocks")
        return self.blocks.block_query(index, x, norm_eps)

    def position_table(self) -> torch.Tensor | None:
        """The stream's additive position embeddings of its data tokens [N, width] (live frozen weights; CLIP's text
        tower), or None."""
        if self.blocks is None:
            raise RuntimeError("this context has no stream blocks: run the hooks through StreamEncoder.forward_blocks")
        table = getattr(self.blocks, "position_table", None)
        return None if table is None else table()

    def readout_positions(self, layout: TokenLayout) -> torch.Tensor:
        """Long [B_rows]: where each row's feature token (ViLT text [CLS], CLIP image CLS / text EOT, CoCa CLS) is in
        `layout`."""
        if self.readout is None:
            raise RuntimeError("this context has no read-out positions: build it with the classifier's readout")
        return self.readout(layout)


# ------------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class MethodConfig:
    """A method's options. Fields are config keys (the papers' values as defaults); ``TINY`` holds the small values
    of ``method_sizes='tiny'``. Subclasses validate in ``check(info)`` (one UserInputError line per mistake).
    A field with ``metadata={"shared_key": True}`` reads a key that is not the method's own (a run setting)."""

    TINY: ClassVar[Mapping[str, Any]] = {}
    DATASETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Dataset -> the values the reference used there where they differ from the defaults (paper sizes only)."""

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """Config key -> paper default (a fresh copy)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("shared_key"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = list(default) if isinstance(default, tuple) else default
        return out

    @classmethod
    def structural_keys(cls) -> tuple[str, ...]:
        """The keys that change the model (a checkpoint must agree on them to be evaluated): every key but those
        with ``metadata={"structural": False}`` (options that do not change outputs, side files)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if not f.metadata.get("shared_key") and f.metadata.get("structural", True))

    @classmethod
    def from_config(cls, flat: Mapping[str, Any]) -> "MethodConfig":
        """The options from a flat config: keys absent or None take the defaults."""
        values = {f.name: flat[f.name] for f in dataclasses.fields(cls) if flat.get(f.name) is not None}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def check(self, info: BackboneInfo) -> None:
        """Raise UserInputError for options the backbone cannot run."""


# ------------------------------------------------------------------------------------------------ method
class PromptMethod(nn.Module):
    """Base class: a method that inserts nothing (the baseline). Subclasses override the hooks they need."""

    name: ClassVar[str] = "base"
    preset: ClassVar[str | None] = None
    """The named config of config.py selecting this method (None: set ``prompt_method=<name>``)."""
    title: ClassVar[str] = ""
    """Display name in tables and plots (default: the registered name)."""
    paper_run: ClassVar[tuple[float, int]] = (1e-2, 0)
    """(learning rate, seed) of the method's paper; config.py's defaults when it is selected."""
    paper_learning_rates: ClassVar[Mapping[str, float]] = {}
    """Dataset -> the learning rate the reference used there when it differs from ``paper_run``'s."""
    paper_missing_type: ClassVar[str] = "both"
    """The missing type the reference trains and tests with on every split (config.py's default)."""
    in_demo: ClassVar[bool] = False
    """Trained by the embedded demo (``make demo``) unless ``demo_methods`` names others."""
    paper_backbone: ClassVar[str] = ""
    """The backbone the method's paper used (the benchmark's default pairing); '' = the default backbone."""
    padding_is_inert: ClassVar[bool] = True
    """Outputs do not depend on how far texts are padded (padded keys are masked): ``dynamic_text_padding`` is
    exact and on by default. False for a method that reads the hidden states of [PAD] positions (MemPrompt)."""
    fixed_segment_lengths: ClassVar[bool] = False
    """True: the method needs every sample's text and image segments at their full configured lengths (RAGPT's
    generators): no per-sample cut of the text in the benchmark's FLOP count."""
    image_transform: ClassVar[str] = ""
    """The image transform the method needs (config.py's default of ``image_transform``; '' = the backbone's): RAGPT's
    'square' gives every image the same full patch grid."""
    paper_tables: ClassVar[str | None] = None
    """``"module:function"`` returning the method's paper tables (``mdpl.experiments.matrix.Table``), or None."""
    paper_cell: ClassVar[str | None] = None
    """``"module:function"`` returning the keywords (``keys``, ``tiny_keys``) a table cell needs to run the method as
    its paper does beyond its preset (e.g. another backbone variant, a retriever and its weight file); used by the
    all-methods table. None: the preset alone."""
    reference_prompt_keys: ClassVar[tuple[str, ...]] = ()
    """Key prefixes of the method's prompt modules in checkpoints of its reference code on ViLT (empty: no such
    checkpoints are read; the baseline's have no prompt keys)."""
    reference_config_keys: ClassVar[tuple[str | tuple[str, str], ...]] = ()
    """Config keys of its reference code that define the trained model: a name with the same meaning in mdpl, or a
    pair (reference name, mdpl name) where mdpl's differs."""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    trains_backbone_parts: ClassVar[bool] = True
    """False: the backbone's ``trainable_parts`` stay frozen (a method whose reference trains only its own
    parameters and the head)."""
    extra_backbone_parts: ClassVar[tuple[str, ...]] = ()
    """Names of optional backbone parts (``Backbone.optional_parts``, e.g. ``"text_projection"``) the method's
    reference also trains, beyond the backbone's ``trainable_parts``."""
    drops_missing_streams: ClassVar[bool] = False
    """True: on a multi-stream backbone the feature of a stream whose modality is missing is zero, and that stream
    is not computed for those rows (DCP §6.5). Single-stream backbones ignore it."""

    aux_loss_names: ClassVar[tuple[str, ...]] = ()
    """Names of the auxiliary loss terms :meth:`aux_losses` returns; the term ``<name>`` is weighted by the config
    field ``<name>_loss_weight`` of the method's config class."""

    def __init__(self, config: MethodConfig, info: BackboneInfo):
        super().__init__()
        config.check(info)
        self.config = config
        self.info = info
        for name in self.aux_loss_names:
            if not hasattr(config, f"{name}_loss_weight"):
                raise TypeError(f"{type(self).__name__} declares the auxiliary loss {name!r} but its config class "
                                f"has no field {name}_loss_weight")
        self.adapters = nn.ModuleDict()
        """Adapter key (``AdapterSite.key``) -> :class:`~mdpl.prompts.adapters.WeightAdapter`, filled by the
        classifier from :meth:`adapter_specs`; emptied when the adapters are merged into the weights."""
        self._adapter_sites: dict[str, AdapterSite] = {}
        self._block_adapters: dict[tuple[str, int], dict[str, WeightAdapter]] = {}
        self.adapters_enabled = True

    @property
    def skip_missing(self) -> bool:
        """Whether rows of a dropped stream are skipped (exact) rather than computed and zeroed."""
        return True

    def prepare(self, missing_type: torch.Tensor) -> Any:
        """Computed once per forward, shared by every stream's hooks as ``ctx.prepared``."""
        return None

    def prepare_batch(self, missing_type: torch.Tensor, batch: Mapping[str, Any]) -> Any:
        """``prepare`` for a method whose per-forward state depends on the samples themselves (RAGPT's retrieved
        neighbours: the batch's ``item_index`` and ``split``); the classifier calls this one. Default: ``prepare``."""
        return self.prepare(missing_type)

    def synthetic_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Random stand-ins for the per-sample inputs the preparation stage would give (the benchmark's synthetic
        batches; RAGPT's neighbours). Default: none."""
        return {}

    def readout_segment(self, stream: StreamInfo) -> str | None:
        """A segment this method inserts whose first token is `stream`'s feature token instead of the backbone's
        read-out (RAGPT pools its label token, RAGPT-D5); None: the backbone's read-out."""
        return None

    def build_head(self, num_classes: int) -> nn.Module | None:
        """The task head when the method owns it (registered as ``{dataset}_classifier`` in place of the backbone's
        head; RAGPT's label-prototype head), or None: the backbone's head."""
        return None

    def head_logits(self, head: nn.Module, pooled: torch.Tensor, prepared: Any) -> torch.Tensor:
        """Logits [B, C] of the stream features `pooled` [B, F]. Default: ``head(pooled)``."""
        return head(pooled)

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Tokens before block `index` of `stream`: x [B, N, D], mask bool [B, N]."""
        return x, mask, layout

    def attention_prompts(self, stream: StreamInfo, index: int, x: torch.Tensor,
                          ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra (K, V) of block `index` of `stream`, each [B, P, width], or None."""
        return None

    def after_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                    layout: TokenLayout, ctx: PromptContext) -> None:
        """Sees the output of block `index` of `stream` (x [B, N, D]; [B, 1, D] after the last block, which computes
        only the read-out position); `index` -1: the embeddings (block 0's input, before ``before_block(0)``).
        Records what later hooks read, changes nothing."""

    def lock_step_order(self, info: BackboneInfo) -> tuple[str, ...] | None:
        """None (the default): the classifier encodes the streams one after the other. A tuple of stream names: the
        streams advance block by block in one loop, block ``i`` of each stream in this order before block ``i + 1``
        of any, so a hook of one stream can read what the others' hooks recorded up to then (AOEPT's cross-modal
        gates). Without hooks that read across streams the logits are the same either way."""
        return None

    def masks_padding_keys(self, stream: StreamInfo) -> bool:
        """True: on a stream whose attention reads padding (``masks_padding`` False: CLIP), padding keys are hidden
        from every query (Hugging Face CLIP's text model with its attention mask), for a method that reads the
        outputs of padding positions."""
        return False

    def readout_override(self, stream: StreamInfo, layout: TokenLayout, positions: torch.Tensor,
                         ctx: PromptContext) -> torch.Tensor:
        """Where each row's feature is read, given the backbone's `positions` (long [B]) in `layout` (default: there);
        `ctx.token_ids` holds the stream's ids where the backbone gives them."""
        return positions

    def reads_every_position_until(self, stream: StreamInfo) -> int:
        """The last block whose hooks read every position of `stream` (e.g. a max-pool over its padding too), -1 if
        none: on a causal stream the positions after the last read-out token are dropped after that block's hooks
        (exact: later positions cannot change earlier ones)."""
        return -1

    # --- preparation stage ----------------------------------------------------------------------------
    def preparation_needs(self) -> PreparationNeed | None:
        """What this method needs computed over the training split with the frozen backbone before it trains or
        tests (pooled block inputs, k-means centres, neighbour lists; ``mdpl.prompts.preparation``), or None."""
        return None

    def load_prepared(self, artifact: PreparedArtifact) -> None:
        """Receive the preparation's result (on every rank, when fit or ``test_only`` starts). Copy what is kept into
        tensors allocated in ``__init__`` (their sizes follow from the config), so that the optimizer, DDP and
        checkpoints see the same tensors throughout. Tensors a checkpoint holds keep its values (a resumed run, a
        trained parameter initialised from the artefact, ``test_only``)."""
        raise NotImplementedError(f"{type(self).__name__} declares preparation_needs but no load_prepared")

    # --- auxiliary losses -----------------------------------------------------------------------------
    def aux_losses(self, prepared: Any) -> dict[str, torch.Tensor]:
        """Auxiliary loss terms of this forward, name -> scalar tensor (names from ``aux_loss_names``), called once
        after the streams with ``prepare``'s result (a term that depends on the forward reads what the hooks left
        in it). The engine adds ``sum(weight * term)`` to the **training** loss only and logs each unweighted term
        as ``train/aux/<name>``; validation and test losses and metrics are the task's alone."""
        return {}

    def aux_loss_weight(self, name: str) -> float:
        """The weight of the auxiliary term `name`: the config field ``<name>_loss_weight``."""
        return float(getattr(self.config, f"{name}_loss_weight"))

    # --- weight adapters ------------------------------------------------------------------------------
    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        """The weight adapters this method declares (none: the method only inserts tokens)."""
        return ()

    def build_adapter(self, site: AdapterSite, spec: AdapterSpec, weight: torch.Tensor) -> WeightAdapter:
        """The adapter of one linear map, from its frozen `weight` [out, in] (pre-trained weights already loaded;
        do not keep a reference to it). Default: LoRA, or DoRA with ``spec.magnitude``."""
        return build_generic_adapter(spec, weight)

    def add_adapter(self, site: AdapterSite, adapter: WeightAdapter) -> None:
        """Register `adapter` for `site` (called by the classifier for every site of every spec)."""
        if site.key in self.adapters:
            raise UserInputError(f"two adapters on {site.map} of block {site.block} of stream {site.stream!r}")
        self.adapters[site.key] = adapter
        self._adapter_sites[site.key] = site
        self._block_adapters.setdefault((site.stream, site.block), {})[site.map] = adapter

    def adapter_sites(self) -> list[tuple[AdapterSite, WeightAdapter]]:
        """Every registered adapter with its site, in registration order."""
        return [(self._adapter_sites[key], adapter) for key, adapter in self.adapters.items()]

    def remove_adapters(self) -> None:
        """Drop every adapter (their updates were merged into the weights)."""
        self.adapters = nn.ModuleDict()
        self._adapter_sites.clear()
        self._block_adapters.clear()

    def block_adapters(self, stream: StreamInfo, index: int) -> dict[str, WeightAdapter]:
        """Map name -> adapter of block `index` of `stream` (the block loop computes those maps through them)."""
        if not self.adapters_enabled or not self._block_adapters:
            return {}
        return self._block_adapters.get((stream.name, index), {})

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the method learns (the classifier's freezing routine trains exactly these of its parameters)."""
        return (p for p in self.parameters() if p.requires_grad)

    @classmethod
    def upgrade_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename keys of older or reference checkpoints of this method to the classifier's key names."""
        return dict(state)

    @classmethod
    def complete_reference_state(cls, state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                                 config: MethodConfig) -> dict[str, torch.Tensor]:
        """`state` (a reference checkpoint, keys upgraded) with what the reference never saved added from the side
        files `config` (the method's options) names, or a UserInputError when it cannot be evaluated exactly. `own`:
        the model's state."""
        return state

    @classmethod
    def added_tokens(cls, config: MethodConfig, info: BackboneInfo) -> dict[str, int]:
        """Stream name -> prompt tokens in that stream's sequence after the last prompted block (the benchmark's
        sequence-length model; absent = 0)."""
        return {}


def check_layers(key: str, layers: Any, info: BackboneInfo, allow_empty: bool = False) -> list[int]:
    """Validate a prompt-layer list: unique ints in [0, num_layers), non-empty unless allowed (D-19, D-28)."""
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise UserInputError(f"{key} must be a list of layer indices, got {layers!r}")
    out = list(layers)
    if not out and not allow_empty:
        raise UserInputError(f"{key} must not be empty")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in out):
        raise UserInputError(f"{key} must be a list of layer indices, got {out!r}")
    n = info.num_layers
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise UserInputError(f"{key}={out} has layers {bad} outside 0..{n - 1} ({info.what} has {n} layers)")
    if len(set(out)) != len(out):
        raise UserInputError(f"{key}={out} names a layer twice; list each prompted layer once")
    return out


def check_positive(key: str, value: Any) -> int:
    """Validate a positive integer option."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserInputError(f"{key} must be a positive integer, got {value!r}")
    return value
