"""The one registry of prompt methods: ``@register_method("name")`` on a `PromptMethod` subclass.

Adding a method = one new file defining a :class:`~mdpl.prompts.base.MethodConfig` dataclass and a
:class:`~mdpl.prompts.base.PromptMethod` subclass decorated with ``@register_method("name")``; the built-in
ones are listed in ``_BUILTIN_MODULES``; a method defined elsewhere registers itself when its module is imported: an
installed package's through the entry-point group ``mdpl.methods``, one-off code through the run key ``plugins``
(mdpl.plugins). Config validation, checkpoint checks, the benchmark and the demo read
this registry; nothing else names methods.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mdpl.errors import UserInputError
from mdpl.prompts.base import BackboneInfo, MethodConfig, PromptMethod

_BUILTIN_MODULES = (
    "mdpl.prompts.none",
    "mdpl.prompts.map",
    "mdpl.prompts.memprompt",
    "mdpl.prompts.dcp",
    "mdpl.prompts.scp",
    "mdpl.prompts.mora",
    "mdpl.prompts.msps",
    "mdpl.prompts.ragpt",
    "mdpl.prompts.aoept",
)

_REGISTRY: dict[str, type[PromptMethod]] = {}
_BASELINE: list[str] = []


def register_method(name: str, baseline: bool = False) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    """Class decorator registering a `PromptMethod` under `name` (the config's ``prompt_method``); ``baseline``: the
    method a run without ``prompt_method`` uses (one, built in)."""

    def deco(cls: type[PromptMethod]) -> type[PromptMethod]:
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"prompt method {name!r} registered twice ({_REGISTRY[name]} and {cls})")
        if baseline and _BASELINE and _BASELINE[0] != name:
            raise ValueError(f"{name!r} cannot be the baseline: {_BASELINE[0]!r} is")
        cls.name = name
        _REGISTRY[name] = cls
        if baseline:
            _BASELINE[:] = [name]
        return cls

    return deco


@contextmanager
def registered(cls: type[PromptMethod], name: str) -> Iterator[type[PromptMethod]]:
    """Register `cls` under `name` for the duration of a ``with`` block (tests, plugins tried out interactively)."""
    register_method(name)(cls)
    try:
        yield cls
    finally:
        _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    """The built-in methods, then those of installed plugins (entry-point group ``mdpl.methods``, mdpl.plugins)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from mdpl.plugins import load_entry_points
    load_entry_points("methods")


def _order(name: str) -> tuple[int, int]:
    """Built-ins in the order of `_BUILTIN_MODULES`, then the others in registration order."""
    module = _REGISTRY[name].__module__
    builtin = _BUILTIN_MODULES.index(module) if module in _BUILTIN_MODULES else len(_BUILTIN_MODULES)
    return builtin, list(_REGISTRY).index(name)


def baseline_method() -> str:
    """The name of the no-prompt baseline (what an empty ``prompt_method`` means)."""
    _load_builtins()
    return _BASELINE[0]


def demo_methods() -> list[str]:
    """The methods the demo trains when ``demo_methods`` is empty: those whose class sets ``in_demo``."""
    return [name for name in available_methods() if _REGISTRY[name].in_demo]


def available_methods() -> list[str]:
    """Names of the registered methods (built-ins first: none, map, memprompt, dcp)."""
    _load_builtins()
    return sorted(_REGISTRY, key=_order)


def method_class(name: str) -> type[PromptMethod]:
    """The class registered as `name`; UserInputError naming the choices otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UserInputError(f"unknown prompt_method {name!r}; registered methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def method_keys() -> dict[str, dict[str, Any]]:
    """Method name -> {config key: paper default} of every registered method."""
    _load_builtins()
    return {name: _REGISTRY[name].config_class.keys() for name in available_methods()}


def tiny_method_keys() -> dict[str, dict[str, Any]]:
    """Method name -> the small values of ``method_sizes='tiny'``."""
    _load_builtins()
    return {name: dict(_REGISTRY[name].config_class.TINY) for name in available_methods()}


def build_method(name: str, options: MethodConfig | None, info: BackboneInfo) -> PromptMethod:
    """The method registered as `name` ('' = the baseline) with `options` (None: its defaults)."""
    cls = method_class(name or baseline_method())
    return cls(options if options is not None else cls.config_class(), info)
