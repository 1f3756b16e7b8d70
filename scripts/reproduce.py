#!/usr/bin/env python
"""Reproduce the papers' tables and figures: a thin driver over ``run.py``.

    python scripts/reproduce.py --list                                   # the tables, their cells and runs
    python scripts/reproduce.py dcp_main --data-root ARROW --weights WEIGHTS --out repro --dry-run
    python scripts/reproduce.py dcp_main --data-root ARROW --weights WEIGHTS --out repro [--seeds 0,1,2]
    python scripts/reproduce.py dcp_main ... --cells 3/16                # shard 3 of 16 (SLURM array task)
    python scripts/reproduce.py dcp_length --tiny --out /tmp/repro       # the same matrix, synthetic data, CPU

A table is a list of cells. A cell is one training run (dataset, method, backbone, training missing setting and
ablation keys) whose final test is the one-pass evaluation sweep over the cell's test scenarios
(``test_types`` x ``test_ratios``, on the best checkpoint). Nothing here imports mdpl for training or
evaluation: every run is ``python run.py with <task> <method preset> [on_clip|on_vilt|on_coca] [tiny] key=value ...``
in a subprocess, and results are read from what a run writes into its run directory (``results.csv`` of the
sweep, ``test_metrics.json``, and ``csv/metrics.csv`` for the best validation score). ``--tiny`` writes the
synthetic data with ``mdpl.data.synthetic.write_synthetic`` + ``mdpl.data.writers.make_arrow``.

Runs are shared between tables: a training run is identified by its experiment settings (named configs + keys;
``run_key``), lives in ``OUT/runs/<run key>/seed<k>/`` and sweeps the union of the test scenarios of every cell
of every table that uses it, so e.g. DCP on MM-IMDb at 70 % missing-both is trained once for Table 4, the
component ablation, Fig. 3 and Fig. 4. A (cell, seed) is done when a run directory under its folder holds a
``results.csv`` with all the cell's scenarios; done cells are skipped. A training run killed before its test is
continued with ``resume=True``; a finished training whose results lack a scenario (the registry changed) is
evaluated again with ``test_only=True`` on its best checkpoint. Outputs: ``OUT/<TABLE>.md``, ``OUT/<TABLE>.csv``
(ours: mean ± std over seeds, the paper's number, the difference) and ``OUT/<TABLE>.png``.

The papers' numbers come from ``scripts/paper_results.csv`` (one row per printed number, ``id`` referenced by
the cells). Exit status: 0 when every selected cell ran or was skipped, 1 when a run failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = Path(__file__).resolve().with_name("paper_results.csv")

DATASETS = ("mmimdb", "food101", "hatememes")
TYPES = ("text", "image", "both")
METRIC = {"mmimdb": "F1_Macro", "food101": "accuracy", "hatememes": "AUROC"}
"""Primary metric per dataset: the results.csv column (docs/methods.md §8)."""
METRIC_LABEL = {"mmimdb": "F1-Macro", "food101": "accuracy", "hatememes": "AUROC"}
PRESET = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp"}
PAPER_BACKBONE = {"none": "vilt", "map": "vilt", "memprompt": "vilt", "dcp": "clip"}
METHOD_NAME = {"none": "baseline", "map": "MAP", "memprompt": "MemPrompt", "dcp": "DCP"}
VILT_WEIGHTS = "vilt_200k_mlm_itm.ckpt"
CLIP_WEIGHTS = "ViT-B-16.pt"
COCA_WEIGHTS = "coca_ViT-B-32.bin"
"""open_clip coca_ViT-B-32 state dict (e.g. laion2b_s13b_b90k's open_clip_pytorch_model.bin, renamed) in --weights."""
TOKENIZER_DIR = "bert-base-uncased"
FIG_RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
"""Missing rates of the robustness figures (x axis)."""
RESOURCE_KEYS = frozenset({"per_gpu_batchsize", "num_gpus", "num_nodes", "num_workers", "num_cpu_processes",
                           "checkpoint_every_n_steps", "logger", "missing_table_root", "pixel_cache",
                           "clip_sha256", "coca_sha256"})
"""--set keys that change how a run uses the machine, not what it computes: not part of a run's identity
(pixel_cache: an exact loader cache, the model gets the same tensors; *_sha256: a check of the weight file)."""
TINY_SAMPLES = {"mmimdb": (24, 8, 16), "food101": (24, 8, 16), "hatememes": (24, 8, 16)}
"""--tiny: synthetic train / val / test items per dataset (MM-IMDb: movies, 1-3 plot items each)."""
ARROW_STEMS = {"mmimdb": ("mmimdb_train", "mmimdb_dev", "mmimdb_test"),
               "food101": ("food101_train", "food101_val", "food101_test"),
               "hatememes": ("hatememes_train", "hatememes_dev", "hatememes_test")}
TASK_RUN = {"mmimdb": (20, 0.2), "food101": (20, 0.2), "hatememes": (20, 0.11)}
"""(max_epoch, val_check_interval) of the task configs in config.py: only for the cost estimate."""
NOMINAL_SIZES = {"mmimdb": (15552, 2608, 7799), "food101": (61142, 6846, 22716), "hatememes": (8500, 500, 1000)}
"""Train / val / test items when no arrow files are at hand (MM-IMDb: movies; per-plot items are more)."""


# ----------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Cell:
    """One training run + its evaluation scenarios."""
    label: str                                   # variant, as the table shows it
    dataset: str
    method: str                                  # prompt_method: none | map | memprompt | dcp
    train: tuple[str, float]                     # training (and validation) missing type and ratio
    test_types: tuple[str, ...]
    test_ratios: tuple[float, ...]
    backbone: str = ""                           # "" = the method's paper backbone
    keys: tuple[tuple[str, object], ...] = ()    # ablation keys (run.py key=value)
    tiny_keys: tuple[tuple[str, object], ...] = ()   # --tiny only: what the cell needs on the 2-layer models
    paper: str = ""                              # id in paper_results.csv ("" = the paper gives no number)
    needs: str = ""                              # non-empty: not yet expressible, needs this switch
    note: str = ""
    x: float | None = None                       # value of the swept key (sweep tables)

    @property
    def net(self) -> str:
        return self.backbone or PAPER_BACKBONE[self.method]

    @property
    def id(self) -> str:
        method = self.method + ("" if self.net == PAPER_BACKBONE[self.method] else f"@{self.net}")
        parts = [self.dataset, method, f"train={self.train[0]}{self.train[1]:g}"]
        parts += [f"{k}={_fmt(v)}" for k, v in self.keys if k not in ("missing_ratio.val", "learning_rate")]
        if self.needs:   # no key expresses the variant yet: the label tells the cells apart
            parts.append(re.sub(r"[^A-Za-z0-9.=]+", "_", self.label).strip("_"))
        return "/".join(parts)

    @property
    def scenarios(self) -> list[tuple[str, float]]:
        return [(t, r) for t in self.test_types for r in self.test_ratios]


@dataclass
class Table:
    name: str
    title: str
    kind: str                 # 'table' (one number per cell and scenario), 'figure' (curves), 'sweep' (a key's values)
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    sweep_key: str = ""       # kind 'sweep': the key on the x axis

    @property
    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if not c.needs]


def _cell(label, dataset, method, train, tests=None, **kw) -> Cell:
    """A cell tested at its training setting unless `tests` = (types, ratios)."""
    types, ratios = tests if tests is not None else ((train[0],), (train[1],))
    keys = tuple(kw.pop("keys", ()))
    if method == "memprompt" and dataset == "hatememes" and not any(k == "learning_rate" for k, _ in keys):
        keys += (("learning_rate", 1e-3),)   # MemPrompt's reference config on Hateful Memes
    return Cell(label, dataset, method, train, tuple(types), tuple(float(r) for r in ratios), keys=keys, **kw)


