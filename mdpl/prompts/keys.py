"""The config keys of the registered prompt methods: which method reads which key, and the defaults its paper used.

Every method declares its keys as the fields of its :class:`~mdpl.prompts.base.MethodConfig` (defaults = the
paper's values, ``TINY`` = the small values of ``method_sizes='tiny'``); this module reads them from the registry.
A method key (e.g. ``top_k``) is ``None`` in a config unless the selected method reads it: then it holds the user's
value or the method's default (:func:`complete_method_keys`). A key of another method that is not ``None`` was set
by the user, and config validation refuses it, naming the method that reads it. ``config.py`` derives its
defaults from here.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mdpl.prompts.registry import available_methods, baseline_method, method_class, method_keys, tiny_method_keys

METHOD_SIZES = ("paper", "tiny")


def method_presets() -> dict[str, str]:
    """prompt_method -> the named config (config.py) that selects it, for the registered methods that have one."""
    return {name: method_class(name).preset for name in available_methods() if method_class(name).preset}


def _declared(method: str, attribute: str, default: Any) -> Any:
    """A class attribute the registered `method` declares; `default` for no method or an unknown one."""
    return getattr(method_class(method), attribute) if method in available_methods() else default


def paper_run(method: str, default: tuple[float, int], dataset: str = "") -> tuple[float, int]:
    """(learning rate, seed) the method's reference used on `dataset`; `default` for no method or an unknown one."""
    lr, seed = _declared(method, "paper_run", default)
    return _declared(method, "paper_learning_rates", {}).get(dataset, lr), seed


def paper_missing_type(method: str) -> str:
    """The missing type the method's reference trains and tests with ('both' for no method or an unknown one)."""
    return _declared(method, "paper_missing_type", "both")


def paper_backbone(method: str) -> str:
    """The backbone the method's paper used ('' for no method, an unknown one, or one that names none: the default
    backbone, ``mdpl.backbones.registry.method_backbone``)."""
    return _declared(method, "paper_backbone", "")


def padding_is_inert(method: str) -> bool:
    """Whether the method's outputs are independent of how far texts are padded (so ``dynamic_text_padding`` is
    exact and on by default); False for no method or an unknown one."""
    return bool(_declared(method, "padding_is_inert", False))


def method_image_transform(method: str) -> str:
    """The image transform the method's reference uses ('' = the backbone's; ``PromptMethod.image_transform``)."""
    return str(_declared(method, "image_transform", ""))


def method_defaults(method: str, sizes: str = "paper", dataset: str = "") -> dict[str, Any]:
    """The keys `method` reads with their defaults for ``method_sizes=sizes`` (a fresh copy; {} if unknown); with
    `dataset`, the reference's values on that dataset where the method's config declares them (``DATASETS``)."""
    per_dataset = {}
    if dataset and method in available_methods():
        per_dataset = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in method_class(method).config_class.DATASETS.get(dataset, {}).items()}
    values = {**method_keys().get(method, {}), **per_dataset,
              **(tiny_method_keys().get(method, {}) if sizes == "tiny" else {})}
    return copy.deepcopy(values)


def method_default(method: str, sizes: str, key: str, dataset: str = "") -> Any:
    """Default of `key` when `method` is selected (on `dataset`): its value for that method, None if the method does
    not read it."""
    return method_defaults(method, sizes, dataset).get(key)


def key_readers() -> dict[str, list[str]]:
    """Each method-specific key -> the methods that read it (e.g. prompt_length -> dcp, map)."""
    readers: dict[str, list[str]] = {}
    for method, keys in method_keys().items():
        for key in keys:
            readers.setdefault(key, []).append(method)
    return readers


def complete_method_keys(flat: Mapping) -> dict:
    """A copy of the flat config `flat` with the method keys that are None dropped and the selected method's missing
    keys at their defaults (``method_sizes``): what ``mdpl.config.RunConfig.from_flat`` types."""
    readers = key_readers()
    out = {k: v for k, v in flat.items() if not (v is None and k in readers)}
    defaults = method_defaults(str(flat.get("prompt_method") or baseline_method()), str(flat.get("method_sizes", "paper")),
                               str(flat.get("dataset", "") or ""))
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out
