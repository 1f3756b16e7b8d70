"""DCP — Deep Correlated Prompting (Hu et al., NeurIPS 2024; docs/methods.md §6), on every backbone.

Pieces:
* :class:`DCPConfig` — the keys; :class:`DCPLayout` — one description of the prompt tokens of a stream (D-40):
  ``n = prompt_length // 3`` layer prompts, then ``n`` common prompts, then ``n`` dynamic prompts (either may be
  switched off).
* :class:`DCPPromptLearner` — the per-type initial prompts, the correlated per-layer projection chain and the
  common-prompt projections (§6.1, §6.3), computed once per forward (``prepare``) for every stream and gathered
  by missing type (D-36).
* :class:`DynamicPrompts` — per stream a single-head ``attn_prompt`` and three persistent query sets
  ``prompts_dynamic_{complete,image,text}`` (D-34): the sample's query set attends over the block-0 input.
* :class:`DeepCorrelatedPrompts` — the method. Before block 0 of a stream it inserts
  ``[R^0 ; C ; Dyn ; data]``; before blocks 1..depth-1 it replaces the ``R`` tokens (§6.4). On CLIP (the paper's
  setting) each tower gets its modality's prompts and the classifier zeroes the feature of a missing modality
  (``drops_missing_streams``, §6.5), skipping those rows exactly (``dcp_skip_missing``).
  On the joint ViLT stream (our mapping, not defined by the DCP paper) both modalities' prompts go in front of
  ``[text ; image]``: ``[R_t^0 ; R_v^0 ; C_t ; C_v ; Dyn ; text ; image]``; the learner is built with image width =
  text width = D, so the correlated chain still generates each side from both sides' previous prompts; the dynamic
  queries attend with the key-padding mask (ViLT's attention masks padding, CLIP's does not); one joint feature,
  no zeroing.

Missing types (§0): 0 complete, 1 text missing, 2 image missing. Checkpoints of the reference code (and of
earlier mdpl versions) use the reference layout (``model.prompt_learner.*``, queries on the towers' block 0);
:meth:`DeepCorrelatedPrompts.upgrade_state_dict` renames them.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import BackboneInfo, MethodConfig, PromptContext, PromptMethod, StreamInfo, check_positive
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout, splice_tokens
from mdpl.prompts.registry import register_method

DYNAMIC_NAMES = ("prompts_dynamic_complete", "prompts_dynamic_image", "prompts_dynamic_text")
"""Dynamic query sets in missing-type order 0, 1, 2 (§6.2)."""


@dataclass(frozen=True)
class DCPConfig(MethodConfig):
    """DCP's keys with the reference values (§6)."""

    prompt_length: int = 36                 # prompt tokens per stream: n layer + n common + n dynamic
    prompt_depth: int = 6                   # blocks with layer prompts; 0 = frozen backbone + head (§6.7)
    dcp_correlated: bool = True             # off: independent per-layer per-type prompts (our definition)
    dcp_dynamic: bool = True                # off: no dynamic prompts
    dcp_common: bool = True                 # off: no modal-common prompts
    dcp_dynamic_trainable: bool = False     # reference: the dynamic queries are frozen (saved as buffers, D-34)
    dcp_independent_init: bool = dataclasses.field(default=False, metadata={"structural": False})
    """Reference: the per-layer projections start as identical copies (D-39); an initialisation choice only."""
    dcp_skip_missing: bool = dataclasses.field(default=True, metadata={"structural": False})
    """Skip the tower whose feature is zeroed (exact: the outputs do not change)."""
    dcp_dynamic_queries: str = dataclasses.field(default="", metadata={"structural": False})
    """File with a reference run's dynamic queries (its checkpoints lack them)."""

    TINY = {"prompt_length": 6, "prompt_depth": 2}   # a multiple of 3: 2 layer + 2 common + 2 dynamic prompts

    def check(self, info: BackboneInfo) -> None:
        depth = self.prompt_depth
        if not (isinstance(depth, int) and 0 <= depth <= info.num_layers):
            raise UserInputError(f"prompt_depth={depth!r} must be an integer in 0..{info.num_layers} ({info.what} has "
                                 f"{info.num_layers} layers)")
        DCPLayout.from_config(self)


