"""Helpers shared by the tests that train through ``run.py``: quiet runs and resolved Sacred configs."""
from __future__ import annotations

import warnings
from typing import Iterable

import run as run_script

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
"""Trainer options that keep test output short."""


def resolved_config(named: Iterable[str], updates: dict) -> dict:
    """The Sacred config of ``config.py`` with the named configs and updates applied (``print_config``)."""
    from config import ex
    return dict(ex.run("print_config", named_configs=list(named), config_updates=updates).config)


def run_quiet(config: dict, **overrides) -> dict:
    """``run.run(config)`` without progress bars, model summary or warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_script.run(config, **QUIET, **overrides)
