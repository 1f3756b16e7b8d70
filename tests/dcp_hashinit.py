"""Deterministic, platform-independent weights for the DCP parity fixture (tests/fixtures/README.md, "DCP").

The reference DCP hard-codes widths 768/512 and vocabulary 49,408, so its smallest model has ~60 M
values — far too many to store. Instead every tensor is a pure function of (key, shape): an integer
hash of (key, element index) mapped to an exactly representable uniform value in [-1, 1), scaled per
kind of tensor. The fixture generator and the parity test both call :func:`hashed_state_dict`, and the
fixture stores float64 checksums to prove both sides saw the same numbers. Only depends on torch.
"""
from __future__ import annotations

import math
import zlib

import torch

_M1 = -7046029254386353131   # 0x9E3779B97F4A7C15 as int64
_M2 = -4658895280553007687   # 0xBF58476D1CE4E5B9 as int64
_M3 = -7723592293110705685   # 0x94D049BB133111EB as int64
_CHUNK = 1 << 22


def hashed_uniform(key: str, numel: int) -> torch.Tensor:
    """float32 [numel] in [-1, 1), multiples of 2**-23, from a 64-bit integer hash of (key, index)."""
    seed = zlib.crc32(key.encode()) + 1
    out = torch.empty(numel, dtype=torch.float32)
    for start in range(0, numel, _CHUNK):
        z = torch.arange(start, min(numel, start + _CHUNK), dtype=torch.int64) + seed * 1_000_003
        z = z * _M1
        z = (z ^ (z >> 29)) * _M2
        z = (z ^ (z >> 32)) * _M3
        z = z ^ (z >> 29)
        bits = (z >> 20) & ((1 << 24) - 1)
        out[start:start + bits.numel()] = bits.to(torch.float32) / float(1 << 23) - 1.0
    return out


def _scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, amplitude) so that values look like a trained network's (LN weights near 1, ~1/sqrt(fan_in))."""
    leaf = key.rsplit(".", 1)[-1]
    is_norm = any(t in key for t in ("ln_", "layernorm"))
    if is_norm and leaf == "weight":
        return 1.0, 0.1
    if leaf in ("bias", "in_proj_bias"):
        return 0.0, 0.02
    if key.endswith("proj") or key.endswith("text_projection"):      # x @ P: [in, out]
        return 0.0, math.sqrt(3.0 / shape[0])
    if len(shape) >= 2 and leaf.endswith("weight") and "embedding" not in key:
        return 0.0, math.sqrt(3.0 / math.prod(shape[1:]))            # Linear / conv: [out, in, ...]
    return 0.0, 0.02 * math.sqrt(3.0)                                 # embeddings, prompts, queries


def hashed_tensor(key: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The deterministic value of tensor ``key`` with ``shape``."""
    shape = tuple(int(s) for s in shape)
    offset, amp = _scale(key, shape)
    u = hashed_uniform(key, math.prod(shape)).reshape(shape)
    return u * amp + offset if offset else u * amp


def hashed_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{key: hashed_tensor(key, shape)} for every floating tensor described by ``shapes``."""
    return {k: hashed_tensor(k, s) for k, s in shapes.items()}


def checksum(t: torch.Tensor) -> torch.Tensor:
    """float64 [2]: sum and sum of |x| weighted by a position ramp (order-sensitive)."""
    flat = t.detach().double().reshape(-1)
    ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64) if flat.numel() > 1 else torch.ones(1, dtype=torch.float64)
    return torch.stack([flat.sum(), (flat.abs() * ramp).sum()])
