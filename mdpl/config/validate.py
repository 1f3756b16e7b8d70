"""Config validation before any work starts (docs/methods.md §7, §9): one clear line per mistake.

`validate_config(config)` raises UserInputError (a ValueError, mdpl.errors) naming the key, the bad value and what to do, for:
no prompt_method (there is no default: name a preset or set it), unknown dataset / backbone / prompt_method (or a
method without a variant for the backbone), a key that only another method reads, prompt layers outside
``[0, num_layers)``, non-positive prompt lengths, ``top_k`` > ``mem_size``, ``per_gpu_batchsize`` <= 0,
missing ratios outside [0, 1], unknown missing types, ``test_only`` without ``load_path``, a ``load_path``
that does not exist, and a ``data_root`` that is not a folder or lacks the arrow files of the run. Also the
value types and ranges of the run settings (`check_switches`, `check_model_sizes`, `check_trainer`,
`check_optimisation`, `check_data_options`: on/off keys that are not booleans, sizes that do not divide, GPUs
without CUDA, unknown precision, a run length of 0, warmup/decay/optimizer values, sweep lists) and the files the
run reads or writes (`check_files`: each backbone card's weights file and its SHA-256 key, the format of load_path
and resume_from, the tokenizer folder, dcp_dynamic_queries, log_dir, missing_table_root and pixel_cache). The
backbone's own keys are checked by its card's sizes dataclass (`check()`); an unknown backbone is an error.

Only keys present in the config are checked (tests hand partial configs with stub models); the data
checks can be switched off when the caller injects its own DataModule (``check_data=False``).

Method keys: the keys that only some prompt methods read (their config classes, `mdpl.prompts.keys`) are ``None`` in a config unless the
selected method's defaults or the user set them. `complete_method_keys` fills the selected method's unset keys
(the papers' values, or the small ones of ``method_sizes='tiny'``); a key of another method that is not ``None``
was set by the user and is refused, naming the method that reads it.
"""
from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdpl.config.sections import METRIC_INPUTS
from mdpl.data.registry import available_datasets, dataset_spec
from mdpl.data.dataset import MMIMDB_ITEMS, arrow_path
from mdpl.data.missing import MISSING_TYPES, SPLITS
from mdpl.data.pixel_cache import pixel_cache_folder
from mdpl.data.scenarios import sweep_specs
from mdpl.data.settings import SELECTION_SPLITS, DataConfig, MissingConfig
from mdpl.errors import UserInputError
from mdpl.prompts.keys import (METHOD_SIZES, complete_method_keys, key_readers,  # noqa: F401 (re-exported)
                               method_default, method_defaults, method_presets)

def _methods() -> list[str]:
    from mdpl.prompts.registry import available_methods  # lazy: imports the prompt modules
    return available_methods()


def _backbones() -> list[str]:
    from mdpl.backbones.registry import available_backbones  # lazy: imports the backbone modules
    return available_backbones()


def _backbone_name(config: Mapping) -> str:
    """The run's backbone: the key, else the selected method's paper backbone."""
    from mdpl.backbones.registry import method_backbone
    value = config.get("backbone")
    return method_backbone(str(config.get("prompt_method") or "")) if value is None else value


def _card(config: Mapping):
    """The card of the run's backbone (UserInputError for an unknown one)."""
    from mdpl.backbones.registry import backbone_card
    return backbone_card(str(_backbone_name(config)))


def _fail(message: str) -> None:
    raise UserInputError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ components
def check_dataset_and_backbone(config: Mapping) -> None:
    dataset = config.get("dataset")
    if dataset not in available_datasets():
        _fail(f"unknown dataset {dataset!r}; choose one of {', '.join(available_datasets())} "
              "(e.g. with task_finetune_mmimdb)")
    backbone = _backbone_name(config)
    if backbone not in _backbones():
        _fail(f"unknown backbone {backbone!r}; choose one of {', '.join(_backbones())}")


def _method_hint(config: Mapping) -> str:
    """' (prompt_type is read by map: name `map`)' when the user set keys of exactly one method, else ''."""
    readers = key_readers()
    given = sorted(k for k in readers if config.get(k) is not None)
    methods = {m for k in given for m in readers[k]}
    if len(methods) != 1:
        return ""
    method = methods.pop()
    verb = "is" if len(given) == 1 else "are"
    return f" ({', '.join(given)} {verb} read by {method}: {_selector(method)})"


