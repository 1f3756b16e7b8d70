"""Evaluation sweeps (mdpl/engine/sweep.py) and scripts/aggregate.py.

A tiny MAP model is trained for one step on synthetic Hateful Memes (AUROC + accuracy react to every
logit), then the one-pass sweep over 2 types x 2 ratios must reproduce, exactly, the metrics of one
`test_only` run per scenario. The CSV / markdown / PNG outputs must agree with each other.
"""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sacred.initialize import create_run

import run as run_script
from config import ex
from mdpl.data.missing import MissingSpec
from mdpl.data.scenarios import sweep_specs as specs_of
from mdpl.data.settings import MissingConfig
from mdpl.engine.sweep import robustness_curves
from mdpl.report import robustness_figure

REPO = Path(__file__).resolve().parents[1]
TRAINER_OVERRIDES = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
TYPES, RATIOS = ["text", "both"], [0.3, 0.8]


def sacred_config(named: tuple[str, ...], **updates) -> dict:
    """The config `run.py with <named> key=value ...` resolves to (no run is started)."""
    return dict(create_run(ex, ex.default_command, config_updates=updates, named_configs=named).config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, arrow_root, bert_vocab_dir) -> dict:
    """Config + last.ckpt of a MAP tiny model trained one step on synthetic hatememes (16 test rows)."""
    from conftest import VOCAB

    root = arrow_root("hatememes", rows=(8, 4, 16))
    log_dir = tmp_path_factory.mktemp("sweep_runs")
    base = dict(data_root=str(root), tokenizer=str(bert_vocab_dir), vocab_size=len(VOCAB), log_dir=str(log_dir),
                missing_table_root=str(log_dir / "tables"), max_epoch=1, learning_rate=5e-2, warmup_steps=0)
    config = sacred_config(("task_finetune_hatememes", "map", "tiny"), **base)
    out = run_script.run(config, **TRAINER_OVERRIDES)
    ckpt = Path(out["run_dir"]) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"base": {**base, "load_path": str(ckpt), "test_only": True}}


