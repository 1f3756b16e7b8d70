"""Cost estimates of the experiment matrix: device-hours of a training run and its sweep from the rows of
``scripts/bench.py`` (measured samples/s, or counted FLOPs at an assumed MFU), and the table listing of
``scripts/reproduce.py --list``."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from mdpl.errors import UserInputError
from mdpl.data.registry import dataset_spec
from mdpl.experiments.matrix import Cell, Context, Table, run_key, scenario_union


def dataset_sizes(ctx: Context, dataset: str) -> tuple[tuple[int, int, int], str]:
    """(train, val, test) items: counted in the arrow files under --data-root when present, else the dataset's
    ``nominal_sizes``."""
    folder = Path(ctx.data_root) / dataset if ctx.data_root else None
    names = dataset_spec(dataset).arrow_file_names()
    if folder and all((folder / name).is_file() for name in names):
        import pyarrow as pa
        counts = []
        for name in names:
            try:
                with pa.memory_map(str(folder / name)) as source:
                    counts.append(pa.ipc.open_file(source).read_all().num_rows)
            except (OSError, pa.ArrowException) as err:
                raise UserInputError(f"--data-root: {folder / name} cannot be read as an Arrow file ({err}); rebuild "
                                     f"it with make_arrow.py") from None
        return (counts[0], counts[1], counts[2]), "counted"
    return dataset_spec(dataset).nominal_sizes, "nominal"


def bench_rows(path: str) -> list[dict]:
    """The rows of a ``scripts/bench.py --json`` file that ran and were timed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserInputError(f"--bench {path}: not a readable scripts/bench.py --json file ({err})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"--bench {path}: not a scripts/bench.py --json file (no rows)")
    return [r for r in data.get("rows", []) if r.get("status") == "ok" and r.get("train_samples_per_s")]


H100_BF16_PEAK_TFLOPS = 989.0
"""H100 SXM dense bf16 peak (TFLOP/s), the default of --peak-tflops for the FLOP-based estimate (--assume-mfu)."""


def run_hours(cell: Cell, ctx: Context, bench: list[dict], precision: str, scenarios: int,
              mfu: float | None = None, peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> float | None:
    """Device-hours of one training run + its sweep from scripts/bench.py rows (None: no bench row fits).

    epochs x train items / train samples/s + validations x val items / eval samples/s + scenarios x test items /
    eval samples/s, with the task's max_epoch and val_check_interval (validations = epochs x floor(1 / interval)).
    With `mfu`: the same sample passes x the bench's counted FLOPs per sample (train_gflops_per_sample /
    eval_gflops_per_sample, FlopCounterMode at full size: they do not depend on the device, so a CPU bench serves)
    / (peak_tflops x mfu); rows of any precision serve, those of `precision` first.
    A method/backbone pair bench.py does not time takes the slowest (most FLOPs) row of its
    backbone. The rows are at each method's default sizes: cells that widen a method (longer prompts, deeper
    prompting, dcp_table5's MMP cells) cost more than this estimate.
    """
    (n_train, n_val, n_test), _ = dataset_sizes(ctx, cell.dataset)
    spec = dataset_spec(cell.dataset)
    epochs, interval = spec.max_epoch, spec.val_check_interval
    validations = epochs * math.floor(1 / interval)
    rows = [r for r in bench if r.get("dataset") == cell.dataset and r.get("backbone") == cell.net]
    if mfu is None:
        rows = [r for r in rows if r.get("precision") == precision]
        pick = [r for r in rows if r.get("method") == cell.method] or sorted(rows, key=lambda r: r["train_samples_per_s"])
        if not pick:
            return None
        train, evaluate = pick[0]["train_samples_per_s"], pick[0]["eval_samples_per_s"]
        seconds = epochs * n_train / train + validations * n_val / evaluate + scenarios * n_test / evaluate
        return seconds / 3600
    rows = sorted((r for r in rows if r.get("train_gflops_per_sample") and r.get("eval_gflops_per_sample")),
                  key=lambda r: r.get("precision") != precision)
    pick = [r for r in rows if r.get("method") == cell.method] or sorted(rows, key=lambda r: -r["train_gflops_per_sample"])
    if not pick:
        return None
    flops = 1e9 * (epochs * n_train * pick[0]["train_gflops_per_sample"]
                   + (validations * n_val + scenarios * n_test) * pick[0]["eval_gflops_per_sample"])
    return flops / (peak_tflops * 1e12 * mfu) / 3600


def print_list(tables: Sequence[Table], ctx: Context, detail: bool, bench: list[dict] | None, precision: str,
               mfu: float | None = None, peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> None:
    """The tables: cells, runnable cells, not-yet-expressible cells, training runs (per seed; 'new' = not already
    needed by a table listed above it) and, with --bench, device-hours per seed of the table's runs (measured
    samples/s, or with `mfu` counted FLOPs / (peak_tflops x mfu))."""
    union = scenario_union(ctx)
    seen: dict[str, float | None] = {}
    print(f"{'table':<20} {'kind':<7} {'cells':>5} {'runnable':>8} {'not yet':>7} {'runs':>5} {'new':>4}"
          f"{'  h/seed':>9}  title")
    for table in tables:
        keys = {run_key(c, ctx): c for c in table.runnable}
        hours: dict[str, float | None] = {}
        if bench is not None:
            for key, cell in keys.items():
                hours[key] = run_hours(cell, ctx, bench, precision, len(union[key][0]) * len(union[key][1]),
                                       mfu, peak_tflops)
        new = [k for k in keys if k not in seen]
        seen.update({k: hours.get(k) for k in new})
        total = "" if bench is None else f"{sum(h for h in hours.values() if h is not None):9.1f}"
        print(f"{table.name:<20} {table.kind:<7} {len(table.cells):>5} {len(table.runnable):>8} "
              f"{len(table.cells) - len(table.runnable):>7} {len(keys):>5} {len(new):>4}{total or '':>9}  {table.title}")
        unknown = sorted({f"{c.method}@{c.net}/{c.dataset}" for k, c in keys.items() if hours.get(k, 0) is None})
        if unknown:
            print(f"{'':<20} no bench.py row for {', '.join(unknown)}: not in h/seed")
        if detail:
            runnable = {id(c): k for k, c in enumerate(table.runnable, 1)}
            for index, cell in enumerate(table.cells, 1):
                where = (f"runnable #{runnable[id(cell)]}, run {run_key(cell, ctx)}" if id(cell) in runnable
                         else f"not yet expressible: needs {cell.needs}")
                print(f"  {index:>3}. {cell.id}  [{cell.label}]  {where}")
    if bench is not None and mfu is not None:
        print(f"h/seed: estimate from the bench's counted FLOPs per sample at {peak_tflops:g} TFLOP/s peak x "
              f"{mfu:.0%} assumed MFU (not measured)")
    if len(tables) > 1:
        total = "" if bench is None else f", ~{sum(h for h in seen.values() if h is not None):.1f} device-hours"
        print(f"all listed tables: {len(seen)} distinct training runs per seed{total}")
