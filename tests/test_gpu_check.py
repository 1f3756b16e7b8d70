"""scripts/gpu_check.py: the GPU run must not fail on a typo. Every step's command line of the GPU plan and of the
CPU dry run is accepted by its own parser (bench, reference harness) or resolves as a Sacred config (run.py), and
the real-run pair trains through run.py on the CPU and its rate is the one its recorded wall times give."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mdpl.bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(out: Path, device: str, tiny: bool) -> list[gc.Step]:
    data = {"dataset": "food101", "data_root": str(out / "arrow"), "tokenizer": str(out / "tok"), "vocab_size": "50"}
    return [*gc.bench_steps(out, device, tiny), gc.reference_step(out, device, tiny, out / "refs"),
            *gc.real_run_steps(out, device, tiny, data)]


@pytest.mark.parametrize("device,tiny", [("cuda", False), ("cpu", True)])
def test_every_step_command_parses(tmp_path: Path, device: str, tiny: bool) -> None:
    bench, harness = _load("scripts/bench.py"), _load("tools/vs_reference.py")
    from runs import resolved_config

    plan = _plan(tmp_path, device, tiny)
    assert [s.name for s in plan] == ["bench", "bench_datasets", "bench_compile", "loader", "profile", "reference",
                                      "real_run_short", "real_run_long"]
    for step in plan:
        script, args = Path(step.argv[1]).relative_to(ROOT).as_posix(), step.argv[2:]
        if script == "scripts/bench.py":
            parsed = bench.parse_args(args)
            assert parsed.device == device and parsed.small == tiny
        elif script == "tools/vs_reference.py":
            parsed = harness.parse_args(args)
            assert parsed.device == device and parsed.size == ("small" if tiny else "full")
        else:
            assert script == "run.py" and args[0] == "with"
            named = [a for a in args[1:] if "=" not in a]
            updates = dict(a.split("=", 1) for a in args[1:] if "=" in a)
            config = resolved_config(named, {k: v for k, v in updates.items() if k not in ("vocab_size", "load_path")})
            assert config["dataset"] == "food101" and config["prompt_method"] == "none"
            assert int(updates["max_steps"]) == step.result["max_steps"]
    compiled = next(s for s in plan if s.name == "bench_compile")
    assert "--compile" in compiled.argv
    from mdpl.data.registry import available_datasets

    datasets = {s.name: bench.parse_args(s.argv[2:]).dataset_list for s in plan
                if s.name.startswith("bench") or s.name == "profile"}
    assert sorted(datasets["bench"] + datasets["bench_datasets"]) == sorted(available_datasets())
    assert datasets["bench"] == datasets["bench_compile"] == datasets["profile"] == (["food101"] if tiny else ["mmimdb"])
    assert bench.parse_args(next(s for s in plan if s.name == "profile").argv[2:]).profile == gc.TOP_KERNELS[0]


def test_real_run_pair_measures_a_rate(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--tiny", "--out",
                           str(out), "--only", "real_run_short,real_run_long"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(result["steps"]) == {"real_run_short", "real_run_long"}
    assert all(s["status"] == "ok" for s in result["steps"].values())
    assert [s["max_steps"] for s in result["steps"].values()] == list(gc.REAL_RUN_STEPS["tiny"])
    # the rate is whatever the two recorded wall times give (their difference is timing noise-prone on a CPU)
    short, long = (result["steps"][f"real_run_{n}"] for n in ("short", "long"))
    extra_s = long["wall_s"] - short["wall_s"]
    expected = (long["max_steps"] - short["max_steps"]) * long["batch"] / extra_s if extra_s > 0 else None
    assert result["meta"]["real_run_samples_per_s"] == (pytest.approx(expected) if expected else None)
    markdown = (out / "gpu_check.md").read_text()
    assert "| real_run_long | ok |" in markdown and "Real `run.py` training" in markdown


def _pair(short_s: float, long_s: float, long_status: str = "ok") -> dict[str, gc.Step]:
    return {name: gc.Step(name, [], 1, None, {"status": status, "wall_s": wall, "max_steps": n, "batch": 4})
            for name, status, wall, n in (("real_run_short", "ok", short_s, 2), ("real_run_long", long_status, long_s, 42))}


def test_real_run_rate_is_extra_samples_over_extra_time_or_none() -> None:
    assert gc.real_run_rate(_pair(10.0, 30.0)) == pytest.approx(40 * 4 / 20.0)
    assert gc.real_run_rate(_pair(10.0, 9.5)) is None            # noise swamped the extra steps
    assert gc.real_run_rate(_pair(10.0, 30.0, "failed (exit 1)")) is None
    meta = {"device_name": "cpu", "torch": "x", "driver": "–", "wall_s": 1.0, "real_run_method": "none",
            "real_run_dataset": "food101", "real_run_precision": "fp32"}
    assert "The longer run was not slower" in gc.report(_pair(10.0, 9.5), meta)
    assert "The longer run was not slower" not in gc.report(_pair(10.0, 30.0), meta)
    assert ": 8.0 samples/s;" in gc.report(_pair(10.0, 30.0), meta)


def test_unknown_step_is_one_error_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--tiny", "--out",
                           str(tmp_path), "--only", "benhc"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown step(s) benhc; choose from bench, reference, loader, real_run_short, real_run_long, "
        "bench_datasets, profile, bench_compile"]
    assert not (tmp_path / "gpu_check.json").exists()


def test_a_spent_budget_skips_every_step_and_still_writes_the_report(tmp_path: Path) -> None:
    result = gc.gpu_check(tmp_path, "cpu", True, tmp_path / "refs", None, budget_s=1)
    assert list(result["steps"]) == list(gc.ORDER)
    assert all(s.result["status"] == "skipped (time budget spent)" for s in result["steps"].values())
    assert not (tmp_path / "real_run_data").exists()            # nothing is prepared for a run that cannot start
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["meta"]["budget_s"] == 1 and written["meta"]["real_run_samples_per_s"] is None
    assert "| bench_compile | skipped (time budget spent) | 0 |" in (tmp_path / "gpu_check.md").read_text()
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--tiny", "--out",
                           str(tmp_path / "cli"), "--only", "bench", "--budget-s", "1"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 1 and "error: step(s) bench did not finish" in done.stderr


def _stopped(tmp_path: Path, status: str, rows: list[dict]) -> gc.Step:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": {"complete": False}, "rows": rows, "loader": [], "preparation": []}))
    step = gc.Step("bench", [], 10, path, {"status": status})
    gc.read_step_json(step)
    return step


def test_a_timed_out_bench_keeps_the_rows_it_finished(tmp_path: Path) -> None:
    row = {"method": "none", "status": "ok"}
    kept = _stopped(tmp_path, "timed out after 10 s", [row])
    assert kept.result["status"] == "timed out after 10 s, partial" and kept.result["data"]["rows"] == [row]
    empty = _stopped(tmp_path, "timed out after 10 s", [])
    assert empty.result["status"] == "timed out after 10 s" and "data" not in empty.result
    failed = _stopped(tmp_path, "failed (exit 1)", [row])
    assert failed.result["status"] == "failed (exit 1)" and "data" not in failed.result


def test_the_report_rows_are_the_eager_bench_rows_for_device_hours(tmp_path: Path, monkeypatch) -> None:
    """gpu_check.json's "rows" (both eager bench steps, not the compiled one) serve `reproduce.py --list --bench`."""
    from mdpl.experiments import estimate

    def fake_run(step: gc.Step, timeout_s: float | None = None) -> None:
        row = {"method": "none", "backbone": "vilt", "dataset": step.name, "precision": "bf16-mixed", "status": "ok",
               "train_samples_per_s": 10.0, "eval_samples_per_s": 20.0, "train_mfu": None, "train_peak_mib": 1.0}
        if step.name == "profile":
            row["train_top_kernels"] = [{"name": "sm90_gemm|bf16", "self_ms_per_step": 1.5, "share": 0.25,
                                         "calls_per_step": 4.0}]
        step.result.update(status="ok", wall_s=1.0, error_tail=[], data={"rows": [row]})

    monkeypatch.setattr(gc, "run_step", fake_run)
    gc.gpu_check(tmp_path, "cpu", True, None, ["bench", "bench_datasets", "profile", "bench_compile"])
    rows = estimate.bench_rows(str(tmp_path / "gpu_check.json"))
    assert [r["dataset"] for r in rows] == ["bench", "bench_datasets"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| none | vilt | bench | 10.0 | – | – | 20.0 | – | 1 | – | – | – |" in table and "nan" not in table
    assert "| none | vilt | profile | `sm90_gemm/bf16` | 1.50 | 25.0 % |" in table
