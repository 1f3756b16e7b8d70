#!/usr/bin/env python
"""Throughput / memory / MFU benchmark of the mdpl models and the input pipeline.

For every method x dataset x precision it builds the classifier with random weights
(``mdpl.models.build_classifier``, ``load_path=''`` / ``clip_path=''``) from the Sacred presets of
``config.py`` (task config, method preset, and ``tiny`` under ``--small``), feeds synthetic batches in
the batch format of mdpl.data.collate (mixed missing types, dummies applied with ``apply_missing``) and times

* a training step: forward + task loss + backward + optimizer step (``mdpl.engine.optim.build_optimizer``;
  fp16-mixed uses ``torch.amp.GradScaler``),
* an evaluation step: forward under ``torch.inference_mode``,

reporting samples/s, peak memory (CUDA ``max_memory_allocated``; on CPU the peak-RSS increase, via
``/proc/self/clear_refs``) and an MFU estimate. Then it times the DataModule's train loader (decode +
transform + tokenise + collate) on an arrow file (``--data-root``, or a synthetic one written with
``mdpl.data.synthetic`` + ``make_arrow``), and again with the pixel cache (config ``pixel_cache``: the resized
uint8 images read memory-mapped instead of decoded; same tensors), reporting images/s and images/s per core.

FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real computation of each row, on its
two batches, at its precision (``count_flops``): the evaluation forward, and the training forward + task loss +
backward (the optimizer update is elementwise and not counted). FlopCounterMode counts matmuls, convolutions and
fused attention (multiply-add = 2; elementwise ops, norms, softmax and embedding lookups are free); its formulas
of the CUDA fused attention kernels are applied to the CPU fused kernel too, which it does not count by itself.
A fused attention backward computes the gradients of queries, keys and values even where only some are needed.
  MFU = FLOPs per step / step time / peak FLOP/s (--peak-tflops, or a table for H100/H200/A100 dense).
"need GF" (``*_gflops_needed_per_sample``): the same count on every sample alone, its text cut to its own length
(``needed_flops``): the computation the answer needs, against the executed "GF/smp" of the batched step (padding,
rows of a dropped modality). For MemPrompt, whose faithful text query reads [PAD] positions, it is the
padding-free answer. "cpu tr ms": process CPU time per training step (all threads), beside the wall time.
Batches: missing types drawn 30 % complete / 35 % text missing / 35 % image missing (``missing_ratio`` 0.7,
'both'), real texts of a uniform length in each dataset's ``TEXT_FILL`` range, images at realistic aspects.

Examples:
  python scripts/bench.py --small                                     # CPU, < 2 min on 2 cores
  python scripts/bench.py --device cuda --json bench_h100.json        # full size, all methods/precisions
  python scripts/bench.py --device cuda --text-padding full --methods none,map,memprompt  # ViLT, pad to max_text_len
  python scripts/bench.py --loader-only --small --methods none --datasets hatememes --loader-image-px 700 \
      --loader-rows 256 --loader-batch-size 32 --loader-batches 12 --loader-workers 0 --threads 1  # decode vs cache
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import (FlopCounterMode, sdpa_backward_flop_count,  # noqa: E402
                                     sdpa_flop_count)

from mdpl.prompts.keys import method_presets  # noqa: E402
from mdpl.backbones.registry import available_backbones  # noqa: E402
from mdpl.prompts.registry import available_methods, method_class  # noqa: E402

METHODS = tuple(available_methods())
DATASETS = ("mmimdb", "food101", "hatememes")
PRECISIONS = {"fp32": "fp32", "32": "fp32", "32-true": "fp32",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "fp16": "fp16-mixed", "16": "fp16-mixed", "16-mixed": "fp16-mixed", "fp16-mixed": "fp16-mixed"}


TWO_TOWER = ("clip", "coca")
"""Backbones with an image and a text tower (open_clip BPE texts, square images)."""


def paper_backbone(method: str) -> str:
    """The backbone each method is benchmarked on: its paper's."""
    return method_class(method).paper_backbone

