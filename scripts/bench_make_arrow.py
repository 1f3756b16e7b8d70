#!/usr/bin/env python
"""Images/s of ``make_arrow.py --dataset mmimdb`` on MM-IMDb-sized synthetic posters, per --workers / --max-side.

Writes ``--n`` synthetic posters (300x450 JPEG with photo-like grain, about 35 KB each, like the
MM-IMDb posters) and their label jsons in the MM-IMDb raw layout (real train/dev/test proportions), then
runs ``make_arrow.py`` as a fresh process for every (--max-side, --workers) pair, ``--repeats`` times with
the pairs alternating, and reports images/s = posters / process wall time (best and mean of the runs;
each run also prints the 1-minute load average before it, since other processes skew the figures).
Posters and arrow files are deleted at the end unless ``--keep``.

    python scripts/bench_make_arrow.py                # 25,000 posters; workers 1,2; max-side none,640
    python scripts/bench_make_arrow.py --n 2000 --workers 1,2,4 --max-side none,320 --repeats 3
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdpl.data.constants import MMIMDB_GENRES  # noqa: E402
from mdpl.data.synthetic import make_text  # noqa: E402
from mdpl.data.writers import default_workers  # noqa: E402

POSTER_SIZE = (300, 450)
#: MM-IMDb's train / dev / test movie counts (the posters are split in these proportions).
MMIMDB_SPLIT = {"train": 15552, "dev": 2608, "test": 7799}


def poster_jpeg(seed: int, size: tuple[int, int] = POSTER_SIZE) -> bytes:
    """A poster-like JPEG (quality 90): smooth colour fields from a 4x6 random image plus grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_movies(args: tuple[Path, list[str]]) -> int:
    root, ids = args
    for movie_id in ids:
        rng = random.Random(movie_id)
        (root / "images" / f"{movie_id}.jpeg").write_bytes(poster_jpeg(int(movie_id)))
        label = {"plot": [make_text(rng, [], (80, 150))], "genres": rng.sample(MMIMDB_GENRES, rng.randint(1, 3))}
        (root / "labels" / f"{movie_id}.json").write_text(json.dumps(label), encoding="utf-8")
    return len(ids)


def write_posters(root: Path, n: int, processes: int) -> dict[str, list[str]]:
    """MM-IMDb raw layout with ``n`` movies under ``root``; returns the split ids."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:07d}" for i in range(1, n + 1)]
    total = sum(MMIMDB_SPLIT.values())
    n_train, n_dev = round(n * MMIMDB_SPLIT["train"] / total), round(n * MMIMDB_SPLIT["dev"] / total)
    splits = {"train": ids[:n_train], "dev": ids[n_train:n_train + n_dev], "test": ids[n_train + n_dev:]}
    (root / "split.json").write_text(json.dumps(splits), encoding="utf-8")
    chunks = [(root, ids[i:i + 500]) for i in range(0, n, 500)]
    if processes <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            _write_movies(chunk)
        return splits
    with ProcessPoolExecutor(max_workers=processes) as pool:
        sum(pool.map(_write_movies, chunks))
    return splits


def run_make_arrow(raw: Path, out: Path, workers: int, max_side: int | None) -> tuple[float, str]:
    """Wall time of one ``make_arrow.py`` process, and its closing ``images/s with ...`` line."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "make_arrow.py"), "--dataset", "mmimdb", "--root", str(raw), "--out", str(out),
           "--no-progress", "--workers", str(workers)]
    if max_side is not None:
        cmd += ["--max-side", str(max_side)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    speed = next((line for line in done.stdout.splitlines() if line.startswith("images/s with")), "")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, speed


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _side_list(text: str) -> list[int | None]:
    return [None if v.lower() == "none" else int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="scripts/bench_make_arrow.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=25000, help="number of posters (default 25000, MM-IMDb has 25,959)")
    p.add_argument("--workers", type=_int_list, default=[1, 2], help="comma list of --workers values (default 1,2)")
    p.add_argument("--max-side", type=_side_list, default=[None, 640],
                   help="comma list of --max-side values, 'none' = keep the bytes (default none,640)")
    p.add_argument("--repeats", type=int, default=2, help="runs per pair, alternating (default 2)")
    p.add_argument("--work", type=Path, default=None, help="folder for posters and arrow files (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the posters (reused by a later run with the same --work)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as json")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_make_arrow_"))
    raw, out = work / "raw", work / "arrow"
    try:
        if not (raw / "split.json").is_file():
            start = time.perf_counter()
            write_posters(raw, args.n, default_workers())
            print(f"wrote {args.n} posters ({POSTER_SIZE[0]}x{POSTER_SIZE[1]} JPEG) to {raw} in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        n = sum(len(v) for v in json.loads((raw / "split.json").read_text()).values())
        size = sum(f.stat().st_size for f in (raw / "images").iterdir())
        pairs = [(side, w) for side in args.max_side for w in args.workers]
        times: dict[tuple, list[float]] = {pair: [] for pair in pairs}
        for rep in range(args.repeats):
            for side, w in pairs:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                seconds, speed = run_make_arrow(raw, out, w, side)
                times[(side, w)].append(seconds)
                print(f"run {rep + 1}: --max-side {side or 'none'} --workers {w}: {seconds:.1f} s "
                      f"({n / seconds:.0f} images/s, load before {load:.1f}); {speed}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work if args.work is None else raw, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    print(f"make_arrow.py --dataset mmimdb, {n} posters ({size / n / 1024:.0f} KB mean), {os.cpu_count()} CPUs; "
          "images/s = posters / process wall time")
    print("| --max-side | --workers | wall time per run (s) | images/s best | images/s mean |")
    print("|---|---|---|---|---|")
    rows = []
    for (side, w), ts in times.items():
        rate = sum(n / t for t in ts) / len(ts)
        rows.append({"max_side": side, "workers": w, "seconds": ts, "images_per_s": rate,
                     "best_images_per_s": n / min(ts), "images": n})
        print(f"| {side or 'none'} | {w} | {', '.join(f'{t:.1f}' for t in ts)} | {n / min(ts):.0f} | {rate:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
