"""Loading trained classifier weights: mdpl checkpoints (any version) and checkpoints of the reference code.

* :func:`upgrade_state` renames the keys of earlier mdpl checkpoints and of reference checkpoints with the
  method's ``upgrade_state_dict`` (e.g. DCP's reference layout ``model.*``), so old files keep loading.
* :func:`load_classifier_checkpoint` loads an mdpl checkpoint (or a plain state dict) of a classifier strictly.
* :func:`load_trained_weights` (``test_only`` with a file mdpl did not write) loads every weight, strictly, or
  refuses the file in one line: a ViLT MAP / MemPrompt / SCP / baseline checkpoint of the original code through the
  ViLT key converter, anything else as a state dict of this classifier in the reference layout of its method
  (which may complete what the reference never saved, e.g. DCP's dynamic queries from a side file).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdpl.backbones.clip_weights import check_state_dict
from mdpl.backbones.vilt_weights import reference_prompt_keys
from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError
from mdpl.prompts.registry import baseline_method, method_class


def upgrade_state(state: Mapping[str, torch.Tensor], method: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`state` with the key names of today's classifier; `prefix` (e.g. ``"model."`` of the Lightning module) is
    kept in front of every classifier key."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outer = {k: v for k, v in state.items() if not k.startswith(prefix)}
    upgraded = method_class(method).upgrade_state_dict(inner)
    return {**outer, **{prefix + k: v for k, v in upgraded.items()}}


def read_classifier_state(path: str) -> dict[str, torch.Tensor]:
    """The classifier state dict of an mdpl .ckpt (``model.*`` of the Lightning module), a reference .ckpt or a
    plain state dict file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_path {path!r} not found; pass a checkpoint (.ckpt) or leave it empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint the user provides
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read load_path {path} as a PyTorch checkpoint ({type(err).__name__}: {err})"
                             ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserInputError(f"load_path {path} holds no state dict (expected a checkpoint of this classifier)")
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and isinstance(hp.get("config"), Mapping):  # mdpl: MDPLModule.model.<keys>
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_classifier_checkpoint(model: nn.Module, path: str) -> None:
    """Every weight of `model` from the checkpoint file `path`, strictly (keys upgraded for the model's method)."""
    state = upgrade_state(read_classifier_state(path), model.prompt.name)
    model.accept_state(state)
    check_state_dict(state, model.state_dict(), what=f"checkpoint {path}")
    model.load_state_dict(state, strict=True)


def load_trained_weights(model: nn.Module, checkpoint: Any, config: Mapping[str, Any]) -> None:
    """Every weight of `model` from a trained checkpoint that mdpl did not write (``test_only``), strictly.

    ViLT + the baseline or a method with reference code on ViLT (MAP, MemPrompt, SCP): a checkpoint of that code
    (reference key names); any other backbone: a state dict in the reference layout of the method (DCP: the
    reference DCP checkpoint, its dynamic queries from ``dcp_dynamic_queries``). Anything else, or a file that does
    not fit, raises UserInputError (one line, naming the keys).
    """
    if not isinstance(checkpoint, Mapping):
        raise UserInputError(f"it holds a {type(checkpoint).__name__}, not a state dict or Lightning checkpoint")
    run = RunConfig.coerce(config)
    method = run.experiment.prompt_method
    if run.card.reference_reader is not None:
        if method != baseline_method() and method not in reference_prompt_keys():
            raise UserInputError(f"it was not written by mdpl, and {method!r} on ViLT has no reference code whose "
                                 f"checkpoints could be read; evaluate a checkpoint of an mdpl training run")
        cls, own = method_class(method), model.state_dict()
        run.card.reference_reader(model, checkpoint, run,
                                  adapt=lambda state: cls.complete_reference_state(cls.upgrade_state_dict(state), own,
                                                                                   run.method_options()))
        return
    state = checkpoint.get("state_dict", checkpoint)
    state = upgrade_state({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, method)
    try:
        state = method_class(method).complete_reference_state(state, model.state_dict(), run.method_options())
        check_state_dict(state, model.state_dict(), what="the checkpoint")
        model.load_state_dict(state, strict=True)
    except ValueError as err:
        raise UserInputError(str(err)) from None