# Dense peak TFLOP/s by (GPU name fragment, precision); fp32 = plain FP32 (TF32 off, the PyTorch default).
PEAK_TFLOPS = {
    ("H200", "bf16-mixed"): 989.0, ("H200", "fp16-mixed"): 989.0, ("H200", "fp32"): 67.0, ("H200", "tf32"): 494.5,
    ("H100 PCIe", "bf16-mixed"): 756.0, ("H100 PCIe", "fp16-mixed"): 756.0, ("H100 PCIe", "fp32"): 51.0,
    ("H100 PCIe", "tf32"): 378.0,
    ("H100", "bf16-mixed"): 989.0, ("H100", "fp16-mixed"): 989.0, ("H100", "fp32"): 67.0, ("H100", "tf32"): 494.5,
    ("A100", "bf16-mixed"): 312.0, ("A100", "fp16-mixed"): 312.0, ("A100", "fp32"): 19.5, ("A100", "tf32"): 156.0,
}

# Valid image sizes (rows, cols) in patches, cycled over the batch: realistic aspects after the ViLT
# 'pixelbert' resize (shorter side 384 = 12 patches of 32, longer <= 640). MM-IMDb: portrait posters
# (384x576); Food-101: landscape photos (512x384) and squares; Hateful Memes: mixed.
VILT_PATCH_SIZES = {
    "full": {"mmimdb": [(18, 12), (17, 12), (18, 12), (16, 12)],
             "food101": [(12, 16), (12, 12), (12, 16), (12, 15)],
             "hatememes": [(12, 12), (12, 16), (15, 12), (12, 14)]},
    "small": {"mmimdb": [(6, 4), (5, 4)], "food101": [(4, 5), (4, 4)], "hatememes": [(4, 4), (4, 5), (5, 4)]},
}
# Real text tokens per sample (incl. [CLS]/[SEP]): (min, max), padded to max_text_len.
TEXT_FILL = {
    "full": {"mmimdb": (60, 700), "food101": (80, 512), "hatememes": (8, 48)},
    "small": {"mmimdb": (8, 48), "food101": (6, 32), "hatememes": (3, 12)},
}
SMALL_TEXT_LEN = {"mmimdb": 48, "food101": 32, "hatememes": 16}
MISSING_PROBS = (0.3, 0.35, 0.35)  # complete / text missing / image missing: missing_ratio 0.7, 'both'
VILT_CLS, VILT_SEP = 101, 102
CLIP_SOT, CLIP_EOT = 49406, 49407


# ----------------------------------------------------------------------------------------- config
def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def resolve_config(method: str, dataset: str, small: bool, overrides: dict | None = None) -> dict:
    """Base config + task_finetune_<dataset> + method preset (+ tiny) + bench overrides, as a plain dict.

    Resolved by Sacred (as `python run.py print_config with ...`): the method's keys follow from prompt_method.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sacred.initialize import create_run

        from config import ex
    preset = method_presets().get(method)
    presets = [f"task_finetune_{dataset}", *([preset] if preset else [])] + (["tiny"] if small else [])
    updates = {"load_path": "", "clip_path": "", "dataset": dataset, "test_only": False,
               **({} if preset else {"prompt_method": method, "backbone": paper_backbone(method)}),
               **({"max_text_len": SMALL_TEXT_LEN[dataset]} if small else {}), **(overrides or {})}
    return _plain(dict(create_run(ex, "print_config", config_updates=updates, named_configs=presets).config))


def build_model(cfg: dict) -> torch.nn.Module:
    """Random-weight classifier; the 'randomly initialised' warnings are silenced."""
    from mdpl.models import build_classifier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        warnings.filterwarnings("ignore", message="(load_path|clip_path) is empty.*")
        return build_classifier(cfg)


# ------------------------------------------------------------------------------------------ batches
def missing_counts(batch_size: int, probs: tuple[float, ...] = MISSING_PROBS) -> list[int]:
    """Rows per missing type in a batch of ``batch_size``: ``probs`` scaled to the batch, rounded by largest
    remainder (ties to the earlier type), so every batch carries the stated mix as closely as its size allows
    (batch 20: 6 / 7 / 7; batch 4: 1 / 2 / 1). A random draw would let a small batch miss half its images."""
    exact = [p * batch_size for p in probs]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(probs)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def _missing_types(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    counts = missing_counts(batch_size)
    types = torch.cat([torch.full((c,), t, dtype=torch.long) for t, c in enumerate(counts)])
    return types[torch.randperm(batch_size, generator=gen)]


def _labels(dataset: str, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    from mdpl.data.registry import dataset_spec

    spec = dataset_spec(dataset)
    if spec.multi_label:
        return (torch.rand(batch_size, spec.num_classes, generator=gen) < 0.15).float()
    return torch.randint(0, spec.num_classes, (batch_size,), generator=gen)


def _text(batch_size: int, length: int, fill: tuple[int, int], vocab: tuple[int, int], start: int, end: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[start] + random ids + [end] + zero padding, with per-sample real lengths drawn from ``fill``."""
    lo, hi = min(fill[0], length), min(fill[1], length)
    n = torch.randint(max(2, lo), max(2, hi) + 1, (batch_size,), generator=gen)
    pos = torch.arange(length)[None]
    ids = torch.randint(vocab[0], vocab[1], (batch_size, length), generator=gen)
    ids = torch.where(pos < n[:, None], ids, torch.zeros_like(ids))
    ids[:, 0] = start
    ids[torch.arange(batch_size), n - 1] = end
    return ids.long(), (pos < n[:, None]).long()


