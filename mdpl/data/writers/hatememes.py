"""Hateful Memes raw layout -> ``hatememes_{train,dev,test}.arrow`` (docs/methods.md §1.1-1.2, D-1, D-3).

Two layouts are accepted (D-3): the reference writer's ``root/data/{train,dev,test}.jsonl`` with
images under ``root/data/img/``, and the DATA.md layout ``root/{train,dev,test}.jsonl`` with
``root/img/``. Each jsonl line is ``{"id", "img", "label", "text"}``; the image path is
``<jsonl folder>/<img>``. Which file feeds each split is configurable (e.g. ``test_seen.jsonl``) and is
recorded in the arrow schema metadata (``mdpl.source_file``). No augmentation source is read (D-1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from mdpl.data.registry import dataset_spec
from mdpl.data.writers.common import (BAD_JSONL, ImageFile, SkipSample, SplitPlan, SplitReport, decode_utf8,
                                      parse_json, require_dir, write_splits)
from mdpl.errors import UserInputError

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("text", pa.list_(pa.string())),
    ("label", pa.int64()),
    ("split", pa.string()),
])
#: jsonl split -> contract split name (the jsonl split is what the ``split`` column stores).
SPLIT_KEYS = {"train": "train", "dev": "val", "test": "test"}
DEFAULT_FILES = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}


def find_layout(root: Path, files: dict[str, str]) -> Path:
    """Return the folder holding the jsonl files: ``root/data`` (writer layout) or ``root`` (DATA.md)."""
    root = require_dir(root, "Hateful Memes --root")
    candidates = [root / "data", root]
    for base in candidates:
        if all((base / f).is_file() for f in files.values()):
            return base
    for base in candidates:  # some files present: name the missing one
        present = [f for f in files.values() if (base / f).is_file()]
        if present:
            missing = [f"{s}: {base / f}" for s, f in files.items() if not (base / f).is_file()]
            raise UserInputError(f"Hateful Memes: missing split file(s) {'; '.join(missing)} "
                                    "(choose others with --train-file/--dev-file/--test-file)")
    raise UserInputError(f"Hateful Memes: no {', '.join(files.values())} in {root}/data or {root}; "
                            "see DATA.md for the raw layout")


def read_jsonl_lines(path: Path) -> list[tuple[int, bytes]]:
    """Non-blank lines of a jsonl file as (1-based line number, raw bytes)."""
    return [(i, line) for i, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]


def parse_line(raw: bytes, where: str) -> tuple[str, str, int]:
    """One jsonl line -> (img, text, label); any problem raises SkipSample naming file:line."""
    obj = parse_json(decode_utf8(raw, where), where, BAD_JSONL)
    if not isinstance(obj, dict):
        raise SkipSample(BAD_JSONL, where, "not a JSON object")
    img, text, label = obj.get("img"), obj.get("text"), obj.get("label")
    if not isinstance(img, str) or not isinstance(text, str):
        raise SkipSample(BAD_JSONL, where, "'img' and 'text' must be strings")
    if isinstance(label, bool) or label not in (0, 1):
        raise SkipSample(BAD_JSONL, where, f"'label' must be 0 or 1, got {label!r}")
    return img, text, int(label)


def _row_maker(base: Path, path: Path, split: str) -> Callable[[tuple[int, bytes]], dict]:
    def make_row(item: tuple[int, bytes]) -> dict:
        lineno, raw = item
        img, text, label = parse_line(raw, f"{path}:{lineno}")
        return {"image": ImageFile(base / img), "text": [text], "label": label,
                "split": split}
    return make_row


def build_plans(root: Path, files: dict[str, str] | None = None) -> list[SplitPlan]:
    """Validate the layout and return one plan per split (train, dev, test)."""
    files = {**DEFAULT_FILES, **{k: v for k, v in (files or {}).items() if v}}
    base = find_layout(Path(root), files)
    layout = "data/ (writer)" if base.name == "data" and base.parent == Path(root) else "flat (DATA.md)"
    plans = []
    for key, name in SPLIT_KEYS.items():
        path = base / files[key]
        meta = {"mdpl.source_file": str(path.relative_to(Path(root))), "mdpl.layout": layout}
        plans.append(SplitPlan(key, dataset_spec("hatememes").arrow_stem(name), read_jsonl_lines(path),
                               _row_maker(base, path, key), meta))
    return plans


def make_arrow(root: Path, out: Path, *, strict: bool = False, max_side: int | None = None,
               progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
               train_file: str | None = None, dev_file: str | None = None,
               test_file: str | None = None, workers: int = 1) -> list[SplitReport]:
    """Write ``hatememes_{train,dev,test}.arrow`` into ``out`` (docs/methods.md §1.2)."""
    files = {"train": train_file, "dev": dev_file, "test": test_file}
    return write_splits(build_plans(Path(root), files), Path(out), SCHEMA, "hatememes", strict=strict,
                        progress=progress, overwrite=overwrite, log=log, max_side=max_side, workers=workers)
