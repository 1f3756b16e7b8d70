"""Synthetic raw datasets (mdpl/data/synthetic.py): layouts, determinism, labels needing both modalities."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdpl.data import synthetic as syn
from mdpl.data.constants import MMIMDB_GENRES

SMALL = {"n_train": 12, "n_val": 6, "n_test": 6, "image_size": 32}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def has_colour(path: Path, colour: tuple[int, int, int], min_pixels: int = 12) -> bool:
    """Does the image contain a blob of (roughly) this saturated colour? (JPEG-tolerant)"""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    return int((np.abs(pixels - np.array(colour)).max(axis=-1) < 60).sum()) >= min_pixels


@pytest.mark.parametrize("dataset", syn.DATASETS)
def test_deterministic_for_a_seed(tmp_path, dataset):
    a = tree(syn.write_synthetic(dataset, tmp_path / "a", seed=1, **SMALL))
    b = tree(syn.write_synthetic(dataset, tmp_path / "b", seed=1, **SMALL))
    c = tree(syn.write_synthetic(dataset, tmp_path / "c", seed=2, **SMALL))
    assert a == b and a != c


def test_mmimdb_layouts_and_labels(tmp_path):
    for layout, img_dir, lab_dir in [("split", "images", "labels"), ("archive", "dataset", "dataset")]:
        root = syn.write_synthetic("mmimdb", tmp_path / layout, layout=layout, **SMALL)
        split = json.loads((root / "split.json").read_text())
        assert [len(split[k]) for k in ("train", "dev", "test")] == [12, 6, 6]
        ids = split["train"] + split["dev"] + split["test"]
        assert len(set(ids)) == 24 and all(len(i) == 7 and i.isdigit() for i in ids)
        metas = [json.loads((root / lab_dir / f"{i}.json").read_text()) for i in ids]
        assert all(Image.open(root / img_dir / f"{i}.jpeg").format == "JPEG" for i in ids)
    used = {g for m in metas for g in m["genres"]}
    assert used - {syn.MMIMDB_UNKNOWN_GENRE} <= set(MMIMDB_GENRES) and 2 < len(used) <= 5
    assert any(len(m["plot"]) > 1 for m in metas)  # several plots for some movies
    for i, m in zip(ids, metas):  # image genres drawn as shapes, text genres as keywords in every plot
        for genre, (_, colour) in syn.MMIMDB_IMAGE_GENRES.items():
            assert has_colour(root / "dataset" / f"{i}.jpeg", colour) == (genre in m["genres"])
        for genre, word in syn.MMIMDB_TEXT_GENRES.items():
            assert all((word in p.split()) == (genre in m["genres"]) for p in m["plot"])


def _food_oracles(root: Path) -> tuple[float, float, float]:
    """Accuracy of ideal image-only, text-only and both-modality rules on the synthetic food101 test."""
    texts = json.loads((root / "text.json").read_text())
    names = json.loads((root / "split.json").read_text())["train"]
    classes = list(syn.FOOD101_CLASSES)
    img_cls = {shape[1]: c for c, (shape, _) in syn.FOOD101_CLASSES.items() if shape}
    txt_cls = {word: c for c, (_, word) in syn.FOOD101_CLASSES.items() if word}
    hits = np.zeros(3)
    for name in names:
        cls = name.rsplit("_", 1)[0]
        path = root / "images" / "train" / cls / name
        from_img = [c for colour, c in img_cls.items() if has_colour(path, colour)]
        from_txt = [c for word, c in txt_cls.items() if word in texts[name].split()]
        group_img = from_img or list(txt_cls.values())  # image only: a text class -> guess among them
        group_txt = from_txt or list(img_cls.values())
        hits += [(cls == group_img[0]) if len(group_img) == 1 else 1 / len(group_img),
                 (cls == group_txt[0]) if len(group_txt) == 1 else 1 / len(group_txt),
                 cls == (from_img or from_txt)[0]]
        assert len(from_img) + len(from_txt) == 1 and cls in classes
    return tuple(hits / len(names))


def test_food101_needs_both_modalities_and_naming(tmp_path):
    root = syn.write_synthetic("food101", tmp_path / "f", n_train=30, n_val=6, n_test=6, image_size=32)
    img_acc, txt_acc, both_acc = _food_oracles(root)
    assert both_acc == 1.0 and img_acc < 0.8 and txt_acc < 0.8
    split = json.loads((root / "split.json").read_text())
    class_idx = json.loads((root / "class_idx.json").read_text())
    assert sorted(class_idx.values()) == list(range(6)) and list(class_idx) != sorted(class_idx)
    for s in ("train", "val", "test"):
        folder = "test" if s == "test" else "train"
        for name in split[s]:
            assert (root / "images" / folder / name.rsplit("_", 1)[0] / name).is_file()
    with open(root / "texts" / "train_titles.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows] == split["train"] + split["val"]
    assert all(r[2] == r[0].rsplit("_", 1)[0] and len(r) == 3 for r in rows)
    csv_only = syn.write_synthetic("food101", tmp_path / "c", layout="csv", **SMALL)
    assert not (csv_only / "text.json").exists() and (csv_only / "texts" / "test_titles.csv").is_file()


@pytest.mark.parametrize("layout,base", [("data", "data"), ("flat", ".")])
def test_hatememes_layout_and_labels(tmp_path, layout, base):
    root = syn.write_synthetic("hatememes", tmp_path / layout, layout=layout, n_train=40, n_val=4, n_test=4,
                               image_size=32)
    rows = [json.loads(line) for line in (root / base / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["label"] for r in rows} == {0, 1} and sum(r["label"] for r in rows) == 20
    signals = []
    for r in rows:
        img_sig = has_colour(root / base / r["img"], syn.HATEMEMES_IMAGE_SIGNAL[1])
        txt_sig = syn.HATEMEMES_TEXT_SIGNAL in r["text"].split()
        assert r["label"] == int(img_sig or txt_sig) and not (img_sig and txt_sig)
        assert Image.open(root / base / r["img"]).format == "PNG"
        signals.append((img_sig, txt_sig))
    assert sum(i for i, _ in signals) == 10 and sum(t for _, t in signals) == 10  # positives: half image, half text
    assert (root / base / "dev.jsonl").is_file() and (root / base / "test.jsonl").is_file()


def test_wordpiece_vocab_tokenizes_every_text(tmp_path):
    from transformers import BertTokenizerFast

    vocab = syn.write_wordpiece_vocab(tmp_path / "tok" / "vocab.txt")
    lines = vocab.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and set(syn.SYNTHETIC_WORDS) <= set(lines)
    tok = BertTokenizerFast.from_pretrained(str(vocab.parent))  # offline: folder holding vocab.txt
    root = syn.write_synthetic("food101", tmp_path / "f", **SMALL)
    texts = list(json.loads((root / "text.json").read_text()).values())
    enc = tok(texts, padding="max_length", max_length=24, truncation=True)
    assert tok.pad_token_id == 0 and all(tok.unk_token_id not in ids for ids in enc["input_ids"])
    assert enc["input_ids"][0][0] == tok.cls_token_id


def test_cli_and_errors(tmp_path, capsys):
    syn.main(["--dataset", "hatememes", "--root", str(tmp_path / "h"), "--n-train", "4", "--n-val", "2",
              "--n-test", "2", "--image-size", "24", "--vocab", str(tmp_path / "vocab.txt")])
    assert len((tmp_path / "h" / "data" / "train.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "vocab.txt").is_file() and "wrote synthetic hatememes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        syn.main(["--dataset", "mmimdb", "--root", str(tmp_path / "m"), "--layout", "csv"])
    with pytest.raises(ValueError, match="unknown dataset"):
        syn.write_synthetic("cifar", tmp_path / "x")


@pytest.mark.parametrize("dataset", syn.DATASETS)
def test_keyword_repeats(tmp_path, dataset):
    """keyword_repeats=3 writes each text keyword 3 times; 1 (the default) leaves the data byte for byte as it was."""
    keywords = set(syn._KEYWORDS)

    def counts(root: Path) -> set[int]:
        texts = [p.read_text() for p in root.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
        words = " ".join(texts).replace('"', " ").replace(",", " ").split()
        return {words.count(k) for k in keywords if k in words}

    one = syn.write_synthetic(dataset, tmp_path / "one", **SMALL)
    assert tree(one) == tree(syn.write_synthetic(dataset, tmp_path / "default", keyword_repeats=1, **SMALL))
    three = syn.write_synthetic(dataset, tmp_path / "three", keyword_repeats=3, **SMALL)
    if dataset == "food101":
        texts = json.loads((three / "text.json").read_text()).values()
        assert all(sum(t.split().count(k) for k in keywords) == 3 for t in texts)
        assert _food_oracles(three)[2] == 1.0
    assert counts(three) and all(n % 3 == 0 for n in counts(three))
    with pytest.raises(ValueError, match="keyword_repeats must be >= 1"):
        syn.write_synthetic(dataset, tmp_path / "zero", keyword_repeats=0, **SMALL)
