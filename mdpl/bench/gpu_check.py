"""The GPU check: every figure the README's GPU table needs, from one command (``scripts/gpu_check.py``).

GPU time comes in short slices, so the check is a fixed plan of steps, each a fresh process with its own time limit,
run in order of importance under one time budget for the whole check (``budget_s``): a step gets at most what is left
of it, a step that finds too little left is skipped, and a step that fails or runs out of time is reported in the
table (its error tail kept in the JSON; a bench step keeps the rows it finished, since ``scripts/bench.py`` writes its
JSON after every row) while the next one runs. So one command always ends within the budget with its JSON and
markdown written. The same plan runs on the CPU at tiny sizes (``--device cpu --tiny``), which the test suite does,
so a typo cannot cost GPU time. Steps, in the order they run:

* ``bench``: ``scripts/bench.py`` rows of every method on its paper backbone at the papers' sizes on MM-IMDb (the
  dataset every paper reports, with the longest texts), bf16 and fp32 (TF32 allowed), batch 32: training and
  evaluation samples/s, peak memory, executed FLOPs and MFU;
* ``reference``: ``tools/vs_reference.py`` (fp32, the same batches on both sides), when reference checkouts are given;
* ``loader``: the data module's train loader on the machine's cores, decode path and pixel cache, per worker count;
* ``real_run_short`` / ``real_run_long``: two ``run.py`` trainings on a synthetic dataset at full size (bf16, one
  device) that differ only in ``max_steps``; the difference of their wall times gives the samples/s of the steps
  between, without start-up, test and the first validation (the longer run validates a few more times on a
  64-row split: under 2 % of its steps' time). The synthetic dataset is written just before them;
* ``bench_datasets``: the bench rows in bf16 on the other datasets, so that ``gpu_check.json``, whose ``rows`` are
  those of both eager bench steps, gives ``scripts/reproduce.py --list --bench`` the device-hours of every table;
* ``profile``: where the time of a training step goes, fp32 (TF32) on the heaviest dataset as in the comparison
  with the reference: the kernels with the most self time per method (``scripts/bench.py --profile``);
* ``bench_compile``: the bench rows in bf16 with ``torch.compile``, in the registry's order (the baseline and the
  seed methods first), last because each compilation takes tens of seconds: it gets whatever the budget has left.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REAL_RUN_DATASET_ROWS = {"gpu": (2048, 64, 64), "tiny": (24, 8, 8)}
REAL_RUN_STEPS = {"gpu": (64, 320), "tiny": (2, 40)}
ORDER = ("bench", "reference", "loader", "real_run_short", "real_run_long", "bench_datasets", "profile",
         "bench_compile")
TOP_KERNELS = (12, 5)   # kept in the JSON, shown in the table
EAGER_BENCH = ("bench", "bench_datasets")   # their rows are the JSON's "rows": `scripts/reproduce.py --list --bench`
BUDGET_S = 470          # the whole check: under 8 minutes, its own start and the report included
MIN_STEP_S = 20         # a step that would get less is skipped: it could not even start its interpreter and model


@dataclass
class Step:
    """One process of the plan: its command line, time limit and the JSON file it leaves (if any)."""

    name: str
    argv: list[str]
    timeout_s: int
    json_path: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def heaviest_dataset() -> str:
    """The registered dataset with the longest texts (the built-ins: MM-IMDb, which every paper reports)."""
    from mdpl.data.registry import available_datasets, dataset_spec

    return max(available_datasets(), key=lambda name: dataset_spec(name).max_text_len or 0)


def bench_steps(out: Path, device: str, tiny: bool) -> list[Step]:
    """The model rows (eager on the heaviest dataset, eager bf16 on the others, compiled) and the loader rows of
    ``scripts/bench.py``."""
    from mdpl.data.registry import available_datasets, demo_dataset
    from mdpl.prompts.registry import baseline_method

    # the dry run: the real run's dataset; the check: every method on the heaviest dataset
    first = demo_dataset() if tiny else heaviest_dataset()
    others = ",".join(d for d in available_datasets() if d != first)
    small = ["--small"] if tiny else []
    batch = "4" if tiny else "32"
    common = [*small, "--device", device, "--batch-size", batch, "--no-loader"]
    steps = ["--steps", "1", "--warmup", "1"] if tiny else ["--steps", "10", "--warmup", "3"]
    # compiling every row takes minutes on a CPU: the dry run compiles one row, which exercises the same path
    one = ["--methods", baseline_method()] if tiny else []
    eager = Step("bench", _python("scripts/bench.py", *common, "--datasets", first, *steps, "--precisions",
                                  "bf16-mixed,fp32", "--tf32", "--json", str(out / "bench.json")), 200,
                 out / "bench.json")
    rest = Step("bench_datasets", _python("scripts/bench.py", *common, "--datasets", others, *steps, "--precisions",
                                          "bf16-mixed", *one, "--json", str(out / "bench_datasets.json")), 150,
                out / "bench_datasets.json")
    compiled = Step("bench_compile", _python("scripts/bench.py", *common, "--datasets", first, *steps, "--precisions",
                                             "bf16-mixed", "--compile", *one, "--json", str(out / "bench_compile.json")),
                    300, out / "bench_compile.json")
    profiled = Step("profile", _python("scripts/bench.py", *common, "--datasets", first, "--steps", "1", "--warmup", "1",
                                       "--precisions", "fp32", "--tf32", "--profile", str(TOP_KERNELS[0]), *one,
                                       "--json", str(out / "profile.json")), 120, out / "profile.json")
    loader_size = ["--small", "--datasets", demo_dataset()] if tiny else []
    workers = ["0", "--loader-rows", "16", "--loader-batches", "2", "--loader-batch-size", "4"] if tiny else ["4,8,16"]
    loader = Step("loader", _python("scripts/bench.py", *loader_size, "--device", device, "--loader-only",
                                    "--loader-workers", *workers, "--json", str(out / "loader.json")),
                  90, out / "loader.json")
    return [eager, rest, compiled, loader, profiled]


def reference_step(out: Path, device: str, tiny: bool, refs: Path) -> Step:
    """mdpl against the reference code on the same batches (fp32; one fresh process per side and repeat)."""
    size = ["--size", "small", "--batch-size", "4", "--dcp-batch-size", "4", "--repeats", "1"] if tiny else \
        ["--size", "full", "--batch-size", "32", "--dcp-batch-size", "20", "--repeats", "1", "--steps", "5",
         "--threads", "8"]
    return Step("reference", _python("tools/vs_reference.py", "--refs", str(refs), "--device", device, *size,
                                     "--json", str(out / "reference.json")), 120, out / "reference.json")


def prepare_real_run_data(out: Path, tiny: bool) -> dict[str, str]:
    """A synthetic dataset of the demo's kind in its raw layout, converted by ``make_arrow.py``, and its vocabulary."""
    from mdpl.data.registry import demo_dataset
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab

    dataset = demo_dataset()
    root = out / "real_run_data"
    n_train, n_val, n_test = REAL_RUN_DATASET_ROWS["tiny" if tiny else "gpu"]
    write_synthetic(dataset, root / "raw", n_train, n_val, n_test, image_size=64 if tiny else 384)
    vocab = write_wordpiece_vocab(root / "tokenizer" / "vocab.txt")
    done = subprocess.run(_python("make_arrow.py", "--dataset", dataset, "--root", str(root / "raw"), "--out",
                                  str(root / "arrow"), "--no-progress", "--overwrite"), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"make_arrow.py failed: {done.stderr.strip()[-500:]}")
    size = sum(1 for line in vocab.read_text(encoding="utf-8").splitlines() if line)
    return {"dataset": dataset, "data_root": str(root / "arrow"), "tokenizer": str(vocab.parent),
            "vocab_size": str(size)}


