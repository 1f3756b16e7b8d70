"""Bad arrow files give one clear line when they are opened, naming the file, expected vs found, and the fix.

Truncated / non-arrow files, missing columns, columns of another type, files without rows and labels outside the
dataset's classes are refused by the dataset, by ``count_rows`` and by the config check that runs before any work
(``mdpl.config.validate.check_data_root``); ``python run.py`` prints the line and exits with status 2.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import _SCHEMAS, VOCAB, make_rows, write_arrow
from mdpl.data.dataset import ArrowMultimodalDataset, check_arrow_exists, count_rows
from mdpl.data.transforms import build_transform
from mdpl.errors import UserInputError
from mdpl.config.validate import check_data_root
from runs import typed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def food_root(arrow_root, tmp_path) -> Path:
    """A private copy of the three Food-101 arrow files (tests damage one of them)."""
    dst = tmp_path / "arrow"
    shutil.copytree(arrow_root("food101"), dst)
    return dst


def open_error(root: Path, dataset: str = "food101", split: str = "val") -> str:
    """The one-line UserInputError of opening ``split`` (dataset, count_rows and check_data_root agree)."""
    path = root / {"food101": "food101_val.arrow", "mmimdb": "mmimdb_dev.arrow"}[dataset]
    transform = build_transform(typed({"image_size": 32, "backbone": "vilt"}).pipeline)
    with pytest.raises(UserInputError) as err:
        ArrowMultimodalDataset(root, dataset, split, transform)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"arrow file {path}: ")
    assert msg.endswith(f"rebuild it with `python make_arrow.py --dataset {dataset} --root <raw {dataset} folder> "
                        f"--out {root}`")
    return msg


def write_food_val(root: Path, schema: pa.Schema, cols: dict) -> None:
    write_arrow(root / "food101_val.arrow", schema, cols)


# ----------------------------------------------------------------------------------- unreadable files
def test_truncated_file(food_root) -> None:
    path = food_root / "food101_val.arrow"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = open_error(food_root)
    assert "expected an Arrow IPC file, found an unreadable one (truncated or not arrow" in msg
    with pytest.raises(UserInputError) as err:
        count_rows(path)
    assert str(err.value) == msg
    with pytest.raises(UserInputError) as err:   # the config check before any work says the same
        check_data_root({"dataset": "food101", "data_root": str(food_root)})
    assert str(err.value) == msg


def test_file_that_is_not_arrow(food_root) -> None:
    (food_root / "food101_val.arrow").write_text("image,text,label\n")
    assert "Not an Arrow file" in open_error(food_root)


def test_empty_file(food_root) -> None:
    (food_root / "food101_val.arrow").write_bytes(b"")
    assert "truncated or not arrow" in open_error(food_root)


# --------------------------------------------------------------------------------------- wrong schema
def test_missing_column_names_expected_and_found(food_root) -> None:
    cols = make_rows("food101", "val", 4)
    del cols["image_id"]
    write_food_val(food_root, pa.schema([f for f in _SCHEMAS["food101"] if f.name != "image_id"]), cols)
    msg = open_error(food_root)
    assert "column 'image_id' (string) is missing" in msg
    assert ("expected columns image: binary, text: list<item: string>, label: int64, image_id: string, split: string; "
            "found image: binary, text: list<item: string>, label: int64, split: string)") in msg


def test_column_of_another_type(food_root) -> None:
    cols = make_rows("food101", "val", 4)
    cols["label"] = [str(v) for v in cols["label"]]
    schema = _SCHEMAS["food101"].set(2, pa.field("label", pa.string()))
    write_food_val(food_root, schema, cols)
    assert "column 'label' is string, expected int64" in open_error(food_root)
    # extra columns are ignored: the right columns plus one more open fine
    cols = {**make_rows("food101", "val", 4), "note": ["x"] * 4}
    write_food_val(food_root, _SCHEMAS["food101"].append(pa.field("note", pa.string())), cols)
    transform = build_transform(typed({"image_size": 32, "backbone": "vilt"}).pipeline)
    assert len(ArrowMultimodalDataset(food_root, "food101", "val", transform)) == 4
    assert count_rows(food_root / "food101_val.arrow") == 4


def test_mmimdb_file_named_as_another_dataset(arrow_root, food_root) -> None:
    shutil.copy(arrow_root("mmimdb") / "mmimdb_dev.arrow", food_root / "food101_val.arrow")
    msg = open_error(food_root)
    assert "column 'text' (list<item: string>) is missing" in msg and "column 'image_id' is" not in msg
    assert "column 'label' is list<item: int64>, expected int64" in msg


# ------------------------------------------------------------------------------------------ contents
def test_file_without_rows(food_root) -> None:
    write_food_val(food_root, _SCHEMAS["food101"], make_rows("food101", "val", 0))
    assert "expected rows, found none" in open_error(food_root)


def test_food101_label_outside_the_classes(food_root) -> None:
    cols = make_rows("food101", "val", 4)
    cols["label"][2] = 101
    write_food_val(food_root, _SCHEMAS["food101"], cols)
    assert "column 'label': row 2 has class 101, expected 0..100" in open_error(food_root)


def test_mmimdb_label_of_wrong_length(arrow_root, tmp_path) -> None:
    root = tmp_path / "arrow"
    shutil.copytree(arrow_root("mmimdb"), root)
    cols = make_rows("mmimdb", "dev", 4)
    cols["label"][1] = cols["label"][1][:22]
    write_arrow(root / "mmimdb_dev.arrow", _SCHEMAS["mmimdb"], cols)
    assert "column 'label': row 1 has 22 values, expected 23 (multi-hot genres)" in open_error(root, "mmimdb")


def test_missing_file_is_a_user_error_and_a_file_not_found_error(tmp_path) -> None:
    with pytest.raises(UserInputError) as err:
        check_arrow_exists(tmp_path / "food101_val.arrow", tmp_path, "food101")
    assert isinstance(err.value, FileNotFoundError)
    assert f"create them with `python make_arrow.py --dataset food101 --root <raw food101 folder> --out {tmp_path}`" \
        in str(err.value)


# ------------------------------------------------------------------------------------------- run.py
def test_run_cli_with_corrupted_arrow_is_one_line(food_root, bert_vocab_dir, tmp_path) -> None:
    path = food_root / "food101_test.arrow"
    path.write_bytes(path.read_bytes()[:100])
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}
    cmd = [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", f"data_root={food_root}",
           f"tokenizer={bert_vocab_dir}", f"vocab_size={len(VOCAB)}", f"log_dir={tmp_path / 'result'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"error: arrow file {path}: expected an Arrow IPC file")
    assert f"python make_arrow.py --dataset food101 --root <raw food101 folder> --out {food_root}" in lines[0]
