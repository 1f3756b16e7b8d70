"""AOEPT: cross-modal adaptive prompts over k-means prototypes (Lang et al., ICML 2026), docs/methods.md §18.

Memory: per prompted block i < d, the k-means prototypes M^t_i [K, Dt], M^v_i [K, Dv] of the block-i inputs of the
training split (the preparation stage; text pooled over its real tokens, the image over all its tokens, rows whose
modality is missing left out). Batch-independent proxy prompts, with A_H(q, m) = softmax(q_h m_hᵀ / √w) m_h, the
parameter-free attention over H heads of width w (keys = values = m, no projections):

    T_i  = LN_t(A_H(Q^t_i, M^t_i) + Q^t_i)              [L, Dt]     V_i  = LN_v(A_H(Q^v_i, M^v_i) + Q^v_i)   [L, Dv]
    q_t  = proj^t_i(S_i), q_v = proj^v_i(S_i)           S_i [Ls, Dt/r] shared, proj = Linear, GELU, Linear
    ST_i = LN_st(A_H(q_t, M^t_i) + q_t)                 [Ls, Dt]    SV_i = LN_sv(A_H(q_v, M^v_i) + q_v)      [Ls, Dv]

The towers run in lock-step, text block i before image block i (AOEPT-D7). Before text block i < d the P = Ls + L
slots in front of the text are replaced by [ST_i ⊙ σ(g^st_i(f_v)) ; T_i ⊙ σ(g^t_i(f_v))], f_v = the image tower's
mean token after block i - 1 (its embeddings for i = 0), gates forced to 1 where the image is missing; before image
block i < d likewise with f_t = the text tower's mean after block i (gates 1 where the text is missing). From block d
on the slots pass through as ordinary tokens. g = Linear(in, in/r), ReLU, Linear(in/r, out).

Consistency loss (InfoNCE, the paper's prompt-feature alignment): for each i < d and tower, p = normalise(mean of the
gated non-shared prompt), f = normalise(stop-grad(tower mean after block i)), logits = p fᵀ · exp(τ) over the rows
whose modality is present (at least two), cross-entropy against the diagonal; the mean over terms, weighted by
``aoept_consistency_loss_weight`` (α = 0.05). τ (``logit_scale``) starts at 4.6052 and trains.

On ViLT (the reference's ViLT variant, §18.6) one joint stream carries both modalities: T_i, V_i as above, one shared
proxy S_i = LN_s(A_H(Q^s_i, [M^t_i ; M^v_i]) + Q^s_i) [Ls, D] over the joint memory, one gate MLP per role for all
blocks (AOEPT-D12). Before block i < d the P slots become [S_i ⊙ σ(g_s(f)) ; w_t p_t + w_v p_v] with p_t = T_i ⊙
σ(g_t(f_v)) (1 where the image is missing), p_v = V_i ⊙ σ(g_v(f_t)) (1 where the text is missing), f = (f_t + f_v) / 2,
f_t / f_v the text mean (real tokens) and image mean (every image token, AOEPT-D8) after block i - 1, and (w_t, w_v) =
(1, 0) text missing, (0, 1) image missing, (½, ½) complete. The consistency loss pairs p_t with f_t and p_v with f_v
after block i.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (JOINT, MISSING_IMAGE, MISSING_TEXT, BackboneInfo, MethodConfig, PromptContext,
                               PromptMethod, StreamInfo, check_positive)
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout
from mdpl.prompts.preparation import FeatureRequest, KMeansRequest, PreparationNeed, PreparedArtifact
from mdpl.prompts.registry import register_method

LOGIT_SCALE_INIT = 4.6052
"""Initial τ of the consistency loss (exp τ ≈ 100), the reference's."""
REFERENCE_EOS_ID = 2
"""The ``eos_token_id`` of OpenAI's Hugging Face CLIP configs, where the reference reads the text feature (AOEPT-D1)."""
SHARED, OWN = "aoept_shared", "aoept"
"""Layout segments of the shared and the modality's own prompt slots."""
GATED_BY = {TEXT: IMAGE, IMAGE: TEXT}
FORCED_OPEN = {TEXT: MISSING_IMAGE, IMAGE: MISSING_TEXT}
"""A tower's gates are 1 on rows where the other modality (their source) is missing."""
SWITCHES = {"aoept_text_pool": ("reference", "eot"), "aoept_feature_pool": ("reference", "masked"),
            "aoept_text_positions": ("resized", "pretrained"), "aoept_gate_init": ("reference", "closed"),
            "aoept_vilt_memory_layout": ("per_layer", "reference"),
            "aoept_vilt_collection_mask": ("segment", "reference")}
