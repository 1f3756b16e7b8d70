#!/usr/bin/env python
"""Reproduce the papers' tables and figures: a thin driver over ``run.py``.

    python scripts/reproduce.py --list                                   # the tables, their cells and runs
    python scripts/reproduce.py dcp_main --data-root ARROW --weights WEIGHTS --out repro --dry-run
    python scripts/reproduce.py dcp_main --data-root ARROW --weights WEIGHTS --out repro [--seeds 0,1,2]
    python scripts/reproduce.py dcp_main ... --cells 3/16                # shard 3 of 16 (SLURM array task)
    python scripts/reproduce.py dcp_length --tiny --out /tmp/repro       # the same matrix, synthetic data, CPU

A table is a list of cells. A cell is one training run (dataset, method, backbone, training missing setting and
ablation keys) whose final test is the one-pass evaluation sweep over the cell's test scenarios
(``test_types`` x ``test_ratios``, on the best checkpoint). The matrix, its executor, the result readers and
the reports are ``mdpl.experiments``; this file is their command line. Nothing here imports mdpl for training or
evaluation: every run is ``python run.py with <task> <method preset> [on_clip|on_vilt|on_coca] [tiny] key=value ...``
in a subprocess, and results are read from what a run writes into its run directory (``results.csv`` of the
sweep, ``test_metrics.json``, and ``csv/metrics.csv`` for the best validation score). ``--tiny`` writes the
synthetic data with ``mdpl.data.synthetic.write_synthetic`` + ``mdpl.data.writers.make_arrow``.

Runs are shared between tables: a training run is identified by its experiment settings (named configs + keys;
``run_key``), lives in ``OUT/runs/<run key>/seed<k>/`` and sweeps the union of the test scenarios of every cell
of every table that uses it, so e.g. DCP on MM-IMDb at 70 % missing-both is trained once for Table 4, the
component ablation, Fig. 3 and Fig. 4. A (cell, seed) is done when a run directory under its folder holds a
``results.csv`` with all the cell's scenarios; done cells are skipped. A training run killed before its test is
continued with ``resume=True``; a finished training whose results lack a scenario (the registry changed) is
evaluated again with ``test_only=True`` on its best checkpoint. Outputs: ``OUT/<TABLE>.md``, ``OUT/<TABLE>.csv``
(ours: mean ± std over seeds, the paper's number, the difference) and ``OUT/<TABLE>.png``.

The papers' numbers come from ``scripts/paper_results.csv`` (one row per printed number, ``id`` referenced by
the cells). Exit status: 0 when every selected cell ran or was skipped, 1 when a run failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/reproduce.py` from anywhere
    sys.path.insert(0, str(ROOT))

from mdpl.errors import UserInputError  # noqa: E402
from mdpl.backbones.registry import available_backbones, backbone_card  # noqa: E402
from mdpl.data.registry import available_datasets  # noqa: E402
from mdpl.experiments import matrix  # noqa: E402
from mdpl.experiments.estimate import H100_BF16_PEAK_TFLOPS, bench_rows, print_list  # noqa: E402
from mdpl.experiments.executor import execute  # noqa: E402
from mdpl.experiments.matrix import Context  # noqa: E402
from mdpl.experiments.summary import load_paper, write_report  # noqa: E402

PAPER_CSV = Path(__file__).resolve().with_name("paper_results.csv")


def parse_cells(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"--cells {text!r}: give i/N with 1 <= i <= N, e.g. 3/16")
    return int(match.group(1)), int(match.group(2))


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give distinct integers, e.g. 0,1,2")
    return seeds


DRIVER_KEYS = frozenset({"seed", "log_dir", "test_types", "test_ratios", "test_type", "test_ratio", "test_only",
                         "resume", "resume_from", "data_root", "load_path", "tokenizer", "vocab_size", "prompt_method",
                         "backbone", "dataset", "exp_name"})
"""Keys the driver sets itself (or that the cell's named configs decide): --set may not change them."""


def parse_set(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: give key=value, e.g. per_gpu_batchsize=32")
    weights_keys = {backbone_card(name).weights_key for name in available_backbones()}
    if key.split(".")[0] in DRIVER_KEYS | weights_keys or key.startswith(("missing_type", "missing_ratio")):
        raise argparse.ArgumentTypeError(f"--set {key}: set by the table's cells or by reproduce.py itself "
                                         "(--data-root, --weights, --tokenizer, --seeds)")
    return key, value


def parse_jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs {text!r}: give a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", help="a table name (--list shows them) or 'all'")
    entries = {name: backbone_card(name) for name in available_backbones()}
    p.add_argument("--data-root", default="", help="folder with one arrow folder per dataset: "
                                                   f"{', '.join(d + '/' for d in available_datasets())} (make_arrow.py --out)")
    p.add_argument("--weights", default="", help="folder with " + ", ".join(
        f"{e.weights_file} ({name})" for name, e in entries.items() if e.weights_file))
    p.add_argument("--tokenizer", default="", help="WordPiece vocab.txt folder (default: " + ", ".join(
        f"WEIGHTS/{e.tokenizer_dir} ({name})" for name, e in entries.items() if e.tokenizer_dir) + ")")
    p.add_argument("--out", default="reproduce", help="output folder: runs/, <TABLE>.md/.csv/.png (default: %(default)s)")
    p.add_argument("--seeds", type=parse_seeds, default=(0, 1, 2), help="comma list (default: 0,1,2)")
    p.add_argument("--tiny", action="store_true", help="synthetic data under --out, `tiny` models, CPU")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--cells", type=parse_cells, default=None, metavar="i/N",
                   help="run shard i of N of the table's runnable cells (round robin), e.g. a SLURM array task")
    p.add_argument("--list", action="store_true", help="list the tables (with a table: its cells)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="extra run.py key for every run, e.g. --set per_gpu_batchsize=32 (repeatable)")
    p.add_argument("--jobs", type=parse_jobs, default=1, help="runs at a time (default 1; e.g. 2 for --tiny on 2 cores)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    p.add_argument("--bench", default="", help="with --list: a scripts/bench.py --json file, for device-hours")
    p.add_argument("--precision", default="bf16-mixed", help="with --bench: the bench rows to use (default: %(default)s)")
    p.add_argument("--assume-mfu", type=float, default=None, metavar="F",
                   help="with --bench: hours from the bench's counted FLOPs per sample / (--peak-tflops x F), e.g. "
                        "0.25, instead of its measured samples/s (a CPU bench serves: FLOPs do not depend on the device)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                   help="with --assume-mfu: peak TFLOP/s (default %(default)s: H100 SXM dense bf16)")
    args = p.parse_args(argv)

    def absolute(path: str) -> str:   # runs start in the repository root: relative paths must not change meaning
        return os.path.abspath(path) if path else ""

    ctx = Context(out=Path(absolute(args.out)), data_root=absolute(args.data_root), weights=absolute(args.weights),
                  tokenizer=absolute(args.tokenizer), tiny=args.tiny, seeds=args.seeds, sets=tuple(args.set))
    tables = matrix.tables()
    if args.table in (None, "all"):
        selected = list(tables.values())
    elif args.table in tables:
        selected = [tables[args.table]]
    else:
        p.error(f"unknown table {args.table!r}; choose one of: {', '.join(tables)} (or all)")
    if args.list:
        bench = bench_rows(args.bench) if args.bench else None
        if args.assume_mfu is not None and not (0 < args.assume_mfu <= 1 and args.peak_tflops > 0):
            p.error("--assume-mfu: give a fraction in (0, 1], e.g. 0.25 (and a positive --peak-tflops)")
        print_list(selected, ctx, detail=args.table not in (None, "all"), bench=bench, precision=args.precision,
                   mfu=args.assume_mfu, peak_tflops=args.peak_tflops)
        return 0
    if args.table is None:
        p.error("name a table (or all), or pass --list")
    if not (args.tiny or args.dry_run or args.report_only) and not (args.data_root and args.weights):
        p.error("real runs need --data-root and --weights (or --tiny for synthetic data, --dry-run to print)")
    failures = 0
    paper = load_paper(PAPER_CSV)
    for table in selected:
        if not args.report_only:
            failures += execute(table, ctx, args.cells, args.dry_run, args.jobs)
        if not args.dry_run:
            paths = write_report(table, ctx, paper)
            print(f"[reproduce] {table.name}: " + ", ".join(str(v) for v in paths.values()))
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `... --dry-run | head`: no traceback
    try:
        sys.exit(main())
    except UserInputError as err:   # a damaged input file named on the command line
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        sys.exit(2)
