"""MM-IMDb raw layout -> ``mmimdb_{train,dev,test}.arrow`` (docs/methods.md §1.1-1.2).

Raw layout (either):
* ``root/split.json`` + ``root/images/<id>.jpeg`` + ``root/labels/<id>.json`` (reference writer), or
* ``root/split.json`` + ``root/dataset/<id>.jpeg`` + ``root/dataset/<id>.json`` (original archive).

Each label json holds ``plot`` (list of strings; all are kept) and ``genres`` (list of names). The
label is the 23-genre multi-hot in the fixed order ``MMIMDB_GENRES``; unknown genres are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from mdpl.data.registry import MMIMDB_GENRES, dataset_spec
from mdpl.data.writers.common import (MALFORMED_JSON, NO_TEXT, ImageFile, SkipSample, SplitPlan, SplitReport,
                                      load_json_file, parse_json, read_text_file, require_dir, write_splits)
from mdpl.errors import UserInputError

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("plots", pa.list_(pa.string())),
    ("label", pa.list_(pa.int64())),
    ("genres", pa.list_(pa.string())),
    ("image_id", pa.string()),
    ("split", pa.string()),
])
#: split.json key -> contract split name (the key is also what the ``split`` column stores).
SPLIT_KEYS = {"train": "train", "dev": "val", "test": "test"}
_GENRE_INDEX = {g: i for i, g in enumerate(MMIMDB_GENRES)}


def genre_multi_hot(genres: list[str]) -> list[int]:
    """23-dim multi-hot in ``MMIMDB_GENRES`` order; genres outside the list are ignored (§1.1)."""
    label = [0] * len(MMIMDB_GENRES)
    for g in genres:
        if g in _GENRE_INDEX:
            label[_GENRE_INDEX[g]] = 1
    return label


def find_layout(root: Path) -> tuple[Path, Path]:
    """Return (image_dir, label_dir) for the split-folder or the single-folder (archive) layout."""
    root = require_dir(root, "MM-IMDb --root")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return root / "images", root / "labels"
    if (root / "dataset").is_dir():
        return root / "dataset", root / "dataset"
    raise UserInputError(f"MM-IMDb: expected {root}/images + {root}/labels or {root}/dataset "
                            "(the original archive folder); see DATA.md")


def read_label_json(path: Path) -> tuple[list[str], list[str]]:
    """Parse one movie json -> (plots, genres); problems raise SkipSample naming the file."""
    meta = parse_json(read_text_file(path), path)
    if not isinstance(meta, dict) or "plot" not in meta or "genres" not in meta:
        raise SkipSample(MALFORMED_JSON, path, "expected an object with 'plot' and 'genres'")
    plots, genres = meta["plot"], meta["genres"]
    plots = [plots] if isinstance(plots, str) else plots
    if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
        raise SkipSample(MALFORMED_JSON, path, "'plot' must be a list of strings")
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        raise SkipSample(MALFORMED_JSON, path, "'genres' must be a list of strings")
    if not plots:
        raise SkipSample(NO_TEXT, path, "empty 'plot' list")
    return plots, genres


def load_split_ids(root: Path) -> dict[str, list[str]]:
    """``root/split.json`` -> {'train'|'dev'|'test': [movie ids]}."""
    what = "MM-IMDb split.json (lists the train/dev/test movie ids; shipped with the reference repos)"
    splits = load_json_file(Path(root) / "split.json", what)
    missing = [k for k in SPLIT_KEYS if not isinstance(splits, dict) or not isinstance(splits.get(k), list)]
    if missing:
        raise UserInputError(f"MM-IMDb: {root}/split.json lacks the id list(s) {missing}")
    return {k: [str(i) for i in splits[k]] for k in SPLIT_KEYS}


def _row_maker(image_dir: Path, label_dir: Path, split: str) -> Callable[[str], dict]:
    def make_row(movie_id: str) -> dict:
        plots, genres = read_label_json(label_dir / f"{movie_id}.json")
        image = ImageFile(image_dir / f"{movie_id}.jpeg")
        return {"image": image, "plots": plots, "label": genre_multi_hot(genres), "genres": genres,
                "image_id": movie_id, "split": split}
    return make_row


def build_plans(root: Path) -> list[SplitPlan]:
    """Validate the layout and return one plan per split (train, dev, test)."""
    image_dir, label_dir = find_layout(Path(root))
    ids = load_split_ids(root)
    return [SplitPlan(key, dataset_spec("mmimdb").arrow_stem(name), ids[key],
                      _row_maker(image_dir, label_dir, key),
                      {"mdpl.layout": "archive" if image_dir == label_dir else "images+labels"})
            for key, name in SPLIT_KEYS.items()]


def make_arrow(root: Path, out: Path, *, strict: bool = False, max_side: int | None = None,
               progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
               workers: int = 1) -> list[SplitReport]:
    """Write ``mmimdb_{train,dev,test}.arrow`` into ``out`` (docs/methods.md §1.2)."""
    return write_splits(build_plans(Path(root)), Path(out), SCHEMA, "mmimdb", strict=strict, progress=progress,
                        overwrite=overwrite, log=log, max_side=max_side, workers=workers)
