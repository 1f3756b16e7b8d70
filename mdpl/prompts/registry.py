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
)

_REGISTRY: dict[str, type[PromptMethod]] = {}


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
