"""Resuming killed runs exactly, mid-epoch included.

* ``resume_from=<ckpt>`` or ``resume=True`` (the newest ``version_<n>/checkpoints/last.ckpt`` of the run's base
  directory) is handed to ``Trainer.fit(ckpt_path=...)``: Lightning restores model, optimizer, scheduler, global
  step, loop progress and the checkpoint callbacks' state (which checkpoint is best so far).
* The resumed run continues in the run directory of that checkpoint (:func:`resume_run_dir`). Lightning keeps
  the best-checkpoint record only when the checkpoint folder is unchanged; in a new folder the first
  validation after the resume would count as "best" and the final test would use a worse epoch.
* A SLURM batch job that was requeued (same ``SLURM_JOB_ID``, a new process; e.g. by Lightning's auto-requeue on
  ``SIGUSR1``, which first saves ``<run_dir>/hpc_ckpt_<n>.ckpt``) finds its run directory again by the job id that
  its first start recorded there (:data:`SLURM_JOB_FILE`) and resumes from the newest checkpoint in it
  (``hpc_ckpt_<n>.ckpt`` or ``checkpoints/last.ckpt``), without ``resume=True``.
* :class:`ResumeState` adds what Lightning does not restore: the Python / NumPy / torch RNG states at save time
  and the position in the epoch. The data order is a function of (seed, epoch) (:mod:`mdpl.data.sampler`), so a
  mid-epoch resume skips exactly the batches already trained on, in every run, with or without
  ``checkpoint_every_n_steps``, under DDP too.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from mdpl.config import RunConfig, checkpoint_mismatches
from mdpl.atomic import write_text_atomic
from mdpl.errors import UserInputError

STATE_KEY = "mdpl_resume"
# Keys that decide the data and the optimisation: a resumed run must keep them to continue the same run.
RUN_KEYS = ("seed", "per_gpu_batchsize", "batch_size", "missing_ratio", "missing_type", "both_ratio",
            "simulate_missing", "learning_rate", "weight_decay", "warmup_steps", "decay_power", "end_lr")
SLURM_JOB_FILE = "slurm_job_id"
"""File in a training run's directory: the id of the SLURM job that last trained in it (found again on requeue)."""
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_\d+\.ckpt")
"""Lightning's SLURM requeue checkpoints, saved in the trainer's default_root_dir = the run directory."""


def slurm_job_id() -> str | None:
    """This SLURM batch job's id as ``scontrol requeue`` names it (``<array job>_<task>`` for an array task); None
    outside SLURM and in interactive allocations (``SLURM_JOB_NAME`` bash / interactive, as Lightning decides)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.job_id() is None:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array else os.environ["SLURM_JOB_ID"]


def record_slurm_job(run_dir: Path, job_id: str) -> None:
    write_text_atomic(Path(run_dir) / SLURM_JOB_FILE, job_id + "\n")


def _slurm_job_of(run_dir: Path) -> str | None:
    path = Path(run_dir) / SLURM_JOB_FILE
    if not path.is_file():
        return None
    # a damaged record names no job: that directory is not this job's (a requeued job then starts a new one)
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def slurm_run_dir(base_dir: Path, job_id: str) -> Path | None:
    """The run directory under ``base_dir`` that SLURM job ``job_id`` used before it was requeued, or None."""
    found = [p for p in Path(base_dir).glob("version_*") if _slurm_job_of(p) == job_id]
    return max(found, key=_version_number) if found else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written of ``hpc_ckpt_<n>.ckpt`` (SLURM requeue) and ``checkpoints/last.ckpt``, or None."""
    candidates = [p for p in Path(run_dir).iterdir() if HPC_CHECKPOINT.fullmatch(p.name)]
    candidates += [p for p in [Path(run_dir) / "checkpoints" / "last.ckpt"] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def _version_number(path: Path) -> int:
    suffix = path.name.split("_")[1]
    return int(suffix) if suffix.isdigit() else -1


def resolve_resume_path(config: RunConfig | Mapping, base_dir: Path) -> str | None:
    """The checkpoint to resume from: in a requeued SLURM job, the newest checkpoint of the run directory this job
    used before (:func:`slurm_run_dir`; it restarts with the same command line, so this goes before
    ``resume_from``); else ``resume_from``; else (``resume=True``) the newest version's last.ckpt."""
    trainer = RunConfig.coerce(config).trainer
    path = trainer.resume_from or ""
    if path and not Path(path).is_file():
        raise UserInputError(f"resume_from={path} does not exist; pass a .ckpt of a previous run "
                             f"(e.g. {base_dir}/version_0/checkpoints/last.ckpt)")
    job = slurm_job_id()
    previous = slurm_run_dir(base_dir, job) if job else None
    if previous is None and job and path:   # resumed from resume_from, in a directory outside base_dir
        previous = resume_run_dir(path) if _slurm_job_of(resume_run_dir(path)) == job else None
    if previous is not None and (checkpoint := newest_checkpoint(previous)) is not None:
        from pytorch_lightning.utilities import rank_zero_info
        rank_zero_info(f"[mdpl] SLURM job {job} was requeued: resuming from {checkpoint} in its run directory")
        return str(checkpoint)
    if path:
        return str(path)
    if not trainer.resume:
        return None
    versions = sorted((p for p in base_dir.glob("version_*") if (p / "checkpoints" / "last.ckpt").is_file()),
                      key=_version_number)
    if not versions:
        raise UserInputError(f"resume=True but no {base_dir}/version_*/checkpoints/last.ckpt exists; "
                             "start without resume, or pass resume_from=<ckpt>")
    return str(versions[-1] / "checkpoints" / "last.ckpt")


def resume_run_dir(checkpoint_path: str | Path) -> Path:
    """The run directory a checkpoint belongs to (``<run_dir>/checkpoints/<name>.ckpt``, or a SLURM requeue
    checkpoint ``<run_dir>/hpc_ckpt_<n>.ckpt``): the resumed run goes on there."""
    path = Path(checkpoint_path).resolve()
    if HPC_CHECKPOINT.fullmatch(path.name):
        return path.parent
    if path.parent.name != "checkpoints":
        raise UserInputError(f"cannot resume from {checkpoint_path}: it is not in the checkpoints/ folder of an mdpl run "
                             "directory, where the resumed run continues (and finds its best checkpoint so far); "
                             "move it back or pass load_path=<ckpt> to start a new run from its weights")
    return path.parent.parent


def check_resume_config(checkpoint_path: str, config: RunConfig | Mapping) -> None:
    """UserInputError naming the keys where the checkpoint's config differs from this run's."""
    try:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)   # the run's own checkpoint
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged or cut-short file
        folder = Path(checkpoint_path).parent
        folder = folder if folder.name == "checkpoints" else folder / "checkpoints"
        raise UserInputError(f"cannot resume from {checkpoint_path}: it is damaged or cut short ({type(err).__name__}:"
                             f" {str(err)[:160]}); resume from another checkpoint of the run with resume_from=<ckpt> "
                             f"(e.g. {folder}/best-*.ckpt) or start again without resume") from None
    ckpt_config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if ckpt_config is None or STATE_KEY not in ckpt:
        raise UserInputError(f"resume_from {checkpoint_path} is not an mdpl training checkpoint (no config or resume "
                             "state); resume from <run_dir>/checkpoints/last.ckpt")
    bad = checkpoint_mismatches(ckpt_config, RunConfig.coerce(config), extra_keys=RUN_KEYS)
    if bad:
        raise UserInputError(f"cannot resume from {checkpoint_path}: " + "; ".join(bad))