def test_sweep_equals_separate_runs_and_outputs_agree(trained):
    named = ("task_finetune_hatememes", "map", "tiny")
    sweep_cfg = sacred_config(named, **trained["base"], test_types="[text,both]", test_ratios=RATIOS)  # CLI string form
    swept = run_script.run(sweep_cfg, **TRAINER_OVERRIDES)["sweep"]
    rows = swept["rows"]
    assert [(r["type"], r["ratio"]) for r in rows] == [(t, r) for t in TYPES for r in RATIOS]
    metric_names = ["AUROC", "accuracy", "loss"]
    for row in rows:
        single = sacred_config(named, **trained["base"], test_type=row["type"], test_ratio=row["ratio"])
        got = run_script.run(single, **TRAINER_OVERRIDES)["test"]
        for name in metric_names:
            assert row[name] == got[f"hatememes/test/{name}"], (row["type"], row["ratio"], name)
    # the scenarios really differ (otherwise equality would prove little)
    assert len({r["loss"] for r in rows}) == len(rows)
    assert len({r["AUROC"] for r in rows}) > 1

    # results.csv: one row per scenario, ids + every metric, floats round-trip exactly
    with open(swept["csv"], newline="") as fh:
        parsed = list(csv.DictReader(fh))
    assert list(parsed[0]) == ["dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed"] + metric_names
    for p, r in zip(parsed, rows, strict=True):
        assert (p["dataset"], p["method"], p["backbone"], p["seed"]) == ("hatememes", "map", "vilt", "0")
        assert p["checkpoint"] == trained["base"]["load_path"] and p["type"] == r["type"]
        assert float(p["ratio"]) == r["ratio"] and all(float(p[m]) == r[m] for m in metric_names)

    # results.md: paper table (rows = type, columns = rate, AUROC x100) agrees with the CSV
    md = Path(swept["md"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| missing type |"))
    assert header == "| missing type | 30% | 80% |"
    for t in TYPES:
        line = next(line for line in md.splitlines() if line.startswith(f"| {t} |"))
        cells = [float(c) for c in line.strip("|").split("|")[1:]]
        expected = [round(100 * float(p["AUROC"]), 2) for p in parsed if p["type"] == t]
        assert cells == pytest.approx(expected, abs=0.005)

    # robustness PNG: a real image; the figure has one panel per missing type, labelled axes
    png = Path(swept["png"])
    assert png.name == "robustness_hatememes.png" and png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
    fig = robustness_figure(robustness_curves(rows, "AUROC"))
    assert [a.get_title() for a in fig.axes] == [f"missing {t}" for t in TYPES]
    ax = fig.axes[0]
    assert ax.get_xlabel() == "missing rate (%)" and "AUROC" in ax.get_ylabel()
    assert [line.get_label() for line in ax.get_lines()] == [f"{rows[0]['method']} ({rows[0]['backbone']})"]
    assert list(ax.get_lines()[0].get_xdata()) == [30.0, 80.0]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([100 * r["AUROC"] for r in rows[:2]])


def sweep_specs(flat: dict):
    return specs_of(MissingConfig.from_flat(flat), flat["seed"])


def test_sweep_specs_forms():
    base = {"missing_type": {"test": "both"}, "missing_ratio": {"test": 0.7}, "both_ratio": 0.5, "seed": 3,
            "test_type": None, "test_ratio": None}
    assert sweep_specs({**base, "test_types": None, "test_ratios": None}) is None
    specs = sweep_specs({**base, "test_types": "[text, image]", "test_ratios": [0.1, 0.5, 0.1]})
    assert specs == [MissingSpec(t, r, 0.5, 3) for t in ("text", "image") for r in (0.1, 0.5)]
    assert sweep_specs({**base, "test_ratios": [0.2], "test_types": None}) == [MissingSpec("both", 0.2, 0.5, 3)]
    assert sweep_specs({**base, "test_types": ["image"], "test_ratio": 0.4}) == [MissingSpec("image", 0.4, 0.5, 3)]
    with pytest.raises(ValueError, match="test_types"):
        sweep_specs({**base, "test_types": ["audio"]})
    with pytest.raises(ValueError, match="outside"):
        sweep_specs({**base, "test_ratios": [1.5]})


# ------------------------------------------------------------------------------------ aggregate.py
def aggregate_cli(*args: str) -> int:
    """scripts/aggregate.py in a subprocess: its exit status."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / "aggregate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300).returncode


def _fake_results(path: Path, method: str, seed: int, offset: float) -> Path:
    path.mkdir(parents=True)
    with open(path / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed", "AUROC", "accuracy", "loss"])
        for t in ("text", "image"):
            for r in (0.1, 0.7):
                writer.writerow(["hatememes", method, "vilt", f"{method}{seed}.ckpt", t, r, seed,
                                 repr(0.8 - r / 2 + offset), repr(0.6 + offset), repr(0.5)])
    return path / "results.csv"


def test_aggregate_mean_std_markdown_and_plot(tmp_path):
    from mdpl.experiments import aggregate as agg
    _fake_results(tmp_path / "runs" / "map_s0", "map", 0, 0.00)
    _fake_results(tmp_path / "runs" / "map_s1", "map", 1, 0.02)
    _fake_results(tmp_path / "runs" / "mem_s0", "memprompt", 0, 0.10)
    out = tmp_path / "cmp"
    assert aggregate_cli(*[str(tmp_path / "runs" / "map_*"), str(tmp_path / "runs" / "mem_s0" / "results.csv"),
                     "--out", str(out)]) == 0
    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 2                         # methods x types x ratios
    row = next(r for r in rows if (r["method"], r["type"], r["ratio"]) == ("map", "text", "0.1"))
    assert row["n"] == "2" and row["seeds"] == "0 1"
    assert float(row["AUROC_mean"]) == pytest.approx(0.76)
    assert float(row["AUROC_std"]) == pytest.approx(math.sqrt(2 * 0.01**2))   # stdev of 0.75, 0.77
    mem = next(r for r in rows if (r["method"], r["type"], r["ratio"]) == ("memprompt", "image", "0.7"))
    assert mem["n"] == "1" and float(mem["AUROC_std"]) == 0.0 and float(mem["AUROC_mean"]) == pytest.approx(0.55)
    md = (out / "comparison.md").read_text()
    assert "| map | vilt | text | 2 | 76.00 ± 1.41 | 46.00 ± 1.41 |" in md
    assert "| memprompt | vilt | image | 1 | 85.00 | 55.00 |" in md   # one seed: the value, no "± 0.00"
    png = out / "comparison_hatememes.png"
    assert png.stat().st_size > 10_000
    fig = agg.comparison_figure(agg.aggregate(agg.read_rows(agg.find_csvs([str(tmp_path / "runs")]))), "hatememes")
    assert [a.get_title() for a in fig.axes] == ["missing text", "missing image"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["map (vilt)", "memprompt (vilt)"]
    assert aggregate_cli(*[str(tmp_path / "nothing"), "--out", str(out)]) == 1


def test_sweep_equals_separate_runs_dcp(tmp_path, arrow_root):
    """The same exactness for DCP on the (tiny, random-init) CLIP backbone: 2 types x 1 ratio (kept short)."""
    root = arrow_root("food101", rows=(8, 4, 12))
    base = dict(data_root=str(root), log_dir=str(tmp_path), missing_table_root=str(tmp_path / "tables"),
                max_epoch=1, learning_rate=5e-2, warmup_steps=0)
    named = ("task_finetune_food101", "dcp", "tiny")
    out = run_script.run(sacred_config(named, **base), **TRAINER_OVERRIDES)
    base.update(load_path=str(Path(out["run_dir"]) / "checkpoints" / "last.ckpt"), test_only=True)
    rows = run_script.run(sacred_config(named, **base, test_types=["image", "both"], test_ratios=[0.9]),
                          **TRAINER_OVERRIDES)["sweep"]["rows"]
    assert [(r["method"], r["backbone"], r["type"]) for r in rows] == [("dcp", "clip", "image"), ("dcp", "clip", "both")]
    assert rows[0]["loss"] != rows[1]["loss"]
    for row in rows:
        got = run_script.run(sacred_config(named, **base, test_type=row["type"], test_ratio=row["ratio"]),
                             **TRAINER_OVERRIDES)["test"]
        assert (row["accuracy"], row["loss"]) == (got["food101/test/accuracy"], got["food101/test/loss"])


def test_write_csv_format_is_the_csv_modules(tmp_path):
    """results.csv / comparison.csv: header = union of keys (first-seen order), floats as repr (exact round trip),
    NaN as 'nan', CRLF lines and minimal quoting -- byte for byte what csv.DictWriter writes."""
    import io

    import pandas as pd

    from mdpl.report import write_csv

    rows = [{"dataset": "food101", "method": "map", "checkpoint": 'a,b"c.ckpt', "type": "text", "ratio": 0.3,
             "seed": 0, "accuracy": 0.1 + 0.2, "loss": math.nan},
            {"dataset": "food101", "method": "map", "checkpoint": "", "type": "both", "ratio": 1.0,
             "seed": 0, "accuracy": 1e-17, "loss": 12345678.901234567}]
    expected = io.StringIO(newline="")
    writer = csv.DictWriter(expected, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_csv(rows, tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_bytes() == expected.getvalue().encode()
    assert b'"a,b""c.ckpt"' in expected.getvalue().encode() and b"0.30000000000000004" in expected.getvalue().encode()
    write_csv(pd.DataFrame(rows), tmp_path / "frame.csv")
    assert (tmp_path / "frame.csv").read_bytes() == expected.getvalue().encode()
    with open(tmp_path / "rows.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert float(back[0]["accuracy"]) == 0.1 + 0.2 and float(back[1]["loss"]) == 12345678.901234567


def test_aggregate_skips_missing_values_and_orders_types(tmp_path):
    from mdpl.experiments import aggregate as agg
    header = ["dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed", "accuracy", "loss"]
    for seed, cells in ((0, ["0.5", "1.0", "0.25", ""]), (1, ["0.75", "nan", "0.5", "2.0"]), (2, ["1.0", "", "", "3.0"])):
        (tmp_path / f"s{seed}").mkdir()
        with open(tmp_path / f"s{seed}" / "results.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerow(["food101", "none", "vilt", "", "both", 0.5, seed, cells[0], cells[1]])
            writer.writerow(["food101", "none", "vilt", "", "text", 0.5, seed, cells[2], cells[3]])
    frame = agg.aggregate(agg.read_rows(agg.find_csvs([str(tmp_path)])))
    assert list(frame["type"]) == ["text", "both"]                   # TYPE_ORDER, not alphabetical
    text, both = frame.iloc[0], frame.iloc[1]
    assert (text["n"], text["seeds"], both["seeds"]) == (3, "0 1 2", "0 1 2")
    assert both["accuracy_mean"] == 0.75 and both["accuracy_std"] == 0.25      # stdev(0.5, 0.75, 1.0)
    assert both["loss_mean"] == 1.0 and both["loss_std"] == 0.0               # one value: std 0, NaN/empty skipped
    assert text["accuracy_mean"] == 0.375 and text["loss_mean"] == 2.5
    assert math.isclose(text["accuracy_std"], math.sqrt(2) * 0.125, rel_tol=1e-15)
    md = agg.markdown(frame)
    assert md.splitlines()[2:5] == ["| method | backbone | missing type | n | 50% |", "|---|---|---|---:|---:|",
                                    "| none | vilt | text | 3 | 37.50 ± 17.68 |"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.csv").write_text("dataset,method\nfood101,none\n")
    with pytest.raises(ValueError, match="not an mdpl results.csv"):
        agg.read_rows([tmp_path / "bad" / "results.csv"])
