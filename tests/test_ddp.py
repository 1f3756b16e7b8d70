"""2-process DDP on CPU (gloo) gives the 1-process validation and test metrics.

Both runs are real `python run.py with ...` subprocesses (Lightning's DDP launcher re-runs the script for rank 1)
on synthetic Hateful Memes whose val and test splits have an odd size (9): torch's DistributedSampler would pad
rank 1 with a duplicate, which would change the loss mean and the AUROC (a 'cat' metric state gathered with
uneven per-rank sizes). The learning rate is 1e-30, so the weights never change (below fp32 resolution) and the
two runs evaluate the same model: every validation / test metric must agree to 1e-6.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import synthetic_arrows

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_EVAL, BATCH = 16, 9, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("ddp_data"), "hatememes", N_TRAIN, N_EVAL, N_EVAL)


def run_args(data: dict, log_dir: Path, processes: int) -> list[str]:
    """``run.py with ...`` arguments of the 1-epoch, lr 1e-30 run on the synthetic data."""
    return ["run.py", "with", "task_finetune_hatememes", "map", "tiny", f"data_root={data['arrow']}",
            f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={log_dir}",
            f"per_gpu_batchsize={BATCH}", f"batch_size={2 * BATCH}", "max_epoch=1", "learning_rate=1e-30",
            "deterministic=True", f"num_cpu_processes={processes}"]


def finished_run(cmd: list[str], log_dir: Path, processes: int) -> Path:
    """Runs ``cmd``; checks that it wrote one run directory and printed its result once; returns the directory."""
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    versions = sorted((log_dir / "finetune_hatememes_seed0_from_scratch").iterdir())
    assert [v.name for v in versions] == ["version_0"], versions   # every rank used rank 0's run directory
    assert sorted(p.name for p in log_dir.iterdir()) == ["finetune_hatememes_seed0_from_scratch"]
    assert out.stderr.count("Result: {") == 1, out.stderr[-3000:]   # Sacred prints rank 0's result only
    if processes > 1:
        assert "distributed_backend=gloo" in out.stdout + out.stderr
        assert "Starting with 2 processes" in out.stdout + out.stderr
    return versions[0]


def _run(data: dict, log_dir: Path, processes: int) -> Path:
    return finished_run([sys.executable, *run_args(data, log_dir, processes)], log_dir, processes)


def eval_metrics(run_dir: Path) -> dict[str, float]:
    """Validation metrics (csv log) and test metrics (test_metrics.json) of a run."""
    metrics = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            metrics.update({k: float(v) for k, v in row.items() if v and ("/val/" in k or k.startswith("val/"))})
    return metrics


def assert_same_evaluation(one: Path, two: Path) -> None:
    """Same validation and test metrics (1e-6) and the same weights (the premise) in two run directories."""
    m1, m2 = eval_metrics(one), eval_metrics(two)
    expected = {"hatememes/val/AUROC", "hatememes/val/accuracy", "hatememes/val/loss", "val/the_metric",
                "hatememes/test/AUROC", "hatememes/test/accuracy", "hatememes/test/loss", "test/the_metric"}
    assert expected <= set(m1) and set(m1) == set(m2), (sorted(m1), sorted(m2))
    for key in sorted(m1):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), f"{key}: 1 process {m1[key]} vs 2 processes {m2[key]}"
    # the premise: both runs evaluate the same weights (zero-initialised biases move by ~1e-30, nothing else)
    w1 = torch.load(one / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    w2 = torch.load(two / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert w1["global_step"] == w2["global_step"] == N_TRAIN // (2 * BATCH)
    for key, value in w1["state_dict"].items():
        assert torch.allclose(value.double(), w2["state_dict"][key].double(), rtol=0, atol=1e-20), key


def test_two_process_ddp_matches_one_process(data: dict, tmp_path: Path) -> None:
    assert_same_evaluation(_run(data, tmp_path / "one", 1), _run(data, tmp_path / "two", 2))
