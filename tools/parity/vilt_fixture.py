"""One golden fixture of a ViLT-based reference (MAP or MemPrompt): layout in tests/fixtures/README.md.

Given the reference's LightningModule class, its Sacred experiment and its ``set_schedule``, this builds the model
for each of the three dataset heads at a tiny configuration, perturbs every parameter, runs one batch holding all
three missing types through the reference's own ``forward`` (``compute_<task>``) in eval mode, back-propagates its
loss, and records logits, pooled feature, loss, gradients, the optimizer groups with one legacy-AdamW step, and a
float64 re-run. Everything is seeded, so a second run writes the same bytes.
"""
from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from common import (TINY_VIT, add_tiny_vit_factory, detached, legacy_adamw_step, offline_load_pretrained,
                    patch_my_metrics, perturb_parameters, prepare_reference, reference_param_groups, sacred_config,
                    share_equal_tensors, silenced_stdout)

HEADS = ("mmimdb", "food101", "hatememes")
NUM_CLASSES = {"mmimdb": 23, "food101": 101, "hatememes": 2}
SPECIAL_IDS = {"cls": 3, "sep": 4, "pad": 0}
COMMON_UPDATES = dict(mlp_ratio=4, image_size=32, patch_size=8, max_text_len=16, vocab_size=100, max_image_len=-1,
                      drop_rate=0.1, learnt_p=True, multi_layer_prompt=True, precision=32, load_path="",
                      vit=TINY_VIT, num_workers=0, lr_mult=1)
# Sizes per fixture configuration (README "Tiny configurations").
SIZES = {"A": dict(num_layers=2, hidden_size=32, num_heads=2), "B": dict(num_layers=3, hidden_size=40, num_heads=4)}
# (missing_type, valid height, valid width, real text tokens incl. CLS/SEP) per sample; batch H x W.
SAMPLES = {"A": ((32, 32), [(0, 32, 32, 11), (1, 24, 32, 2), (2, 32, 24, 16), (0, 16, 24, 7)]),
           "B": ((32, 48), [(2, 32, 48, 13), (0, 24, 40, 16), (1, 32, 48, 2), (0, 16, 16, 5)])}
STORED_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "image_size", "max_text_len",
               "vocab_size", "max_image_len", "drop_rate")
TRAIN_KEYS = ("learning_rate", "weight_decay", "lr_mult", "optim_type", "mmimdb_class_num", "food101_class_num",
              "hatememes_class_num", "loss_names", "exp_name")
FORWARD_SEED, OTHER_SEED, MODEL_SEED = 1234, 999, 0
BETAS, EPS = (0.9, 0.98), 1e-8


@dataclass
class Reference:
    """What a ViLT-family generator needs from its reference package."""

    model_class: type
    experiment: Any                       # the reference's Sacred ``ex``
    set_task: Callable[[Any], None]
    set_schedule: Callable[[Any], Any]
    method_keys: tuple[str, ...]          # config keys of the method stored in the fixture


def load_vilt_reference(refs, key: str, package: str, model_class: str, method_keys: tuple[str, ...]) -> "Reference":
    """Check out-of-tree reference `key` (tools/parity/common.py), import its package (``vilt`` / ``src``) with the
    run-time shims (metrics, offline pre-trained weights, the tiny ViT) and name its model, config and schedule."""
    prepare_reference(refs, key)
    my_metrics = importlib.import_module(f"{package}.gadgets.my_metrics")
    vit = importlib.import_module(f"{package}.modules.vision_transformer_prompts")
    experiment = importlib.import_module(f"{package}.config").ex
    modules = importlib.import_module(f"{package}.modules")
    patch_my_metrics(my_metrics)
    offline_load_pretrained(vit)
    add_tiny_vit_factory(vit)
    utils = modules.vilt_utils
    return Reference(getattr(modules, model_class), experiment, utils.set_task, utils.set_schedule, method_keys)


def make_batch(config: str) -> dict[str, torch.Tensor]:
    """The fixture batch (README "Batch"): B=4, all missing types, padded texts and zero-padded images."""
    (height, width), samples = SAMPLES[config]
    g = torch.Generator().manual_seed(zlib.crc32(f"batch-{config}".encode()))
    n, length = len(samples), COMMON_UPDATES["max_text_len"]
    ids = torch.zeros(n, length, dtype=torch.int64)
    masks = torch.zeros(n, length, dtype=torch.int64)
    image = torch.zeros(n, 3, height, width)
    for i, (kind, h, w, tokens) in enumerate(samples):
        body = torch.randint(5, COMMON_UPDATES["vocab_size"], (tokens - 2,), generator=g)
        ids[i, :tokens] = torch.cat([torch.tensor([SPECIAL_IDS["cls"]]), body, torch.tensor([SPECIAL_IDS["sep"]])])
        masks[i, :tokens] = 1
        pixels = torch.rand(3, h, w, generator=g) * 2 - 1
        image[i, :, :h, :w] = torch.ones(3, h, w) if kind == 2 else pixels
    return {"text_ids": ids, "text_masks": masks, "image": image,
            "image_sizes": torch.tensor([[h, w] for _, h, w, _ in samples]),
            "missing_type": torch.tensor([s[0] for s in samples])}


def make_label(head: str, n: int) -> torch.Tensor:
    if head == "mmimdb":
        return torch.tensor([[float((i - b) % 5 == 0) for i in range(23)] for b in range(n)])
    return torch.tensor([(37 * b + 3) % NUM_CLASSES[head] for b in range(n)])


