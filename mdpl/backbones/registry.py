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


def register_backbone(card: BackboneCard) -> BackboneCard:
    """Register `card` under ``card.name`` (the config's ``backbone``)."""
    if card.name in _REGISTRY and _REGISTRY[card.name].build.__qualname__ != card.build.__qualname__:
        raise ValueError(f"backbone {card.name!r} registered twice")
    _REGISTRY[card.name] = card
    return card


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
