"""Config validation before any work starts (METHODS.md §7, §9): one clear line per mistake.

`validate_config(config)` raises UserInputError (a ValueError, mdpl.errors) naming the key, the bad value and what to do, for:
no prompt_method (there is no default: name a preset or set it), unknown dataset / backbone / prompt_method (or a
method without a variant for the backbone), a key that only another method reads, prompt layers outside
``[0, num_layers)``, non-positive prompt lengths, ``top_k`` > ``mem_size``, ``per_gpu_batchsize`` <= 0,
missing ratios outside [0, 1], unknown missing types, ``test_only`` without ``load_path``, a ``load_path``
that does not exist, and a ``data_root`` that is not a folder or lacks the arrow files of the run.

Only keys present in the config are checked (tests hand partial configs with stub models); the data
checks can be switched off when the caller injects its own DataModule (``check_data=False``).

Method keys: the keys that only some prompt methods read (`METHOD_KEYS`) are ``None`` in a config unless the
selected method's defaults or the user set them. `complete_method_keys` fills the selected method's unset keys
(the papers' values, or the small ones of ``method_sizes='tiny'``); a key of another method that is not ``None``
was set by the user and is refused, naming the method that reads it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdpl.data.constants import ARROW_SPLITS, NUM_CLASSES
from mdpl.data.dataset import arrow_path
from mdpl.data.missing import MISSING_TYPES, SPLITS
from mdpl.errors import UserInputError

BACKBONES = ("vilt", "clip")
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


def _vilt_methods() -> list[str]:
    from mdpl.prompts.registry import available_prompt_methods  # lazy: imports the prompt modules
    return available_prompt_methods()


def _clip_methods() -> list[str]:
    """Methods on the CLIP backbone: the two-tower registry (MAP, MemPrompt, none) plus DCP."""
    from mdpl.prompts.registry import clip_prompt_methods  # lazy: imports the prompt modules
    return clip_prompt_methods()


def _fail(message: str) -> None:
    raise UserInputError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ components
def check_dataset_and_backbone(config: Mapping) -> None:
    dataset = config.get("dataset")
    if dataset not in NUM_CLASSES:
        _fail(f"unknown dataset {dataset!r}; choose one of {', '.join(NUM_CLASSES)} (e.g. with task_finetune_mmimdb)")
    backbone = config.get("backbone", "vilt")
    if backbone not in BACKBONES:
        _fail(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def _method_hint(config: Mapping) -> str:
    """' (prompt_type is read by map: name `map`)' when the user set keys of exactly one method, else ''."""
    readers = key_readers()
    given = sorted(k for k in readers if config.get(k) is not None)
    methods = {m for k in given for m in readers[k]}
    if len(methods) != 1:
        return ""
    method = methods.pop()
    verb = "is" if len(given) == 1 else "are"
    return f" ({', '.join(given)} {verb} read by {method}: name `{METHOD_PRESETS.get(method, method)}`)"


def check_method_chosen(config: Mapping) -> None:
    """There is no default method: a run names a preset or sets prompt_method."""
    if config.get("prompt_method") in (None, ""):
        presets = ", ".join(METHOD_PRESETS.values())
        _fail(f"no prompt method selected: name a method preset ({presets}, e.g. `with task_finetune_mmimdb map`) "
              f"or set prompt_method={'|'.join(METHOD_PRESETS)}{_method_hint(config)}")


def check_method_keys(config: Mapping) -> None:
    """A key that only other methods read must not be set: it would be silently ignored."""
    method = config.get("prompt_method")
    if config.get("method_sizes", "paper") not in METHOD_SIZES:
        _fail(f"method_sizes={config['method_sizes']!r} must be one of {', '.join(METHOD_SIZES)}")
    for key, methods in key_readers().items():
        if method not in methods and config.get(key) is not None:
            readers = " and ".join(methods)
            _fail(f"{key}={config[key]!r} is read only by {readers}, but prompt_method is {method!r}; remove {key} "
                  f"or select {' / '.join(METHOD_PRESETS.get(m, m) for m in methods)}")


def check_prompt_method(config: Mapping) -> None:
    """The method must be registered for the backbone (ViLT: the registry; CLIP: tower hooks or dcp)."""
    check_method_chosen(config)
    method, backbone = config.get("prompt_method"), config.get("backbone", "vilt")
    vilt, clip = _vilt_methods(), _clip_methods()
    known = sorted({*vilt, *clip})
    if method not in known:
        _fail(f"unknown prompt_method {method!r}; registered methods: {', '.join(known)} "
              f"(backbone 'vilt': {', '.join(vilt)}; backbone 'clip': {', '.join(clip)})")
    if backbone == "vilt" and method not in vilt:
        _fail(f"prompt_method {method!r} has no ViLT variant (backbone 'vilt' supports {', '.join(vilt)}); "
              f"set backbone=clip")
    if backbone == "clip" and method not in clip:
        _fail(f"prompt_method {method!r} has no CLIP variant (backbone 'clip' supports {', '.join(clip)}); "
              f"set backbone=vilt")


def _check_layers(config: Mapping, key: str, n_layers: int, what: str) -> None:
    if key not in config:
        return
    layers = config[key]
    if not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
        _fail(f"{key} must be a list of layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        _fail(f"{key}={list(layers)} has layers {bad} outside 0..{n_layers - 1} ({what} has {n_layers} layers)")


def _check_positive(config: Mapping, key: str) -> None:
    if key in config and not (_is_int(config[key]) and config[key] > 0):
        _fail(f"{key} must be a positive integer, got {config[key]!r}")


def check_prompt_sizes(config: Mapping) -> None:
    """Prompt layers within the backbone depth, positive lengths, top_k <= mem_size (§3, §4, §6).

    Like every check here, only the keys the config holds (not None) are checked.
    """
    config = {k: v for k, v in config.items() if v is not None}
    method = config.get("prompt_method", "none")
    if config.get("backbone", "vilt") == "clip":
        n_layers = min(int(config.get("clip_vision_layers", 12)), int(config.get("clip_text_layers", 12)))
        what = "the CLIP backbone (clip_vision_layers, clip_text_layers)"
    else:
        n_layers, what = int(config.get("num_layers", 12)), "the ViLT backbone (num_layers)"
    if method == "dcp":
        value = config.get("prompt_depth", 6)
        if not (_is_int(value) and 0 <= value <= n_layers):
            _fail(f"prompt_depth={value!r} must be an integer in 0..{n_layers} ({what} has {n_layers} layers)")
        if value > 0:
            _check_positive(config, "prompt_length")
        return
    if method == "map":
        _check_positive(config, "prompt_length")
        _check_layers(config, "prompt_layers", n_layers, what)
    elif method == "memprompt":
        for key in ("gen_prompt_length", "shared_prompt_length", "mem_size", "top_k", "bottleneck_dim"):
            _check_positive(config, key)
        for key in ("gen_prompt_layers", "shared_prompt_layers"):
            _check_layers(config, key, n_layers, what)
        if "top_k" in config and "mem_size" in config and config["top_k"] > config["mem_size"]:
            _fail(f"top_k={config['top_k']} exceeds mem_size={config['mem_size']}: "
                  f"MemPrompt retrieves top_k of the mem_size memory prompts; lower top_k")


def check_batch(config: Mapping) -> None:
    for key in ("per_gpu_batchsize", "batch_size"):
        if key in config and not (_is_int(config[key]) and config[key] > 0):
            _fail(f"{key} must be a positive integer, got {config[key]!r} (e.g. {key}=32)")
    if not config.get("test_only") and "learning_rate" in config and not float(config["learning_rate"]) > 0:
        _fail(f"learning_rate must be > 0, got {config['learning_rate']!r} (the warmup/decay schedule scales it)")


def _check_ratio(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        _fail(f"{key}={value!r} must be a number in [0, 1]")


def _check_type(key: str, value: Any) -> None:
    if value not in MISSING_TYPES:
        _fail(f"{key}={value!r} is not a missing type; choose one of {', '.join(MISSING_TYPES)}")


def check_missing(config: Mapping) -> None:
    """missing_ratio / missing_type dicts (train, val, test), both_ratio, test_ratio, test_type (§1.4)."""
    for key, check in (("missing_ratio", _check_ratio), ("missing_type", _check_type)):
        if key not in config:
            continue
        spec = config[key]
        if not isinstance(spec, Mapping) or set(spec) != set(SPLITS):
            _fail(f"{key} must be a dict with keys train, val, test, got {spec!r} "
                  f"(e.g. '{key}={{\"train\": ..., \"val\": ..., \"test\": ...}}')")
        for split in SPLITS:
            check(f"{key}.{split}", spec[split])
    if "both_ratio" in config:
        _check_ratio("both_ratio", config["both_ratio"])
    if config.get("test_ratio") is not None:
        _check_ratio("test_ratio", config["test_ratio"])
    if config.get("test_type") is not None:
        _check_type("test_type", config["test_type"])


def check_load_path(config: Mapping) -> None:
    load_path = config.get("load_path") or ""
    if config.get("test_only") and not load_path:
        _fail("test_only=True needs load_path=<checkpoint.ckpt> (e.g. <run_dir>/checkpoints/best-*.ckpt)")
    if load_path and not Path(load_path).exists():
        _fail(f"load_path {load_path!r} does not exist; pass a ViLT checkpoint, a Hugging Face ViltModel "
              f"weight file/folder, or an mdpl .ckpt written by a training run")


def check_data_root(config: Mapping) -> None:
    """data_root must be a folder holding the arrow files of the splits this run reads."""
    dataset, root = config["dataset"], config.get("data_root") or ""
    expected = ", ".join(f"{stem}.arrow" for stem in ARROW_SPLITS[dataset].values())
    command = f"python make_arrow.py --dataset {dataset} --root <raw {dataset} folder> --out <arrow folder>"
    if not root or not Path(root).is_dir():
        _fail(f"data_root={root!r} is not a folder; it must hold {expected} (create them with `{command}`, "
              f"then pass data_root=<arrow folder>)")
    splits = ("test",) if config.get("test_only") else SPLITS
    missing = [arrow_path(root, dataset, s).name for s in splits if not arrow_path(root, dataset, s).is_file()]
    if missing:
        _fail(f"data_root={root!r} lacks {', '.join(missing)} (expected {expected}); create them with "
              f"`{command.replace('<arrow folder>', str(root))}`")
    from mdpl.data.dataset import check_arrow_file  # truncated / non-arrow / wrong-schema files: one line
    for split in splits:
        check_arrow_file(arrow_path(root, dataset, split), dataset)


# ------------------------------------------------------------------------------------------ entry
def validate_config(config: Mapping, check_data: bool = True) -> None:
    """Raise UserInputError (one line) for the first invalid setting; see the module docstring.

    ``check_data=False`` skips the data_root checks (a DataModule is injected by the caller).
    """
    check_dataset_and_backbone(config)
    check_prompt_method(config)
    check_method_keys(config)
    check_prompt_sizes(config)
    check_batch(config)
    check_missing(config)
    check_load_path(config)
    if check_data:
        check_data_root(config)
