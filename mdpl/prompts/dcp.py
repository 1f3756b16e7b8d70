"""DCP — Deep Correlated Prompting (Hu et al., NeurIPS 2024; docs/methods.md §6), on every backbone.

Pieces:
* :class:`DCPConfig` — the keys; :class:`DCPLayout` — one description of the prompt tokens of a stream (D-40):
  ``n = prompt_length // 3`` layer prompts, then ``n`` common prompts, then ``n`` dynamic prompts (either may be
  switched off).
* :class:`DCPPromptLearner` — the per-type initial prompts, the correlated per-layer projection chain and the
  common-prompt projections (§6.1, §6.3), computed once per forward (``prepare``) for every stream and gathered
  by missing type (D-36).
* :class:`DynamicPrompts` — per stream a single-head ``attn_prompt`` and three persistent query sets
  ``prompts_dynamic_{complete,image,text}`` (D-34): the sample's query set attends over the block-0 input
  (or, with ``dcp_dynamic_mode`` max / min / avg, window pooling of that input and one Linear).
* :class:`DeepCorrelatedPrompts` — the method. Before block 0 of a stream it inserts
  ``[R^0 ; C ; Dyn ; data]``; before blocks 1..depth-1 it replaces the ``R`` tokens (§6.4), and, with the
  ablation switches ``dcp_common_depth`` / ``dcp_dynamic_depth`` above 1, the ``C`` / ``Dyn`` tokens of the
  blocks below those depths (§6.7). On CLIP (the paper's
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
PROJECTIONS = ("mlp", "fc")
"""``dcp_projection`` / ``dcp_common_projection``: bottleneck MLP (reference) or a single Linear (Tables 1, 3 "Fc")."""
CORRELATED_INPUTS = ("bi", "uni")
"""``dcp_correlated_inputs``: the chain reads both sides' previous prompts (reference) or its own side's only."""
DYNAMIC_MODES = ("attention", "max", "min", "avg")
"""``dcp_dynamic_mode``: the reference's attention, or Table 2's "Max / Min / Avg & Projection"."""


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
    # Ablation switches of the paper's Tables 1-3 ("our ablation switches", docs/methods.md §6.7); defaults = reference
    dcp_projection: str = "mlp"
    """Table 1 "MLP (r=16)" / "Fc": each correlated-chain F_l is LN -> bottleneck MLP ('mlp') or LN -> one Linear
    ('fc'; our reading: the LayerNorm stays, only the MLP becomes a Linear)."""
    dcp_correlated_inputs: str = "bi"
    """Table 1 "bi-modal" / "uni-modal": F_l reads [R_v^(l-1) ; R_t^(l-1)] ('bi') or its own side's R^(l-1) only
    ('uni'; LN and input width = that side's width, MLP hidden width = that width // 16, our reading)."""
    dcp_dynamic_depth: int = 1
    """Table 2 "Depth": blocks 0..d-1 get fresh dynamic prompts; before block l >= 1 block l's own generator, on the
    block input's data tokens, replaces the dynamic tokens (our reading)."""
    dcp_dynamic_mode: str = "attention"
    """Table 2 "Attention" / "Max|Min|Avg & Projection": the queries' attention, or max / min / mean over n
    consecutive windows of the input tokens followed by one Linear(width, width) (our reading; no queries)."""
    dcp_common_depth: int = 1
    """Table 3 "Depth": blocks 0..d-1 get fresh modal-common prompts; block l >= 1 has its own per-type prompts and
    projections, built as block 0's, replacing the common tokens (our reading)."""
    dcp_common_projection: str = "mlp"
    """Table 3 "MLP" / "Fc": the modal-common projections G_t, G_v are bottleneck MLPs or one Linear each."""
    dcp_common_reduction: int = 16
    """Table 3 "MLP (r=4|8|16)": G's MLP hidden width = text width // r ('mlp' only)."""
    # Channel widths, for the parameter budgets of the paper's Table 5 ("reducing channel width"; our reading, §6.7)
    dcp_reduction: int = 16
    """The correlated chain's MLP hidden width = its input width // r ('mlp' only; 16 = the reference: 1280 // 16 =
    80 on CLIP)."""
    dcp_dynamic_width: int = 0
    """0 = the reference's one-head attention at the stream's width; w > 0 = one head whose queries, keys and values
    are projected to w channels and whose output projection returns to the stream's width ('attention' only)."""

    TINY = {"prompt_length": 6, "prompt_depth": 2}   # a multiple of 3: 2 layer + 2 common + 2 dynamic prompts

    def check(self, info: BackboneInfo) -> None:
        depth = self.prompt_depth
        if not (isinstance(depth, int) and 0 <= depth <= info.num_layers):
            raise UserInputError(f"prompt_depth={depth!r} must be an integer in 0..{info.num_layers} ({info.what} has "
                                 f"{info.num_layers} layers)")
        for key, choices in (("dcp_projection", PROJECTIONS), ("dcp_correlated_inputs", CORRELATED_INPUTS),
                             ("dcp_dynamic_mode", DYNAMIC_MODES), ("dcp_common_projection", PROJECTIONS)):
            value = getattr(self, key)
            if value not in choices:
                raise UserInputError(f"{key}={value!r} must be one of {', '.join(choices)}")
        for key in ("dcp_dynamic_depth", "dcp_common_depth"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= info.num_layers):
                raise UserInputError(f"{key}={value!r} must be an integer in 1..{info.num_layers} ({info.what} has "
                                     f"{info.num_layers} layers)")
        check_positive("dcp_common_reduction", self.dcp_common_reduction)
        check_positive("dcp_reduction", self.dcp_reduction)
        width = self.dcp_dynamic_width
        if not (isinstance(width, int) and not isinstance(width, bool) and width >= 0):
            raise UserInputError(f"dcp_dynamic_width must be 0 (the stream's width, as the reference) or a positive "
                                 f"integer, got {width!r}")
        DCPLayout.from_config(self)
        defaults = DCPConfig()
        groups = ((self.dcp_correlated and depth > 0, "dcp_correlated=False (or prompt_depth=0) removes the correlated "
                   "projection chain", ("dcp_projection", "dcp_correlated_inputs", "dcp_reduction")),
                  (self.dcp_dynamic, "dcp_dynamic=False removes the dynamic prompts",
                   ("dcp_dynamic_depth", "dcp_dynamic_mode", "dcp_dynamic_width")),
                  (self.dcp_common, "dcp_common=False removes the modal-common prompts",
                   ("dcp_common_depth", "dcp_common_projection", "dcp_common_reduction")))
        for on, why, keys in groups:
            for key in keys:
                if not on and getattr(self, key) != getattr(defaults, key):
                    raise UserInputError(f"{key}={getattr(self, key)!r} has no effect: {why}; drop {key} or switch "
                                         "that component on")
        if self.dcp_common_projection == "fc" and self.dcp_common_reduction != defaults.dcp_common_reduction:
            raise UserInputError(f"dcp_common_reduction={self.dcp_common_reduction!r} has no effect with "
                                 "dcp_common_projection='fc' (a single Linear has no hidden width); drop it or use 'mlp'")
        if self.dcp_projection == "fc" and self.dcp_reduction != defaults.dcp_reduction:
            raise UserInputError(f"dcp_reduction={self.dcp_reduction!r} has no effect with dcp_projection='fc' (a "
                                 "single Linear has no hidden width); drop it or use 'mlp'")
        if self.dcp_dynamic_width and self.dcp_dynamic_mode != "attention":
            raise UserInputError(f"dcp_dynamic_width={self.dcp_dynamic_width!r} has no effect with dcp_dynamic_mode="
                                 f"{self.dcp_dynamic_mode!r} (only the attention form has a width); drop it")
        if self.dcp_dynamic_trainable and self.dcp_dynamic_mode != "attention":
            raise UserInputError(f"dcp_dynamic_trainable=True has no effect with dcp_dynamic_mode="
                                 f"{self.dcp_dynamic_mode!r} (only the attention form has queries); drop it")


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
    dynamic_depth: int = 1          # blocks 0..dynamic_depth-1 receive fresh dynamic prompts
    common_depth: int = 1           # blocks 0..common_depth-1 receive fresh modal-common prompts

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

    @property
    def blocks(self) -> int:
        """Blocks before which the method inserts or replaces tokens (0..blocks-1; = depth by default)."""
        if self.depth == 0:
            return 0
        return max(self.depth, self.common_depth if self.common else 0, self.dynamic_depth if self.dynamic else 0)

    @classmethod
    def from_config(cls, config: "DCPConfig") -> "DCPLayout":
        return cls(config.prompt_length, config.prompt_depth, config.dcp_correlated, config.dcp_dynamic,
                   config.dcp_common, config.dcp_dynamic_depth, config.dcp_common_depth)


def _normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.normal_(torch.empty(*shape), std=0.02))


