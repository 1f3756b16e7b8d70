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

import warnings
from collections.abc import Mapping

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


def run(config: "RunConfig | Mapping", datamodule=None, model=None, **trainer_overrides) -> dict:
    """Train then test (best checkpoint), or only test (test_only): ``mdpl.engine.session.execute``. Returns run_dir,
    best checkpoint, test metrics (and the sweep outputs, and this process's global rank: under DDP only rank 0
    writes test_metrics.json).

    `config`: the flat config (Sacred's) or a run config; validated, completed and typed here, once.
    `datamodule` / `model` / `trainer_overrides` let tests inject stubs.
    """
    from mdpl.config import RunConfig, build_run_config, to_plain
    from mdpl.engine.session import execute
    from mdpl.engine.trainer import logger_names

    flat = config.to_flat() if isinstance(config, RunConfig) else to_plain(config)
    logger_names(flat)   # an unknown logger or a missing logger package: one line before any work
    run_config = build_run_config(flat, check_data=datamodule is None)   # one clear error line before any work
    return execute(run_config, datamodule, model, **trainer_overrides).as_dict()


def build_test_module(config: "RunConfig | Mapping", model=None, sweep=None):
    """``mdpl.engine.session.build_test_module`` of a flat or typed config (tests, notebooks)."""
    from mdpl.config import RunConfig
    from mdpl.engine.session import build_test_module as build

    return build(RunConfig.coerce(config), model, sweep)


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
