"""SCP — semantically conditioned prompts (Pipoli et al., WACV 2025; docs/methods.md §14).

Two kinds of prompted blocks, both prepending tokens to the stream's sequence (they accumulate, as MAP's input
prompts, §3.2):

* **static** blocks (``scp_static_layers``): one learned [k+F, width] tensor per block, the same for every row;
* **conditioned** blocks (``scp_layers``): the row's read-out token at the block's input (ViLT: the text [CLS]) goes
  through the block's **own** frozen pre-attention norm and query projection (``ctx.block_query``: the live weights,
  D-56), the query is cut into k chunks of width/k, each chunk attends over a learned key pool [S, width/k] (scaled
  by 1/sqrt(width), D-58; softmax, dropout) and reads a learned value pool [S, width]: k generated tokens, after F
  learned fixed tokens.

SCP never reads the missing type: missingness reaches the prompts only through the read-out token, which has seen
the dummy inputs.

On a two-stream backbone (CLIP, CoCa; our mapping, not defined by the paper, §14.6) every stream has its own prompts
and pools, conditioned on that stream's read-out token (image CLS; CLIP text EOT, CoCa text CLS) through that
stream's blocks; both features are kept, as MAP on CLIP.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (BackboneInfo, MethodConfig, PromptContext, PromptMethod, StreamInfo, check_layers,
                               check_positive)
from mdpl.prompts.layout import TokenLayout, splice_tokens
from mdpl.prompts.registry import register_method

POOL_SCALES = ("width", "chunk")
REFERENCE_QUERY_EPS = 1e-5
"""The epsilon of the reference's query LayerNorm (a default ``nn.LayerNorm``), not the block's (D-57)."""


@dataclass(frozen=True)
class ScpConfig(MethodConfig):
    """SCP's keys with the values of the reference's documented command (§14.1, §14.5)."""

    scp_length: int = 12                  # k: tokens generated per conditioned block (query chunks)
    scp_pool_size: int = 32               # S: key/value pool entries per conditioned block (config default 1024, D-59)
    scp_fixed_prompts: int = 4            # F: learned tokens in front of the generated ones at a conditioned block
    scp_layers: tuple[int, ...] = (6, 7, 8, 9, 10, 11)        # conditioned blocks
    scp_static_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)   # blocks with k+F static prompt tokens
    scp_pool_dropout: float = 0.1         # dropout on the pool attention weights (training only)
    scp_pool_scale: str = "width"         # 'width': 1/sqrt(width) as the reference (D-58) | 'chunk': 1/sqrt(width/k)
    scp_block_eps: bool = False           # True: the query norm uses the block's epsilon (False: 1e-5, D-57)

    TINY = {"scp_length": 2, "scp_pool_size": 4, "scp_fixed_prompts": 1, "scp_layers": [1],
            "scp_static_layers": [0]}

    @property
    def tokens(self) -> int:
        """Tokens one prompted block adds (static or conditioned): k + F."""
        return self.scp_length + self.scp_fixed_prompts

    def check(self, info: BackboneInfo) -> None:
        check_positive("scp_length", self.scp_length)
        check_positive("scp_pool_size", self.scp_pool_size)
        fixed = self.scp_fixed_prompts
        if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 0:
            raise UserInputError(f"scp_fixed_prompts must be a non-negative integer, got {fixed!r}")
        if not self.scp_layers:
            raise UserInputError("scp_layers=[] conditions no block; give the blocks SCP conditions (e.g. "
                                 "scp_layers=[6,7,8,9,10,11])")
        conditioned = check_layers("scp_layers", self.scp_layers, info)
        static = check_layers("scp_static_layers", self.scp_static_layers, info, allow_empty=True)
        both = sorted(set(conditioned) & set(static))
        if both:
            raise UserInputError(f"blocks {both} are in both scp_layers and scp_static_layers; a block gets one kind "
                                 "of SCP prompt (D-61)")
        for stream in info.streams:
            if stream.width % self.scp_length:
                common = math.gcd(*(s.width for s in info.streams))
                fits = next(d for d in range(self.scp_length, common + 1) if common % d == 0)
                raise UserInputError(f"scp_length={self.scp_length} must divide the width of every stream (the "
                                     f"query is cut into scp_length chunks); the {stream.name} stream is "
                                     f"{stream.width} wide: e.g. scp_length={fits}")
        if not isinstance(self.scp_pool_dropout, (int, float)) or not 0 <= self.scp_pool_dropout < 1:
            raise UserInputError(f"scp_pool_dropout must be in [0, 1), got {self.scp_pool_dropout!r}")
        if self.scp_pool_scale not in POOL_SCALES:
            raise UserInputError(f"scp_pool_scale={self.scp_pool_scale!r}; choose width (the reference) or chunk")


def _kaiming(shape: tuple[int, ...]) -> nn.Parameter:
    """The reference init: Kaiming normal, fan_in = last dim, ReLU gain (std sqrt(2 / shape[-1]))."""
    p = nn.Parameter(torch.empty(shape))
    nn.init.kaiming_normal_(p, mode="fan_in", nonlinearity="relu")
    return p


class ScpStreamPrompts(nn.Module):
    """One stream's SCP tensors: ``static.{j}`` [k+F, width] per static block, and per conditioned block ``fixed.{j}``
    [F, width] (F > 0), ``keys.{j}`` [S, width/k], ``values.{j}`` [S, width]. Drawn in the reference's order (all
    static tensors, then fixed, keys, values block by block)."""

    def __init__(self, width: int, config: ScpConfig) -> None:
        super().__init__()
        k, s, f = config.scp_length, config.scp_pool_size, config.scp_fixed_prompts
        self.static = nn.ParameterList([_kaiming((config.tokens, width)) for _ in config.scp_static_layers])
        self.fixed, self.keys, self.values = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for _ in config.scp_layers:
            if f:
                self.fixed.append(_kaiming((f, width)))
            self.keys.append(_kaiming((s, width // k)))
            self.values.append(_kaiming((s, width)))


@register_method("scp")
class SemanticallyConditionedPrompts(PromptMethod):
    """SCP (§14) on every stream of the backbone."""

    title = "SCP"
    preset = "scp"
    paper_run = (1e-2, 0)
    paper_tables = "mdpl.experiments.papers.scp:tables"
    config_class = ScpConfig
    reference_prompt_keys = ("add_agnostic_prompts_layers.", "QKV_ps_layers.")
    reference_config_keys = (("prompt_length", "scp_length"), ("pool_size", "scp_pool_size"),
                             ("fixed_prompts", "scp_fixed_prompts"), ("prompt_layers", "scp_layers"),
                             ("fixed_prompt_layers", "scp_static_layers"))

    def __init__(self, config: ScpConfig, info: BackboneInfo):
        super().__init__(config, info)
        self._static_of = {layer: j for j, layer in enumerate(config.scp_static_layers)}
        self._conditioned_of = {layer: j for j, layer in enumerate(config.scp_layers)}
        self.streams = nn.ModuleDict({s.name: ScpStreamPrompts(s.width, config) for s in info.streams})
        self.pool_dropout = nn.Dropout(float(config.scp_pool_dropout))

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        prompts = self.streams[stream.name]
        if index in self._static_of:
            tokens = prompts.static[self._static_of[index]].expand(x.shape[0], -1, -1)
            name = f"scp.static.{index}"
        elif index in self._conditioned_of:
            tokens = self.conditioned_prompts(prompts, index, x, layout, ctx)
            name = f"scp.{index}"
        else:
            return x, mask, layout
        x, mask = splice_tokens(x, mask, 0, [tokens])
        return x, mask, layout.prepend([(name, tokens.shape[1])])

    def conditioned_prompts(self, prompts: ScpStreamPrompts, index: int, x: torch.Tensor, layout: TokenLayout,
                            ctx: PromptContext) -> torch.Tensor:
        """[B, F+k, width]: the fixed tokens, then the pool read by the chunks of the block's query of each row's
        read-out token (§14.2)."""
        j = self._conditioned_of[index]
        b, width = x.shape[0], x.shape[-1]
        k = self.config.scp_length
        position = ctx.readout_positions(layout)
        token = x.gather(1, position.to(x.device)[:, None, None].expand(-1, 1, width))[:, 0]      # [B, width]
        eps = None if self.config.scp_block_eps else REFERENCE_QUERY_EPS
        query = ctx.block_query(index, token, eps).reshape(b, k, width // k)
        scale = width if self.config.scp_pool_scale == "width" else width // k
        keys, values = prompts.keys[j], prompts.values[j]
        weights = torch.softmax(query @ keys.to(query.dtype).t() / math.sqrt(scale), dim=-1)     # [B, k, S]
        generated = self.pool_dropout(weights) @ values.to(query.dtype)                        # [B, k, width]
        if not self.config.scp_fixed_prompts:
            return generated
        fixed = prompts.fixed[j].to(generated.dtype).expand(b, -1, -1)
        return torch.cat([fixed, generated], dim=1)

    @classmethod
    def added_tokens(cls, config: ScpConfig, info: BackboneInfo) -> dict[str, int]:
        """Every prompted block prepends k+F tokens, which accumulate."""
        count = (len(config.scp_layers) + len(config.scp_static_layers)) * config.tokens
        return {stream.name: count for stream in info.streams}

    # --- reference checkpoints (§14.4) ------------------------------------------------------------------
    @classmethod
    def upgrade_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference names (``prompt.`` + ``add_agnostic_prompts_layers.{j}.promptPool``, ``QKV_ps_layers.{j}.
        {fixed_prompts,promptPool_K,promptPool_V}``) -> ``prompt.streams.joint.{static,fixed,keys,values}.{j}``. The
        reference's frozen query copies (``QKV_ps_layers.{j}.{W_Q,bias_Q,layerNorm.*}``) are left for
        :meth:`complete_reference_state`, which checks and drops them."""
        out = {}
        for key, value in state.items():
            m = _REFERENCE_KEY.match(key)
            if m is None:
                out[key] = value
            elif m.group("kind") == "add_agnostic_prompts_layers":
                out[f"prompt.streams.joint.static.{m.group('j')}"] = value
            else:
                out[f"prompt.streams.joint.{_REFERENCE_LEAF[m.group('leaf')]}.{m.group('j')}"] = value
        return out

    @classmethod
    def complete_reference_state(cls, state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                                 config: ScpConfig) -> dict[str, torch.Tensor]:
        """`state` without the reference's frozen copies of each conditioned block's norm and query projection,
        after checking that they equal the block weights of the same state (D-56); ValueError otherwise."""
        layers = list(config.scp_layers)
        out, bad = {}, []
        for key, value in state.items():
            m = _REFERENCE_COPY.match(key)
            if m is None:
                out[key] = value
                continue
            j = int(m.group("j"))
            if j >= len(layers):
                bad.append(key)
                continue
            live = _live_copy(state, layers[j], m.group("leaf"))
            if live is None or live.shape != value.shape or not torch.equal(live, value):
                bad.append(key)
        if bad:
            raise ValueError(f"the checkpoint's frozen query copies {bad[:4]} differ from its blocks' weights (or name "
                             f"blocks outside scp_layers={layers}): it was not trained with these scp_layers")
        return out