MIXING = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
"""ViLT: the weights (w_t, w_v) of the text and image prompt per missing type (complete, text missing, image missing)."""


@dataclass(frozen=True)
class AOEPTConfig(MethodConfig):
    """AOEPT's keys; defaults: the reference's CLIP configs for the 'both' setting (Food-101 / Hateful Memes), per
    dataset in ``DATASETS``."""

    aoept_length: int = 6                 # L, the modality's own prompt tokens per tower
    aoept_shared_length: int = 6          # Ls, the shared prompt tokens per tower
    aoept_depth: int = 4                  # d, prompted blocks 0..d-1 of both towers
    aoept_reduction: int = 16             # r, bottleneck of the gates and width of the shared query (Dt / r)
    aoept_heads: int = 8                  # H, heads of the parameter-free attention over the prototypes
    aoept_prototypes: int = 256           # K, k-means prototypes per block (AOEPT-D3)
    aoept_kmeans_iters: int = 300
    aoept_kmeans_restarts: int = 10
    aoept_kmeans_seed: int = 42
    aoept_consistency_loss_weight: float = 0.05   # α
    aoept_text_pool: str = "reference"    # AOEPT-D1: reference (first id 2, else the last position) | eot
    aoept_feature_pool: str = "reference"  # AOEPT-D8: reference (CLIP text, ViLT image: every position) | masked
    aoept_text_positions: str = "resized"  # AOEPT-D9: resized (bilinear 77 -> 77 + P) | pretrained
    aoept_gate_init: str = "reference"    # AOEPT-D6: reference (torch default, gates ≈ 0.5) | closed (σ(-5))
    aoept_vilt_memory_layout: str = "per_layer"   # AOEPT-D2 (ViLT): per_layer (block i's K prototypes) | reference
    aoept_vilt_collection_mask: str = "segment"   # AOEPT-D22 (ViLT preparation): segment | reference (text [CLS] kept)

    TINY = {"aoept_length": 2, "aoept_shared_length": 2, "aoept_depth": 1, "aoept_reduction": 4, "aoept_heads": 2,
            "aoept_prototypes": 3, "aoept_kmeans_iters": 20, "aoept_kmeans_restarts": 1}
    DATASETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "food101": {"aoept_length": 6, "aoept_shared_length": 6},
        "hatememes": {"aoept_length": 6, "aoept_shared_length": 6},
        "mmimdb": {"aoept_length": 5, "aoept_shared_length": 5},
    }

    def check(self, info: BackboneInfo) -> None:
        if {s.name for s in info.streams} not in ({IMAGE, TEXT}, {JOINT}):
            raise UserInputError(unsupported(info))
        for key in ("aoept_length", "aoept_shared_length", "aoept_depth", "aoept_reduction", "aoept_heads",
                    "aoept_prototypes", "aoept_kmeans_iters", "aoept_kmeans_restarts"):
            check_positive(key, getattr(self, key))
        if self.aoept_depth >= info.num_layers:
            raise UserInputError(f"aoept_depth={self.aoept_depth} must be below the {info.num_layers} blocks of "
                                 f"{info.what} (the last block computes only the read-out token)")
        for s in info.streams:
            if s.width % self.aoept_heads or s.width % self.aoept_reduction:
                raise UserInputError(f"aoept_heads={self.aoept_heads} and aoept_reduction={self.aoept_reduction} must "
                                     f"divide the {s.name} width {s.width}")
        weight = self.aoept_consistency_loss_weight
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise UserInputError(f"aoept_consistency_loss_weight must be a number >= 0, got {weight!r}")
        for key, values in SWITCHES.items():
            if getattr(self, key) not in values:
                raise UserInputError(f"{key}={getattr(self, key)!r} must be one of {', '.join(values)}")


