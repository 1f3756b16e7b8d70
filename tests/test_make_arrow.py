"""Raw -> Arrow writers and the make_arrow.py CLI (docs/methods.md §1.1-1.2, defects D-3..D-6)."""
from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from mdpl.data.constants import ARROW_SPLITS, MMIMDB_GENRES
from mdpl.data.synthetic import write_synthetic
from mdpl.data.writers import StrictModeError, common, food101, hatememes, make_arrow, mmimdb
from mdpl.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
N = {"n_train": 6, "n_val": 3, "n_test": 4, "image_size": 40}


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_arrow_cli", REPO / "make_arrow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def read_arrow(path: Path) -> pa.Table:
    """Open as an Arrow IPC *file* (random access), as the datasets do (§1.2)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def arrow_files(out: Path, dataset: str) -> dict[str, Path]:
    return {split: out / f"{stem}.arrow" for split, stem in ARROW_SPLITS[dataset].items()}


def assert_no_leftovers(out: Path) -> None:
    """Nothing but finished .arrow files (no temp, no partial) in the output folder."""
    if out.exists():
        assert [p.name for p in out.iterdir() if not p.name.endswith(".arrow") or p.name.startswith(".")] == []


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """One synthetic raw folder per (dataset, layout), written once; tests copy before mutating."""
    cache: dict[tuple[str, str | None], Path] = {}

    def get(dataset: str, layout: str | None = None) -> Path:
        if (dataset, layout) not in cache:
            root = tmp_path_factory.mktemp(f"{dataset}_{layout}")
            cache[(dataset, layout)] = write_synthetic(dataset, root, layout=layout, **N)
        return cache[(dataset, layout)]
    return get


@pytest.fixture
def raw_copy(raw, tmp_path):
    def get(dataset: str, layout: str | None = None) -> Path:
        dst = tmp_path / "raw"
        shutil.copytree(raw(dataset, layout), dst)
        return dst
    return get


def run_writer(dataset: str, root: Path, out: Path, **kw):
    lines: list[str] = []
    reports = make_arrow(dataset, root, out, progress=False, log=lines.append, **kw)
    return reports, "\n".join(lines)


# --------------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("layout", ["split", "archive"])
def test_mmimdb_rows_labels_text_images(raw, tmp_path, layout):
    root = raw("mmimdb", layout)
    reports, log = run_writer("mmimdb", root, tmp_path / "out")
    assert [r.written for r in reports] == [6, 3, 4] and "train: written 6, skipped 0" in log
    split_ids = json.loads((root / "split.json").read_text())
    label_dir = root / ("dataset" if layout == "archive" else "labels")
    image_dir = root / ("dataset" if layout == "archive" else "images")
    for (split, path), key in zip(arrow_files(tmp_path / "out", "mmimdb").items(), ["train", "dev", "test"]):
        table = read_arrow(path)
        assert table.schema.remove_metadata() == mmimdb.SCHEMA
        rows = table.to_pylist()
        assert [r["image_id"] for r in rows] == split_ids[key]
        for row in rows:
            meta = json.loads((label_dir / f"{row['image_id']}.json").read_text())
            assert row["plots"] == meta["plot"] and row["genres"] == meta["genres"] and row["split"] == key
            assert row["label"] == [int(g in meta["genres"]) for g in MMIMDB_GENRES]
            assert row["image"] == (image_dir / f"{row['image_id']}.jpeg").read_bytes()
            assert decode(row["image"]).format == "JPEG"
    all_rows = read_arrow(tmp_path / "out" / "mmimdb_train.arrow").to_pylist()
    assert max(len(r["plots"]) for r in all_rows) > 1  # all plots kept (§1.1)


def test_mmimdb_unknown_genre_ignored():
    label = mmimdb.genre_multi_hot(["Drama", "Reality-TV", "Film-Noir"])
    assert len(label) == 23 and label[0] == 1 and label[22] == 1 and sum(label) == 2


def test_food101_json_files(raw, tmp_path):
    root = raw("food101", "json")
    reports, _ = run_writer("food101", root, tmp_path / "out")
    assert [r.written for r in reports] == [6, 3, 4]
    class_idx = json.loads((root / "class_idx.json").read_text())
    texts = json.loads((root / "text.json").read_text())
    split = json.loads((root / "split.json").read_text())
    assert list(class_idx) != sorted(class_idx)  # verbatim copy, not alphabetical (§1.1)
    for name, path in arrow_files(tmp_path / "out", "food101").items():
        table = read_arrow(path)
        assert table.schema.remove_metadata() == food101.SCHEMA
        rows = table.to_pylist()
        assert [r["image_id"] for r in rows] == split[name]
        folder = "test" if name == "test" else "train"  # val reads images/train
        for r in rows:
            cls = r["image_id"].rsplit("_", 1)[0]
            assert r["label"] == class_idx[cls] and r["text"] == [texts[r["image_id"]]] and r["split"] == name
            assert r["image"] == (root / "images" / folder / cls / r["image_id"]).read_bytes()
            decode(r["image"])


def test_food101_csv_derivation(raw, tmp_path):
    root = raw("food101", "csv")
    assert not (root / "text.json").exists() and (root / "texts" / "train_titles.csv").is_file()
    reports, _ = run_writer("food101", root, tmp_path / "out", val_fraction=0.25, seed=3)
    assert [r.written for r in reports] == [7, 2, 4]  # 9 train-CSV rows, round(9 * 0.25) = 2 to val
    csv_rows = {}
    for f in ("train", "test"):
        for line in (root / "texts" / f"{f}_titles.csv").read_text().splitlines():
            name, text, cls = line.split(",")
            csv_rows[name] = (text, cls)
    classes = sorted({c for _, c in csv_rows.values()})
    tables = {s: read_arrow(p) for s, p in arrow_files(tmp_path / "out", "food101").items()}
    for table in tables.values():
        for r in table.to_pylist():
            text, cls = csv_rows[r["image_id"]]
            assert r["text"] == [text] and r["label"] == classes.index(cls)
    meta = tables["val"].schema.metadata
    assert b"val_fraction=0.25, seed=3" in meta[b"mdpl.split_source"]
    assert meta[b"mdpl.class_idx_source"] == b"sorted class names"
    # deterministic for a seed, different for another seed
    run_writer("food101", root, tmp_path / "again", val_fraction=0.25, seed=3)
    assert read_arrow(tmp_path / "again" / "food101_val.arrow")["image_id"] == tables["val"]["image_id"]
    names = set()
    for seed in range(6):
        run_writer("food101", root, tmp_path / f"s{seed}", val_fraction=0.25, seed=seed)
        names.add(tuple(read_arrow(tmp_path / f"s{seed}" / "food101_val.arrow")["image_id"].to_pylist()))
    assert len(names) > 1


def test_food101_csv_header_and_non_utf8_title(raw_copy, tmp_path):
    root = raw_copy("food101", "csv")
    csv_path = root / "texts" / "test_titles.csv"
    lines = csv_path.read_bytes().splitlines()
    bad_name = lines[0].split(b",")[0].decode()
    lines[0] = lines[0].replace(b",", b", caf\xe9 ,", 1)  # latin-1 byte in the title
    csv_path.write_bytes(b"image_file_name,text,class\n" + b"\n".join(lines) + b"\n")
    reports, log = run_writer("food101", root, tmp_path / "out")
    assert reports[2].written == 3 and reports[2].skip_counts() == {common.NON_UTF8: 1}
    assert "test_titles.csv:2" in log and bad_name in log
    with pytest.raises(StrictModeError, match="non-UTF-8"):
        run_writer("food101", root, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() or list((tmp_path / "strict").iterdir()) == []


@pytest.mark.parametrize("layout", ["data", "flat"])
def test_hatememes_layouts(raw, tmp_path, layout):
    root = raw("hatememes", layout)
    base = root / "data" if layout == "data" else root
    reports, _ = run_writer("hatememes", root, tmp_path / "out")
    assert [r.written for r in reports] == [6, 3, 4]
    for (split, path), key in zip(arrow_files(tmp_path / "out", "hatememes").items(), ["train", "dev", "test"]):
        table = read_arrow(path)
        assert table.schema.remove_metadata() == hatememes.SCHEMA
        src = [json.loads(line) for line in (base / f"{key}.jsonl").read_text().splitlines()]
        rows = table.to_pylist()
        assert [r["label"] for r in rows] == [s["label"] for s in src]
        assert [r["text"] for r in rows] == [[s["text"]] for s in src]
        assert all(r["image"] == (base / s["img"]).read_bytes() for r, s in zip(rows, src))
        assert decode(rows[0]["image"]).format == "PNG"
        expected_src = f"data/{key}.jsonl" if layout == "data" else f"{key}.jsonl"
        assert table.schema.metadata[b"mdpl.source_file"] == expected_src.encode()


def test_hatememes_split_file_options(raw_copy, tmp_path):
    root = raw_copy("hatememes", "flat")
    (root / "test.jsonl").rename(root / "test_seen.jsonl")
    lines = (root / "dev.jsonl").read_text().splitlines()
    (root / "dev_seen.jsonl").write_text("\n".join(lines[:2]) + "\n")
    reports, _ = run_writer("hatememes", root, tmp_path / "out", test_file="test_seen.jsonl",
                            dev_file="dev_seen.jsonl")
    assert [r.written for r in reports] == [6, 2, 4]
    meta = read_arrow(tmp_path / "out" / "hatememes_test.arrow").schema.metadata
    assert meta[b"mdpl.source_file"] == b"test_seen.jsonl"
    dev_meta = read_arrow(tmp_path / "out" / "hatememes_dev.arrow").schema.metadata
    assert dev_meta[b"mdpl.source_file"] == b"dev_seen.jsonl"


def test_streams_record_batches(raw, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BATCH_ROWS", 2)
    run_writer("hatememes", raw("hatememes"), tmp_path / "out")
    with pa.memory_map(str(tmp_path / "out" / "hatememes_train.arrow")) as src:
        reader = pa.ipc.open_file(src)
        assert reader.num_record_batches == 3 and reader.read_all().num_rows == 6


# ------------------------------------------------------------------------------------ bad input
def _first_test_item(dataset: str, root: Path) -> str:
    """First test movie id (mmimdb) or image file name (food101) from split.json."""
    return json.loads((root / "split.json").read_text())["test"][0]


def corrupt_image(dataset, root):
    if dataset == "mmimdb":
        path = _first_test_file(dataset, root, "images", ".jpeg")
    elif dataset == "food101":
        name = _first_test_item(dataset, root)
        path = root / "images" / "test" / name.rsplit("_", 1)[0] / name
    else:
        path = root / "data" / json.loads((root / "data" / "test.jsonl").read_text().splitlines()[0])["img"]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated: opens, fails on load
    return path.name


def _first_test_file(dataset, root, folder: str, suffix: str) -> Path:
    return root / folder / f"{_first_test_item(dataset, root)}{suffix}"


def _damaged(dataset, root, folder: str, suffix: str, content: bytes | None) -> str:
    """The first test item's file in `folder` rewritten with `content` (None: deleted); its name."""
    path = _first_test_file(dataset, root, folder, suffix)
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    return path.name


