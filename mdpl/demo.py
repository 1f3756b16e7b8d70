"""Embedded end-to-end demo: `make demo` == `python run.py with demo`.

What it does, on 2 CPU cores in a few minutes, with no download:

1. writes the synthetic Food-101 of :mod:`mdpl.data.synthetic` (classes signalled only by the image or only
   by the text) in its raw layout under ``demo_dir`` unless it is already there, plus a WordPiece vocab, and
   converts it with ``make_arrow.py``;
2. "pre-trains" a tiny ViLT on the *complete* data with everything trainable, so that the frozen backbone of
   the prompt methods means something (as the pre-trained ViLT does), prints its test accuracy on complete
   data, with every text removed and with every image removed (it uses both modalities), and saves its
   backbone as a plain ViLT-key state dict (``tiny_vilt_pretrained.pt``, a valid ``load_path``);
3. trains each of ``demo_methods`` (no-prompt baseline, MAP, MemPrompt) on that frozen backbone with
   missing modalities (``missing_ratio`` / ``missing_type`` of the config, 70 % 'both' by default);
4. evaluates each method's best checkpoint in one pass over the test split under every scenario
   (``demo_test_types`` x ``demo_test_ratios``, :mod:`mdpl.engine.sweep`), prints the comparison table
   (method x scenario, accuracy x 100) and saves ``results.md``, ``results.csv`` and ``demo_results.png``.

Outputs go to a fresh ``<log_dir>/demo/version_<n>/`` (an earlier demo is never overwritten). The numbers
are whatever the run gives: the synthetic data is not tuned to make any method win.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mdpl.backbones.registry import default_backbone
from mdpl.config.run_config import RunConfig
from mdpl.data.registry import dataset_spec, demo_dataset
from mdpl.prompts.registry import baseline_method, demo_methods



def method_title(method: str) -> str:
    """The method's display name (its registry entry)."""
    from mdpl.prompts.registry import method_class
    return method_class(method).title or method


