"""Numerical parity of mdpl's ViLT methods with the reference implementations (tests/fixtures/README.md).

Golden fixtures ``ref_{map_input,map_attention,memprompt}_{A,B}.pt`` hold, per dataset head, the reference
config, its full state dict (reference key names), one batch with all three missing types, and the
reference logits / pooled feature / loss / gradients / one legacy-AdamW step. For every
(method, config, head) this file builds `mdpl.models.build_classifier` from the mapped config, loads the
reference weights through `load_reference_finetuned`, and checks (eval mode, float32):

* logits and pooled feature (atol 1e-5), loss (atol 1e-6) with `mdpl.engine.losses.task_loss`;
* the trainable-parameter set and every gradient (atol 1e-6 + rtol 1e-4);
* the optimizer's parameter groups and one `optimizer_impl='legacy_hf'` step (atol 1e-6);
* the pixel-validity rule: dropping ``image_sizes`` gives the same logits (docs/methods.md §2.3);
* float64: logits and pooled vs the reference float64 re-run (atol 1e-9).

Tolerances are those documented in the fixture README (fp32 vs fp64 reference gap ≈ 1e-6).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

from mdpl.backbones.vilt_weights import load_reference_finetuned, reference_key_to_mdpl
from mdpl.data.constants import NUM_CLASSES
from mdpl.engine.losses import task_loss
from mdpl.models import build_classifier

FIXTURES = Path(__file__).parent / "fixtures"
METHODS = {"map_input": "map", "map_attention": "map", "memprompt": "memprompt"}
CONFIGS = ("A", "B")
HEADS = ("mmimdb", "food101", "hatememes")
CASES = [pytest.param(m, c, h, id=f"{m}-{c}-{h}") for m in METHODS for c in CONFIGS for h in HEADS]

# Reference config keys that have the same name and meaning in mdpl's config (config.py).
SHARED_KEYS = (
    "hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "image_size", "max_text_len",
    "vocab_size", "max_image_len", "drop_rate", "learning_rate", "weight_decay", "lr_mult", "optim_type",
)
MAP_KEYS = ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt")
MEMPROMPT_KEYS = ("prompt_type", "gen_prompt_length", "gen_prompt_layers", "shared_prompt_length",
                  "shared_prompt_layers", "mem_size", "top_k")

LOGITS_ATOL = 1e-5
POOLED_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
STEP_ATOL = 1e-6
FP64_ATOL = 1e-9


@lru_cache(maxsize=None)
def load_fixture(method: str, config: str) -> dict:
    """The fixture file (loaded once per module run)."""
    path = FIXTURES / f"ref_{method}_{config}.pt"
    assert path.is_file(), f"golden fixture {path.name} is missing (tests/fixtures/README.md says how to make it)"
    return torch.load(path, map_location="cpu", weights_only=True)


def mdpl_config(method: str, ref: dict[str, Any], head: str) -> dict[str, Any]:
    """mdpl config from the reference's resolved config keys (README "Tiny configurations")."""
    task = [name for name, on in ref["loss_names"].items() if on]
    assert task == [head], f"fixture head {head} was made with loss_names {task}"
    assert ref[f"{head}_class_num"] == NUM_CLASSES[head]
    cfg: dict[str, Any] = {k: ref[k] for k in SHARED_KEYS}
    cfg.update(dataset=head, backbone="vilt", load_path="", test_only=False, finetune=False,
               frozen_eval_mode=False, prompt_method=METHODS[method], optimizer_impl="legacy_hf")
    if METHODS[method] == "map":
        cfg.update({k: ref[k] for k in MAP_KEYS})
    else:
        cfg.update({k: ref[k] for k in MEMPROMPT_KEYS})
        # The reference's stored `bottleneck_dim` is unused: its bottleneck width is hidden_size // 16.
        cfg.update(bottleneck_dim=ref["hidden_size"] // 16, memprompt_mask_padding=False)
    return cfg


def build_reference_model(method: str, config: str, head: str) -> torch.nn.Module:
    """Our classifier with the reference state dict loaded via `load_reference_finetuned`, eval mode."""
    entry = load_fixture(method, config)[head]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="load_path is empty")
        model = build_classifier(mdpl_config(method, entry["config"], head))
    load_reference_finetuned(model, entry["state_dict"])
    return model.eval().float()


@dataclass
class Run:
    """One forward + loss + backward of our model on the fixture batch."""

    model: torch.nn.Module
    logits: torch.Tensor
    pooled: torch.Tensor
    loss: torch.Tensor


@lru_cache(maxsize=None)
def run_case(method: str, config: str, head: str) -> Run:
    entry = load_fixture(method, config)[head]
    model = build_reference_model(method, config, head)
    torch.manual_seed(1234)  # as the reference (our visual embedding is deterministic anyway)
    out = model(entry["batch"])
    loss = task_loss(head, out["logits"], entry["batch"]["label"])
    loss.backward()
    return Run(model, out["logits"].detach(), out["pooled"].detach(), loss.detach())


def mapped(ref_dict: dict[str, Any]) -> dict[str, Any]:
    """Reference parameter names -> mdpl names."""
    return {reference_key_to_mdpl(k): v for k, v in ref_dict.items()}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,config,head", CASES)