def synthetic_batch(cfg: dict, batch_size: int, size_key: str, device: torch.device, seed: int = 0) -> dict:
    """One batch in the collated batch format (on ``device``, dummies applied) for the config's backbone."""
    from mdpl.data.missing import apply_missing

    gen = torch.Generator().manual_seed(seed)
    dataset = cfg["dataset"]
    fill = TEXT_FILL[size_key][dataset]
    if cfg["backbone"] in TWO_TOWER:
        side = int(cfg["image_size"])
        sizes = torch.full((batch_size, 2), side, dtype=torch.long)
        image = torch.randn(batch_size, 3, side, side, generator=gen)
        ids, masks = _text(batch_size, int(cfg[f"{cfg['backbone']}_context_length"]), fill, (1, CLIP_SOT), CLIP_SOT,
                           CLIP_EOT, gen)
        dummy_ids = torch.zeros(1, ids.shape[1], dtype=torch.long)
        dummy_ids[0, :2] = torch.tensor([CLIP_SOT, CLIP_EOT])
    else:
        p = int(cfg["patch_size"])
        cycle = VILT_PATCH_SIZES[size_key][dataset]
        sizes = torch.tensor([cycle[i % len(cycle)] for i in range(batch_size)], dtype=torch.long) * p
        h, w = (int(v) for v in sizes.max(dim=0).values)
        image = torch.randn(batch_size, 3, h, w, generator=gen)
        valid = ((torch.arange(h)[None, :, None] < sizes[:, 0, None, None])
                 & (torch.arange(w)[None, None, :] < sizes[:, 1, None, None]))
        image = image * valid[:, None]
        vocab = (1000, int(cfg["vocab_size"]))
        ids, masks = _text(batch_size, int(cfg["max_text_len"]), fill, vocab, VILT_CLS, VILT_SEP, gen)
        if cfg.get("dynamic_text_padding"):  # as the collator: cut to the longest real text of the batch
            length = max(2, int(masks.sum(dim=1).max()))
            ids, masks = ids[:, :length].contiguous(), masks[:, :length].contiguous()
        dummy_ids = torch.zeros(1, ids.shape[1], dtype=torch.long)
        dummy_ids[0, :2] = torch.tensor([VILT_CLS, VILT_SEP])
    dummy_masks = (dummy_ids != 0).long()
    batch = {"image": image, "image_sizes": sizes, "text_ids": ids, "text_masks": masks,
             "label": _labels(dataset, batch_size, gen), "missing_type": _missing_types(batch_size, gen),
             "row_index": torch.arange(batch_size), "item_index": torch.arange(batch_size)}
    batch = {k: v.to(device) for k, v in batch.items()}
    # as the collator does: the sizes as Python ints too, so ViLT sizes its patch tensor without a device sync
    batch["image_sizes_host"] = tuple((int(h), int(w)) for h, w in sizes.tolist())
    batch["text_len_host"] = max(2, int(masks.sum(dim=1).max()))   # the collator's bound on the real text length
    return apply_missing(batch, batch["missing_type"], dummy_ids, dummy_masks)