def _dcp_main() -> Table:
    cells = []
    for ds in DATASETS:
        for eta in (0.5, 0.7, 0.9):
            for t in TYPES:
                cells.append(_cell("baseline (CLIP)", ds, "none", (t, eta), backbone="clip"))
                cells.append(_cell("DCP", ds, "dcp", (t, eta), paper=f"dcp/t4/{ds}/test/{t}/{eta * 100:.0f}/dcp"))
    return Table("dcp_main", "DCP Table 4: CLIP ViT-B/16, trained and tested at the same missing setting", "table",
                 cells, notes=["Paper column: DCP's test-split cell of Table 4 (the paper prints no baseline row; its "
                               "other columns are CoOp, MMP, MaPLe and DePT, kept in paper_results.csv).",
                               "baseline (CLIP) = `baseline on_clip`: frozen CLIP, trained head (+ ln_post, ln_final, "
                               "visual proj, as DCP trains them)."])


DCP_ABLATION_SETTING = ("both", 0.7)
ABLATION_NOTE = ("The paper's Tables 1-3 and 8 report the validation split of MM-IMDb; their missing setting is not "
                 "stated (the default row equals Table 4's validation cell at 70 % missing-both), so the cells train "
                 "and validate at 70 % missing-both and Δ compares the paper with our best validation score.")


def _dcp_components() -> Table:
    cells = []
    for corr in (True, False):
        for dyn in (True, False):
            for com in (True, False):
                keys = tuple((k, v) for k, v in (("dcp_correlated", corr), ("dcp_dynamic", dyn), ("dcp_common", com))
                             if not v)
                on = [n for n, v in (("correlated", corr), ("dynamic", dyn), ("common", com)) if v]
                label = "DCP (all on)" if not keys else ("+".join(on) or "none") + " on"
                paper = "dcp/t1/mlp_r16" if not keys else ("dcp/t1/no_projection" if keys == (("dcp_correlated", False),)
                                                          else "")
                note = ("paper row 'No projection' (Table 1); dcp_correlated=False = independent per-layer prompts, "
                        "our definition of 'off'") if paper == "dcp/t1/no_projection" else ""
                cells.append(_cell(label, "mmimdb", "dcp", DCP_ABLATION_SETTING, keys=keys, paper=paper, note=note))
    return Table("dcp_components", "DCP component ablation (correlated / dynamic / modal-common prompts on-off), "
                 "MM-IMDb", "table", cells,
                 notes=[ABLATION_NOTE, "Off = our definitions (README): dcp_correlated=False independent per-layer "
                        "prompts, dcp_dynamic=False no dynamic prompts, dcp_common=False no modal-common prompts. "
                        "The paper prints numbers only for 'all on' and 'No projection'; Fig. 3's Ours (A) / (B) are "
                        "'correlated on' / 'correlated+dynamic on' (table dcp_fig3)."])


def _dcp_depth() -> Table:
    cells = []
    for depth in (1, 3, 6, 9, 12):
        keys = () if depth == 6 else (("prompt_depth", depth),)
        tiny = (("clip_vision_layers", 12), ("clip_text_layers", 12)) if depth > 2 else ()
        paper = f"dcp/t1/depth{depth}" if depth in (3, 6, 12) else ""
        cells.append(_cell(f"prompt_depth={depth}" + (" (default)" if depth == 6 else ""), "mmimdb", "dcp",
                           DCP_ABLATION_SETTING, keys=keys, tiny_keys=tiny, paper=paper, x=depth))
    return Table("dcp_depth", "DCP prompt depth (layers with correlated prompts), MM-IMDb", "sweep", cells,
                 sweep_key="prompt_depth",
                 notes=[ABLATION_NOTE, "Paper: Table 1 'Depth = 3 / 6 / 12'. --tiny gives the 2-layer CLIP towers 12 "
                        "layers for depths above 2."])


def _dcp_length() -> Table:
    cells = []
    for length in (12, 24, 36, 48, 60):
        keys = () if length == 36 else (("prompt_length", length),)
        cells.append(_cell(f"prompt_length={length}" + (" (default)" if length == 36 else ""), "mmimdb", "dcp",
                           DCP_ABLATION_SETTING, keys=keys, paper=f"dcp/t8/len{length}", x=length))
    return Table("dcp_length", "DCP prompt length (Table 8), MM-IMDb", "sweep", cells, sweep_key="prompt_length",
                 notes=["The paper's Table 8 reports the validation split of MM-IMDb at η = 70 % without the missing "
                        "type (its 36-token row equals Table 4's validation cell at 70 % missing-both), so the cells "
                        "train and validate at 70 % missing-both and Δ compares the paper with our best validation "
                        "score."])


def _dcp_design() -> Table:
    """DCP Tables 1-3 rows run with the ablation switches (docs/methods.md §6.7; the readings of the paper's terse
    rows are ours). Their default rows are the all-on cell of dcp_components; the prompt-depth rows are dcp_depth."""
    deep = (("clip_vision_layers", 12), ("clip_text_layers", 12))   # --tiny: 2-layer towers hold depth <= 2
    rows = [("dcp/t1/fc", "correlated prompts: Fc projection", (("dcp_projection", "fc"),)),
            ("dcp/t1/unimodal", "correlated prompts: uni-modal", (("dcp_correlated_inputs", "uni"),)),
            *[(f"dcp/t2/depth{d}", f"dynamic prompts: depth {d}", (("dcp_dynamic_depth", d),)) for d in (2, 3, 6)],
            *[(f"dcp/t2/{p}_proj", f"dynamic prompts: {p} & projection", (("dcp_dynamic_mode", p),))
              for p in ("max", "min", "avg")],
            *[(f"dcp/t3/depth{d}", f"modal-common prompts: depth {d}", (("dcp_common_depth", d),)) for d in (2, 3, 6)],
            ("dcp/t3/fc", "modal-common prompts: Fc projection", (("dcp_common_projection", "fc"),)),
            *[(f"dcp/t3/mlp_r{r}", f"modal-common prompts: MLP r={r}", (("dcp_common_reduction", r),)) for r in (4, 8)]]
    cells = [_cell(label, "mmimdb", "dcp", DCP_ABLATION_SETTING, keys=keys, paper=pid,
                   tiny_keys=deep if any(k.endswith("_depth") and v > 2 for k, v in keys) else ())
             for pid, label, keys in rows]
    return Table("dcp_design", "DCP Tables 1-3: design variants (DCP ablation switches), MM-IMDb", "table", cells,
                 notes=[ABLATION_NOTE, "Each row sets one DCP ablation switch (our reading of the paper's row, README / "
                        "docs/methods.md §6.7). The default rows of Tables 1-3 (MLP r=16, bi-modal, depth 1, "
                        "attention) are the all-on cell of dcp_components, No projection is in dcp_components and "
                        "Depth = 3 / 6 / 12 of Table 1 in dcp_depth. --tiny gives the 2-layer CLIP towers 12 layers "
                        "for dynamic / common depths above 2."])