_REFERENCE_KEY = re.compile(r"^prompt\.(?P<kind>add_agnostic_prompts_layers|QKV_ps_layers)\.(?P<j>\d+)\."
                            r"(?P<leaf>promptPool|fixed_prompts|promptPool_K|promptPool_V)$")
_REFERENCE_LEAF = {"fixed_prompts": "fixed", "promptPool_K": "keys", "promptPool_V": "values"}
_REFERENCE_COPY = re.compile(r"^prompt\.QKV_ps_layers\.(?P<j>\d+)\.(?P<leaf>W_Q|bias_Q|layerNorm\.weight|"
                             r"layerNorm\.bias)$")


def _live_copy(state: Mapping[str, torch.Tensor], layer: int, leaf: str) -> torch.Tensor | None:
    """What the reference copied from block `layer` into `leaf` (W_Q is the query rows of qkv, transposed)."""
    block = f"backbone.transformer.blocks.{layer}."
    if leaf in ("W_Q", "bias_Q"):
        qkv = state.get(block + ("attn.qkv.weight" if leaf == "W_Q" else "attn.qkv.bias"))
        if qkv is None:
            return None
        width = qkv.shape[-1] if leaf == "W_Q" else qkv.shape[0] // 3
        return qkv[:width].t() if leaf == "W_Q" else qkv[:width]
    return state.get(block + ("norm1.weight" if leaf.endswith("weight") else "norm1.bias"))
