"""One benchmark row: build the model, time training and evaluation steps on synthetic batches, measure peak memory
and count FLOPs (samples/s, MiB, GFLOPs per sample, MFU)."""
from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch

from mdpl.bench.batches import synthetic_batch
from mdpl.bench.flops import autocast, count_flops, needed_flops, peak_tflops, sequence_length
from mdpl.bench.memory import MemoryMeter
from mdpl.bench.models import build_model, resolve_config
from mdpl.bench.profile import top_kernels
from mdpl.config import RunConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model, config: RunConfig | Mapping, device: torch.device, precision: str) -> tuple[Callable, Any]:
    """forward + loss + backward + optimizer step (GradScaler for fp16-mixed); a flat config is typed first."""
    from mdpl.engine.losses import task_loss
    from mdpl.engine.optim import build_optimizer

    run = RunConfig.coerce(config)
    opt = build_optimizer(model, run)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    dataset = run.data.dataset

    def step(batch: dict) -> torch.Tensor:
        with autocast(device, precision):
            loss = task_loss(dataset, model(batch)["logits"], batch["label"])
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    return step, opt


def make_eval_step(model, device: torch.device, precision: str) -> Callable:
    def step(batch: dict) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, precision):
            return model(batch)["logits"]

    return step


def time_loop(step: Callable, batches: list[dict], warmup: int, steps: int, device: torch.device,
              meter: MemoryMeter) -> tuple[float, float, float | None]:
    """Wall seconds and process CPU seconds per step (means over ``steps`` after ``warmup``) and the peak memory of
    all the steps.

    The meter starts before the warm-up: the first training step allocates the gradients and the
    optimizer state, and on CPU the allocator keeps that memory, so a meter started later sees ~0."""
    meter.start()
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[i % len(batches)])
    _sync(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps, meter.peak_mib()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_row(method: str, dataset: str, precision: str, batch_size: int, args, device: torch.device) -> dict:
    """One table row: build, train-time, eval-time, memory and MFU."""
    size_key = "small" if args.small else "full"
    padding = {} if args.text_padding == "default" else {"dynamic_text_padding": args.text_padding == "dynamic"}
    backbone = {} if args.backbone == "paper" else {"backbone": args.backbone}
    run = RunConfig.coerce(resolve_config(method, dataset, args.small,
                                          {"per_gpu_batchsize": batch_size, **padding, **backbone}))
    dynamic = run.pipeline.dynamic_text_padding
    row: dict[str, Any] = {"method": method, "backbone": run.experiment.backbone, "dataset": dataset,
                           "precision": precision, "batch": batch_size, "dynamic_text_padding": dynamic,
                           "status": "ok"}
    if device.type == "cpu" and precision == "fp16-mixed":
        row["status"] = "skipped: fp16-mixed needs CUDA"
        return row
    torch.manual_seed(0)
    raw = build_model(run).to(device)
    model = torch.compile(raw) if args.compile else raw
    row["params_total"], row["params_trainable"] = raw.trainable_parameters_report()
    batches = [synthetic_batch(run, batch_size, size_key, device, seed=s) for s in range(2)]
    batches = [{**b, **raw.prompt.synthetic_inputs(b)} for b in batches]   # e.g. retrieved neighbours
    row["seq_len"] = sequence_length(run, batches[0], raw)
    row["text_len"] = int(batches[0]["text_ids"].shape[1])
    row["image_hw"] = list(batches[0]["image"].shape[-2:])
    meter = MemoryMeter(device)
    row["mem_kind"] = meter.kind
    peak = peak_tflops(device, precision, args.peak_tflops, args.tf32)
    try:
        model.train()
        if hasattr(raw, "set_frozen_modes"):
            raw.set_frozen_modes()
        step, opt = make_train_step(model, run, device, precision)
        t_train, cpu_train, row["train_peak_mib"] = time_loop(step, batches, args.warmup, args.steps, device, meter)
        if getattr(args, "profile", 0):   # after the timed loop: the profiler's overhead stays out of the figures
            row["train_top_kernels"] = top_kernels(step, batches, device, args.profile)
        opt.zero_grad(set_to_none=True)
        del step, opt
        _free(device)
        model.eval()
        t_eval, cpu_eval, row["eval_peak_mib"] = time_loop(make_eval_step(model, device, precision), batches,
                                                           args.warmup, args.steps, device, meter)
        # counted after the timed loops, so that the memory figures are those of the steps alone
        flops = [count_flops(raw, run, b, device, precision) for b in batches]
        needed = [needed_flops(raw, run, b, device, precision) for b in batches]
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        row["status"] = "oom"
        return row
    fl_train = sum(f.train for f in flops) / len(flops)
    fl_eval = sum(f.forward for f in flops) / len(flops)
    need_train = sum(f.train for f in needed) / len(needed)
    need_eval = sum(f.forward for f in needed) / len(needed)
    row.update({
        "train_step_ms": 1e3 * t_train, "eval_step_ms": 1e3 * t_eval,
        "train_cpu_ms": 1e3 * cpu_train, "eval_cpu_ms": 1e3 * cpu_eval,
        "train_gflops_needed_per_sample": need_train / batch_size / 1e9,
        "eval_gflops_needed_per_sample": need_eval / batch_size / 1e9,
        "train_samples_per_s": batch_size / t_train, "eval_samples_per_s": batch_size / t_eval,
        "train_gflops_per_sample": fl_train / batch_size / 1e9, "eval_gflops_per_sample": fl_eval / batch_size / 1e9,
        "train_tflops_per_s": fl_train / t_train / 1e12, "eval_tflops_per_s": fl_eval / t_eval / 1e12,
        "peak_tflops": peak,
        "train_mfu": fl_train / t_train / 1e12 / peak if peak else None,
        "eval_mfu": fl_eval / t_eval / 1e12 / peak if peak else None,
    })
    return row
