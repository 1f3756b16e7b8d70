"""Cross pairings end to end: each method on the backbone its paper did not use, through run.py.

Cells: MAP, MemPrompt and 'none' on CLIP (`<method> on_clip tiny`; trainable: the method + ln_post/ln_final/proj +
head) on synthetic Hateful Memes, over a tiny CLIP pre-trained on complete data and loaded through clip_path (OpenAI
layout); DCP on ViLT (`dcp on_vilt tiny`) on synthetic Food-101 over a tiny ViLT pre-trained likewise and loaded through
load_path (the pattern of test_end_to_end.py). Frozen *random* towers carry too little signal for a reliable bar. Each cell:
synthetic raw -> make_arrow -> run.run (fit, test on the best checkpoint) must learn well above chance (AUROC >= 0.75,
or accuracy >= 2 x chance), then `test_only` on the best checkpoint reproduces the test metrics (<= 1e-6).
The checkpoint check of test_only compares the clip_* sizes on CLIP and hidden_size/num_layers on ViLT (MODEL_KEYS).
"""
from __future__ import annotations

from runs import as_run

import warnings
from pathlib import Path

import pytest
import torch

import run as run_script
from runs import resolved_config, run_quiet
from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
from mdpl.data.writers import make_arrow

PRESET = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp"}
SWITCH = {"clip": "on_clip", "vilt": "on_vilt"}
MISSING = {"train": 0.3, "val": 0.3, "test": 0.3}
FOOD_CHANCE = 1 / 6        # the synthetic Food-101 has 6 balanced classes
# (method, backbone, dataset, epochs)
CELLS = [("map", "clip", "hatememes", 4), ("memprompt", "clip", "hatememes", 4), ("none", "clip", "hatememes", 4),
         ("dcp", "vilt", "food101", 5)]


def resolve(*named: str, **updates) -> dict:
    """Resolved Sacred config of the named configs (left to right) plus `updates`."""
    return resolved_config(named, updates)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """{'vocab': BERT vocab folder, 'hatememes': arrow folder (192/48/48), 'food101': arrow folder (240/60/60)}."""
    base = tmp_path_factory.mktemp("cross_e2e")
    out = {"vocab": write_wordpiece_vocab(base / "tok" / "vocab.txt").parent, "base": base}
    for dataset, counts in (("hatememes", (192, 48, 48)), ("food101", (240, 60, 60))):
        write_synthetic(dataset, base / "raw" / dataset, *counts)
        make_arrow(dataset, base / "raw" / dataset, base / "arrow" / dataset, progress=False)
        out[dataset] = base / "arrow" / dataset
    return out


def cell_config(data: dict, method: str, backbone: str, dataset: str, log_dir: Path, **updates) -> dict:
    """`task_finetune_<dataset> <preset> on_<backbone> tiny` plus the synthetic data and `updates`."""
    vocab = data["vocab"]
    updates = {"data_root": str(data[dataset]), "tokenizer": str(vocab), "log_dir": str(log_dir),
               "vocab_size": len((vocab / "vocab.txt").read_text().split()), "val_check_interval": 1.0,
               "per_gpu_batchsize": 16, "batch_size": 16, **updates}
    return resolve(f"task_finetune_{dataset}", PRESET[method], SWITCH[backbone], "tiny", **updates)


@pytest.fixture(scope="module")
def pretrained_vilt(data) -> Path:
    """Tiny ViLT trained on complete Food-101 (everything trainable); its backbone in the ViLT checkpoint layout."""
    folder = data["base"] / "pretrain"
    cfg = cell_config(data, "none", "vilt", "food101", folder / "result", finetune=True, learning_rate=4e-3,
                      max_epoch=8, drop_rate=0.0, missing_ratio={"train": 0.0, "val": 0.0, "test": 0.0})
    out = run_quiet(cfg)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    prefix = "model.backbone."
    path = folder / "vilt_tiny.ckpt"
    torch.save({"state_dict": {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}}, path)
    return path


@pytest.fixture(scope="module")
def pretrained_clip(data) -> Path:
    """Tiny CLIP trained on complete Hateful Memes (everything trainable); its towers as an OpenAI-layout state dict."""
    from mdpl.backbones.clip import build_clip_backbone
    folder = data["base"] / "pretrain_clip"
    cfg = cell_config(data, "none", "clip", "hatememes", folder / "result", finetune=True, learning_rate=3e-3,
                      max_epoch=4, missing_ratio={"train": 0.0, "val": 0.0, "test": 0.0})
    out = run_quiet(cfg)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    prefix = "model.backbone."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_clip_backbone(as_run({**cfg, "clip_path": ""}, "clip"))
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    path = folder / "clip_tiny.pt"
    torch.save(backbone.openai_state_dict(), path)
    return path


