"""A dataset defined outside mdpl (tests/test_plugins.py installs this file as a plugin): 4 classes of coloured
images with a class word in the text. Raw layout: ``<root>/<split>.jsonl`` (one ``{"image", "text", "label"}`` per
line, images under ``<root>/images/``); ``write_synthetic`` writes it, ``make_arrow`` converts it."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa

from mdpl.data.registry import SPLITS, DatasetSpec, dataset_spec, register_dataset
from mdpl.data.writers.common import ImageFile, SplitPlan, write_splits

NAME = "toyshapes"
CLASSES = ("circle", "square", "star", "ring")
SCHEMA = pa.schema([("image", pa.binary()), ("text", pa.list_(pa.string())), ("label", pa.int64()),
                    ("image_id", pa.string()), ("split", pa.string())])


def write_synthetic(root: Path, counts: dict[str, int], rng: random.Random, size: int, layout: str) -> None:
    """`counts[split]` items per split, classes in turn; the class word appears in every text."""
    from mdpl.data.synthetic import draw_image, make_text   # mdpl.data.synthetic lists the datasets as it loads

    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                label = i % len(CLASSES)
                name = f"{split}_{i}.jpg"
                draw_image(rng, size, []).save(root / "images" / name, "JPEG", quality=90)
                fh.write(json.dumps({"image": name, "text": make_text(rng, [CLASSES[label]]), "label": label}) + "\n")


def _plan(root: Path, split: str) -> SplitPlan:
    items = [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]

    def make_row(item: dict[str, Any]) -> dict[str, Any]:
        return {"image": ImageFile(root / "images" / item["image"]), "text": [item["text"]],
                "label": int(item["label"]), "image_id": item["image"], "split": split}
    return SplitPlan(split, dataset_spec(NAME).arrow_stem(split), items, make_row)


def make_arrow(root: Path, out: Path, **options: Any) -> list:
    """``toyshapes_{train,val,test}.arrow`` from the raw layout."""
    return write_splits([_plan(Path(root), s) for s in SPLITS], Path(out), SCHEMA, NAME, **options)


register_dataset(DatasetSpec(
    name=NAME, num_classes=len(CLASSES), class_names=CLASSES, schema=SCHEMA, writer=make_arrow,
    synthetic=write_synthetic, synthetic_layouts=("jsonl",), max_text_len=40, max_epoch=10, val_check_interval=1.0,
    nominal_sizes=(24, 8, 16)))