TABLE5_BUDGETS = ("0.2M", "1.6M", "2.8M", "4.0M", "5.2M", "6.4M")
TABLE5_KEYS = {   # (method, budget) -> (keys, method parameters), chosen once offline (README: "DCP Table 5")
    ("map", "0.2M"): ((("prompt_length", 9),), 207_360),
    ("map", "1.6M"): ((("prompt_length", 69),), 1_589_760),
    ("map", "2.8M"): ((("prompt_length", 122),), 2_810_880),
    ("map", "4.0M"): ((("prompt_length", 174),), 4_008_960),
    ("map", "5.2M"): ((("prompt_length", 226),), 5_207_040),
    ("map", "6.4M"): ((("prompt_length", 278),), 6_405_120),
    ("dcp", "0.2M"): ((("prompt_depth", 1), ("dcp_reduction", 64), ("dcp_common_reduction", 64),
                       ("dcp_dynamic_width", 8)), 194_408),
    ("dcp", "1.6M"): ((("prompt_depth", 4), ("dcp_dynamic_width", 48)), 1_626_592),
    ("dcp", "2.8M"): ((("prompt_depth", 2), ("dcp_dynamic_width", 384)), 2_721_408),
    ("dcp", "4.0M"): ((("prompt_length", 72), ("prompt_depth", 1)), 3_900_128),
    ("dcp", "5.2M"): ((("prompt_length", 72), ("prompt_depth", 5)), 5_155_168),
    ("dcp", "6.4M"): ((("prompt_length", 66), ("prompt_depth", 9)), 6_402_016),
}
"""DCP Table 5 cells: the keys whose method parameters (trainable parameters minus those of `baseline on_clip`,
0.42 M: head + ln_post, ln_final, visual proj, which every method trains) come closest to the budget. MMP = `map
on_clip` with MAP's prompt_layers [0..5], prompt_length searched; DCP 4.0 / 5.2 / 6.4 M: prompt_length in 3..72
(multiples of 3) x prompt_depth 1..12. Below DCP's fewest parameters at full channel width (TABLE5_MIN_DCP) the
channels shrink, as the paper says it does: prompt_length 36, prompt_depth 1..6, one r for dcp_reduction and
dcp_common_reduction (16..256) and dcp_dynamic_width 8..512; of the settings within 3 % of the budget, the smallest r
(widest MLPs), then the deepest prompts, then the widest dynamic attention. Counted on the meta device at full size;
tests/test_reproduce.py rebuilds them."""
TABLE5_MIN_DCP = 3_805_920
"""DCP's fewest method parameters at full channel width (prompt_length 3, prompt_depth 1): the dynamic prompts'
attention alone holds 3.41 M."""


def _dcp_table5() -> Table:
    cells = []
    for method, slug in (("map", "mmp"), ("dcp", "dcp")):
        for budget in TABLE5_BUDGETS:
            label = f"{'MMP' if slug == 'mmp' else 'DCP'} {budget} parameters"
            keys, count = TABLE5_KEYS[(method, budget)]
            tiny: tuple[tuple[str, object], ...] = ()   # --tiny: 2-layer towers hold depth <= 2, text width 32
            if any(k == "prompt_depth" and v > 2 for k, v in keys):
                tiny += (("clip_vision_layers", 12), ("clip_text_layers", 12))
            if any(k == "dcp_common_reduction" for k, _ in keys):
                tiny += (("dcp_common_reduction", 16),)
            cells.append(_cell(label, "mmimdb", method, DCP_ABLATION_SETTING, backbone="clip", keys=keys, tiny_keys=tiny,
                               paper=f"dcp/t5/{slug}/{budget}",
                               note=f"{count / 1e6:.2f} M method parameters (budget {budget[:-1]} M), "
                                    f"{(count + 419_351) / 1e6:.2f} M trainable with head and CLIP's ln/proj"))
    return Table("dcp_table5", "DCP Table 5: DCP vs MMP at matched parameter budgets, MM-IMDb (val)", "table", cells,
                 notes=[ABLATION_NOTE,
                        "Budget = the method's own parameters: trainable parameters minus the 0.42 M that "
                        "`baseline on_clip` trains too (head, ln_post, ln_final, visual proj); our reading, since "
                        "the smallest budget (0.2 M) is below those 0.42 M. MMP = `map on_clip` (MAP's input-level "
                        "prompts on layers 0-5, prompt_length scaled: 3,840 parameters per token); DCP: "
                        "prompt_length (multiple of 3, <= 72) and prompt_depth chosen closest to the budget; below "
                        f"{TABLE5_MIN_DCP / 1e6:.2f} M (DCP's fewest at full channel width) the channel widths shrink "
                        "too (dcp_reduction, dcp_common_reduction, dcp_dynamic_width: our reading of the paper's "
                        "\"reducing channel width\"). The "
                        "note of each cell gives its count. MAP's input prompts accumulate, so the large MMP cells "
                        "run long sequences (6 x prompt_length extra tokens per tower)."])


def _dcp_table6() -> Table:
    cells = [_cell(name, ds, "none" if slug == "baseline" else "dcp", (t, 0.7), backbone="coca",
                   paper=f"dcp/t6/{ds}/{t}/{slug}")
             for ds in DATASETS for t in TYPES for name, slug in (("baseline", "baseline"), ("DCP", "dcp"))]
    return Table("dcp_table6_coca", "DCP Table 6: CoCa ViT-B/32 backbone, 70 % missing, train = test setting",
                 "table", cells,
                 notes=["`on_coca`: open_clip coca_ViT-B-32 (image tower + unimodal text tower, docs/methods.md §5b), "
                        f"weights WEIGHTS/{COCA_WEIGHTS} (coca_path). baseline = `baseline on_coca`: frozen "
                        "CoCa, trained head (+ ln_post, ln_final, visual proj, as DCP trains them).",
                        "Paper split not stated; Δ uses our test split."])


def _dcp_table7() -> Table:
    cells = []
    for ds in DATASETS:
        for t in TYPES:
            cells.append(_cell("MAP (ViLT)", ds, "map", (t, 0.7), paper=f"dcp/t7/{ds}/{t}/mmp"))
            cells.append(_cell("DCP on ViLT", ds, "dcp", (t, 0.7), backbone="vilt", paper=f"dcp/t7/{ds}/{t}/dcp"))
    return Table("dcp_table7", "DCP Table 7: MAP vs DCP on ViLT, 70 % missing, train = test setting", "table", cells,
                 notes=["Paper split not stated; Δ uses our test split.",
                        "The paper's 'MMP' column is probably MAP's own published ViLT numbers (input/attention level "
                        "not confirmed); our MAP row is the `map` preset (input-level prompts)."])


def _dcp_fig3() -> Table:
    variants = [("baseline (CLIP)", "none", "clip", ()),
                ("Ours (A): correlated", "dcp", "", (("dcp_dynamic", False), ("dcp_common", False))),
                ("Ours (B): correlated+dynamic", "dcp", "", (("dcp_common", False),)),
                ("Ours (DCP)", "dcp", "", ())]
    cells = [_cell(label, "mmimdb", m, DCP_ABLATION_SETTING, (TYPES, FIG_RATIOS), backbone=bb, keys=keys)
             for label, m, bb, keys in variants]
    return Table("dcp_fig3", "DCP Fig. 3: prompt components across missing rates, MM-IMDb", "figure", cells,
                 notes=["Trained at 70 % missing-both, tested on each missing type at every rate (one sweep). The "
                        "paper's figure is on the validation split and prints no numbers; ours is the test split.",
                        "How the paper trained each point of its curves is not stated."])


def _dcp_fig4() -> Table:
    trains = [("both", 0.3), ("both", 0.5), ("both", 0.7), ("text", 0.7), ("image", 0.7)]
    cells = [_cell(f"DCP trained on {t} {r:.0%}", "mmimdb", "dcp", (t, r), (TYPES, FIG_RATIOS)) for t, r in trains]
    return Table("dcp_fig4", "DCP Fig. 4: generalisation across missing settings, MM-IMDb", "figure", cells,
                 notes=["Each model trained at one setting, tested on every missing type and rate (one sweep). The "
                        "paper's figure is on the validation split and prints no numbers."])


def _dcp_fig5() -> Table:
    keys = (("simulate_missing", True), ("missing_ratio.val", 0.0))
    cells = [_cell(label, "mmimdb", m, ("both", 0.0), (("both",), FIG_RATIOS), backbone=bb, keys=keys)
             for label, m, bb in (("baseline (CLIP)", "none", "clip"), ("MMP (CLIP)", "map", "clip"),
                                  ("Ours (DCP)", "dcp", ""))]
    return Table("dcp_fig5", "DCP Fig. 5: trained on complete data with per-epoch re-drawn missing cases", "figure",
                 cells, notes=["Complete training data (missing_ratio.train=0) with simulate_missing=True: every "
                               "training item's case is re-drawn each epoch, uniformly over complete / text missing / "
                               "image missing, from a hash of (seed, epoch, item) (mdpl.data.missing.simulated_types). "
                               "This is our reading of DCP's rule: the paper does not give the distribution.",
                               "Validation on complete data; tested on missing-both at every rate (one sweep). The "
                               "paper's figure prints no numbers."])


