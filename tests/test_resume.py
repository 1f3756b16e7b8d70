"""A killed run, resumed, ends exactly where the uninterrupted run ends: same weights, same best checkpoint, same
test metrics; and neither resuming, mid-epoch checkpoints, loader workers nor DDP changes the result.

Every kill is placed by the run itself (``tests/killed_run.py``: SIGKILL at the first batch after optimizer step
K), never by a timer. CPU, fp32, deterministic, MAP with dropout on (the RNG states must be restored too), tiny
ViLT, synthetic Food-101 with 32 training items: 8 optimizer steps per epoch at batch 4.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import assert_same_run, synthetic_arrows

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, BATCH, EPOCHS = 32, 4, 4
STEPS_PER_EPOCH = N_TRAIN // BATCH
BASE = "finetune_food101_seed0_from_scratch"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("resume_data"), "food101", N_TRAIN, 8, 8)


def _run(data: dict, log_dir: Path, *extra: str, kill_after: int | None = None, processes: int = 1,
         batch_size: int = BATCH, epochs: int = EPOCHS) -> subprocess.CompletedProcess:
    """``run.py`` (or, with ``kill_after``, ``tests/killed_run.py``) in its own process group."""
    script = "tests/killed_run.py" if kill_after is not None else "run.py"
    cmd = [sys.executable, script, "with", "task_finetune_food101", "map", "tiny", f"data_root={data['arrow']}",
           f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={log_dir}",
           f"per_gpu_batchsize={BATCH}", f"batch_size={batch_size}", f"max_epoch={epochs}", "deterministic=True",
           f"num_cpu_processes={processes}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("MDPL_DEBUG", "MDPL_TEST_KILL_AFTER_STEP")}
    env["OMP_NUM_THREADS"] = "1"
    if kill_after is not None:
        env["MDPL_TEST_KILL_AFTER_STEP"] = str(kill_after)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)


def _finished(data: dict, log_dir: Path, *extra: str, **kwargs) -> Path:
    out = _run(data, log_dir, *extra, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir / BASE / "version_0"


def _killed(data: dict, log_dir: Path, step: int, *extra: str, **kwargs) -> Path:
    out = _run(data, log_dir, *extra, kill_after=step, **kwargs)
    assert out.returncode == -signal.SIGKILL, f"not killed (rc {out.returncode}): {out.stderr[-3000:]}"
    run_dir = log_dir / BASE / "version_0"
    assert not (run_dir / "test_metrics.json").exists()
    return run_dir


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """The reference: one run of EPOCHS epochs, no mid-epoch checkpoints, no workers."""
    return _finished(data, tmp_path_factory.mktemp("uninterrupted"))


def _best_step(run_dir: Path) -> int:
    name = Path(json.loads((run_dir / "test_metrics.json").read_text())["checkpoint"]).stem
    return int(name.rsplit("step", 1)[1])


@pytest.mark.parametrize("every, kill_after", [(0, 3 * STEPS_PER_EPOCH), (3, 3 * STEPS_PER_EPOCH + 3)],
                         ids=["epoch-end-checkpoints", "mid-epoch-checkpoints"])
def test_kill_after_the_best_epoch_then_resume_matches_uninterrupted(data, uninterrupted, tmp_path, every,
                                                                     kill_after) -> None:
    # premise: the best validation is before the kill, so a resume that forgot it would test a later epoch
    assert _best_step(uninterrupted) <= kill_after
    run_dir = _killed(data, tmp_path, kill_after, f"checkpoint_every_n_steps={every}")
    state = _load(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == kill_after                         # the kill landed where it was placed
    done = state["mdpl_resume"]["batches_done"]
    assert done == (kill_after % STEPS_PER_EPOCH or STEPS_PER_EPOCH)  # mid-epoch (3 of 8) or the epoch end

    out = _run(data, tmp_path, f"checkpoint_every_n_steps={every}", "resume=True")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / BASE).iterdir()) == ["version_0"]   # continued in its own folder
    assert_same_run(uninterrupted, run_dir)


def test_loader_workers_do_not_change_the_result(data, uninterrupted, tmp_path) -> None:
    assert_same_run(uninterrupted, _finished(data, tmp_path, "num_workers=2"))


def test_ddp_mid_epoch_resume_matches_uninterrupted_ddp(data, tmp_path) -> None:
    # 2 gloo processes, 2 x 4 items per optimizer step: 4 steps per epoch; last.ckpt after every step
    ddp = dict(processes=2, batch_size=2 * BATCH, epochs=2)
    ref = _finished(data, tmp_path / "ref", "checkpoint_every_n_steps=1", **ddp)
    run_dir = _killed(data, tmp_path / "killed", 6, "checkpoint_every_n_steps=1", **ddp)
    state = _load(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 6 and state["mdpl_resume"]["batches_done"] == 2    # mid-epoch 1
    # each rank's own RNG: with dynamic text padding (MAP's default) the ranks' dropout draws differ in size
    rngs = state["mdpl_resume"]["rng_per_rank"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    out = _run(data, tmp_path / "killed", "checkpoint_every_n_steps=1", "resume=True", **ddp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(ref, run_dir)


def test_resume_from_missing_file_is_one_line_and_writes_nothing(data, tmp_path) -> None:
    out = _run(data, tmp_path, f"resume_from={tmp_path / 'nope.ckpt'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "resume_from=" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / BASE).exists()


def test_resume_from_a_checkpoint_outside_its_run_directory_is_refused(data, uninterrupted, tmp_path) -> None:
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes((uninterrupted / "checkpoints" / "last.ckpt").read_bytes())
    out = _run(data, tmp_path, f"resume_from={moved}")
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "checkpoints/ folder of an mdpl run directory" in errors[0], errors


def test_resume_with_another_seed_or_batch_is_refused(data, uninterrupted, tmp_path) -> None:
    last = uninterrupted / "checkpoints" / "last.ckpt"
    out = _run(data, tmp_path, f"resume_from={last}", "seed=1", "per_gpu_batchsize=2")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "seed: checkpoint=0 vs config=1" in errors[0], errors


def test_seeded_train_sampler_shards_skips_and_reshuffles() -> None:
    from mdpl.data.sampler import SeededTrainSampler

    ranks = [SeededTrainSampler(range(10), seed=3, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(1)
    shards = [list(s) for s in ranks]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(set(sum(shards, []))) == list(range(10))             # every item, two repeated as padding
    one = SeededTrainSampler(range(10), seed=3, num_replicas=1, rank=0)
    one.set_epoch(1)
    full = list(one)
    assert shards[0] == (full + full[:2])[0::3]                        # rank r reads r, r + W, ... of the order
    one.skip(4)
    assert list(one) == full[4:] and list(one) == full                 # a skip applies to one iteration only
    assert len(one) == 10
    one.set_epoch(2)
    assert sorted(one) == list(range(10)) and list(one) != full
    assert list(SeededTrainSampler(range(10), seed=4, num_replicas=1, rank=0)) != list(SeededTrainSampler(
        range(10), seed=3, num_replicas=1, rank=0))
    with pytest.raises(ValueError, match="cannot skip 11"):
        one.skip(11)
