"""One run, start to end: the data module, training, testing the best checkpoint (or only testing a checkpoint with
``test_only``), the evaluation sweep and ``test_metrics.json``. ``run.py`` and the demo both run through here.

A method that declares ``preparation_needs`` gets its prepared artefact (``mdpl.engine.preparation``) when fit or
test starts, on every rank. Training runs end with ``trainer.test`` on the best checkpoint. ``test_only=True`` loads every tensor from
``load_path`` strictly (``build_test_module``); anything that is not a trained checkpoint is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl

from mdpl.atomic import write_text_atomic
from mdpl.config.run_config import RunConfig
from mdpl.data.datamodule import MDPLDataModule
from mdpl.data.scenarios import sweep_specs
from mdpl.engine.module import MDPLModule, load_for_test, read_test_checkpoint
from mdpl.engine.preparation import PreparationStage
from mdpl.engine.resume import check_resume_config, resolve_resume_path
from mdpl.engine.run_dir import new_run_dir, remove_if_empty_run, run_base_dir
from mdpl.engine.sweep import MissingSweep, prepare_sweep, result_rows, write_outputs
from mdpl.engine.trainer import RunDirectory, build_trainer
from mdpl.errors import UserInputError


def build_datamodule(run: RunConfig) -> MDPLDataModule:
    """The run's data module: its data and missing sections, its backbone's pipeline, its seed."""
    return MDPLDataModule(run.data, run.missing, run.pipeline, int(run.experiment.seed))


def check_sweep(run: RunConfig) -> None:
    """``test_types`` / ``test_ratios`` checked before any work (UserInputError, one line)."""
    sweep_specs(run.missing, int(run.experiment.seed))


def build_test_module(run: RunConfig, model=None, sweep: MissingSweep | None = None) -> MDPLModule:
    """MDPLModule whose every weight is read from load_path (test_only), or UserInputError (one line).

    The classifier is built without reading load_path or clip_path (`model` injects one), then
    ``mdpl.engine.module.load_for_test`` loads the file strictly: an mdpl checkpoint after its config check
    (``RunConfig.model_keys``), or a training checkpoint of the reference code through the reference key converter.
    Any other file (e.g. the ViLT pre-training checkpoint, which has no trained head) is refused: nothing is
    evaluated with weights that were not loaded.
    """
    if not run.model.load_path:
        raise UserInputError("test_only=True needs load_path=<checkpoint.ckpt> (e.g. <run_dir>/checkpoints/last.ckpt)")
    path = Path(run.model.load_path)
    if not path.exists():
        raise UserInputError(f"load_path {str(path)!r} does not exist; pass the .ckpt written by a training run")
    checkpoint = read_test_checkpoint(path)
    module = MDPLModule(run, model=model, weights_from_checkpoint=True, sweep=sweep)   # reads no pre-training file
    try:
        load_for_test(module, checkpoint)
    except ValueError as err:
        raise UserInputError(f"cannot evaluate {path}: {err}") from None
    return module


@dataclass
class Outcome:
    """What a run left: its directory, the checkpoint tested, the test metrics, the sweep's rows and outputs."""

    run_dir: Path
    best: str | None
    metrics: dict[str, float]
    trainer: pl.Trainer
    module: MDPLModule
    datamodule: Any
    sweep_rows: list[dict] = field(default_factory=list)
    sweep_outputs: dict | None = None

    def as_dict(self) -> dict:
        """``run.py``'s result: run_dir, best checkpoint, test metrics, sweep outputs, this process's global rank."""
        return {"run_dir": str(self.run_dir), "best_model_path": self.best, "test": self.metrics,
                "sweep": self.sweep_outputs, "global_rank": self.trainer.global_rank}


def preparation_stages(run: RunConfig, trainer_overrides: dict) -> list[pl.Callback]:
    """The preparation stage (``mdpl.engine.preparation``): what the method's ``preparation_needs`` asks for,
    computed or read on every rank when fit or test starts, and handed to its ``load_prepared``."""
    return [PreparationStage(run, progress=bool(trainer_overrides.get("enable_progress_bar", True)))]


