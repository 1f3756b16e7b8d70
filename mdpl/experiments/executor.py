"""Running the experiment matrix: every (cell, seed) without a result is trained (or resumed, or re-evaluated) with
``run.py`` in a subprocess, ``jobs`` at a time; ``--tiny`` writes synthetic data first."""
from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mdpl.data.registry import dataset_spec
from mdpl.experiments.matrix import (Cell, Context, Table, eval_command, path_keys, run_key, scenario_union,
                                     seed_dir, select_cells, train_command)
from mdpl.experiments.results import find_result, training_state

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: runs start there (``run.py``, ``config.py``)."""
TINY_SAMPLES = (24, 8, 16)
"""--tiny: synthetic train / val / test items per dataset (MM-IMDb: movies, 1-3 plot items each)."""


def prepare_tiny_data(ctx: Context, datasets: Iterable[str]) -> None:
    """Synthetic raw data -> arrow files (+ a WordPiece vocabulary) under OUT/tiny_data, once."""
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
    from mdpl.data.writers import make_arrow

    vocab = ctx.tiny_data / "tok" / "vocab.txt"
    if not vocab.is_file():
        write_wordpiece_vocab(vocab)
    for ds in sorted(set(datasets)):
        arrow = ctx.tiny_data / ds / "arrow"
        if all((arrow / name).is_file() for name in dataset_spec(ds).arrow_file_names()):
            continue
        n_train, n_val, n_test = TINY_SAMPLES
        write_synthetic(ds, ctx.tiny_data / ds / "raw", n_train, n_val, n_test, seed=0)
        make_arrow(ds, ctx.tiny_data / ds / "raw", arrow, progress=False, overwrite=True)


def check_inputs(cells: Sequence[Cell], ctx: Context) -> list[str]:
    """Missing data folders / weight files for a real run (one line each)."""
    problems = []
    for path in sorted({str(v) for c in cells for _, v in path_keys(c, ctx)}):
        if not Path(path).exists():
            problems.append(f"missing: {path}")
    return problems


def _shell(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def run_one(cmd: list[str], log: Path) -> int:
    """Run `cmd` (python run.py ...) from the repository root, appending its output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / "run.py"), *cmd[2:]]
    with open(log, "a") as fh:
        fh.write(f"\n$ {_shell(cmd)}\n")
        fh.flush()
        return subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def execute(table: Table, ctx: Context, shard: tuple[int, int] | None, dry_run: bool, jobs: int = 1) -> int:
    """Run (or, dry run, print) every (cell, seed) of the shard that has no result yet, `jobs` at a time.
    Returns the number of failed runs."""
    union = scenario_union(ctx)
    cells = select_cells(table, shard)
    if shard is None or shard[0] == 1:
        for cell in table.cells:
            if cell.needs:
                print(f"# skip {table.name} {cell.id} [{cell.label}]: not yet expressible: needs {cell.needs}")
    if not dry_run and ctx.tiny and cells:
        prepare_tiny_data(ctx, [c.dataset for c in cells])
    if not dry_run and not ctx.tiny:
        problems = check_inputs(cells, ctx)
        if problems:
            print("error: " + "; ".join(problems), file=sys.stderr)
            return len(cells) * len(ctx.seeds)
    work = []
    for cell in cells:
        sweep = union[run_key(cell, ctx)]
        for seed in ctx.seeds:
            found = find_result(cell, ctx, seed)
            if found is not None:
                print(f"# skip {table.name} {cell.id} seed {seed}: done ({found.run_dir})")
                continue
            state, path = training_state(cell, ctx, seed)
            if state == "trained":
                cmd, log = eval_command(cell, ctx, seed, sweep, path), seed_dir(cell, ctx, seed) / "eval.log"
            else:
                cmd = train_command(cell, ctx, seed, sweep, resume=state == "resume")
                log = seed_dir(cell, ctx, seed) / "train.log"
            if dry_run:
                print(f"# {table.name} {cell.id} [{cell.label}] seed {seed}")
                print(_shell(cmd))
            else:
                work.append((cell, seed, state, cmd, log))
    lock = threading.Lock()

    def one(item) -> bool:
        cell, seed, state, cmd, log = item
        verb = {"trained": "evaluating", "resume": "resuming"}.get(state, "training")
        with lock:
            print(f"[reproduce] {table.name} {cell.id} [{cell.label}] seed {seed}: {verb} ...", flush=True)
        started = time.perf_counter()
        rc = run_one(cmd, log)
        ok = rc == 0 and find_result(cell, ctx, seed) is not None
        with lock:
            if ok:
                print(f"[reproduce]   {cell.id} seed {seed}: done in {time.perf_counter() - started:.0f} s", flush=True)
            else:
                print(f"[reproduce]   {cell.id} seed {seed}: FAILED (exit {rc}; log {log}):\n{_tail(log)}",
                      file=sys.stderr, flush=True)
        return ok

    if jobs <= 1:
        outcomes = [one(item) for item in work]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(one, work))
    return outcomes.count(False)
