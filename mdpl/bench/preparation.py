"""The preparation stage's benchmark: samples/s and peak memory of ``mdpl.engine.preparation`` on synthetic batches.

A row times what the stage computes per run (docs/architecture.md, "Preparation"): the collection pass (the
classifier's backbone with a :class:`~mdpl.engine.preparation.Collector` in place of the method, evaluation mode,
fp32, no gradients: :func:`~mdpl.engine.preparation.pooled_batch`) over ``batches`` synthetic batches
(``mdpl.bench.batches``), then the k-means centres and neighbour lists over the collected features
(:func:`~mdpl.engine.preparation.compute`). Not timed: the data loader (its own benchmark), the chunk and artefact
files and the weight hash.

Which need is timed: every selected method whose class overrides ``preparation_needs`` gets a row with its own need
(``need = "declared"``). When none of the selected methods declares one, a **built-in need** stands in, one row per
backbone (the methods' paper backbones, or ``--backbone``) and dataset (``need = "built-in"``): the mean-pooled
input of every block and the output of the last one, on every stream, and k-means with ``k`` centres per layer
over each (:func:`builtin_need`), i.e. a need at least as large as a per-layer prototype method's.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from mdpl.backbones.registry import method_backbone
from mdpl.bench.batches import synthetic_batch
from mdpl.bench.memory import MemoryMeter
from mdpl.bench.models import build_model, resolve_config
from mdpl.bench.steps import _free, _is_oom, _sync
from mdpl.config import RunConfig
from mdpl.engine.preparation import Collector, compute, evaluation_mode, pooled_batch
from mdpl.prompts.base import BackboneInfo, PromptMethod
from mdpl.prompts.preparation import FeatureRequest, KMeansRequest, PreparationNeed
from mdpl.prompts.registry import method_class

BUILTIN = "built-in"
DISTINCT_BATCHES = 4
"""Synthetic batches generated per row (cycled through when more are timed)."""
DEFAULT_BATCHES = {True: 4, False: 20}
"""Timed batches per row (``--preparation-batches``), by ``--small``."""
DEFAULT_K = {True: 4, False: 32}
"""Centres per layer of the built-in need (``--preparation-k``), by ``--small``."""


def builtin_need(info: BackboneInfo, k: int) -> PreparationNeed:
    """Features of every block input and the last block's output (mean over the real tokens) of every stream, and
    k-means with `k` centres per layer over each."""
    features = tuple(FeatureRequest(f"{s.name}_all_layers", s.name, tuple(range(s.num_layers + 1)))
                     for s in info.streams)
    return PreparationNeed(features, kmeans=tuple(KMeansRequest(f.name, k) for f in features))


def declares_need(method: str) -> bool:
    """Whether the method's class overrides ``preparation_needs`` (without building it)."""
    return method_class(method).preparation_needs is not PromptMethod.preparation_needs


def plan(methods: list[str], backbone: str) -> list[tuple[str, str, list[str]]]:
    """(method whose model is built, need kind, methods the row stands for): a row per declaring method, else one
    per backbone (`backbone` = 'paper': each method's paper backbone), built from the first method on it."""
    declared = [m for m in methods if declares_need(m)]
    if declared:
        return [(m, "declared", [m]) for m in declared]
    by_backbone: dict[str, list[str]] = {}
    for m in methods:
        by_backbone.setdefault(method_backbone(m) if backbone == "paper" else backbone, []).append(m)
    return [(ms[0], BUILTIN, ms) for ms in by_backbone.values()]


def _time(raw, need: PreparationNeed, batches: list[dict], n: int, warmup: int,
          device: torch.device, meter: MemoryMeter) -> tuple[float, float, dict[str, torch.Tensor], float | None]:
    """(collection seconds, k-means + neighbours seconds, features, peak MiB) of `n` batches after `warmup`."""
    collector = Collector(need, raw.backbone.info)
    meter.start()
    with evaluation_mode(raw), torch.no_grad():
        for i in range(warmup):
            pooled_batch(raw.backbone, collector, batches[i % len(batches)])
        _sync(device)
        t0 = time.perf_counter()
        parts = [{k: v.cpu() for k, v in pooled_batch(raw.backbone, collector, batches[i % len(batches)]).items()}
                 for i in range(n)]
        t_collect = time.perf_counter() - t0
    features = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    t0 = time.perf_counter()
    compute(need, features, device)
    _sync(device)
    return t_collect, time.perf_counter() - t0, features, meter.peak_mib()


