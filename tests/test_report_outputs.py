"""The writers of mdpl.report keep every output as it was: the sweep's results.md / results.csv, the demo's
results.md / .csv / .json, the aggregation's comparison.md / .csv / method_backbone.md and the reproduction
reports (<table>.md / .csv) equal, byte for byte, the files in tests/fixtures/report, written for the same
inputs by the writers each output had before they shared mdpl.report."""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest

from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import dataset_spec

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "report"
PAPER_CSV = Path(__file__).resolve().parents[1] / "scripts" / "paper_results.csv"


def sweep_rows() -> list[dict]:
    rows = [{"dataset": "food101", "method": "map", "backbone": "vilt", "checkpoint": "a.ckpt", "type": t, "ratio": r,
             "seed": 3, "accuracy": 0.5 + 0.1 * r - 0.01 * k, "loss": 1.25 + r}
            for k, t in enumerate(("text", "image", "both")) for r in (0.0, 0.3, 0.7)]
    rows[4]["accuracy"] = math.nan
    return rows


def test_sweep_outputs(tmp_path):
    from mdpl.engine.sweep import markdown_table
    from mdpl.report import write_csv

    assert markdown_table(sweep_rows(), "accuracy") == (GOLDEN / "sweep_results.md").read_text()
    write_csv(sweep_rows(), tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_bytes() == (GOLDEN / "sweep_results.csv").read_bytes()


def test_demo_outputs(tmp_path):
    from mdpl.demo import write_report

    rows = [{**r, "method": m} for m in ("none", "map", "memprompt") for r in sweep_rows()]
    rows = [{**r, "accuracy": r["accuracy"] + 0.03 * i} for i, r in enumerate(rows)]
    out = write_report(rows, "accuracy", tmp_path, 12.0)
    for name in ("results.md", "results.csv", "results.json"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / "demo" / name).read_bytes(), name
    assert Path(out["png"]).stat().st_size > 10_000


def test_aggregate_outputs(tmp_path):
    from mdpl.experiments import aggregate as agg

    runs = tmp_path / "runs"
    for i, (m, b) in enumerate((m, b) for m in ("none", "map", "dcp") for b in ("vilt", "clip")):
        for seed in (0, 1):
            folder = runs / f"{m}_{b}_{seed}"
            folder.mkdir(parents=True)
            with open(folder / "results.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed", "AUROC",
                                 "accuracy", "loss"])
                for t in ("both", "text", "image"):
                    for r in (0.3, 0.7):
                        writer.writerow(["hatememes", m, b, "x.ckpt", t, r, seed,
                                         repr(0.6 + 0.01 * i + 0.02 * seed - r / 10), repr(0.5 + 0.001 * i), "0.5"])
                if m == "map":
                    writer.writerow(["food101", m, b, "x.ckpt", "text", 0.5, seed, "", repr(0.4 + 0.1 * seed), "0.7"])
    frame = agg.aggregate(agg.read_rows(agg.find_csvs([str(runs)])))
    assert agg.markdown(frame) == (GOLDEN / "aggregate_comparison.md").read_text()
    assert agg.method_backbone_markdown(frame) == (GOLDEN / "aggregate_method_backbone.md").read_text()
    paths = agg.write_outputs(frame, tmp_path / "out")
    assert Path(paths["csv"]).read_bytes() == (GOLDEN / "aggregate_comparison.csv").read_bytes()
    assert Path(paths["md"]).read_text() == (GOLDEN / "aggregate_comparison.md").read_text()


def _fake_runs(table, ctx) -> None:
    """One or two seeds of made-up results for every runnable cell (a value fixed by the cell's id)."""
    from mdpl.experiments.matrix import FIG_RATIOS, seed_dir

    for cell in table.runnable:
        h = int(hashlib.sha1(cell.id.encode()).hexdigest()[:6], 16) / 0xFFFFFF
        for seed in (0, 1)[: 1 + (h > 0.3)]:
            run = seed_dir(cell, ctx, seed) / "x_seed0_from_scratch" / "version_0"
            if run.exists():
                continue
            (run / "csv").mkdir(parents=True)
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / "best.ckpt").write_text("x")
            (run / "test_metrics.json").write_text(json.dumps({"checkpoint": str(run / "checkpoints/best.ckpt")}))
            metric = dataset_spec(cell.dataset).primary_metric
            lines = [f"dataset,method,backbone,checkpoint,type,ratio,seed,{metric},loss"]
            lines += [f"{cell.dataset},{cell.method},{cell.net},c,{t},{r},{seed},{0.3 + 0.5 * h - 0.1 * r + 0.01 * seed},1.0"
                      for t in MISSING_TYPES for r in FIG_RATIOS]
            (run / "results.csv").write_text("\n".join(lines) + "\n")
            (run / "csv" / "metrics.csv").write_text(f"epoch,val/the_metric,step\n0,{0.4 + 0.3 * h + 0.01 * seed},1\n")


@pytest.mark.parametrize("name", ["dcp_length", "map_fig", "dcp_table7", "dcp_fig5", "memprompt_mem_size"])
def test_reproduce_reports(tmp_path, name):
    from mdpl.experiments.matrix import Context, tables
    from mdpl.experiments.summary import collect, load_paper, markdown, write_report

    ctx = Context(out=tmp_path, seeds=(0, 1, 2))
    table = tables()[name]
    _fake_runs(table, ctx)
    paper = load_paper(PAPER_CSV)
    rows = collect(table, ctx, paper)
    note = "a note" if name == "map_fig" else ""
    assert markdown(table, rows, ctx, note) == (GOLDEN / f"reproduce_{name}.md").read_text()
    paths = write_report(table, ctx, paper)
    assert paths["csv"].read_bytes() == (GOLDEN / f"reproduce_{name}.csv").read_bytes()
    assert paths["md"].read_bytes() == (GOLDEN / f"reproduce_{name}.report.md").read_bytes()
    assert paths["png"].stat().st_size > 5_000


def test_reproduce_report_without_results(tmp_path):
    from mdpl.experiments.matrix import Context, tables
    from mdpl.experiments.summary import collect, load_paper, markdown

    ctx = Context(out=tmp_path, seeds=(0, 1, 2), tiny=True)
    table = tables()["dcp_fig3"]
    assert markdown(table, collect(table, ctx, load_paper(PAPER_CSV)), ctx, "") == \
        (GOLDEN / "reproduce_dcp_fig3_tiny.md").read_text()
