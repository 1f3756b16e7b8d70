"""The run config a checkpoint stores (its flat ``hyper_parameters.config``), and whether it fits a run.

Checkpoints keep the flat dict of every key; an older one, written before some key existed, loads with that key's
default.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mdpl.config.run_config import RunConfig, to_plain


def stored_run_config(checkpoint: Mapping[str, Any]) -> RunConfig:
    """The typed config of an mdpl checkpoint (``hyper_parameters.config``)."""
    return RunConfig.from_flat(checkpoint["hyper_parameters"]["config"])


def size_differences(stored: Mapping[str, Any], run: RunConfig) -> list[str]:
    """'key=<checkpoint's> (this run: <run's>)' for each size key of the run's backbone card on which the checkpoint's
    flat config `stored` differs (what to name when tensor shapes disagree, e.g. another ``max_text_len``)."""
    ckpt, own = to_plain(stored), run.to_flat()
    return [f"{k}={ckpt[k]!r} (this run: {own[k]!r})" for k in run.card.sizes.flat_keys().values()
            if k in ckpt and k in own and ckpt[k] != own[k]]


def checkpoint_mismatches(stored: Mapping[str, Any], run: RunConfig, extra_keys: tuple[str, ...] = ()) -> list[str]:
    """'key: checkpoint=.. vs config=..' for each model-defining key (``run.model_keys()``, then `extra_keys`) on which
    the checkpoint's flat config `stored` differs from `run`. A key the checkpoint does not hold is not compared,
    except the method's own keys, which take the method's defaults."""
    from mdpl.prompts.keys import complete_method_keys

    ckpt, own = complete_method_keys(to_plain(stored)), run.to_flat()
    return [f"{k}: checkpoint={ckpt[k]!r} vs config={own[k]!r}"
            for k in run.model_keys() + tuple(extra_keys) if k in ckpt and k in own and ckpt[k] != own[k]]