def fit(run: RunConfig, directory: RunDirectory | Path, datamodule, model=None, sweep: MissingSweep | None = None,
        resume_path: str | None = None, started: Callable[[pl.Trainer], None] | None = None,
        **trainer_overrides) -> tuple[MDPLModule, pl.Trainer]:
    """Train ``run``: the module (``model`` injects a classifier), the trainer (``started`` sees it before training
    starts), ``trainer.fit`` from ``resume_path`` when given (resume_from / resume=True / a SLURM requeue)."""
    module = MDPLModule(run, model=model, sweep=sweep)
    trainer = build_trainer(run, directory, stages=preparation_stages(run, trainer_overrides), **trainer_overrides)
    if started is not None:
        started(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    return module, trainer


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint callback's best file, or None when it kept none."""
    callback = trainer.checkpoint_callback
    return callback.best_model_path if callback is not None and callback.best_model_path else None


def train_then_test(run: RunConfig, directory: RunDirectory | Path, datamodule, model=None,
                    sweep: MissingSweep | None = None, resume_path: str | None = None,
                    started: Callable[[pl.Trainer], None] | None = None, verbose: bool = True,
                    **trainer_overrides) -> Outcome:
    """Train, then test the best checkpoint (the last weights when none was kept), on every scenario of ``sweep``
    (``prepare_sweep``) when given. Writes nothing of its own (``execute`` does)."""
    module, trainer = fit(run, directory, datamodule, model, sweep, resume_path, started, **trainer_overrides)
    best = best_checkpoint(trainer)
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=verbose)
    return _outcome(run, trainer, module, datamodule, best, results, sweep)


def _outcome(run: RunConfig, trainer, module, datamodule, best, results, sweep) -> Outcome:
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    rows = result_rows(sweep, run, best) if sweep is not None else []
    return Outcome(Path(trainer.log_dir or "."), best, metrics, trainer, module, datamodule, rows)


def execute(run: RunConfig, datamodule=None, model=None, **trainer_overrides) -> Outcome:
    """The run of ``run.py``: resume or start, train then test (or ``test_only``), and on global rank 0 write
    ``test_metrics.json`` and the sweep's outputs. A run that fails before its first step leaves no directory."""
    check_sweep(run)
    pl.seed_everything(int(run.experiment.seed), workers=True)
    datamodule = datamodule if datamodule is not None else build_datamodule(run)
    resume_path = None if run.trainer.test_only else resolve_resume_path(run, run_base_dir(run))
    if resume_path:
        check_resume_config(resume_path, run)   # names the mismatched keys (other method/backbone, seed, ...)
    sweep = prepare_sweep(datamodule, run)   # None unless test_types / test_ratios are set
    # test_only: the checkpoint is checked (other method / backbone -> error) before the run directory exists
    module = build_test_module(run, model, sweep) if run.trainer.test_only else None
    directory = RunDirectory(run, choose=lambda: new_run_dir(run, resume_path))  # chosen by global rank 0, shared
    trainers: list[pl.Trainer] = []
    try:
        if module is not None:
            trainers.append(build_trainer(run, directory, stages=preparation_stages(run, trainer_overrides),
                                          **trainer_overrides))
            results = trainers[0].test(module, datamodule=datamodule)
            outcome = _outcome(run, trainers[0], module, datamodule, run.model.load_path, results, sweep)
        else:
            outcome = train_then_test(run, directory, datamodule, model, sweep, resume_path, trainers.append,
                                      **trainer_overrides)
    except BaseException:
        if directory.created:
            remove_if_empty_run(directory.path, trainers[0].global_step if trainers else 0)
        raise
    outcome.run_dir = directory.path
    if outcome.trainer.is_global_zero:
        # written whole or not at all: scripts/reproduce.py takes this file as the mark of a finished run
        write_text_atomic(outcome.run_dir / "test_metrics.json",
                          json.dumps({"checkpoint": outcome.best, "metrics": outcome.metrics}, indent=2))
        if sweep is not None:
            outcome.sweep_outputs = write_outputs(sweep, run, outcome.run_dir, outcome.best)
    return outcome
