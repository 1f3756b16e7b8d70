"""Registry of ViLT prompt methods: ``@register_prompt_method("name")`` + `build_prompt_method`.

Adding a method = one new file defining a `PromptMethod` subclass decorated with
`register_prompt_method`, plus its module name in `_BUILTIN_MODULES` below.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from mdpl.prompts.base import BackboneInfo, PromptMethod

_BUILTIN_MODULES = (
    "mdpl.prompts.none",
    "mdpl.prompts.map",
    "mdpl.prompts.memprompt",
    "mdpl.prompts.dcp",
)

_REGISTRY: dict[str, type[PromptMethod]] = {}
# Two-tower (CLIP) variants of the methods (mdpl.prompts.towers); DCP's own CLIP model is built by
# mdpl.prompts.dcp.build_dcp_classifier and is listed here only by name (see `clip_prompt_methods`).
_TOWER_REGISTRY: dict[str, type] = {}


def register_prompt_method(name: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    """Class decorator registering a `PromptMethod` under `name` (the config's `prompt_method`)."""

    def deco(cls: type[PromptMethod]) -> type[PromptMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"prompt method {name!r} registered twice ({_REGISTRY[name]} and {cls})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_prompt_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def build_prompt_method(config: Mapping[str, Any], info: BackboneInfo) -> PromptMethod:
    """Build the method named by ``config["prompt_method"]`` ('none' if absent)."""
    _load_builtins()
    name = config.get("prompt_method", "none")
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown prompt_method {name!r} for the ViLT backbone; choose one of {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name].from_config(config, info)


def register_two_tower_method(name: str) -> Callable[[type], type]:
    """Class decorator registering a `TwoTowerPromptMethod` (CLIP variant) under `name`."""

    def deco(cls: type) -> type:
        if name in _TOWER_REGISTRY and _TOWER_REGISTRY[name] is not cls:
            raise ValueError(f"two-tower method {name!r} registered twice ({_TOWER_REGISTRY[name]} and {cls})")
        cls.name = name
        _TOWER_REGISTRY[name] = cls
        return cls

    return deco


def clip_prompt_methods() -> list[str]:
    """Methods runnable on backbone 'clip': the two-tower registry plus 'dcp' (its own model)."""
    _load_builtins()
    return sorted({*_TOWER_REGISTRY, "dcp"})


def build_two_tower_method(config: Mapping[str, Any], info: Any) -> Any:
    """Build the CLIP variant of ``config["prompt_method"]`` for a `TwoTowerInfo`."""
    _load_builtins()
    name = config.get("prompt_method", "none")
    if name not in _TOWER_REGISTRY:
        raise ValueError(f"prompt_method {name!r} has no two-tower hooks for the CLIP backbone; choose one of "
                         f"{sorted(_TOWER_REGISTRY)} (or 'dcp', built by mdpl.prompts.dcp)")
    return _TOWER_REGISTRY[name].from_config(config, info)
