"""Where a run writes: log_dir/<exp_name>_seed<seed>_from_<stem of load_path | 'scratch'>/version_<n>/.

A new version_<n> is made for every run, so an earlier run's checkpoints are never overwritten; a resumed run
continues in the run directory of its checkpoint (``mdpl.engine.resume``), and a requeued SLURM job in the directory
it made before. A run that fails before its first step leaves none.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mdpl.config.run_config import RunConfig
from mdpl.engine.resume import record_slurm_job, resume_run_dir, slurm_job_id, slurm_run_dir


def run_base_dir(run: RunConfig) -> Path:
    """log_dir/<exp_name>_seed<seed>_from_<stem of load_path | 'scratch'> (D-54: Path.stem, not name[:-5])."""
    source = Path(run.model.load_path).stem if run.model.load_path else "scratch"
    return Path(run.logging.log_dir) / f"{run.experiment.exp_name}_seed{run.experiment.seed}_from_{source}"


def new_run_dir(run: RunConfig, resume_path: str | None = None) -> tuple[Path, bool]:
    """(run directory, whether this call created it). Called once per run, by global rank 0 (RunDirectory).

    A resumed run continues in its checkpoint's run directory; a requeued SLURM job that has no checkpoint yet in
    the directory it made (mdpl.engine.resume.slurm_run_dir) starts again there; any other run gets a fresh
    base/version_<n> (first unused n, claimed by an atomic mkdir). A training run in a SLURM batch job records
    the job id in its directory, so that the job finds it again after a requeue.
    """
    job = None if run.trainer.test_only else slurm_job_id()
    if resume_path:
        run_dir = resume_run_dir(resume_path)
        if job:
            record_slurm_job(run_dir, job)
        return run_dir, False
    base = run_base_dir(run)
    previous = slurm_run_dir(base, job) if job else None
    if previous is not None:
        return previous, False
    base.mkdir(parents=True, exist_ok=True)
    version = 0
    while True:
        run_dir = base / f"version_{version}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            version += 1
    if job:
        record_slurm_job(run_dir, job)
    return run_dir, True


def remove_if_empty_run(run_dir: Path, trained_steps: int) -> None:
    """Delete a run directory this process created when the run failed before training (no step, no checkpoint)."""
    if trained_steps == 0 and not any(run_dir.rglob("*.ckpt")) and not (run_dir / "test_metrics.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()
