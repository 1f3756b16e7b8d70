"""Aggregate several sweep runs (results.csv of mdpl/engine/sweep.py) into one comparison (issue 5).

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
  metric (x100, mean ± std) with rows = method, columns = backbone (issue 8: every method on every backbone).
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/aggregate.py` from anywhere
    sys.path.insert(0, str(ROOT))

from mdpl.engine.sweep import write_csv  # noqa: E402  (results.csv writer, also for comparison.csv)

ID_COLUMNS = ("dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed")
GROUP_KEYS = ("dataset", "method", "backbone", "type", "ratio")
#: primary metric per dataset (METHODS.md §8); the first metric column otherwise.
PRIMARY = {"mmimdb": "F1_Macro", "food101": "accuracy", "hatememes": "AUROC"}
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


def read_rows(paths: Sequence[Path]) -> list[dict]:
    """All rows of the files; metric columns (everything not in ID_COLUMNS) parsed as floats."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            for raw in csv.DictReader(fh):
                missing = [c for c in ("dataset", "method", "backbone", "type", "ratio", "seed") if c not in raw]
                if missing:
                    raise ValueError(f"{path} is not an mdpl results.csv (no columns {missing})")
                row = {k: raw[k] for k in ID_COLUMNS if k in raw}
                row["ratio"], row["seed"] = float(raw["ratio"]), int(raw["seed"])
                row.update({k: float(v) for k, v in raw.items() if k not in ID_COLUMNS and v not in ("", None)})
                row["source"] = str(path)
                rows.append(row)
    return rows


def _metric_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in ID_COLUMNS and k != "source" and k not in names]
    return names


def _sort_key(group: tuple) -> tuple:
    dataset, method, backbone, mtype, ratio = group
    order = TYPE_ORDER.index(mtype) if mtype in TYPE_ORDER else len(TYPE_ORDER)
    return dataset, method, backbone, order, mtype, ratio


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One dict per (dataset, method, backbone, type, ratio): n, seeds, <metric>_mean and <metric>_std."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    metrics = _metric_names(rows)
    out = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        agg = dict(zip(GROUP_KEYS, key))
        agg["n"] = len(members)
        agg["seeds"] = " ".join(str(s) for s in sorted(m["seed"] for m in members))
        for name in metrics:
            values = [m[name] for m in members if name in m and not math.isnan(m[name])]
            agg[f"{name}_mean"] = statistics.fmean(values) if values else math.nan
            agg[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else math.nan)
        out.append(agg)
    return out


def primary_metric(dataset: str, agg_rows: Sequence[dict]) -> str:
    if dataset in PRIMARY and f"{PRIMARY[dataset]}_mean" in agg_rows[0]:
        return PRIMARY[dataset]
    return next(k[:-5] for k in agg_rows[0] if k.endswith("_mean"))


def _cell(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(agg_rows: Sequence[dict]) -> str:
    """Per dataset: primary metric x100 (mean ± std over seeds), rows = method (backbone) x type, columns = rate."""
    lines: list[str] = []
    for dataset in sorted({r["dataset"] for r in agg_rows}):
        rows = [r for r in agg_rows if r["dataset"] == dataset]
        metric = primary_metric(dataset, rows)
        ratios = sorted({r["ratio"] for r in rows})
        lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds)", "",
                  "| method | backbone | missing type | n | " + " | ".join(f"{100 * x:g}%" for x in ratios) + " |",
                  "|---|---|---|---:|" + "---:|" * len(ratios)]
        seen: list[tuple] = []
        for r in rows:
            ident = (r["method"], r["backbone"], r["type"])
            if ident not in seen:
                seen.append(ident)
        for method, backbone, mtype in seen:
            cells = {r["ratio"]: r for r in rows if (r["method"], r["backbone"], r["type"]) == (method, backbone, mtype)}
            n = max(c["n"] for c in cells.values())
            vals = [_cell(cells[x][f"{metric}_mean"], cells[x][f"{metric}_std"]) if x in cells else "–" for x in ratios]
            lines.append(f"| {method} | {backbone} | {mtype} | {n} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def method_backbone_markdown(agg_rows: Sequence[dict]) -> str:
    """Per dataset and scenario (type, rate): primary metric x100, rows = method, columns = backbone."""
    lines: list[str] = []
    for dataset in sorted({r["dataset"] for r in agg_rows}):
        rows = [r for r in agg_rows if r["dataset"] == dataset]
        metric = primary_metric(dataset, rows)
        backbones = sorted({r["backbone"] for r in rows})
        methods = list(dict.fromkeys(sorted(r["method"] for r in rows)))
        cells = {(r["type"], r["ratio"], r["method"], r["backbone"]): r for r in rows}
        for mtype, ratio in dict.fromkeys((r["type"], r["ratio"]) for r in rows):   # rows are sorted by _sort_key
            lines += [f"## {dataset}: {metric} (×100, mean ± std over seeds), missing {mtype} {100 * ratio:g}%", "",
                      "| method | " + " | ".join(backbones) + " |", "|---|" + "---:|" * len(backbones)]
            for method in methods:
                vals = [_cell(c[f"{metric}_mean"], c[f"{metric}_std"]) if (c := cells.get((mtype, ratio, method, b)))
                        else "–" for b in backbones]
                lines.append(f"| {method} | " + " | ".join(vals) + " |")
            lines.append("")
    return "\n".join(lines)


def comparison_figure(agg_rows: Sequence[dict], dataset: str):
    """One subplot per missing type, one line per method (± std band): primary metric x100 vs missing rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in agg_rows if r["dataset"] == dataset]
    metric = primary_metric(dataset, rows)
    types = sorted({r["type"] for r in rows}, key=lambda t: (TYPE_ORDER.index(t) if t in TYPE_ORDER else 9, t))
    methods = sorted({(r["method"], r["backbone"]) for r in rows})
    fig, axes = plt.subplots(1, len(types), figsize=(4.6 * len(types), 4.0), squeeze=False, sharey=True)
    for ax, mtype in zip(axes[0], types):
        for k, (method, backbone) in enumerate(methods):
            pts = sorted((r["ratio"], r[f"{metric}_mean"], r[f"{metric}_std"]) for r in rows
                         if (r["type"], r["method"], r["backbone"]) == (mtype, method, backbone))
            if not pts:
                continue
            x = [100 * p[0] for p in pts]
            y = [100 * p[1] for p in pts]
            s = [100 * p[2] for p in pts]
            ax.plot(x, y, marker="os^Dv"[k % 5], linestyle=("-", "--", ":")[k % 3], markersize=7 - k % 3,
                    label=f"{method} ({backbone})")
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.15)
        ax.set_title(f"missing {mtype}")
        ax.set_xlabel("missing rate (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (×100)")
    axes[0][-1].legend(title="method")
    fig.suptitle(f"{dataset}: {metric} vs missing rate (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def write_outputs(agg_rows: Sequence[dict], out: Path) -> dict[str, str]:
    """comparison.csv, comparison.md and comparison_<dataset>.png in ``out``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(agg_rows, out / "comparison.csv")}
    paths["md"] = out / "comparison.md"
    paths["md"].write_text(markdown(agg_rows))
    for dataset in sorted({r["dataset"] for r in agg_rows}):
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
