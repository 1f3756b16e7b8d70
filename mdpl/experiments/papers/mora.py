"""The MoRA paper's 70 % comparison as experiment cells (its card: ``MoRA.paper_tables``)."""
from __future__ import annotations

from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import BUILTIN_DATASETS as PAPER_DATASETS
from mdpl.experiments.matrix import Table, make_cell

PAPER_TYPE = "both"
"""The missing case of MoRA's 70 % numbers: not stated by the source; its DCP row equals DCP's own 70 %
missing-both test cells, so they are read as missing-both (paper_results.csv notes it per row)."""


def _mora_main() -> Table:
    variants = [("baseline (CLIP)", "none", "clip", ""), ("DCP", "dcp", "", "dcp"), ("MoRA", "mora", "", "mora")]
    cells = [make_cell(label, ds, m, (t, 0.7), backbone=bb,
                       paper=f"mora/t70/{ds}/{slug}" if slug and t == PAPER_TYPE else "")
             for ds in PAPER_DATASETS for t in MISSING_TYPES for label, m, bb, slug in variants]
    return Table("mora_main", "MoRA main table (ICLR 2026): CLIP ViT-B/16, baseline / DCP / MoRA, 70 % missing "
                 "text / image / both, train = test setting", "table", cells,
                 notes=["Paper column: MoRA's 70 % comparison, known second-hand (a third-party note, "
                        "paper_results.csv `mora/t70/*`); its missing case is not stated and is read as missing-both "
                        "(its DCP row equals DCP's 70 % missing-both test cells). MoRA's per-case (text / image) "
                        "numbers were not found: those cells have no paper number. The same source's LoRA, DoRA, "
                        "BitFit and full fine-tuning rows are kept in paper_results.csv.",
                        "MoRA = the `mora` preset with the reference's per-dataset adapters (mora_maps, ranks, α). "
                        "Its averages over text / image / both at 50 % and 90 % (`mora/avg/*`) are not cells of "
                        "this table.",
                        "The baseline (CLIP) and DCP cells are the dcp_main runs (same settings: shared)."])


def tables() -> list[Table]:
    return [_mora_main()]