def real_run_steps(out: Path, device: str, tiny: bool, data: dict[str, str]) -> list[Step]:
    """Two ``run.py`` trainings differing only in ``max_steps`` (the module docstring)."""
    from mdpl.backbones.registry import default_backbone
    from mdpl.prompts.registry import baseline_method

    batch = 4 if tiny else 32
    keys = [f"task_finetune_{data['dataset']}", *(["tiny"] if tiny else []), f"prompt_method={baseline_method()}",
            f"backbone={default_backbone()}", f"data_root={data['data_root']}", f"tokenizer={data['tokenizer']}",
            f"vocab_size={data['vocab_size']}", "load_path=", f"per_gpu_batchsize={batch}", f"batch_size={batch}",
            f"num_gpus={0 if device == 'cpu' else 1}", f"precision={'32-true' if device == 'cpu' else 'bf16-mixed'}",
            "num_workers=2" if tiny else "num_workers=8", "max_epoch=100", "val_check_interval=1.0",
            "warmup_steps=0.1"]
    steps = []
    for label, n in zip(("short", "long"), REAL_RUN_STEPS["tiny" if tiny else "gpu"]):
        log_dir = out / f"real_run_{label}"
        steps.append(Step(f"real_run_{label}", _python("run.py", "with", *keys, f"max_steps={n}",
                                                        f"log_dir={log_dir}", f"exp_name=gpu_check_{label}"),
                          75, None, {"max_steps": n, "batch": batch}))
    return steps


