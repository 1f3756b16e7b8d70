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
    assert [type(lg).__name__ for lg in build_loggers({}, tmp_path / "r")] == ["TensorBoardLogger", "RunCSVLogger"]


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


_STUB_RUN = """
import sys
import run as run_script
from test_engine import QUIET, StubClassifier, StubDataModule, make_config
from pathlib import Path
tmp, epochs, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
run_script.run(make_config(tmp, logger="[csv,wandb,mlflow]", max_epoch=epochs, resume=resume),
               datamodule=StubDataModule(), model=StubClassifier(), **QUIET)
"""


def _stub_run(tmp_path: Path, epochs: int, resume: bool) -> None:
    """One training of the stub classifier with csv + wandb + mlflow, in its own process (wandb keeps one run per
    process), offline: no WANDB_MODE, no MLFLOW_TRACKING_URI, wandb's own folders under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"))
    out = subprocess.run([sys.executable, "-c", _STUB_RUN, str(tmp_path), str(epochs), "resume" if resume else "new"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_wandb_offline_and_mlflow_local_store_and_a_resumed_run_continues_the_wandb_run(tmp_path, monkeypatch) -> None:
    """Two processes: a one-epoch run, then ``resume=True`` with two epochs. Both write into the same run directory;
    wandb logs offline into <run_dir>/wandb under one run id (the resumed process continues the same wandb run);
    mlflow writes a local file store <run_dir>/mlruns whose metrics are those of the CSV log."""
    import mlflow
    import pandas as pd

    _stub_run(tmp_path, epochs=1, resume=False)
    run_dir = tmp_path / "result" / "stub_seed0_from_scratch" / "version_0"
    first = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    _stub_run(tmp_path, epochs=2, resume=True)
    assert sorted(p.name for p in (tmp_path / "result" / "stub_seed0_from_scratch").iterdir()) == ["version_0"]
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and len(runs) == 2 and first[0] in runs
    ids = {name.rsplit("-", 1)[1] for name in runs}
    assert len(ids) == 1                                         # the resumed process continued the same wandb run
    run_id = ids.pop()
    assert all((run_dir / "wandb" / name / f"run-{run_id}.wandb").stat().st_size > 0 for name in runs)

    csv = pd.read_csv(run_dir / "csv" / "metrics.csv")
    val = csv["val/the_metric"].dropna().tolist()
    assert len(val) == 4              # 2 validations per epoch, epochs 0 and 1: the resumed process kept epoch 0's rows
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")        # mlflow 3 reads file stores only when told
    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("stub")
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert len(mlflow_runs) == 2                                  # mlflow: one run per process (no resume there)
    logged = sorted(m.value for r in mlflow_runs for m in client.get_metric_history(r.info.run_id, "val/the_metric"))
    assert logged == pytest.approx(sorted(val), abs=1e-6)
