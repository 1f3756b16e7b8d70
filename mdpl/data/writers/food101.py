"""UPMC Food-101 raw layout -> ``food101_{train,val,test}.arrow`` (docs/methods.md §1.1-1.2, D-5).

Raw layout: ``root/images/{train,test}/<class>/<class>_<n>.jpg`` plus either the three reference
json files (``text.json`` name -> title, ``split.json`` train/val/test -> names, ``class_idx.json``
class -> index, copied verbatim) or the official CSVs ``root/texts/{train,test}_titles.csv`` (rows
``image_file_name,text,class``, no header) from which the missing json content is derived:
text = the CSV titles, split = a seeded ``val_fraction`` share of the train CSV as val, the test CSV as
test, class_idx = sorted class names. The class of an image is its file name up to the last
underscore; ``val`` images are read from ``images/train`` (reference rule). Names without a text
are skipped and reported.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from mdpl.data.registry import dataset_spec
from mdpl.data.writers.common import (NON_UTF8, NO_TEXT, UNKNOWN_CLASS, MALFORMED_JSON, ImageFile, SkipSample,
                                      SplitPlan, SplitReport, load_json_file, require_dir, write_splits)
from mdpl.errors import UserInputError

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("text", pa.list_(pa.string())),
    ("label", pa.int64()),
    ("image_id", pa.string()),
    ("split", pa.string()),
])
SPLITS = ("train", "val", "test")
CSV_FILES = {"train": "texts/train_titles.csv", "test": "texts/test_titles.csv"}


@dataclass
class Food101Meta:
    """The content of text.json / split.json / class_idx.json (loaded or derived) and its sources."""

    texts: dict[str, "str | SkipSample"]
    splits: dict[str, list[str]]
    class_idx: dict[str, int]
    sources: dict[str, str]


def class_from_filename(name: str) -> str:
    """Reference rule: the class is the file name up to its last underscore (``hot_dog_12.jpg``)."""
    return name.rsplit("_", 1)[0]


def read_titles_csv(path: Path) -> list[tuple[str, "str | SkipSample"]]:
    """Rows of an official ``*_titles.csv`` -> [(image file name, title or SkipSample)].

    Rows are ``image_file_name,text,class`` without header (a header row is tolerated); extra commas
    in an unquoted title are kept in the title. Non-UTF-8 titles become a SkipSample naming file:line.
    """
    rows: list[tuple[str, str | SkipSample]] = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        for fields in reader:
            if not fields or not fields[0].strip():
                continue
            name = fields[0].strip()
            if reader.line_num == 1 and not name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue  # header row
            text = ",".join(fields[1:-1]) if len(fields) >= 3 else (fields[1] if len(fields) == 2 else None)
            if text is None:
                rows.append((name, SkipSample(NO_TEXT, f"{path}:{reader.line_num}", "row has no title")))
            elif any("\udc80" <= ch <= "\udcff" for ch in text):
                rows.append((name, SkipSample(NON_UTF8, f"{path}:{reader.line_num}", f"title of {name}")))
            else:
                rows.append((name, text))
    return rows


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def split_train_val(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the train CSV names; both parts keep the CSV order."""
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    val = set(order[: round(len(names) * val_fraction)])
    return ([n for i, n in enumerate(names) if i not in val], [n for i, n in enumerate(names) if i in val])


