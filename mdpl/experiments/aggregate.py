"""Aggregation of evaluation sweeps: the ``results.csv`` of many runs (``mdpl.engine.sweep``) grouped by dataset x
method x backbone x missing type x missing ratio, every metric as mean ± std over the runs (seeds) of a group
(sample std, ddof=1; 0 for a single run). ``scripts/aggregate.py`` is its command line."""
from __future__ import annotations

import glob
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import dataset_spec, is_registered
from mdpl.report import Curve, markdown_table, robustness_figure, save_figure, write_csv

ID_COLUMNS = ("dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed")
REQUIRED_COLUMNS = ("dataset", "method", "backbone", "type", "ratio", "seed")
GROUP_KEYS = ["dataset", "method", "backbone", "type", "ratio"]
TYPE_ORDER = MISSING_TYPES


def find_csvs(patterns: Iterable[str]) -> list[Path]:
    """results.csv files named by the patterns (files, run directories, or globs of either), sorted, unique."""
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))] or [Path(pattern)]
        for path in matches:
            if path.is_dir():
                found.extend(sorted(path.rglob("results.csv")))
            elif path.is_file():
                found.append(path)
    unique = sorted({p.resolve() for p in found})
    if not unique:
        raise FileNotFoundError(f"no results.csv found under {list(patterns)}; pass run directories of "
                                "`run.py ... test_types=[...] test_ratios=[...]` runs or their results.csv")
    return unique


def read_rows(paths: Sequence[Path]) -> pd.DataFrame:
    """All rows of the files, plus a ``source`` column; ratio and the metric columns (everything not in
    ID_COLUMNS) as floats (an empty cell is NaN), seed as int."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path} is empty, not an mdpl results.csv") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} is not an mdpl results.csv (no columns {missing})")
        numeric = ["ratio", *(c for c in frame.columns if c not in ID_COLUMNS)]
        frame[numeric] = frame[numeric].replace("", "nan").astype(float)
        frames.append(frame.astype({"seed": int}).assign(source=str(path)))
    return pd.concat(frames, ignore_index=True)


def _metric_names(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c not in ID_COLUMNS and c != "source"]


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, backbone, type, ratio): n, seeds, <metric>_mean and <metric>_std
    (sample std over the runs that have the metric; 0 for one run, NaN for none)."""
    if rows.empty:
        raise ValueError("the results.csv files hold no rows")
    groups = rows.groupby(GROUP_KEYS, sort=False)
    out = groups.size().rename("n").to_frame()
    out["seeds"] = groups["seed"].agg(lambda seeds: " ".join(str(s) for s in sorted(seeds)))
    for name in _metric_names(rows):
        values = groups[name]
        out[f"{name}_mean"] = values.mean()
        out[f"{name}_std"] = values.std().where(values.count() != 1, 0.0)   # pandas: NaN for a single run
    out = out.reset_index()
    type_order = out["type"].map(lambda t: TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER))
    return (out.assign(_order=type_order)
            .sort_values(["dataset", "method", "backbone", "_order", "type", "ratio"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def primary_metric(dataset: str, agg_rows: pd.DataFrame) -> str:
    """The registered dataset's primary metric (docs/methods.md §8) when aggregated; the first metric otherwise."""
    primary = dataset_spec(dataset).primary_metric if is_registered(dataset) else None
    if primary and f"{primary}_mean" in agg_rows.columns:
        return primary
    return next(c[:-5] for c in agg_rows.columns if c.endswith("_mean"))


def _cell(mean: float, std: float, n: int = 2) -> str:
    """'mean ± std' x100; the plain value for a single run (n = 1: no spread to show)."""
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _with_cells(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``rows`` plus a column ``cell``: the metric x100 as 'mean ± std' (the mean alone for one run)."""
    return rows.assign(cell=[_cell(m, s, n) for m, s, n in zip(rows[f"{metric}_mean"], rows[f"{metric}_std"],
                                                                 rows["n"])])


def markdown(agg_rows: pd.DataFrame) -> str:
    """Per dataset: primary metric x100 (mean ± std over seeds), rows = method (backbone) x type, columns = rate."""
    lines: list[str] = []
    ident = ["method", "backbone", "type"]
    for dataset, rows in agg_rows.groupby("dataset", sort=True):
        metric = primary_metric(dataset, rows)
        rows = _with_cells(rows, metric)
        order = pd.MultiIndex.from_frame(rows[ident].drop_duplicates())          # rows are sorted by aggregate()
        table = (rows.pivot(index=ident, columns="ratio", values="cell")
                 .reindex(index=order, columns=sorted(rows["ratio"].unique())).fillna("–"))
        n = rows.groupby(ident, sort=False)["n"].max()
        lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds)", ""]
        lines += markdown_table(["method", "backbone", "missing type", "n", *(f"{100 * x:g}%" for x in table.columns)],
                                ([*key, n[key], *cells] for key, cells in table.iterrows()),
                                "lllr" + "r" * len(table.columns))
        lines.append("")
    return "\n".join(lines)


def method_backbone_markdown(agg_rows: pd.DataFrame) -> str:
    """Per dataset and scenario (type, rate): primary metric x100, rows = method, columns = backbone."""
    lines: list[str] = []
    for dataset, rows in agg_rows.groupby("dataset", sort=True):
        metric = primary_metric(dataset, rows)
        rows = _with_cells(rows, metric)
        methods, backbones = sorted(rows["method"].unique()), sorted(rows["backbone"].unique())
        for (mtype, ratio), scenario in rows.groupby(["type", "ratio"], sort=False):   # in aggregate() order
            table = (scenario.pivot(index="method", columns="backbone", values="cell")
                     .reindex(index=methods, columns=backbones).fillna("–"))
            lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds), missing {mtype} {100 * ratio:g}%", ""]
            lines += markdown_table(["method", *backbones], ([method, *cells] for method, cells in table.iterrows()),
                                    "l" + "r" * len(backbones))
            lines.append("")
    return "\n".join(lines)


def comparison_figure(agg_rows: pd.DataFrame, dataset: str):
    """One panel per missing type, one line per method (± std band): primary metric x100 vs missing rate."""
    rows = agg_rows[agg_rows["dataset"] == dataset]
    metric = primary_metric(dataset, rows)
    types = sorted(rows["type"].unique(), key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else 9, t))
    curves = []
    for mtype in types:
        for method, backbone in sorted(set(zip(rows["method"], rows["backbone"]))):
            pts = rows[(rows["type"] == mtype) & (rows["method"] == method) & (rows["backbone"] == backbone)]
            if pts.empty:
                continue
            pts = pts.sort_values("ratio")
            curves.append(Curve(f"missing {mtype}", f"{method} ({backbone})", list(pts["ratio"].astype(float)),
                                list(100 * pts[f"{metric}_mean"].astype(float)),
                                list(100 * pts[f"{metric}_std"].astype(float)), ylabel=f"{metric} (×100)"))
    return robustness_figure(curves, f"{dataset}: {metric} vs missing rate (mean ± std over seeds)")


def write_outputs(agg_rows: pd.DataFrame, out: Path) -> dict[str, str]:
    """comparison.csv, comparison.md and comparison_<dataset>.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(agg_rows, out / "comparison.csv")}
    paths["md"] = out / "comparison.md"
    paths["md"].write_text(markdown(agg_rows))
    for dataset in sorted(agg_rows["dataset"].unique()):
        paths[f"png_{dataset}"] = save_figure(comparison_figure(agg_rows, dataset), out / f"comparison_{dataset}.png")
    return {k: str(v) for k, v in paths.items()}