def unsupported(info: BackboneInfo) -> str:
    return (f"AOEPT is mapped onto CLIP's two towers (a causal text tower that reads padding, whose outputs at padding "
            f"positions AOEPT averages, AOEPT-D8) and ViLT's joint stream only; {info.what} is not supported: use "
            f"backbone=clip or backbone=vilt")


def free_attention(q: torch.Tensor, memory: torch.Tensor, heads: int) -> torch.Tensor:
    """A_H(q, m): q [L, D] over m [K, D] split into `heads`, keys = values = m, no projections -> [L, D]."""
    (n, d), k = q.shape, memory.shape[0]
    qh = q.view(n, heads, d // heads).transpose(0, 1)
    mh = memory.view(k, heads, d // heads).transpose(0, 1)
    out = torch.softmax(qh @ mh.transpose(1, 2) / (d // heads) ** 0.5, dim=-1) @ mh
    return out.transpose(0, 1).reshape(n, d)


def gate_mlp(source: int, target: int, reduction: int, closed: bool) -> nn.Sequential:
    """Linear(source, source / r), ReLU, Linear(source / r, target) -> gate logits; `closed`: last layer zero with
    bias -5 (the zero-init the reference comments out, AOEPT-D6)."""
    net = nn.Sequential(nn.Linear(source, source // reduction), nn.ReLU(), nn.Linear(source // reduction, target))
    if closed:
        nn.init.zeros_(net[2].weight)
        nn.init.constant_(net[2].bias, -5.0)
    return net


@dataclass
class AOEPTState:
    """One forward: the proxy prompts, each tower's mean token after every block so far (index -1: the embeddings),
    and the gated own prompts (for the consistency loss)."""

    proxies: dict[str, torch.Tensor]                  # "text", "image", "shared_text", "shared_image": [d, n, D]
    missing_type: torch.Tensor
    means: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {TEXT: {}, IMAGE: {}})
    gated: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {TEXT: [], IMAGE: []})


@register_method("aoept")
class AOEPT(PromptMethod):
    """Gated proxy prompts in front of both CLIP towers (the towers in lock-step) or of ViLT's joint stream, blocks
    0..d-1."""

    config_class = AOEPTConfig
    title = "AOEPT"
    preset = "aoept"
    paper_run = (1e-2, 2026)
    paper_learning_rates: ClassVar[Mapping[str, float]] = {"hatememes": 5e-3, "mmimdb": 2e-2}
    paper_backbone = "clip"
    paper_tables = "mdpl.experiments.papers.aoept:tables"
    padding_is_inert = False            # the text features average the padding positions too (AOEPT-D8)
    extra_backbone_parts = ("text_projection",)     # AOEPT-D10 (CLIP; ViLT trains its pooler, a trainable part)
    aux_loss_names = ("aoept_consistency",)

    def __init__(self, config: AOEPTConfig, info: BackboneInfo) -> None:
        super().__init__(config, info)
        self.joint = info.single_stream
        c = config
        if self.joint:
            self.build_joint(c, info.streams[0])
        else:
            text = info.stream(TEXT)
            if text.masks_padding or not text.causal:            # CoCa's text tower hides its padding already
                raise UserInputError(unsupported(info))
            self.build_towers(c, info)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def build_towers(self, c: AOEPTConfig, info: BackboneInfo) -> None:
        """CLIP: queries, norms, the shared query with its projection per block and tower, four gates per block."""
        d, lt, ls = c.aoept_depth, c.aoept_length, c.aoept_shared_length
        widths = {s.name: s.width for s in info.streams}
        dt, dv, hidden = widths[TEXT], widths[IMAGE], widths[TEXT] // c.aoept_reduction
        self.text_query = nn.Parameter(torch.randn(d, lt, dt) * 0.02)
        self.image_query = nn.Parameter(torch.randn(d, lt, dv) * 0.02)
        self.text_norm, self.image_norm = nn.LayerNorm(dt), nn.LayerNorm(dv)
        self.shared_query = nn.Parameter(torch.randn(d, ls, hidden) * 0.02)
        self.shared_text_proj = nn.ModuleList(_projection(hidden, dt) for _ in range(d))
        self.shared_image_proj = nn.ModuleList(_projection(hidden, dv) for _ in range(d))
        self.shared_text_norm, self.shared_image_norm = nn.LayerNorm(dt), nn.LayerNorm(dv)
        closed = c.aoept_gate_init == "closed"
        self.gates = nn.ModuleDict({
            kind: nn.ModuleList(gate_mlp(widths[GATED_BY[s]], widths[s], c.aoept_reduction, closed) for _ in range(d))
            for kind, s in (("text", TEXT), ("image", IMAGE), ("shared_text", TEXT), ("shared_image", IMAGE))})
        self.register_buffer("text_memory", torch.zeros(d, c.aoept_prototypes, dt))
        self.register_buffer("image_memory", torch.zeros(d, c.aoept_prototypes, dv))
        self.register_buffer("memory_rows", torch.full((2,), c.aoept_prototypes, dtype=torch.long))

    def build_joint(self, c: AOEPTConfig, stream: StreamInfo) -> None:
        """ViLT: queries and norms per role (the shared query full width, no projection) and one gate per role for
        every block (AOEPT-D12). Memory rows: the K prototypes of block i (``per_layer``) or, under the reference's
        reading of the prototype file (AOEPT-D2), prototype i of every block input (one row per block)."""
        d, lt, ls, width = c.aoept_depth, c.aoept_length, c.aoept_shared_length, stream.width
        self.text_query = nn.Parameter(torch.randn(d, lt, width) * 0.02)
        self.image_query = nn.Parameter(torch.randn(d, lt, width) * 0.02)
        self.text_norm, self.image_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.shared_query = nn.Parameter(torch.randn(d, ls, width) * 0.02)
        self.shared_norm = nn.LayerNorm(width)
        closed = c.aoept_gate_init == "closed"
        self.gates = nn.ModuleDict({kind: nn.ModuleList([gate_mlp(width, width, c.aoept_reduction, closed)])
                                    for kind in ("text", "image", "shared")})
        rows = stream.num_layers if c.aoept_vilt_memory_layout == "reference" else c.aoept_prototypes
        self.register_buffer("text_memory", torch.zeros(d, rows, width))
        self.register_buffer("image_memory", torch.zeros(d, rows, width))
        self.register_buffer("memory_rows", torch.full((2,), rows, dtype=torch.long))

    @property
    def prompt_count(self) -> int:
        return self.config.aoept_length + self.config.aoept_shared_length

    @property
    def reference_memory(self) -> bool:
        """ViLT with the reference's reading of the prototype file (AOEPT-D2)."""
        return self.joint and self.config.aoept_vilt_memory_layout == "reference"

    # --- preparation (§18.2) ------------------------------------------------------------------------
    def preparation_needs(self) -> PreparationNeed:
        """Block inputs 0..d-1 (ViLT under AOEPT-D2 ``reference``: every block's) over the training split with its
        missing table, text pooled over its real tokens, the image over all its tokens (CLIP) or its real ones (ViLT,
        whose collection pass also hides the missing modality's keys), missing rows zero and left out; k-means per
        block (sklearn's parameters: k-means++, ``n_init`` 10, 300 iterations, tol 1e-4, seed 42)."""
        c = self.config
        layers = tuple(range(self.info.num_layers if self.reference_memory else c.aoept_depth))
        features = tuple(FeatureRequest(s, stream=JOINT if self.joint else s, layers=layers, segment=s,
                                        pooling="mean", zero_missing=True) for s in (TEXT, IMAGE))
        kmeans = tuple(KMeansRequest(s, k=c.aoept_prototypes, iters=c.aoept_kmeans_iters, seed=c.aoept_kmeans_seed,
                                     n_init=c.aoept_kmeans_restarts, tol=1e-4) for s in (TEXT, IMAGE))
        keeps = (TEXT,) if self.joint and c.aoept_vilt_collection_mask == "reference" else ()
        return PreparationNeed(features=features, kmeans=kmeans, missing="table", mask_missing=self.joint,
                               mask_keeps_first=keeps, version="aoept-1")

    @torch.no_grad()
    def load_prepared(self, artifact: PreparedArtifact) -> None:
        """The prototypes into the memory buffers: k' = min(K, rows) of them per block and tower, or (AOEPT-D2
        ``reference``) for block i prototype i of every block input."""
        depth = self.config.aoept_depth
        for i, (name, memory) in enumerate(((TEXT, self.text_memory), (IMAGE, self.image_memory))):
            centres = artifact.centres[name]
            centres = reference_memory(centres, depth) if self.reference_memory else centres[:depth]
            memory.zero_()
            memory[:, :centres.shape[1]].copy_(centres.to(memory))
            self.memory_rows[i] = centres.shape[1]

    def memory(self, stream: str) -> torch.Tensor:
        """The prototypes of `stream` in use [d, k', D]."""
        rows = int(self.memory_rows[0 if stream == TEXT else 1])
        return (self.text_memory if stream == TEXT else self.image_memory)[:, :rows]

    # --- proxies ------------------------------------------------------------------------------------
    def proxies(self) -> dict[str, torch.Tensor]:
        """T, V and ST, SV (CLIP) or S (ViLT) for every prompted block (§18.3), each [d, n, D]."""
        heads, out = self.config.aoept_heads, {}
        mt, mv = self.memory(TEXT), self.memory(IMAGE)
        for name, query, memory, norm in (("text", self.text_query, mt, self.text_norm),
                                          ("image", self.image_query, mv, self.image_norm)):
            out[name] = attend(query, memory, norm, heads)
        if self.joint:
            out["shared"] = attend(self.shared_query, torch.cat([mt, mv], dim=1), self.shared_norm, heads)
            return out
        for name, projs, memory, norm in (("shared_text", self.shared_text_proj, mt, self.shared_text_norm),
                                          ("shared_image", self.shared_image_proj, mv, self.shared_image_norm)):
            qs = torch.stack([project(proj, self.shared_query[i]) for i, proj in enumerate(projs)])
            out[name] = attend(qs, memory, norm, heads)
        return out

    def prepare(self, missing_type: torch.Tensor) -> AOEPTState:
        return AOEPTState(self.proxies(), missing_type)

    # --- hooks --------------------------------------------------------------------------------------
    def lock_step_order(self, info: BackboneInfo) -> tuple[str, ...] | None:
        return None if info.single_stream else (TEXT, IMAGE)

    def masks_padding_keys(self, stream: StreamInfo) -> bool:
        """The reference's text tower masks padding keys (Hugging Face CLIP with its attention mask)."""
        return stream.name == TEXT

    def reads_every_position_until(self, stream: StreamInfo) -> int:
        """Every text position is read (the mean features; the reference read-out may sit in the padding)."""
        return stream.num_layers

    def readout_override(self, stream: StreamInfo, layout: TokenLayout, positions: torch.Tensor,
                         ctx: PromptContext) -> torch.Tensor:
        """AOEPT-D1 ``reference``: the text feature at the first id 2, else at the last position."""
        if stream.name != TEXT or self.config.aoept_text_pool == "eot" or ctx.token_ids is None:
            return positions
        hit = ctx.token_ids == REFERENCE_EOS_ID
        last = torch.full_like(positions, ctx.token_ids.shape[1] - 1)
        return torch.where(hit.any(dim=1), hit.int().argmax(dim=1), last) + layout.offset(TEXT)

    def after_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                    layout: TokenLayout, ctx: PromptContext) -> None:
        """Record each modality's mean token (the gates' source, the loss's target) after blocks -1..d-1."""
        if index >= self.config.aoept_depth or x.shape[1] != layout.total:
            return
        for modality in stream.modalities:
            ctx.prepared.means[modality][index] = self.tower_mean(modality, x, mask, layout)

    def tower_mean(self, stream: str, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Mean over the modality's data tokens (the prompt slots excluded): every position (reference, AOEPT-D8; on
        ViLT the text over its real tokens), or under ``aoept_feature_pool=masked`` the real tokens only."""
        span = layout.span(stream)
        if (stream == TEXT and self.joint) or self.config.aoept_feature_pool == "masked":
            w = mask[:, span].to(x.dtype)
            return (x[:, span] * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        return x[:, span].mean(dim=1)

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        if index == 0:
            x, mask, layout = self.open_slots(stream, x, mask, layout, ctx)
        if index >= self.config.aoept_depth:
            return x, mask, layout
        state: AOEPTState = ctx.prepared
        if self.joint:
            prompts = self.joint_prompts(index, ctx.missing_type, state)
        else:
            source = state.means[GATED_BY[stream.name]][index - 1 if stream.name == TEXT else index]
            shared, own = self.gated(stream.name, index, source, ctx.missing_type, state)
            state.gated[stream.name].append(own)
            prompts = torch.cat([shared, own], dim=1)
        return torch.cat([prompts.to(x.dtype), x[:, self.prompt_count:]], dim=1), mask, layout

    def open_slots(self, stream: StreamInfo, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
                   ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """P slots in front of the stream (filled by ``before_block``); CLIP's text tokens at the positions P.. of the
        table resized to 77 + P (AOEPT-D9). ViLT's reference puts them after the text [CLS]: its blocks carry no
        positions, so in front gives the same outputs."""
        p = self.prompt_count
        table = ctx.position_table() if stream.name == TEXT else None
        if table is not None and self.config.aoept_text_positions == "resized":
            n, d = table.shape
            resized = F.interpolate(table.reshape(1, 1, n, d), size=(n + p, d), mode="bilinear").reshape(n + p, d)
            x = x + (resized[p:] - table).to(x.dtype)
        slots = x.new_zeros(x.shape[0], p, x.shape[2])
        mask = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        layout = layout.prepend([(SHARED, self.config.aoept_shared_length), (OWN, self.config.aoept_length)])
        return torch.cat([slots, x], dim=1), mask, layout

    def gated(self, stream: str, index: int, source: torch.Tensor, missing_type: torch.Tensor,
              state: AOEPTState) -> tuple[torch.Tensor, torch.Tensor]:
        """[ST_i ⊙ σ(g^s(source)) , T_i ⊙ σ(g(source))], each [B, n, D]; gates 1 on rows whose source is missing."""
        out = []
        for kind in (f"shared_{stream}", stream):
            gate = open_gate(torch.sigmoid(self.gates[kind][index](source)), missing_type, FORCED_OPEN[stream])
            out.append(state.proxies[kind][index][None] * gate)
        return out[0], out[1]

    def joint_prompts(self, index: int, missing_type: torch.Tensor, state: AOEPTState) -> torch.Tensor:
        """ViLT, block `index`: [S_i ⊙ σ(g_s(f)) ; w_t p_t + w_v p_v] [B, P, D] from the means after block index - 1
        (§18.3); p_t and p_v are kept for the consistency loss."""
        f_t, f_v = state.means[TEXT][index - 1], state.means[IMAGE][index - 1]
        proxies = state.proxies
        p_t = proxies["text"][index][None] * open_gate(torch.sigmoid(self.gates["text"][0](f_v)), missing_type,
                                                        MISSING_IMAGE)
        p_v = proxies["image"][index][None] * open_gate(torch.sigmoid(self.gates["image"][0](f_t)), missing_type,
                                                         MISSING_TEXT)
        p_s = proxies["shared"][index][None] * torch.sigmoid(self.gates["shared"][0]((f_t + f_v) / 2))[:, None]
        state.gated[TEXT].append(p_t)
        state.gated[IMAGE].append(p_v)
        w = MIXING.to(p_t)[missing_type]
        return torch.cat([p_s, w[:, 0, None, None] * p_t + w[:, 1, None, None] * p_v], dim=1)

    def build_head(self, num_classes: int) -> nn.Module | None:
        """ViLT: the reference's head, Linear(D, 2D), LayerNorm(2D), GELU, Linear(2D, C) at torch's default init
        (AOEPT-D14); CLIP: the backbone's."""
        if not self.joint:
            return None
        width = self.info.streams[0].width
        return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                             nn.Linear(2 * width, num_classes))

    # --- loss ---------------------------------------------------------------------------------------
    def aux_losses(self, prepared: AOEPTState) -> dict[str, torch.Tensor]:
        """The consistency loss (§18.4): mean of the InfoNCE terms of every prompted block and modality."""
        terms = []
        scale = self.logit_scale.exp()
        for stream, missing in ((TEXT, MISSING_TEXT), (IMAGE, MISSING_IMAGE)):
            keep = (prepared.missing_type != missing).nonzero().squeeze(1)
            if keep.numel() < 2:
                continue
            for index, own in enumerate(prepared.gated[stream]):
                p = F.normalize(own.mean(dim=1)[keep], dim=-1)
                f = F.normalize(prepared.means[stream][index].detach()[keep], dim=-1)
                terms.append(F.cross_entropy(p @ f.T * scale, torch.arange(keep.numel(), device=p.device)))
        if not terms:
            return {"aoept_consistency": self.logit_scale.new_zeros(())}
        return {"aoept_consistency": torch.stack(terms).mean()}

    @classmethod
    def added_tokens(cls, config: AOEPTConfig, info: BackboneInfo) -> dict[str, int]:
        p = config.aoept_length + config.aoept_shared_length
        return {s.name: p for s in info.streams}


def attend(queries: torch.Tensor, memory: torch.Tensor, norm: nn.LayerNorm, heads: int) -> torch.Tensor:
    """LN(A_H(q_i, m_i) + q_i) for every block i: queries [d, n, D], memory [d, k, D] -> [d, n, D]."""
    return torch.stack([norm(free_attention(q, m, heads) + q) for q, m in zip(queries, memory)])


def open_gate(gate: torch.Tensor, missing_type: torch.Tensor, forced: int) -> torch.Tensor:
    """gate [B, D] -> [B, 1, D], 1 on the rows of missing type `forced` (the gate's source is missing)."""
    gate = gate[:, None, :]
    return torch.where((missing_type == forced)[:, None, None], torch.ones_like(gate), gate)


def reference_memory(centres: torch.Tensor, depth: int) -> torch.Tensor:
    """AOEPT-D2: the reference's ViLT loader reads the prototype file [layers, K, D] as [samples, layers, D], so the
    memory of prompted block i is prototype i of every block input: [layers, K, D] -> [depth, layers, D] (the
    reference also shuffles the rows, immaterial to the attention over them)."""
    if centres.shape[1] < depth:
        raise UserInputError(f"aoept_vilt_memory_layout=reference takes prototype i of every block for block i < "
                             f"aoept_depth={depth}, but the preparation gave {centres.shape[1]} prototypes: lower "
                             f"aoept_depth or use more training rows")
    return centres[:, :depth].transpose(0, 1)


def project(proj: nn.Sequential, q: torch.Tensor) -> torch.Tensor:
    """`proj`(q) with its first layer called functionally: q is a view of a parameter, which module hooks (FLOP
    counting under inference mode) cannot follow."""
    first = proj[0]
    return proj[1:](F.linear(q, first.weight, first.bias))


def _projection(hidden: int, width: int) -> nn.Sequential:
    """The shared query's projection into a tower: Linear(h, h), GELU, Linear(h, width)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width))
