"""End to end on synthetic data (raw files -> make_arrow -> run.run -> checkpoints -> test_only), CPU, tiny ViLT.

* every dataset: MAP fit writes best + last checkpoints; `test_only` on the best checkpoint reproduces the
  training run's test metrics exactly;
* learning: a tiny ViLT is first trained on complete food101 data (prompt_method none, finetune=True), its
  backbone saved in the ViLT checkpoint layout ({'state_dict': {transformer.*, text_embeddings.*, ...}}) and
  loaded through load_path, as a pretrained ViLT is in real use; then each method (none, map, memprompt)
  trains on the frozen backbone and must reach at least twice chance accuracy on the validation split (which the
  no-prompt baseline also does, so for map and memprompt: training changed every method tensor and no frozen
  backbone tensor, and the trained checkpoint with the method's tensors reset to their initial values has a
  clearly higher test loss);
* `python run.py print_config with task_finetune_mmimdb map` works.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from runs import resolved_config, run_quiet
from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
from mdpl.data.writers import make_arrow
from mdpl.models import build_classifier

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("food101", "mmimdb", "hatememes")
LEARN_COUNTS = dict(n_train=240, n_val=60, n_test=60)   # food101 learning data (6 balanced classes)
CHANCE = 1 / 6
NO_MISSING = {"train": 0.0, "val": 0.0, "test": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """{'vocab': folder, dataset: arrow folder (48/12/12 items), 'learn': food101 arrow folder (240/60/60)}."""
    base = tmp_path_factory.mktemp("e2e")
    out = {"vocab": write_wordpiece_vocab(base / "tok" / "vocab.txt").parent}
    jobs = [(ds, ds, {}) for ds in DATASETS] + [("learn", "food101", LEARN_COUNTS)]
    for name, ds, counts in jobs:
        write_synthetic(ds, base / "raw" / name, **counts)
        make_arrow(ds, base / "raw" / name, base / "arrow" / name, progress=False)
        out[name] = base / "arrow" / name
    return out


def make_config(data: dict, dataset: str, method: str, log_dir: Path, root: str | None = None, **updates) -> dict:
    """Resolved Sacred config of `task_finetune_<dataset> <method> tiny` plus `updates` (data_root: data[root])."""
    vocab = data["vocab"]
    updates = {"data_root": str(data[root or dataset]), "tokenizer": str(vocab), "log_dir": str(log_dir),
               "vocab_size": len((vocab / "vocab.txt").read_text().split()), "val_check_interval": 1.0, **updates}
    named = [f"task_finetune_{dataset}", "baseline" if method == "none" else method, "tiny"]
    return resolved_config(named, updates)


def best_val_score(checkpoint_path: str) -> float:
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" in k)
    return float(state["best_model_score"])


@pytest.mark.parametrize("dataset", DATASETS)
def test_map_fit_then_test_only_reproduces(data, dataset, tmp_path) -> None:
    cfg = make_config(data, dataset, "map", tmp_path / "result", max_epoch=1)
    out = run_quiet(cfg)
    ckpts = sorted(p.name for p in (Path(out["run_dir"]) / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts), ckpts
    assert Path(out["best_model_path"]).name.startswith("best-")
    assert out["test"]["test/the_metric"] >= 0.0 and f"{dataset}/test/loss" in out["test"]

    again = run_quiet({**cfg, "test_only": True, "load_path": out["best_model_path"]})
    assert set(again["test"]) == set(out["test"])
    for key, value in out["test"].items():
        assert again["test"][key] == pytest.approx(value, abs=1e-6), key
    assert Path(again["run_dir"]) != Path(out["run_dir"])


@pytest.fixture(scope="module")
def pretrained_backbone(data, tmp_path_factory) -> Path:
    """Tiny ViLT trained on complete food101 data; its backbone saved in the ViLT checkpoint layout."""
    folder = tmp_path_factory.mktemp("pretrain")
    cfg = make_config(data, "food101", "none", folder / "result", root="learn", finetune=True, learning_rate=2e-3, max_epoch=8,
                      per_gpu_batchsize=16, batch_size=16, missing_ratio=NO_MISSING, drop_rate=0.0)
    out = run_quiet(cfg)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    prefix = "model.backbone."
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    path = folder / "vilt_tiny.ckpt"
    torch.save({"state_dict": backbone}, path)
    print(f"pretrained tiny ViLT: best val accuracy {best_val_score(out['best_model_path']):.3f}")
    return path


def method_tensors(state: dict) -> dict:
    """The prompt method's tensors of a classifier state dict (keys ``prompt.*``), by name."""
    return {k: v for k, v in state.items() if k.startswith("prompt.")}


@pytest.mark.parametrize("method", ["none", "map", "memprompt"])
def test_method_learns_on_frozen_pretrained_backbone(data, pretrained_backbone, method, tmp_path) -> None:
    """Above chance (the baseline is too), and for a prompt method: training moved every one of its tensors and
    left the frozen backbone alone; with its tensors put back to their initial values (trained head and pooler
    kept), the test metrics change and the test loss is higher: the trained prompts carry what was learnt."""
    cfg = make_config(data, "food101", method, tmp_path / "result", root="learn", load_path=str(pretrained_backbone),
                      learning_rate=1e-2, max_epoch=4, per_gpu_batchsize=16, batch_size=16,
                      missing_ratio=NO_MISSING)
    torch.manual_seed(cfg["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_classifier(cfg)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = run_quiet(cfg, model=model)
    val = best_val_score(out["best_model_path"])
    print(f"{method}: best val accuracy {val:.3f}, test {out['test']['test/the_metric']:.3f}")
    assert val >= 2 * CHANCE, f"{method}: val accuracy {val:.3f} < 2 x chance"

    ckpt = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)
    trained = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    assert set(trained) == set(initial)
    frozen = [k for k in initial if k.startswith(("backbone.transformer.", "backbone.text_embeddings."))]
    assert frozen and all(torch.equal(trained[k], initial[k]) for k in frozen), "the frozen backbone changed"
    assert not torch.equal(trained["food101_classifier.0.weight"], initial["food101_classifier.0.weight"])
    prompts = method_tensors(initial)
    if method == "none":
        assert not prompts
        return
    assert prompts
    unchanged = sorted(k for k in prompts if torch.equal(trained[k], initial[k]))
    assert not unchanged, f"{method}: training did not change {unchanged}"

    ckpt["state_dict"].update({f"model.{k}": v for k, v in prompts.items()})
    reset_path = tmp_path / "untrained_prompts.ckpt"
    torch.save(ckpt, reset_path)
    reset = run_quiet({**cfg, "test_only": True, "load_path": str(reset_path)})["test"]
    loss, reset_loss = out["test"]["food101/test/loss"], reset["food101/test/loss"]
    print(f"{method}: test loss {loss:.4f} trained, {reset_loss:.4f} with the initial prompts; "
          f"accuracy {out['test']['food101/test/accuracy']:.3f} / {reset['food101/test/accuracy']:.3f}")
    assert reset_loss > loss + 0.01, f"{method}: the trained prompts do not matter to the test loss"


def test_print_config_shows_method() -> None:
    proc = subprocess.run([sys.executable, "run.py", "print_config", "with", "task_finetune_mmimdb", "map"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prompt_method = 'map'" in proc.stdout or "prompt_method = \"map\"" in proc.stdout, proc.stdout[-3000:]
    assert "dataset = 'mmimdb'" in proc.stdout