def _bottleneck(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU (exact) -> Linear; keys ``.0`` / ``.2`` as in the reference (§6.1)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _projection(kind: str, d_in: int, d_out: int, reduction: int) -> nn.Module:
    """``mlp``: the reference bottleneck (hidden ``d_in // reduction``); ``fc``: one ``nn.Linear(d_in, d_out)``."""
    return _bottleneck(d_in, d_in // reduction, d_out) if kind == "mlp" else nn.Linear(d_in, d_out)


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
    Ablation switches (§6.7): ``projection='fc'`` makes each F_l one Linear (the LayerNorm stays); ``unimodal``
    feeds F_l only its own side's previous prompts (LN and input width = that side's width); ``common_depth > 1``
    adds, for blocks 1..common_depth-1, ``deep_common_prompts`` [common_depth-1, 3, n, Dt] and projections
    ``deep_common_projections_{image,text}`` (entry k serves block k+1), built as the block-0 ones;
    ``common_projection`` / ``common_reduction`` choose the form of every G.
    """

    def __init__(self, layout: DCPLayout, vision_width: int, text_width: int, independent_init: bool = False,
                 reduction: int = 16, projection: str = "mlp", unimodal: bool = False,
                 common_projection: str = "mlp", common_reduction: int = 16) -> None:
        super().__init__()
        self.layout = layout
        self.unimodal = unimodal
        n, depth, dv, dt = layout.n, layout.depth, vision_width, text_width
        joint = dv + dt
        in_v, in_t = (dv, dt) if unimodal else (joint, joint)
        if layout.correlated and depth > 0:
            self.visual_prompt_complete, self.visual_prompt_missing = _normal(n, dv), _normal(n, dv)
            self.text_prompt_complete, self.text_prompt_missing = _normal(n, dt), _normal(n, dt)
        if layout.common:
            self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text = (
                _normal(n, dt), _normal(n, dt), _normal(n, dt))
        if layout.correlated and depth > 0:
            self.compound_prompt_projections_text = _replicate(
                _projection(projection, in_t, dt, reduction), depth, independent_init)
            self.layernorm_text = nn.ModuleList([nn.LayerNorm(in_t) for _ in range(depth)])
            self.compound_prompt_projections_image = _replicate(
                _projection(projection, in_v, dv, reduction), depth, independent_init)
            self.layernorm_image = nn.ModuleList([nn.LayerNorm(in_v) for _ in range(depth)])
        elif depth > 0:
            self.visual_prompts = _normal(depth, 3, n, dv)
            self.text_prompts = _normal(depth, 3, n, dt)
        if layout.common:
            self.common_prompt_projection_image = _projection(common_projection, dt, dv, common_reduction)
            self.common_prompt_projection_text = _projection(common_projection, dt, dt, common_reduction)
            if layout.common_depth > 1:
                deep = layout.common_depth - 1
                self.deep_common_prompts = _normal(deep, 3, n, dt)
                self.deep_common_projections_image = nn.ModuleList(
                    [_projection(common_projection, dt, dv, common_reduction) for _ in range(deep)])
                self.deep_common_projections_text = nn.ModuleList(
                    [_projection(common_projection, dt, dt, common_reduction) for _ in range(deep)])

    def _layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type layer prompts R_v^l [3, n, Dv], R_t^l [3, n, Dt] for l < depth (§6.3)."""
        depth = self.layout.depth
        if not self.layout.correlated:
            return list(self.visual_prompts.unbind(0)), list(self.text_prompts.unbind(0))
        img = torch.stack([self.visual_prompt_complete, self.visual_prompt_complete, self.visual_prompt_missing])
        txt = torch.stack([self.text_prompt_complete, self.text_prompt_missing, self.text_prompt_complete])
        out_img, out_txt = [], []
        for layer in range(depth):
            if self.unimodal:
                u_img, u_txt = img, txt
            else:
                u_img = u_txt = torch.cat([img, txt], dim=-1)
            img = self.compound_prompt_projections_image[layer](self.layernorm_image[layer](u_img))
            txt = self.compound_prompt_projections_text[layer](self.layernorm_text[layer](u_txt))
            out_img.append(img)
            out_txt.append(txt)
        return out_img, out_txt

    def _common_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type modal-common prompts C_v^l [3, n, Dv], C_t^l [3, n, Dt] for l < common_depth (§6.3, §6.7)."""
        if not self.layout.common or self.layout.depth == 0:
            return [], []
        common = torch.stack([self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text])
        img, txt = [self.common_prompt_projection_image(common)], [self.common_prompt_projection_text(common)]
        for k in range(self.layout.common_depth - 1):
            img.append(self.deep_common_projections_image[k](self.deep_common_prompts[k]))
            txt.append(self.deep_common_projections_text[k](self.deep_common_prompts[k]))
        return img, txt

    def parts(self) -> dict[str, dict[str, list[torch.Tensor]]]:
        """``{"layer": {modality: [R^l]}, "common": {modality: [C^l]}}``, per-type [3, n, width] tensors."""
        if self.layout.depth == 0:
            return {"layer": {IMAGE: [], TEXT: []}, "common": {IMAGE: [], TEXT: []}}
        img, txt = self._layer_prompts()
        c_img, c_txt = self._common_prompts()
        return {"layer": {IMAGE: img, TEXT: txt}, "common": {IMAGE: c_img, TEXT: c_txt}}

    def per_type(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type prompts per block, index 0..2 = missing type: [R^l ; C^l] for the parts block l receives
        (by default block 0 = [R^0 ; C], blocks 1..depth-1 = R^l)."""
        parts = self.parts()
        out = []
        for modality in (IMAGE, TEXT):
            layer, common = parts["layer"][modality], parts["common"][modality]
            blocks = max(len(layer), len(common))
            out.append([torch.cat(([layer[l]] if l < len(layer) else []) + ([common[l]] if l < len(common) else []),
                                  dim=1) for l in range(blocks)])
        return out[0], out[1]

    def forward(self, missing_type: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prompts per layer gathered by sample: lists of [B, k_l, Dv] and [B, k_l, Dt]."""
        img, txt = self.per_type()
        return [p[missing_type] for p in img], [p[missing_type] for p in txt]


def window_pool(x: torch.Tensor, mask: torch.Tensor | None, n: int, mode: str) -> torch.Tensor:
    """[B, N, D] -> [B, n, D]: ``mode`` (max / min / avg) over each of n consecutive windows of the tokens, window j
    = positions floor(j*N/n) .. ceil((j+1)*N/n)-1 (PyTorch's adaptive pooling windows). `mask` (bool [B, N], True =
    real token, or None): padding is left out of every window; a window without a real token gives 0."""
    length = x.shape[1]
    out = []
    for j in range(n):
        w = x[:, (j * length) // n: -((-(j + 1) * length) // n)]
        keep = None if mask is None else mask[:, (j * length) // n: -((-(j + 1) * length) // n), None]
        if mode == "avg":
            out.append(w.mean(1) if keep is None else (w * keep).sum(1) / keep.sum(1).clamp(min=1))
            continue
        sign = 1.0 if mode == "max" else -1.0
        signed = w * sign
        if keep is None:
            out.append(signed.amax(1) * sign)
        else:
            top = signed.masked_fill(~keep, float("-inf")).amax(1)
            out.append(torch.where(keep.any(1), top, torch.zeros_like(top)) * sign)
    return torch.stack(out, dim=1)


class NarrowAttention(nn.Module):
    """One attention head of ``inner`` channels between streams of ``width`` (``dcp_dynamic_width``, §6.7, our
    reading of Table 5's "reducing channel width"): ``q_proj`` / ``k_proj`` / ``v_proj`` Linear(width -> inner),
    scale 1/sqrt(inner), ``out_proj`` Linear(inner -> width). Initialised as ``nn.MultiheadAttention``: Xavier-uniform
    input projections with zero bias, the output projection's default init with zero bias. 4 * width * inner
    weights instead of the full attention's 4 * width^2."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, width)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, data: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """query [B, n, width], data [B, N, width] (keys = values), key_padding_mask bool [B, N] (True = padding)."""
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = nn.functional.scaled_dot_product_attention(
            self.q_proj(query)[:, None], self.k_proj(data)[:, None], self.v_proj(data)[:, None], attn_mask=keep)
        return self.out_proj(out[:, 0])


class DynamicPrompts(nn.Module):
    """Dyn = MHA(query = the sample's query set, key = value = the block input) -> [B, n, width] (§6.1, §6.4).

    ``attn_prompt`` is a single-head ``nn.MultiheadAttention`` (with ``inner`` > 0 a :class:`NarrowAttention` of
    ``inner`` channels); the three [n, 1, width] N(0, 0.02) query sets are persistent buffers (saved, frozen; D-34)
    or, with ``trainable``, parameters. ``mode`` max / min / avg (our reading of Table 2's "& Projection" rows,
    §6.7): Dyn = ``proj``(window_pool(input, n windows)), ``proj`` one ``nn.Linear(width, width)``; no queries, no
    attention.
    """

    def __init__(self, n: int, width: int, trainable: bool = False, mode: str = "attention", inner: int = 0) -> None:
        super().__init__()
        self.n, self.mode = n, mode
        if mode != "attention":
            self.proj = nn.Linear(width, width)
            return
        self.attn_prompt = (NarrowAttention(width, inner) if inner else
                            nn.MultiheadAttention(width, 1, batch_first=True))
        for name in DYNAMIC_NAMES:
            value = nn.init.normal_(torch.empty(n, 1, width), std=0.02)
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value, persistent=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, missing_type: torch.Tensor) -> torch.Tensor:
        """`mask`: bool [B, N] (True = real token) for a stream whose attention masks padding, else None."""
        if self.mode != "attention":
            return self.proj(window_pool(x, mask, self.n, self.mode))
        queries = torch.stack([getattr(self, name)[:, 0] for name in DYNAMIC_NAMES])  # [3, n, D]
        q = queries[missing_type].to(x.dtype)
        if x.shape[0] == 0:   # every row of the batch misses this stream's modality (its rows are skipped)
            return q
        padding = None if mask is None else ~mask
        if isinstance(self.attn_prompt, NarrowAttention):
            return self.attn_prompt(q, x, padding)
        return self.attn_prompt(q, x, x, key_padding_mask=padding, need_weights=False)[0]


PerTypePrompts = dict[str, dict[str, list[torch.Tensor]]]
"""``{"layer": {modality: [R^l] per block}, "common": {modality: [C^l] per block}}``, each [3, n, width]."""


@register_method("dcp")
class DeepCorrelatedPrompts(PromptMethod):
    """DCP (§6): correlated, dynamic and modal-common prompts on every stream."""

    title = "DCP"
    paper_backbone = "clip"
    preset = "dcp"
    paper_tables = "mdpl.experiments.papers.dcp:tables"
    config_class = DCPConfig
    drops_missing_streams = True

    def __init__(self, config: DCPConfig, info: BackboneInfo) -> None:
        super().__init__(config, info)
        self.layout = DCPLayout.from_config(config)
        text_width, r = info.width_of(TEXT), config.dcp_common_reduction
        if self.layout.common and config.dcp_common_projection == "mlp" and text_width // r < 1:
            raise UserInputError(f"dcp_common_reduction={r} leaves the modal-common MLP no hidden unit (text width "
                                 f"{text_width} // {r} = 0); choose dcp_common_reduction <= {text_width}")
        chain_in = (min(info.width_of(IMAGE), text_width) if config.dcp_correlated_inputs == "uni"
                    else info.width_of(IMAGE) + text_width)
        if self.layout.correlated and config.dcp_projection == "mlp" and chain_in // config.dcp_reduction < 1:
            raise UserInputError(f"dcp_reduction={config.dcp_reduction} leaves the correlated MLP no hidden unit "
                                 f"(input width {chain_in} // {config.dcp_reduction} = 0); choose dcp_reduction <= "
                                 f"{chain_in}")
        self.prompt_learner = DCPPromptLearner(self.layout, info.width_of(IMAGE), text_width,
                                               config.dcp_independent_init, reduction=config.dcp_reduction,
                                               projection=config.dcp_projection,
                                               unimodal=config.dcp_correlated_inputs == "uni",
                                               common_projection=config.dcp_common_projection, common_reduction=r)
        if self.layout.dynamic:
            def generator() -> nn.ModuleDict:
                return nn.ModuleDict({s.name: DynamicPrompts(self.layout.n, s.width, config.dcp_dynamic_trainable,
                                                             config.dcp_dynamic_mode, config.dcp_dynamic_width)
                                      for s in info.streams})
            self.dynamic = generator()
            if self.layout.dynamic_depth > 1:   # blocks 1..d-1: own generators, keys dynamic_deep.<k>.<stream>
                self.dynamic_deep = nn.ModuleList([generator() for _ in range(self.layout.dynamic_depth - 1)])

    @property
    def skip_missing(self) -> bool:
        return bool(self.config.dcp_skip_missing)

    def prepare(self, missing_type: torch.Tensor) -> PerTypePrompts:
        """The per-type layer and common prompts of every block, once per forward for all streams (§6.3)."""
        return self.prompt_learner.parts()

    def _gathered(self, stream: StreamInfo, prompts: dict[str, list[torch.Tensor]], layer: int,
                  missing_type: torch.Tensor) -> torch.Tensor:
        """Block `layer`'s prompts of the stream's modalities (text before image), gathered by missing type."""
        return torch.cat([prompts[m][layer] for m in stream.modalities], dim=1)[missing_type]

    def _dynamic(self, stream: StreamInfo, index: int, data: torch.Tensor, mask: torch.Tensor,
                 ctx: PromptContext) -> torch.Tensor:
        """Dynamic prompts of block `index` from the block input's data tokens `data` (§6.4, §6.7)."""
        generator = self.dynamic if index == 0 else self.dynamic_deep[index - 1]
        return generator[stream.name](data, mask if stream.masks_padding else None, ctx.missing_type)

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        lay, prepared = self.layout, ctx.prepared
        if index >= lay.blocks:
            return x, mask, layout
        if index > 0:  # replace the evolved prompts of the parts this block receives, keep everything else (§6.4)
            new = []
            if index < lay.depth:
                new.append(("dcp.layer", self._gathered(stream, prepared["layer"], index, ctx.missing_type)))
            if lay.common and index < lay.common_depth:
                new.append(("dcp.common", self._gathered(stream, prepared["common"], index, ctx.missing_type)))
            if lay.dynamic and index < lay.dynamic_depth:
                start = layout.span("dcp.dynamic").stop
                new.append(("dcp.dynamic", self._dynamic(stream, index, x[:, start:], mask[:, start:], ctx)))
            for name, tokens in new:
                span = layout.span(name)
                x = torch.cat([x[:, :span.start], tokens.to(x.dtype), x[:, span.stop:]], dim=1)
            return x, mask, layout
        layer = self._gathered(stream, prepared["layer"], 0, ctx.missing_type).to(x.dtype)
        new = [("dcp.layer", layer)]
        if lay.common:
            new.append(("dcp.common", self._gathered(stream, prepared["common"], 0, ctx.missing_type)))
        if lay.dynamic:
            new.append(("dcp.dynamic", self._dynamic(stream, 0, x, mask, ctx)))
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
                                 config: DCPConfig) -> dict[str, torch.Tensor]:
        """The reference draws the dynamic queries at construction and never saves them (D-34), so its checkpoints
        alone do not define the model they were trained as: evaluating one with other queries would report another
        model's numbers. They come from ``dcp_dynamic_queries``, a file holding exactly the model's
        ``*.prompts_dynamic_*`` keys (reference or mdpl names); without it this is a UserInputError."""
        wanted = sorted(k for k in own if ".prompts_dynamic_" in k)
        if not wanted or all(k in state for k in wanted):
            return state
        path = config.dcp_dynamic_queries or ""
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
