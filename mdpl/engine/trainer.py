"""`build_trainer(config, run_dir)`: the Lightning Trainer of a run (docs/methods.md §7.4, defects D-47, D-49, D-55).

Decisions:
* Devices: num_gpus = 0 -> CPU with num_cpu_processes processes (default 1); num_gpus > 0 -> that many GPUs per
  node (error if CUDA is absent). DDP (find_unused_parameters=False; gloo backend on CPU) when
  devices * num_nodes > 1; val/test loaders then shard without padding (MDPLDataModule, D-46).
* Precision: 16 / '16' / '16-mixed' -> '16-mixed' (AMP fp16 + grad scaler), 32 -> '32-true', 'bf16' -> 'bf16-mixed'.
  On CPU fp16 AMP is unavailable: '16-mixed' falls back to '32-true' with a warning (bf16-mixed would change
  the numerics more; fp32 is the reference's numerics up to rounding).
* Determinism (D-49): deterministic='warn' (torch.use_deterministic_algorithms(warn_only=True): deterministic
  kernels where they exist, a warning otherwise), benchmark=False, CUBLAS_WORKSPACE_CONFIG=':4096:8' if unset.
  Config key `deterministic` (True | 'warn' | False) overrides.
* Effective batch (D-55): accumulate = max(1, batch_size // (per_gpu_batchsize * devices * num_nodes));
  the effective batch is printed and a warning is given when it differs from batch_size.
* Run directory (:class:`RunDirectory`): fixed, or chosen once the processes are connected: global rank 0 chooses
  (and creates) it in the first ``setup`` hook and broadcasts it, then every rank points its loggers, checkpoint
  folders and Lightning's ``default_root_dir`` at it. So every rank uses the same directory however the processes
  were started (Lightning's launcher, torchrun, srun), and no directory exists before the run has started.
* Loggers (config key ``logger``, a name or a list): tensorboard + csv by default; wandb (offline unless
  ``WANDB_MODE`` is set) and mlflow (``<run_dir>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set) when installed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from mdpl.config import RunConfig
from mdpl.engine.csv_logger import RunCSVLogger
from mdpl.config.sections import PRECISIONS
from mdpl.engine.resume import resume_callbacks
from mdpl.errors import UserInputError

MONITOR = "val/the_metric"
LOGGERS = {"tensorboard": "tensorboard", "csv": None, "wandb": "wandb", "mlflow": "mlflow"}
"""Logger name -> the package it needs (None: always available)."""
LOG_EVERY_N_STEPS = 10


def resolve_devices(config: RunConfig | Mapping) -> tuple[str, int, int]:
    """(accelerator, devices per node, num_nodes) from num_gpus / num_cpu_processes / num_nodes."""
    trainer = RunConfig.coerce(config).trainer
    num_gpus, num_nodes = int(trainer.num_gpus), int(trainer.num_nodes)
    if num_gpus < 0 or num_nodes < 1:
        raise UserInputError(f"num_gpus must be >= 0 and num_nodes >= 1, got {num_gpus} and {num_nodes}")
    if num_gpus == 0:
        processes = int(trainer.num_cpu_processes)
        if processes < 1:
            raise UserInputError(f"num_cpu_processes must be >= 1, got {processes}")
        return "cpu", processes, num_nodes
    if not torch.cuda.is_available():
        raise UserInputError(f"num_gpus={num_gpus} but CUDA is not available; pass num_gpus=0 to run on the CPU")
    return "gpu", num_gpus, num_nodes


def resolve_precision(precision, accelerator: str) -> str:
    """Lightning precision string from the config value (see module docstring for the CPU fallback)."""
    key = str(precision)
    if key not in PRECISIONS:
        raise UserInputError(f"precision={precision!r} is not supported; use one of 16, 32, 'bf16' or {sorted(set(PRECISIONS.values()))}")
    resolved = PRECISIONS[key]
    if accelerator == "cpu" and resolved == "16-mixed":
        warnings.warn("precision 16-mixed (fp16 AMP) is not available on the CPU; using 32-true", stacklevel=2)
        return "32-true"
    if (accelerator == "gpu" and resolved.startswith("bf16") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        warnings.warn(f"this GPU has no bf16 support; precision {resolved} -> 16-mixed (fp16 AMP)", stacklevel=2)
        return "16-mixed"
    return resolved


def accumulation(config: RunConfig | Mapping, devices: int, num_nodes: int) -> int:
    """max(1, batch_size // (per_gpu_batchsize * devices * num_nodes)); prints the effective batch (D-55)."""
    data = RunConfig.coerce(config).data
    per_gpu, batch_size = int(data.per_gpu_batchsize), int(data.batch_size)
    if per_gpu <= 0:
        raise UserInputError(f"per_gpu_batchsize must be > 0 (got {per_gpu}); set e.g. per_gpu_batchsize=32")
    per_step = per_gpu * devices * num_nodes
    accumulate = max(1, batch_size // per_step)
    effective = per_step * accumulate
    rank_zero_info(f"[mdpl] effective batch {effective} = per_gpu_batchsize {per_gpu} x devices {devices} x "
                   f"nodes {num_nodes} x accumulate {accumulate} (batch_size {batch_size})")
    if effective != batch_size:
        reason = "exceeds" if per_step > batch_size else "is not a multiple of"
        rank_zero_warn(f"effective batch {effective} differs from batch_size {batch_size} (per_gpu_batchsize x "
                       f"devices x nodes = {per_step} {reason} batch_size)")
    return accumulate


def determinism(config: RunConfig | Mapping, accelerator: str):
    """Lightning `deterministic` value (default 'warn'); sets CUBLAS_WORKSPACE_CONFIG for cuBLAS determinism."""
    value = RunConfig.coerce(config).trainer.deterministic
    if value and accelerator == "gpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return value


def logger_names(config: RunConfig | Mapping) -> list[str]:
    """The ``logger`` config key as a list of names: a name, a list, or the CLI forms 'csv,wandb' / '[csv,wandb]'
    (default tensorboard + csv). UserInputError (one line) for an unknown name or a missing package."""
    value = RunConfig.coerce(config).logging.logger
    if isinstance(value, str):
        names = [v.strip().strip("'\"").lower() for v in value.strip().strip("[]()").split(",")]
    else:
        names = [str(v).strip().lower() for v in (value or [])]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UserInputError(f"logger={value!r} names no logger; choose one or more of {', '.join(LOGGERS)} "
                             "(e.g. logger=csv or logger=[tensorboard,csv])")
    for name in names:
        if name not in LOGGERS:
            raise UserInputError(f"logger={value!r}: unknown logger {name!r}; choose one or more of "
                                 f"{', '.join(LOGGERS)} (e.g. logger=wandb or logger=[csv,mlflow])")
        package = LOGGERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise UserInputError(f"logger={name} needs the {package} package, which is not installed: "
                                 f"pip install {package} (or use logger=tensorboard,csv)")
    return names


def build_loggers(config: RunConfig | Mapping, run_dir: Path) -> list[Logger]:
    """The loggers named by the ``logger`` key, writing under ``run_dir`` (offline by default, see module doc)."""
    run_dir = Path(run_dir)
    project = str(RunConfig.coerce(config).experiment.exp_name)
    loggers: list[Logger] = []
    for name in logger_names(config):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        elif name == "csv":
            loggers.append(RunCSVLogger(save_dir=str(run_dir), name="csv", version=""))   # appends on resume
        elif name == "wandb":
            from pytorch_lightning.loggers import WandbLogger
            # offline (files in <run_dir>/wandb, `wandb sync` uploads them) unless WANDB_MODE says otherwise; the id
            # follows the run directory, so a resumed or requeued run goes on in the same wandb run
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            loggers.append(WandbLogger(save_dir=str(run_dir), project=project,
                                       name=f"{run_dir.parent.name}/{run_dir.name}", id=run_id,
                                       offline=not os.environ.get("WANDB_MODE")))
        elif name == "mlflow":
            from pytorch_lightning.loggers import MLFlowLogger
            # a local file store in the run directory unless MLFLOW_TRACKING_URI names a server; mlflow >= 3.x
            # refuses file stores (maintenance mode) unless MLFLOW_ALLOW_FILE_STORE opts in, which the user may override
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            loggers.append(MLFlowLogger(experiment_name=project,
                                        run_name=f"{run_dir.parent.name}/{run_dir.name}",
                                        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
                                        save_dir=str(run_dir / "mlruns")))
    return loggers


class RunDirectory(pl.Callback):
    """The run directory: ``path`` if given, else chosen by ``choose()`` -> (path, created) on global rank 0 in the
    first ``setup`` hook, when the processes of a DDP run are connected, and broadcast to the other ranks.

    Then the loggers (the ``logger`` key), every ModelCheckpoint without a folder (-> <run_dir>/checkpoints) and
    the trainer's ``default_root_dir`` (where Lightning's SLURM auto-requeue writes ``hpc_ckpt_<n>.ckpt``) are
    pointed at it, on every rank. ``created`` is True on the rank that created the directory.
    """

    def __init__(self, config: RunConfig | Mapping, path: str | Path | None = None,
                 choose: Callable[[], tuple[Path, bool]] | None = None) -> None:
        if (path is None) == (choose is None):
            raise ValueError("RunDirectory needs either a path or a choose function")
        self.config = RunConfig.coerce(config)
        self.path = None if path is None else Path(path)
        self.created = False
        self._choose = choose
        self.loggers = build_loggers(config, self.path) if self.path is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.path is None:
            self.path = self._chosen_on_rank_zero(trainer)
        if self.loggers is None:
            self.loggers = build_loggers(self.config, self.path)
            trainer.loggers = self.loggers
        trainer._default_root_dir = str(self.path)   # no public setter; read by the SLURM requeue handler
        for callback in trainer.checkpoint_callbacks:   # run before them: Lightning puts checkpoint callbacks last
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(self.path / "checkpoints")

    def _chosen_on_rank_zero(self, trainer: pl.Trainer) -> Path:
        chosen, error = None, None
        if trainer.is_global_zero:
            try:
                path, self.created = self._choose()
                chosen = str(path)
            except BaseException as err:   # tell the other ranks instead of leaving them waiting in broadcast
                error = err
        failure = None if error is None else f"{type(error).__name__}: {error}"
        chosen, message = trainer.strategy.broadcast((chosen, failure))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"global rank 0 could not create the run directory: {message}")
        return Path(chosen)


class FitLogInterval(pl.Callback):
    """log_every_n_steps = min(LOG_EVERY_N_STEPS, optimizer steps per epoch): an epoch shorter than the interval
    (tiny runs) still logs its training loss and learning rate, and Lightning has no reason to warn about it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        try:
            batches = len(datamodule.train_dataloader())
        except TypeError:   # an iterable without a length: keep the interval
            return
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * (limit or 1.0))
        steps = batches // max(1, trainer.accumulate_grad_batches)   # the interval counts optimizer steps
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))


def build_callbacks(progress_bar: bool = True) -> list[pl.Callback]:
    """Best (by val/the_metric, max; first, = trainer.checkpoint_callback) + last checkpoints (in <run_dir>/checkpoints,
    set by RunDirectory), LR monitor, progress bar."""
    checkpoint = ModelCheckpoint(dirpath=None, filename="best-epoch{epoch:02d}-step{step}",
                                 auto_insert_metric_name=False, monitor=MONITOR, mode="max", save_top_k=1)
    # Lightning >= 2.6 writes save_last=True's last.ckpt only when a best file is written (then last == best);
    # a monitor-less callback rewrites last.ckpt at every validation, so it holds the latest weights.
    last = ModelCheckpoint(dirpath=None, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    callbacks: list[pl.Callback] = [checkpoint, last, LearningRateMonitor(logging_interval="step")]
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


def build_trainer(config: RunConfig | Mapping, run_dir: str | Path | RunDirectory,
                  stages: Sequence[pl.Callback] = (), **overrides) -> pl.Trainer:
    """Trainer for `config` writing checkpoints and logs (TensorBoard and CSV by default) under `run_dir`: a path,
    or a RunDirectory whose directory global rank 0 chooses when the run starts. `stages`: callbacks that run before
    the others (the preparation stage, ``mdpl.engine.preparation``).

    `overrides` are passed to `pl.Trainer` last (tests: limit_train_batches, enable_progress_bar, ...).
    Seeds everything with config seed first.
    """
    run = RunConfig.coerce(config)
    trainer = run.trainer
    directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run, path=run_dir)
    pl.seed_everything(int(run.experiment.seed), workers=True)
    accelerator, devices, num_nodes = resolve_devices(run)
    strategy = DDPStrategy(find_unused_parameters=bool(trainer.find_unused_parameters),
                           process_group_backend="gloo" if accelerator == "cpu" else None) \
        if devices * num_nodes > 1 else "auto"
    max_steps = run.optim.max_steps
    kwargs = dict(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=resolve_precision(trainer.precision, accelerator),
        accumulate_grad_batches=accumulation(run, devices, num_nodes),
        max_epochs=int(run.optim.max_epoch), max_steps=-1 if max_steps is None else int(max_steps),
        val_check_interval=trainer.val_check_interval,
        callbacks=[directory, *stages, FitLogInterval(), *build_callbacks(overrides.get("enable_progress_bar", True)),
                   *resume_callbacks(run)],  # RNG/epoch-position state, mid-epoch last.ckpt (resume.py)
        logger=directory.loggers or False,   # a directory chosen at the start gets its loggers then
        deterministic=determinism(run, accelerator), benchmark=False,
        log_every_n_steps=LOG_EVERY_N_STEPS, num_sanity_val_steps=2, fast_dev_run=trainer.fast_dev_run,
        # until a chosen directory is known: its parent, where Lightning finds no SLURM hpc_ckpt_<n>.ckpt of its own
        default_root_dir=str(directory.path or Path(run.logging.log_dir or ".")),
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
