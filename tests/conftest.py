"""Shared pytest fixtures: tiny Arrow splits (docs/methods.md §1.2 schemas, real JPEG/PNG bytes), a tiny BERT
WordPiece vocabulary and a base config dict. Generic on purpose: every test file may use them.

* ``bert_vocab_dir`` -> folder with vocab.txt ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then words).
* ``arrow_root(dataset, rows=(6, 4, 4), mmimdb_plots=None)`` -> folder with the three ``<stem>.arrow``
  files of ``dataset`` (cached per argument set for the session).
* ``data_config(dataset, root, vocab_dir, **overrides)`` -> a plain config dict for MDPLDataModule.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mdpl.data.constants import ARROW_SPLITS, MMIMDB_GENRES, NUM_CLASSES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "of", "and", "to", "in", "is", "movie", "film", "man", "woman", "love", "war", "story",
         "life", "young", "family", "world", "new", "city", "food", "pizza", "cake", "soup", "salad", "with",
         "chocolate", "apple", "pie", "meme", "cat", "dog", "hate", "funny", "good", "bad", "his", "her",
         "finds", "##s", "##ing", "##ed", ".", ",", "!", "'"]
VOCAB = SPECIAL_TOKENS + WORDS

_SCHEMAS = {
    "mmimdb": pa.schema([("image", pa.binary()), ("plots", pa.list_(pa.string())), ("label", pa.list_(pa.int64())),
                         ("genres", pa.list_(pa.string())), ("image_id", pa.string()), ("split", pa.string())]),
    "food101": pa.schema([("image", pa.binary()), ("text", pa.list_(pa.string())), ("label", pa.int64()),
                          ("image_id", pa.string()), ("split", pa.string())]),
    "hatememes": pa.schema([("image", pa.binary()), ("text", pa.list_(pa.string())), ("label", pa.int64()),
                            ("split", pa.string())]),
}
#: (width, height) cycled over rows: several aspect ratios, incl. portrait posters and very wide images.
IMAGE_SIZES = [(64, 96), (120, 80), (50, 50), (200, 60), (70, 110)]


def image_bytes(width: int, height: int, fmt: str, seed: int) -> bytes:
    """Real encoded image bytes (random RGB noise) made with PIL."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS[:38], size=n))


def make_rows(dataset: str, split: str, n: int, mmimdb_plots: list[int] | None = None) -> dict:
    """Column dict of ``n`` synthetic rows in the §1.2 schema of ``dataset``."""
    rng = np.random.default_rng(zlib.crc32(f"{dataset}/{split}/{n}".encode()))
    fmt = "PNG" if dataset == "hatememes" else "JPEG"
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(n)]
    cols: dict = {"image": [image_bytes(w, h, fmt, seed=i) for i, (w, h) in enumerate(sizes)]}
    if dataset == "mmimdb":
        plots = mmimdb_plots or [1 + (i % 3) for i in range(n)]
        cols["plots"] = [[_sentence(rng, 5 + 3 * k) for k in range(plots[i])] for i in range(n)]
        hot = (rng.random((n, NUM_CLASSES["mmimdb"])) < 0.2).astype(np.int64)
        hot[np.arange(n), np.arange(n) % NUM_CLASSES["mmimdb"]] = 1
        cols["label"] = hot.tolist()
        cols["genres"] = [[g for g, h in zip(MMIMDB_GENRES, row) if h] for row in hot]
        cols["image_id"] = [f"{i:07d}" for i in range(n)]
    else:
        cols["text"] = [[_sentence(rng, 4 + i % 5)] for i in range(n)]
        cols["label"] = [int(i % NUM_CLASSES[dataset]) for i in range(n)]
        if dataset == "food101":
            cols["image_id"] = [f"apple_pie_{i}.jpg" for i in range(n)]
    cols["split"] = [split] * n
    return cols


def write_arrow(path: Path, schema: pa.Schema, cols: dict) -> None:
    """Write one Arrow IPC *file* (two record batches when possible, to exercise chunked reads)."""
    table = pa.Table.from_pydict(cols, schema=schema)
    with pa.ipc.new_file(str(path), schema) as writer:
        half = max(1, table.num_rows // 2)
        for batch in table.to_batches(max_chunksize=half):
            writer.write_batch(batch)


@pytest.fixture(scope="session")
def bert_vocab_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def arrow_root(tmp_path_factory):
    """Factory: ``arrow_root(dataset, rows=(train, val, test), mmimdb_plots=None) -> Path``."""
    cache: dict = {}

    def make(dataset: str, rows: tuple[int, int, int] = (6, 4, 4), mmimdb_plots: tuple | None = None) -> Path:
        key = (dataset, tuple(rows), tuple(mmimdb_plots) if mmimdb_plots else None)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"arrow_{dataset}")
            for (split, stem), n in zip(ARROW_SPLITS[dataset].items(), rows):
                plots = list(mmimdb_plots) if mmimdb_plots and split == "train" else None
                write_arrow(root / f"{stem}.arrow", _SCHEMAS[dataset], make_rows(dataset, split, n, plots))
            cache[key] = root
        return cache[key]

    return make


@pytest.fixture
def data_config():
    """Factory: base config dict for the data pipeline (ViLT defaults, tiny sizes) with overrides."""

    def make(dataset: str, root: Path, vocab_dir: Path | None = None, **overrides) -> dict:
        cfg = {
            "dataset": dataset, "data_root": str(root), "num_workers": 0, "per_gpu_batchsize": 4,
            "batch_size": 4, "image_size": 64, "max_image_len": -1, "max_text_len": 16,
            "tokenizer": str(vocab_dir) if vocab_dir else "", "vocab_size": len(VOCAB), "mmimdb_items": "plot",
            "missing_ratio": {"train": 0.5, "val": 0.5, "test": 0.5},
            "missing_type": {"train": "both", "val": "both", "test": "both"}, "both_ratio": 0.5,
            "missing_table_root": str(Path(root) / "missing_tables"), "simulate_missing": False,
            "test_ratio": None, "test_type": None, "backbone": "vilt", "patch_size": 32, "seed": 0,
        }
        cfg.update(overrides)
        return cfg

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
