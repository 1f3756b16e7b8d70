"""Reading open_clip CoCa weights (docs/methods.md §5b), beside the CLIP reader: a local ``torch.save`` state dict
(``open_clip_pytorch_model.bin``, ``.pt``, an open_clip training checkpoint with ``state_dict``) or a
``.safetensors`` file, in open_clip's key layout; checked strictly against the model (shapes, missing / unexpected
keys listed, one UserInputError for a wrong or truncated file, SHA-256 when given). Nothing is ever downloaded.

Key layout: ``visual.<k>`` <-> ``image_encoder.<k>``, ``text.<k>`` <-> ``text_encoder.<k>``, ``logit_scale``.
The multimodal text decoder (``text_decoder.*``, CoCa's captioning head) is no part of the classifier: its keys are
dropped on reading (mdpl builds no decoder).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from mdpl.backbones.clip_weights import check_state_dict, sha256_of
from mdpl.errors import UserInputError

DECODER_PREFIX = "text_decoder."
"""open_clip CoCa keys of the multimodal decoder, which the classifier does not use (dropped on reading)."""

LEGACY_TEXT_ROOTS = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final", "cls_emb")
"""Top-level text keys of open_clip's old (non-"custom text") layout, moved under ``text.`` on reading as open_clip's
own ``load_checkpoint`` does."""

WHAT = "a local open_clip CoCa checkpoint (open_clip_pytorch_model.bin, a .pt state dict or a .safetensors file)"


_PREFIXES = (("visual.", "image_encoder."), ("text.", "text_encoder."))
"""open_clip CoCa prefix -> this backbone's (``logit_scale`` unchanged)."""


def _renamed(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def open_clip_to_backbone_key(key: str) -> str:
    """``visual.X`` -> ``image_encoder.X``; ``text.X`` -> ``text_encoder.X``; ``logit_scale`` unchanged."""
    return _renamed(key, _PREFIXES)


def backbone_to_open_clip_key(key: str) -> str:
    """Inverse of :func:`open_clip_to_backbone_key`."""
    return _renamed(key, tuple((new, old) for old, new in _PREFIXES))


def check_coca_state_dict(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """``clip_weights.check_state_dict`` (missing / unexpected keys, shapes), its hint naming the coca_* keys."""
    try:
        check_state_dict(given, expected, what)
    except UserInputError as err:
        raise UserInputError(str(err).replace("the clip_* size keys", "the coca_* size keys")) from None


def _load(path: str) -> object:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_coca_checkpoint(path: str, sha256: str = "") -> dict[str, torch.Tensor]:
    """An open_clip CoCa state dict from `path`, in open_clip's layout without the decoder, floating tensors in fp32.

    Accepts a plain state dict, ``{"state_dict": ...}`` (open_clip training checkpoints, ``module.`` prefixes of DDP
    removed) and safetensors. A file that is missing, unreadable, truncated or holds no tensor dict is one
    UserInputError (one line); optional SHA-256 check (``coca_sha256``).
    """
    if not os.path.isfile(path):
        raise UserInputError(f"coca_path {path!r} does not exist; pass {WHAT} — nothing is downloaded")
    if sha256 and sha256_of(path) != sha256.lower():
        raise UserInputError(f"SHA-256 of coca_path {path} differs from coca_sha256={sha256}; the file is corrupt or "
                             "another model")
    try:
        state = _load(path)
    except Exception as err:  # noqa: BLE001 - torch / safetensors raise many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read coca_path {path} as a CoCa checkpoint ({type(err).__name__}: {err}); "
                             f"pass {WHAT}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"coca_path {path} holds a {type(state).__name__} that is not a CoCa state dict of "
                             f"tensors; pass {WHAT}")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    if "text_projection" in state:   # open_clip's old layout: text tower keys at the top level
        state = {("text." + k if k.startswith(LEGACY_TEXT_ROOTS) else k): v for k, v in state.items()}
    return {k: (v.float() if torch.is_floating_point(v) else v) for k, v in state.items()
            if not k.startswith(DECODER_PREFIX)}
