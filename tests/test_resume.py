"""Kill a training run mid-epoch with SIGKILL, resume it, and reach the uninterrupted run's weights (issue 7).

CPU, fp32, deterministic, MAP (dropout on: the RNG states must be restored too). The run saves last.ckpt every
`checkpoint_every_n_steps` optimizer steps (mdpl/engine/resume.py), the test polls for it and kills the process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, BATCH, EVERY, EPOCHS = 32, 4, 3, 2          # 8 steps per epoch, last.ckpt at steps 3, 6, 8 (epoch end), 9, ...


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
    from mdpl.demo import _make_arrow

    root = tmp_path_factory.mktemp("resume_data")
    write_synthetic("food101", root / "raw", N_TRAIN, 8, 8, seed=0)
    vocab = write_wordpiece_vocab(root / "tok" / "vocab.txt")
    _make_arrow(root / "raw", root / "arrow")
    return {"arrow": root / "arrow", "tok": vocab.parent, "vocab_size": len(vocab.read_text().split())}


def _cmd(data: dict, log_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", f"data_root={data['arrow']}",
            f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={log_dir}",
            f"per_gpu_batchsize={BATCH}", f"batch_size={BATCH}", f"max_epoch={EPOCHS}", "deterministic=True",
            f"checkpoint_every_n_steps={EVERY}", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MDPL_RUN_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _version(log_dir: Path, n: int) -> Path:
    return log_dir / "finetune_food101_seed0_from_scratch" / f"version_{n}"


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data: dict, tmp_path: Path) -> None:
    # 1. uninterrupted reference
    ref_log = tmp_path / "ref"
    subprocess.run(_cmd(data, ref_log), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    ref = _version(ref_log, 0)

    # 2. the same run, SIGKILLed as soon as its first mid-epoch last.ckpt is on disk
    log = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, log), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = _version(log, 0) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not (last.is_file() and last.stat().st_size > 0) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)   # let the write finish
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(last, map_location="cpu", weights_only=False)["mdpl_resume"]
    assert 0 < state["batches_done"] < state["num_batches"], f"not a mid-epoch checkpoint: {state}"
    assert not (_version(log, 0) / "test_metrics.json").exists()

    # 3. resume (resume=True picks the newest version's last.ckpt) into a new version directory
    out = subprocess.run(_cmd(data, log, "resume=True"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = _version(log, 1)
    assert (resumed / "test_metrics.json").is_file() and last.is_file()   # the killed run's files are kept

    ref_w, res_w = _weights(ref / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    assert ref_w.keys() == res_w.keys()
    different = [k for k in ref_w if not torch.equal(ref_w[k], res_w[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    ref_ckpt = torch.load(ref / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    res_ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ref_ckpt["global_step"] == res_ckpt["global_step"] == EPOCHS * N_TRAIN // BATCH
    assert ref_ckpt["lr_schedulers"] == res_ckpt["lr_schedulers"]
    ref_metrics = json.loads((ref / "test_metrics.json").read_text())["metrics"]
    res_metrics = json.loads((resumed / "test_metrics.json").read_text())["metrics"]
    assert ref_metrics == res_metrics


def test_resume_from_missing_file_is_one_clear_error(data: dict, tmp_path: Path) -> None:
    out = subprocess.run(_cmd(data, tmp_path, f"resume_from={tmp_path / 'nope.ckpt'}"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "resume_from=" in out.stderr and "does not exist" in out.stderr
    assert not (tmp_path / "finetune_food101_seed0_from_scratch").exists()   # nothing partial written


def test_epoch_seeded_sampler_skip() -> None:
    from mdpl.engine.resume import EpochSeededSampler

    s = EpochSeededSampler(10, seed=3)
    s.set_epoch(1)
    full = list(s)
    s.skip = 4
    assert list(s) == full[4:] and list(s) == full       # skip applies to one iteration only
    s.set_epoch(2)
    assert sorted(s) == list(range(10)) and list(s) != full
