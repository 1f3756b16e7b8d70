"""The reports of the experiment matrix: per table, one row per (cell, test scenario) with ours (mean ± std over
the seeds), the paper's number and the difference, written as ``<table>.md``, ``<table>.csv`` and ``<table>.png``
through :mod:`mdpl.report`."""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import available_datasets, dataset_spec
from mdpl.experiments.matrix import Context, Table, fmt
from mdpl.experiments.results import find_result
from mdpl.report import Curve, markdown_table, robustness_figure, save_figure, write_csv


def load_paper(path: Path) -> dict[str, dict]:
    """The papers' numbers (``scripts/paper_results.csv``): id -> row."""
    with open(path, newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def collect(table: Table, ctx: Context, paper: dict[str, dict]) -> list[dict]:
    """One row per (cell, test scenario): ours (x100, mean ± std over the seeds found), paper, difference."""
    rows = []
    for index, cell in enumerate(table.cells, 1):
        results = {} if cell.needs else {s: find_result(cell, ctx, s) for s in ctx.seeds}
        done = sorted(s for s, r in results.items() if r is not None)
        ref = paper.get(cell.paper) if cell.paper else None
        if cell.paper and ref is None:
            raise KeyError(f"{table.name} {cell.id}: paper id {cell.paper!r} not in paper_results.csv")
        vals = [100 * results[s].val_best for s in done if results[s].val_best is not None]
        val_mean, val_std = _mean_std(vals)
        status = (f"not yet expressible: needs {cell.needs}" if cell.needs else
                  "done" if len(done) == len(ctx.seeds) else f"{len(done)}/{len(ctx.seeds)} seeds" if done else "pending")
        for t, r in cell.scenarios:
            ours = [100 * results[s].scenarios[(t, round(r, 6))] for s in done]
            mean, std = _mean_std(ours)
            paper_value = float(ref["value"]) if ref else None
            split = (ref.get("split") or "not stated") if ref else ""
            basis = val_mean if split == "val" else mean
            diff = basis - paper_value if basis is not None and paper_value is not None else None
            rows.append({
                "table": table.name, "index": index, "cell": cell.id, "label": cell.label, "dataset": cell.dataset,
                "metric": dataset_spec(cell.dataset).metric_label, "method": cell.method, "backbone": cell.net,
                "keys": " ".join(f"{k}={fmt(v)}" for k, v in cell.keys), "x": "" if cell.x is None else cell.x,
                "train_type": cell.train[0], "train_ratio": cell.train[1], "test_type": t, "test_ratio": r,
                "seeds": " ".join(map(str, done)), "n": len(done),
                "ours_mean": _num(mean), "ours_std": _num(std) if done else "",
                "ours_val_best_mean": _num(val_mean) if (t, r) == cell.scenarios[0] else "",
                "ours_val_best_std": _num(val_std) if (t, r) == cell.scenarios[0] else "",
                "paper": ref["value"] if ref else "", "paper_split": split, "paper_id": cell.paper,
                "diff": _num(diff), "diff_basis": ("val (best)" if split == "val" else "test") if ref else "",
                "status": status, "note": cell.note,
            })
    return rows


def _md_cell_train(row: dict) -> str:
    return "complete" if row["train_ratio"] == 0 else f"{row['train_type']} {100 * row['train_ratio']:g}%"


def markdown(table: Table, rows: list[dict], ctx: Context, plot_note: str) -> str:
    lines = [f"# {table.name}: {table.title}", ""]
    lines += [f"- {n}" for n in table.notes]
    lines += [f"- Seeds {','.join(map(str, ctx.seeds))}; ours = mean ± std (sample std) over the seeds done, ×100; "
              "Δ = ours − paper, on the paper's split (test, or our best validation score where the paper reports "
              "the validation split)." + (" **--tiny: synthetic data, tiny models: the numbers only show that the "
                                          "pipeline runs.**" if ctx.tiny else "")]
    if plot_note:
        lines.append(f"- {plot_note}")
    lines.append("")
    if table.kind == "figure":
        ratios = sorted({r["test_ratio"] for r in rows})
        groups: dict[tuple, dict] = {}
        for row in rows:
            groups.setdefault((row["index"], row["test_type"]), {})[row["test_ratio"]] = row
        body = []
        for (index, t), by_ratio in groups.items():
            first = next(iter(by_ratio.values()))
            body.append([index, f"{first['label']} ({first['dataset']})", _md_cell_train(first), t,
                         *(_pm(_f(by_ratio[r]["ours_mean"]), _f(by_ratio[r]["ours_std"]), by_ratio[r]["n"])
                           if r in by_ratio else "" for r in ratios), first["status"]])
        lines += markdown_table(["#", "cell", "train", "test type", *(f"{100 * r:g}%" for r in ratios), "status"],
                                body, "llll" + "r" * len(ratios) + "l")
    else:
        lines += markdown_table(
            ["#", "cell", "dataset", "metric", "train", "test", "ours (test)", "ours (val, best)", "paper",
             "paper split", "Δ", "status"],
            ([row["index"], row["label"], row["dataset"], row["metric"], _md_cell_train(row),
              f"{row['test_type']} {100 * row['test_ratio']:g}%",
              _pm(_f(row["ours_mean"]), _f(row["ours_std"]), row["n"]),
              _pm(_f(row["ours_val_best_mean"]), _f(row["ours_val_best_std"]), row["n"]), row["paper"],
              row["paper_split"], _signed(row["diff"]), row["status"]] for row in rows), "llllllrrrlrl")
    lines.append("")
    lines.append("Cells: " + ", ".join(f"{i}. `{c.id}`" for i, c in enumerate(table.cells, 1)))
    return "\n".join(lines) + "\n"


def figure_curves(rows: list[dict]) -> list[Curve]:
    """A figure table's curves: one panel per (dataset, test type), one line per cell label (ours, mean ± std)."""
    panels = sorted({(r["dataset"], r["test_type"]) for r in rows},
                    key=lambda p: (available_datasets().index(p[0]), MISSING_TYPES.index(p[1])))
    curves = []
    for ds, t in panels:
        by_cell: dict[str, list[dict]] = {}
        for r in rows:
            if (r["dataset"], r["test_type"]) == (ds, t):
                by_cell.setdefault(r["label"], []).append(r)
        for label, rs in by_cell.items():
            rs = [r for r in sorted(rs, key=lambda r: r["test_ratio"]) if r["ours_mean"] != ""]
            if rs:
                curves.append(Curve(f"{ds}: missing {t}", label, [r["test_ratio"] for r in rs],
                                    [float(r["ours_mean"]) for r in rs], [float(r["ours_std"] or 0) for r in rs],
                                    ylabel=dataset_spec(ds).metric_label + " (×100)"))
    return curves


def _signed(text: str) -> str:
    return "" if text == "" else f"{float(text):+.2f}"


def _f(text) -> float | None:
    return None if text in ("", None) else float(text)


def sweep_curves(table: Table, rows: list[dict]) -> list[Curve]:
    """A sweep table's curves on one panel against the swept key: ours (test) per missing type, ours (best
    validation score) where the paper reports the validation split, and the paper's numbers."""
    ylabel, panel = f"{rows[0]['metric']} (×100)", ""   # one panel: the figure title names the table
    kw = {"ylabel": ylabel, "xlabel": table.sweep_key, "percent": False}
    curves = []
    for t in MISSING_TYPES:
        rs = sorted((r for r in rows if r["test_type"] == t), key=lambda r: float(r["x"]))
        done = [r for r in rs if r["ours_mean"] != ""]
        if done:
            curves.append(Curve(panel, f"ours, test {t}", [float(r["x"]) for r in done],
                                [float(r["ours_mean"]) for r in done], [float(r["ours_std"] or 0) for r in done], **kw))
        val = [r for r in rs if r["ours_val_best_mean"] != ""]
        if val and any(r["paper_split"] == "val" for r in rs):
            curves.append(Curve(panel, "ours, val (best)", [float(r["x"]) for r in val],
                                [float(r["ours_val_best_mean"]) for r in val],
                                [float(r["ours_val_best_std"] or 0) for r in val], **kw))
    papers = {float(r["x"]): float(r["paper"]) for r in rows if r["paper"] != ""}
    if papers:
        split = next(r["paper_split"] for r in rows if r["paper"] != "")
        curves.append(Curve(panel, f"paper ({split})", list(papers), list(papers.values()), points=True,
                            style="k*", **kw))
    return curves


def table_curves(rows: list[dict]) -> list[Curve]:
    """A table's curves: one panel per dataset (its metric), its rows along x: ours (test, mean ± std), ours (best
    validation score) where the paper reports the validation split, and the paper's numbers."""
    curves = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == ds]
        panel, xs = f"{ds} ({mine[0]['metric']})", list(range(len(mine)))
        kw = {"ylabel": "metric (×100)", "xlabel": "", "percent": False, "points": True}
        names = [f"{r['index']}. {r['label']} | {r['train_type']}{100 * r['train_ratio']:g}"
                 f"→{r['test_type']}{100 * r['test_ratio']:g}" for r in mine]
        curves.append(Curve(panel, "ours (test)", xs, [math.nan if r["ours_mean"] == "" else float(r["ours_mean"]) for r in mine],
                            [_f(r["ours_std"]) or 0.0 for r in mine], ticks=names, **kw))
        val = [(x, r) for x, r in zip(xs, mine) if r["paper_split"] == "val" and r["ours_val_best_mean"] != ""]
        if val:
            curves.append(Curve(panel, "ours (val, best)", [x for x, _ in val],
                                [float(r["ours_val_best_mean"]) for _, r in val], **kw))
        paper = [(x, float(r["paper"])) for x, r in zip(xs, mine) if r["paper"] != ""]
        if paper:
            curves.append(Curve(panel, "paper", [x for x, _ in paper], [v for _, v in paper], style="k_", **kw))
    return curves