def _map_main() -> Table:
    variants = [("baseline", "none", ()), ("MAP input", "map", ()), ("MAP attention", "map", (("prompt_type", "attention"),))]
    cells = [_cell(label, ds, m, (t, 0.7), keys=keys) for ds in DATASETS for t in TYPES for label, m, keys in variants]
    return Table("map_main", "MAP main table: ViLT, baseline / input-level / attention-level prompts, 70 % missing",
                 "table", cells,
                 notes=["MAP's own result tables were not found; the nine numbers DCP's Table 7 prints as 'MMP' "
                        "(probably MAP's) are compared in dcp_table7.",
                        "Trained and tested at the same missing type at 70 % (MAP's default protocol is missing-both "
                        "70 %)."])


def _map_fig() -> Table:
    variants = [("baseline", "none", ()), ("attention-level", "map", (("prompt_type", "attention"),)),
                ("input-level", "map", ())]
    cells = [_cell(label, ds, m, (t, 0.7), ((t,), FIG_RATIOS), keys=keys)
             for ds in DATASETS for t in TYPES for label, m, keys in variants]
    return Table("map_fig", "MAP robustness figure: 3 datasets x 3 missing types, metric vs missing rate", "figure",
                 cells, notes=["Each panel's models are trained at its missing type at 70 % (the training setting of "
                               "MAP's figure is not given in the sources) and tested at every rate of that type: the "
                               "map_main runs, swept."])


def _memprompt_main() -> Table:
    variants = [("baseline", "none"), ("MAP", "map"), ("MemPrompt", "memprompt")]
    cells = [_cell(label, ds, m, (t, 0.7), (TYPES, (0.7,))) for ds in DATASETS for t in TYPES for label, m in variants]
    return Table("memprompt_main", "MemPrompt main: ViLT, trained on one missing case at 70 %, tested on every case",
                 "table", cells,
                 notes=["MemPrompt's result tables were not found (its abstract gives only averages over unnamed "
                        "scenarios, kept in paper_results.csv).",
                        "MemPrompt on Hateful Memes uses learning_rate=1e-3 (its reference config)."])


MEMPROMPT_SETTING = ("image", 0.7)
MEMPROMPT_TESTS = (TYPES, (0.7,))
MEMPROMPT_NOTE = ("MM-IMDb, trained with the image missing at 70 % (MemPrompt's reference config), tested on every "
                  "missing type at 70 %. MemPrompt's ablation tables were not found: no paper column.")


def _memprompt_ablation() -> Table:
    variants = [("MemPrompt", ()), ("w/o generative prompts", (("gen_prompt_layers", []),)),
                ("w/o shared prompts", (("shared_prompt_layers", []),))]
    cells = [_cell(label, "mmimdb", "memprompt", MEMPROMPT_SETTING, MEMPROMPT_TESTS, keys=keys) for label, keys in variants]
    return Table("memprompt_ablation", "MemPrompt ablation: generative and shared prompts", "table", cells,
                 notes=[MEMPROMPT_NOTE])


def _memprompt_mem_size() -> Table:
    cells = [_cell(f"mem_size={m}" + (" (default)" if m == 16 else ""), "mmimdb", "memprompt", MEMPROMPT_SETTING,
                   MEMPROMPT_TESTS, keys=() if m == 16 else (("mem_size", m),), x=m) for m in (8, 16, 32, 64)]
    return Table("memprompt_mem_size", "MemPrompt prompt-memory size", "sweep", cells, sweep_key="mem_size",
                 notes=[MEMPROMPT_NOTE + " top_k stays 5 (2 with --tiny)."])


def _memprompt_top_k() -> Table:
    cells = [_cell(f"top_k={k}" + (" (default)" if k == 5 else ""), "mmimdb", "memprompt", MEMPROMPT_SETTING,
                   MEMPROMPT_TESTS, keys=() if k == 5 else (("mem_size", 16), ("top_k", k)), x=k) for k in (1, 3, 5, 8)]
    return Table("memprompt_top_k", "MemPrompt retrieved prompts (top_k of 16)", "sweep", cells, sweep_key="top_k",
                 notes=[MEMPROMPT_NOTE + " mem_size=16 is set explicitly (the paper value) so that --tiny keeps "
                        "top_k <= mem_size; the default row has no keys (mem_size 4, top_k 2 with --tiny)."])


def build_tables() -> dict[str, Table]:
    tables = [_dcp_main(), _dcp_components(), _dcp_depth(), _dcp_length(), _dcp_design(), _dcp_table5(),
              _dcp_table6(), _dcp_table7(), _dcp_fig3(), _dcp_fig4(), _dcp_fig5(), _map_main(), _map_fig(),
              _memprompt_main(), _memprompt_ablation(), _memprompt_mem_size(), _memprompt_top_k()]
    return {t.name: t for t in tables}


TABLES = build_tables()


# --------------------------------------------------------------------------------------------- commands
@dataclass
class Context:
    out: Path
    data_root: str = ""
    weights: str = ""
    tokenizer: str = ""
    tiny: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    sets: tuple[tuple[str, str], ...] = ()

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def tiny_data(self) -> Path:
        return self.out / "tiny_data"