def plan_real_runs(planned: dict[str, Step], out: Path, device: str, tiny: bool) -> dict[str, str]:
    """Write the real runs' synthetic dataset and add both runs to ``planned`` (skipped where it could not be
    written); return the dataset's description."""
    try:
        data = prepare_real_run_data(out, tiny)
    except (RuntimeError, OSError) as exc:
        for name in (n for n in ORDER if n.startswith("real_run")):
            planned[name] = Step(name, [], 0)
            skip_step(planned[name], f"synthetic data: {str(exc)[-300:]}")
        return {"dataset": ""}
    planned.update((s.name, s) for s in real_run_steps(out, device, tiny, data))
    return data


def run_step(step: Step, timeout_s: float | None = None) -> None:
    """Run one step in a fresh process for at most ``timeout_s`` (default: its own limit); record status, wall time,
    and its JSON (also what a timed-out step wrote before it was stopped) or the tail of its error output."""
    limit = step.timeout_s if timeout_s is None else min(step.timeout_s, timeout_s)
    start = time.perf_counter()
    try:
        done = subprocess.run(step.argv, capture_output=True, text=True, timeout=limit, cwd=ROOT)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = done.stderr.strip().splitlines()[-8:] if done.returncode else []
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {limit:.0f} s", []
    step.result.update(status=status, wall_s=time.perf_counter() - start, error_tail=tail,
                       command=" ".join(Path(a).name if a == sys.executable else a for a in step.argv))
    read_step_json(step)
    print(f"[gpu_check] {step.name}: {step.result['status']} in {step.result['wall_s']:.0f} s", file=sys.stderr,
          flush=True)


def read_step_json(step: Step) -> None:
    """Attach the step's JSON; a step stopped by its time limit keeps the rows it finished ("partial" in status)."""
    if step.json_path is None or not step.json_path.is_file() or step.result["status"].startswith("failed"):
        return
    data = json.loads(step.json_path.read_text(encoding="utf-8"))
    if step.result["status"] != "ok":
        if not any(data.get(key) for key in ("rows", "loader", "preparation")):
            return
        step.result["status"] += ", partial"
    step.result["data"] = data


def skip_step(step: Step, why: str) -> None:
    step.result.update(status=f"skipped ({why})", wall_s=0.0, error_tail=[])
    print(f"[gpu_check] {step.name}: {step.result['status']}", file=sys.stderr, flush=True)


def _both_ok(steps: dict[str, Step]) -> bool:
    return all(name in steps and steps[name].result.get("status") == "ok"
               for name in ("real_run_short", "real_run_long"))


def real_run_rate(steps: dict[str, Step]) -> float | None:
    """Training samples/s of the real run: extra samples of the long run over its extra wall time."""
    if not _both_ok(steps):
        return None
    short, long = steps["real_run_short"], steps["real_run_long"]
    extra_s = long.result["wall_s"] - short.result["wall_s"]
    extra_samples = (long.result["max_steps"] - short.result["max_steps"]) * long.result["batch"]
    # a non-positive difference means start-up noise swamped the extra steps: no rate rather than a wrong one
    return extra_samples / extra_s if extra_s > 0 else None


