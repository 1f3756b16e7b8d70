"""The benchmark suite: every row (``mdpl.bench.steps.bench_row``), loader row (``mdpl.bench.loader``) and
preparation row (``mdpl.bench.preparation``), the printed tables and the JSON result of ``scripts/bench.py``."""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mdpl.atomic import write_text_atomic
from mdpl.backbones.registry import backbone_card
from mdpl.bench.loader import bench_loader
from mdpl.bench.preparation import format_rows, preparation_rows
from mdpl.bench.steps import _free, bench_row
from mdpl.backbones.registry import method_backbone

PRECISIONS = {"fp32": "fp32", "32": "fp32", "32-true": "fp32",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "fp16": "fp16-mixed", "16": "fp16-mixed", "16-mixed": "fp16-mixed", "fp16-mixed": "fp16-mixed"}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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


def _log_preparation(r: dict) -> None:
    print(f"[bench] preparation {r['method']}/{r['backbone']}/{r['dataset']}/B{r['batch']}: {r['status']}"
          + (f" {r['samples_per_s']:.1f} samples/s" if r["status"] == "ok" else ""), file=sys.stderr, flush=True)


def run_suite(args, device: torch.device) -> dict:
    """Every row of the selected methods x datasets x precisions x batch sizes, then the loader rows; prints the table
    and writes ``args.json``. `args`: the namespace of ``scripts/bench.py``'s options (its docstring)."""
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

    only_preparation = getattr(args, "preparation_only", False)
    result = {"meta": _meta(args, device), "rows": [], "loader": [], "preparation": []}
    rows, loader_rows, prep_rows = result["rows"], result["loader"], result["preparation"]

    def save(complete: bool = False) -> None:
        # after every row, so a run stopped by a time limit keeps the rows it finished ("complete": false)
        result["meta"].update(complete=complete, wall_s=time.perf_counter() - started)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.json, json.dumps(result, indent=1))

    for method in ([] if args.loader_only or only_preparation else args.method_list):
        for dataset in args.dataset_list:
            for precision in precisions:
                for bs in batch_sizes:
                    rows.append(bench_row(method, dataset, precision, bs, args, device))
                    _free(device)  # the row's model, optimizer state and batches are garbage now
                    r = rows[-1]
                    print(f"[bench] {method}/{dataset}/{precision}/B{bs}: {r['status']}"
                          + (f" train {r['train_samples_per_s']:.1f}/s eval {r['eval_samples_per_s']:.1f}/s"
                             if r["status"] == "ok" else ""), file=sys.stderr, flush=True)
                    save()
    if not (args.no_loader or only_preparation):
        workers = [int(w) for w in _csv(args.loader_workers or ("2" if args.small else "8"))]
        backbones = sorted({method_backbone(m) for m in args.method_list}, reverse=True)  # the joint-stream one first
        datasets = _csv(args.loader_datasets) if args.loader_datasets else args.dataset_list
        with tempfile.TemporaryDirectory(prefix="mdpl_bench_") as tmp:
            for backbone in backbones:
                # the two-tower models resize every image to one square: one dataset tells their loader speed
                for dataset in (datasets if backbone_card(backbone).tokenizer_dir else datasets[:1]):
                    for w in workers:
                        loader_rows.append(bench_loader(dataset, backbone, w, args, Path(tmp)))
                        save()
    if only_preparation or getattr(args, "preparation", False):
        prep_rows.extend(preparation_rows(args, device, batch_sizes, _log_preparation))
    save(complete=True)
    if rows or loader_rows or not prep_rows:
        print(format_table(rows, loader_rows))
    if prep_rows:
        print(("\n" if rows or loader_rows else "") + format_rows(prep_rows))
    print(f"[bench] wall time {result['meta']['wall_s']:.1f} s", file=sys.stderr)
    return result


def _meta(args, device: torch.device) -> dict[str, Any]:
    """What a result says about how it was measured (the JSON's ``meta``; ``complete`` and ``wall_s`` come later)."""
    return {
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
        "preparation": "collection pass (frozen backbone, fp32, no gradients) over synthetic batches + k-means / "
                       "neighbours of the need (declared by the method, else the built-in need: every layer of "
                       "every stream + k-means); samples/s over both, peak memory as 'mem' "
                       "(mdpl/bench/preparation.py)",
    }