# -------------------------------------------------------------------------------------------- FLOPs
@dataclass
class Flops:
    """FLOPs of one batch, counted by FlopCounterMode: the evaluation forward and the training step."""

    forward: float
    train: float


def _fused_cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fused_cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_sdpa_formulas() -> dict:
    """torch's flop formulas of the CUDA fused attention kernels, for the CPU fused kernel, which torch's
    FlopCounterMode does not count (it would report attention as free on the CPU)."""
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {ops._scaled_dot_product_flash_attention_for_cpu: _fused_cpu_sdpa_flop,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: _fused_cpu_sdpa_backward_flop}


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode (no display) that also counts the CPU fused attention kernel (`_cpu_sdpa_formulas`)."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())


def count_flops(model: torch.nn.Module, cfg: dict, batch: dict, device: torch.device, precision: str) -> Flops:
    """FLOPs of `model` on `batch`, counted on the real computation the timed steps run (same precision):
    the evaluation forward (eval mode, inference_mode) and the training forward + task loss + backward (the
    optimizer update is elementwise: not counted). The gradients it makes are dropped; the mode is restored."""
    from mdpl.engine.losses import task_loss

    was_training = model.training
    model.eval()
    with flop_counter() as forward, torch.inference_mode(), _autocast(device, precision):
        model(batch)
    model.train()
    if hasattr(model, "set_frozen_modes"):
        model.set_frozen_modes()
    with flop_counter() as train:
        with _autocast(device, precision):
            loss = task_loss(cfg["dataset"], model(batch)["logits"], batch["label"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return Flops(float(forward.get_total_flops()), float(train.get_total_flops()))


def sequence_length(cfg: dict, batch: dict, model: torch.nn.Module) -> int:
    """Longest sequence after every prompt insertion: the joint ViLT sequence, or CLIP's vision tower (the
    method's `added_tokens`)."""
    method = model.prompt
    added = method.added_tokens(method.config, model.backbone.info)
    if cfg["backbone"] in TWO_TOWER:
        side, patch = batch["image"].shape[-1], int(cfg[f"{cfg['backbone']}_patch_size"])
        return (side // patch) ** 2 + 1 + added.get("image", 0)
    p = int(cfg["patch_size"])
    sizes = batch["image_sizes"].cpu()
    m = int((((sizes[:, 0] + p - 1) // p) * ((sizes[:, 1] + p - 1) // p)).max())
    return batch["text_ids"].shape[1] + 1 + m + added.get("joint", 0)


def peak_tflops(device: torch.device, precision: str, override: float | None, tf32: bool) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for (frag, prec), value in PEAK_TFLOPS.items():  # dict order: specific fragments first
        if frag in name and prec == key:
            return value
    return None


# ------------------------------------------------------------------------------------------- memory
class MemoryMeter:
    """Peak memory of a region: CUDA max_memory_allocated, else the peak-RSS increase (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak_delta"
        self.base = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = -1
            return
        self.base = self._status("VmRSS") or -1

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = self._status("VmHWM")
        if self.base < 0 or hwm is None:
            return None
        return max(0, hwm - self.base) / 2**20


# -------------------------------------------------------------------------------------------- steps
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_train_step(model, cfg: dict, device: torch.device, precision: str) -> tuple[Callable, Any]:
    """forward + loss + backward + optimizer step (GradScaler for fp16-mixed)."""
    from mdpl.engine.losses import task_loss
    from mdpl.engine.optim import build_optimizer

    opt = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    dataset = cfg["dataset"]

    def step(batch: dict) -> torch.Tensor:
        with _autocast(device, precision):
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
        with torch.inference_mode(), _autocast(device, precision):
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


def single_samples(batch: dict, cut_text: bool) -> list[dict]:
    """Each sample of `batch` alone, its text cut to its own length: the inputs of the computation the answer
    needs (no padding of any kind, a dropped modality not computed)."""
    out = []
    for i in range(batch["missing_type"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        length = max(2, int(one["text_masks"].sum()))
        one["text_len_host"] = length
        if "image_sizes_host" in batch:
            one["image_sizes_host"] = batch["image_sizes_host"][i:i + 1]
        if cut_text:   # ViLT: the text segment itself; the two-tower models keep their fixed ids, cut by the model
            one["text_ids"], one["text_masks"] = one["text_ids"][:, :length], one["text_masks"][:, :length]
        out.append(one)
    return out


def needed_flops(model, cfg: dict, batch: dict, device: torch.device, precision: str) -> Flops:
    """FLOPs of the same model on every sample alone and unpadded (`single_samples`), summed: what the answer
    needs, against which the executed FLOPs of the batched step are compared."""
    counts = [count_flops(model, cfg, one, device, precision)
              for one in single_samples(batch, cut_text=cfg["backbone"] not in TWO_TOWER)]
    return Flops(sum(c.forward for c in counts), sum(c.train for c in counts))


# --------------------------------------------------------------------------------------------- rows
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
    cfg = resolve_config(method, dataset, args.small, {"per_gpu_batchsize": batch_size, **padding, **backbone})
    dynamic = bool(cfg["dynamic_text_padding"]) and cfg["backbone"] == "vilt"
    row: dict[str, Any] = {"method": method, "backbone": cfg["backbone"], "dataset": dataset,
                           "precision": precision, "batch": batch_size, "dynamic_text_padding": dynamic,
                           "status": "ok"}
    if device.type == "cpu" and precision == "fp16-mixed":
        row["status"] = "skipped: fp16-mixed needs CUDA"
        return row
    torch.manual_seed(0)
    raw = build_model(cfg).to(device)
    model = torch.compile(raw) if args.compile else raw
    row["params_total"], row["params_trainable"] = raw.trainable_parameters_report()
    batches = [synthetic_batch(cfg, batch_size, size_key, device, seed=s) for s in range(2)]
    row["seq_len"] = sequence_length(cfg, batches[0], raw)
    row["text_len"] = int(batches[0]["text_ids"].shape[1])
    row["image_hw"] = list(batches[0]["image"].shape[-2:])
    meter = MemoryMeter(device)
    row["mem_kind"] = meter.kind
    peak = peak_tflops(device, precision, args.peak_tflops, args.tf32)
    try:
        model.train()
        if hasattr(raw, "set_frozen_modes"):
            raw.set_frozen_modes()
        step, opt = make_train_step(model, cfg, device, precision)
        t_train, cpu_train, row["train_peak_mib"] = time_loop(step, batches, args.warmup, args.steps, device, meter)
        opt.zero_grad(set_to_none=True)
        del step, opt
        _free(device)
        model.eval()
        t_eval, cpu_eval, row["eval_peak_mib"] = time_loop(make_eval_step(model, device, precision), batches,
                                                           args.warmup, args.steps, device, meter)
        # counted after the timed loops, so that the memory figures are those of the steps alone
        flops = [count_flops(raw, cfg, b, device, precision) for b in batches]
        needed = [needed_flops(raw, cfg, b, device, precision) for b in batches]
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


# ------------------------------------------------------------------------------------------- loader
def _synthetic_arrow(dataset: str, root: Path, rows: int, image_px: int) -> Path:
    from mdpl.data.synthetic import write_synthetic
    from mdpl.data.writers import make_arrow

    raw, out = root / f"raw_{dataset}", root / f"arrow_{dataset}"
    if not out.is_dir():
        with contextlib.redirect_stdout(sys.stderr):  # the writers print per-split counts
            write_synthetic(dataset, raw, n_train=rows, n_val=4, n_test=4, image_size=image_px)
            make_arrow(dataset, raw, out, progress=False)
    return out


def _time_train_loader(dm, n_target: int) -> tuple[int, int, float, float, dict]:
    """(batches timed, images, seconds, CPU seconds of this process, last batch) over ``n_target`` train batches
    after the first (epochs repeat)."""
    loader = dm.train_dataloader()
    seen, images, t0, cpu0, batch = 0, 0, None, 0.0, {}
    while seen <= n_target:
        for batch in loader:
            if t0 is None:  # the first batch pays for worker start-up
                t0, cpu0 = time.perf_counter(), time.process_time()
            else:
                images += batch["image"].shape[0]
            seen += 1
            if seen > n_target:
                break
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    del loader
    return seen - 1, images, elapsed, cpu, batch


def bench_loader(dataset: str, backbone: str, workers: int, args, work: Path) -> dict:
    """Train-loader images/s: decode + transform + tokenise + collate (+ pinned memory on CUDA), then the same
    with the pixel cache (config pixel_cache: the resized uint8 images memory-mapped, no decoding), unless
    --no-loader-cache. Per core = images/s / max(workers, 1) (workers=0: the main process only; run with
    --threads 1); with workers=0 also images per CPU second of the process (``*_per_cpu_s``: what one core does,
    whatever else runs on the machine). With the cache the loader yields uint8 batches and the normalisation runs where the batch
    lands (on_after_batch_transfer): its CPU cost per image is timed on the last batch (``cache_cpu_norm_ms``;
    on a GPU it is a table lookup)."""
    from mdpl.data.datamodule import MDPLDataModule
    from mdpl.data.synthetic import write_wordpiece_vocab

    method = "dcp" if backbone == "clip" else "none"
    batch_size = args.loader_batch_size or (8 if args.small else 32)
    rows = args.loader_rows or (48 if args.small else 512)
    overrides: dict[str, Any] = {"num_workers": workers, "per_gpu_batchsize": batch_size,
                                 "missing_table_root": str(work / "missing_tables")}
    if args.data_root:
        overrides["data_root"] = args.data_root
        if args.tokenizer:
            overrides["tokenizer"] = args.tokenizer
    else:
        image_px = args.loader_image_px or (128 if args.small else 512)
        overrides["data_root"] = str(_synthetic_arrow(dataset, work / f"px{image_px}", rows, image_px))
        vocab = write_wordpiece_vocab(work / "vocab" / "vocab.txt")
        overrides["tokenizer"] = str(vocab.parent)
        overrides["vocab_size"] = len(vocab.read_text(encoding="utf-8").splitlines())
    cfg = resolve_config(method, dataset, args.small, overrides)
    n_target = args.loader_batches or (6 if args.small else 40)
    cores = max(workers, 1)
    dm = MDPLDataModule(cfg)
    dm.setup("fit")
    timed, images, elapsed, cpu, _ = _time_train_loader(dm, n_target)
    del dm
    gc.collect()
    decode = images / elapsed if elapsed > 0 else None

    def per_cpu(n: int, t: float) -> float | None:   # workers > 0: their CPU time is not this process's
        return n / t if workers == 0 and t > 0 else None

    row = {"dataset": dataset, "backbone": backbone, "workers": workers, "batch": batch_size,
           "batches_timed": timed, "images_per_s": decode, "images_per_s_per_core": decode and decode / cores,
           "images_per_cpu_s": per_cpu(images, cpu), "cache_images_per_cpu_s": None,
           "cache_images_per_s": None, "cache_images_per_s_per_core": None, "cache_speedup": None,
           "cache_write_s": None, "cache_cpu_norm_ms": None, "source": args.data_root or "synthetic"}
    if args.no_loader_cache:
        return row
    with tempfile.TemporaryDirectory(prefix="pixel_cache_", dir=work) as folder:
        started = time.perf_counter()
        dm = MDPLDataModule({**cfg, "pixel_cache": folder})
        dm.setup("fit")   # writes the train and val caches (num_workers processes)
        row["cache_write_s"] = time.perf_counter() - started
        _, images, elapsed, cpu, batch = _time_train_loader(dm, n_target)
        row["cache_images_per_cpu_s"] = per_cpu(images, cpu)
        started = time.perf_counter()
        for _ in range(3):
            dm.pixel_stages.batch_to_float(batch["image"], batch["image_sizes"])
        row["cache_cpu_norm_ms"] = (time.perf_counter() - started) / 3 / len(batch["image"]) * 1e3
        del dm, batch
        gc.collect()
    cached = images / elapsed if elapsed > 0 else None
    row.update(cache_images_per_s=cached, cache_images_per_s_per_core=cached and cached / cores,
               cache_speedup=cached / decode if cached and decode else None)
    return row


# ---------------------------------------------------------------------------------------------- CLI
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny widths/layers, short texts (CPU, < 2 min)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--backbone", default="paper", choices=("paper", *available_backbones()),
                   help="'paper': each method on its paper's backbone (default); or every method on this one")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list of mmimdb,food101,hatememes")
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16-mixed,fp16-mixed (default: all on CUDA, fp32,bf16-mixed on CPU)")
    p.add_argument("--batch-size", default=None, help="comma list of batch sizes (default 16 full, 8 small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 full, 3 small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 full, 1 small)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: GPU table)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 rows (peak becomes TF32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    p.add_argument("--text-padding", choices=("default", "dynamic", "full"), default="default",
                   help="ViLT rows: 'dynamic' pads each batch to its longest text, 'full' to max_text_len; 'default': "
                        "the config's default (dynamic where exact: baseline, MAP, DCP; full for MemPrompt)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --small, where tiny ops gain nothing from more)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-loader", action="store_true", help="skip the dataloader benchmark")
    p.add_argument("--data-root", default=None, help="arrow folder for the loader benchmark (default: synthetic)")
    p.add_argument("--tokenizer", default=None, help="vocab.txt folder for --data-root (ViLT)")
    p.add_argument("--loader-workers", default=None, help="comma list of worker counts (default 2 small, 8 full)")
    p.add_argument("--loader-datasets", default=None, help="datasets for the loader (default: --datasets)")
    p.add_argument("--loader-batch-size", type=int, default=None)
    p.add_argument("--loader-batches", type=int, default=None, help="timed loader batches")
    p.add_argument("--loader-rows", type=int, default=None, help="rows of the synthetic train arrow")
    p.add_argument("--loader-image-px", type=int, default=None,
                   help="side of the synthetic images (default 128 small, 512 full; Hateful Memes-like: 700)")
    p.add_argument("--no-loader-cache", action="store_true", help="time the decode path only, not the pixel cache")
    p.add_argument("--loader-only", action="store_true", help="only the dataloader benchmark (no model rows)")
    args = p.parse_args(list(argv) if argv is not None else None)
    args.method_list = _csv(args.methods)
    args.dataset_list = _csv(args.datasets)
    for m in args.method_list:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {','.join(METHODS)}")
    for d in args.dataset_list:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}; choose from {','.join(DATASETS)}")
    return args


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def format_table(rows: list[dict], loader: list[dict]) -> str:
    head = (f"{'method':<10}{'backbone':<9}{'dataset':<10}{'precision':<11}{'batch':>6}{'seq':>6}"
            f"{'train/s':>10}{'eval/s':>10}{'cpu tr ms':>10}{'mem tr MiB':>11}{'mem ev MiB':>11}{'need GF':>9}"
            f"{'GF/smp':>9}{'MFU tr':>8}{'MFU ev':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['method']:<10}{r['backbone']:<9}{r['dataset']:<10}{r['precision']:<11}"
                         f"{r['batch']:>6}  {r['status']}")
            continue
        mfu_t = None if r["train_mfu"] is None else 100 * r["train_mfu"]
        mfu_e = None if r["eval_mfu"] is None else 100 * r["eval_mfu"]
        lines.append(
            f"{r['method']:<10}{r['backbone']:<9}{r['dataset']:<10}{r['precision']:<11}{r['batch']:>6}{r['seq_len']:>6}"
            f"{r['train_samples_per_s']:>10.4g}{r['eval_samples_per_s']:>10.4g}{r['train_cpu_ms']:>10.4g}"
            f"{_fmt(r['train_peak_mib'], '>11.1f')}{_fmt(r['eval_peak_mib'], '>11.1f')}"
            f"{r['train_gflops_needed_per_sample']:>9.3g}{r['train_gflops_per_sample']:>9.3g}"
            f"{_fmt(mfu_t, '>7.1f') + ('%' if mfu_t is not None else ''):>8}"
            f"{_fmt(mfu_e, '>7.1f') + ('%' if mfu_e is not None else ''):>8}")
    if loader:
        lines += ["", f"{'loader':<10}{'backbone':<9}{'workers':>8}{'batch':>6}{'images/s':>10}{'/core':>9}"
                      f"{'cached/s':>10}{'/core':>9}{'speedup':>9}{'/cpu-s':>9}{'cached':>9}{'speedup':>9}"
                      f"{'write s':>9}{'norm ms':>9}"]
        lines += [f"{r['dataset']:<10}{r['backbone']:<9}{r['workers']:>8}{r['batch']:>6}"
                  f"{_fmt(r['images_per_s'], '>10.1f')}{_fmt(r.get('images_per_s_per_core'), '.1f'):>9}"
                  f"{_fmt(r.get('cache_images_per_s'), '.1f'):>10}{_fmt(r.get('cache_images_per_s_per_core'), '.1f'):>9}"
                  f"{_ratio(r.get('cache_images_per_s'), r.get('images_per_s')):>9}"
                  f"{_fmt(r.get('images_per_cpu_s'), '.1f'):>9}{_fmt(r.get('cache_images_per_cpu_s'), '.1f'):>9}"
                  f"{_ratio(r.get('cache_images_per_cpu_s'), r.get('images_per_cpu_s')):>9}"
                  f"{_fmt(r.get('cache_write_s'), '.1f'):>9}{_fmt(r.get('cache_cpu_norm_ms'), '.2f'):>9}"
                  for r in loader]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if args.small and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    default_prec = "fp32,bf16-mixed,fp16-mixed" if device.type == "cuda" else "fp32,bf16-mixed"
    precisions = []
    for name in _csv(args.precisions or default_prec):
        if name not in PRECISIONS:
            raise SystemExit(f"unknown precision {name!r}; use fp32, bf16-mixed or fp16-mixed")
        precisions.append(PRECISIONS[name])
    batch_sizes = [int(b) for b in _csv(args.batch_size or ("8" if args.small else "16"))]
    args.steps = args.steps if args.steps is not None else (5 if args.small else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.small else 3)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")

    rows = []
    for method in ([] if args.loader_only else args.method_list):
        for dataset in args.dataset_list:
            for precision in precisions:
                for bs in batch_sizes:
                    rows.append(bench_row(method, dataset, precision, bs, args, device))
                    _free(device)  # the row's model, optimizer state and batches are garbage now
                    r = rows[-1]
                    print(f"[bench] {method}/{dataset}/{precision}/B{bs}: {r['status']}"
                          + (f" train {r['train_samples_per_s']:.1f}/s eval {r['eval_samples_per_s']:.1f}/s"
                             if r["status"] == "ok" else ""), file=sys.stderr, flush=True)
    loader_rows = []
    if not args.no_loader:
        workers = [int(w) for w in _csv(args.loader_workers or ("2" if args.small else "8"))]
        backbones = sorted({paper_backbone(m) for m in args.method_list}, reverse=True)  # vilt first
        datasets = _csv(args.loader_datasets) if args.loader_datasets else args.dataset_list
        with tempfile.TemporaryDirectory(prefix="mdpl_bench_") as tmp:
            for backbone in backbones:
                for dataset in (datasets if backbone == "vilt" else datasets[:1]):
                    for w in workers:
                        loader_rows.append(bench_loader(dataset, backbone, w, args, Path(tmp)))
    result = {
        "meta": {
            "command": "python scripts/bench.py " + " ".join(args.argv),
            "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                   else platform.processor() or platform.machine()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "small": bool(args.small),
            "steps": args.steps, "warmup": args.warmup, "compile": bool(args.compile), "tf32": bool(args.tf32),
            "text_padding": args.text_padding,
            "flops": "torch.utils.flop_counter.FlopCounterMode on each row's evaluation forward and training "
                     "forward + loss + backward (CPU fused attention counted with torch's fused-attention "
                     "formulas); MFU = FLOPs/step / step time / peak (see scripts/bench.py docstring)",
            "mem": "cuda: torch.cuda.max_memory_allocated over warm-up + timed steps (weights + optimizer "
                   "state + activations); cpu: peak RSS minus RSS before the first step (activations + gradients + "
                   "optimizer state; memory the allocator kept from the training steps hides most of the eval figure)",
            "wall_s": time.perf_counter() - started,
        },
        "rows": rows,
        "loader": loader_rows,
    }
    print(format_table(rows, loader_rows))
    print(f"[bench] wall time {result['meta']['wall_s']:.1f} s", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
