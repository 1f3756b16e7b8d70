"""Bad input gives one clear error and writes nothing partial.

Wrong data_root, a checkpoint of another method / backbone, a tokenizer whose vocabulary does not match
vocab_size, a non-finite training loss (stops with the step number; the previous last.ckpt stays intact and
loadable) and the run directory of a previous run (never overwritten: the next run goes to version_1).
CPU, tiny ViLT, synthetic Food-101 (32 / 8 / 9 items).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import resolved_config, run_quiet, synthetic_arrows, typed

ROOT = Path(__file__).resolve().parent.parent
BASE = "finetune_food101_seed0_from_scratch"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("bad_input_data"), "food101", 32, 8, 9)


def make_config(data: dict, log_dir: Path, method: str = "map", **updates) -> dict:
    updates = {"data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
               "log_dir": str(log_dir), "per_gpu_batchsize": 4, "batch_size": 4, "max_epoch": 1,
               "deterministic": True, **updates}
    return resolved_config(["task_finetune_food101", method, "tiny"], updates)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """A finished 1-epoch MAP run: {'config', 'log_dir', 'run_dir', 'last'}."""
    log_dir = tmp_path_factory.mktemp("trained") / "result"
    cfg = make_config(data, log_dir)
    out = run_quiet(cfg)
    run_dir = Path(out["run_dir"])
    return {"config": cfg, "log_dir": log_dir, "run_dir": run_dir, "last": run_dir / "checkpoints" / "last.ckpt"}


# ------------------------------------------------------------------------------------------ data_root
def test_wrong_data_root_lists_expected_files_and_command(data, tmp_path) -> None:
    log_dir = tmp_path / "result"
    with pytest.raises(ValueError) as err:
        run_quiet(make_config(data, log_dir, data_root=str(tmp_path / "no_such_folder")))
    msg = str(err.value)
    assert "\n" not in msg and "no_such_folder" in msg
    for name in ("food101_train.arrow", "food101_val.arrow", "food101_test.arrow", "python make_arrow.py --dataset food101"):
        assert name in msg, msg
    # a folder with only some of the files names the missing one
    partial = tmp_path / "partial"
    partial.mkdir()
    for stem in ("food101_train", "food101_val"):
        (partial / f"{stem}.arrow").write_bytes((data["arrow"] / f"{stem}.arrow").read_bytes())
    with pytest.raises(ValueError, match=r"lacks food101_test\.arrow.*make_arrow\.py --dataset food101"):
        run_quiet(make_config(data, log_dir, data_root=str(partial)))
    assert not log_dir.exists() and not (partial / "missing_tables").exists()


def test_wrong_data_root_cli_is_one_line_without_traceback(data, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}  # one-line errors, no traceback
    cmd = [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", f"data_root={tmp_path / 'nope'}",
           f"tokenizer={data['tok']}", f"vocab_size={data['vocab_size']}", f"log_dir={tmp_path / 'result'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "food101_test.arrow" in lines[0] and "make_arrow.py" in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "result").exists()


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_method_names_the_mismatch(data, trained, tmp_path) -> None:
    log_dir = tmp_path / "result"
    cfg = make_config(data, log_dir, method="memprompt", test_only=True, load_path=str(trained["last"]))
    with pytest.raises(ValueError, match=r"prompt_method: checkpoint='map' vs config='memprompt'") as err:
        run_quiet(cfg)
    assert str(trained["last"]) in str(err.value)
    assert not log_dir.exists()


def test_resume_from_checkpoint_of_another_backbone_names_the_mismatch(data, trained, tmp_path) -> None:
    log_dir = tmp_path / "result"
    cfg = make_config(data, log_dir, backbone="clip", resume_from=str(trained["last"]))
    with pytest.raises(ValueError, match=r"cannot resume from .*backbone: checkpoint='vilt' vs config='clip'"):
        run_quiet(cfg)
    assert not log_dir.exists()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocabulary_must_match_vocab_size(data, tmp_path) -> None:
    log_dir = tmp_path / "result"
    with pytest.raises(ValueError) as err:
        run_quiet(make_config(data, log_dir, vocab_size=30522))
    msg = str(err.value)
    assert f"has {data['vocab_size']} tokens" in msg and "vocab_size=30522" in msg and str(data["tok"]) in msg, msg
    assert not log_dir.exists()


# ---------------------------------------------------------------------------------------------- NaN loss
def test_nonfinite_loss_stops_with_step_and_keeps_last_checkpoint(data, tmp_path) -> None:
    from mdpl.engine.module import MDPLModule, load_for_test
    from mdpl.models import build_classifier

    bad_step, every = 5, 2   # 8 optimizer steps per epoch; last.ckpt at steps 2 and 4, NaN loss at step 5
    cfg = make_config(data, tmp_path / "result", checkpoint_every_n_steps=every, max_epoch=2)
    model = build_classifier(cfg)
    forward, calls = model.forward, {"train": 0}

    def poisoned(batch: dict) -> dict:   # same module (state-dict keys unchanged), NaN logits from step `bad_step`
        out = forward(batch)
        if model.training:
            calls["train"] += 1
            if calls["train"] > bad_step:
                out = {**out, "logits": out["logits"] * float("nan")}
        return out

    model.forward = poisoned
    with pytest.raises(FloatingPointError, match=rf"non-finite training loss nan at global step {bad_step}\b"):
        run_quiet(cfg, model=model)

    run_dir = tmp_path / "result" / BASE / "version_0"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"], ckpts                       # no best (no validation ran), no partial files
    assert not (run_dir / "test_metrics.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    load_for_test(MDPLModule(cfg), ckpt)                        # loads strictly into a fresh module


# ------------------------------------------------------------------------------------- previous runs
def test_existing_run_directory_is_never_overwritten(trained) -> None:
    first = trained["run_dir"]
    assert first.name == "version_0" and (first / "test_metrics.json").is_file() and trained["last"].is_file()
    before = tree_digest(first)
    out = run_quiet(trained["config"])
    second = Path(out["run_dir"])
    assert second == first.parent / "version_1" and (second / "checkpoints" / "last.ckpt").is_file()
    assert tree_digest(first) == before                        # byte-identical


# ------------------------------------------------------------------------------- failure before training
def test_failure_before_the_first_step_leaves_no_run_directory(data, tmp_path) -> None:
    from mdpl.data.datamodule import MDPLDataModule
    from mdpl.errors import UserInputError

    cfg = make_config(data, tmp_path / "result")

    class FailingSetup(MDPLDataModule):   # an error found once the trainer has started (after the run dir exists)
        def setup(self, stage=None) -> None:
            raise UserInputError("bad split")

    with pytest.raises(UserInputError, match="bad split"):
        run = typed(cfg)
        run_quiet(cfg, datamodule=FailingSetup(run.data, run.missing, run.pipeline, run.experiment.seed))
    assert not (tmp_path / "result" / BASE).exists()