def test_fixture_batch_has_all_missing_types(method, config, head):
    batch = load_fixture(method, config)[head]["batch"]
    assert set(batch["missing_type"].tolist()) == {0, 1, 2}
    assert (batch["image_sizes"] < torch.tensor(batch["image"].shape[-2:])).any(), "no padded image"


@pytest.mark.parametrize("method,config,head", CASES)
def test_forward_parity(method, config, head):
    entry = load_fixture(method, config)[head]
    run = run_case(method, config, head)
    assert run.logits.shape == entry["logits"].shape == (4, NUM_CLASSES[head])
    d_logits = max_abs(run.logits, entry["logits"])
    d_pooled = max_abs(run.pooled, entry["pooled"])
    d_loss = abs(run.loss.item() - entry["loss"].item())
    assert d_logits <= LOGITS_ATOL, f"logits max|Δ| {d_logits:.3g}"
    assert d_pooled <= POOLED_ATOL, f"pooled max|Δ| {d_pooled:.3g}"
    assert d_loss <= LOSS_ATOL, f"loss |Δ| {d_loss:.3g} (ours {run.loss.item()}, ref {entry['loss'].item()})"


@pytest.mark.parametrize("method,config,head", CASES)
def test_trainable_parameters_match(method, config, head):
    entry = load_fixture(method, config)[head]
    model = run_case(method, config, head).model
    ours = {n for n, p in model.named_parameters() if p.requires_grad}
    ref = {reference_key_to_mdpl(n) for n in entry["trainable"]}
    assert ours == ref, f"only ours: {sorted(ours - ref)}; only reference: {sorted(ref - ours)}"
    assert not entry["trainable_without_grad"]
    assert model.trainable_parameters_report()[1] == sum(
        p.numel() for n, p in model.named_parameters() if n in ref)


@pytest.mark.parametrize("method,config,head", CASES)
def test_gradient_parity(method, config, head):
    entry = load_fixture(method, config)[head]
    model = run_case(method, config, head).model
    ref_grads = mapped(entry["grads"])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(ref_grads)
    for name, p in params.items():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, ref_grads[name], atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("method,config,head", CASES)
def test_optimizer_step_parity(method, config, head):
    entry = load_fixture(method, config)[head]
    assert "optimizer" in entry and "params_after_step" in entry, "fixture has no optimizer step: regenerate it"
    from mdpl.engine.optim import build_optimizer, LegacyAdamW
    ref_opt = entry["optimizer"]
    assert tuple(ref_opt["betas"]) == (0.9, 0.98) and ref_opt["eps"] == 1e-8 and ref_opt["step"] == 1
    # The reference step was taken on the stored gradients ("params_after_step", README). Feed those, not
    # ours: Adam's first step g/(|g|+eps) amplifies 1e-9 fp32 differences of ~1e-8 gradients to ~lr.
    model = build_reference_model(method, config, head)
    ref_grads = mapped(entry["grads"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = ref_grads[name].clone()
    cfg = mdpl_config(method, entry["config"], head)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, LegacyAdamW)

    # Parameter groups: lr / weight decay per parameter as in the reference's no-decay/head-name rules.
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    ref_groups = {n: (g["lr"], g["weight_decay"]) for n, g in mapped(ref_opt["groups"]).items()}
    assert set(ours) == set(ref_groups)
    wrong = {n: (ours[n], ref_groups[n]) for n in ours if ours[n] != pytest.approx(ref_groups[n], rel=1e-12)}
    assert not wrong, f"(lr, weight_decay) ours vs reference: {wrong}"

    optimizer.step()
    after = mapped(entry["params_after_step"])
    params = dict(model.named_parameters())
    assert set(after) == {n for n, p in params.items() if p.requires_grad}
    for name, value in after.items():
        torch.testing.assert_close(params[name].detach(), value, atol=STEP_ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n} after one step: {m}")


@pytest.mark.parametrize("method,config,head", CASES)
def test_pixel_validity_rule_without_image_sizes(method, config, head):
    """Without ``image_sizes`` the valid patch grid comes from non-zero pixels: same logits (§2.3)."""
    entry = load_fixture(method, config)[head]
    batch = {k: v for k, v in entry["batch"].items() if k != "image_sizes"}
    model = run_case(method, config, head).model
    with torch.no_grad():
        logits = model(batch)["logits"]
    assert max_abs(logits, entry["logits"]) <= LOGITS_ATOL
    torch.testing.assert_close(logits, run_case(method, config, head).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,config,head", CASES)
def test_float64_parity(method, config, head):
    """Same model in float64 vs the reference's float64 re-run: agreement to float64 rounding (README)."""
    entry = load_fixture(method, config)[head]
    model = build_reference_model(method, config, head).double()
    batch = dict(entry["batch"], image=entry["batch"]["image"].double())
    with torch.no_grad():
        out = model(batch)
    assert max_abs(out["logits"], entry["logits_fp64"]) <= FP64_ATOL
    assert max_abs(out["pooled"], entry["pooled_fp64"]) <= FP64_ATOL
