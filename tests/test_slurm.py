"""A requeued SLURM job continues its own run: same run directory, newest checkpoint, the uninterrupted result.

No cluster is needed: the runs get the environment a one-task ``srun`` job has (SLURM_JOB_ID, SLURM_NTASKS=1,
SLURM_PROCID=0, ...), so Lightning picks its SLURMEnvironment (auto-requeue handler on SIGUSR1), and ``scontrol``
is a stub on PATH that records its arguments. A job is stopped at a step the test chooses (``tests/killed_run.py``:
SIGKILL at the first batch after optimizer step K, optionally after SIGUSR1, SLURM's warning before a requeue),
then started again with the same job id and nothing else changed, as SLURM does after ``scontrol requeue``.
CPU, fp32, deterministic, MAP with dropout on, tiny ViLT, synthetic Food-101: 8 optimizer steps per epoch.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import assert_same_run, synthetic_arrows

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, BATCH, EPOCHS = 32, 4, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH
BASE = "finetune_food101_seed0_from_scratch"
KILL_AT = STEPS_PER_EPOCH + 3          # mid-epoch 1; the newest last.ckpt is the one of the epoch end (step 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm_data")
    data = synthetic_arrows(root, "food101", N_TRAIN, 8, 8)
    scontrol = root / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$MDPL_TEST_SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    return {**data, "bin": scontrol.parent}


def _env(data: dict, job_id: str | None, log: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MDPL_TEST_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    if job_id is not None:   # one task of a batch job (a job name other than bash / interactive)
        env.update(SLURM_JOB_ID=job_id, SLURM_JOB_NAME="mdpl-test", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                   SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                   PATH=f"{data['bin']}{os.pathsep}{env.get('PATH', '')}",
                   MDPL_TEST_SCONTROL_LOG=str(log or Path(os.devnull)))
    return env


def _run(data: dict, log_dir: Path, env: dict, kill_after: int | None = None) -> subprocess.CompletedProcess:
    script = "tests/killed_run.py" if kill_after is not None else "run.py"
    cmd = [sys.executable, script, "with", "task_finetune_food101", "map", "tiny", f"data_root={data['arrow']}",
           f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={log_dir}",
           f"per_gpu_batchsize={BATCH}", f"batch_size={BATCH}", f"max_epoch={EPOCHS}", "deterministic=True"]
    if kill_after is not None:
        env = {**env, "MDPL_TEST_KILL_AFTER_STEP": str(kill_after)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)


def _killed(data: dict, log_dir: Path, env: dict, step: int) -> None:
    out = _run(data, log_dir, env, kill_after=step)
    assert out.returncode == -signal.SIGKILL, f"not killed (rc {out.returncode}): {out.stderr[-3000:]}"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_run(ref: Path, resumed: Path) -> None:
    """assert_same_run, after all EPOCHS epochs."""
    assert _load(ref / "checkpoints" / "last.ckpt")["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_run(ref, resumed)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    out = _run(data, log_dir, _env(data, None))
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir / BASE / "version_0"


def test_requeued_job_resumes_from_last_checkpoint_in_its_own_run_directory(data, uninterrupted, tmp_path) -> None:
    _killed(data, tmp_path, _env(data, "4242"), KILL_AT)              # job 4242: version_0, killed mid-epoch 1
    _killed(data, tmp_path, _env(data, "5151"), 2)                    # another job's newer run: version_1
    run_dir, other = tmp_path / BASE / "version_0", tmp_path / BASE / "version_1"
    assert (run_dir / "slurm_job_id").read_text().strip() == "4242"
    assert (other / "slurm_job_id").read_text().strip() == "5151"
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH

    out = _run(data, tmp_path, _env(data, "4242"))                   # requeued: same job id, no resume flag
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SLURM job 4242 was requeued" in out.stderr and "last.ckpt" in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / BASE).iterdir()) == ["version_0", "version_1"]   # no new version
    assert not (other / "test_metrics.json").exists()                 # the other job's run is untouched
    _assert_same_run(uninterrupted, run_dir)


def test_requeue_signal_checkpoint_is_resumed_by_the_requeued_job(data, uninterrupted, tmp_path) -> None:
    requeued = tmp_path / "scontrol.log"
    env = _env(data, "4243", requeued)
    out = _run(data, tmp_path, {**env, "MDPL_TEST_SIGNAL_BEFORE_KILL": "SIGUSR1"}, kill_after=KILL_AT)
    assert out.returncode == -signal.SIGKILL, f"not killed (rc {out.returncode}): {out.stderr[-3000:]}"
    assert requeued.read_text().split() == ["requeue", "4243"]       # Lightning asked SLURM to requeue this job
    run_dir = tmp_path / BASE / "version_0"
    hpc = _load(run_dir / "hpc_ckpt_1.ckpt")                         # saved by the handler into the run directory
    assert hpc["global_step"] == KILL_AT and hpc["mdpl_resume"]["batches_done"] == KILL_AT - STEPS_PER_EPOCH
    assert _load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH   # older than hpc

    out = _run(data, tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SLURM job 4243 was requeued: resuming from" in out.stderr and "hpc_ckpt_1.ckpt" in out.stderr
    assert sorted(p.name for p in (tmp_path / BASE).iterdir()) == ["version_0"]
    _assert_same_run(uninterrupted, run_dir)


def test_slurm_job_id_and_checkpoint_choice(tmp_path, monkeypatch) -> None:
    from mdpl.engine.resume import newest_checkpoint, resume_run_dir, slurm_job_id, slurm_run_dir

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")                      # an interactive allocation: not a batch job
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert slurm_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "70_3"                                   # the id `scontrol requeue` is given

    base = tmp_path / "base"
    for version, job in ((0, "70_3"), (1, "70_4"), (2, "70_3")):
        (base / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (base / f"version_{version}" / "slurm_job_id").write_text(job + "\n")
    assert slurm_run_dir(base, "70_3") == base / "version_2" and slurm_run_dir(base, "9") is None
    run_dir = base / "version_0"
    assert newest_checkpoint(run_dir) is None
    last, hpc = run_dir / "checkpoints" / "last.ckpt", run_dir / "hpc_ckpt_2.ckpt"
    last.write_bytes(b"")
    hpc.write_bytes(b"")
    os.utime(hpc, ns=(10**18, 10**18))
    os.utime(last, ns=(2 * 10**18, 2 * 10**18))
    assert newest_checkpoint(run_dir) == last                         # written after the requeue checkpoint
    os.utime(hpc, ns=(3 * 10**18, 3 * 10**18))
    assert newest_checkpoint(run_dir) == hpc
    assert resume_run_dir(hpc) == resume_run_dir(last) == run_dir.resolve()


def test_requeue_goes_before_resume_from_and_a_resumed_run_records_its_job(tmp_path, monkeypatch) -> None:
    from mdpl.config import RunConfig
    from mdpl.engine import run_dir as run_script
    from mdpl.engine.resume import resolve_resume_path

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    config = {"log_dir": str(tmp_path), "exp_name": "x", "seed": 0, "load_path": "", "test_only": False}
    base = run_script.run_base_dir(RunConfig.coerce(config))
    old = base / "version_0" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    config["resume_from"] = str(old)
    assert resolve_resume_path(config, base) == str(old)                           # outside SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert resolve_resume_path(config, base) == str(old)                           # first start of job 31
    assert run_script.new_run_dir(RunConfig.coerce(config), str(old)) == (base / "version_0", False)
    assert (base / "version_0" / "slurm_job_id").read_text() == "31\n"             # the resumed run is job 31's now
    hpc = base / "version_0" / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(old, ns=(10**18, 10**18))
    assert resolve_resume_path(config, base) == str(hpc)                           # requeued: its newest checkpoint
    monkeypatch.setenv("SLURM_JOB_ID", "32")                                       # another job: resume_from again
    assert resolve_resume_path(config, base) == str(old)
    fresh, created = run_script.new_run_dir(RunConfig.coerce({**config, "resume_from": ""}))
    assert (fresh, created) == (base / "version_1", True) and (fresh / "slurm_job_id").read_text() == "32\n"
    assert run_script.new_run_dir(RunConfig.coerce({**config, "resume_from": ""})) == (base / "version_1", False)   # found again
    tested, _ = run_script.new_run_dir(RunConfig.coerce({**config, "resume_from": "", "test_only": True}))
    assert tested == base / "version_2" and not (tested / "slurm_job_id").exists()  # test_only: never resumed
