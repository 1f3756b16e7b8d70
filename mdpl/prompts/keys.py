"""The config keys of each prompt method: which method reads which key, and the defaults its paper used.

A method key (e.g. ``top_k``) is ``None`` in a config unless the selected method reads it: then it holds the
user's value or the method's default (:func:`complete_method_keys`; the papers' values, or small ones with
``method_sizes='tiny'``). A key of another method that is not ``None`` was set by the user, and config
validation refuses it, naming the method that reads it. ``config.py`` derives its defaults from here.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

METHOD_PRESETS = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp"}
"""prompt_method -> the named config (config.py) that selects it."""

_LAYERS = [0, 1, 2, 3, 4, 5]
METHOD_KEYS: dict[str, dict[str, Any]] = {
    "none": {},
    "map": {"prompt_type": "input", "prompt_length": 16, "prompt_layers": _LAYERS, "learnt_p": True,
            "multi_layer_prompt": True},
    "memprompt": {"gen_prompt_length": 16, "gen_prompt_layers": _LAYERS, "shared_prompt_length": 16,
                  "shared_prompt_layers": _LAYERS, "mem_size": 16, "top_k": 5, "bottleneck_dim": 48,
                  "memprompt_mask_padding": False},
    "dcp": {"prompt_length": 36, "prompt_depth": 6, "dcp_correlated": True, "dcp_dynamic": True, "dcp_common": True,
            "dcp_dynamic_trainable": False, "dcp_independent_init": False, "dcp_skip_missing": True,
            "dcp_dynamic_queries": ""},
}
"""The keys each method reads (and no method outside its entry), with the values its paper used."""

TINY_METHOD_KEYS: dict[str, dict[str, Any]] = {
    "map": {"prompt_length": 6, "prompt_layers": [0, 1]},
    "memprompt": {"gen_prompt_length": 4, "gen_prompt_layers": [0, 1], "shared_prompt_length": 4,
                  "shared_prompt_layers": [0, 1], "mem_size": 4, "top_k": 2, "bottleneck_dim": 8},
    "dcp": {"prompt_length": 6, "prompt_depth": 2},   # a multiple of 3: 2 layer + 2 common + 2 dynamic prompts
}
"""``method_sizes='tiny'`` (the `tiny` and `demo` configs): smaller values for 2-layer CPU models."""

METHOD_SIZES = ("paper", "tiny")


def method_defaults(method: str, sizes: str = "paper") -> dict[str, Any]:
    """The keys `method` reads with their defaults for ``method_sizes=sizes`` (a fresh copy; {} if unknown)."""
    values = {**METHOD_KEYS.get(method, {}), **(TINY_METHOD_KEYS.get(method, {}) if sizes == "tiny" else {})}
    return copy.deepcopy(values)


def method_default(method: str, sizes: str, key: str) -> Any:
    """Default of `key` when `method` is selected: its value for that method, None if the method does not read it."""
    return method_defaults(method, sizes).get(key)


def key_readers() -> dict[str, list[str]]:
    """Each method-specific key -> the methods that read it (e.g. prompt_length -> map, dcp)."""
    readers: dict[str, list[str]] = {}
    for method, keys in METHOD_KEYS.items():
        for key in keys:
            readers.setdefault(key, []).append(method)
    return readers


def complete_method_keys(config: Mapping) -> dict:
    """A copy of `config` ready for the model builders: the method keys that are None are dropped (a builder's
    own default applies), then the selected method's missing keys take their defaults (``method_sizes``)."""
    readers = key_readers()
    out = {k: v for k, v in config.items() if not (v is None and k in readers)}
    defaults = method_defaults(str(config.get("prompt_method", "none")), str(config.get("method_sizes", "paper")))
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out
