"""Atomic file writes: a reader (a resumed run, ``scripts/reproduce.py``, ``scripts/aggregate.py``, the preparation
stage) sees either the previous file or the complete new one, never a file cut short by a kill or a full disk."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """``write(fh)`` into a temporary binary file in ``path``'s folder, flush it to disk, then rename it over
    ``path`` (e.g. ``write_atomic(p, lambda fh: torch.save(obj, fh))``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None) -> Path:
    """``write_atomic`` of ``text``; ``newline`` as ``open()``'s (None, '' and '\\n' keep the text's line ends)."""
    if newline not in (None, "", "\n"):
        text = text.replace("\n", newline)
    return write_atomic(path, lambda fh: fh.write(text.encode(encoding)))
