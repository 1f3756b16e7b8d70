"""The one self-attention with a key/value prefix that every block of every backbone runs (docs/architecture.md).

open_clip's ``ResidualAttentionBlock(q_x, k_x, v_x, attn_mask)`` shape: queries, keys and values after the
in-projection go through fused ``scaled_dot_product_attention``; optional raw prompt keys / values (MAP's
attention-level prompts, docs/methods.md §3.3, D-17) are put in front of the keys and values, visible to every
query, and split into heads like them. Written against public module attributes only (timm ``Attention.qkv`` /
``proj``, ``nn.MultiheadAttention.in_proj_weight`` / ``out_proj``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange

from mdpl.prompts.adapters import QKV_MAPS, WeightAdapter


def prefixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                       attn_mask: torch.Tensor | None = None,
                       kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                       dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """Multi-head attention of q [B, Lq, C] over k, v [B, Lk, C] -> [B, Lq, C] (heads merged, before out-proj).

    `attn_mask`: bool (True = attend) or additive float, broadcastable to [B, heads, Lq, Lk] — a key-padding mask
    [B, 1, 1, Lk] or a causal [Lq, Lk] mask. `kv_prefix`: (keys, values) [B, P, C] prepended to k and v; the mask
    gets P visible columns in front. `is_causal` (Lq = Lk, no mask, no prefix): SDPA's own causal masking, which
    lets it pick a kernel that takes no mask tensor.
    """
    if is_causal and (attn_mask is not None or kv_prefix is not None or q.shape[1] != k.shape[1]):
        raise ValueError("is_causal needs square attention without a mask or key/value prefix")
    if kv_prefix is not None:
        k = torch.cat([kv_prefix[0].to(k.dtype), k], dim=1)
        v = torch.cat([kv_prefix[1].to(v.dtype), v], dim=1)
        if attn_mask is not None:
            attn_mask = _with_visible_prefix(attn_mask, kv_prefix[0].shape[1])
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b l (h d) -> b h l d", h=num_heads)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal)
    return rearrange(out, "b h l d -> b l (h d)")


def project_qkv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                query_index: torch.Tensor | None = None,
                adapters: Mapping[str, WeightAdapter] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from one fused in-projection (rows q, k, v of `weight`); with `query_index` (long [B]) the queries
    only of those positions, q [B, 1, C] — the last block of a stream, whose other rows nobody reads. With an
    adapter on ``q``, ``k`` or ``v`` the three projections run separately, each on its row slice of `weight`."""
    if adapters and any(name in adapters for name in QKV_MAPS):
        return _project_split(h, weight, bias, query_index, adapters)
    if query_index is None:
        return F.linear(h, weight, bias).chunk(3, dim=-1)
    c = h.shape[-1]
    k, v = F.linear(h, weight[c:], None if bias is None else bias[c:]).chunk(2, dim=-1)
    q = F.linear(take_rows(h, query_index), weight[:c], None if bias is None else bias[:c])
    return q, k, v


def _project_split(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   query_index: torch.Tensor | None,
                   adapters: Mapping[str, WeightAdapter]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`project_qkv` one projection at a time, through the adapters of those that have one."""
    c = h.shape[-1]
    out = []
    for i, name in enumerate(QKV_MAPS):
        rows = slice(i * c, (i + 1) * c)
        source = take_rows(h, query_index) if name == "q" and query_index is not None else h
        out.append(adapted_linear(source, weight[rows], None if bias is None else bias[rows], adapters.get(name)))
    return out[0], out[1], out[2]


def adapted_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   adapter: WeightAdapter | None = None) -> torch.Tensor:
    """``linear(x, weight, bias)``, through `adapter` when there is one."""
    return F.linear(x, weight, bias) if adapter is None else adapter(x, weight, bias)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for every b, as [B, 1, D]."""
    return x.gather(1, index[:, None, None].expand(-1, 1, x.shape[-1]))


def _with_visible_prefix(mask: torch.Tensor, length: int) -> torch.Tensor:
    """`mask` with `length` leading key columns every query may attend to."""
    visible = True if mask.dtype == torch.bool else 0.0
    return torch.cat([mask.new_full((*mask.shape[:-1], length), visible), mask], dim=-1)