def garbage_image(dataset, root):
    return _damaged(dataset, root, "images", ".jpeg", b"this is not an image")


def missing_image(dataset, root):
    return _damaged(dataset, root, "images", ".jpeg", None)


def missing_label(dataset, root):
    return _damaged(dataset, root, "labels", ".json", None)


def malformed_json(dataset, root):
    return _damaged(dataset, root, "labels", ".json", b'{"plot": ["unterminated"')


def json_without_genres(dataset, root):
    return _damaged(dataset, root, "labels", ".json", b'{"plot": ["a plot"]}')


def non_utf8_json(dataset, root):
    return _damaged(dataset, root, "labels", ".json", b'{"plot": ["caf\xe9"], "genres": ["Drama"]}')


def no_text(dataset, root):
    texts = json.loads((root / "text.json").read_text())
    name = _first_test_item(dataset, root)
    del texts[name]
    (root / "text.json").write_text(json.dumps(texts))
    return name


def _append_line(root: Path, raw_line: bytes) -> str:
    path = root / "data" / "test.jsonl"
    path.write_bytes(path.read_bytes() + raw_line + b"\n")
    return f"test.jsonl:{len(path.read_bytes().splitlines())}"


def bad_jsonl(dataset, root):
    return _append_line(root, b'{"id": 1, "img": "img/x.png", ')


