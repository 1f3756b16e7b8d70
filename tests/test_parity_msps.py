"""Numerical parity of mdpl's MSPs with its reference re-implementation (tests/fixtures/README.md, "MSPs").

Fixtures ``ref_msps_{A,B}.pt`` (written by tools/parity/make_msps.py from RAGPT's ``src/baselines/msps``) hold, per
dataset head, the reference config and training setting (``missing_type`` 'both', 'text' or 'image': the encoding of
its missing mask), the names / shapes / float64 checksums of its state dict (the values are regenerated from
``tests/vilt_hashinit.py``), one batch with every missing type of that setting, what each prompted layer received
(per-row prompts: every token's sum and 16 channels; the key mask of the prompted layers), and the reference logits,
orthogonality loss, total loss and the gradient of every trainable tensor, in eval mode. For every (config, head)
this file builds `mdpl.models.build_classifier` on ViLT with ``vilt_variant=hf`` (the reference runs a Hugging Face
``ViltModel``: LayerNorm eps 1e-12) and ``drop_rate=0``, loads the regenerated state (the backbone through the HF ViLT
reader, the prompts through ``upgrade_state_dict``) and checks in float32 on CPU: the module level (selected
prompts, key mask with the image keys of image-missing rows removed, the orthogonality term) and the model level
(logits atol 1e-5, loss rtol 1e-5, every gradient rtol 1e-4 + atol 1e-6).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from golden import LOGITS_ATOL, LOSS_RTOL, assert_grad_matches, fixture_loader, load_ragpt_vilt, state_loader
import torch

sys.path.insert(0, str(Path(__file__).parent))
from vilt_hashinit import hashed_msps_state  # noqa: E402

from mdpl.engine.losses import task_loss  # noqa: E402
from mdpl.models import build_classifier  # noqa: E402
from mdpl.prompts import PromptContext  # noqa: E402
from mdpl.prompts.msps import ModalitySpecificPrompts  # noqa: E402

CONFIGS = ("A", "B")
HEADS = ("mmimdb", "food101", "hatememes")
CASES = [pytest.param(c, h, id=f"{c}-{h}") for c in CONFIGS for h in HEADS]
PIXEL_LEVELS = 127
CHANNELS_SEED, CHANNELS = 5, 16

pytestmark = pytest.mark.usefixtures("one_thread")


fixture = fixture_loader("ref_msps_{}.pt", "python tools/parity/make_msps.py --refs REFS_DIR")
reference_state = state_loader(fixture, lambda rec: hashed_msps_state({k: tuple(rec["shapes"][k]) for k in rec["keys"]}))


def mdpl_config(ref: dict[str, Any], head: str) -> dict[str, Any]:
    """mdpl's flat config for the reference's ViltConfig and msps arguments (fixture README, "MSPs")."""
    return dict(dataset=head, backbone="vilt", prompt_method="msps", load_path="", test_only=False, finetune=False,
                hidden_size=ref["hidden_size"], num_layers=ref["num_hidden_layers"],
                num_heads=ref["num_attention_heads"], mlp_ratio=ref["intermediate_size"] / ref["hidden_size"],
                patch_size=ref["patch_size"], image_size=ref["image_size"], max_text_len=ref["max_text_len"],
                vocab_size=ref["vocab_size"], drop_rate=0.0, vilt_variant="hf", interpolate_text_positions=True,
                msps_length=ref["prompt_len"], msps_layers=list(range(ref["prompt_num"])))


def mdpl_name(reference: str, head: str) -> str:
    """Trainable reference key -> mdpl key."""
    if reference.startswith("classifier."):
        return f"{head}_{reference}"
    if reference.startswith("pooler."):
        return f"backbone.{reference}"
    return next(iter(ModalitySpecificPrompts.upgrade_state_dict({reference: torch.zeros(())})))


def build(config: str, head: str, **over):
    """mdpl's classifier with the reference weights: the HF ViLT part through the HF ViLT reader, prompts and head
    by name."""
    rec = fixture(config)[head]
    cfg = {**mdpl_config(rec["config"], head), **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    state = reference_state(config, head)
    hf = load_ragpt_vilt(model, state)
    rest = {mdpl_name(k, head): v for k, v in state.items() if k.startswith(("classifier.", "text_prompt", "img_prompt"))}
    own = model.state_dict()
    assert set(rest) <= set(own)
    model.load_state_dict({**own, **rest}, strict=True)
    return model.eval()


def batch_of(rec: dict) -> dict:
    b = dict(rec["batch"])
    b["image"] = b.pop("pixels").float() / PIXEL_LEVELS
    return b


def channels(width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(CHANNELS_SEED)
    return torch.randperm(width, generator=g)[:CHANNELS].sort().values


def total_loss(model, head: str, batch: dict) -> tuple[torch.Tensor, dict]:
    out = model(batch)
    return task_loss(head, out["logits"], batch["label"]) + out["aux_loss"], out


@pytest.mark.parametrize("config,head", CASES)
def test_selected_prompts_and_key_mask_match_reference(config, head) -> None:
    """Module level: each prompted block's per-row prompts (the missing modality's tensor, the sum when complete) and
    the key mask (prompt keys, then the tokens without the image of image-missing rows)."""
    rec = fixture(config)[head]
    model = build(config, head)
    batch = batch_of(rec)
    stream = model.backbone.info.stream("joint")
    layers = list(model.prompt.config.msps_layers)
    with torch.no_grad():
        prompts = torch.stack([model.prompt.select(stream, i, batch["missing_type"]) for i in layers], dim=1)
    torch.testing.assert_close(prompts.double().sum(-1), rec["prompt_sums"], atol=1e-9, rtol=0)
    torch.testing.assert_close(prompts[..., channels(prompts.shape[-1])], rec["prompt_channels"], atol=0, rtol=0)
    x, mask, layout = model.backbone.embed_joint(batch["text_ids"], batch["text_masks"], batch["image"])
    _, mask0, _ = model.prompt.before_block(stream, 0, x, mask, layout, PromptContext(batch["missing_type"]))
    half = model.prompt.config.msps_length // 2
    assert bool(rec["key_mask"][:, :half].all())
    assert torch.equal(mask0, rec["key_mask"][:, half:])
    image_missing = batch["missing_type"] == 2
    assert not bool(mask0[image_missing][:, layout.span("image")].any()) or not bool(image_missing.any())


@pytest.mark.parametrize("config,head", CASES)
def test_logits_ortho_loss_and_total_loss_match_reference(config, head) -> None:
    rec = fixture(config)[head]
    model = build(config, head)
    batch = batch_of(rec)
    with torch.no_grad():
        loss, out = total_loss(model, head, batch)
    torch.testing.assert_close(out["logits"], rec["logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out["aux_losses"]["msps_ortho"], rec["ortho_loss"], rtol=LOSS_RTOL, atol=0)
    assert float(rec["ortho_loss"]) > 0.1     # far from orthogonal: the term and its gradient count
    torch.testing.assert_close(loss, rec["loss"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("config,head", CASES)
def test_every_trainable_gradient_matches_reference(config, head) -> None:
    rec = fixture(config)[head]
    model = build(config, head)
    total_loss(model, head, batch_of(rec))[0].backward()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {mdpl_name(n, head) for n in rec["trainable"]}
    assert set(rec["grads"]) == set(rec["trainable"])
    for name, ref in rec["grads"].items():
        assert_grad_matches(params[mdpl_name(name, head)].grad, ref, name)


def test_switches_change_outputs() -> None:
    """The reproduced behaviours are live switches: without the image-key masking, with the per-block cosine, with
    MAP's ViLT (LayerNorm eps 1e-6) the outputs move away from the reference's."""
    rec = fixture("A")["food101"]
    batch = batch_of(rec)
    with torch.no_grad():
        ref = build("A", "food101")(batch)
        unmasked = build("A", "food101", msps_mask_missing_image=False)(batch)
        per_layer = build("A", "food101", msps_ortho_mode="per_layer")(batch)
        timm = build("A", "food101", vilt_variant="map")(batch)
    image_missing = batch["missing_type"] == 2
    assert (unmasked["logits"] - ref["logits"])[image_missing].abs().max() > 1e-3
    torch.testing.assert_close(unmasked["logits"][~image_missing], ref["logits"][~image_missing], atol=1e-6, rtol=0)
    t, i = (reference_state("A", "food101")[k] for k in ("text_prompt", "img_prompt"))
    cosines = [(t[j] * i[j]).sum().abs() / (t[j].norm() * i[j].norm()) for j in range(t.shape[0])]
    torch.testing.assert_close(per_layer["aux_losses"]["msps_ortho"], torch.stack(cosines).mean(), rtol=1e-6, atol=0)
    assert per_layer["aux_losses"]["msps_ortho"] != ref["aux_losses"]["msps_ortho"]
    assert 0 < (timm["logits"] - ref["logits"]).abs().max()
