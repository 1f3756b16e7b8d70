"""The "all methods, one protocol" table: every registered method (the baseline included) under one protocol, built
from the registry, so a method registered by a plugin appears in it without an edit here.

Protocol: the three built-in datasets x missing text / image / both at 70 %, trained, validated and tested at the
same setting (the protocol of MAP's, DCP's and MoRA's main tables). Backbone: each method on its paper's backbone
(``paper_backbone``, else the default backbone) with what its card's ``paper_cell`` adds (e.g. RAGPT's backbone
variant and retriever), and the baseline on every backbone that appears, so that each
method has its frozen-backbone reference beside it. Runs are shared with the paper tables that train the same
settings (e.g. MAP on ViLT with map_main, DCP on CLIP with dcp_main).
"""
from __future__ import annotations

from mdpl.backbones.registry import method_backbone
from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import BUILTIN_DATASETS, resolve
from mdpl.experiments.matrix import Table, make_cell
from mdpl.prompts.registry import available_methods, baseline_method, method_class

PROTOCOL_RATIO = 0.7
TABLE_NAME = "all_methods"


def protocol_rows() -> list[tuple[str, str, str]]:
    """(label, method, backbone) of each row: the baseline on every paper backbone (first-seen order), then every
    other registered method on its paper's backbone ('' = the method's own)."""
    baseline = baseline_method()
    methods = available_methods()
    backbones = list(dict.fromkeys(method_backbone(m) for m in methods))
    rows = [(f"baseline ({bb})", baseline,
             "" if bb == method_backbone(baseline) else bb) for bb in backbones]
    rows += [(f"{method_class(m).title or m} ({method_backbone(m)})", m, "") for m in methods if m != baseline]
    return rows


def paper_cell(method: str) -> dict[str, tuple]:
    """The keywords the method's card gives a cell (``paper_cell``: its paper's backbone variant, retriever, ...)."""
    ref = method_class(method).paper_cell
    return dict(resolve(ref)()) if ref else {}


def scenarios() -> list[tuple[str, str]]:
    """(dataset, missing type) of every column: each row's cells in this order."""
    return [(ds, t) for ds in BUILTIN_DATASETS for t in MISSING_TYPES]


def all_methods_table() -> Table:
    """One cell per (row, dataset, missing type), row-major: shard i/N with N = len(scenarios()) runs one
    scenario of every row (``--cells``)."""
    cells = [make_cell(label, ds, method, (t, PROTOCOL_RATIO), backbone=bb, **paper_cell(method))
             for label, method, bb in protocol_rows() for ds, t in scenarios()]
    return Table(TABLE_NAME, "All registered methods, one protocol: 3 datasets x missing text / image / both at "
                 f"{PROTOCOL_RATIO:.0%}, train = test setting, each method on its paper's backbone", "table", cells,
                 notes=["Built from the method registry: every registered method (a plugin's too) is a row. Each "
                        "method runs on its paper's backbone (`paper_backbone`, else the default backbone), the "
                        "baseline on every backbone that appears; the backbone is in the row label.",
                        "No paper column: the papers' own numbers are in their tables (dcp_main, mora_main, ...).",
                        "Runs are shared with the paper tables that train the same settings."])
