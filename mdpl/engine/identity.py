"""Fingerprints of what a prepared artefact depends on: files (cheap: size, time and the ends' hash) and tensors."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_BYTES = 1 << 20
"""Bytes hashed at each end of a file (with its size and modification time: its identity)."""


def file_identity(path: Path) -> dict[str, Any]:
    """Size, modification time and sha256 of the first and last ``HEAD_BYTES`` of a file."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(HEAD_BYTES))
        if stat.st_size > HEAD_BYTES:
            fh.seek(max(HEAD_BYTES, stat.st_size - HEAD_BYTES))
            digest.update(fh.read(HEAD_BYTES))
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ends_sha256": digest.hexdigest()}


def tensor_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors."""
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_state(module: nn.Module, frozen_only: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The module's state that training leaves alone: every buffer and frozen parameter (all of it otherwise)."""
    return [(name, t) for name, t in module.state_dict(keep_vars=True).items()
            if not (frozen_only and isinstance(t, nn.Parameter) and t.requires_grad)]
