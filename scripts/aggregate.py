"""Aggregate several sweep runs (results.csv of mdpl/engine/sweep.py) into one comparison (mdpl.experiments.aggregate).

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
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/aggregate.py` from anywhere
    sys.path.insert(0, str(ROOT))

from mdpl.experiments.aggregate import (aggregate, find_csvs, markdown, method_backbone_markdown,  # noqa: E402
                                        read_rows, write_outputs)


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