def _selector(method: str) -> str:
    """How a user selects `method`: its named config, or the key."""
    preset = method_presets().get(method)
    return f"name `{preset}`" if preset else f"set prompt_method={method}"


def check_method_chosen(config: Mapping) -> None:
    """There is no default method: a run names a preset or sets prompt_method."""
    if config.get("prompt_method") in (None, ""):
        presets = ", ".join(method_presets().values())
        _fail(f"no prompt method selected: name a method preset ({presets}, e.g. `with task_finetune_mmimdb map`) "
              f"or set prompt_method={'|'.join(_methods())}{_method_hint(config)}")


def check_method_keys(config: Mapping) -> None:
    """A key that only other methods read must not be set: it would be silently ignored."""
    method = config.get("prompt_method")
    if config.get("method_sizes", "paper") not in METHOD_SIZES:
        _fail(f"method_sizes={config['method_sizes']!r} must be one of {', '.join(METHOD_SIZES)}")
    for key, methods in key_readers().items():
        if method not in methods and config.get(key) is not None:
            readers = " and ".join(methods)
            _fail(f"{key}={config[key]!r} is read only by {readers}, but prompt_method is {method!r}; remove {key} "
                  f"or select {' / '.join(method_presets().get(m, m) for m in methods)}")


def check_prompt_method(config: Mapping) -> None:
    """The method must be registered (every registered method runs on every backbone)."""
    check_method_chosen(config)
    method = config.get("prompt_method")
    if method not in _methods():
        _fail(f"unknown prompt_method {method!r}; registered methods: {', '.join(_methods())}")


def _check_positive(config: Mapping, key: str) -> None:
    if key in config and not (_is_int(config[key]) and config[key] > 0):
        _fail(f"{key} must be a positive integer, got {config[key]!r}")


def _depth(config: Mapping) -> tuple[int, str]:
    """Blocks in every stream of the configured backbone (its card's sizes), and how messages name it."""
    sizes = _card(config).sizes
    keys = sizes.flat_keys()
    given = {key: config[key] for key in keys.values() if isinstance(config.get(key), int)}
    return sizes.from_flat(given).depth, sizes.described_as


def _widths(config: Mapping) -> dict[str, int]:
    """Stream name -> width of the configured backbone, from its size keys (a key that is not a positive integer
    keeps its default: the sizes' own check names it)."""
    sizes = _card(config).sizes
    given = {key: config[key] for key in sizes.flat_keys().values() if _is_int(config.get(key)) and config[key] > 0}
    return sizes.from_flat(given).stream_widths


def check_prompt_sizes(config: Mapping) -> None:
    """The selected method's options, checked by its own config class against the backbone depth (§3, §4, §6)."""
    from mdpl.prompts.base import BackboneInfo, StreamInfo
    from mdpl.prompts.registry import baseline_method, method_class

    method = config.get("prompt_method") or baseline_method()
    if method not in _methods():
        return
    config_class = method_class(method).config_class
    if not any(config.get(key) is not None for key in config_class.keys()):
        return   # a partial config (tests, stub models): the method checks its defaults when it is built
    try:
        options = config_class.from_config(complete_method_keys(config))
    except TypeError as err:  # a value of the wrong kind reaching the dataclass
        _fail(f"invalid options for {method}: {err}")
    n, what = _depth(config)
    streams = tuple(StreamInfo(name, width, n, 1, ("text", "image") if name == "joint" else (name,),
                               causal=name == "text")
                    for name, width in _widths(config).items())
    options.check(BackboneInfo(streams, what=what))


def check_batch(config: Mapping) -> None:
    for key in ("per_gpu_batchsize", "batch_size"):
        if key in config and not (_is_int(config[key]) and config[key] > 0):
            _fail(f"{key} must be a positive integer, got {config[key]!r} (e.g. {key}=32)")
    lr = config.get("learning_rate")
    if not config.get("test_only") and "learning_rate" in config and not (_is_number(lr) and lr > 0):
        _fail(f"learning_rate must be > 0, got {lr!r} (a number, e.g. learning_rate=1e-2; the warmup/decay "
              "schedule scales it)")


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
    expected = ", ".join(dataset_spec(dataset).arrow_file_names())
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


