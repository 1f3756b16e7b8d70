"""The MSPs paper's main comparison as experiment cells (its card: ``ModalitySpecificPrompts.paper_tables``)."""
from __future__ import annotations

from mdpl.experiments.matrix import Table, scenario_cells

SECOND_HAND = {("hatememes", "text"): "ragpt/t1/hatememes/text/msps"}
"""(dataset, missing type) -> the paper_results.csv id of the one published MSPs number on the metric mdpl reports
there: RAGPT's re-run (its Table 1, quoted second-hand). Its MM-IMDb numbers are F1-micro / F1-samples, not the
F1-Macro of these cells, so they are not linked; no Food-101 number was found."""
SECOND_HAND_NOTE = ("paper: MSPs as re-run by RAGPT (its Table 1, second-hand), under RAGPT's data protocol and an "
                    "earlier state of its MSPs code; orientation only")


def tables() -> list[Table]:
    """Baseline and MAP (both prompt levels) beside MSPs on ViLT at 70 % missing text / image / both."""
    def second_hand(ds: str, t: str) -> dict:
        paper = SECOND_HAND.get((ds, t), "")
        return {"paper": paper, "note": SECOND_HAND_NOTE if paper else ""}

    cells = scenario_cells([("baseline", "none", {}), ("MAP input", "map", {}),
                            ("MAP attention", "map", {"keys": (("prompt_type", "attention"),)}),
                            ("MSPs", "msps", second_hand)])
    return [Table("msps_main", "MSPs main comparison (ICASSP 2024): ViLT, baseline / MAP input / MAP attention / MSPs, "
                 "70 % missing text / image / both, train = test setting", "table", cells,
                 notes=["The MSPs paper's result tables were not found in the sources (only its abstract): no column "
                        "of the paper's own numbers.",
                        "Paper column: the one MSPs number on a metric these cells report, RAGPT's re-run on Hateful "
                        "Memes with the text missing (AUROC; paper_results.csv `ragpt/t1/hatememes/text/msps`). "
                        "RAGPT's MM-IMDb numbers for MSPs are F1-micro / F1-samples (kept in paper_results.csv, not "
                        "comparable with F1-Macro); they used RAGPT's data protocol and predate the re-implementation "
                        "this method follows (docs/methods.md MSPS-D7, MSPS-D8).",
                        "MSPs = the `msps` preset (attention-level prompts, 16 tokens on blocks 0-5, orthogonality "
                        "weight 1.0) on MAP's ViLT; the reference's backbone numerics are `--set vilt_variant=hf "
                        "drop_rate=0` (a separate set of runs).",
                        "MAP is compared at both prompt levels (MSPs' prompts are attention-level). The baseline and "
                        "MAP cells are the map_main runs (same settings: shared)."])]
