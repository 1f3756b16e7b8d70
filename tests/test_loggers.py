"""The ``logger`` key: TensorBoard + CSV by default, only the named loggers otherwise, one clear line for a logger
that does not exist or whose package is not installed (wandb, mlflow), before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import run as run_script
from mdpl.engine.trainer import build_loggers, logger_names
from mdpl.errors import UserInputError
from test_engine import QUIET, StubClassifier, StubDataModule, make_config

ROOT = Path(__file__).resolve().parent.parent


def test_logger_names_forms_and_default() -> None:
    assert logger_names({}) == ["tensorboard", "csv"]
    assert logger_names({"logger": "csv"}) == ["csv"]
    assert logger_names({"logger": "[CSV, tensorboard]"}) == ["csv", "tensorboard"]   # the CLI's list form
    assert logger_names({"logger": ["csv", "csv"]}) == ["csv"]
    with pytest.raises(UserInputError, match="names no logger"):
        logger_names({"logger": "[]"})


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_logger_without_its_package_is_one_line(name, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, name, None)   # as if the package were not installed
    with pytest.raises(UserInputError) as err:
        logger_names({"logger": f"[csv,{name}]"})
    assert str(err.value) == (f"logger={name} needs the {name} package, which is not installed: pip install {name} "
                              "(or use logger=tensorboard,csv)")


def test_csv_only_writes_no_tensorboard_folder(tmp_path) -> None:
    out = run_script.run(make_config(tmp_path, logger="csv", max_epoch=1), datamodule=StubDataModule(),
                         model=StubClassifier(), **QUIET)
    run_dir = Path(out["run_dir"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "csv", "test_metrics.json"]
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/the_metric" in header and "lr-LegacyAdamW/decay" in header   # LR monitor logs to the CSV logger
    assert [type(lg).__name__ for lg in build_loggers({}, tmp_path / "r")] == ["TensorBoardLogger", "CSVLogger"]


def test_unknown_logger_cli_is_one_line_and_writes_nothing(tmp_path) -> None:
    log_dir = tmp_path / "result"
    cmd = [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", "logger=[csv,comet]",
           f"log_dir={log_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: logger='[csv,comet]': unknown logger 'comet'; choose one or more of tensorboard, csv, "
                      "wandb, mlflow (e.g. logger=wandb or logger=[csv,mlflow])"], out.stderr[-3000:]
    assert not log_dir.exists()
