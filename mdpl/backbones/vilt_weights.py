"""Loading ViLT weights (docs/methods.md §2.2, §12) and reference fine-tuned MAP / MemPrompt checkpoints.

Accepted sources for the backbone (`load_vilt_checkpoint`):

* the original ViLT Lightning checkpoint (``vilt_200k_mlm_itm.ckpt``; weights under
  ``ckpt['state_dict']``, keys of §2.2) or the same keys as a plain state dict;
* a Hugging Face ``ViltModel`` state dict (``embeddings.*``, ``encoder.layer.{i}.*``, ``layernorm.*``,
  ``pooler.*``; optionally prefixed ``vilt.``), as a ``.bin``/``.pt``/``.safetensors`` file or a
  directory holding ``model.safetensors`` / ``pytorch_model.bin``. Query/key/value are concatenated
  into ``qkv``. Note: HF ViLT configs use LayerNorm eps 1e-12 in the encoder; mdpl keeps the
  original ViLT's 1e-6 (§2.1).

The text position table is resized to the model's ``max_text_len`` by bilinear interpolation with
align_corners=False over the position axis (source length and width read from the tensor; D-20). A
table *shorter* than ``max_text_len`` (the original checkpoint has 40 rows) is stretched only when the
caller allows it (config key ``interpolate_text_positions``, what the references do for MM-IMDb,
Food-101 and Hateful Memes); otherwise loading stops with a UserInputError. Every resize is logged.

`load_reference_finetuned` maps a MAP / MemPrompt / SCP fine-tuned Lightning state dict onto
`mdpl.models.PromptedClassifier` (ViLT): backbone keys get the prefix ``backbone.``, prompt-method keys
(``complete_prompt``, ``gen_t_prompt_memory.*``, …) the prefix ``prompt.``, head keys
(``{dataset}_classifier.*``) are unchanged. Loading is strict (D-22) except for an allow-list of
legacy keys (``text_embeddings.position_ids``). `load_reference_checkpoint` is what ``test_only`` uses for
such a file: it first refuses, in one line, a file without a trained head of the dataset (e.g. the ViLT
pre-training checkpoint), one holding another method's prompt modules, and one whose stored config (the
references save theirs under ``hyper_parameters.config``) disagrees on a key that changes the model's outputs.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.registry import available_methods, method_class

BACKBONE_PREFIXES = ("text_embeddings.", "token_type_embeddings.", "transformer.", "pooler.")
TEXT_POS_KEY = "text_embeddings.position_embeddings.weight"
# Keys of the ViLT checkpoint that are not part of the backbone (pre-training heads, legacy buffer).
IGNORED_VILT_KEYS = re.compile(r"^(text_embeddings\.position_ids$|mlm_score\.|itm_score\.|mpp_score\.)")
LEGACY_ALLOWED_KEYS = ("text_embeddings.position_ids",)


@dataclass
class LoadReport:
    """What a loader did: keys loaded, ignored by rule, unexpected (not loaded), missing in the source."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    source_format: str = ""
    notes: list[str] = field(default_factory=list)


# --- reading files ----------------------------------------------------------------------------------
def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path}: checkpoint holds non-tensor Python objects; loading it with "
                      "weights_only=False (only do this for files you trust)")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensor dict of a checkpoint file/directory (Lightning ``state_dict`` unwrapped)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; set load_path to the ViLT .ckpt "
                                "(vilt_200k_mlm_itm.ckpt) or a Hugging Face ViltModel weight file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return dict(load_file(str(path)))
        obj = _torch_load(path)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}); set "
                             "load_path to the ViLT .ckpt (vilt_200k_mlm_itm.ckpt) or a Hugging Face ViltModel "
                             "weight file") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserInputError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# --- key mapping ------------------------------------------------------------------------------------
_HF_LAYER = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_FIXED = {
    "embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
    "embeddings.cls_token": "transformer.cls_token",
    "embeddings.position_embeddings": "transformer.pos_embed",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "layernorm.weight": "transformer.norm.weight",
    "layernorm.bias": "transformer.norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}


def is_hf_vilt(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "vilt.embeddings.")) for k in state)


