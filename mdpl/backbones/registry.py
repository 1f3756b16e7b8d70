"""The registry of backbones: ``register_backbone(BackboneCard(...))`` in the backbone's own module.

A card (``mdpl.backbones.card``) names the builder ``run config -> Backbone`` (its pre-trained weights are read
unless ``test_only``; nothing is downloaded), the sizes dataclass, tokenizer, transform and weights file.
"""
from __future__ import annotations

import importlib
from typing import Any

from mdpl.backbones.base import Backbone
from mdpl.backbones.card import BackboneCard
from mdpl.errors import UserInputError

_BUILTIN_MODULES = ("mdpl.backbones.vilt", "mdpl.backbones.clip", "mdpl.backbones.coca")

_REGISTRY: dict[str, BackboneCard] = {}
_DEFAULT: list[str] = []


def register_backbone(card: BackboneCard, default: bool = False) -> BackboneCard:
    """Register `card` under ``card.name`` (the config's ``backbone``); ``default``: the backbone of a run whose
    method names no paper backbone (one, built in)."""
    if card.name in _REGISTRY and _REGISTRY[card.name].build.__qualname__ != card.build.__qualname__:
        raise ValueError(f"backbone {card.name!r} registered twice")
    if default and _DEFAULT and _DEFAULT[0] != card.name:
        raise ValueError(f"{card.name!r} cannot be the default backbone: {_DEFAULT[0]!r} is")
    _REGISTRY[card.name] = card
    if default:
        _DEFAULT[:] = [card.name]
    return card


def default_backbone() -> str:
    """The backbone of a run whose method names no paper backbone (the baseline's)."""
    _load_builtins()
    return _DEFAULT[0]


def method_backbone(method: str) -> str:
    """The backbone `method`'s paper used (its class's ``paper_backbone``), else the default backbone."""
    from mdpl.prompts.keys import paper_backbone
    return paper_backbone(method) or default_backbone()


def _load_builtins() -> None:
    """The built-in backbones, then those of installed plugins (entry-point group ``mdpl.backbones``, mdpl.plugins)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from mdpl.plugins import load_entry_points
    load_entry_points("backbones")


def available_backbones() -> list[str]:
    """Registered backbone names in registration order (vilt, clip, coca first)."""
    _load_builtins()
    return list(_REGISTRY)


def backbone_card(name: str) -> BackboneCard:
    """The card registered as `name`; an unknown name is one UserInputError line naming the choices."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}")
    return _REGISTRY[name]



def build_backbone(run: Any) -> Backbone:
    """The backbone of the run config `run` (``mdpl.config.RunConfig``) with its pre-trained weights (unless
    ``test_only``)."""
    return run.card.build(run)