def rng_states() -> dict:
    """Global RNG states in types that `torch.load(weights_only=True)` accepts (numpy's array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _every_rank(value: object, trainer: pl.Trainer) -> list:
    """[value of rank 0, rank 1, ...] on every rank (a collective: every rank saves the checkpoint's content)."""
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list = [None] * trainer.world_size
        dist.all_gather_object(out, value)
        return out
    return [value]


class ResumeState(pl.Callback):
    """Saves the global RNG states and the position in the epoch in every checkpoint; restores them on resume.

    The data order itself needs no state: it is a function of (seed, epoch) (:mod:`mdpl.data.sampler`), so a
    resumed run only has to skip the batches of the current epoch that were already trained on.
    """

    def __init__(self) -> None:
        self._rng: Mapping | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loop = trainer.fit_loop.epoch_loop
        checkpoint[STATE_KEY] = {"rng_per_rank": _every_rank(rng_states(), trainer), "epoch": trainer.current_epoch,
                                 "batches_done": int(loop.batch_progress.current.processed),
                                 "num_batches": trainer.num_training_batches}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":   # trainer.test(ckpt_path=best) loads weights only
            return
        state = checkpoint.get(STATE_KEY)
        if not state:
            raise UserInputError("this checkpoint has no mdpl resume state (RNG, epoch position); resume from the "
                                 "last.ckpt or best-*.ckpt of an mdpl training run")
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) != trainer.world_size:
            raise UserInputError(f"this checkpoint was written by {len(per_rank)} processes, the run has "
                                 f"{trainer.world_size}: resume with the same number of processes")
        self._rng = per_rank[trainer.global_rank]   # each rank's own: under DDP their dropout draws differ
        done, total = int(state["batches_done"]), state["num_batches"]
        if 0 < done < total:
            skip = getattr(trainer.datamodule, "skip_train_batches", None)
            if skip is None:
                raise RuntimeError("a mid-epoch resume needs a datamodule with skip_train_batches (MDPLDataModule)")
            skip(done)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None


def resume_callbacks(config: RunConfig | Mapping) -> list[pl.Callback]:
    """[ResumeState] + a ModelCheckpoint writing last.ckpt every ``checkpoint_every_n_steps`` optimizer steps (its
    folder, <run_dir>/checkpoints, is set once the run directory is known: mdpl.engine.trainer.RunDirectory)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = int(RunConfig.coerce(config).trainer.checkpoint_every_n_steps or 0)
    callbacks: list[pl.Callback] = [ResumeState()]
    if every > 0:   # monitor-less 'last' file: save_last=True would write last-v1.ckpt once the epoch-end last.ckpt exists
        callbacks.append(ModelCheckpoint(dirpath=None, filename="last", monitor=None,
                                         save_top_k=1, every_n_train_steps=every, enable_version_counter=False))
    return callbacks