def _fmt(value) -> str:
    """A value as run.py's Sacred CLI reads it back (lists without spaces, floats in shortest form)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def named_configs(cell: Cell, tiny: bool) -> list[str]:
    named = [f"task_finetune_{cell.dataset}", PRESET[cell.method]]
    if cell.net != PAPER_BACKBONE[cell.method]:
        named.append(f"on_{cell.net}")
    return named + (["tiny"] if tiny else [])   # `tiny` goes after the task config


def experiment_keys(cell: Cell, ctx: Context) -> list[tuple[str, object]]:
    """The keys that define what the run computes (its identity), in command order."""
    t, r = cell.train
    keys: dict[str, object] = {}
    for split in ("train", "val", "test"):
        keys[f"missing_type.{split}"] = t
    for split in ("train", "val", "test"):
        keys[f"missing_ratio.{split}"] = float(r)
    keys.update(cell.keys)
    if ctx.tiny:
        keys.update(cell.tiny_keys)
    keys.update(ctx.sets)
    return list(keys.items())


def run_key(cell: Cell, ctx: Context) -> str:
    """Folder name of the run: readable settings + a hash of everything that defines the run (seed excluded)."""
    identity = named_configs(cell, ctx.tiny) + [f"{k}={_fmt(v)}" for k, v in experiment_keys(cell, ctx)
                                                if k not in RESOURCE_KEYS]
    digest = hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    extra = "-".join(f"{k}={_fmt(v)}" for k, v in cell.keys if k != "learning_rate")
    slug = "-".join(p for p in (cell.dataset, cell.method + ("" if cell.net == PAPER_BACKBONE[cell.method]
                                                             else f"@{cell.net}"),
                                f"{cell.train[0]}{cell.train[1]:g}", extra) if p)
    slug = re.sub(r"[^A-Za-z0-9._@=-]+", "_", slug)[:90]
    return f"{slug}-{digest}"


def path_keys(cell: Cell, ctx: Context) -> list[tuple[str, object]]:
    """data_root and the pre-trained weights (real data) or the synthetic data (--tiny)."""
    if ctx.tiny:
        keys = [("data_root", ctx.tiny_data / cell.dataset / "arrow")]
        if cell.net == "vilt":
            keys += [("tokenizer", ctx.tiny_data / "tok"), ("vocab_size", tiny_vocab_size())]
        return keys
    data = Path(ctx.data_root or "DATA_ROOT")
    weights = Path(ctx.weights or "WEIGHTS")
    keys = [("data_root", data / cell.dataset)]
    if cell.net == "vilt":
        keys += [("load_path", weights / VILT_WEIGHTS), ("tokenizer", ctx.tokenizer or weights / TOKENIZER_DIR)]
    elif cell.net == "coca":
        keys += [("coca_path", weights / COCA_WEIGHTS)]
    else:
        keys += [("clip_path", weights / CLIP_WEIGHTS)]
    return keys


def tiny_vocab_size() -> int:
    """Size of the synthetic WordPiece vocabulary (special tokens + the synthetic words)."""
    from mdpl.data.synthetic import SPECIAL_TOKENS, SYNTHETIC_WORDS
    return len(SPECIAL_TOKENS) + len(SYNTHETIC_WORDS)


def scenario_union(ctx: Context) -> dict[str, tuple[list[str], list[float]]]:
    """run key -> (test types, test ratios) swept by its run: the union over every runnable cell of every table."""
    union: dict[str, tuple[set, set]] = {}
    for table in TABLES.values():
        for cell in table.runnable:
            types, ratios = union.setdefault(run_key(cell, ctx), (set(), set()))
            types.update(cell.test_types)
            ratios.update(cell.test_ratios)
    return {k: ([t for t in TYPES if t in ts], sorted(rs)) for k, (ts, rs) in union.items()}


def seed_dir(cell: Cell, ctx: Context, seed: int) -> Path:
    return ctx.runs / run_key(cell, ctx) / f"seed{seed}"


def train_command(cell: Cell, ctx: Context, seed: int, sweep: tuple[list[str], list[float]],
                  resume: bool = False) -> list[str]:
    keys = experiment_keys(cell, ctx) + path_keys(cell, ctx)
    keys += [("seed", seed), ("log_dir", seed_dir(cell, ctx, seed)), ("test_types", sweep[0]),
             ("test_ratios", sweep[1])]
    if resume:
        keys.append(("resume", True))
    return ["python", "run.py", "with", *named_configs(cell, ctx.tiny), *(f"{k}={_fmt(v)}" for k, v in keys)]


def eval_command(cell: Cell, ctx: Context, seed: int, sweep: tuple[list[str], list[float]], checkpoint: str) -> list[str]:
    keys = experiment_keys(cell, ctx) + path_keys(cell, ctx)
    keys = [(k, checkpoint if k == "load_path" else v) for k, v in keys]
    if not any(k == "load_path" for k, _ in keys):
        keys.append(("load_path", checkpoint))
    keys += [("seed", seed), ("test_only", True), ("log_dir", seed_dir(cell, ctx, seed) / "eval"),
             ("test_types", sweep[0]), ("test_ratios", sweep[1])]
    return ["python", "run.py", "with", *named_configs(cell, ctx.tiny), *(f"{k}={_fmt(v)}" for k, v in keys)]


# ------------------------------------------------------------------------------------------ run outputs
@dataclass
class Result:
    run_dir: Path
    scenarios: dict[tuple[str, float], float]   # (type, ratio) -> primary metric (0-1)
    val_best: float | None


def _read_results(run_dir: Path, dataset: str) -> dict[tuple[str, float], float]:
    out = {}
    try:
        with open(run_dir / "results.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                metric = METRIC[dataset] if METRIC[dataset] in row else list(row)[7]
                out[(row["type"], round(float(row["ratio"]), 6))] = float(row[metric])
    except (OSError, KeyError, ValueError, IndexError):
        return {}
    return out


def _training_dir(run_dir: Path) -> Path:
    """The training run a result belongs to: the run directory of the checkpoint its test used."""
    try:
        checkpoint = json.loads((run_dir / "test_metrics.json").read_text()).get("checkpoint")
    except (OSError, ValueError):
        checkpoint = None
    return Path(checkpoint).parents[1] if checkpoint else run_dir


def _val_best(train_dir: Path) -> float | None:
    """The best `val/the_metric` the training run logged (the score its best checkpoint was chosen by)."""
    values = []
    for path in sorted(train_dir.glob("csv/**/metrics.csv")):
        try:
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    value = row.get("val/the_metric") or ""
                    if value and not math.isnan(float(value)):
                        values.append(float(value))
        except (OSError, ValueError):
            continue
    return max(values) if values else None


def _versions(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/version_*"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []


def find_result(cell: Cell, ctx: Context, seed: int) -> Result | None:
    """The newest run (training or re-evaluation) of the cell's run and seed whose results cover its scenarios."""
    base = seed_dir(cell, ctx, seed)
    need = {(t, round(r, 6)) for t, r in cell.scenarios}
    for run_dir in reversed(_versions(base) + _versions(base / "eval")):
        if not (run_dir / "test_metrics.json").is_file():
            continue
        scenarios = _read_results(run_dir, cell.dataset)
        if need <= set(scenarios):
            return Result(run_dir, scenarios, _val_best(_training_dir(run_dir)))
    return None


def training_state(cell: Cell, ctx: Context, seed: int) -> tuple[str, str]:
    """('trained', best checkpoint) | ('resume', last.ckpt) | ('new', '') for a cell without a result."""
    versions = _versions(seed_dir(cell, ctx, seed))
    for run_dir in reversed(versions):
        metrics = run_dir / "test_metrics.json"
        if metrics.is_file():
            try:
                checkpoint = json.loads(metrics.read_text()).get("checkpoint")
            except (OSError, ValueError, AttributeError):
                continue   # damaged: not a finished run's record; its last.ckpt resumes (and re-tests) below
            checkpoint = checkpoint or str(run_dir / "checkpoints" / "last.ckpt")
            if Path(checkpoint).is_file():
                return "trained", checkpoint
    if any((v / "checkpoints" / "last.ckpt").is_file() for v in versions):
        return "resume", str(next(v for v in reversed(versions) if (v / "checkpoints" / "last.ckpt").is_file()))
    return "new", ""


# -------------------------------------------------------------------------------------------- execution
def select_cells(table: Table, shard: tuple[int, int] | None) -> list[Cell]:
    """The runnable cells of shard i of n (round robin over the table's runnable cells, 1-based)."""
    cells = table.runnable
    if shard is None:
        return cells
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i - 1]


def prepare_tiny_data(ctx: Context, datasets: Iterable[str]) -> None:
    """Synthetic raw data -> arrow files (+ a WordPiece vocabulary) under OUT/tiny_data, once."""
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
    from mdpl.data.writers import make_arrow

    vocab = ctx.tiny_data / "tok" / "vocab.txt"
    if not vocab.is_file():
        write_wordpiece_vocab(vocab)
    for ds in sorted(set(datasets)):
        arrow = ctx.tiny_data / ds / "arrow"
        if all((arrow / f"{stem}.arrow").is_file() for stem in ARROW_STEMS[ds]):
            continue
        n_train, n_val, n_test = TINY_SAMPLES[ds]
        write_synthetic(ds, ctx.tiny_data / ds / "raw", n_train, n_val, n_test, seed=0)
        make_arrow(ds, ctx.tiny_data / ds / "raw", arrow, progress=False, overwrite=True)


def check_inputs(cells: Sequence[Cell], ctx: Context) -> list[str]:
    """Missing data folders / weight files for a real run (one line each)."""
    problems = []
    for path in sorted({str(v) for c in cells for k, v in path_keys(c, ctx)
                        if k in ("data_root", "load_path", "clip_path", "coca_path", "tokenizer")}):
        if not Path(path).exists():
            problems.append(f"missing: {path}")
    return problems


