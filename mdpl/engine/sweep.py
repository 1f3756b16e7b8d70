"""Evaluation sweeps: every (missing type, missing ratio) scenario in one pass over the test set.

    python run.py with task_finetune_food101 map load_path=CKPT test_only=True \
        test_types=[text,image,both] test_ratios=[0.1,0.3,0.5,0.7,0.9]

How (docs/methods.md §1.4 missing tables and dummies, §8 metrics):
* The DataModule delivers the *complete* test batch (its test split is overridden by a ratio-0 spec, i.e. no
  dummies), so each batch is read and decoded once.
* For scenario s the batch's missing types are ``missing_table('test', spec_s)[row_index]`` -- the same
  deterministic table a single ``test_type=... test_ratio=...`` run uses -- and the dummies are applied on
  the device with :func:`mdpl.data.missing.apply_missing`; then forward, loss and that scenario's own
  metric collection. The numbers therefore equal those of one ``test_only`` run per scenario exactly.
* Outputs (rank 0) in the run directory: ``results.csv`` (one row per scenario), ``results.md`` (paper-style
  table: rows = missing type, columns = ratio, primary metric x100; plus all metrics) and
  ``robustness_<dataset>.png`` (primary metric vs missing rate, one panel per missing type; ``mdpl.report``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from mdpl.atomic import write_text_atomic
from mdpl.data.missing import MISSING_TYPES, MissingSpec, apply_missing
from mdpl.data.scenarios import sweep_specs, unique
from mdpl.engine.losses import task_loss
from mdpl.engine.metrics import build_task_metrics
from mdpl import report
from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError
from mdpl.prompts.registry import baseline_method

#: Leading columns of results.csv; the metrics (primary first, then the others, then loss) follow.
ID_COLUMNS = ("dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed")


def scenario_tag(spec: MissingSpec) -> str:
    """Log-key part of a scenario, e.g. 'both_r0.7'."""
    return f"{spec.type}_r{spec.ratio:g}"


# ----------------------------------------------------------------------------------------- engine
class MissingSweep(nn.Module):
    """Per-scenario missing tables, dummies and metric collections; driven by MDPLModule's test hooks.

    ``tables`` [S, N] (row_index -> type) and the dummy text are non-persistent buffers (they follow the
    module to its device and never enter checkpoints); metric states are non-persistent too.
    """

    def __init__(self, dataset: str, specs: Sequence[MissingSpec], tables: Sequence[Tensor],
                 dummy_ids: Tensor, dummy_masks: Tensor, metric_inputs: str = "probabilities",
                 primary_metric: str = "") -> None:
        super().__init__()
        if len(specs) != len(tables) or not specs:
            raise ValueError(f"need one missing table per scenario (got {len(specs)} specs, {len(tables)} tables)")
        self.dataset, self.specs = dataset, list(specs)
        self.register_buffer("tables", torch.stack([t.long() for t in tables]), persistent=False)
        self.host_tables = self.tables.clone()   # stays on the host: the rows' types without a device sync
        self.register_buffer("dummy_ids", dummy_ids.reshape(1, -1).clone(), persistent=False)
        self.register_buffer("dummy_masks", dummy_masks.reshape(1, -1).clone(), persistent=False)
        self.metrics = nn.ModuleList([build_task_metrics(dataset, metric_inputs, primary_metric) for _ in self.specs])
        self.losses = nn.ModuleList([MeanMetric() for _ in self.specs])
        self.primary: str = self.metrics[0].primary
        self.results: list[dict[str, float]] = []

    def step(self, model: nn.Module, batch: Mapping) -> None:
        """Evaluate one complete batch under every scenario (dummies applied here, on the batch's device)."""
        types = self.tables[:, batch["row_index"].to(self.tables.device)]          # [S, B]
        host_rows = batch.get("row_index_host")
        host = None if host_rows is None else self.host_tables[:, list(host_rows)].tolist()
        label = batch["label"]
        for i in range(len(self.specs)):
            scenario_batch = apply_missing(batch, types[i], self.dummy_ids, self.dummy_masks,
                                           None if host is None else host[i])
            logits = model(scenario_batch)["logits"]
            loss = task_loss(self.dataset, logits, label)
            self.metrics[i].update(logits.detach(), label)
            self.losses[i].update(loss.detach(), weight=label.shape[0])

    def compute(self) -> list[dict[str, float]]:
        """Metrics (DDP-reduced) + loss of every scenario, in ``specs`` order; resets the states."""
        results = []
        for metrics, loss in zip(self.metrics, self.losses):
            values = {k: float(v) for k, v in metrics.compute().items()} if metrics.has_updates else {}
            ordered = {self.primary: values.pop(self.primary, math.nan), **values}
            ordered["loss"] = float(loss.compute()) if loss.update_called else math.nan
            results.append(ordered)
            metrics.reset()
            loss.reset()
        self.results = results
        return results

    def log_to(self, module) -> None:
        """compute() and log every scenario as ``{dataset}/test/<type>_r<ratio>/<metric>`` (LightningModule.log)."""
        for spec, values in zip(self.specs, self.compute()):
            for name, value in values.items():
                module.log(f"{self.dataset}/test/{scenario_tag(spec)}/{name}", value)


def prepare_sweep(datamodule, config: RunConfig | Mapping) -> MissingSweep | None:
    """The evaluation sweep of `config` (hand it to ``MDPLModule(..., sweep=)``), with ``datamodule`` set to deliver
    complete test batches; None if no sweep is configured.

    The scenario tables are ``datamodule.missing_table('test', spec)`` (deterministic, cached like the
    single-scenario ones), the dummies ``datamodule.dummy_text()``.
    """
    run = RunConfig.coerce(config)
    specs = sweep_specs(run.missing, int(run.experiment.seed))
    if specs is None:
        return None
    for name in ("missing_table", "set_missing_override", "dummy_text"):
        if not hasattr(datamodule, name):
            raise ValueError(f"test_types/test_ratios need the mdpl DataModule ({type(datamodule).__name__} lacks {name})")
    tables = [datamodule.missing_table("test", spec) for spec in specs]
    complete = MissingSpec("both", 0.0, float(run.missing.both_ratio), int(run.experiment.seed))
    datamodule.set_missing_override("test", complete)   # ratio 0 -> all rows complete, no dummies
    ids, masks = datamodule.dummy_text()
    sweep = MissingSweep(run.data.dataset, specs, tables, ids, masks, run.trainer.metric_inputs,
                         run.trainer.primary_metric)
    print(f"[mdpl] evaluation sweep: {len(specs)} scenarios ({_describe(specs)}) in one pass over the test set")
    return sweep


def _describe(specs: Sequence[MissingSpec]) -> str:
    types = unique([s.type for s in specs])
    ratios = unique([s.ratio for s in specs])
    return f"types {types} x ratios {ratios}"


# ---------------------------------------------------------------------------------------- outputs
def result_rows(sweep: MissingSweep, config: RunConfig | Mapping, checkpoint: str | None) -> list[dict]:
    """One dict per scenario: ID_COLUMNS then every metric (primary first) and loss."""
    run = RunConfig.coerce(config)
    ident = {"dataset": run.data.dataset, "method": run.experiment.prompt_method or baseline_method(),
             "backbone": run.experiment.backbone, "checkpoint": checkpoint or ""}
    return [{**ident, "type": spec.type, "ratio": spec.ratio, "seed": int(run.experiment.seed), **values}
            for spec, values in zip(sweep.specs, sweep.results)]


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def markdown_table(rows: Sequence[Mapping], primary: str) -> str:
    """Paper-style table (rows = missing type, columns = missing rate, ``primary`` x 100) + the full table."""
    import pandas as pd

    frame = pd.DataFrame(list(rows)).astype({"ratio": float})
    grid = frame.pivot(index="type", columns="ratio", values=primary).reindex(   # types in sweep order
        index=frame["type"].unique(), columns=sorted(frame["ratio"].unique()))
    first = rows[0]
    lines = [f"## {first['dataset']} — {first['method']} ({first['backbone']}), seed {first['seed']}", "",
             f"checkpoint: `{first['checkpoint']}`", "", f"{primary} (×100) by missing type and missing rate:", ""]
    lines += report.markdown_table(["missing type", *(f"{100 * r:g}%" for r in grid.columns)],
                                   ([t, *(_pct(v) for v in values)] for t, values in grid.iterrows()),
                                   "l" + "r" * len(grid.columns))
    metric_names = [k for k in first if k not in ID_COLUMNS]
    header = [f"{m} (×100)" if m != "loss" else "loss" for m in metric_names]
    lines += ["", "All metrics:", ""]
    lines += report.markdown_table(["type", "ratio", *header],
                                   ([r["type"], f"{float(r['ratio']):g}",
                                     *(f"{r[m]:.4f}" if m == "loss" else _pct(r[m]) for m in metric_names)]
                                    for r in rows), "lr" + "r" * len(metric_names))
    return "\n".join(lines) + "\n"


def robustness_curves(rows: Sequence[Mapping], primary: str) -> list[report.Curve]:
    """One panel per missing type, the run's ``primary`` (x100) vs missing rate."""
    first = rows[0]
    curves = []
    for t in unique([r["type"] for r in rows]):
        pts = sorted((float(r["ratio"]), r[primary]) for r in rows if r["type"] == t)
        curves.append(report.Curve(f"missing {t}", f"{first['method']} ({first['backbone']})", [x for x, _ in pts],
                                   [100 * y for _, y in pts], ylabel=f"{primary} (×100)"))
    return curves


def write_outputs(sweep: MissingSweep, config: RunConfig | Mapping, run_dir: str | Path,
                  checkpoint: str | None) -> dict:
    """results.csv, results.md, robustness_<dataset>.png in ``run_dir``; prints the summary.

    Returns ``{"csv", "md", "png": path, "rows": result_rows(...)}``.
    """
    run_dir = Path(run_dir)
    dataset = RunConfig.coerce(config).data.dataset
    rows = result_rows(sweep, config, checkpoint)
    paths = {"csv": report.write_csv(rows, run_dir / "results.csv")}
    table = markdown_table(rows, sweep.primary)
    paths["md"] = run_dir / "results.md"
    write_text_atomic(paths["md"], table)
    first = rows[0]
    paths["png"] = report.plot_robustness(robustness_curves(rows, sweep.primary),
                                          run_dir / f"robustness_{dataset}.png",
                                          f"{first['dataset']}: {first['method']} ({first['backbone']}), seed {first['seed']}")
    print("\n" + table)
    print("[mdpl] sweep results: " + ", ".join(str(p) for p in paths.values()))
    return {**{k: str(v) for k, v in paths.items()}, "rows": rows}
