"""Every file a run reads back, damaged: one ``error:`` line and exit status 2 (no traceback, nothing written), or a
rebuild (arrow files: tests/test_bad_data.py); and the side files a run writes are written whole or not at all.

One tiny ViLT MAP run on synthetic Food-101 (CPU, one epoch) makes the files; each test damages a copy of one of
them and runs ``run.py`` (or ``scripts/reproduce.py``) in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runs import synthetic_arrows

ROOT = Path(__file__).resolve().parent.parent
RUN = "finetune_food101_seed0_from_scratch/version_0"


def _cli(data: dict, log_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", f"data_root={data['arrow']}",
           f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={log_dir}",
           "per_gpu_batchsize=4", "batch_size=4", "max_epoch=1", *extra]
    base = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG" and not k.startswith("SLURM_")}
    return subprocess.run(cmd, cwd=ROOT, env={**base, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def _one_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run ended with exactly one ``error:`` line holding every fragment, exit status 2, no traceback."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert all(f in errors[0] for f in fragments), errors[0]
    return errors[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Synthetic data, a finished run (with its pixel cache and missing tables) and its files."""
    root = tmp_path_factory.mktemp("damaged")
    data = synthetic_arrows(root, "food101", 8, 4, 4)
    out = _cli(data, root / "runs", f"pixel_cache={root / 'pixels'}")
    assert out.returncode == 0, out.stderr[-3000:]
    return {**data, "root": root, "run_dir": root / "runs" / RUN}


@pytest.fixture
def copy(trained, tmp_path) -> dict:
    """A private copy of the data, vocabulary, pixel cache and run directory, to damage."""
    for name in ("arrow", "tok", "pixels", "runs"):
        shutil.copytree(trained["root"] / name, tmp_path / name)
    return {**trained, "arrow": tmp_path / "arrow", "tok": tmp_path / "tok", "pixels": tmp_path / "pixels",
            "runs": tmp_path / "runs", "run_dir": tmp_path / "runs" / RUN}


def test_test_only_with_a_checkpoint_of_another_max_text_len_is_one_line(copy, tmp_path) -> None:
    ckpt = copy["run_dir"] / "checkpoints" / "last.ckpt"
    out = _cli(copy, tmp_path / "eval", "test_only=True", f"load_path={ckpt}", "max_text_len=20")
    _one_error(out, "other shapes", "position_embeddings", "(24, 64) vs model (20, 64)", "max_text_len=24")
    assert not (tmp_path / "eval").exists()


def test_resume_from_a_truncated_last_ckpt_is_one_line_and_loses_nothing(copy) -> None:
    last = copy["run_dir"] / "checkpoints" / "last.ckpt"
    _cut(last)
    before = _tree(copy["runs"])
    out = _cli(copy, copy["runs"], "resume=True", "max_epoch=2")
    _one_error(out, f"cannot resume from {last}", "damaged or cut short", "best-*.ckpt")
    assert _tree(copy["runs"]) == before


@pytest.mark.parametrize("damage", ["vocab_binary", "pixel_cache_cut", "missing_table_cut", "load_path_cut"])
def test_damaged_input_file_is_one_line(copy, tmp_path, damage) -> None:
    extra: list[str] = [f"pixel_cache={copy['pixels']}"]
    if damage == "vocab_binary":
        (copy["tok"] / "vocab.txt").write_bytes(bytes(range(128, 256)) * 4)
        fragments = ("vocab.txt is not UTF-8", "tokenizer=")
    elif damage == "pixel_cache_cut":
        _cut(next(copy["pixels"].glob("food101_train.*.pixels")), 0.9)
        fragments = ("pixel cache", "cut short or damaged")
    elif damage == "missing_table_cut":
        _cut(next((copy["arrow"] / "missing_tables").glob("food101_train_*.pt")))
        fragments = ("missing table", "cannot be read", "delete the file to regenerate")
    else:
        ckpt = tmp_path / "copied.ckpt"
        ckpt.write_bytes((copy["run_dir"] / "checkpoints" / "last.ckpt").read_bytes()[:30000])
        extra += ["test_only=True", f"load_path={ckpt}"]
        fragments = ("copied.ckpt", "damaged or truncated")
    out = _cli(copy, tmp_path / "new_runs", *extra)
    _one_error(out, *fragments)
    assert not (tmp_path / "new_runs").exists()


def test_damaged_slurm_job_record_names_no_job(tmp_path) -> None:
    """A requeued job whose record in a run directory is unreadable does not claim that directory (a new one)."""
    from mdpl.engine.resume import record_slurm_job, slurm_run_dir

    for n in (0, 1):
        (tmp_path / f"version_{n}").mkdir()
    record_slurm_job(tmp_path / "version_0", "77")
    assert slurm_run_dir(tmp_path, "77") == tmp_path / "version_0"
    (tmp_path / "version_0" / "slurm_job_id").write_bytes(b"\xff\xfe7\x007")
    assert slurm_run_dir(tmp_path, "77") is None


def test_atomic_write_keeps_the_previous_file_when_the_write_fails(tmp_path) -> None:
    from mdpl.atomic import write_text_atomic

    path = write_text_atomic(tmp_path / "test_metrics.json", '{"metrics": {"a": 1}}')
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, '{"metrics": {"a": 0.5}} \u00e9', encoding="ascii")   # fails half way
    assert path.read_text() == '{"metrics": {"a": 1}}' and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_reproduce_retests_a_run_whose_test_metrics_are_damaged(tmp_path, monkeypatch) -> None:
    """A damaged test_metrics.json is no finished run's record: the cell resumes from last.ckpt (which re-tests and
    rewrites it), never evaluates last.ckpt as if it were the best checkpoint."""
    import mdpl.experiments.results as rp
    run_dir = tmp_path / "finetune_x" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("best-epoch00-step2.ckpt", "last.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(b"x")
    best = run_dir / "checkpoints" / "best-epoch00-step2.ckpt"
    monkeypatch.setattr(rp, "seed_dir", lambda cell, ctx, seed: tmp_path)
    (run_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": str(best), "metrics": {}}))
    assert rp.training_state(None, None, 0) == ("trained", str(best))
    (run_dir / "test_metrics.json").write_text('{"checkpoint": "' + str(best)[:10])
    assert rp.training_state(None, None, 0) == ("resume", str(run_dir))


@pytest.mark.parametrize("damage", ["bench_json", "arrow"])
def test_reproduce_with_a_damaged_input_is_one_line(trained, tmp_path, damage) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": []}))
    data_root = tmp_path / "data"
    (data_root / "food101").mkdir(parents=True)
    for split in ("train", "val", "test"):
        shutil.copy(trained["arrow"] / f"food101_{split}.arrow", data_root / "food101")
    if damage == "bench_json":
        bench.write_text('{"rows": [')
        fragment = "not a readable scripts/bench.py --json file"
    else:
        _cut(data_root / "food101" / "food101_test.arrow")
        fragment = "food101_test.arrow cannot be read as an Arrow file"
    out = subprocess.run([sys.executable, "scripts/reproduce.py", "all", "--list", "--bench", str(bench),
                          "--data-root", str(data_root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if "error: " in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith("reproduce.py: error: ") and fragment in errors[0], errors[0]