def hf_vilt_to_vilt(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a Hugging Face ViltModel state dict to ViLT checkpoint keys (§2.2). Returns (mapped, unmapped)."""
    state = {k[len("vilt."):] if k.startswith("vilt.") else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in state.items():
        if key.startswith("embeddings.text_embeddings."):
            out["text_embeddings." + key[len("embeddings.text_embeddings."):]] = value
        elif key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
        elif (m := layer.match(key)) is not None:
            i, name, kind = int(m.group(1)), m.group(2), m.group(3)
            if name in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                qkv.setdefault((i, kind), {})[name.rsplit(".", 1)[1]] = value
            elif name in _HF_LAYER:
                out[f"transformer.blocks.{i}.{_HF_LAYER[name]}.{kind}"] = value
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"HF ViLT layer {i} lacks some of query/key/value {kind}")
        out[f"transformer.blocks.{i}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out, unmapped


def interpolate_text_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a [L0, D] position table to [length, D]: bilinear, align_corners=False (§2.2).

    Along the position axis row j blends rows floor(s) and floor(s)+1 with s = (j+0.5)·L0/length − 0.5
    (clamped at 0); along the feature axis it is the identity.
    """
    l0, d = table.shape
    if l0 == length:
        return table.clone()
    out = F.interpolate(table.float()[None, None], size=(length, d), mode="bilinear", align_corners=False)
    return out[0, 0].to(table.dtype)


# --- backbone loader --------------------------------------------------------------------------------
def _backbone_of(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _fit_text_positions(state: dict[str, torch.Tensor], target: torch.Size, allow_stretch: bool,
                        report: LoadReport) -> None:
    """Resize the checkpoint's text position table to the model's ``max_text_len`` rows (see module doc)."""
    table = state[TEXT_POS_KEY]
    if table.ndim != 2 or table.shape[1] != target[1]:
        raise UserInputError(f"{TEXT_POS_KEY}: checkpoint shape {tuple(table.shape)} has width "
                             f"{table.shape[-1]}, the model needs {target[1]} (check hidden_size)")
    rows, length = table.shape[0], target[0]
    if rows == length:
        return
    if rows < length and not allow_stretch:
        raise UserInputError(
            f"max_text_len={length} exceeds the {rows} text positions of the ViLT checkpoint; set "
            f"interpolate_text_positions=True to stretch its position table to {length} rows by interpolation "
            f"(what the reference code does), or use max_text_len<={rows}")
    from pytorch_lightning.utilities import rank_zero_info  # lazy: Lightning is heavy to import

    state[TEXT_POS_KEY] = interpolate_text_positions(table, length)
    note = f"text positions interpolated {rows} -> {length}"
    report.notes.append(note)
    rank_zero_info(f"[mdpl] {note}")


def load_vilt_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                         interpolate_text_positions: bool = False) -> LoadReport:
    """Load ViLT weights into a `ViLTBackbone` (or a classifier's ``.backbone``). Returns a `LoadReport`.

    Raises FileNotFoundError for a missing file and UserInputError (a ValueError, naming the keys) for a file
    that cannot be read, and when backbone keys are missing or shapes do not fit. Unexpected keys are reported
    with a warning. A checkpoint text position table shorter than the model's ``max_text_len`` is interpolated only with
    ``interpolate_text_positions=True`` (else UserInputError naming max_text_len, the table length and the key).
    """
    backbone = _backbone_of(model)
    raw = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    name = "ViLT checkpoint" if isinstance(source, Mapping) else f"ViLT checkpoint {source}"
    report = LoadReport()
    if is_hf_vilt(raw):
        state, unmapped = hf_vilt_to_vilt(raw)
        report.source_format = "huggingface-vilt"
        report.unexpected.extend(k for k in unmapped if not k.endswith("position_ids"))
        report.ignored.extend(k for k in unmapped if k.endswith("position_ids"))
    else:
        state, report.source_format = dict(raw), "vilt-lightning"
    own = backbone.state_dict()
    for key in list(state):
        if IGNORED_VILT_KEYS.match(key):
            report.ignored.append(key)
            del state[key]
        elif key not in own:
            report.unexpected.append(key)
            del state[key]
    if TEXT_POS_KEY in state:
        _fit_text_positions(state, own[TEXT_POS_KEY].shape, interpolate_text_positions, report)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise UserInputError(f"{name} does not fit the model config (sizes from hidden_size, num_layers, "
                             "patch_size, image_size, vocab_size): " + "; ".join(bad[:8]))
    missing = [k for k in own if k not in state]
    hard_missing = [k for k in missing if not k.startswith("pooler.")]
    if hard_missing:
        raise UserInputError(f"{name} lacks {len(hard_missing)} backbone keys, e.g. {hard_missing[:5]}; "
                             "is load_path a ViLT / HF ViltModel checkpoint? (evaluate an mdpl run's .ckpt with "
                             "test_only=True, continue it with resume_from=...)")
    backbone.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    report.missing = missing
    if missing:
        warnings.warn(f"ViLT checkpoint has no {missing}; these keep their random init")
    if report.unexpected:
        warnings.warn(f"ViLT checkpoint keys not used: {report.unexpected[:10]}"
                      + (f" (+{len(report.unexpected) - 10} more)" if len(report.unexpected) > 10 else ""))
    return report


# --- reference fine-tuned checkpoints -----------------------------------------------------------------
REFERENCE_CONFIG_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "max_text_len",
                         "vocab_size")
