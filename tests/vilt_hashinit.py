"""Deterministic weights of a 768-wide ViLT for the SCP and MSPs parity fixtures (tests/fixtures/README.md, "SCP",
"MSPs").

The reference SCP slices its query weights at 768 columns, so its smallest model is 768 wide (~20 M values): too
many to store. As for DCP (`dcp_hashinit`), every tensor is a pure function of (key, shape), scaled like a trained
ViLT's: LayerNorm gains near 1, biases small, linear maps ~ 1/sqrt(fan_in), prompt pools at the reference's init
spread. The generator (tools/parity/make_scp.py) and the parity test both call :func:`hashed_vilt_tensor`; the fixture
stores float64 checksums to prove both sides saw the same numbers.
"""
from __future__ import annotations

import math

import torch

from dcp_hashinit import checksum, hashed_uniform  # noqa: F401 (checksum re-exported)

_NORM_MARKS = ("norm", "LayerNorm", "layerNorm")


def _scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, amplitude) of tensor `key`: uniform values in offset ± amplitude."""
    leaf = key.rsplit(".", 1)[-1]
    head_norm = "_classifier.1." in key or key.startswith("classifier.1.")   # Linear, LayerNorm, GELU, Linear
    if (any(m in key for m in _NORM_MARKS) or head_norm) and leaf == "weight":
        return 1.0, 0.1
    if leaf.startswith("bias"):
        return 0.0, 0.02
    if leaf == "promptPool_K":                             # peaked pool attention: the scale matters (D-58)
        return 0.0, 1.0
    if leaf in ("promptPool", "promptPool_V", "fixed_prompts"):
        return 0.0, math.sqrt(6.0 / shape[-1])             # the reference's Kaiming spread, std sqrt(2 / fan_in)
    if len(shape) >= 2 and leaf == "weight" and "embeddings" not in key:
        return 0.0, math.sqrt(3.0 / math.prod(shape[1:]))  # Linear / conv: [out, in, ...]
    return 0.0, 0.02 * math.sqrt(3.0)                      # embeddings, cls token, position grid


def hashed_vilt_tensor(key: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The deterministic float32 value of reference tensor `key` with `shape`."""
    shape = tuple(int(s) for s in shape)
    offset, amp = _scale(key, shape)
    u = hashed_uniform(key, math.prod(shape)).reshape(shape) * amp
    return u + offset if offset else u


def hashed_scp_state(shapes: dict[str, tuple[int, ...]], layers: list[int]) -> dict[str, torch.Tensor]:
    """Every floating tensor of a reference SCP state dict (key -> shape): hashed, except the frozen query copies
    ``QKV_ps_layers.{j}.{W_Q,bias_Q,layerNorm.*}``, taken from block ``layers[j]`` as the reference takes them after
    a checkpoint load (docs/methods.md D-56)."""
    return refresh_copies({k: hashed_vilt_tensor(k, s) for k, s in shapes.items()}, layers)


def refresh_copies(state: dict[str, torch.Tensor], layers: list[int]) -> dict[str, torch.Tensor]:
    """`state` with each ``QKV_ps_layers.{j}`` copy set from block ``layers[j]``, as the reference takes them."""
    out = dict(state)
    for j, layer in enumerate(layers):
        qkv_w = state[f"transformer.blocks.{layer}.attn.qkv.weight"]
        width = qkv_w.shape[1]
        out[f"QKV_ps_layers.{j}.W_Q"] = qkv_w.t()[:, :width].clone()
        out[f"QKV_ps_layers.{j}.bias_Q"] = state[f"transformer.blocks.{layer}.attn.qkv.bias"][:width].clone()
        out[f"QKV_ps_layers.{j}.layerNorm.weight"] = state[f"transformer.blocks.{layer}.norm1.weight"].clone()
        out[f"QKV_ps_layers.{j}.layerNorm.bias"] = state[f"transformer.blocks.{layer}.norm1.bias"].clone()
    return out


MSPS_PROMPTS = ("text_prompt", "img_prompt")
"""The two prompt tensors of the MSPs reference (RAGPT's baseline), named as there."""


def hashed_msps_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every floating tensor of an MSPs reference model (a Hugging Face ``ViltModel`` + prompts + pooler + head; key ->
    shape): hashed as :func:`hashed_vilt_tensor`, except the two prompt tensors: a shared hashed component plus one
    of their own (amplitude 0.5 each), so the prompts are far from orthogonal and the orthogonality term has a
    gradient (it has none at the reference's init, docs/methods.md MSPS-D4)."""
    out = {k: hashed_vilt_tensor(k, s) for k, s in shapes.items() if k not in MSPS_PROMPTS}
    for key in MSPS_PROMPTS:
        shape = tuple(int(s) for s in shapes[key])
        numel = math.prod(shape)
        out[key] = 0.5 * (hashed_uniform("msps.shared", numel) + hashed_uniform(key, numel)).reshape(shape)
    return out


RAGPT_UNIT = ("label_enhanced", "W")
"""RAGPT leaves hashed at amplitude 1 (the reference's N(0, 1) label prototypes and N(0, 1/2) complex filter
parts), so the label token and the spectral filter move the outputs."""


def hashed_ragpt_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every tensor of a RAGPT reference model (key -> shape; the complex filters ``*.W`` as real pairs [n, D, 2]):
    hashed as :func:`hashed_vilt_tensor`, the prototypes and filters at amplitude 1."""
    out = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if key.rsplit(".", 1)[-1] in RAGPT_UNIT:
            out[key] = hashed_uniform(key, math.prod(shape)).reshape(shape)
        else:
            out[key] = hashed_vilt_tensor(key, shape)
    return out


def hashed_ragpt_bank(modality: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A RAGPT memory bank [M, n, D] of one modality: uniform with unit variance (the embedding output is layer-
    normalised)."""
    return hashed_uniform(f"ragpt.bank.{modality}", math.prod(shape)).reshape(shape) * math.sqrt(3.0)