def bad_jsonl_label(dataset, root):
    return _append_line(root, b'{"id": 1, "img": "img/x.png", "label": 7, "text": "hi"}')


def non_utf8_jsonl(dataset, root):
    first = json.loads((root / "data" / "test.jsonl").read_text().splitlines()[0])
    return _append_line(root, f'{{"id": 2, "img": "{first["img"]}", "label": 0, "text": "caf'.encode() + b'\xe9"}')


BAD_BY_DATASET = {  # dataset -> (mutation, reason, rows lost from test)
    "mmimdb": [(corrupt_image, common.CORRUPT_IMAGE, 1), (garbage_image, common.CORRUPT_IMAGE, 1),
               (missing_image, common.MISSING_IMAGE, 1), (missing_label, common.MISSING_LABEL, 1),
               (malformed_json, common.MALFORMED_JSON, 1), (json_without_genres, common.MALFORMED_JSON, 1),
               (non_utf8_json, common.NON_UTF8, 1)],
    "food101": [(corrupt_image, common.CORRUPT_IMAGE, 1), (no_text, common.NO_TEXT, 1)],
    "hatememes": [(corrupt_image, common.CORRUPT_IMAGE, 1), (bad_jsonl, common.BAD_JSONL, 0),
                  (bad_jsonl_label, common.BAD_JSONL, 0), (non_utf8_jsonl, common.NON_UTF8, 0)],
}
BAD_CASES = [(dataset, *case) for dataset, cases in BAD_BY_DATASET.items() for case in cases]


