"""The exact cuts of the forward pass equal the uncut computation (logits and gradients, fp32, 1e-5).

* The last block of every stream computes only the position its feature is read from (ViLT: the text [CLS];
  CLIP: the image CLS and the text EOT) — `StreamEncoder.forward_blocks(readout=...)`.
* The causal CLIP text tower drops the positions after the batch's last EOT once the method has read every position
  for the last time (`needed`, `PromptMethod.reads_every_position_until`): MemPrompt after its last generative
  layer, DCP after block 0's dynamic prompts, the others before block 0.
The uncut reference here runs every position of every block and then reads the same tokens.

Every method on both backbones, random inputs with mixed text lengths and all three missing types.
"""
from __future__ import annotations

import pytest
import torch

from mdpl.backbones.attention import take_rows
from mdpl.prompts.base import MISSING_TYPE_OF, PromptContext
from tiny_models import tiny_batch, tiny_model

METHODS = ("none", "map", "memprompt", "dcp")


def _model(method: str, backbone: str, **over) -> torch.nn.Module:
    return tiny_model(method, backbone, **over)


def _batch(backbone: str) -> dict:
    return tiny_batch(backbone)


def test_text_tower_runs_only_up_to_the_last_eot() -> None:
    """The cut is real: the text tower's blocks see 1 + 70 + 1 = 72 data positions, not 77 (longest text: 70)."""
    model = _model("map", "clip")
    seen = []
    tower = model.backbone.text_encoder
    inner = tower.run_block
    tower.run_block = lambda index, x, *a: seen.append(x.shape[1]) or inner(index, x, *a)
    with torch.no_grad():
        model(_batch("clip"))
    assert seen == [72 + 6, 72 + 6 + 6, 72 + 6 + 6]   # MAP tiny: 6 prompts before blocks 0 and 1


def _uncut_forward(model, batch: dict) -> torch.Tensor:
    """The classifier's forward with every position of every block computed, the feature token read afterwards."""
    mt = batch["missing_type"]
    prepared = model.prompt.prepare(mt)
    features = []
    for stream in model.backbone.info.streams:
        drop = model.prompt.drops_missing_streams and not stream.joint
        keep = mt != MISSING_TYPE_OF[stream.modalities[0]] if drop else torch.ones_like(mt, dtype=torch.bool)
        x, mask, layout = model.backbone.embed(stream.name, batch)
        x, mask, layout = model.backbone.encoders()[stream.name].forward_blocks(
            x, mask, layout, model.prompt, PromptContext(mt, prepared))
        token = take_rows(x, model.backbone.readout(stream.name, layout, batch))[:, 0]
        features.append(model.backbone.pool(stream.name, token) * keep[:, None])
    return model.head(torch.cat(features, dim=1))


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("host_length", [True, False], ids=["text_len_host", "from_ids"])
def test_cut_forward_equals_the_full_computation(method: str, backbone: str, host_length: bool) -> None:
    over = {"dcp_skip_missing": False} if method == "dcp" else {}
    model = _model(method, backbone, **over)
    batch = _batch(backbone)
    if host_length:   # as the collator gives it: the longest real text (CLIP: SOT .. EOT)
        batch["text_len_host"] = int((batch["text_ids"] != 0).sum(1).max()) if backbone == "clip" else 12
    cut = model(batch)["logits"]
    full = _uncut_forward(model, batch)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g_cut = torch.autograd.grad(cut.square().sum(), params, allow_unused=True)
    g_full = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
    for a, b in zip(g_cut, g_full):
        assert (a is None) == (b is None)
        if a is not None:   # 1e-5 relative to the gradient's size (MAP on tiny random CLIP: |g| up to ~2e4)
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)