# ---------------------------------------------------------------------------------- run settings
BOOL_KEYS = ("test_only", "finetune", "frozen_eval_mode", "simulate_missing", "compile", "resume",
             "dynamic_text_padding", "find_unused_parameters")
"""Switches of the run: True or False only (a string such as 'no' would count as True). The methods' and the
backbones' own switches are their boolean keys (`method_bool_keys`, `backbone_bool_keys`)."""


def backbone_bool_keys() -> list[str]:
    """The registered backbones' keys whose default is a boolean."""
    from mdpl.backbones.registry import available_backbones, backbone_card
    return sorted({k for name in available_backbones() for k in backbone_card(name).sizes.bool_keys()})


def method_bool_keys() -> list[str]:
    """The registered methods' keys whose default is a boolean."""
    from mdpl.prompts.registry import method_keys
    return sorted({k for keys in method_keys().values() for k, v in keys.items() if isinstance(v, bool)})
OPTIMIZER_IMPLS = ("legacy_hf", "torch")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DURATION = re.compile(r"\d+:\d+:\d+:\d+")   # Lightning's time-based val_check_interval, 'DD:HH:MM:SS'


def _check_int(config: Mapping, key: str, minimum: int, hint: str = "") -> None:
    """`key` (when present and not None) must be an int >= minimum."""
    value = config.get(key)
    if value is not None and not (_is_int(value) and value >= minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        _fail(f"{key}={value!r} must be {what}{hint}")


def _check_number(config: Mapping, key: str, low: float, high: float | None = None, low_open: bool = False,
                  hint: str = "") -> None:
    """`key` (when present and not None) must be a number in [low, high) (``low_open``: (low, high))."""
    value = config.get(key)
    if value is None:
        return
    ok = _is_number(value) and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" if high is None else \
            f"in {'(' if low_open else '['}{low:g}, {high:g})"
        _fail(f"{key}={value!r} must be a number {bounds}{hint}")


def check_switches(config: Mapping) -> None:
    """On/off keys must be booleans: `test_only=no` would otherwise be a (truthy) string."""
    for key in (*BOOL_KEYS, *backbone_bool_keys(), *method_bool_keys()):
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            _fail(f"{key}={value!r} must be True or False (e.g. {key}=True)")
    value = config.get("fast_dev_run", False)
    if not (isinstance(value, bool) or (_is_int(value) and value >= 0)):
        _fail(f"fast_dev_run={value!r} must be True, False or a number of batches (e.g. fast_dev_run=2)")


def check_model_sizes(config: Mapping) -> None:
    """The selected backbone's keys (its card's sizes dataclass: positive integers that fit together, heads dividing
    widths, patches tiling images); only the keys present are checked (tests hand partial configs)."""
    sizes = _card(config).sizes
    given = {key for key in sizes.flat_keys().values() if config.get(key) is not None}
    if not given:
        return
    sizes.from_flat(config).check()


def check_trainer(config: Mapping) -> None:
    """Devices, precision, determinism, run length and validation interval: what the Trainer is built from."""
    _check_int(config, "num_gpus", 0, " (GPUs per node; 0 = CPU)")
    _check_int(config, "num_nodes", 1)
    _check_int(config, "num_cpu_processes", 1, " (CPU processes per node when num_gpus=0; 1 = no DDP)")
    _check_int(config, "num_workers", 0, " (DataLoader worker processes; 0 = load in the main process)")
    gpus = config.get("num_gpus") or 0
    if gpus > 0:
        import torch
        if not torch.cuda.is_available():
            _fail(f"num_gpus={gpus} but CUDA is not available on this machine; pass num_gpus=0 to run on the CPU")
        if gpus > torch.cuda.device_count():
            _fail(f"num_gpus={gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible; lower "
                  "num_gpus (or check CUDA_VISIBLE_DEVICES)")
    if "precision" in config:
        from mdpl.config.sections import PRECISIONS
        value = config["precision"]
        if isinstance(value, bool) or str(value) not in PRECISIONS:
            _fail(f"precision={value!r} is not supported; use one of {', '.join(sorted(set(PRECISIONS.values())))} "
                  "(or 16, 32, bf16)")
    value = config.get("deterministic", "warn")
    if not (value is True or value is False or value == "warn"):
        _fail(f"deterministic={value!r} must be True, False or 'warn'")
    if "exp_name" in config and not str(config["exp_name"] or "").strip():
        _fail("exp_name is empty; it names the run directory log_dir/<exp_name>_seed<seed>_from_<checkpoint> "
              "(e.g. exp_name=finetune_food101)")
    if config.get("test_only"):
        return   # the keys below only shape training
    _check_int(config, "max_epoch", 1, " (epochs to train, e.g. max_epoch=20)")
    steps = config.get("max_steps")
    if steps is not None and steps != -1 and not (_is_int(steps) and steps > 0):
        _fail(f"max_steps={steps!r} must be a positive number of optimizer steps (or None: max_epoch decides)")
    _check_int(config, "checkpoint_every_n_steps", 0, " (0 = last.ckpt at epoch ends only)")
    value = config.get("val_check_interval")
    if value is not None and not ((isinstance(value, float) and 0 < value <= 1) or (_is_int(value) and value >= 1)
                                  or (isinstance(value, str) and _DURATION.fullmatch(value))):
        _fail(f"val_check_interval={value!r} must be a fraction of an epoch in (0, 1] (e.g. 0.2), a number of "
              "training batches >= 1 or a duration 'DD:HH:MM:SS'")


