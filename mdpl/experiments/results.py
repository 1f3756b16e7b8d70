"""Reading what the runs of the experiment matrix wrote: the sweep's ``results.csv``, ``test_metrics.json`` and
the best validation score in ``csv/metrics.csv``; which (cell, seed) is done, which training can be resumed."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from mdpl.data.registry import dataset_spec
from mdpl.experiments.matrix import Cell, Context, seed_dir


@dataclass
class Result:
    run_dir: Path
    scenarios: dict[tuple[str, float], float]   # (type, ratio) -> primary metric (0-1)
    val_best: float | None


def read_results(run_dir: Path, dataset: str) -> dict[tuple[str, float], float]:
    """(type, ratio) -> the dataset's primary metric, from the results.csv of a run's sweep ({} if unreadable)."""
    primary = dataset_spec(dataset).primary_metric
    out = {}
    try:
        with open(run_dir / "results.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                metric = primary if primary in row else list(row)[7]
                out[(row["type"], round(float(row["ratio"]), 6))] = float(row[metric])
    except (OSError, KeyError, ValueError, IndexError):
        return {}
    return out


def _training_dir(run_dir: Path) -> Path:
    """The training run a result belongs to: the run directory of the checkpoint its test used."""
    try:
        checkpoint = json.loads((run_dir / "test_metrics.json").read_text()).get("checkpoint")
    except (OSError, ValueError):
        checkpoint = None
    return Path(checkpoint).parents[1] if checkpoint else run_dir


def _val_best(train_dir: Path) -> float | None:
    """The best `val/the_metric` the training run logged (the score its best checkpoint was chosen by)."""
    values = []
    for path in sorted(train_dir.glob("csv/**/metrics.csv")):
        try:
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    value = row.get("val/the_metric") or ""
                    if value and not math.isnan(float(value)):
                        values.append(float(value))
        except (OSError, ValueError):
            continue
    return max(values) if values else None


def _versions(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/version_*"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []


def find_result(cell: Cell, ctx: Context, seed: int) -> Result | None:
    """The newest run (training or re-evaluation) of the cell's run and seed whose results cover its scenarios."""
    base = seed_dir(cell, ctx, seed)
    need = {(t, round(r, 6)) for t, r in cell.scenarios}
    for run_dir in reversed(_versions(base) + _versions(base / "eval")):
        if not (run_dir / "test_metrics.json").is_file():
            continue
        scenarios = read_results(run_dir, cell.dataset)
        if need <= set(scenarios):
            return Result(run_dir, scenarios, _val_best(_training_dir(run_dir)))
    return None


def training_state(cell: Cell, ctx: Context, seed: int) -> tuple[str, str]:
    """('trained', best checkpoint) | ('resume', last.ckpt) | ('new', '') for a cell without a result."""
    versions = _versions(seed_dir(cell, ctx, seed))
    for run_dir in reversed(versions):
        metrics = run_dir / "test_metrics.json"
        if metrics.is_file():
            try:
                checkpoint = json.loads(metrics.read_text()).get("checkpoint")
            except (OSError, ValueError, AttributeError):
                continue   # damaged: not a finished run's record; its last.ckpt resumes (and re-tests) below
            checkpoint = checkpoint or str(run_dir / "checkpoints" / "last.ckpt")
            if Path(checkpoint).is_file():
                return "trained", checkpoint
    if any((v / "checkpoints" / "last.ckpt").is_file() for v in versions):
        return "resume", str(next(v for v in reversed(versions) if (v / "checkpoints" / "last.ckpt").is_file()))
    return "new", ""
