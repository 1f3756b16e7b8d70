"""The SCP paper's main table as experiment cells (its card: ``SemanticallyConditionedPrompts.paper_tables``)."""
from __future__ import annotations

from mdpl.experiments.matrix import Table, scenario_cells


def tables() -> list[Table]:
    """The main table: baseline, MAP and SCP on ViLT at 70 % missing text / image / both."""
    cells = scenario_cells([("baseline", "none", {}), ("MAP", "map", {}), ("SCP", "scp", {})])
    return [Table("scp_main", "SCP main table (WACV 2025): ViLT, baseline / MAP / SCP, 70 % missing, train = test "
                 "setting", "table", cells,
                 notes=["SCP's result tables were not found in the sources (only its repository's README): no paper "
                        "column.",
                        "SCP = the `scp` preset: the README's command (pool_size 32, 12 generated + 4 fixed tokens, "
                        "conditioned blocks 6-11, static blocks 0-5). The reference config's pool_size 1024 "
                        "(docs/methods.md D-59) is `--set scp_pool_size=1024`.",
                        "The baseline and MAP cells are the map_main runs (same settings: shared)."])]