def _num(value: float | None, spec: str) -> str:
    """A figure of the tables, or "–" where the step that measures it did not run or finish."""
    return "–" if value is None else format(value, spec)


def _rows(step: Step | None, key: str = "rows") -> list[dict]:
    return [] if step is None else list((step.result.get("data") or {}).get(key, []))


def method_table(steps: dict[str, Step]) -> list[str]:
    """Per method x dataset: samples/s (bf16, fp32 TF32, bf16 compiled), mdpl / reference, speed-up, memory, MFU."""
    eager = {(r["method"], r["dataset"], r["precision"]): r for r in _rows(steps.get("bench")) if r["status"] == "ok"}
    comp = {(r["method"], r["dataset"]): r for r in _rows(steps.get("bench_compile")) if r["status"] == "ok"}
    ref_data = (steps["reference"].result.get("data") if "reference" in steps else None) or []
    ref = {(r["method"], r["dataset"]): r for r in ref_data}
    lines = ["| method | backbone | dataset | train/s bf16 | train/s fp32 (TF32) | train/s bf16 compiled | eval/s bf16 | "
             "MFU bf16 | peak MiB bf16 | fp32 train/s mdpl / ref | speed-up | peak memory ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (method, dataset, precision), r in eager.items():
        if precision != "bf16-mixed":
            continue
        fp32, c, x = eager.get((method, dataset, "fp32"), {}), comp.get((method, dataset), {}), ref.get((method, dataset))
        mfu = r.get("train_mfu")
        vs = ("–", "–", "–") if x is None else (
            f"{x['train_sps'][0]:.1f} / {x['train_sps'][1]:.1f}", f"{x['speedup']:.2f}×",
            f"{x['peak'][0] / x['peak'][1]:.2f}" if x["peak"][0] and x["peak"][1] else "–")
        lines.append(f"| {method} | {r['backbone']} | {dataset} | {r['train_samples_per_s']:.1f} | "
                     f"{_num(fp32.get('train_samples_per_s'), '.1f')} | "
                     f"{_num(c.get('train_samples_per_s'), '.1f')} | {r['eval_samples_per_s']:.1f} | "
                     f"{'–' if mfu is None else f'{100 * mfu:.1f} %'} | {r['train_peak_mib'] or 0:.0f} | "
                     f"{vs[0]} | {vs[1]} | {vs[2]} |")
    return lines


def loader_table(steps: dict[str, Step]) -> list[str]:
    """Images/s of the train loader per worker count, decode path and pixel cache, beside the fastest bf16 step."""
    appetite: dict[str, float] = {}
    for r in _rows(steps.get("bench")):
        if r["status"] == "ok" and r["precision"] == "bf16-mixed":
            appetite[r["backbone"]] = max(appetite.get(r["backbone"], 0.0), r["train_samples_per_s"])
    lines = ["| dataset | backbone | workers | images/s decode | images/s pixel cache | fastest bf16 training step "
             "(samples/s) |", "|---|---|---:|---:|---:|---:|"]
    for r in _rows(steps.get("loader"), "loader"):
        cache = r.get("cache_images_per_s")
        lines.append(f"| {r['dataset']} | {r['backbone']} | {r['workers']} | {r['images_per_s']:.0f} | "
                     f"{_num(cache, '.0f')} | {_num(appetite.get(r['backbone']), '.0f')} |")
    return lines


def kernel_table(steps: dict[str, Step]) -> list[str]:
    """Per profiled row: the kernels with the most self time in a training step, their ms per step and share."""
    lines = ["| method | backbone | dataset | kernel | self ms / step | share |", "|---|---|---|---|---:|---:|"]
    for r in _rows(steps.get("profile")):
        for k in (r.get("train_top_kernels") or [])[:TOP_KERNELS[1]]:
            name = k["name"] if len(k["name"]) <= 80 else k["name"][:77] + "..."
            lines.append(f"| {r['method']} | {r['backbone']} | {r['dataset']} | `{name.replace('|', '/')}` | "
                         f"{k['self_ms_per_step']:.2f} | {100 * k['share']:.1f} % |")
    return lines


def report(steps: dict[str, Step], meta: dict[str, Any]) -> str:
    """The markdown report: the machine, each step's status, the method, loader and real-run figures."""
    rate = real_run_rate(steps)
    bench_rate = [r["train_samples_per_s"] for r in _rows(steps.get("bench"))
                  if r["status"] == "ok" and r["precision"] == meta["real_run_precision"]
                  and r["method"] == meta["real_run_method"] and r["dataset"] == meta["real_run_dataset"]]
    lines = [f"GPU check on {meta['device_name']} (torch {meta['torch']}, driver {meta['driver']}), "
             f"{meta['wall_s']:.0f} s", "", "| step | status | wall s |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.result.get('status', 'not run')} | {s.result.get('wall_s', 0):.0f} |"
              for s in steps.values()]
    lines += ["", *method_table(steps), "", *loader_table(steps), "", *kernel_table(steps), ""]
    predicted = f"{statistics.median(bench_rate):.1f}" if bench_rate else "–"
    measured = "–" if rate is None else f"{rate:.1f}"
    lines.append(f"Real `run.py` training ({meta['real_run_method']}, {meta['real_run_dataset']}, "
                 f"{meta['real_run_precision']}): {measured} samples/s; the bench row predicts {predicted} samples/s.")
    if rate is None and _both_ok(steps):
        lines.append("The longer run was not slower than the shorter one: start-up time varied by more than the "
                     "extra steps took, so no rate is given (give the long run more steps).")
    return "\n".join(lines) + "\n"


def machine_meta(device: str) -> dict[str, Any]:
    import platform

    import torch

    name, driver = platform.processor() or platform.machine(), "–"
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        driver = smi.stdout.strip() or "–"
    return {"device": device, "device_name": name, "driver": driver, "torch": torch.__version__}


def gpu_check(out: Path, device: str, tiny: bool, refs: Path | None, only: list[str] | None = None,
              budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Run the plan (``only``: a subset of step names) in ``ORDER`` within ``budget_s`` seconds in all, write
    ``gpu_check.json`` and ``gpu_check.md`` into ``out``."""
    from mdpl.atomic import write_text_atomic
    from mdpl.prompts.registry import baseline_method

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    planned = {s.name: s for s in bench_steps(out, device, tiny)}
    if refs:
        planned["reference"] = reference_step(out, device, tiny, refs)
    names = [n for n in ORDER if (n in planned or n.startswith("real_run")) and (not only or n in only)]
    steps: dict[str, Step] = {}
    data: dict[str, str] = {"dataset": ""}

    def left() -> float:
        return budget_s - (time.perf_counter() - start)

    for name in names:
        if name.startswith("real_run") and name not in planned and left() >= MIN_STEP_S:
            data = plan_real_runs(planned, out, device, tiny)
        step = steps[name] = planned.get(name) or Step(name, [], 0)
        if step.result.get("status"):
            continue   # skipped while it was planned
        if left() < MIN_STEP_S:
            skip_step(step, "time budget spent")
        else:
            run_step(step, left())
    meta = {**machine_meta(device), "tiny": tiny, "budget_s": budget_s, "wall_s": time.perf_counter() - start,
            "real_run_method": baseline_method(), "real_run_dataset": data["dataset"],
            "real_run_precision": "fp32" if device == "cpu" else "bf16-mixed",
            "real_run_samples_per_s": real_run_rate(steps)}
    markdown = report(steps, meta)
    rows = [r for name in EAGER_BENCH for r in _rows(steps.get(name))]
    write_text_atomic(out / "gpu_check.json", json.dumps(
        {"meta": meta, "steps": {n: s.result for n, s in steps.items()}, "rows": rows}, indent=1))
    write_text_atomic(out / "gpu_check.md", markdown)
    print(markdown)
    return {"meta": meta, "steps": steps}
