"""Reading OpenAI CLIP weights (docs/methods.md §5.1), beside the ViLT reader (timm ``checkpoint_filter_fn``
style): a TorchScript archive (``ViT-B-16.pt``) or a plain OpenAI-layout state dict, checked strictly against the
model (shapes, a clear error for a wrong file, SHA-256 where known); nothing is ever downloaded (D-42).

Key layout: ``visual.<k>`` <-> ``image_encoder.<k>``, text keys ``<k>`` <-> ``text_encoder.<k>``, ``logit_scale``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from typing import Mapping

import torch

from mdpl.errors import UserInputError

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Integer entries of OpenAI's JIT state dict that are not parameters (§5.1); dropped on load."""

TEXT_KEY_ROOTS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
"""OpenAI top-level keys that belong to the text tower."""

VIT_B16_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
"""SHA-256 of OpenAI's ``ViT-B-16.pt`` (part of its download URL)."""


def openai_to_backbone_key(key: str) -> str:
    """``visual.X`` -> ``image_encoder.X``; text keys -> ``text_encoder.X``; ``logit_scale`` unchanged."""
    if key.startswith("visual."):
        return "image_encoder." + key[len("visual."):]
    if key.startswith(TEXT_KEY_ROOTS):
        return "text_encoder." + key
    return key


def backbone_to_openai_key(key: str) -> str:
    """Inverse of :func:`openai_to_backbone_key`."""
    if key.startswith("image_encoder."):
        return "visual." + key[len("image_encoder."):]
    if key.startswith("text_encoder."):
        return key[len("text_encoder."):]
    return key


def check_state_dict(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise UserInputError (a ValueError) listing missing / unexpected keys and shape mismatches (strict loading,
    D-38): `given` comes from a file the user names (clip_path, load_path)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(given) & set(expected)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise UserInputError(f"{what} does not match the model: " + "; ".join(problems)
                         + " — check the clip_* size keys / the checkpoint file")


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (holds ``constants.pkl``/``code/``), False for a ``torch.save`` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_openai_checkpoint(path: str, sha256: str = "") -> dict[str, torch.Tensor]:
    """Read an OpenAI CLIP checkpoint: TorchScript archive or plain (``torch.save``) state dict.

    Drops ``input_resolution``/``context_length``/``vocab_size`` and casts floating tensors to fp32
    (§5.1: DCP computes in an fp32 model holding fp16-representable values). Optional SHA-256 check.
    Not ``open_clip.create_model(pretrained=<file>)``: its one ``weights_only`` flag either refuses TorchScript
    archives (True) or unpickles any plain file (False), and it builds named configs only (not ``clip_*`` sizes).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint {path!r} not found; set clip_path to a local ViT-B-16.pt "
                                "(OpenAI JIT archive) or an OpenAI-layout state dict — nothing is downloaded")
    if sha256 and sha256_of(path) != sha256.lower():
        raise UserInputError(f"SHA-256 of clip_path {path} differs from clip_sha256={sha256}; the file is corrupt "
                             "or another model")
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)       # torch.jit is deprecated; OpenAI ships JIT files
                state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
                state = state["state_dict"]
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read clip_path {path} as a CLIP checkpoint ({type(err).__name__}: {err}); "
                             "pass a local ViT-B-16.pt or an OpenAI-layout state dict") from None
    if not isinstance(state, Mapping):
        raise UserInputError(f"clip_path {path} holds a {type(state).__name__}, not a CLIP state dict")
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRA_KEYS:
            continue
        out[key] = value.float() if torch.is_floating_point(value) else value
    return out
