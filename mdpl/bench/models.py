"""The benchmark's models: the run config of a method x dataset from the Sacred presets of ``config.py`` and a
classifier with random weights."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from mdpl.backbones.registry import available_backbones, backbone_card
from mdpl.data.registry import available_datasets, dataset_spec
from mdpl.backbones.registry import method_backbone
from mdpl.prompts.keys import method_presets
from mdpl.config.run_config import RunConfig, to_plain


def resolve_config(method: str, dataset: str, small: bool, overrides: dict | None = None) -> dict:
    """Base config + task_finetune_<dataset> + method preset (+ tiny) + bench overrides, as a plain dict.

    Resolved by Sacred (as `python run.py print_config with ...`): the method's keys follow from prompt_method.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sacred.initialize import create_run

        from config import ex
    preset = method_presets().get(method)
    spec = dataset_spec(dataset)
    presets = [f"task_finetune_{dataset}", *([preset] if preset else [])] + (["tiny"] if small else [])
    weights = {backbone_card(name).weights_key: "" for name in available_backbones()}   # random weights
    updates = {**weights, "dataset": dataset, "test_only": False,
               **({} if preset else {"prompt_method": method, "backbone": method_backbone(method)}),
               **({"max_text_len": spec.bench_small_text_len} if small else {}), **(overrides or {})}
    return to_plain(dict(create_run(ex, "print_config", config_updates=updates, named_configs=presets).config))


def build_model(config: RunConfig | dict) -> torch.nn.Module:
    """Random-weight classifier; the 'randomly initialised' warnings are silenced."""
    from mdpl.models import build_classifier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        warnings.filterwarnings("ignore", message=r"\w+ is empty.*")
        return build_classifier(config)


def bench_datasets() -> list[str]:
    """The registered datasets the benchmark runs on (their spec has ``bench_text_fill``)."""
    return [d for d in available_datasets() if dataset_spec(d).bench_text_fill]
