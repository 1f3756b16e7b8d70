"""Tiny synthetic datasets in the real raw layouts (docs/methods.md §1.1), for tests and the demo.

Labels depend on both modalities: some classes (genres, the positive class) are signalled only by a
coloured shape drawn in the image, others only by a keyword in the text; the remaining content (muted
background, grey distractor dots, filler words) is noise. A model seeing both modalities can reach
100 % accuracy; with one modality missing it cannot tell apart the classes signalled by the other.
``keyword_repeats`` puts each text keyword that many times into its text (1 by default): a stronger text signal
that a tiny model trained on complete data learns next to the image one (the demo's, docs/getting-started.md).

* mmimdb: ``split.json`` + ``images/<id>.jpeg`` + ``labels/<id>.json`` (or the archive's ``dataset/``),
  23-genre vocabulary with 4 genres used (+ an unknown one that the writer must ignore), 1-3 plots.
* food101: ``images/{train,test}/<class>/<class>_<n>.jpg`` + ``text.json``/``split.json``/
  ``class_idx.json`` and/or ``texts/{train,test}_titles.csv``; 6 real class names.
* hatememes: ``data/{train,dev,test}.jsonl`` + ``data/img/<id>.png`` (or the flat DATA.md layout).

CLI: ``python -m mdpl.data.synthetic --dataset food101 --root /tmp/raw_food101``.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from mdpl.data.registry import BUILTIN_DATASETS, available_datasets, dataset_spec

Shape = tuple[str, tuple[int, int, int]]  # (shape name, RGB colour)

FILLER_WORDS = [
    "the", "a", "with", "and", "of", "on", "in", "for", "this", "that", "very", "some", "old", "new",
    "big", "small", "good", "nice", "plain", "simple", "fresh", "home", "style", "made", "day", "night",
    "story", "people", "city", "house", "friend", "family", "recipe", "picture", "look", "best",
]
#: food101 classes in the real naming scheme; (image signal or None, text keyword or None).
FOOD101_CLASSES = {
    "apple_pie": (("circle", (220, 30, 30)), None),
    "baby_back_ribs": (("square", (30, 170, 40)), None),
    "caesar_salad": (("triangle", (30, 60, 220)), None),
    "fish_and_chips": (None, "crispy"),
    "hot_dog": (None, "grilled"),
    "ice_cream": (None, "frozen"),
}
_FOOD_NEUTRAL_SHAPE: Shape = ("diamond", (240, 240, 240))
_FOOD_NEUTRAL_WORD = "tasty"
#: mmimdb genres used: image-signalled (shape) and text-signalled (keyword) ones.
MMIMDB_IMAGE_GENRES = {"Drama": ("circle", (220, 30, 30)), "Comedy": ("square", (30, 60, 220))}
MMIMDB_TEXT_GENRES = {"Horror": "ghost", "Action": "explosion"}
MMIMDB_UNKNOWN_GENRE = "Reality-TV"  # not among the 23: the writer ignores it
#: hatememes: the positive class is signalled by the image OR by the text.
HATEMEMES_IMAGE_SIGNAL: Shape = ("triangle", (220, 30, 30))
HATEMEMES_TEXT_SIGNAL = "awful"

_KEYWORDS = [w for _, w in FOOD101_CLASSES.values() if w] + [_FOOD_NEUTRAL_WORD, HATEMEMES_TEXT_SIGNAL,
                                                             *MMIMDB_TEXT_GENRES.values()]
#: every word the synthetic texts use (build a test WordPiece vocab from these).
SYNTHETIC_WORDS: list[str] = sorted(set(FILLER_WORDS + _KEYWORDS))
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def synthetic_datasets() -> list[str]:
    """Registered datasets with a synthetic generator (their spec's ``synthetic``, mdpl/data/registry.py)."""
    return [name for name in available_datasets() if dataset_spec(name).synthetic is not None]


def layouts_of(dataset: str) -> tuple[str, ...]:
    """The raw layouts the generator of ``dataset`` writes, the default first (``('default',)`` if unnamed)."""
    return dataset_spec(dataset).synthetic_layouts or ("default",)


#: read-only views of the built-in datasets (backward compatibility; new code calls the functions above).
DATASETS = BUILTIN_DATASETS
LAYOUTS = {name: layouts_of(name) for name in DATASETS}


def write_wordpiece_vocab(path: Path) -> Path:
    """Write a BERT-style vocab.txt ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the words).

    Load it offline with ``BertTokenizerFast.from_pretrained(str(path.parent))`` (transformers 5).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(SPECIAL_TOKENS + SYNTHETIC_WORDS) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------- primitives
def draw_image(rng: random.Random, size: int, shapes: Sequence[Shape]) -> Image.Image:
    """Muted random background, a few grey distractor dots, and each shape at a random place."""
    w, h = size, max(8, round(size * rng.uniform(0.75, 1.25)))
    bg = tuple(rng.randint(100, 150) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y, r, g = rng.randrange(w), rng.randrange(h), max(1, size // 16), rng.randint(40, 90)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(g, g, g))
    for name, colour in shapes:
        r = rng.uniform(0.15, 0.22) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(draw, name, colour, cx, cy, r)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, colour: tuple, cx: float, cy: float, r: float) -> None:
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {name!r}")


def make_text(rng: random.Random, keywords: Sequence[str], n_words: tuple[int, int] = (6, 12)) -> str:
    """Filler words with each keyword inserted at a random position (lower case, no punctuation)."""
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(*n_words))]
    for k in keywords:
        words.insert(rng.randint(0, len(words)), k)
    return " ".join(words)


def _balanced(rng: random.Random, n: int, k: int) -> list[int]:
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    return labels


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


# ------------------------------------------------------------------------------------------ mmimdb
def _write_mmimdb(root: Path, counts: dict[str, int], rng: random.Random, size: int, layout: str,
                  keyword_repeats: int = 1) -> None:
    image_dir = root / ("dataset" if layout == "archive" else "images")
    label_dir = root / ("dataset" if layout == "archive" else "labels")
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    genres_all = [*MMIMDB_IMAGE_GENRES, *MMIMDB_TEXT_GENRES]
    splits, next_id = {}, 100
    for split, n in counts.items():
        ids = []
        for _ in range(n):
            movie_id, next_id = f"{next_id:07d}", next_id + 1
            genres = [g for g in genres_all if rng.random() < 0.4] or [rng.choice(genres_all)]
            shapes = [MMIMDB_IMAGE_GENRES[g] for g in genres if g in MMIMDB_IMAGE_GENRES]
            keywords = [MMIMDB_TEXT_GENRES[g] for g in genres if g in MMIMDB_TEXT_GENRES] * keyword_repeats
            plots = [make_text(rng, keywords, (10, 20)) for _ in range(rng.choice((1, 1, 2, 3)))]
            if rng.random() < 0.2:
                genres.append(MMIMDB_UNKNOWN_GENRE)
            draw_image(rng, size, shapes).save(image_dir / f"{movie_id}.jpeg", format="JPEG", quality=90)
            _write_json(label_dir / f"{movie_id}.json", {"title": f"movie {movie_id}", "plot": plots, "genres": genres})
            ids.append(movie_id)
        splits[split] = ids
    _write_json(root / "split.json", {"train": splits["train"], "dev": splits["val"], "test": splits["test"]})


# ----------------------------------------------------------------------------------------- food101
def _write_food101(root: Path, counts: dict[str, int], rng: random.Random, size: int, layout: str,
                   keyword_repeats: int = 1) -> None:
    classes = list(FOOD101_CLASSES)
    serial = {c: 0 for c in classes}
    names: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for split, n in counts.items():
        folder = root / "images" / ("test" if split == "test" else "train")
        names[split] = []
        for label in _balanced(rng, n, len(classes)):
            cls = classes[label]
            image_sig, word = FOOD101_CLASSES[cls]
            name = f"{cls}_{serial[cls]}.jpg"
            serial[cls] += 1
            (folder / cls).mkdir(parents=True, exist_ok=True)
            draw_image(rng, size, [image_sig or _FOOD_NEUTRAL_SHAPE]).save(folder / cls / name, "JPEG", quality=90)
            texts[name] = make_text(rng, [word or _FOOD_NEUTRAL_WORD] * keyword_repeats)
            names[split].append(name)
    if layout in ("both", "json"):
        _write_json(root / "text.json", texts)
        _write_json(root / "split.json", names)
        _write_json(root / "class_idx.json", {c: i for i, c in enumerate(reversed(classes))})  # not sorted (§1.1)
    if layout in ("both", "csv"):
        for csv_split, members in (("train", names["train"] + names["val"]), ("test", names["test"])):
            path = root / "texts" / f"{csv_split}_titles.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as fh:
                csv.writer(fh).writerows((n, texts[n], n.rsplit("_", 1)[0]) for n in members)


# --------------------------------------------------------------------------------------- hatememes
def _write_hatememes(root: Path, counts: dict[str, int], rng: random.Random, size: int, layout: str,
                     keyword_repeats: int = 1) -> None:
    base = root / "data" if layout == "data" else root
    (base / "img").mkdir(parents=True, exist_ok=True)
    next_id = 10000
    for split, n in counts.items():
        lines = []
        for case in _balanced(rng, n, 4):  # 0,1 negative; 2 positive via image; 3 positive via text
            meme_id, next_id = next_id, next_id + 1
            shapes = [HATEMEMES_IMAGE_SIGNAL] if case == 2 else []
            text = make_text(rng, [HATEMEMES_TEXT_SIGNAL] * keyword_repeats if case == 3 else [])
            draw_image(rng, size, shapes).save(base / "img" / f"{meme_id:05d}.png", format="PNG")
            lines.append(json.dumps({"id": meme_id, "img": f"img/{meme_id:05d}.png", "label": int(case >= 2),
                                     "text": text}))
        name = {"train": "train", "val": "dev", "test": "test"}[split]
        (base / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_synthetic(dataset: str, root: Path, n_train: int = 48, n_val: int = 12, n_test: int = 12,
                    seed: int = 0, image_size: int = 64, layout: str | None = None,
                    keyword_repeats: int = 1) -> Path:
    """Write a tiny ``dataset`` in its raw layout under ``root`` (deterministic for ``seed``).

    ``layout``: mmimdb 'split' (images/ + labels/, default) | 'archive' (dataset/); food101 'both'
    (json files + titles CSVs, default) | 'json' | 'csv' (CSV only: make_arrow derives the json content);
    hatememes 'data' (root/data/, default) | 'flat' (DATA.md layout); other registered datasets: their spec's
    ``synthetic_layouts``. The generator is the spec's ``synthetic``
    ``write(root, counts, rng, image_size, layout)``, given ``keyword_repeats=`` (each text keyword that many
    times, >= 1) only when it is not 1, so that generators without it keep working. Returns ``root``.
    """
    generator = dataset_spec(dataset).synthetic_fn() if dataset in synthetic_datasets() else None
    if generator is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(synthetic_datasets())}")
    layouts = layouts_of(dataset)
    layout = layout or layouts[0]
    if layout not in layouts:
        raise ValueError(f"unknown layout {layout!r} for {dataset}; choose one of {', '.join(layouts)}")
    if int(keyword_repeats) < 1:
        raise ValueError(f"keyword_repeats must be >= 1, got {keyword_repeats}")
    extra = {} if int(keyword_repeats) == 1 else {"keyword_repeats": int(keyword_repeats)}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    generator(root, counts, random.Random(f"{dataset}:{seed}"), image_size, layout, **extra)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mdpl.data.synthetic",
                                description="Write a tiny synthetic dataset in the raw layout make_arrow.py reads.")
    p.add_argument("--dataset", required=True, choices=synthetic_datasets())
    p.add_argument("--root", required=True, type=Path, help="output raw folder")
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-val", type=int, default=12)
    p.add_argument("--n-test", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="image width in pixels (height varies +-25%%)")
    p.add_argument("--layout", default=None, help="mmimdb: split|archive; food101: both|json|csv; hatememes: data|flat")
    p.add_argument("--keyword-repeats", type=int, default=1, help="each text keyword this many times (default 1)")
    p.add_argument("--vocab", type=Path, default=None,
                   help="also write a WordPiece vocab.txt of the synthetic words here")
    args = p.parse_args(argv)
    try:
        write_synthetic(args.dataset, args.root, args.n_train, args.n_val, args.n_test, args.seed,
                        args.image_size, args.layout, args.keyword_repeats)
    except ValueError as err:
        p.error(str(err))
    if args.vocab is not None:
        write_wordpiece_vocab(args.vocab)
    print(f"wrote synthetic {args.dataset} to {args.root}")


if __name__ == "__main__":
    main()
