"""Numerical parity of mdpl's AOEPT on CLIP with its reference implementation (tests/fixtures/README.md, "AOEPT").

Fixtures ``ref_aoept_{A,B}.pt`` (written by tools/parity/make_aoept.py from ``Jian-Lang/AOEPT`` under transformers 4.x)
hold the config in mdpl's flat keys, the OpenAI-layout keys / shapes / float64 checksums of the backbone (values
regenerated from ``tests/dcp_hashinit.py``), the prototype memory, every trainable tensor, one batch with all three
missing types, and the reference's proxy prompts, logits, auxiliary loss, total loss and gradients (eval mode). Config
A reads the text feature as the reference does (AOEPT-D1 ``reference``: a row holds id 2), config B at the EOT
(``eot``) with a multi-label head. Checked in float32 on CPU: proxies and logits (atol 1e-5), losses (rtol 1e-5), the
trainable-parameter set and every gradient (1e-4 of its norm).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from golden import assert_trainable_grads, renamed, fixture_loader, two_tower_model
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mdpl.engine.losses import task_loss  # noqa: E402

CONFIGS = ("A", "B")
ATOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
PROMPT_RENAMES = (   # reference parameter name pattern -> mdpl's, on every backbone
    (r"text_query", "prompt.text_query"), (r"vision_query", "prompt.image_query"),
    (r"shared_query", "prompt.shared_query"), (r"logit_scale", "prompt.logit_scale"),
    (r"text_layer_norm\.(\w+)", r"prompt.text_norm.\1"), (r"vision_layer_norm\.(\w+)", r"prompt.image_norm.\1"),
)
RENAMES = PROMPT_RENAMES + (
    (r"shared_text_layer_norm\.(\w+)", r"prompt.shared_text_norm.\1"),
    (r"shared_vision_layer_norm\.(\w+)", r"prompt.shared_image_norm.\1"),
    (r"shared_text_proj\.(.+)", r"prompt.shared_text_proj.\1"),
    (r"shared_vision_proj\.(.+)", r"prompt.shared_image_proj.\1"),
    (r"text_gate_mlp\.(\d+)\.gate_net\.(.+)", r"prompt.gates.text.\1.\2"),
    (r"vision_gate_mlp\.(\d+)\.gate_net\.(.+)", r"prompt.gates.image.\1.\2"),
    (r"shared_text_gate_mlp\.(\d+)\.gate_net\.(.+)", r"prompt.gates.shared_text.\1.\2"),
    (r"shared_vision_gate_mlp\.(\d+)\.gate_net\.(.+)", r"prompt.gates.shared_image.\1.\2"),
    (r"model\.text_model\.final_layer_norm\.(\w+)", r"backbone.text_encoder.ln_final.\1"),
    (r"model\.vision_model\.post_layernorm\.(\w+)", r"backbone.image_encoder.ln_post.\1"),
    (r"model\.text_projection\.weight", "backbone.text_encoder.text_projection"),
    (r"model\.visual_projection\.weight", "backbone.image_encoder.proj"),
)
TRANSPOSED = ("model.text_projection.weight", "model.visual_projection.weight")   # nn.Linear [out, in] -> [in, out]

pytestmark = pytest.mark.usefixtures("one_thread")


fixture = fixture_loader("ref_aoept_{}.pt", "make it with tools/parity/make_aoept.py under transformers 4.x")


def mdpl_name(reference_name: str, dataset: str) -> str:
    return renamed(reference_name, dataset, RENAMES)


def as_mdpl(name: str, value: torch.Tensor) -> torch.Tensor:
    return value.T if name in TRANSPOSED else value


def build(config: str, **over) -> torch.nn.Module:
    """mdpl's classifier with the reference's backbone, memory and trainable tensors, in eval mode."""
    rec = fixture(config)
    model = two_tower_model(rec, "aoept", lambda name: mdpl_name(name, rec["config"]["dataset"]), as_mdpl, **over)
    with torch.no_grad():
        model.prompt.text_memory.copy_(rec["memory"]["text"])
        model.prompt.image_memory.copy_(rec["memory"]["image"])
    return model


@pytest.mark.parametrize("config", CONFIGS)
def test_proxy_prompts_match_reference(config) -> None:
    rec = fixture(config)
    with torch.no_grad():
        proxies = build(config).prompt.proxies()
    for name, ref in rec["proxies"].items():
        torch.testing.assert_close(proxies[name], ref, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("config", CONFIGS)
def test_logits_and_losses_match_reference(config) -> None:
    rec = fixture(config)
    with torch.no_grad():
        assert_outputs_match(build(config)(rec["batch"]), rec, rec["batch"]["label"])


def assert_outputs_match(out: dict, rec: dict, label: torch.Tensor) -> None:
    """Logits (atol), the task, consistency and total losses (rtol) against an AOEPT fixture's."""
    torch.testing.assert_close(out["logits"], rec["logits"], atol=ATOL, rtol=0)
    task = task_loss(rec["config"]["dataset"], out["logits"], label)
    torch.testing.assert_close(task, rec["task_loss"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(out["aux_losses"]["aoept_consistency"], rec["aux_loss"], rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(task + out["aux_loss"], rec["loss"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_trainable_gradient_matches_reference(config) -> None:
    rec = fixture(config)
    dataset = rec["config"]["dataset"]
    model = build(config)
    out = model(rec["batch"])
    (task_loss(dataset, out["logits"], rec["batch"]["label"]) + out["aux_loss"]).backward()
    assert_trainable_grads(model, rec["grads"], lambda n: mdpl_name(n, dataset), GRAD_RTOL, as_mdpl)


def test_the_other_text_readout_changes_the_logits() -> None:
    """AOEPT-D1: config A's rows read at id 2 / the last position; at the EOT the logits differ (the switch acts)."""
    rec = fixture("A")
    with torch.no_grad():
        eot = build("A", aoept_text_pool="eot")(rec["batch"])["logits"]
    assert (eot - rec["logits"]).abs().max() > 1e-3