def _shell(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def run_one(cmd: list[str], log: Path) -> int:
    """Run `cmd` (python run.py ...) from the repository root, appending its output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / "run.py"), *cmd[2:]]
    with open(log, "a") as fh:
        fh.write(f"\n$ {_shell(cmd)}\n")
        fh.flush()
        return subprocess.run(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def execute(table: Table, ctx: Context, shard: tuple[int, int] | None, dry_run: bool, jobs: int = 1) -> int:
    """Run (or, dry run, print) every (cell, seed) of the shard that has no result yet, `jobs` at a time.
    Returns the number of failed runs."""
    union = scenario_union(ctx)
    cells = select_cells(table, shard)
    if shard is None or shard[0] == 1:
        for cell in table.cells:
            if cell.needs:
                print(f"# skip {table.name} {cell.id} [{cell.label}]: not yet expressible: needs {cell.needs}")
    if not dry_run and ctx.tiny and cells:
        prepare_tiny_data(ctx, [c.dataset for c in cells])
    if not dry_run and not ctx.tiny:
        problems = check_inputs(cells, ctx)
        if problems:
            print("error: " + "; ".join(problems), file=sys.stderr)
            return len(cells) * len(ctx.seeds)
    work = []
    for cell in cells:
        sweep = union[run_key(cell, ctx)]
        for seed in ctx.seeds:
            found = find_result(cell, ctx, seed)
            if found is not None:
                print(f"# skip {table.name} {cell.id} seed {seed}: done ({found.run_dir})")
                continue
            state, path = training_state(cell, ctx, seed)
            if state == "trained":
                cmd, log = eval_command(cell, ctx, seed, sweep, path), seed_dir(cell, ctx, seed) / "eval.log"
            else:
                cmd = train_command(cell, ctx, seed, sweep, resume=state == "resume")
                log = seed_dir(cell, ctx, seed) / "train.log"
            if dry_run:
                print(f"# {table.name} {cell.id} [{cell.label}] seed {seed}")
                print(_shell(cmd))
            else:
                work.append((cell, seed, state, cmd, log))
    lock = threading.Lock()

    def one(item) -> bool:
        cell, seed, state, cmd, log = item
        verb = {"trained": "evaluating", "resume": "resuming"}.get(state, "training")
        with lock:
            print(f"[reproduce] {table.name} {cell.id} [{cell.label}] seed {seed}: {verb} ...", flush=True)
        started = time.perf_counter()
        rc = run_one(cmd, log)
        ok = rc == 0 and find_result(cell, ctx, seed) is not None
        with lock:
            if ok:
                print(f"[reproduce]   {cell.id} seed {seed}: done in {time.perf_counter() - started:.0f} s", flush=True)
            else:
                print(f"[reproduce]   {cell.id} seed {seed}: FAILED (exit {rc}; log {log}):\n{_tail(log)}",
                      file=sys.stderr, flush=True)
        return ok

    if jobs <= 1:
        outcomes = [one(item) for item in work]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = list(pool.map(one, work))
    return outcomes.count(False)


# ----------------------------------------------------------------------------------------------- report
def load_paper(path: Path = PAPER_CSV) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def collect(table: Table, ctx: Context, paper: dict[str, dict]) -> list[dict]:
    """One row per (cell, test scenario): ours (x100, mean ± std over the seeds found), paper, difference."""
    rows = []
    for index, cell in enumerate(table.cells, 1):
        results = {} if cell.needs else {s: find_result(cell, ctx, s) for s in ctx.seeds}
        done = sorted(s for s, r in results.items() if r is not None)
        ref = paper.get(cell.paper) if cell.paper else None
        if cell.paper and ref is None:
            raise KeyError(f"{table.name} {cell.id}: paper id {cell.paper!r} not in {PAPER_CSV.name}")
        vals = [100 * results[s].val_best for s in done if results[s].val_best is not None]
        val_mean, val_std = _mean_std(vals)
        status = (f"not yet expressible: needs {cell.needs}" if cell.needs else
                  "done" if len(done) == len(ctx.seeds) else f"{len(done)}/{len(ctx.seeds)} seeds" if done else "pending")
        for t, r in cell.scenarios:
            ours = [100 * results[s].scenarios[(t, round(r, 6))] for s in done]
            mean, std = _mean_std(ours)
            paper_value = float(ref["value"]) if ref else None
            split = (ref.get("split") or "not stated") if ref else ""
            basis = val_mean if split == "val" else mean
            diff = basis - paper_value if basis is not None and paper_value is not None else None
            rows.append({
                "table": table.name, "index": index, "cell": cell.id, "label": cell.label, "dataset": cell.dataset,
                "metric": METRIC_LABEL[cell.dataset], "method": cell.method, "backbone": cell.net,
                "keys": " ".join(f"{k}={_fmt(v)}" for k, v in cell.keys), "x": "" if cell.x is None else cell.x,
                "train_type": cell.train[0], "train_ratio": cell.train[1], "test_type": t, "test_ratio": r,
                "seeds": " ".join(map(str, done)), "n": len(done),
                "ours_mean": _num(mean), "ours_std": _num(std) if done else "",
                "ours_val_best_mean": _num(val_mean) if (t, r) == cell.scenarios[0] else "",
                "ours_val_best_std": _num(val_std) if (t, r) == cell.scenarios[0] else "",
                "paper": ref["value"] if ref else "", "paper_split": split, "paper_id": cell.paper,
                "diff": _num(diff), "diff_basis": ("val (best)" if split == "val" else "test") if ref else "",
                "status": status, "note": cell.note,
            })
    return rows


def _md_cell_train(row: dict) -> str:
    return "complete" if row["train_ratio"] == 0 else f"{row['train_type']} {100 * row['train_ratio']:g}%"


def markdown(table: Table, rows: list[dict], ctx: Context, plot_note: str) -> str:
    lines = [f"# {table.name}: {table.title}", ""]
    lines += [f"- {n}" for n in table.notes]
    lines += [f"- Seeds {','.join(map(str, ctx.seeds))}; ours = mean ± std (sample std) over the seeds done, ×100; "
              "Δ = ours − paper, on the paper's split (test, or our best validation score where the paper reports "
              "the validation split)." + (" **--tiny: synthetic data, tiny models: the numbers only show that the "
                                          "pipeline runs.**" if ctx.tiny else "")]
    if plot_note:
        lines.append(f"- {plot_note}")
    lines.append("")
    if table.kind == "figure":
        ratios = sorted({r["test_ratio"] for r in rows})
        lines.append("| # | cell | train | test type | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " | status |")
        lines.append("|---|---|---|---|" + "---:|" * len(ratios) + "---|")
        groups: dict[tuple, dict] = {}
        for row in rows:
            groups.setdefault((row["index"], row["test_type"]), {})[row["test_ratio"]] = row
        for (index, t), by_ratio in groups.items():
            first = next(iter(by_ratio.values()))
            cells = [_pm(_f(by_ratio[r]["ours_mean"]), _f(by_ratio[r]["ours_std"]), by_ratio[r]["n"])
                     if r in by_ratio else "" for r in ratios]
            lines.append(f"| {index} | {first['label']} ({first['dataset']}) | {_md_cell_train(first)} | {t} | "
                         + " | ".join(cells) + f" | {first['status']} |")
    else:
        lines.append("| # | cell | dataset | metric | train | test | ours (test) | ours (val, best) | paper | "
                     "paper split | Δ | status |")
        lines.append("|---|---|---|---|---|---|---:|---:|---:|---|---:|---|")
        for row in rows:
            test = f"{row['test_type']} {100 * row['test_ratio']:g}%"
            lines.append(
                f"| {row['index']} | {row['label']} | {row['dataset']} | {row['metric']} | {_md_cell_train(row)} | "
                f"{test} | {_pm(_f(row['ours_mean']), _f(row['ours_std']), row['n'])} | "
                f"{_pm(_f(row['ours_val_best_mean']), _f(row['ours_val_best_std']), row['n'])} | {row['paper']} | "
                f"{row['paper_split']} | {_signed(row['diff'])} | {row['status']} |")
    lines.append("")
    lines.append("Cells: " + ", ".join(f"{i}. `{c.id}`" for i, c in enumerate(table.cells, 1)))
    return "\n".join(lines) + "\n"


def _signed(text: str) -> str:
    return "" if text == "" else f"{float(text):+.2f}"


def _f(text) -> float | None:
    return None if text in ("", None) else float(text)


def plot(table: Table, rows: list[dict], path: Path) -> str:
    """One figure for the table; returns a note for the markdown ('' when written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not importable."
    if table.kind == "figure":
        panels = sorted({(r["dataset"], r["test_type"]) for r in rows},
                        key=lambda p: (DATASETS.index(p[0]), TYPES.index(p[1])))
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (ds, t) in zip(axes.flat, panels):
            by_cell: dict[str, list[dict]] = {}
            for r in rows:
                if (r["dataset"], r["test_type"]) == (ds, t):
                    by_cell.setdefault(f"{r['label']}", []).append(r)
            for label, rs in by_cell.items():
                rs = [r for r in sorted(rs, key=lambda r: r["test_ratio"]) if r["ours_mean"] != ""]
                if rs:
                    ax.errorbar([100 * r["test_ratio"] for r in rs], [float(r["ours_mean"]) for r in rs],
                                yerr=[float(r["ours_std"] or 0) for r in rs], marker="o", capsize=2, label=label)
            ax.set_title(f"{ds}: missing {t}")
            ax.set_xlabel("missing rate (%)")
            ax.set_ylabel(METRIC_LABEL[ds] + " (×100)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
    elif table.kind == "sweep":
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for t in TYPES:
            rs = sorted((r for r in rows if r["test_type"] == t), key=lambda r: float(r["x"]))
            done = [r for r in rs if r["ours_mean"] != ""]
            if done:
                ax.errorbar([float(r["x"]) for r in done], [float(r["ours_mean"]) for r in done],
                            yerr=[float(r["ours_std"] or 0) for r in done], marker="o", capsize=2, label=f"ours, test {t}")
            val = [r for r in rs if r["ours_val_best_mean"] != ""]
            if val and any(r["paper_split"] == "val" for r in rs):
                ax.errorbar([float(r["x"]) for r in val], [float(r["ours_val_best_mean"]) for r in val],
                            yerr=[float(r["ours_val_best_std"] or 0) for r in val], marker="s", ls="--", capsize=2,
                            label="ours, val (best)")
        papers = [r for r in rows if r["paper"] != ""]
        if papers:
            seen = {}
            for r in papers:
                seen[float(r["x"])] = float(r["paper"])
            split = papers[0]["paper_split"]
            ax.plot(list(seen), list(seen.values()), "k*", ms=10, label=f"paper ({split})")
        ax.set_xlabel(table.sweep_key)
        ax.set_ylabel(f"{rows[0]['metric']} (×100)")
        ax.legend(fontsize=7)
        ax.set_title(table.name)
    else:
        labels = [f"{r['index']}. {r['label']} | {r['dataset']} {r['train_type']}{100 * r['train_ratio']:g}"
                  f"→{r['test_type']}{100 * r['test_ratio']:g}" for r in rows]
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * len(rows)))
        ys = list(range(len(rows)))[::-1]
        ours = [float(r["ours_mean"]) if r["ours_mean"] != "" else math.nan for r in rows]
        errs = [float(r["ours_std"]) if r["ours_std"] != "" else 0.0 for r in rows]
        ax.barh(ys, [0 if math.isnan(v) else v for v in ours], xerr=errs, color="tab:blue", alpha=0.7,
                label="ours (test)")
        val = [(y, float(r["ours_val_best_mean"])) for y, r in zip(ys, rows)
               if r["paper_split"] == "val" and r["ours_val_best_mean"] != ""]
        if val:
            ax.plot([v for _, v in val], [y for y, _ in val], "o", color="tab:orange", ms=4, label="ours (val, best)")
        px = [(y, float(r["paper"])) for y, r in zip(ys, rows) if r["paper"] != ""]
        if px:
            ax.plot([v for _, v in px], [y for y, _ in px], "k|", ms=12, mew=2, label="paper")
        ax.set_yticks(ys, labels, fontsize=6)
        ax.set_xlabel("metric (×100)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(table.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


REPORT_COLUMNS = ["table", "index", "cell", "label", "dataset", "metric", "method", "backbone", "keys", "x",
                  "train_type", "train_ratio", "test_type", "test_ratio", "seeds", "n", "ours_mean", "ours_std",
                  "ours_val_best_mean", "ours_val_best_std", "paper", "paper_split", "paper_id", "diff", "diff_basis",
                  "status", "note"]


def write_report(table: Table, ctx: Context) -> dict[str, Path]:
    rows = collect(table, ctx, load_paper())
    ctx.out.mkdir(parents=True, exist_ok=True)
    paths = {"md": ctx.out / f"{table.name}.md", "csv": ctx.out / f"{table.name}.csv", "png": ctx.out / f"{table.name}.png"}
    note = plot(table, rows, paths["png"]) if any(r["ours_mean"] != "" or r["paper"] != "" for r in rows) \
        else "Plot skipped: no results and no paper numbers yet."
    if note:
        paths.pop("png")
    import io
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(paths["csv"], buf.getvalue())
    _write_atomic(paths["md"], markdown(table, rows, ctx, note))
    return paths


# --------------------------------------------------------------------------------------------- estimate
def _dataset_sizes(ctx: Context, dataset: str) -> tuple[tuple[int, int, int], str]:
    """(train, val, test) items: counted in the arrow files under --data-root when present, else nominal."""
    folder = Path(ctx.data_root) / dataset if ctx.data_root else None
    if folder and all((folder / f"{s}.arrow").is_file() for s in ARROW_STEMS[dataset]):
        import pyarrow as pa
        counts = []
        for stem in ARROW_STEMS[dataset]:
            try:
                with pa.memory_map(str(folder / f"{stem}.arrow")) as source:
                    counts.append(pa.ipc.open_file(source).read_all().num_rows)
            except (OSError, pa.ArrowException) as err:
                raise InputError(f"--data-root: {folder / f'{stem}.arrow'} cannot be read as an Arrow file ({err}); "
                                 f"rebuild it with make_arrow.py") from None
        return (counts[0], counts[1], counts[2]), "counted"
    return NOMINAL_SIZES[dataset], "nominal"


class InputError(ValueError):
    """A damaged or unreadable input file named on the command line: one ``error:`` line, exit status 2."""


def _bench_rows(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"--bench {path}: not a readable scripts/bench.py --json file ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"--bench {path}: not a scripts/bench.py --json file (no rows)")
    return [r for r in data.get("rows", []) if r.get("status") == "ok" and r.get("train_samples_per_s")]


H100_BF16_PEAK_TFLOPS = 989.0
"""H100 SXM dense bf16 peak (TFLOP/s), the default of --peak-tflops for the FLOP-based estimate (--assume-mfu)."""


def run_hours(cell: Cell, ctx: Context, bench: list[dict], precision: str, scenarios: int,
              mfu: float | None = None, peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> float | None:
    """Device-hours of one training run + its sweep from scripts/bench.py rows (None: no bench row fits).

    epochs x train items / train samples/s + validations x val items / eval samples/s + scenarios x test items /
    eval samples/s, with the task's max_epoch and val_check_interval (validations = epochs x floor(1 / interval)).
    With `mfu`: the same sample passes x the bench's counted FLOPs per sample (train_gflops_per_sample /
    eval_gflops_per_sample, FlopCounterMode at full size: they do not depend on the device, so a CPU bench serves)
    / (peak_tflops x mfu); rows of any precision serve, those of `precision` first.
    A method/backbone pair bench.py does not time (e.g. DCP on ViLT) takes the slowest (most FLOPs) row of its
    backbone. The rows are at each method's default sizes: cells that widen a method (longer prompts, deeper
    prompting, dcp_table5's MMP cells) cost more than this estimate.
    """
    (n_train, n_val, n_test), _ = _dataset_sizes(ctx, cell.dataset)
    epochs, interval = TASK_RUN[cell.dataset]
    validations = epochs * math.floor(1 / interval)
    rows = [r for r in bench if r.get("dataset") == cell.dataset and r.get("backbone") == cell.net]
    if mfu is None:
        rows = [r for r in rows if r.get("precision") == precision]
        pick = [r for r in rows if r.get("method") == cell.method] or sorted(rows, key=lambda r: r["train_samples_per_s"])
        if not pick:
            return None
        train, evaluate = pick[0]["train_samples_per_s"], pick[0]["eval_samples_per_s"]
        seconds = epochs * n_train / train + validations * n_val / evaluate + scenarios * n_test / evaluate
        return seconds / 3600
    rows = sorted((r for r in rows if r.get("train_gflops_per_sample") and r.get("eval_gflops_per_sample")),
                  key=lambda r: r.get("precision") != precision)
    pick = [r for r in rows if r.get("method") == cell.method] or sorted(rows, key=lambda r: -r["train_gflops_per_sample"])
    if not pick:
        return None
    flops = 1e9 * (epochs * n_train * pick[0]["train_gflops_per_sample"]
                   + (validations * n_val + scenarios * n_test) * pick[0]["eval_gflops_per_sample"])
    return flops / (peak_tflops * 1e12 * mfu) / 3600


# -------------------------------------------------------------------------------------------------- CLI
def parse_cells(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"--cells {text!r}: give i/N with 1 <= i <= N, e.g. 3/16")
    return int(match.group(1)), int(match.group(2))


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give distinct integers, e.g. 0,1,2")
    return seeds


DRIVER_KEYS = frozenset({"seed", "log_dir", "test_types", "test_ratios", "test_type", "test_ratio", "test_only",
                         "resume", "resume_from", "data_root", "load_path", "clip_path", "coca_path", "tokenizer",
                         "vocab_size", "prompt_method", "backbone", "dataset", "exp_name"})
"""Keys the driver sets itself (or that the cell's named configs decide): --set may not change them."""


def parse_set(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: give key=value, e.g. per_gpu_batchsize=32")
    if key.split(".")[0] in DRIVER_KEYS or key.startswith(("missing_type", "missing_ratio")):
        raise argparse.ArgumentTypeError(f"--set {key}: set by the table's cells or by reproduce.py itself "
                                         "(--data-root, --weights, --tokenizer, --seeds)")
    return key, value


def parse_jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs {text!r}: give a positive integer")
    return int(text)


def print_list(tables: Sequence[Table], ctx: Context, detail: bool, bench: list[dict] | None, precision: str,
               mfu: float | None = None, peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> None:
    """The tables: cells, runnable cells, not-yet-expressible cells, training runs (per seed; 'new' = not already
    needed by a table listed above it) and, with --bench, device-hours per seed of the table's runs (measured
    samples/s, or with `mfu` counted FLOPs / (peak_tflops x mfu))."""
    union = scenario_union(ctx)
    seen: dict[str, float | None] = {}
    print(f"{'table':<20} {'kind':<7} {'cells':>5} {'runnable':>8} {'not yet':>7} {'runs':>5} {'new':>4}"
          f"{'  h/seed':>9}  title")
    for table in tables:
        keys = {run_key(c, ctx): c for c in table.runnable}
        hours: dict[str, float | None] = {}
        if bench is not None:
            for key, cell in keys.items():
                hours[key] = run_hours(cell, ctx, bench, precision, len(union[key][0]) * len(union[key][1]),
                                       mfu, peak_tflops)
        new = [k for k in keys if k not in seen]
        seen.update({k: hours.get(k) for k in new})
        total = "" if bench is None else f"{sum(h for h in hours.values() if h is not None):9.1f}"
        print(f"{table.name:<20} {table.kind:<7} {len(table.cells):>5} {len(table.runnable):>8} "
              f"{len(table.cells) - len(table.runnable):>7} {len(keys):>5} {len(new):>4}{total or '':>9}  {table.title}")
        unknown = sorted({f"{c.method}@{c.net}/{c.dataset}" for k, c in keys.items() if hours.get(k, 0) is None})
        if unknown:
            print(f"{'':<20} no bench.py row for {', '.join(unknown)}: not in h/seed")
        if detail:
            runnable = {id(c): k for k, c in enumerate(table.runnable, 1)}
            for index, cell in enumerate(table.cells, 1):
                where = (f"runnable #{runnable[id(cell)]}, run {run_key(cell, ctx)}" if id(cell) in runnable
                         else f"not yet expressible: needs {cell.needs}")
                print(f"  {index:>3}. {cell.id}  [{cell.label}]  {where}")
    if bench is not None and mfu is not None:
        print(f"h/seed: estimate from the bench's counted FLOPs per sample at {peak_tflops:g} TFLOP/s peak x "
              f"{mfu:.0%} assumed MFU (not measured)")
    if len(tables) > 1:
        total = "" if bench is None else f", ~{sum(h for h in seen.values() if h is not None):.1f} device-hours"
        print(f"all listed tables: {len(seen)} distinct training runs per seed{total}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", nargs="?", help="a table name (--list shows them) or 'all'")
    p.add_argument("--data-root", default="", help="folder with one arrow folder per dataset: mmimdb/, food101/, "
                                                   "hatememes/ (make_arrow.py --out)")
    p.add_argument("--weights", default="", help=f"folder with {VILT_WEIGHTS} (ViLT), {CLIP_WEIGHTS} (CLIP) and "
                                                 f"{COCA_WEIGHTS} (CoCa)")
    p.add_argument("--tokenizer", default="", help=f"BERT vocab.txt folder (default: WEIGHTS/{TOKENIZER_DIR})")
    p.add_argument("--out", default="reproduce", help="output folder: runs/, <TABLE>.md/.csv/.png (default: %(default)s)")
    p.add_argument("--seeds", type=parse_seeds, default=(0, 1, 2), help="comma list (default: 0,1,2)")
    p.add_argument("--tiny", action="store_true", help="synthetic data under --out, `tiny` models, CPU")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--cells", type=parse_cells, default=None, metavar="i/N",
                   help="run shard i of N of the table's runnable cells (round robin), e.g. a SLURM array task")
    p.add_argument("--list", action="store_true", help="list the tables (with a table: its cells)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="extra run.py key for every run, e.g. --set per_gpu_batchsize=32 (repeatable)")
    p.add_argument("--jobs", type=parse_jobs, default=1, help="runs at a time (default 1; e.g. 2 for --tiny on 2 cores)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    p.add_argument("--bench", default="", help="with --list: a scripts/bench.py --json file, for device-hours")
    p.add_argument("--precision", default="bf16-mixed", help="with --bench: the bench rows to use (default: %(default)s)")
    p.add_argument("--assume-mfu", type=float, default=None, metavar="F",
                   help="with --bench: hours from the bench's counted FLOPs per sample / (--peak-tflops x F), e.g. "
                        "0.25, instead of its measured samples/s (a CPU bench serves: FLOPs do not depend on the device)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                   help="with --assume-mfu: peak TFLOP/s (default %(default)s: H100 SXM dense bf16)")
    args = p.parse_args(argv)

    def absolute(path: str) -> str:   # runs start in the repository root: relative paths must not change meaning
        return os.path.abspath(path) if path else ""

    ctx = Context(out=Path(absolute(args.out)), data_root=absolute(args.data_root), weights=absolute(args.weights),
                  tokenizer=absolute(args.tokenizer), tiny=args.tiny, seeds=args.seeds, sets=tuple(args.set))
    if args.table in (None, "all"):
        selected = list(TABLES.values())
    elif args.table in TABLES:
        selected = [TABLES[args.table]]
    else:
        p.error(f"unknown table {args.table!r}; choose one of: {', '.join(TABLES)} (or all)")
    if args.list:
        bench = _bench_rows(args.bench) if args.bench else None
        if args.assume_mfu is not None and not (0 < args.assume_mfu <= 1 and args.peak_tflops > 0):
            p.error("--assume-mfu: give a fraction in (0, 1], e.g. 0.25 (and a positive --peak-tflops)")
        print_list(selected, ctx, detail=args.table not in (None, "all"), bench=bench, precision=args.precision,
                   mfu=args.assume_mfu, peak_tflops=args.peak_tflops)
        return 0
    if args.table is None:
        p.error("name a table (or all), or pass --list")
    if not (args.tiny or args.dry_run or args.report_only) and not (args.data_root and args.weights):
        p.error("real runs need --data-root and --weights (or --tiny for synthetic data, --dry-run to print)")
    failures = 0
    for table in selected:
        if not args.report_only:
            failures += execute(table, ctx, args.cells, args.dry_run, args.jobs)
        if not args.dry_run:
            paths = write_report(table, ctx)
            print(f"[reproduce] {table.name}: " + ", ".join(str(v) for v in paths.values()))
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `... --dry-run | head`: no traceback
    try:
        sys.exit(main())
    except InputError as err:
        print(f"reproduce.py: error: {err}", file=sys.stderr)
        sys.exit(2)
