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


def _registrar(registry: dict[str, type], what: str) -> Callable[[str], Callable[[type], type]]:
    """A class decorator factory adding classes to `registry` under a name (refusing a second class)."""

    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in registry and registry[name] is not cls:
                raise ValueError(f"{what} {name!r} registered twice ({registry[name]} and {cls})")
            cls.name = name
            registry[name] = cls
            return cls

        return deco

    return register


#: Class decorator registering a `PromptMethod` under `name` (the config's `prompt_method`).
register_prompt_method = _registrar(_REGISTRY, "prompt method")


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


#: Class decorator registering a `TwoTowerPromptMethod` (CLIP variant) under `name`.
register_two_tower_method = _registrar(_TOWER_REGISTRY, "two-tower method")


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