def test_backbone_switches_compose_with_presets_and_tiny() -> None:
    from mdpl.models import build_classifier
    full = resolve("task_finetune_food101", "map", "on_clip")
    assert (full["backbone"], full["prompt_method"], full["image_size"], full.get("clip_image_size")) == ("clip", "map", 224, None)
    full = resolve("task_finetune_food101", "dcp", "on_vilt")
    assert (full["backbone"], full["prompt_method"], full["image_size"], full["prompt_length"]) == ("vilt", "dcp", 384, 36)
    tiny = resolve("task_finetune_food101", "memprompt", "on_clip", "tiny")
    assert (tiny["backbone"], tiny["image_size"], tiny.get("clip_image_size")) == ("clip", 64, None)
    tiny = resolve("task_finetune_food101", "dcp", "on_vilt", "tiny")
    assert (tiny["backbone"], tiny["image_size"], tiny["prompt_length"] % 3) == ("vilt", 64, 0)
    # on_clip sets only the backbone (the transform size follows from it), so its place does not matter
    assert resolve("task_finetune_food101", "map", "tiny", "on_clip") == resolve("task_finetune_food101", "map",
                                                                                 "on_clip", "tiny")
    assert build_classifier(resolve("task_finetune_food101", "map", "tiny", "on_clip")).head.in_features == 64


@pytest.mark.parametrize("method,backbone,dataset,epochs", CELLS, ids=[f"{m}-{b}" for m, b, _, _ in CELLS])
def test_cross_pairing_learns_and_test_only_reproduces(data, request, method, backbone, dataset, epochs,
                                                       tmp_path) -> None:
    updates = dict(learning_rate=2e-2, max_epoch=epochs, missing_ratio=MISSING)
    if backbone == "vilt":
        updates.update(load_path=str(request.getfixturevalue("pretrained_vilt")))
    else:
        updates.update(clip_path=str(request.getfixturevalue("pretrained_clip")))
    cfg = cell_config(data, method, backbone, dataset, tmp_path / "result", **updates)
    assert (cfg["backbone"], cfg["prompt_method"]) == (backbone, method)
    out = run_quiet(cfg)
    metrics = out["test"]
    print(f"{method} on {backbone} ({dataset}): " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    if dataset == "hatememes":
        assert metrics["hatememes/test/AUROC"] >= 0.75, metrics
    else:
        assert metrics["food101/test/accuracy"] >= 2 * FOOD_CHANCE, metrics
    assert Path(out["best_model_path"]).name.startswith("best-")

    again = run_quiet({**cfg, "test_only": True, "load_path": out["best_model_path"]})
    assert set(again["test"]) == set(metrics)
    for key, value in metrics.items():
        assert again["test"][key] == pytest.approx(value, abs=1e-6), key
    # the checkpoint check compares the backbone's own size keys (MODEL_KEYS): a different depth is refused
    depth_key = "clip_text_layers" if backbone == "clip" else "num_layers"
    with pytest.raises(ValueError, match=depth_key):
        run_script.build_test_module({**cfg, "test_only": True, "load_path": out["best_model_path"], depth_key: 3})


def test_aggregate_method_backbone_table(tmp_path) -> None:
    """scripts/aggregate.py --method-backbone: rows = method, columns = backbone, one table per scenario."""
    import csv
    import subprocess
    import sys
    for i, (method, backbone) in enumerate((m, b) for m in PRESET for b in SWITCH):
        for seed in (0, 1):
            folder = tmp_path / "runs" / f"{method}_{backbone}_s{seed}"
            folder.mkdir(parents=True)
            with open(folder / "results.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed", "AUROC", "loss"])
                for ratio in (0.3, 0.7):
                    writer.writerow(["hatememes", method, backbone, "x.ckpt", "both", ratio, seed,
                                     repr(0.6 + 0.01 * i + 0.02 * seed - ratio / 10), "0.5"])
    out = tmp_path / "cmp"
    script = Path(__file__).resolve().parents[1] / "scripts" / "aggregate.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "--out", str(out), "--method-backbone"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    table = (out / "method_backbone.md").read_text()
    assert table.count("| method | clip | vilt |") == 2          # one table per scenario (both 30 %, both 70 %)
    assert "## hatememes: AUROC (×100, mean ± std over seeds), missing both 30%" in table
    # map: i = 2 (clip), 3 (vilt); 30 %: 0.6 + 0.01 i + {0, 0.02} - 0.03 -> mean 0.58 + 0.01 i, std 0.0141
    assert "| map | 60.00 ± 1.41 | 61.00 ± 1.41 |" in table.split("missing both 70%")[0]
    assert "| none | 58.00 ± 1.41 | 59.00 ± 1.41 |" in table.split("missing both 70%")[0]
