"""Train and/or evaluate one mdpl run (Sacred entry point).

    python run.py with task_finetune_mmimdb map data_root=... load_path=vilt_200k_mlm_itm.ckpt per_gpu_batchsize=32
    python run.py with task_finetune_mmimdb map load_path=<run>/checkpoints/best-....ckpt test_only=True test_ratio=0.5
    python run.py print_config with task_finetune_mmimdb map

Run directory: log_dir/<exp_name>_seed<seed>_from_<Path(load_path).stem or 'scratch'>/version_<n>/ with
checkpoints/ (best by val/the_metric + last), tensorboard/, csv/ and test_metrics.json. A new version_<n> is
made for every run, so an earlier run's checkpoints are never overwritten; a resumed run continues in the
run directory of its checkpoint (mdpl.engine.resume), and a requeued SLURM job in the directory it made
before. A run that fails before its first step leaves none. Under DDP global rank 0 chooses the directory once
the processes are connected and shares it (mdpl.engine.trainer.RunDirectory), however they were started
(Lightning's launcher, torchrun, srun); only rank 0 writes files and returns the result.
Training runs end with `trainer.test` on the best checkpoint. `test_only=True` loads every tensor from
load_path strictly: an mdpl checkpoint (its config must agree on the model keys, mdpl.config.RunConfig.model_keys)
or a reference training checkpoint (mdpl.models.classifier.load_trained_weights); anything else is refused.
Mistakes in the user's input (mdpl.errors.UserInputError) end as one `error: ...` line with exit status 2.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

# sacred 0.8 imports pkg_resources, which warns about its own deprecation on every start; nothing to act on here
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning,
                        module=r"sacred(\.|$)")

import sys  # noqa: E402

from sacred import SETTINGS  # noqa: E402


def _load_plugins() -> None:
    """Installed plugins (entry points) and the command line's ``plugins=[...]`` (or a test_only checkpoint's),
    imported before config.py builds its keys and named configs from the registries."""
    from mdpl.errors import UserInputError, debug_enabled, exit_with
    from mdpl.plugins import load_command_line_plugins

    try:
        load_command_line_plugins(sys.argv[1:])
    except UserInputError as err:
        if debug_enabled():
            raise
        exit_with(err)


if __name__ == "__main__":
    _load_plugins()

from config import ex  # noqa: E402

SETTINGS.CAPTURE_MODE = "no"   # let Lightning's progress bar and DDP child processes own stdout/stderr


def run_base_dir(config: "RunConfig | Mapping") -> Path:
    """log_dir/<exp_name>_seed<seed>_from_<stem of load_path | 'scratch'> (D-54: Path.stem, not name[:-5])."""
    from mdpl.config import RunConfig

    run = RunConfig.coerce(config)
    source = Path(run.model.load_path).stem if run.model.load_path else "scratch"
    return Path(run.logging.log_dir) / f"{run.experiment.exp_name}_seed{run.experiment.seed}_from_{source}"


def new_run_dir(config: "RunConfig | Mapping", resume_path: str | None = None) -> tuple[Path, bool]:
    """(run directory, whether this call created it). Called once per run, by global rank 0 (RunDirectory).

    A resumed run continues in its checkpoint's run directory; a requeued SLURM job that has no checkpoint yet in
    the directory it made (mdpl.engine.resume.slurm_run_dir) starts again there; any other run gets a fresh
    base/version_<n> (first unused n, claimed by an atomic mkdir). A training run in a SLURM batch job records
    the job id in its directory, so that the job finds it again after a requeue.
    """
    from mdpl.config import RunConfig
    from mdpl.engine.resume import record_slurm_job, resume_run_dir, slurm_job_id, slurm_run_dir

    job = None if RunConfig.coerce(config).trainer.test_only else slurm_job_id()
    if resume_path:
        run_dir = resume_run_dir(resume_path)
        if job:
            record_slurm_job(run_dir, job)
        return run_dir, False
    base = run_base_dir(config)
    previous = slurm_run_dir(base, job) if job else None
    if previous is not None:
        return previous, False
    base.mkdir(parents=True, exist_ok=True)
    version = 0
    while True:
        run_dir = base / f"version_{version}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            version += 1
    if job:
        record_slurm_job(run_dir, job)
    return run_dir, True


def remove_if_empty_run(run_dir: Path, trained_steps: int) -> None:
    """Delete a run directory this process created when the run failed before training (no step, no checkpoint)."""
    import shutil

    if trained_steps == 0 and not any(run_dir.rglob("*.ckpt")) and not (run_dir / "test_metrics.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()


def build_test_module(config: "RunConfig", model=None, sweep=None):
    """MDPLModule whose every weight is read from load_path (test_only), or UserInputError (one line).

    The classifier is built without reading load_path or clip_path (`model` injects one), then `mdpl.engine.module.load_for_test`
    loads the file strictly: an mdpl checkpoint after its config check (RunConfig.model_keys), or a training
    checkpoint of the original MAP / MemPrompt code through the reference key converter. Any other file (e.g.
    the ViLT pre-training checkpoint, which has no trained head) is refused: nothing is evaluated with weights
    that were not loaded.
    """
    from mdpl.config import RunConfig
    from mdpl.engine.module import MDPLModule, load_for_test, read_test_checkpoint
    from mdpl.errors import UserInputError

    config = RunConfig.coerce(config)
    if not config.model.load_path:
        raise UserInputError("test_only=True needs load_path=<checkpoint.ckpt> (e.g. <run_dir>/checkpoints/last.ckpt)")
    path = Path(config.model.load_path)
    if not path.exists():
        raise UserInputError(f"load_path {str(path)!r} does not exist; pass the .ckpt written by a training run")
    checkpoint = read_test_checkpoint(path)
    module = MDPLModule(config, model=model, weights_from_checkpoint=True, sweep=sweep)   # reads no pre-training file
    try:
        load_for_test(module, checkpoint)
    except ValueError as err:
        raise UserInputError(f"cannot evaluate {path}: {err}") from None
    return module


def run(config: "RunConfig | Mapping", datamodule=None, model=None, **trainer_overrides) -> dict:
    """Train then test (best checkpoint), or only test (test_only). Returns run_dir, best checkpoint, test metrics
    (and the sweep outputs, and this process's global rank: under DDP only rank 0 writes test_metrics.json).

    `config`: the flat config (Sacred's) or a run config; validated, completed and typed here, once.
    `datamodule` / `model` / `trainer_overrides` let tests inject stubs; by default
    `mdpl.data.datamodule.MDPLDataModule(config)` and `mdpl.models.build_classifier(config)`.
    """
    import pytorch_lightning as pl

    from mdpl.config import RunConfig, build_run_config, to_plain
    from mdpl.engine.module import MDPLModule
    from mdpl.engine.sweep import prepare_sweep, sweep_specs, write_outputs
    from mdpl.engine.trainer import RunDirectory, build_trainer, logger_names

    flat = config.to_flat() if isinstance(config, RunConfig) else to_plain(config)
    logger_names(flat)   # an unknown logger or a missing logger package: one line before any work
    config = build_run_config(flat, check_data=datamodule is None)   # one clear error line before any work
    sweep_specs(config)   # test_types / test_ratios checked before any work
    pl.seed_everything(int(config.experiment.seed), workers=True)
    if datamodule is None:
        from mdpl.data.datamodule import MDPLDataModule
        datamodule = MDPLDataModule(config)
    from mdpl.engine.resume import check_resume_config, resolve_resume_path
    resume_path = None if config.trainer.test_only else resolve_resume_path(config, run_base_dir(config))
    if resume_path:
        check_resume_config(resume_path, config)   # names the mismatched keys (other method/backbone, seed, ...)
    # test_only: the checkpoint is checked (other method / backbone -> error) before the run directory exists
    sweep = prepare_sweep(datamodule, config)   # None unless test_types / test_ratios are set
    module = build_test_module(config, model, sweep) if config.trainer.test_only else None
    # chosen (and created) by global rank 0 when the run starts, then shared with every rank
    directory = RunDirectory(config, choose=lambda: new_run_dir(config, resume_path))
    trainer = None
    try:
        if config.trainer.test_only:
            trainer = build_trainer(config, directory, **trainer_overrides)
            results = trainer.test(module, datamodule=datamodule)
            best = config.model.load_path
        else:
            module = MDPLModule(config, model=model, sweep=sweep)
            trainer = build_trainer(config, directory, **trainer_overrides)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)  # resume_from / resume=True / SLURM requeue
            callback = trainer.checkpoint_callback
            best = callback.best_model_path if callback is not None and callback.best_model_path else None
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    except BaseException:
        if directory.created:
            remove_if_empty_run(directory.path, trainer.global_step if trainer is not None else 0)
        raise
    run_dir = directory.path
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    swept = None
    if trainer.is_global_zero:
        from mdpl.atomic import write_text_atomic
        # written whole or not at all: scripts/reproduce.py takes this file as the mark of a finished run
        write_text_atomic(run_dir / "test_metrics.json", json.dumps({"checkpoint": best, "metrics": metrics}, indent=2))
        if sweep is not None:
            swept = write_outputs(sweep, config, run_dir, best)   # results.csv / results.md / robustness PNG
    return {"run_dir": str(run_dir), "best_model_path": best, "test": metrics, "sweep": swept,
            "global_rank": trainer.global_rank}


@ex.automain
def main(_config, _run):
    from config import check_named_configs
    from mdpl.errors import UserInputError, debug_enabled, exit_with

    try:
        check_named_configs(_run.meta_info.get("named_configs", []))   # e.g. `tiny` before the task: refused
        if _config.get("demo"):  # `python run.py with demo` (make demo): the embedded end-to-end demo
            from mdpl.demo import run_demo
            return run_demo(_config)["table"]
        out = run(_config)
        return out["test"] if out["global_rank"] == 0 else None   # DDP: Sacred prints rank 0's result only
    except UserInputError as err:   # one line on stderr, exit status 2 (MDPL_DEBUG=1: the traceback)
        if debug_enabled():
            raise
        _run.run_logger.disabled = True   # no second line: Sacred would log "Failed after ..." as it exits
        exit_with(err)