@contextmanager
def quiet_lightning():
    """Keep the demo's output to its own lines: Lightning info logs and known-harmless warnings are muted."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        warnings.filterwarnings("ignore", message=".*ViLT checkpoint has no.*")
        warnings.filterwarnings("ignore", message=".*deterministic.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# ------------------------------------------------------------------------------------------------ data
def prepare_data(run: RunConfig) -> dict:
    """The synthetic demo dataset (raw + arrow + vocab) under ``demo_dir``; reused when already there.

    The folder name encodes sizes, seed and keyword repeats, so a demo of another size never overwrites it.
    Returns ``{"data_root", "tokenizer", "vocab_size"}``.
    """
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab

    n_train, n_val, n_test = (int(n) for n in run.demo.demo_samples)
    seed, repeats = int(run.experiment.seed), int(run.demo.demo_keyword_repeats)
    dataset = run.data.dataset
    root = Path(run.demo.demo_dir) / f"{dataset}_{n_train}-{n_val}-{n_test}_seed{seed}_kw{repeats}"
    raw, arrow, tok = root / "raw", root / "arrow", root / "tokenizer"
    expected = [arrow / name for name in dataset_spec(dataset).arrow_file_names()]
    if all(p.is_file() for p in expected) and (tok / "vocab.txt").is_file():
        print(f"[demo] using the synthetic {dataset} in {root}")
    else:
        print(f"[demo] writing a synthetic {dataset} ({n_train}/{n_val}/{n_test} items) to {root}")
        if not (raw / "text.json").exists():
            write_synthetic(dataset, raw, n_train, n_val, n_test, seed=seed, keyword_repeats=repeats)
        write_wordpiece_vocab(tok / "vocab.txt")
        _make_arrow(dataset, raw, arrow)
    vocab_size = sum(1 for line in (tok / "vocab.txt").read_text(encoding="utf-8").splitlines() if line)
    return {"data_root": str(arrow), "tokenizer": str(tok), "vocab_size": vocab_size}


def _make_arrow(dataset: str, raw: Path, arrow: Path) -> None:
    """``python make_arrow.py --dataset DATASET --root RAW --out ARROW --no-progress --overwrite`` (in-process;
    the demo owns its folder, so a half-written earlier attempt is replaced)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "make_arrow.py"
    spec = importlib.util.spec_from_file_location("_mdpl_make_arrow", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(["--dataset", dataset, "--root", str(raw), "--out", str(arrow), "--no-progress", "--overwrite"])
    if status:
        raise RuntimeError(f"make_arrow.py failed with status {status} on {raw}")


# ------------------------------------------------------------------------------------------- training
def new_demo_dir(run: RunConfig) -> Path:
    """<log_dir>/demo/version_<first unused n>."""
    base = Path(run.logging.log_dir or "result") / "demo"
    version = 0
    while (base / f"version_{version}").exists():
        version += 1
    out = base / f"version_{version}"
    out.mkdir(parents=True, exist_ok=False)
    return out


def with_method(run: RunConfig, method: str, **updates) -> RunConfig:
    """`run` with prompt_method=`method` (its keys take their defaults: the demo config names no method;
    ``method_sizes='tiny'`` gives the small sizes) and the flat `updates`."""
    return run.replace(prompt_method=method, **updates)


QUIET = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
"""Trainer options of the demo's runs."""


def seeded_datamodule(config: RunConfig):
    """The run's data module, built after seeding everything with the run's seed (as every demo run starts)."""
    import pytorch_lightning as pl

    from mdpl.engine.session import build_datamodule

    pl.seed_everything(int(config.experiment.seed), workers=True, verbose=False)
    return build_datamodule(config)


def pretrain_config(config: RunConfig) -> RunConfig:
    """The pre-training run: no prompt, everything trainable, complete data, the demo_pretrain_* keys."""
    return with_method(config, baseline_method(), finetune=True, load_path="",
                       missing_ratio={"train": 0.0, "val": 0.0, "test": 0.0},
                       max_epoch=int(config.demo.demo_pretrain_epochs),
                       learning_rate=float(config.demo.demo_pretrain_lr), exp_name="demo_pretrain")


def modality_accuracy(config: RunConfig, module, datamodule, trainer) -> dict[str, float]:
    """Test accuracy of a trained ``module`` on complete data, with every text removed, with every image removed."""
    from mdpl.engine.module import MDPLModule
    from mdpl.engine.sweep import prepare_sweep, result_rows

    cfg = config.replace(test_types=["text", "image"], test_ratios=[0.0, 1.0])
    sweep = prepare_sweep(datamodule, cfg)
    trainer.test(MDPLModule(cfg, model=module.model, sweep=sweep), datamodule=datamodule, verbose=False)
    acc = {scenario_label(r["type"], float(r["ratio"])): float(r["accuracy"]) for r in result_rows(sweep, cfg, None)}
    return {"complete": acc["complete"], "no text": acc["text 100%"], "no image": acc["image 100%"]}


def pretrain_backbone(config: RunConfig, out: Path) -> Path:
    """Tiny ViLT trained on complete data, everything trainable; its backbone saved as a ViLT state dict."""
    from mdpl.engine.session import fit

    cfg = pretrain_config(config)
    datamodule = seeded_datamodule(cfg)
    module, trainer = fit(cfg, out / "pretrain", datamodule, **QUIET)
    val = float(trainer.callback_metrics.get("val/the_metric", float("nan")))
    path = out / "tiny_vilt_pretrained.pt"
    torch.save({k: v.detach().cpu() for k, v in module.model.backbone.state_dict().items()}, path)
    print(f"[demo] pre-trained the tiny ViLT on complete data: val accuracy {100 * val:.1f} -> {path}")
    acc = modality_accuracy(cfg, module, datamodule, trainer)
    print("[demo] pre-trained model, test accuracy: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()))
    return path


def train_and_sweep(config: RunConfig, method: str, backbone_path: Path, out: Path) -> list[dict]:
    """Train ``method`` on the frozen pre-trained backbone, then evaluate its best checkpoint on every scenario."""
    from mdpl.engine.session import train_then_test
    from mdpl.engine.sweep import prepare_sweep

    cfg = with_method(config, method, finetune=False, load_path=str(backbone_path),
                      max_epoch=int(config.demo.demo_epochs), exp_name=f"demo_{method}",
                      test_types=list(config.demo.demo_test_types),
                      test_ratios=[float(r) for r in config.demo.demo_test_ratios])
    start = time.perf_counter()
    datamodule = seeded_datamodule(cfg)
    outcome = train_then_test(cfg, out / method, datamodule, sweep=prepare_sweep(datamodule, cfg), verbose=False,
                              **QUIET)
    rows = outcome.sweep_rows
    print(f"[demo] {method_title(method)}: trained and evaluated in {time.perf_counter() - start:.0f} s")
    return rows


# -------------------------------------------------------------------------------------------- report
def scenario_label(missing_type: str, ratio: float) -> str:
    return "complete" if ratio == 0 else f"{missing_type} {100 * ratio:g}%"


def comparison(rows: Sequence[Mapping], primary: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(scenario columns, {method: {scenario: primary}}); ratio-0 scenarios of every type merge into 'complete'."""
    columns: list[str] = []
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        label = scenario_label(r["type"], float(r["ratio"]))
        if label not in columns:
            columns.append(label)
        table.setdefault(r["method"], {})[label] = float(r[primary])
    return columns, table


def format_table(columns: Sequence[str], table: Mapping[str, Mapping[str, float]], primary: str, dataset: str) -> str:
    """Markdown table: rows = methods, columns = scenarios, ``primary`` x 100."""
    from mdpl.report import markdown_table

    body = ([method_title(method), *("–" if math.isnan(values.get(c, math.nan)) else f"{100 * values[c]:.1f}"
                                     for c in columns)] for method, values in table.items())
    lines = [f"{primary} (x100) on the synthetic {dataset} test split, by missing scenario:", "",
             *markdown_table(["method", *columns], body, "l" + "r" * len(columns))]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping], primary: str, path: Path) -> Path:
    """One panel per missing type: ``primary`` vs missing rate, one line per method (``mdpl.report``)."""
    from mdpl.report import Curve, plot_robustness

    curves = []
    for t in dict.fromkeys(r["type"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((float(r["ratio"]), float(r[primary])) for r in rows if r["type"] == t and r["method"] == m)
            curves.append(Curve(f"{t} missing", method_title(m), [x for x, _ in pts], [100 * y for _, y in pts],
                                ylabel=f"{primary} (x100)"))
    return plot_robustness(curves, path, f"mdpl demo: synthetic {dataset_spec(str(rows[0]['dataset'])).title}, tiny ViLT")


def write_report(rows: Sequence[Mapping], primary: str, out: Path, seconds: float) -> dict:
    from mdpl.report import write_csv

    columns, table = comparison(rows, primary)
    text = format_table(columns, table, primary, dataset_spec(str(rows[0]["dataset"])).title)
    (out / "results.md").write_text(text, encoding="utf-8")
    write_csv(rows, out / "results.csv", columns=["method", "type", "ratio", primary])
    png = plot(rows, primary, out / "demo_results.png")
    (out / "results.json").write_text(json.dumps({"primary": primary, "columns": columns, "table": table,
                                                  "seconds": seconds}, indent=2), encoding="utf-8")
    print("\n" + text)
    print(f"[demo] done in {seconds:.0f} s; table {out / 'results.md'}, plot {png}")
    return {"out": str(out), "columns": columns, "table": table, "primary": primary,
            "md": str(out / "results.md"), "png": str(png), "csv": str(out / "results.csv"), "seconds": seconds}


def run_demo(config: RunConfig | Mapping) -> dict:
    """The whole demo (module docstring). ``config``: the run config (``with demo``), or its flat form."""
    start = time.perf_counter()
    config = RunConfig.coerce(config).replace(dataset=demo_dataset(), backbone=default_backbone())
    with quiet_lightning():
        config = config.replace(**prepare_data(config))
        out = new_demo_dir(config)
        config = config.replace(log_dir=str(out))
        print(f"[demo] outputs in {out}")
        backbone = pretrain_backbone(config, out)
        rows: list[dict] = []
        for method in config.demo.demo_methods or demo_methods():
            rows += train_and_sweep(config, str(method), backbone, out)
    primary = next(k for k in rows[0] if k not in ("dataset", "method", "backbone", "checkpoint", "type", "ratio", "seed"))
    return write_report(rows, primary, out, time.perf_counter() - start)