@dataclass(frozen=True)
class DCPLayout:
    """Token layout of the prompts in front of each tower's sequence (§6.4, D-40).

    Block 0 input: ``[layer prompts R (n) ; common C (n_common) ; dynamic Dyn (n_dynamic) ; data]``.
    Blocks 1..depth-1 replace the first ``n`` tokens; the others are inherited as ordinary tokens.
    ``depth == 0`` means no prompts at all (frozen CLIP + linear head, the "Baseline" of §6.7).
    """

    prompt_length: int = 36
    depth: int = 6
    correlated: bool = True
    dynamic: bool = True
    common: bool = True

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise UserInputError(f"prompt_depth must be >= 0, got {self.depth}")
        if self.depth == 0 and (self.dynamic or self.common):
            raise UserInputError("prompt_depth=0 inserts no prompts, so dcp_dynamic and dcp_common cannot be on; also "
                                 "set dcp_dynamic=False dcp_common=False (or choose prompt_depth >= 1)")
        if self.depth > 0:
            check_positive("prompt_length", self.prompt_length)
        if self.depth > 0 and self.prompt_length % 3:
            raise UserInputError(f"prompt_length={self.prompt_length} must be a multiple of 3 for dcp: a third each "
                                 "for the layer, modal-common and dynamic prompts (e.g. prompt_length=36)")

    @property
    def n(self) -> int:
        """Layer-prompt tokens per layer (12 at prompt_length 36)."""
        return self.prompt_length // 3 if self.depth > 0 else 0

    @property
    def n_common(self) -> int:
        return self.n if self.common else 0

    @property
    def n_dynamic(self) -> int:
        return self.n if self.dynamic else 0

    @property
    def num_tokens(self) -> int:
        """Prompt tokens in front of the data tokens from block 0 on (36 by default)."""
        return self.n + self.n_common + self.n_dynamic

    @classmethod
    def from_config(cls, config: "DCPConfig") -> "DCPLayout":
        return cls(config.prompt_length, config.prompt_depth, config.dcp_correlated, config.dcp_dynamic,
                   config.dcp_common)


def _normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.normal_(torch.empty(*shape), std=0.02))


