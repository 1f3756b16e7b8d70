"""The MemPrompt paper's tables as experiment cells (its card: ``MemPrompt.paper_tables``)."""
from __future__ import annotations

from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import BUILTIN_DATASETS as PAPER_DATASETS
from mdpl.experiments.matrix import FIG_RATIOS, Table, make_cell


def _memprompt_main() -> Table:
    variants = [("baseline", "none"), ("MAP", "map"), ("MemPrompt", "memprompt")]
    cells = [make_cell(label, ds, m, (t, 0.7), (MISSING_TYPES, (0.7,))) for ds in PAPER_DATASETS for t in MISSING_TYPES for label, m in variants]
    return Table("memprompt_main", "MemPrompt main: ViLT, trained on one missing case at 70 %, tested on every case",
                 "table", cells,
                 notes=["MemPrompt's result tables were not found (its abstract gives only averages over unnamed "
                        "scenarios, kept in paper_results.csv).",
                        "MemPrompt on Hateful Memes uses learning_rate=1e-3 (its reference config)."])


MEMPROMPT_SETTING = ("image", 0.7)
MEMPROMPT_TESTS = (MISSING_TYPES, (0.7,))
MEMPROMPT_NOTE = ("MM-IMDb, trained with the image missing at 70 % (MemPrompt's reference config), tested on every "
                  "missing type at 70 %. MemPrompt's ablation tables were not found: no paper column.")


def _memprompt_ablation() -> Table:
    variants = [("MemPrompt", ()), ("w/o generative prompts", (("gen_prompt_layers", []),)),
                ("w/o shared prompts", (("shared_prompt_layers", []),))]
    cells = [make_cell(label, "mmimdb", "memprompt", MEMPROMPT_SETTING, MEMPROMPT_TESTS, keys=keys) for label, keys in variants]
    return Table("memprompt_ablation", "MemPrompt ablation: generative and shared prompts", "table", cells,
                 notes=[MEMPROMPT_NOTE])


def _memprompt_mem_size() -> Table:
    cells = [make_cell(f"mem_size={m}" + (" (default)" if m == 16 else ""), "mmimdb", "memprompt", MEMPROMPT_SETTING,
                   MEMPROMPT_TESTS, keys=() if m == 16 else (("mem_size", m),), x=m) for m in (8, 16, 32, 64)]
    return Table("memprompt_mem_size", "MemPrompt prompt-memory size", "sweep", cells, sweep_key="mem_size",
                 notes=[MEMPROMPT_NOTE + " top_k stays 5 (2 with --tiny)."])


def _memprompt_top_k() -> Table:
    cells = [make_cell(f"top_k={k}" + (" (default)" if k == 5 else ""), "mmimdb", "memprompt", MEMPROMPT_SETTING,
                   MEMPROMPT_TESTS, keys=() if k == 5 else (("mem_size", 16), ("top_k", k)), x=k) for k in (1, 3, 5, 8)]
    return Table("memprompt_top_k", "MemPrompt retrieved prompts (top_k of 16)", "sweep", cells, sweep_key="top_k",
                 notes=[MEMPROMPT_NOTE + " mem_size=16 is set explicitly (the paper value) so that --tiny keeps "
                        "top_k <= mem_size; the default row has no keys (mem_size 4, top_k 2 with --tiny)."])


def tables() -> list[Table]:
    return [_memprompt_main(), _memprompt_ablation(), _memprompt_mem_size(), _memprompt_top_k()]