@pytest.mark.parametrize("dataset,mutate,reason,lost", BAD_CASES, ids=[f"{d}-{m.__name__}" for d, m, _, _ in BAD_CASES])
def test_bad_input_skipped_reported_and_strict(raw_copy, tmp_path, dataset, mutate, reason, lost):
    layout = {"food101": "json"}.get(dataset)
    root = raw_copy(dataset, layout)
    where = mutate(dataset, root)
    reports, log = run_writer(dataset, root, tmp_path / "out")
    assert reports[2].written == N["n_test"] - lost and reports[2].skip_counts() == {reason: 1}
    assert f"test: written {N['n_test'] - lost}, skipped 1 ({reason}: 1)" in log
    assert where in log  # the offending file is named
    assert [r.written for r in reports[:2]] == [6, 3]
    assert_no_leftovers(tmp_path / "out")

    strict_out = tmp_path / "strict"
    strict_out.mkdir()
    (strict_out / f"{ARROW_SPLITS[dataset]['train']}.arrow").write_bytes(b"previous")
    with pytest.raises(StrictModeError, match=reason) as err:
        run_writer(dataset, root, strict_out, strict=True, overwrite=True)
    assert where in str(err.value)
    # all-or-nothing: the failing test split leaves no train/val file, the previous file is untouched
    assert sorted(p.name for p in strict_out.iterdir()) == [f"{ARROW_SPLITS[dataset]['train']}.arrow"]
    assert (strict_out / f"{ARROW_SPLITS[dataset]['train']}.arrow").read_bytes() == b"previous"


