"""The input pipeline's benchmark: train-loader images/s (decode + transform + tokenise + collate), and again with
the pixel cache."""
from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mdpl.bench.models import resolve_config
from mdpl.backbones.registry import method_backbone
from mdpl.prompts.registry import available_methods


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
    from mdpl.config import RunConfig
    from mdpl.engine.session import build_datamodule
    from mdpl.data.synthetic import write_wordpiece_vocab

    method = next(m for m in available_methods() if method_backbone(m) == backbone)   # a method of its paper
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
    run = RunConfig.coerce(resolve_config(method, dataset, args.small, overrides))
    n_target = args.loader_batches or (6 if args.small else 40)
    cores = max(workers, 1)
    dm = build_datamodule(run)
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
        dm = build_datamodule(run.replace(pixel_cache=folder))
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