def plot(table: Table, rows: list[dict], path: Path) -> str:
    """One figure for the table (:func:`mdpl.report.robustness_figure`); returns a note for the markdown ('' when
    written)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "Plot skipped: matplotlib is not importable."
    curves = (figure_curves(rows) if table.kind == "figure" else sweep_curves(table, rows) if table.kind == "sweep"
              else table_curves(rows))
    save_figure(robustness_figure(curves, "" if table.kind == "figure" else table.name), path, dpi=110)
    return ""


REPORT_COLUMNS = ["table", "index", "cell", "label", "dataset", "metric", "method", "backbone", "keys", "x",
                  "train_type", "train_ratio", "test_type", "test_ratio", "seeds", "n", "ours_mean", "ours_std",
                  "ours_val_best_mean", "ours_val_best_std", "paper", "paper_split", "paper_id", "diff", "diff_basis",
                  "status", "note"]


def write_report(table: Table, ctx: Context, paper: dict[str, dict]) -> dict[str, Path]:
    """OUT/<table>.md, .csv and (with matplotlib) .png from the runs done so far."""
    rows = collect(table, ctx, paper)
    ctx.out.mkdir(parents=True, exist_ok=True)
    paths = {"md": ctx.out / f"{table.name}.md", "csv": ctx.out / f"{table.name}.csv", "png": ctx.out / f"{table.name}.png"}
    note = plot(table, rows, paths["png"]) if any(r["ours_mean"] != "" or r["paper"] != "" for r in rows) \
        else "Plot skipped: no results and no paper numbers yet."
    if note:
        paths.pop("png")
    write_csv(rows, paths["csv"], columns=REPORT_COLUMNS, line_end="\n")
    tmp = paths["md"].with_name(f".{paths['md'].name}.{os.getpid()}.tmp")
    tmp.write_text(markdown(table, rows, ctx, note))
    os.replace(tmp, paths["md"])
    return paths
