"""The MoRA paper's 70 % comparison as experiment cells (its card: ``MoRA.paper_tables``)."""
from __future__ import annotations

from collections.abc import Callable

from mdpl.experiments.matrix import Table, scenario_cells

PAPER_TYPE = "both"
"""The missing case of MoRA's 70 % numbers: not stated by the source; its DCP row equals DCP's own 70 %
missing-both test cells, so they are read as missing-both (paper_results.csv notes it per row)."""


def tables() -> list[Table]:
    """Baseline and DCP on CLIP beside MoRA at 70 % missing text / image / both."""
    def slugged(slug: str) -> Callable[[str, str], dict]:
        return lambda ds, t: {"paper": f"mora/t70/{ds}/{slug}" if t == PAPER_TYPE else ""}

    cells = scenario_cells([("baseline (CLIP)", "none", {"backbone": "clip"}), ("DCP", "dcp", slugged("dcp")),
                            ("MoRA", "mora", slugged("mora"))])
    return [Table("mora_main", "MoRA main table (ICLR 2026): CLIP ViT-B/16, baseline / DCP / MoRA, 70 % missing "
                 "text / image / both, train = test setting", "table", cells,
                 notes=["Paper column: MoRA's 70 % comparison, known second-hand (a third-party note, "
                        "paper_results.csv `mora/t70/*`); its missing case is not stated and is read as missing-both "
                        "(its DCP row equals DCP's 70 % missing-both test cells). MoRA's per-case (text / image) "
                        "numbers were not found: those cells have no paper number. The same source's LoRA, DoRA, "
                        "BitFit and full fine-tuning rows are kept in paper_results.csv.",
                        "MoRA = the `mora` preset with the reference's per-dataset adapters (mora_maps, ranks, α). "
                        "Its averages over text / image / both at 50 % and 90 % (`mora/avg/*`) are not cells of "
                        "this table.",
                        "The baseline (CLIP) and DCP cells are the dcp_main runs (same settings: shared)."])]