def test_interrupted_write_removes_temp(raw, tmp_path, monkeypatch):
    def boom(self, row):
        raise KeyboardInterrupt
    monkeypatch.setattr(common._SplitSink, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        run_writer("hatememes", raw("hatememes"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------------------- --max-side
@pytest.mark.parametrize("dataset,fmt", [("mmimdb", "JPEG"), ("hatememes", "PNG")])
def test_max_side_shrinks(raw, tmp_path, dataset, fmt):
    run_writer(dataset, raw(dataset), tmp_path / "out", max_side=16)
    rows = read_arrow(tmp_path / "out" / f"{ARROW_SPLITS[dataset]['train']}.arrow").to_pylist()
    for r in rows:
        img = decode(r["image"])
        assert max(img.size) == 16 and img.format == fmt
    run_writer(dataset, raw(dataset), tmp_path / "big", max_side=1000)  # larger: original bytes kept
    big = read_arrow(tmp_path / "big" / f"{ARROW_SPLITS[dataset]['train']}.arrow").to_pylist()
    assert max(decode(r["image"]).size[0] for r in big) == N["image_size"]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_writes_and_summarises(raw, tmp_path, capsys):
    rc = cli.main(["--dataset", "hateful_memes", "--root", str(raw("hatememes")), "--out", str(tmp_path / "o"),
                   "--no-progress", "--skipped-log", str(tmp_path / "skipped.tsv")])
    out = capsys.readouterr().out
    assert rc == 0 and "dev: written 3, skipped 0" in out and "hatememes_dev.arrow" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        f"{s}.arrow" for s in ARROW_SPLITS["hatememes"].values())
    assert (tmp_path / "skipped.tsv").read_text() == ""


def test_cli_skipped_log_lists_files(raw_copy, tmp_path, capsys):
    root = raw_copy("mmimdb")
    name = missing_label("mmimdb", root)
    rc = cli.main(["--dataset", "mmimdb", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress",
                   "--skipped-log", str(tmp_path / "skipped.tsv")])
    assert rc == 0 and name in (tmp_path / "skipped.tsv").read_text()
    rc = cli.main(["--dataset", "mmimdb", "--root", str(root), "--out", str(tmp_path / "s"), "--strict",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and name in err and "--strict" in err and "Traceback" not in err
    assert err.startswith("make_arrow.py: error: --strict: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "cifar10", "--root", "{raw}", "--out", "{out}"], "invalid choice: 'cifar10'"),
    (["--dataset", "mmimdb", "--root", "{raw}/nope", "--out", "{out}"], "is not a folder"),
    (["--dataset", "mmimdb", "--root", "{raw}", "--out", "{out}", "--max-side", "0"], "--max-side"),
    (["--dataset", "mmimdb", "--root", "{raw}", "--out", "{out}", "--test-file", "x.jsonl"], "does not apply"),
    (["--dataset", "mmimdb", "--root", "{raw}", "--out", "{out}", "--workers", "0"], "--workers must be at least 1"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, needle):
    (tmp_path / "raw").mkdir()
    argv = [a.format(raw=tmp_path / "raw", out=tmp_path / "out") for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _drop_split_file(dataset: str, root: Path) -> str:
    if dataset == "hatememes":
        (root / "data" / "dev.jsonl").unlink()
        return "dev.jsonl"
    (root / "split.json").unlink()
    if dataset == "food101":
        (root / "text.json").unlink()
        shutil.rmtree(root / "texts")
    return "split.json"


@pytest.mark.parametrize("dataset", ["mmimdb", "food101", "hatememes"])
def test_cli_missing_split_file(raw_copy, tmp_path, capsys, dataset):
    root = raw_copy(dataset)
    needle = _drop_split_file(dataset, root)
    rc = cli.main(["--dataset", dataset, "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_help_and_exit_code_subprocess(tmp_path):
    help_ = subprocess.run([sys.executable, "make_arrow.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_.returncode == 0 and "--max-side" in help_.stdout and "--strict" in help_.stdout
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    bad = subprocess.run([sys.executable, "make_arrow.py", "--dataset", "mmimdb", "--root", str(tmp_path),
                          "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "split.json" in bad.stderr and "Traceback" not in bad.stderr


def test_food101_json_split_with_csv_text(raw_copy, tmp_path):
    """Reference split.json/class_idx.json + text rebuilt from the CSVs (the usual real-data case, D-5)."""
    root = raw_copy("food101", "both")
    texts = json.loads((root / "text.json").read_text())
    (root / "text.json").unlink()
    reports, _ = run_writer("food101", root, tmp_path / "out")
    assert [r.written for r in reports] == [6, 3, 4]
    table = read_arrow(tmp_path / "out" / "food101_val.arrow")
    assert table.schema.metadata[b"mdpl.split_source"] == b"split.json"
    assert table.schema.metadata[b"mdpl.text_source"].startswith(b"texts/train_titles.csv")
    class_idx = json.loads((root / "class_idx.json").read_text())
    for r in table.to_pylist():
        assert r["text"] == [texts[r["image_id"]]] and r["label"] == class_idx[r["image_id"].rsplit("_", 1)[0]]


def test_api_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        make_arrow("cifar", tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------- empty splits, output folder
def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_split_listing_no_item_is_refused(raw_copy, tmp_path):
    root = raw_copy("mmimdb")
    ids = json.loads((root / "split.json").read_text())
    (root / "split.json").write_text(json.dumps({**ids, "dev": []}))
    with pytest.raises(UserInputError) as err:
        run_writer("mmimdb", root, tmp_path / "out")
    msg = str(err.value)
    assert msg == ("mmimdb split 'dev' yields 0 rows: the raw folder lists no item for it; check --root against "
                   "the raw layout in DATA.md (nothing was written)")
    assert not (tmp_path / "out").exists()


def test_split_whose_items_are_all_skipped_is_refused(raw_copy, tmp_path):
    root = raw_copy("hatememes")
    for line in (root / "data" / "dev.jsonl").read_text().splitlines():
        (root / "data" / json.loads(line)["img"]).write_bytes(b"not an image")
    with pytest.raises(UserInputError) as err:
        run_writer("hatememes", root, tmp_path / "out")
    msg = str(err.value)
    assert "hatememes split 'dev' yields 0 rows: all 3 listed items were skipped (corrupt image: 3; " in msg
    assert "nothing was written" in msg and "\n" not in msg
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_arrow_files_need_overwrite(raw, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--dataset", "hatememes", "--root", str(raw("hatememes")), "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    (out / "hatememes_dev.arrow").write_bytes(b"old dev")
    before = _digest(out)
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"make_arrow.py: error: --out {out} already holds ")
    assert "hatememes_train.arrow, hatememes_dev.arrow, hatememes_test.arrow of hatememes" in err
    assert "--overwrite" in err and _digest(out) == before
    assert cli.main([*args, "--overwrite"]) == 0
    assert read_arrow(out / "hatememes_dev.arrow").num_rows == 3 and sorted(_digest(out)) == sorted(before)
    assert_no_leftovers(out)


def test_overwrite_failing_midway_keeps_the_old_files(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for stem in ARROW_SPLITS["food101"].values():
        (out / f"{stem}.arrow").write_bytes(f"old {stem}".encode())
    before = _digest(out)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if str(src).endswith(".arrow.tmp"):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", flaky_replace)
    with pytest.raises(UserInputError) as err:
        run_writer("food101", raw("food101"), out, overwrite=True)
    assert len(calls) == 2 and "No space left on device" in str(err.value) and str(out) in str(err.value)
    assert _digest(out) == before                          # the first renamed split was put back
    assert_no_leftovers(out)


def test_unusable_output_folder_is_one_line(raw, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = cli.main(["--dataset", "hatememes", "--root", str(raw("hatememes")), "--out", str(blocker / "out"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"make_arrow.py: error: --out {blocker / 'out'}: cannot create the output folder")


def test_writers_raise_user_input_errors(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserInputError, match="MM-IMDb: expected .*images"):
        mmimdb.make_arrow(tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(UserInputError, match="Food-101 --root: folder .*nope not found"):
        food101.make_arrow(tmp_path / "nope", tmp_path / "out", progress=False)
    with pytest.raises(UserInputError, match="Hateful Memes: no train.jsonl"):
        hatememes.make_arrow(tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(UserInputError, match="unknown dataset 'cifar'"):
        make_arrow("cifar", tmp_path, tmp_path / "out")


def test_cli_user_error_subprocess_one_line_and_debug_traceback(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mmimdb_test.arrow").write_bytes(b"previous")
    cmd = [sys.executable, "make_arrow.py", "--dataset", "mmimdb", "--root", str(raw("mmimdb")), "--out", str(out),
           "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines() == [f"make_arrow.py: error: --out {out} already holds mmimdb_test.arrow of "
                                         "mmimdb; pass --overwrite to replace them (the new files replace the old "
                                         "ones only once every split is written) or choose another --out"]
    debug = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, "MDPL_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserInputError" in debug.stderr
    assert (out / "mmimdb_test.arrow").read_bytes() == b"previous"


# ------------------------------------------------------------------------------------- --workers
WORKER_N = {"n_train": 24, "n_val": 5, "n_test": 7, "image_size": 40}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 images and a pool even for a few images, so several chunks are in flight at once."""
    monkeypatch.setattr(common, "IMAGE_CHUNK", 2)
    monkeypatch.setattr(common, "MIN_IMAGES_PER_WORKER", 1)


@pytest.fixture(scope="module")
def spoiled(tmp_path_factory):
    """Per dataset: a raw folder whose train split has bad samples found by a worker (images) and by the
    parent (labels, texts, jsonl lines) at known positions, and the expected skip reasons in row order."""
    cache: dict[str, tuple[Path, list[str]]] = {}

    def get(dataset: str) -> tuple[Path, list[str]]:
        if dataset in cache:
            return cache[dataset]
        root = write_synthetic(dataset, tmp_path_factory.mktemp(f"spoiled_{dataset}"),
                               layout={"food101": "json"}.get(dataset), **WORKER_N)
        if dataset == "hatememes":
            lines = (root / "data" / "train.jsonl").read_text().splitlines()
            images = [root / "data" / json.loads(line)["img"] for line in lines]
            lines[9] = '{"id": 1, "img": '                                   # bad jsonl line (parent)
            (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
            reasons = [common.CORRUPT_IMAGE, common.BAD_JSONL, common.CORRUPT_IMAGE]
        else:
            names = json.loads((root / "split.json").read_text())["train"]
            if dataset == "mmimdb":
                images = [root / "images" / f"{n}.jpeg" for n in names]
                (root / "labels" / f"{names[9]}.json").unlink()                # missing label (parent)
                reasons = [common.CORRUPT_IMAGE, common.MISSING_LABEL, common.CORRUPT_IMAGE]
            else:
                images = [root / "images" / "train" / n.rsplit("_", 1)[0] / n for n in names]
                texts = json.loads((root / "text.json").read_text())
                del texts[names[9]]                                            # no text (parent)
                (root / "text.json").write_text(json.dumps(texts))
                reasons = [common.CORRUPT_IMAGE, common.NO_TEXT, common.CORRUPT_IMAGE]
        images[3].write_bytes(images[3].read_bytes()[:100])                    # truncated (worker)
        images[15].write_bytes(b"not an image")                                # garbage (worker)
        cache[dataset] = (root, reasons)
        return cache[dataset]
    return get


@pytest.mark.parametrize("max_side", [None, 16])
@pytest.mark.parametrize("dataset", ["mmimdb", "food101", "hatememes"])
def test_workers_write_identical_files(spoiled, small_chunks, tmp_path, dataset, max_side):
    root, reasons = spoiled(dataset)
    runs = {w: run_writer(dataset, root, tmp_path / f"w{w}", workers=w, max_side=max_side) for w in (1, 2)}
    (rep1, log1), (rep2, log2) = runs[1], runs[2]
    assert "images/s with 1 worker: train " in log1 and "images/s with 2 workers: train " in log2  # a pool ran
    assert [r.written for r in rep2] == [WORKER_N["n_train"] - 3, WORKER_N["n_val"], WORKER_N["n_test"]]
    assert [reason for reason, _, _ in rep2[0].skipped] == reasons
    assert [(r.split, r.written, r.skipped) for r in rep1] == [(r.split, r.written, r.skipped) for r in rep2]
    assert log1.splitlines()[:-1] == log2.splitlines()[:-1]        # everything but the timing line
    files1, files2 = _digest(tmp_path / "w1"), _digest(tmp_path / "w2")
    assert sorted(files1) == sorted(f"{s}.arrow" for s in ARROW_SPLITS[dataset].values())
    assert files1 == files2                                         # byte for byte
    if max_side:
        rows = read_arrow(tmp_path / "w2" / f"{ARROW_SPLITS[dataset]['train']}.arrow").to_pylist()
        assert {max(decode(r["image"]).size) for r in rows} == {max_side}


def test_workers_strict_stops_at_the_first_bad_row(spoiled, small_chunks, tmp_path):
    """The parent reads item 9's label before a worker reports item 3's image; item 3 is still the one named."""
    root, _ = spoiled("mmimdb")
    bad_image = json.loads((root / "split.json").read_text())["train"][3] + ".jpeg"
    messages = []
    for w in (1, 2):
        with pytest.raises(StrictModeError) as err:
            run_writer("mmimdb", root, tmp_path / f"w{w}", strict=True, workers=w)
        messages.append(str(err.value))
        assert list((tmp_path / f"w{w}").iterdir()) == []
    assert messages[0] == messages[1] and "--strict: train: corrupt image: " in messages[1]
    assert bad_image in messages[1] and "\n" not in messages[1]


def test_cli_workers_strict_one_line(spoiled, small_chunks, tmp_path, capsys):
    root, _ = spoiled("hatememes")
    argv = ["--dataset", "hatememes", "--root", str(root), "--no-progress", "--workers", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_arrow.py: error: --strict: train: corrupt image: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
    assert cli.main([*argv, "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "train: written 21, skipped 3 (corrupt image: 2, bad jsonl line: 1)" in out
    speed = re.search(r"^images/s with 2 workers: train \d+ \(24 images in [\d.]+ s\), dev \d+ \(5 images in "
                      r"[\d.]+ s\), test \d+ \(7 images in [\d.]+ s\)$", out, re.M)
    assert speed is not None


def _pool_processes() -> list:
    return [p for p in multiprocessing.active_children() if type(p).__name__ in ("ForkServerProcess", "SpawnProcess")]


def test_workers_interrupted_write_leaves_nothing(spoiled, small_chunks, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mmimdb_train.arrow").write_bytes(b"previous")
    added = []

    def interrupt(self, row):
        added.append(row)
        if len(added) == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(common._SplitSink, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_writer("mmimdb", spoiled("mmimdb")[0], out, workers=2, overwrite=True)
    assert len(added) == 5 and _digest(out) == {"mmimdb_train.arrow": b"previous"}
    assert _pool_processes() == []                                 # the pool was shut down


def test_dead_worker_is_one_line_error(small_chunks):
    with pytest.raises(UserInputError) as err:
        with common.image_reader(None, 2, 10) as reader:
            assert reader.workers == 2
            reader.pool.submit(os._exit, 3).result()
    msg = str(err.value)
    assert msg.startswith("an image worker process died (") and msg.endswith("retry with fewer --workers")
    assert "\n" not in msg and _pool_processes() == []


def test_small_runs_use_no_pool(monkeypatch):
    monkeypatch.setattr(common, "MIN_IMAGES_PER_WORKER", 256)
    with common.image_reader(None, 8, 511) as reader:
        assert reader.pool is None and reader.workers == 1
    monkeypatch.setattr(common, "MIN_IMAGES_PER_WORKER", 100)
    with common.image_reader(None, 8, 350) as reader:
        assert reader.pool is not None and reader.workers == 3 and reader.in_flight == 6


def test_parallel_reader_holds_a_bounded_window(tmp_path, small_chunks):
    """The parent keeps at most ``in_flight`` chunks ahead of the row it hands out (memory stays bounded)."""
    img = tmp_path / "a.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(img)

    class InlinePool:  # runs each task at once and counts the chunks submitted
        submitted = 0

        def submit(self, fn, *args):
            from concurrent.futures import Future
            InlinePool.submitted += 1
            future = Future()
            future.set_result(fn(*args))
            return future

    plan = common.SplitPlan("train", "x_train", list(range(40)), lambda i: {"image": common.ImageFile(img), "i": i})
    reader = common.ImageReader(None, InlinePool(), workers=2, in_flight=3)
    ahead = []
    for k, row in enumerate(reader.rows(plan)):
        assert row["i"] == k and row["image"] == img.read_bytes()
        ahead.append(InlinePool.submitted - k // common.IMAGE_CHUNK)
    assert InlinePool.submitted == 20 and max(ahead) == 4         # the chunk being handed out + 3 queued


def test_default_workers(monkeypatch):
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert common.default_workers() == 8
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert common.default_workers() == 3
    help_ = cli.build_parser().format_help()
    assert "--workers N" in help_ and "at most 8; here 3)" in " ".join(help_.split())


def test_bench_make_arrow_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_make_arrow", REPO / "scripts" / "bench_make_arrow.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    poster = decode(bench.poster_jpeg(1))
    assert poster.size == (300, 450) and poster.format == "JPEG"
    work = tmp_path / "work"
    rows = bench.main(["--n", "12", "--workers", "1", "--max-side", "none,8", "--repeats", "1", "--work", str(work)])
    assert [(r["max_side"], r["workers"], r["images"], len(r["seconds"])) for r in rows] == [(None, 1, 12, 1),
                                                                                              (8, 1, 12, 1)]
    assert all(r["images_per_s"] == r["best_images_per_s"] == pytest.approx(12 / r["seconds"][0]) for r in rows)
    out = capsys.readouterr().out
    assert "| none | 1 | " in out and "| 8 | 1 | " in out and "12 posters" in out
    assert sorted(p.name for p in work.iterdir()) == []           # posters and arrow files removed
