"""Resuming killed runs exactly, mid-epoch included.

* ``resume_from=<ckpt>`` or ``resume=True`` (the newest ``version_<n>/checkpoints/last.ckpt`` of the run's base
  directory) is handed to ``Trainer.fit(ckpt_path=...)``: Lightning restores model, optimizer, scheduler, global
  step, loop progress and the checkpoint callbacks' state (which checkpoint is best so far).
* The resumed run continues in the run directory of that checkpoint (:func:`resume_run_dir`). Lightning keeps
  the best-checkpoint record only when the checkpoint folder is unchanged; in a new folder the first
  validation after the resume would count as "best" and the final test would use a worse epoch.
* :class:`ResumeState` adds what Lightning does not restore: the Python / NumPy / torch RNG states at save time
  and the position in the epoch. The data order is a function of (seed, epoch) (:mod:`mdpl.data.sampler`), so a
  mid-epoch resume skips exactly the batches already trained on, in every run, with or without
  ``checkpoint_every_n_steps``, under DDP too.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from mdpl.errors import UserInputError

STATE_KEY = "mdpl_resume"
# Keys that decide the data and the optimisation: a resumed run must keep them to continue the same run.
RUN_KEYS = ("seed", "per_gpu_batchsize", "batch_size", "missing_ratio", "missing_type", "both_ratio",
            "simulate_missing", "learning_rate", "weight_decay", "warmup_steps", "decay_power", "end_lr")


def resolve_resume_path(config: Mapping, base_dir: Path) -> str | None:
    """The checkpoint to resume from: ``resume_from``, else (``resume=True``) the newest version's last.ckpt."""
    path = config.get("resume_from") or ""
    if path:
        if not Path(path).is_file():
            raise UserInputError(f"resume_from={path} does not exist; pass a .ckpt of a previous run "
                                 f"(e.g. {base_dir}/version_0/checkpoints/last.ckpt)")
        return str(path)
    if not config.get("resume"):
        return None
    versions = sorted((p for p in base_dir.glob("version_*") if (p / "checkpoints" / "last.ckpt").is_file()),
                      key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    if not versions:
        raise UserInputError(f"resume=True but no {base_dir}/version_*/checkpoints/last.ckpt exists; "
                             "start without resume, or pass resume_from=<ckpt>")
    return str(versions[-1] / "checkpoints" / "last.ckpt")


def resume_run_dir(checkpoint_path: str | Path) -> Path:
    """The run directory a checkpoint belongs to (``<run_dir>/checkpoints/<name>.ckpt``): the resumed run goes on there."""
    path = Path(checkpoint_path).resolve()
    if path.parent.name != "checkpoints":
        raise UserInputError(f"cannot resume from {checkpoint_path}: it is not in the checkpoints/ folder of an mdpl run "
                             "directory, where the resumed run continues (and finds its best checkpoint so far); "
                             "move it back or pass load_path=<ckpt> to start a new run from its weights")
    return path.parent.parent


def check_resume_config(checkpoint_path: str, config: Mapping) -> None:
    """UserInputError naming the keys where the checkpoint's config differs from this run's."""
    from mdpl.engine.module import config_mismatches, to_plain

    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    ckpt_config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if ckpt_config is None or STATE_KEY not in ckpt:
        raise UserInputError(f"resume_from {checkpoint_path} is not an mdpl training checkpoint (no config or resume "
                             "state); resume from <run_dir>/checkpoints/last.ckpt")
    bad = config_mismatches(ckpt_config, config)
    bad += [f"{k}: checkpoint={ckpt_config[k]!r} vs config={config[k]!r}" for k in RUN_KEYS
            if k in ckpt_config and k in config and to_plain(ckpt_config[k]) != to_plain(config[k])]
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


class ResumeState(pl.Callback):
    """Saves the global RNG states and the position in the epoch in every checkpoint; restores them on resume.

    The data order itself needs no state: it is a function of (seed, epoch) (:mod:`mdpl.data.sampler`), so a
    resumed run only has to skip the batches of the current epoch that were already trained on.
    """

    def __init__(self) -> None:
        self._rng: Mapping | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loop = trainer.fit_loop.epoch_loop
        checkpoint[STATE_KEY] = {"rng": rng_states(), "epoch": trainer.current_epoch,
                                 "batches_done": int(loop.batch_progress.current.processed),
                                 "num_batches": trainer.num_training_batches}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":   # trainer.test(ckpt_path=best) loads weights only
            return
        state = checkpoint.get(STATE_KEY)
        if not state:
            raise UserInputError("this checkpoint has no mdpl resume state (RNG, epoch position); resume from the "
                                 "last.ckpt or best-*.ckpt of an mdpl training run")
        self._rng = state["rng"]
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


def resume_callbacks(config: Mapping, run_dir: Path) -> list[pl.Callback]:
    """[ResumeState] + a ModelCheckpoint writing last.ckpt every ``checkpoint_every_n_steps`` optimizer steps."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = int(config.get("checkpoint_every_n_steps") or 0)
    callbacks: list[pl.Callback] = [ResumeState()]
    if every > 0:   # monitor-less 'last' file: save_last=True would write last-v1.ckpt once the epoch-end last.ckpt exists
        callbacks.append(ModelCheckpoint(dirpath=Path(run_dir) / "checkpoints", filename="last", monitor=None,
                                         save_top_k=1, every_n_train_steps=every, enable_version_counter=False))
    return callbacks