"""Backbone config keys with the same name and meaning in the references and mdpl that define the trained model
(each method adds its own: ``reference_config_keys`` of its class; sizes are also checked by shape)."""


def reference_prompt_keys() -> dict[str, tuple[str, ...]]:
    """Method -> key prefixes of its prompt modules in its reference checkpoints, for the registered methods whose
    reference checkpoints are read (their ``reference_prompt_keys``)."""
    return {m: method_class(m).reference_prompt_keys for m in available_methods()
            if method_class(m).reference_prompt_keys}


_HEAD_KEY = re.compile(r"^([a-z0-9]+)_classifier\.")


def reference_heads(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Datasets whose ``{dataset}_classifier`` head the state dict holds (sorted)."""
    return sorted({m.group(1) for k in state if (m := _HEAD_KEY.match(k))})


def reference_methods(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Methods whose prompt modules the state dict holds (sorted; [] = no prompts, the baseline's layout)."""
    return sorted(m for m, prefixes in reference_prompt_keys().items() if any(k.startswith(prefixes) for k in state))


def reference_config_mismatches(stored: Mapping, run: Any) -> list[str]:
    """'key: checkpoint=... vs config=...' for the `REFERENCE_CONFIG_KEYS` of the run's method (`run`: the run
    config, ``mdpl.config.RunConfig``) that the reference checkpoint's stored config `stored` holds. A key is a name
    shared by the reference and mdpl, or a pair (reference name, mdpl name) where mdpl's differs."""
    own = run.to_flat()
    method = run.experiment.prompt_method
    keys = REFERENCE_CONFIG_KEYS + (method_class(method).reference_config_keys if method in available_methods() else ())
    pairs = [(k, k) if isinstance(k, str) else k for k in keys]
    return [f"{k}: checkpoint={stored[r]!r} vs config={own[k]!r}" for r, k in pairs
            if r in stored and k in own and _as_list(stored[r]) != _as_list(own[k])]


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _holds(methods: list[str]) -> str:
    if not methods:
        return "no prompt modules (a no-prompt baseline checkpoint)"
    return f"the prompt modules of {' + '.join(methods)}"


def check_reference_checkpoint(state: Mapping[str, torch.Tensor], stored: Mapping | None, run: Any) -> None:
    """UserInputError (one line) unless `state` is a trained reference checkpoint of the run's dataset and method
    (`stored`: the checkpoint's own config, if it has one)."""
    dataset, method = run.data.dataset, run.experiment.prompt_method
    heads = reference_heads(state)
    if not heads:
        raise UserInputError(
            f"it holds no trained classifier head ({dataset}_classifier.*): a ViLT pre-training or backbone-only "
            f"checkpoint cannot be evaluated; test_only needs a checkpoint written by training (mdpl, or the original "
            f"MAP / MemPrompt code)")
    if dataset not in heads:
        raise UserInputError(f"it was trained on {', '.join(heads)} (head {heads[0]}_classifier), not on "
                             f"dataset={dataset!r}; use the matching task_finetune_<dataset> config")
    methods = reference_methods(state)
    if methods != ([method] if method in reference_prompt_keys() else []):
        raise UserInputError(f"it holds {_holds(methods)}, but prompt_method is {method!r}; select the method "
                             f"the checkpoint was trained with")
    bad = reference_config_mismatches(stored or {}, run)
    if bad:
        raise UserInputError("its stored training config disagrees with this config (the model would compute "
                             "something else): " + "; ".join(bad) + "; set these keys to the checkpoint's values")


def load_reference_checkpoint(model: nn.Module, checkpoint: Mapping, run: Any,
                              adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                              ) -> LoadReport:
    """Every weight of a ViLT classifier from a checkpoint written by the original MAP / MemPrompt code.

    `checkpoint` is the loaded file: a Lightning checkpoint (``state_dict`` + ``hyper_parameters.config``) or a
    plain state dict with the reference key names. Checked with `check_reference_checkpoint`, then loaded
    with `load_reference_finetuned` (strict; `adapt` as there). Raises UserInputError (one line, naming the keys).
    """
    state = checkpoint.get("state_dict", checkpoint)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    hparams = checkpoint.get("hyper_parameters")
    stored = hparams.get("config") if isinstance(hparams, Mapping) else None
    check_reference_checkpoint(state, stored if isinstance(stored, Mapping) else None, run)
    try:
        return load_reference_finetuned(model, state, adapt=adapt)
    except ValueError as err:
        raise UserInputError(str(err)) from None


def reference_key_to_mdpl(key: str) -> str:
    """Reference (MAP / MemPrompt LightningModule) key -> `PromptedClassifier` (ViLT) key."""
    if key.startswith(BACKBONE_PREFIXES):
        return "backbone." + key
    if re.match(r"^[a-z0-9]+_classifier\.", key):
        return key
    return "prompt." + key


def load_reference_finetuned(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
                             allow: tuple[str, ...] = LEGACY_ALLOWED_KEYS,
                             adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                             ) -> LoadReport:
    """Strictly load a MAP / MemPrompt / SCP fine-tuned checkpoint (reference key names) into a classifier.

    Every model key must be present and every checkpoint key used, except the keys in `allow`
    (legacy ``text_embeddings.position_ids``); otherwise ValueError listing the offending keys (D-22).
    `adapt` (the method's key upgrade, e.g. SCP's renames and its check of the frozen copies, D-56) maps the state
    once its keys carry the classifier's prefixes; it may raise ValueError.
    """
    raw = read_state_dict(state_dict) if isinstance(state_dict, (str, os.PathLike)) else dict(state_dict)
    report = LoadReport(source_format="reference-finetuned")
    mapped: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key in allow:
            report.ignored.append(key)
        else:
            mapped[reference_key_to_mdpl(key)] = value
    if adapt is not None:
        mapped = adapt(mapped)
    own = model.state_dict()
    report.unexpected = sorted(k for k in mapped if k not in own)
    report.missing = sorted(k for k in own if k not in mapped)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if report.unexpected or report.missing or bad:
        raise ValueError(
            "fine-tuned checkpoint does not match this model (method/dataset/sizes): "
            f"missing {len(report.missing)} {report.missing[:6]}, unexpected {len(report.unexpected)} "
            f"{report.unexpected[:6]}, shape mismatch {len(bad)} {bad[:4]}")
    model.load_state_dict(mapped, strict=True)
    report.loaded = sorted(mapped)
    return report