def bench_preparation(method: str, kind: str, stands_for: list[str], dataset: str, batch_size: int, n_batches: int,
                      k: int, args, device: torch.device) -> dict[str, Any]:
    """One row: the need of `method` (or the built-in one, `k` centres) on `dataset`, `n_batches` timed batches
    after ``args.warmup``."""
    backbone = {} if args.backbone == "paper" else {"backbone": args.backbone}
    run = RunConfig.coerce(resolve_config(method, dataset, args.small, {"per_gpu_batchsize": batch_size, **backbone}))
    row: dict[str, Any] = {"method": method if kind != BUILTIN else BUILTIN, "need": kind, "methods": stands_for,
                           "backbone": run.experiment.backbone, "dataset": dataset, "precision": "fp32",
                           "batch": batch_size, "status": "ok"}
    torch.manual_seed(0)
    raw = build_model(run).to(device)
    need = raw.prompt.preparation_needs() if kind != BUILTIN else builtin_need(raw.backbone.info, k)
    if need is None:
        row["status"] = "skipped: no need at this config"
        return row
    batches = [synthetic_batch(run, batch_size, "small" if args.small else "full", device, seed=s,
                               complete=need.missing == "complete") for s in range(DISTINCT_BATCHES)]
    meter = MemoryMeter(device)
    try:
        t_collect, t_compute, features, peak = _time(raw, need, batches, n_batches, args.warmup, device,
                                                     meter)
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        row["status"] = "oom"
        return row
    samples = n_batches * batch_size
    row.update({
        "samples": samples, "mem_kind": meter.kind, "peak_mib": peak,
        "features": {name: list(f.shape[1:]) for name, f in features.items()},
        "kmeans_k": {r.feature: r.k for r in need.kmeans}, "neighbours_k": {r.feature: r.k for r in need.neighbours},
        "collect_s": t_collect, "compute_s": t_compute,
        "collect_samples_per_s": samples / t_collect, "samples_per_s": samples / (t_collect + t_compute),
    })
    return row


def preparation_rows(args, device: torch.device, batch_sizes: list[int], log) -> list[dict]:
    """Every row of :func:`plan` x the selected datasets x `batch_sizes`; `log(row)` after each."""
    n_batches = getattr(args, "preparation_batches", None) or DEFAULT_BATCHES[bool(args.small)]
    k = getattr(args, "preparation_k", None) or DEFAULT_K[bool(args.small)]
    if n_batches < 1 or k < 1:
        raise SystemExit("--preparation-batches and --preparation-k must be >= 1")
    rows = []
    for method, kind, stands_for in plan(args.method_list, args.backbone):
        for dataset in args.dataset_list:
            for bs in batch_sizes:
                rows.append(bench_preparation(method, kind, stands_for, dataset, bs, n_batches, k, args, device))
                _free(device)
                log(rows[-1])
    return rows


def format_rows(rows: list[dict]) -> str:
    """The printed table of the preparation rows."""
    head = (f"{'preparation':<12}{'backbone':<9}{'dataset':<10}{'batch':>6}{'samples':>8}{'samples/s':>11}"
            f"{'collect/s':>11}{'k-means s':>10}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['method']:<12}{r['backbone']:<9}{r['dataset']:<10}{r['batch']:>6}  {r['status']}")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"{r['method']:<12}{r['backbone']:<9}{r['dataset']:<10}{r['batch']:>6}{r['samples']:>8}"
                     f"{r['samples_per_s']:>11.4g}{r['collect_samples_per_s']:>11.4g}{r['compute_s']:>10.3g}"
                     f"{peak:>10}")
    return "\n".join(lines)