def load_meta(root: Path, val_fraction: float = 0.1, seed: int = 0) -> Food101Meta:
    """Load the json files of ``root``; derive the missing ones from ``root/texts/*_titles.csv``."""
    have = {n: (root / n).is_file() for n in ("text.json", "split.json", "class_idx.json")}
    csv_paths = {k: root / v for k, v in CSV_FILES.items()}
    csv_ok = all(p.is_file() for p in csv_paths.values())
    if not (have["text.json"] and have["split.json"]) and not csv_ok:
        absent = [n for n in ("text.json", "split.json") if not have[n]]
        raise UserInputError(
            f"Food-101: {', '.join(str(root / n) for n in absent)} not found and no "
            f"{root}/texts/train_titles.csv + test_titles.csv to derive it from; see DATA.md")
    sources: dict[str, str] = {}
    csv_rows = {k: read_titles_csv(p) for k, p in csv_paths.items()} if csv_ok else {}

    if have["text.json"]:
        raw = load_json_file(root / "text.json", "Food-101 text.json")
        if not isinstance(raw, dict):
            raise UserInputError(f"Food-101: {root}/text.json must map image file names to titles")
        texts: dict[str, str | SkipSample] = raw
        sources["mdpl.text_source"] = "text.json"
    else:
        texts = {}
        for rows in csv_rows.values():
            for name, text in rows:
                texts.setdefault(name, text)
        sources["mdpl.text_source"] = ",".join(CSV_FILES.values())

    if have["split.json"]:
        splits = load_json_file(root / "split.json", "Food-101 split.json")
        if not isinstance(splits, dict) or any(not isinstance(splits.get(s), list) for s in SPLITS):
            raise UserInputError(f"Food-101: {root}/split.json must hold lists 'train', 'val' and 'test'")
        splits = {s: [str(n) for n in splits[s]] for s in SPLITS}
        sources["mdpl.split_source"] = "split.json"
    else:
        train, val = split_train_val(_dedupe([n for n, _ in csv_rows["train"]]), val_fraction, seed)
        splits = {"train": train, "val": val, "test": _dedupe([n for n, _ in csv_rows["test"]])}
        sources["mdpl.split_source"] = f"texts/train_titles.csv (val_fraction={val_fraction}, seed={seed})"

    if have["class_idx.json"]:
        class_idx = load_json_file(root / "class_idx.json", "Food-101 class_idx.json")
        if not isinstance(class_idx, dict) or not all(isinstance(v, int) for v in class_idx.values()):
            raise UserInputError(f"Food-101: {root}/class_idx.json must map class names to integers")
        sources["mdpl.class_idx_source"] = "class_idx.json"
    else:
        names = sorted({class_from_filename(n) for s in SPLITS for n in splits[s]})
        class_idx = {c: i for i, c in enumerate(names)}
        sources["mdpl.class_idx_source"] = "sorted class names"
    return Food101Meta(texts, splits, class_idx, sources)


def _text_of(meta: Food101Meta, name: str) -> list[str]:
    text = meta.texts.get(name)
    if isinstance(text, SkipSample):
        raise text
    if text is None:
        raise SkipSample(NO_TEXT, name, "not in text.json / the titles CSV")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise SkipSample(MALFORMED_JSON, name, "text.json value must be a string")
    return [text]


def _row_maker(root: Path, meta: Food101Meta, split: str) -> Callable[[str], dict]:
    folder = root / "images" / ("test" if split == "test" else "train")  # val reads images/train (§1.1)

    def make_row(name: str) -> dict:
        cls = class_from_filename(name)
        if cls not in meta.class_idx:
            raise SkipSample(UNKNOWN_CLASS, name, f"class {cls!r} not in class_idx")
        text = _text_of(meta, name)
        image = ImageFile(folder / cls / name)
        return {"image": image, "text": text, "label": int(meta.class_idx[cls]), "image_id": name,
                "split": split}
    return make_row


def build_plans(root: Path, val_fraction: float = 0.1, seed: int = 0) -> list[SplitPlan]:
    """Validate the layout and return one plan per split (train, val, test)."""
    root = require_dir(root, "Food-101 --root")
    require_dir(root / "images", "Food-101 images")
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"Food-101: --val-fraction must be in [0, 1), got {val_fraction}")
    meta = load_meta(root, val_fraction, seed)
    return [SplitPlan(s, dataset_spec("food101").arrow_stem(s), meta.splits[s], _row_maker(root, meta, s),
                      dict(meta.sources)) for s in SPLITS]


def make_arrow(root: Path, out: Path, *, strict: bool = False, max_side: int | None = None,
               progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
               val_fraction: float = 0.1, seed: int = 0, workers: int = 1) -> list[SplitReport]:
    """Write ``food101_{train,val,test}.arrow`` into ``out`` (docs/methods.md §1.2)."""
    plans = build_plans(Path(root), val_fraction, seed)
    return write_splits(plans, Path(out), SCHEMA, "food101", strict=strict, progress=progress,
                        overwrite=overwrite, log=log, max_side=max_side, workers=workers)
