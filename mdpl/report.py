"""The one writer of result tables and robustness figures: markdown pipe tables, CSV files and the "metric vs
missing rate" figure (one panel per missing type, one line per method or row).

The evaluation sweep (``mdpl.engine.sweep``), the demo, result aggregation (``mdpl.experiments.aggregate``) and the
paper-reproduction reports (``mdpl.experiments.summary``) all write through these functions.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

ALIGN = {"l": "---", "r": "---:"}
"""Alignment codes of :func:`markdown_table`: left (the default of a pipe table) and right (numbers)."""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
    """The lines of a markdown pipe table: the header, the alignment row (one code of :data:`ALIGN` per column,
    e.g. ``"llr"``) and one line per row (cells formatted with ``str``)."""
    if len(align) != len(header):
        raise ValueError(f"{len(align)} alignment codes for {len(header)} columns")
    lines = [_row(header), "|" + "".join(ALIGN[a] + "|" for a in align)]
    return lines + [_row(cells) for cells in rows]


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_csv(rows: Sequence[Mapping] | pd.DataFrame, path: Path, columns: Sequence[str] | None = None,
              line_end: str = "\r\n") -> Path:
    """A CSV of `rows` (dicts: columns = `columns`, or the union of their keys in first-seen order; or a DataFrame).

    Floats are written in their shortest round-trip form (= repr) so they read back exactly, NaN (and a key a row
    lacks) as 'nan', minimal quoting (the csv module's format). Written to a temporary file and moved into place, so
    a reader never sees half a file."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(tmp, index=False, na_rep="nan", lineterminator=line_end)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Curve:
    """One series of a figure panel: a metric (display units, e.g. x100) against the missing rate (the default), a
    swept key's values (``xlabel``, ``percent=False``) or the positions of named rows (``ticks``)."""

    panel: str                        # the panel (subplot) title, e.g. "missing text"
    label: str                        # legend entry: the method or row
    rates: Sequence[float]            # x: missing rates in [0, 1] (plotted in %), or values as given (percent=False)
    values: Sequence[float]
    spread: Sequence[float] | None = None   # ± band (e.g. the std over seeds); error bars when `points`
    ylabel: str = ""                  # the panel's y-axis label (its first curve's)
    xlabel: str = "missing rate (%)"  # the panel's x-axis label (its first curve's)
    percent: bool = True              # x plotted as 100 x rates
    points: bool = False              # markers (with error bars) only, no connecting line
    ticks: Sequence[str] | None = None   # names of the x positions (rows of a table), written under the panel
    style: str = ""                   # fixed marker format, e.g. "k|" (paper values); "" = one per label


MARKERS, LINESTYLES = "os^Dv", ("-", "--", ":")


def robustness_figure(curves: Sequence[Curve], title: str = "", columns: int = 3):
    """The one figure of mdpl's reports: one panel per distinct ``Curve.panel`` (first-seen order, up to `columns`
    a row), one series per curve, with distinct markers and line styles so that coinciding lines stay visible. By
    default metric vs missing rate; a curve's ``xlabel`` / ``percent`` / ``points`` / ``ticks`` plot a swept key
    or the rows of a table instead."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(c.panel for c in curves)) or [""]
    cols = min(columns, len(panels))
    nrows = math.ceil(len(panels) / cols)
    ticks = max((len(c.ticks) for c in curves if c.ticks), default=0)
    width, height = max(4.6, 0.16 * ticks), 3.8 + (0.06 * ticks if ticks else 0)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    labels = list(dict.fromkeys(c.label for c in curves))
    for ax, panel in zip(axes.flat, panels):
        mine = [c for c in curves if c.panel == panel]
        for curve in mine:
            _draw(ax, curve, labels.index(curve.label))
        named = next((c for c in mine if c.ticks), None)
        if named is not None:
            ax.set_xticks(list(named.rates), list(named.ticks), rotation=90, fontsize=6)
        ax.set_title(panel)
        ax.set_xlabel(mine[0].xlabel if mine else "")
        ax.set_ylabel(mine[0].ylabel if mine else "")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw(ax, curve: Curve, k: int) -> None:
    """One curve: a line with its ± band, or markers with error bars (``points``)."""
    x = [100 * r for r in curve.rates] if curve.percent else list(curve.rates)
    if curve.points:
        style = curve.style or MARKERS[k % 5]
        ax.errorbar(x, list(curve.values), yerr=None if curve.spread is None else list(curve.spread), fmt=style,
                    ms=8 if curve.style else 5, mew=2 if curve.style else 1, capsize=2, label=curve.label)
        return
    (line,) = ax.plot(x, list(curve.values), marker=MARKERS[k % 5], linestyle=LINESTYLES[k % 3],
                      markersize=7 - k % 3, label=curve.label)
    if curve.spread is not None:
        ax.fill_between(x, [v - s for v, s in zip(curve.values, curve.spread)],
                        [v + s for v, s in zip(curve.values, curve.spread)], alpha=0.15, color=line.get_color())


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG at `path` and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_robustness(curves: Sequence[Curve], path: Path, title: str = "") -> Path:
    """:func:`robustness_figure` saved as a PNG at `path`."""
    return save_figure(robustness_figure(curves, title), path)
