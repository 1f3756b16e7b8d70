"""MoRA (docs/methods.md §15): the reference's parameter counts, its weight formula, the pair shared by the towers,
merged and unmerged logits, the missing-backbone error, and a tiny end-to-end run."""
from __future__ import annotations

import warnings

import pytest
import torch

from runs import resolved_config
from tiny_models import tiny_batch, tiny_model
from mdpl.errors import UserInputError
from mdpl.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

# The reference's own counts (trainable = adapters + head; total = CLIP ViT-B/16 + both), one per experiment config.
REFERENCE_COUNTS = {"food101": (149_785_702, 164_965), "mmimdb": (149_705_752, 85_015),
                    "hatememes": (149_735_427, 114_690)}


@pytest.mark.parametrize("dataset", sorted(REFERENCE_COUNTS))
def test_counts_match_the_reference_configs(dataset) -> None:
    cfg = resolved_config([f"task_finetune_{dataset}", "mora"], {})
    assert cfg["backbone"] == "clip" and cfg["seed"] == 42 and cfg["learning_rate"] == 1e-2
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    assert model.trainable_parameters_report() == REFERENCE_COUNTS[dataset]
    assert not any(p.requires_grad for p in model.backbone.parameters())   # ln_post / proj stay frozen too


def _randomised(**over):
    model = tiny_model("mora", "clip", **over)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in model.prompt.adapters.values():
            adapter.modality_B.copy_(torch.randn(adapter.modality_B.shape, generator=g))
            adapter.specific_magnitude.mul_(1 + 0.1 * torch.randn(adapter.specific_magnitude.shape, generator=g))
    return model.eval()


def test_effective_weight_follows_the_formula() -> None:
    model = _randomised(mora_maps=["q", "v"], mora_alpha=0.05)
    for stream, width in (("text", 32), ("image", 48)):
        adapter = model.prompt.adapters[f"{stream}_2_v"]
        encoder = model.backbone.encoders()[stream]
        w = encoder.linear_map(2, "v")[0]
        assert w.shape == (width, width)
        a, b = model.prompt.shared["2"].shared_A, model.prompt.shared["2"].shared_B
        s = a @ b.T @ b @ a.T if stream == "text" else b @ a.T @ a @ b.T
        n_s = w + 0.05 * s.T
        n_p = w + 0.05 * (adapter.modality_A @ adapter.modality_B).T
        want = (adapter.shared_magnitude * n_s / n_s.norm(dim=0).clamp(min=1e-5)
                + adapter.specific_magnitude * n_p / n_p.norm(dim=0).clamp(min=1e-5))
        torch.testing.assert_close(adapter.adapted_weight(w), want, atol=1e-6, rtol=1e-6)


def test_initial_update_has_the_frozen_weight_norm() -> None:
    """MoRA-D1: both magnitudes start at the column norms, so W_eff(0) - W has W's Frobenius norm."""
    model = tiny_model("mora", "clip", mora_maps=["q", "k"])
    w = model.backbone.text_encoder.linear_map(1, "k")[0]
    delta = model.prompt.adapters["text_1_k"].adapted_weight(w) - w
    torch.testing.assert_close(delta.norm(), w.norm(), rtol=1e-5, atol=0)


def test_shared_pair_is_one_tensor_used_by_both_towers() -> None:
    model = _randomised()
    keys = [k for k in model.state_dict() if "shared_A" in k or "shared_B" in k]
    assert keys == ["prompt.shared.1.shared_A", "prompt.shared.1.shared_B", "prompt.shared.2.shared_A",
                    "prompt.shared.2.shared_B"]
    pair = model.prompt.shared["1"]
    for tower in ("text", "image"):          # each tower's update reads both factors (the other's Gram matrix)
        pair.zero_grad()
        w = model.backbone.encoders()[tower].linear_map(1, "v")[0]
        model.prompt.adapters[f"{tower}_1_v"].adapted_weight(w).square().sum().backward()
        assert pair.shared_A.grad.abs().sum() > 0 and pair.shared_B.grad.abs().sum() > 0


def test_merged_and_unmerged_logits_agree() -> None:
    model = _randomised(mora_maps=["k", "v"])
    batch = tiny_batch("clip")
    with torch.no_grad():
        unmerged = model(batch)["logits"]
        plain = tiny_model("none", "clip").eval()(batch)["logits"]
        model.merge_adapters()
        merged = model(batch)["logits"]
    assert (unmerged - plain).abs().max() > 1e-3          # the adapters change the model
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not any(".adapters." in k or "shared_" in k and "prompt.adapters" in k for k in model.state_dict())


@pytest.mark.parametrize("over, message", [
    (dict(backbone="vilt"), "MoRA shares one low-rank pair"),
    (dict(mora_maps=["q", "fc1"]), "mora_maps"),
    (dict(mora_start_layer=3), "mora_start_layer"),
])
def test_bad_options_are_one_line_errors(over, message) -> None:
    backbone = over.pop("backbone", "clip")
    with pytest.raises(UserInputError, match=message):
        tiny_model("mora", backbone, **over)


def test_mora_trains_and_evaluates_end_to_end(tmp_path) -> None:
    from runs import run_quiet, synthetic_arrows
    data = synthetic_arrows(tmp_path / "data", "food101", 48, 16, 16)
    config = resolved_config(["task_finetune_food101", "mora", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "log_dir": str(tmp_path / "result"), "max_epoch": 1, "per_gpu_batchsize": 16, "batch_size": 16,
        "val_check_interval": 1.0, "load_path": "", "clip_path": "", "logger": "csv", "warmup_steps": 0})
    out = run_quiet(config)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.endswith("modality_B") and v.abs().sum() > 0 for k, v in state.items())   # trained from zero
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in out["test"].items():
        assert abs(again["test"][key] - value) <= 1e-6, key