def check_optimisation(config: Mapping) -> None:
    """Optimizer and learning-rate schedule keys (training only; learning_rate itself: `check_batch`)."""
    if config.get("test_only"):
        return
    if config.get("optimizer_impl", "legacy_hf") not in OPTIMIZER_IMPLS:
        _fail(f"optimizer_impl={config['optimizer_impl']!r} is not supported; use {' or '.join(OPTIMIZER_IMPLS)}")
    _check_number(config, "weight_decay", 0.0, hint=" (e.g. weight_decay=0.01)")
    _check_number(config, "lr_mult", 0.0, low_open=True, hint=" (the head's learning rate factor, e.g. lr_mult=1)")
    _check_number(config, "end_lr", 0.0, hint=" (the learning rate the decay ends at, e.g. end_lr=0)")
    power = config.get("decay_power", 1)
    if power != "cosine":
        if not (_is_number(power) and power >= 0):
            _fail(f"decay_power={power!r} must be a polynomial power >= 0 (e.g. decay_power=1) or 'cosine'")
        lr, end_lr = config.get("learning_rate"), config.get("end_lr", 0.0)
        if _is_number(lr) and _is_number(end_lr) and end_lr >= lr:
            _fail(f"end_lr={end_lr!r} must be smaller than learning_rate={lr!r}: the polynomial decay goes from "
                  "learning_rate down to end_lr")
    warm = config.get("warmup_steps", 0)
    if not ((_is_int(warm) and warm >= 0) or (isinstance(warm, float) and 0 <= warm < 1)):
        _fail(f"warmup_steps={warm!r} must be a number of optimizer steps (an integer >= 0, e.g. 2500) or a "
              "fraction of the total steps in [0, 1) (e.g. 0.1)")


def check_data_options(config: Mapping) -> None:
    """mmimdb_items, image_transform, and the evaluation sweep's test_types / test_ratios."""
    from mdpl.data.transforms import TRANSFORMS
    if config.get("mmimdb_items", "plot") not in MMIMDB_ITEMS:
        _fail(f"mmimdb_items={config['mmimdb_items']!r} must be one of {', '.join(MMIMDB_ITEMS)}")
    transform = config.get("image_transform") or ""
    if transform and transform not in TRANSFORMS:
        _fail(f"image_transform={transform!r} must be '' (the backbone's) or one of {', '.join(sorted(TRANSFORMS))}")
    if config.get("test_types") is not None or config.get("test_ratios") is not None:
        sweep_specs(MissingConfig.from_flat(dict(config)), int(config.get("seed", 0)))
    if config.get("metric_inputs", "probabilities") not in METRIC_INPUTS:
        _fail(f"metric_inputs={config['metric_inputs']!r} must be one of {', '.join(METRIC_INPUTS)}")
    primary = config.get("primary_metric") or ""
    names = dataset_spec(config.get("dataset", "mmimdb")).logged_metrics()
    if primary and primary not in names:
        _fail(f"primary_metric={primary!r} is not a metric of dataset={config.get('dataset', 'mmimdb')!r}; choose "
              f"one of {', '.join(names)} (or '' for the dataset's)")
    selection = config.get("selection_split", "val")
    if selection not in SELECTION_SPLITS:
        _fail(f"selection_split={selection!r} must be one of {', '.join(SELECTION_SPLITS)} (the split the validation "
              "loop reads: checkpoint selection and early stopping; 'test' only to reproduce a paper protocol)")


