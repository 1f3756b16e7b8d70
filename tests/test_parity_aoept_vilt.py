"""Numerical parity of mdpl's AOEPT on ViLT with the reference's ViLT variant (tests/fixtures/README.md, "AOEPT on
ViLT").

Fixtures ``ref_aoept_vilt_{A,B}.pt`` (written by tools/parity/make_aoept_vilt.py from ``Jian-Lang/AOEPT`` under
transformers 4.x) hold the config (the tiny Hugging Face ``ViltConfig`` and mdpl's AOEPT keys), the keys / shapes /
float64 checksums of the backbone (values regenerated from ``tests/vilt_hashinit.py``), the prototype file in the
reference's [layers, K, D] layout and the memory its loader made of it (AOEPT-D2), every trainable tensor, one batch
with all three missing types (padded texts, a padded patch grid) and the reference's proxy prompts, logits, auxiliary,
task and total loss and gradients (eval mode). mdpl runs ``vilt_variant=hf`` (LayerNorm eps 1e-12), its memory loaded
by its own preparation hook from the same prototypes under ``aoept_vilt_memory_layout=reference``. Checked in float32
on CPU: memory (rows up to their order, which the reference shuffles), proxies and logits (atol 1e-5), losses (rtol
1e-5), the trainable-parameter set and every gradient (1e-4 of its norm).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from golden import assert_trainable_grads, renamed, checked_state, fixture_loader
import torch

sys.path.insert(0, str(Path(__file__).parent))
from vilt_hashinit import hashed_vilt_tensor  # noqa: E402
from test_parity_aoept import ATOL, GRAD_RTOL, PROMPT_RENAMES, assert_outputs_match  # noqa: E402

from mdpl.backbones.vilt_weights import load_vilt_checkpoint  # noqa: E402
from mdpl.engine.losses import task_loss  # noqa: E402
from mdpl.models import build_classifier  # noqa: E402
from mdpl.prompts.preparation import PreparedArtifact  # noqa: E402

CONFIGS = ("A", "B")
PIXEL_LEVELS = 127
RENAMES = PROMPT_RENAMES + (   # reference parameter name pattern -> mdpl's
    (r"shared_layer_norm\.(\w+)", r"prompt.shared_norm.\1"),
    (r"text_gate_mlp\.gate_net\.(.+)", r"prompt.gates.text.0.\1"),
    (r"vision_gate_mlp\.gate_net\.(.+)", r"prompt.gates.image.0.\1"),
    (r"shared_gate_mlp\.gate_net\.(.+)", r"prompt.gates.shared.0.\1"),
    (r"model\.pooler\.dense\.(\w+)", r"backbone.pooler.dense.\1"),
)

pytestmark = pytest.mark.usefixtures("one_thread")


fixture = fixture_loader("ref_aoept_vilt_{}.pt", "make it with tools/parity/make_aoept_vilt.py under transformers 4.x")


def mdpl_name(reference_name: str, dataset: str) -> str:
    return renamed(reference_name, dataset, RENAMES)


def mdpl_config(rec: dict, **over) -> dict:
    """mdpl's flat config for the fixture's ViltConfig and AOEPT sizes."""
    c = rec["config"]
    method = {k: v for k, v in c.items() if k.startswith("aoept_")}
    return {**dict(dataset=c["dataset"], backbone="vilt", prompt_method="aoept", load_path="", test_only=False,
                finetune=False, hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                num_heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
                patch_size=c["patch_size"], image_size=c["image_size"], max_text_len=c["seq_len"],
                vocab_size=c["vocab_size"], max_image_len=c["max_image_length"], drop_rate=0.0, vilt_variant="hf",
                interpolate_text_positions=True, aoept_vilt_memory_layout="reference", **method), **over}


def build(config: str, **over) -> torch.nn.Module:
    """mdpl's classifier with the reference's backbone (through the Hugging Face ViLT reader), the memory from the
    same prototype file and the reference's trainable tensors, in eval mode."""
    rec = fixture(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(mdpl_config(rec, **over))
    state = checked_state(rec, {k: hashed_vilt_tensor(k, rec["shapes"][k]) for k in rec["keys"]})
    report = load_vilt_checkpoint(model.backbone, state, interpolate_text_positions=True)
    assert not report.unexpected and not report.missing
    model.prompt.load_prepared(PreparedArtifact("fixture", {}, torch.arange(1), centres=rec["centres"]))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in rec["trainable"].items():
            params[mdpl_name(name, rec["config"]["dataset"])].copy_(tensor)
    return model.eval()


def batch_of(rec: dict) -> dict:
    batch = dict(rec["batch"])
    batch["image"] = batch.pop("pixels").float() / PIXEL_LEVELS
    return batch


def sorted_rows(memory: torch.Tensor) -> torch.Tensor:
    """[d, n, D] with each block's rows in lexicographic order of their values."""
    out = []
    for block in memory:
        order = sorted(range(block.shape[0]), key=lambda i: block[i].tolist())
        out.append(block[order])
    return torch.stack(out)


@pytest.mark.parametrize("config", CONFIGS)
def test_memory_is_the_reference_reading_of_the_prototype_file(config) -> None:
    """AOEPT-D2: the memory of prompted block i holds prototype i of every block (the reference's row order is a
    random permutation)."""
    rec = fixture(config)
    model = build(config)
    for name in ("text", "image"):
        ours = model.prompt.memory(name)
        assert ours.shape == rec["memory"][name].shape
        torch.testing.assert_close(sorted_rows(ours), sorted_rows(rec["memory"][name]), atol=0, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_proxy_prompts_match_reference(config) -> None:
    rec = fixture(config)
    with torch.no_grad():
        proxies = build(config).prompt.proxies()
    assert set(proxies) == set(rec["proxies"])
    for name, ref in rec["proxies"].items():
        torch.testing.assert_close(proxies[name], ref, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("config", CONFIGS)
def test_logits_and_losses_match_reference(config) -> None:
    rec = fixture(config)
    batch = batch_of(rec)
    with torch.no_grad():
        out = build(config)(batch)
    assert_outputs_match(out, rec, batch["label"])
    assert float(rec["aux_loss"]) > 0.1


@pytest.mark.parametrize("config", CONFIGS)
def test_every_trainable_gradient_matches_reference(config) -> None:
    rec = fixture(config)
    dataset = rec["config"]["dataset"]
    batch = batch_of(rec)
    model = build(config)
    out = model(batch)
    (task_loss(dataset, out["logits"], batch["label"]) + out["aux_loss"]).backward()
    assert_trainable_grads(model, rec["grads"], lambda n: mdpl_name(n, dataset), GRAD_RTOL)


def test_switches_change_the_outputs() -> None:
    """The reproduced behaviours are live switches: the image mean over real tokens only (AOEPT-D8), the per-block
    memory (AOEPT-D2 fixed, mdpl's default) and the timm ViLT's LayerNorm eps move the logits away from the
    reference's."""
    rec = fixture("A")
    batch = batch_of(rec)
    with torch.no_grad():
        masked = build("A", aoept_feature_pool="masked")(batch)["logits"]
        per_layer = build("A", aoept_vilt_memory_layout="per_layer")
        timm = build("A", vilt_variant="map")(batch)["logits"]
        torch.testing.assert_close(per_layer.prompt.memory("text"), rec["centres"]["text"][:2], atol=0, rtol=0)
        per_layer_logits = per_layer(batch)["logits"]
    assert (masked - rec["logits"]).abs().max() > 1e-4
    assert (per_layer_logits - rec["logits"]).abs().max() > 1e-4
    assert (timm - rec["logits"]).abs().max() > 0
