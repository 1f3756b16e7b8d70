#!/usr/bin/env python
"""Throughput / memory / MFU benchmark of the mdpl models and the input pipeline (the command line of ``mdpl.bench``).

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
uint8 images read memory-mapped instead of decoded; same tensors), reporting images/s and images/s per core. With ``--preparation`` (or ``--preparation-only``) it also times the
preparation stage (``mdpl.bench.preparation``: the frozen-backbone collection pass + k-means / neighbours, fp32) on
synthetic batches, for every selected method that declares a ``preparation_needs()``, or, when none does, for a
built-in need (every layer of every stream + k-means) on each backbone, reporting samples/s and peak memory.

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
``--profile N``: after a row's timed training steps, two more under ``torch.profiler`` (``mdpl.bench.profile``); the
row keeps the N kernels (CUDA) or operators (CPU) with the most self time (``train_top_kernels``).
Batches: missing types drawn 30 % complete / 35 % text missing / 35 % image missing (``missing_ratio`` 0.7,
'both'), real texts of a uniform length in each dataset's ``bench_text_fill`` range (its ``DatasetSpec``), images at realistic aspects.

Examples:
  python scripts/bench.py --small                                     # CPU, < 2 min on 2 cores
  python scripts/bench.py --device cuda --json bench_h100.json        # full size, all methods/precisions
  python scripts/bench.py --device cuda --text-padding full --methods none,map,memprompt  # ViLT, pad to max_text_len
  python scripts/bench.py --loader-only --small --methods none --datasets hatememes --loader-image-px 700 \
      --loader-rows 256 --loader-batch-size 32 --loader-batches 12 --loader-workers 0 --threads 1  # decode vs cache
  python scripts/bench.py --preparation-only --small --datasets hatememes     # the preparation stage only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mdpl.backbones.registry import available_backbones  # noqa: E402
from mdpl.bench.models import bench_datasets  # noqa: E402
from mdpl.bench.suite import _csv, run_suite  # noqa: E402
from mdpl.prompts.registry import available_methods  # noqa: E402

METHODS = tuple(available_methods())
DATASETS = tuple(bench_datasets())


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny widths/layers, short texts (CPU, < 2 min)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--backbone", default="paper", choices=("paper", *available_backbones()),
                   help="'paper': each method on its paper's backbone (default); or every method on this one")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {','.join(DATASETS)}")
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16-mixed,fp16-mixed (default: all on CUDA, fp32,bf16-mixed on CPU)")
    p.add_argument("--batch-size", default=None, help="comma list of batch sizes (default 16 full, 8 small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 full, 3 small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 full, 1 small)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: GPU table)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 rows (peak becomes TF32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed training steps, profile two more and keep the N kernels (CUDA) or operators "
                        "(CPU) with the most self time in the row (train_top_kernels)")
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
    p.add_argument("--preparation", action="store_true",
                   help="also time the preparation stage (declared needs, else a built-in one)")
    p.add_argument("--preparation-only", action="store_true", help="only the preparation stage (no model/loader rows)")
    p.add_argument("--preparation-batches", type=int, default=None,
                   help="timed batches per preparation row (default 4 small, 20 full)")
    p.add_argument("--preparation-k", type=int, default=None,
                   help="k-means centres per layer of the built-in need (default 4 small, 32 full)")
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
        return run_suite(args, device)
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
