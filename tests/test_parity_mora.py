"""Numerical parity of mdpl's MoRA with its reference implementation (tests/fixtures/README.md, "MoRA").

Fixtures ``ref_mora_{A,B}.pt`` (written by tools/parity/make_mora.py from ``Tree-Shu-Zhao/MoRA`` under transformers
4.x) hold the config in mdpl's flat keys, the OpenAI-layout keys / shapes / float64 checksums of the backbone (the
values are regenerated from ``tests/dcp_hashinit.py``), the reference's every trainable tensor, one batch with all
three missing types, and the reference's features, logits, loss and gradients (eval mode), its merged effective
weights and its logits after merging. For each config this file builds mdpl's classifier from the flat config, loads
the backbone through the OpenAI-layout loader and the trainable tensors under their mdpl names, and checks in float32
on CPU: features and logits (atol 1e-5), loss (rtol 1e-5), the trainable-parameter set and every gradient (1e-4 of
its norm), and after ``merge_adapters`` the effective q / k / v weights and the logits.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from golden import assert_trainable_grads, two_tower_model
from golden import golden
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mdpl.engine.losses import task_loss  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = ("A", "B")
FEATURE_ATOL = LOGITS_ATOL = WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
REFERENCE_NAME = re.compile(r"model\.(text|vision)_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj"
                            r"(?:\.shared_params\.(shared_[AB])|\.(\w+))?")
STREAMS = {"text": "text", "vision": "image"}

pytestmark = pytest.mark.usefixtures("one_thread")


def fixture(config: str) -> dict:
    return golden(f"ref_mora_{config}.pt", "make it with tools/parity/make_mora.py under transformers 4.x")


def mdpl_name(reference_name: str, dataset: str) -> str:
    """A reference parameter (or adapted module) name -> mdpl's: the block pair shared by the towers lives in
    ``prompt.shared.<i>`` (the reference names it after its first text user), the rest of an adapted projection in
    ``prompt.adapters.<stream>_<i>_<map>``, the head in ``<dataset>_classifier``."""
    if reference_name.startswith("cls_head."):
        return f"{dataset}_classifier." + reference_name.split(".", 1)[1]
    match = REFERENCE_NAME.fullmatch(reference_name)
    assert match is not None, reference_name
    tower, block, proj, shared, leaf = match.groups()
    if shared:
        return f"prompt.shared.{block}.{shared}"
    site = f"prompt.adapters.{STREAMS[tower]}_{block}_{proj}"
    return site if leaf is None else f"{site}.{leaf}"


def build(config: str, **over) -> torch.nn.Module:
    """mdpl's classifier from the fixture's flat config (+ `over`), with the reference's backbone and trainable
    tensors, in eval mode."""
    rec = fixture(config)
    return two_tower_model(rec, "mora", lambda name: mdpl_name(name, rec["config"]["dataset"]), **over)


def batch_of(rec: dict) -> dict[str, torch.Tensor]:
    return {**rec["batch"], "image": rec["batch"]["image"].float()}


@pytest.mark.parametrize("config", CONFIGS)
def test_features_logits_loss_match_reference(config) -> None:
    rec = fixture(config)
    with torch.no_grad():
        out = build(config)(batch_of(rec))
    image, text = out["pooled"].split([rec["features"]["image"].shape[1], rec["features"]["text"].shape[1]], dim=1)
    torch.testing.assert_close(image, rec["features"]["image"], atol=FEATURE_ATOL, rtol=0)
    torch.testing.assert_close(text, rec["features"]["text"], atol=FEATURE_ATOL, rtol=0)
    torch.testing.assert_close(out["logits"], rec["logits"], atol=LOGITS_ATOL, rtol=0)
    loss = task_loss(rec["config"]["dataset"], out["logits"], rec["batch"]["label"])
    torch.testing.assert_close(loss, rec["loss"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_trainable_gradient_matches_reference(config) -> None:
    rec = fixture(config)
    dataset = rec["config"]["dataset"]
    model = build(config)
    task_loss(dataset, model(batch_of(rec))["logits"], rec["batch"]["label"]).backward()
    params = assert_trainable_grads(model, rec["grads"], lambda n: mdpl_name(n, dataset), GRAD_RTOL)
    for name, ref in rec["grads"].items():
        grad = params[mdpl_name(name, dataset)].grad
        torch.testing.assert_close(grad, ref, rtol=GRAD_RTOL, atol=GRAD_RTOL * ref.abs().max(), msg=name)


@pytest.mark.parametrize("config", CONFIGS)
def test_merged_weights_and_logits_match_reference(config) -> None:
    """``merge_adapters`` folds the same effective weights into the frozen ones as the reference's
    ``merge_weights``, and the merged logits agree with the reference's merged and mdpl's unmerged ones."""
    rec = fixture(config)
    model = build(config)
    batch = batch_of(rec)
    encoders = model.backbone.encoders()
    with torch.no_grad():
        unmerged = model(batch)["logits"]
        model.merge_adapters()
        merged = model(batch)["logits"]
    for name, weight in rec["merged_weights"].items():
        stream, block, proj = mdpl_name(name, rec["config"]["dataset"]).rsplit(".", 1)[1].split("_")
        ours = encoders[stream].linear_map(int(block), proj)[0]
        torch.testing.assert_close(ours, weight, atol=WEIGHT_ATOL, rtol=0, msg=name)
    torch.testing.assert_close(merged, rec["merged_logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=LOGITS_ATOL, rtol=0)


def test_training_mode_without_dropout_matches_reference() -> None:
    """In training mode only the adapters' input dropout differs from evaluation (MoRA-D4; masks cannot be matched
    across implementations): at ``mora_dropout=0`` the logits are the reference's."""
    rec = fixture("B")
    model = build("B", mora_dropout=0.0).train()
    with torch.no_grad():
        logits = model(batch_of(rec))["logits"]
    torch.testing.assert_close(logits, rec["logits"], atol=LOGITS_ATOL, rtol=0)


def test_fixtures_cover_the_reference_options() -> None:
    """The two configs differ in maps, ranks, α and head, include every missing type, and the reference's updates
    (modality_B included) are far from zero: a parity failure cannot hide behind an inert adapter."""
    a, b = fixture("A"), fixture("B")
    assert set(a["config"]["mora_maps"]) | set(b["config"]["mora_maps"]) == {"q", "k", "v"}
    assert a["config"]["mora_text_rank"] != a["config"]["mora_image_rank"]
    assert a["config"]["dataset"] != b["config"]["dataset"]
    for rec in (a, b):
        assert set(rec["batch"]["missing_type"].tolist()) == {0, 1, 2}
        assert all(v.abs().min() > 0 for k, v in rec["trainable"].items() if k.endswith("modality_B"))
    # config B: text tower deeper than the image tower, its last block has no partner and is not adapted
    assert b["config"]["clip_text_layers"] > b["config"]["clip_vision_layers"]
    assert not any(f"layers.{b['config']['clip_text_layers'] - 1}." in k for k in b["merged_weights"])


def test_missing_type_is_never_read() -> None:
    """MoRA conditions on nothing: missing modalities enter only through the dummy inputs."""
    rec = fixture("A")
    model = build("A")
    batch = batch_of(rec)
    with torch.no_grad():
        ref = model(batch)["logits"]
        other = model({**batch, "missing_type": torch.zeros_like(batch["missing_type"])})["logits"]
    assert torch.equal(ref, other)
