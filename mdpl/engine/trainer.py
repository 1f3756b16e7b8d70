"""`build_trainer(config, run_dir)`: the Lightning Trainer of a run (METHODS.md §7.4, defects D-47, D-49, D-55).

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
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from mdpl.engine.resume import resume_callbacks

MONITOR = "val/the_metric"
PRECISIONS = {"16": "16-mixed", "16-mixed": "16-mixed", "32": "32-true", "32-true": "32-true",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true", "64": "64-true",
              "64-true": "64-true"}


def resolve_devices(config: dict) -> tuple[str, int, int]:
    """(accelerator, devices per node, num_nodes) from num_gpus / num_cpu_processes / num_nodes."""
    num_gpus, num_nodes = int(config.get("num_gpus", 0)), int(config.get("num_nodes", 1))
    if num_gpus < 0 or num_nodes < 1:
        raise ValueError(f"num_gpus must be >= 0 and num_nodes >= 1, got {num_gpus} and {num_nodes}")
    if num_gpus == 0:
        processes = int(config.get("num_cpu_processes", 1))
        if processes < 1:
            raise ValueError(f"num_cpu_processes must be >= 1, got {processes}")
        return "cpu", processes, num_nodes
    if not torch.cuda.is_available():
        raise ValueError(f"num_gpus={num_gpus} but CUDA is not available; pass num_gpus=0 to run on the CPU")
    return "gpu", num_gpus, num_nodes


def resolve_precision(precision, accelerator: str) -> str:
    """Lightning precision string from the config value (see module docstring for the CPU fallback)."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of 16, 32, 'bf16' or {sorted(set(PRECISIONS.values()))}")
    resolved = PRECISIONS[key]
    if accelerator == "cpu" and resolved == "16-mixed":
        warnings.warn("precision 16-mixed (fp16 AMP) is not available on the CPU; using 32-true", stacklevel=2)
        return "32-true"
    if (accelerator == "gpu" and resolved.startswith("bf16") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        warnings.warn(f"this GPU has no bf16 support; precision {resolved} -> 16-mixed (fp16 AMP)", stacklevel=2)
        return "16-mixed"
    return resolved


def accumulation(config: dict, devices: int, num_nodes: int) -> int:
    """max(1, batch_size // (per_gpu_batchsize * devices * num_nodes)); prints the effective batch (D-55)."""
    per_gpu, batch_size = int(config["per_gpu_batchsize"]), int(config["batch_size"])
    if per_gpu <= 0:
        raise ValueError(f"per_gpu_batchsize must be > 0 (got {per_gpu}); set e.g. per_gpu_batchsize=32")
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


def determinism(config: dict, accelerator: str):
    """Lightning `deterministic` value (default 'warn'); sets CUBLAS_WORKSPACE_CONFIG for cuBLAS determinism."""
    value = config.get("deterministic", "warn")
    if value and accelerator == "gpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return value


def build_callbacks(run_dir: Path, progress_bar: bool = True) -> list[pl.Callback]:
    """Best (by val/the_metric, max; first, = trainer.checkpoint_callback) + last checkpoints in run_dir/checkpoints,
    LR monitor, progress bar."""
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:02d}-step{step}",
                                 auto_insert_metric_name=False, monitor=MONITOR, mode="max", save_top_k=1)
    # Lightning >= 2.6 writes save_last=True's last.ckpt only when a best file is written (then last == best);
    # a monitor-less callback rewrites last.ckpt at every validation, so it holds the latest weights.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    callbacks: list[pl.Callback] = [checkpoint, last, LearningRateMonitor(logging_interval="step")]
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


def build_trainer(config: dict, run_dir: str | Path, **overrides) -> pl.Trainer:
    """Trainer for `config` writing checkpoints, TensorBoard and CSV logs under `run_dir`.

    `overrides` are passed to `pl.Trainer` last (tests: limit_train_batches, enable_progress_bar, ...).
    Seeds everything with config seed first.
    """
    run_dir = Path(run_dir)
    pl.seed_everything(int(config["seed"]), workers=True)
    accelerator, devices, num_nodes = resolve_devices(config)
    strategy = DDPStrategy(find_unused_parameters=bool(config.get("find_unused_parameters", False)),
                           process_group_backend="gloo" if accelerator == "cpu" else None) \
        if devices * num_nodes > 1 else "auto"
    max_steps = config.get("max_steps")
    kwargs = dict(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=resolve_precision(config.get("precision", 32), accelerator),
        accumulate_grad_batches=accumulation(config, devices, num_nodes),
        max_epochs=int(config["max_epoch"]), max_steps=-1 if max_steps is None else int(max_steps),
        val_check_interval=config.get("val_check_interval", 1.0),
        callbacks=build_callbacks(run_dir, progress_bar=overrides.get("enable_progress_bar", True))
        + resume_callbacks(config, run_dir),  # RNG/epoch-position state, mid-epoch last.ckpt (resume.py)
        logger=[TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
                CSVLogger(save_dir=str(run_dir), name="csv", version="")],
        deterministic=determinism(config, accelerator), benchmark=False,
        log_every_n_steps=10, num_sanity_val_steps=2, fast_dev_run=config.get("fast_dev_run", False),
        default_root_dir=str(run_dir),
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