def _bottleneck(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU (exact) -> Linear; keys ``.0`` / ``.2`` as in the reference (§6.1)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _replicate(module: nn.Module, count: int, independent: bool) -> nn.ModuleList:
    """``count`` deep copies of one initialised module (identical init, D-39) or fresh re-inits."""
    copies = [copy.deepcopy(module) for _ in range(count)]
    if independent:
        for m in copies[1:]:
            for layer in m.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
    return nn.ModuleList(copies)


class DCPPromptLearner(nn.Module):
    """Initial prompts, correlated projection chain and common prompts (``model.prompt_learner.*``, §6.1).

    ``correlated=False`` (our ablation, §6.7): every layer's ``n`` prompts are independent per-type
    parameters ``visual_prompts`` [depth, 3, n, Dv] / ``text_prompts`` [depth, 3, n, Dt] (MMP-style).
    """

    def __init__(self, layout: DCPLayout, vision_width: int, text_width: int, independent_init: bool = False,
                 reduction: int = 16) -> None:
        super().__init__()
        self.layout = layout
        n, depth, dv, dt = layout.n, layout.depth, vision_width, text_width
        joint = dv + dt
        if layout.correlated and depth > 0:
            self.visual_prompt_complete, self.visual_prompt_missing = _normal(n, dv), _normal(n, dv)
            self.text_prompt_complete, self.text_prompt_missing = _normal(n, dt), _normal(n, dt)
        if layout.common:
            self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text = (
                _normal(n, dt), _normal(n, dt), _normal(n, dt))
        if layout.correlated and depth > 0:
            self.compound_prompt_projections_text = _replicate(
                _bottleneck(joint, joint // reduction, dt), depth, independent_init)
            self.layernorm_text = nn.ModuleList([nn.LayerNorm(joint) for _ in range(depth)])
            self.compound_prompt_projections_image = _replicate(
                _bottleneck(joint, joint // reduction, dv), depth, independent_init)
            self.layernorm_image = nn.ModuleList([nn.LayerNorm(joint) for _ in range(depth)])
        elif depth > 0:
            self.visual_prompts = _normal(depth, 3, n, dv)
            self.text_prompts = _normal(depth, 3, n, dt)
        if layout.common:
            self.common_prompt_projection_image = _bottleneck(dt, dt // reduction, dv)
            self.common_prompt_projection_text = _bottleneck(dt, dt // reduction, dt)

    def _layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type layer prompts R_v^l [3, n, Dv], R_t^l [3, n, Dt] for l < depth (§6.3)."""
        depth = self.layout.depth
        if not self.layout.correlated:
            return list(self.visual_prompts.unbind(0)), list(self.text_prompts.unbind(0))
        img = torch.stack([self.visual_prompt_complete, self.visual_prompt_complete, self.visual_prompt_missing])
        txt = torch.stack([self.text_prompt_complete, self.text_prompt_missing, self.text_prompt_complete])
        out_img, out_txt = [], []
        for layer in range(depth):
            u = torch.cat([img, txt], dim=-1)
            img = self.compound_prompt_projections_image[layer](self.layernorm_image[layer](u))
            txt = self.compound_prompt_projections_text[layer](self.layernorm_text[layer](u))
            out_img.append(img)
            out_txt.append(txt)
        return out_img, out_txt

    def per_type(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type prompts per layer, index 0..2 = missing type: layer 0 = [R^0 ; C], others R^l."""
        if self.layout.depth == 0:
            return [], []
        img, txt = self._layer_prompts()
        if self.layout.common:
            common = torch.stack([self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text])
            img[0] = torch.cat([img[0], self.common_prompt_projection_image(common)], dim=1)
            txt[0] = torch.cat([txt[0], self.common_prompt_projection_text(common)], dim=1)
        return img, txt

    def forward(self, missing_type: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prompts per layer gathered by sample: lists of [B, k_l, Dv] and [B, k_l, Dt]."""
        img, txt = self.per_type()
        return [p[missing_type] for p in img], [p[missing_type] for p in txt]


class DynamicPrompts(nn.Module):
    """Dyn = MHA(query = the sample's query set, key = value = the block-0 input) -> [B, n, width] (§6.1, §6.4).

    ``attn_prompt`` is a single-head ``nn.MultiheadAttention``; the three [n, 1, width] N(0, 0.02) query sets are
    persistent buffers (saved, frozen; D-34) or, with ``trainable``, parameters.
    """

    def __init__(self, n: int, width: int, trainable: bool = False) -> None:
        super().__init__()
        self.attn_prompt = nn.MultiheadAttention(width, 1, batch_first=True)
        for name in DYNAMIC_NAMES:
            value = nn.init.normal_(torch.empty(n, 1, width), std=0.02)
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value, persistent=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, missing_type: torch.Tensor) -> torch.Tensor:
        """`mask`: bool [B, N] (True = real token) for a stream whose attention masks padding, else None."""
        queries = torch.stack([getattr(self, name)[:, 0] for name in DYNAMIC_NAMES])  # [3, n, D]
        q = queries[missing_type].to(x.dtype)
        padding = None if mask is None else ~mask
        return self.attn_prompt(q, x, x, key_padding_mask=padding, need_weights=False)[0]


PerTypePrompts = dict[str, list[torch.Tensor]]
"""Modality -> per layer [3, k_l, width] (layer 0: ``[R^0 ; C]``, k_0 = n + n_common; later layers R^l)."""


@register_method("dcp")
class DeepCorrelatedPrompts(PromptMethod):
    """DCP (§6): correlated, dynamic and modal-common prompts on every stream."""

    title = "DCP"
    paper_backbone = "clip"
    preset = "dcp"
    config_class = DCPConfig
    drops_missing_streams = True

    def __init__(self, config: DCPConfig, info: BackboneInfo) -> None:
        super().__init__(config, info)
        self.layout = DCPLayout.from_config(config)
        self.prompt_learner = DCPPromptLearner(self.layout, info.width_of(IMAGE), info.width_of(TEXT),
                                               config.dcp_independent_init)
        if self.layout.dynamic:
            self.dynamic = nn.ModuleDict({s.name: DynamicPrompts(self.layout.n, s.width, config.dcp_dynamic_trainable)
                                          for s in info.streams})

    @property
    def skip_missing(self) -> bool:
        return bool(self.config.dcp_skip_missing)

    def prepare(self, missing_type: torch.Tensor) -> PerTypePrompts:
        """The per-type prompts of every layer, once per forward for all streams (§6.3)."""
        img, txt = self.prompt_learner.per_type()
        return {IMAGE: img, TEXT: txt}

    def _gathered(self, stream: StreamInfo, prompts: PerTypePrompts, layer: int, part: slice,
                  missing_type: torch.Tensor) -> torch.Tensor:
        """Tokens `part` of `layer` for the stream's modalities (text before image), gathered by missing type."""
        return torch.cat([prompts[m][layer][:, part] for m in stream.modalities], dim=1)[missing_type]

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        lay = self.layout
        if index >= lay.depth:
            return x, mask, layout
        layer = self._gathered(stream, ctx.prepared, index, slice(0, lay.n), ctx.missing_type).to(x.dtype)
        if index > 0:  # replace the evolved layer prompts, keep everything else (§6.4)
            span = layout.span("dcp.layer")
            return torch.cat([x[:, :span.start], layer, x[:, span.stop:]], dim=1), mask, layout
        new = [("dcp.layer", layer)]
        if lay.common:
            common = self._gathered(stream, ctx.prepared, 0, slice(lay.n, None), ctx.missing_type)
            new.append(("dcp.common", common))
        if lay.dynamic:
            key_mask = mask if stream.masks_padding else None
            new.append(("dcp.dynamic", self.dynamic[stream.name](x, key_mask, ctx.missing_type)))
        x, mask = splice_tokens(x, mask, 0, [t for _, t in new])
        return x, mask, layout.prepend([(name, t.shape[1]) for name, t in new])

    def reads_every_position_until(self, stream: StreamInfo) -> int:
        """The dynamic prompts attend over every position of the block-0 input (on CLIP, padding too)."""
        return 0 if self.layout.dynamic else -1

    @classmethod
    def added_tokens(cls, config: DCPConfig, info: BackboneInfo) -> dict[str, int]:
        """Layer and common prompts per modality of the stream, plus one set of dynamic prompts."""
        lay = DCPLayout.from_config(config)
        return {s.name: (lay.n + lay.n_common) * len(s.modalities) + lay.n_dynamic for s in info.streams}

    @classmethod
    def complete_reference_state(cls, state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                                 config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The reference draws the dynamic queries at construction and never saves them (D-34), so its checkpoints
        alone do not define the model they were trained as: evaluating one with other queries would report another
        model's numbers. They come from ``dcp_dynamic_queries``, a file holding exactly the model's
        ``*.prompts_dynamic_*`` keys (reference or mdpl names); without it this is a UserInputError."""
        wanted = sorted(k for k in own if ".prompts_dynamic_" in k)
        if not wanted or all(k in state for k in wanted):
            return state
        path = config.get("dcp_dynamic_queries") or ""
        if not path:
            raise UserInputError("this DCP checkpoint lacks its dynamic prompt queries (the reference code draws them "
                                 "at construction and never saves them), so it cannot be evaluated exactly: pass "
                                 "dcp_dynamic_queries=<file holding the queries of that run>")
        if not os.path.isfile(path):
            raise UserInputError(f"dcp_dynamic_queries={path!r} does not exist")
        try:
            queries = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file that is not a tensor file
            raise UserInputError(f"dcp_dynamic_queries={path!r} cannot be read as a tensor file ({err})") from None
        queries = cls.upgrade_state_dict(queries) if isinstance(queries, Mapping) else queries
        if not isinstance(queries, Mapping) or sorted(queries) != wanted:
            found = sorted(queries) if isinstance(queries, Mapping) else type(queries).__name__
            raise UserInputError(f"dcp_dynamic_queries={path!r} must hold exactly the keys {', '.join(wanted)}; "
                                 f"found {found}")
        return {**state, **queries}

    @classmethod
    def upgrade_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference DCP checkpoints and earlier mdpl ones: the reference layout ``model.*`` (learner under
        ``model.prompt_learner``, dynamic prompts on block 0 of each tower) and, on ViLT, ``prompt.attn_prompt``."""
        return {_upgraded_key(k): v for k, v in state.items()}


_TOWER_BLOCK0 = re.compile(r"^model\.(image|text)_encoder\.transformer\.resblocks\.0\.(attn_prompt\.|prompts_dynamic_)")


def _upgraded_key(key: str) -> str:
    """One key of the reference DCP layout (or of an earlier mdpl DCP-on-ViLT model) in today's names."""
    tower = _TOWER_BLOCK0.match(key)
    if tower:
        return f"prompt.dynamic.{tower.group(1)}." + key[len(tower.group(0)) - len(tower.group(2)):]
    if key.startswith("model.prompt_learner."):
        return "prompt." + key[len("model."):]
    if key.startswith("model."):
        return "backbone." + key[len("model."):]
    if key.startswith(("prompt.attn_prompt.", "prompt.prompts_dynamic_")):
        return "prompt.dynamic.joint." + key[len("prompt."):]
    return key
