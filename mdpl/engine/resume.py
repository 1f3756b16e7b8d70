"""Resuming killed runs exactly, mid-epoch included (issue 7).

* ``resume_from=<ckpt>`` or ``resume=True`` (the newest ``version_<n>/checkpoints/last.ckpt`` of the run's base
  directory) is handed to ``Trainer.fit(ckpt_path=...)``: Lightning restores model, optimizer, scheduler, global
  step and loop progress. The resumed run writes to a new ``version_<n>`` (the killed run's files stay).
* :class:`ResumeState` adds what Lightning does not restore: the Python / NumPy / torch RNG states at save time,
  and the position in the epoch. With ``checkpoint_every_n_steps > 0`` (or when resuming) the train loader
  uses :class:`EpochSeededSampler` (permutation = f(seed, epoch), own loader generator: no global RNG is
  consumed by the data order), so a mid-epoch resume skips exactly the batches already trained on.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

STATE_KEY = "mdpl_resume"


def resolve_resume_path(config: Mapping, base_dir: Path) -> str | None:
    """The checkpoint to resume from: ``resume_from``, else (``resume=True``) the newest version's last.ckpt."""
    path = config.get("resume_from") or ""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"resume_from={path} does not exist; pass a .ckpt of a previous run "
                                    f"(e.g. {base_dir}/version_0/checkpoints/last.ckpt)")
        return str(path)
    if not config.get("resume"):
        return None
    versions = sorted((p for p in base_dir.glob("version_*") if (p / "checkpoints" / "last.ckpt").is_file()),
                      key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    if not versions:
        raise FileNotFoundError(f"resume=True but no {base_dir}/version_*/checkpoints/last.ckpt exists; "
                                "start without resume, or pass resume_from=<ckpt>")
    return str(versions[-1] / "checkpoints" / "last.ckpt")


def check_resume_config(checkpoint_path: str, config: Mapping) -> None:
    """ValueError naming the model keys where the checkpoint's config differs from this run's."""
    from mdpl.engine.module import config_mismatches

    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    ckpt_config = ckpt.get("hyper_parameters", {}).get("config")
    if ckpt_config is None:
        raise ValueError(f"resume_from {checkpoint_path} is not an mdpl training checkpoint (no hyper_parameters.config)")
    bad = config_mismatches(ckpt_config, config)
    if bad:
        raise ValueError(f"cannot resume from {checkpoint_path}: " + "; ".join(bad))


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from ``seed`` and the epoch (``set_epoch``, called by Lightning).

    ``skip`` items are dropped from the start of the next iteration only (mid-epoch resume).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


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
    """Saves RNG states + epoch position in every checkpoint; on resume restores them (module docstring).

    ``seeded_sampler``: replace the datamodule's shuffled train loader by one with :class:`EpochSeededSampler`.
    """

    def __init__(self, seed: int, seeded_sampler: bool) -> None:
        self.seed, self.seeded_sampler = int(seed), seeded_sampler
        self._skip_batches, self._rng = 0, None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or not self.seeded_sampler or datamodule is None or getattr(datamodule, "_mdpl_seeded", False):
            return
        original = datamodule.train_dataloader

        def train_dataloader() -> DataLoader:
            return self._seeded_loader(original())

        datamodule.train_dataloader = train_dataloader
        datamodule._mdpl_seeded = True

    def _seeded_loader(self, loader: DataLoader) -> DataLoader:
        sampler = EpochSeededSampler(len(loader.dataset), self.seed)
        sampler.skip, self._skip_batches = self._skip_batches * int(loader.batch_size), 0
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          drop_last=loader.drop_last, persistent_workers=loader.persistent_workers,
                          worker_init_fn=loader.worker_init_fn,
                          generator=torch.Generator().manual_seed(self.seed))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loop = trainer.fit_loop.epoch_loop
        checkpoint[STATE_KEY] = {"rng": rng_states(), "epoch": trainer.current_epoch,
                                 "batches_done": int(loop.batch_progress.current.processed),
                                 "num_batches": trainer.num_training_batches}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if not state:
            return
        self._rng = state["rng"]
        done, total = int(state["batches_done"]), state["num_batches"]
        self._skip_batches = done if 0 < done < total else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None


def resume_callbacks(config: Mapping, run_dir: Path) -> list[pl.Callback]:
    """[ResumeState] + a ModelCheckpoint writing last.ckpt every ``checkpoint_every_n_steps`` optimizer steps."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = int(config.get("checkpoint_every_n_steps") or 0)
    resuming = bool(config.get("resume_from") or config.get("resume"))
    callbacks: list[pl.Callback] = [ResumeState(int(config.get("seed", 0)), seeded_sampler=every > 0 or resuming)]
    if every > 0:   # monitor-less 'last' file: save_last=True would write last-v1.ckpt once the epoch-end last.ckpt exists
        callbacks.append(ModelCheckpoint(dirpath=Path(run_dir) / "checkpoints", filename="last", monitor=None,
                                         save_top_k=1, every_n_train_steps=every, enable_version_counter=False))
    return callbacks
