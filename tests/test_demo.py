"""The embedded demo (mdpl/demo.py) end to end at a very small size: `python run.py with demo ...`.

Checks the dispatch from Sacred, that the synthetic data is written and converted, that a pre-trained tiny
backbone file loadable as load_path is saved, and that the table / csv / plot exist with values in [0, 100].
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_demo_small(tmp_path: Path) -> None:
    cmd = [sys.executable, "run.py", "with", "demo", f"demo_dir={tmp_path / 'data'}", f"log_dir={tmp_path / 'out'}",
           "demo_samples=[36,12,18]", "demo_pretrain_epochs=1", "demo_epochs=1",
           "demo_test_ratios=[0.0,0.7]", "per_gpu_batchsize=12", "batch_size=12"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "demo" / "version_0"
    data = tmp_path / "data" / "food101_36-12-18_seed0_kw3"
    assert sorted(p.name for p in (data / "arrow").glob("*.arrow")) == [
        "food101_test.arrow", "food101_train.arrow", "food101_val.arrow"]
    # the pre-trained backbone is a plain ViLT-key state dict (what load_path accepts)
    state = torch.load(out / "tiny_vilt_pretrained.pt", weights_only=True)
    assert any(k.startswith("transformer.blocks.0.") for k in state) and "text_embeddings.word_embeddings.weight" in state
    result = json.loads((out / "results.json").read_text())
    assert result["primary"] == "accuracy"
    assert result["columns"] == ["complete", "text 70%", "image 70%", "both 70%"]
    assert set(result["table"]) == {"none", "map", "memprompt"}
    values = [v for row in result["table"].values() for v in row.values()]
    assert len(values) == 12 and all(0.0 <= v <= 1.0 for v in values)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 3 * 2   # methods x types x ratios
    assert (out / "demo_results.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "| MemPrompt |" in md and "| baseline (no prompt) |" in md
    assert "| MAP |" in proc.stdout   # the table is printed
    assert "writing a synthetic food101" in proc.stdout


@pytest.mark.parametrize("ratio,label", [(0.0, "complete"), (0.7, "text 70%"), (1.0, "text 100%")])
def test_scenario_label(ratio: float, label: str) -> None:
    from mdpl.demo import scenario_label
    assert scenario_label("text", ratio) == label


def test_pretrained_backbone_uses_both_modalities(tmp_path: Path) -> None:
    """At the demo's real settings (seed 0), the pre-trained tiny ViLT loses >= 8 accuracy points on the
    synthetic test split when every text is removed, and when every image is removed."""
    from mdpl.config.run_config import RunConfig
    from mdpl.data.registry import demo_dataset
    from mdpl.demo import QUIET, modality_accuracy, pretrain_config, prepare_data, quiet_lightning, seeded_datamodule
    from mdpl.engine.session import fit
    from runs import resolved_config

    config = resolved_config(["demo"], {"demo_dir": str(tmp_path / "data"), "log_dir": str(tmp_path / "out")})
    run = RunConfig.coerce(config).replace(dataset=demo_dataset(), backbone="vilt")
    with quiet_lightning():
        run = run.replace(**prepare_data(run))
        cfg = pretrain_config(run)
        datamodule = seeded_datamodule(cfg)
        module, trainer = fit(cfg, tmp_path / "out", datamodule, **QUIET)
        acc = modality_accuracy(cfg, module, datamodule, trainer)
    assert acc["complete"] - acc["no text"] >= 0.08, acc
    assert acc["complete"] - acc["no image"] >= 0.08, acc