def reference_batch(batch: dict[str, torch.Tensor], label: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """The batch as the reference's collate delivers it: image in a list, missing types and labels as lists."""
    return {"text_ids": batch["text_ids"], "text_labels": torch.full_like(batch["text_ids"], -100),
            "text_masks": batch["text_masks"], "image": [batch["image"].to(dtype)],
            "missing_type": [float(t) for t in batch["missing_type"]], "label": label.tolist()}


def build_model(ref: Reference, cfg: dict[str, Any], shared: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The reference model (seed 0), every parameter perturbed; non-head parameters loaded from ``shared``."""
    torch.manual_seed(MODEL_SEED)
    with silenced_stdout():
        model = ref.model_class(cfg)
    perturb_parameters(model)
    if shared is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in shared.items() if k in own and "_classifier." not in k}, strict=False)
    return model.eval()


def run_forward(ref: Reference, model: torch.nn.Module, batch: dict[str, Any], head: str,
                seed: int = FORWARD_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits, pooled (``infer``'s ``cls_feats``) and loss of the reference ``forward`` on ``batch``."""
    seen: dict[str, Any] = {}
    infer = model.infer

    def recording_infer(*args: Any, **kwargs: Any) -> dict:
        seen.update(infer(*args, **kwargs))
        return seen

    model.infer = recording_infer
    try:
        ref.set_task(model)
        torch.manual_seed(seed)            # ViLT's visual_embed samples its patch order with torch.multinomial
        out = model(batch)
    finally:
        del model.infer
    return out[f"{head}_logits"], seen["cls_feats"], out[f"{head}_loss"]


def stored_config(ref: Reference, cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: copy_value(cfg[k]) for k in STORED_KEYS + ref.method_keys + TRAIN_KEYS}


def copy_value(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) else value


def head_entry(ref: Reference, cfg: dict[str, Any], head: str, batch: dict[str, torch.Tensor],
               shared: dict[str, torch.Tensor] | None, debug: Callable[..., dict] | None) -> dict[str, Any]:
    """Everything the fixture stores for one dataset head (README "File layout")."""
    label = make_label(head, batch["text_ids"].shape[0])
    model = build_model(ref, cfg, shared)
    records = debug(model) if debug else None
    logits, pooled, loss = run_forward(ref, model, reference_batch(batch, label, torch.float32), head)
    retrieval = records() if records else {}
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    groups = reference_param_groups(model, ref.set_schedule)
    params = dict(model.named_parameters())
    after = {n: legacy_adamw_step(params[n].detach(), grads[n], groups[n]["lr"], groups[n]["weight_decay"], BETAS, EPS)
             for n in trainable}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        _, pooled_other, _ = run_forward(ref, model, reference_batch(batch, label, torch.float32), head, OTHER_SEED)
        model64 = build_model(ref, cfg, shared).double()
        logits64, pooled64, loss64 = run_forward(ref, model64, reference_batch(batch, label, torch.float64), head)
    entry = {
        "config": stored_config(ref, cfg),
        "state_dict": state,
        "init_state_dict_prompts": {},
        "batch": {**batch, "label": label},
        "logits": logits, "pooled": pooled, "loss": loss,
        "grads": grads,
        "logits_fp64": logits64, "pooled_fp64": pooled64, "loss_fp64": loss64,
        "trainable": trainable,
        "trainable_without_grad": [n for n in trainable if n not in grads],
        "optimizer": {"impl": "legacy transformers AdamW (correct_bias=True)", "betas": list(BETAS), "eps": EPS,
                      "step": 1, "lr_multiplier": 1.0, "groups": groups},
        "params_after_step": after,
        "rng_note": (f"model built with torch.manual_seed({MODEL_SEED}) then every parameter += 0.1*N(0,1) (generator "
                     f"seeded by crc32(name)); non-head params shared across the three heads; "
                     f"torch.manual_seed({FORWARD_SEED}) before each forward (visual_embed multinomial). Re-run with "
                     f"seed {OTHER_SEED}: max|d pooled|={(pooled_other - pooled).abs().max().item():.1e}. "
                     f"max|logits_fp32-logits_fp64|={(logits.double() - logits64).abs().max().item():.1e}"),
        "special_ids": dict(SPECIAL_IDS),
        "retrieval_debug": retrieval,
    }
    return detached(entry)


def make_fixture(ref: Reference, config: str, method_updates: dict[str, Any],
                 init_prompts: Callable[[torch.nn.Module], dict] | None = None,
                 debug: Callable[..., dict] | None = None) -> dict[str, Any]:
    """The three-head fixture dict of configuration ``config`` ('A' or 'B') for one method."""
    batch = make_batch(config)
    out: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    for head in HEADS:
        cfg = sacred_config(ref.experiment, head, {**COMMON_UPDATES, **SIZES[config], **method_updates})
        entry = head_entry(ref, cfg, head, batch, first["state_dict"] if first else None, debug)
        if init_prompts is not None:
            torch.manual_seed(MODEL_SEED)
            with silenced_stdout():
                entry["init_state_dict_prompts"] = detached(init_prompts(ref.model_class(cfg)))
        if first is None:
            first = entry
        else:
            entry["state_dict"] = share_equal_tensors(first["state_dict"], entry["state_dict"])
            entry["batch"] = {**{k: first["batch"][k] for k in batch}, "label": entry["batch"]["label"]}
        out[head] = entry
    return out
