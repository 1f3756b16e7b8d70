"""The registry of backbones: ``@register_backbone("name")`` on a builder ``config -> Backbone``.

The builder reads the backbone's own size keys and its pre-trained weights (nothing is downloaded); with
``test_only`` it skips the weights, which then come from the evaluated checkpoint.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mdpl.backbones.base import Backbone
from mdpl.errors import UserInputError

_BUILTIN_MODULES = ("mdpl.backbones.vilt", "mdpl.backbones.clip", "mdpl.backbones.coca")

Builder = Callable[[Mapping[str, Any]], Backbone]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its builder and the config key naming its pre-trained weights file."""

    build: Builder
    weights_key: str
    model_keys: tuple[str, ...] = ()
    """The size keys that define the model: a checkpoint evaluated with ``test_only`` must agree on them."""
    weights_file: str = ""
    """File name of the paper's pre-trained weights in a weights folder (``scripts/reproduce.py --weights``)."""
    tokenizer_dir: str = ""
    """Folder of its WordPiece vocabulary in a weights folder ('': the backbone reads OpenAI BPE texts)."""


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, weights_key: str, model_keys: tuple[str, ...] = (), weights_file: str = "",
                      tokenizer_dir: str = "") -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name` (the config's ``backbone``); see `BackboneEntry`."""

    def deco(build: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].build.__qualname__ != build.__qualname__:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneEntry(build, weights_key, tuple(model_keys), weights_file, tokenizer_dir)
        return build

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_backbones() -> list[str]:
    """Registered backbone names in registration order (vilt, clip first)."""
    _load_builtins()
    return list(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry:
    _load_builtins()
    if name not in _REGISTRY:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}")
    return _REGISTRY[name]


def build_backbone(config: Mapping[str, Any]) -> Backbone:
    """The backbone named by ``config["backbone"]`` with its pre-trained weights (unless ``test_only``)."""
    return backbone_entry(str(config.get("backbone", "vilt"))).build(config)