def _checkpoint_problem(path: Path) -> str:
    """'' when `path` looks like a file that torch.load or safetensors reads, else what is wrong with it.

    Cheap (reads the first bytes and the zip directory at the end): a text file, an empty file or a zip archive
    cut short (an interrupted copy) is found before any work; a file that passes may still fail to load.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "is empty"
    if zipfile.is_zipfile(path):
        return ""                     # torch.save (PyTorch >= 1.6) and TorchScript archives are zip files
    if head[:2] == b"PK":
        return "is a damaged or truncated zip archive (an interrupted copy or download?)"
    if head[:1] == b"\x80":
        return ""                     # a legacy torch.save pickle
    if path.suffix == ".safetensors" and size > 8 and 0 < int.from_bytes(head, "little") <= size - 8:
        return ""
    return "is not a PyTorch checkpoint (neither a torch.save archive nor a safetensors file)"


def _check_checkpoint_file(key: str, path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        _fail(f"{key} {path!r} does not exist; pass {what}")
    if p.is_dir():
        _fail(f"{key} {path!r} is a folder; pass {what}")
    problem = _checkpoint_problem(p)
    if problem:
        _fail(f"{key} {path!r} {problem}; pass {what}")


def _folder_problem(path: str, writable: bool) -> str:
    """'' when `path` is a folder or can be created as one (and, with `writable`, written to); else why not."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return "is a file, not a folder"
        return "is not writable" if writable and not os.access(p, os.W_OK | os.X_OK) else ""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file"
    if writable and not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return ""


def _weight_cards() -> list:
    """The cards of the backbones whose weights file has a key of its own (not ``load_path``)."""
    from mdpl.backbones.registry import available_backbones, backbone_card
    return [c for c in map(backbone_card, available_backbones()) if c.weights.key != "load_path"]


def _check_weights_file(config: Mapping, owner, backbone: str, test_only: bool) -> None:
    """The weights file of the card `owner` (+ its SHA-256 key): read only by that backbone, not with test_only."""
    spec = owner.weights
    path_key, sha_key = spec.key, spec.sha_key
    path, sha = str(config.get(path_key) or ""), str(config.get(sha_key) or "") if sha_key else ""
    if backbone != owner.name:
        for key, value in ((path_key, path), (sha_key, sha)):
            if value:
                _fail(f"{key}={value!r} is read only by backbone={owner.name}, but backbone is {backbone!r}; remove "
                      f"{key} or name on_{owner.name}")
    if sha and not path:
        _fail(f"{sha_key} is set but {path_key} is empty, so there is no file to check; set "
              f"{path_key}={spec.placeholder} or remove {sha_key}")
    if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        _fail(f"{sha_key}={sha!r} is not a SHA-256 digest (64 hex digits, e.g. `sha256sum {spec.example}`)")
    if path and not test_only:   # test_only: every weight comes from load_path, this file is not read
        _check_checkpoint_file(path_key, path, spec.what)


