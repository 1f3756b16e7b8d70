"""Aggregate several sweep runs (results.csv of mdpl/engine/sweep.py) into one comparison.

    python scripts/aggregate.py 'result/*/version_*' other/run/results.csv --out comparison/

Arguments are run directories (searched recursively for results.csv), results.csv files, or globs of either.
Rows are grouped by dataset x method x backbone x missing type x missing ratio; every metric becomes
mean ± std over the runs (seeds) of the group (sample std, ddof=1; 0 for a single run). Writes to --out:

* ``comparison.csv``  -- one row per group: ids, n, seeds, ``<metric>_mean``, ``<metric>_std``;
* ``comparison.md``   -- per dataset, the primary metric (x100, mean ± std) with rows = method x missing type,
  columns = missing rate;
* ``comparison_<dataset>.png`` -- one subplot per missing type, one line per method (± std band), primary
  metric vs missing rate: the form of DCP's figure comparing methods across missing rates;
* with ``--method-backbone``: ``method_backbone.md`` -- per dataset and missing scenario (type, rate), the primary
  metric (x100, mean ± std) with rows = method, columns = backbone (every method on every backbone).
"""
from __future__ import annotations

import argparse
import glob
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/aggregate.py` from anywhere
    sys.path.insert(0, str(ROOT))

from mdpl.data.registry import dataset_spec, is_registered  # noqa: E402
from mdpl.engine.sweep import write_csv  # noqa: E402  (results.csv writer, also for comparison.csv)

ID_COLUMNS = ("dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed")
REQUIRED_COLUMNS = ("dataset", "method", "backbone", "type", "ratio", "seed")
GROUP_KEYS = ["dataset", "method", "backbone", "type", "ratio"]
TYPE_ORDER = ("text", "image", "both")


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
        lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds)", "",
                  "| method | backbone | missing type | n | "
                  + " | ".join(f"{100 * x:g}%" for x in table.columns) + " |",
                  "|---|---|---|---:|" + "---:|" * len(table.columns)]
        for (method, backbone, mtype), cells in table.iterrows():
            lines.append(f"| {method} | {backbone} | {mtype} | {n[(method, backbone, mtype)]} | "
                         + " | ".join(cells) + " |")
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
            lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds), missing {mtype} {100 * ratio:g}%", "",
                      "| method | " + " | ".join(backbones) + " |", "|---|" + "---:|" * len(backbones)]
            lines += [f"| {method} | " + " | ".join(cells) + " |" for method, cells in table.iterrows()]
            lines.append("")
    return "\n".join(lines)


def comparison_figure(agg_rows: pd.DataFrame, dataset: str):
    """One subplot per missing type, one line per method (± std band): primary metric x100 vs missing rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = agg_rows[agg_rows["dataset"] == dataset]
    metric = primary_metric(dataset, rows)
    types = sorted(rows["type"].unique(), key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else 9, t))
    methods = sorted(set(zip(rows["method"], rows["backbone"])))
    fig, axes = plt.subplots(1, len(types), figsize=(4.6 * len(types), 4.0), squeeze=False, sharey=True)
    for ax, mtype in zip(axes[0], types):
        for k, (method, backbone) in enumerate(methods):
            pts = rows[(rows["type"] == mtype) & (rows["method"] == method) & (rows["backbone"] == backbone)]
            if pts.empty:
                continue
            pts = pts.sort_values("ratio")
            x, y, s = (100 * pts[c].to_numpy(dtype=float) for c in ("ratio", f"{metric}_mean", f"{metric}_std"))
            ax.plot(x, y, marker="os^Dv"[k % 5], linestyle=("-", "--", ":")[k % 3], markersize=7 - k % 3,
                    label=f"{method} ({backbone})")
            ax.fill_between(x, y - s, y + s, alpha=0.15)
        ax.set_title(f"missing {mtype}")
        ax.set_xlabel("missing rate (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (×100)")
    axes[0][-1].legend(title="method")
    fig.suptitle(f"{dataset}: {metric} vs missing rate (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def write_outputs(agg_rows: pd.DataFrame, out: Path) -> dict[str, str]:
    """comparison.csv, comparison.md and comparison_<dataset>.png in ``out``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(agg_rows, out / "comparison.csv")}
    paths["md"] = out / "comparison.md"
    paths["md"].write_text(markdown(agg_rows))
    for dataset in sorted(agg_rows["dataset"].unique()):
        fig = comparison_figure(agg_rows, dataset)
        paths[f"png_{dataset}"] = out / f"comparison_{dataset}.png"
        fig.savefig(paths[f"png_{dataset}"], dpi=120)
        plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="run directories, results.csv files or globs of either")
    parser.add_argument("--out", default="comparison", help="output folder (default: ./comparison)")
    parser.add_argument("--method-backbone", action="store_true",
                        help="also write method_backbone.md: rows = method, columns = backbone, per scenario")
    args = parser.parse_args(argv)
    try:
        paths = find_csvs(args.inputs)
        agg_rows = aggregate(read_rows(paths))
    except (FileNotFoundError, ValueError) as err:
        print(f"aggregate: {err}", file=sys.stderr)
        return 1
    written = write_outputs(agg_rows, Path(args.out))
    print(markdown(agg_rows))
    if args.method_backbone:
        table = method_backbone_markdown(agg_rows)
        written["method_backbone"] = str(Path(args.out) / "method_backbone.md")
        Path(written["method_backbone"]).write_text(table)
        print(table)
    print(f"aggregated {len(paths)} results.csv files into " + ", ".join(written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