def check_files(config: Mapping, data: bool = True) -> None:
    """The files and folders the run reads or writes, before any work: the backbones' weights files (+ their SHA-256
    keys; their cards' ``weights``), load_path's format, resume_from, dcp_dynamic_queries, log_dir and (``data``: the DataModule's)
    the tokenizer folder, missing_table_root and pixel_cache (a bool or a string; the folder exists or can be
    created)."""
    card, test_only = _card(config), bool(config.get("test_only"))
    backbone = card.name
    for owner in _weight_cards():
        _check_weights_file(config, owner, backbone, test_only)
    load_path = str(config.get("load_path") or "")
    if load_path and Path(load_path).is_dir():
        if not test_only and card.weights.key != "load_path":
            _fail(f"load_path {load_path!r} is a folder; with backbone={backbone} load_path is a checkpoint file of "
                  "this classifier (e.g. <run_dir>/checkpoints/last.ckpt) or empty")
        if not test_only and not any((Path(load_path) / name).is_file() for name in HF_WEIGHT_FILES):
            _fail(f"load_path {load_path!r} is a folder without {' or '.join(HF_WEIGHT_FILES)}; pass the ViLT "
                  "checkpoint file (vilt_200k_mlm_itm.ckpt) or a Hugging Face ViltModel folder")
    elif load_path and Path(load_path).exists():
        problem = _checkpoint_problem(Path(load_path))
        if problem and test_only:
            _fail(f"load_path {load_path!r} {problem}; test_only=True needs the .ckpt file written by a training run "
                  "(e.g. <run_dir>/checkpoints/best-*.ckpt)")
        if problem:
            _fail(f"load_path {load_path!r} {problem}; pass a ViLT checkpoint, a Hugging Face ViltModel weight file "
                  "or an mdpl .ckpt written by a training run")
    resume_from = str(config.get("resume_from") or "")
    if resume_from and not test_only and Path(resume_from).exists():
        _check_checkpoint_file("resume_from", resume_from, "the last.ckpt (or best-*.ckpt) of an mdpl training run")
    tokenizer = str(config.get("tokenizer") or "")
    if data and card.tokenizer == "bert" and tokenizer:
        folder = Path(tokenizer)
        if not folder.exists():
            _fail(f"tokenizer={tokenizer!r} does not exist; set tokenizer=<folder with bert-base-uncased's vocab.txt> "
                  "(or tokenizer='' to use the Hugging Face cache)")
        if folder.is_dir() and not (folder / "vocab.txt").is_file():
            _fail(f"tokenizer={tokenizer!r} is a folder without vocab.txt; point it at the folder holding "
                  "bert-base-uncased's vocab.txt")
    queries = str(config.get("dcp_dynamic_queries") or "")
    if queries and not Path(queries).is_file():
        _fail(f"dcp_dynamic_queries={queries!r} is not a file; pass the file holding the dynamic queries of the "
              "reference DCP run (or remove the key)")
    if "log_dir" in config:
        problem = _folder_problem(str(config["log_dir"] or "."), writable=True)
        if problem:
            _fail(f"log_dir={config['log_dir']!r} {problem}; the run directories go there (set log_dir=<folder>)")
    tables = config.get("reference_missing_tables") or {}
    if not isinstance(tables, Mapping) or set(tables) - set(SPLITS):
        _fail(f"reference_missing_tables={tables!r} must map train/val/test to .pt files (or '')")
    for split, path in tables.items():
        if path and not os.path.isfile(str(path)):
            _fail(f"reference_missing_tables.{split}={path!r} is not a file; pass the .pt table a reference repo saved")
    root = str(config.get("missing_table_root") or "")
    problem = _folder_problem(root, writable=False) if root and data else ""
    if problem:   # a read-only folder is fine: tables found there are read, new ones are kept in memory
        _fail(f"missing_table_root={root!r} {problem}; set it to a folder (or '' for <data_root>/missing_tables)")
    cache = config.get("pixel_cache", "")
    if cache is not None and not isinstance(cache, (str, bool)):
        _fail(f"pixel_cache={cache!r} must be '' (off: decode every epoch), a folder path, or True "
              "(<data_root>/pixel_cache)")
    folder = pixel_cache_folder(DataConfig.from_flat(dict(config))) if data and cache not in (None, "", False) else None
    problem = _folder_problem(str(folder), writable=False) if folder is not None else ""
    if problem:   # read-only is fine when the cache files are there; writing them says so otherwise
        _fail(f"pixel_cache={cache!r} ({folder}) {problem}; set it to a folder for the decoded images "
              "(or '' to decode every epoch)")


# ------------------------------------------------------------------------------------------ entry
def validate_config(config: Mapping, check_data: bool = True) -> None:
    """Raise UserInputError (one line) for the first invalid setting; see the module docstring.

    ``check_data=False`` skips the data_root checks (a DataModule is injected by the caller).
    """
    check_dataset_and_backbone(config)
    check_prompt_method(config)
    check_method_keys(config)
    check_switches(config)
    check_model_sizes(config)
    check_prompt_sizes(config)
    check_batch(config)
    check_missing(config)
    check_trainer(config)
    check_optimisation(config)
    check_data_options(config)
    check_load_path(config)
    check_files(config, data=check_data)
    if check_data:
        check_data_root(config)
