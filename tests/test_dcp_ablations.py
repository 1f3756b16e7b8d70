"""DCP ablation switches of the paper's Tables 1-3 (docs/methods.md §6.7), on tiny CLIP and ViLT models.

For every non-default value of every switch: (a) the model builds and takes one training step with a finite loss
on both backbones, and the parameters the switch adds learn; (b) it is not a no-op: the parameter structure is the
one its definition gives, and the outputs differ from the default model's given identical shared weights (or the
tokens it inserts are exactly those its definition gives); (c) invalid values are one-line UserInputErrors.
The defaults are the reference model (tests/test_dcp.py::test_parity_with_reference_dcp).
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from mdpl.engine.losses import task_loss
from mdpl.errors import UserInputError
from mdpl.prompts.dcp import DCPConfig, NarrowAttention, window_pool

from tiny_models import TYPES, tiny_batch, tiny_model  # noqa: E402,F401
N = 2                                   # tiny: prompt_length 6 -> 2 layer + 2 common + 2 dynamic prompts, depth 2

SWITCHES = [("dcp_projection", "fc"), ("dcp_correlated_inputs", "uni"),
            ("dcp_dynamic_depth", 2), ("dcp_dynamic_depth", 3),
            ("dcp_dynamic_mode", "max"), ("dcp_dynamic_mode", "min"), ("dcp_dynamic_mode", "avg"),
            ("dcp_common_depth", 2), ("dcp_common_depth", 3),
            ("dcp_common_projection", "fc"), ("dcp_common_reduction", 4), ("dcp_common_reduction", 8),
            ("dcp_reduction", 4), ("dcp_reduction", 40), ("dcp_dynamic_width", 8)]
COMBINED = [{"dcp_dynamic_depth": 2, "dcp_dynamic_mode": "avg"},
            {"dcp_common_depth": 2, "dcp_common_projection": "fc"},
            {"dcp_projection": "fc", "dcp_correlated_inputs": "uni"}]
NEW_PARAMETERS = {"dcp_dynamic_depth": "prompt.dynamic_deep.", "dcp_dynamic_mode": ".proj.",
                  "dcp_common_depth": "prompt.prompt_learner.deep_common_", "dcp_dynamic_width": ".attn_prompt.q_proj."}


def _model(backbone: str, seed: int = 0, **over) -> nn.Module:
    return tiny_model("dcp", backbone, seed, **over)


def _batch(backbone: str) -> dict:
    return tiny_batch(backbone)


def _with_shared_weights(variant: nn.Module, default: nn.Module) -> nn.Module:
    """`variant` with every tensor it shares (same key and shape) with `default` copied from `default`."""
    own = variant.state_dict()
    variant.load_state_dict({k: v for k, v in default.state_dict().items() if k in own and own[k].shape == v.shape},
                            strict=False)
    return variant


def _record(model: nn.Module, batch: dict) -> dict[str, dict[int, tuple]]:
    """stream -> block index -> (input x, mask, output x, output layout, missing types) of the method's before_block."""
    seen: dict[str, dict[int, tuple]] = {}
    inner = model.prompt.before_block

    def hook(stream, index, x, mask, layout, ctx):
        out = inner(stream, index, x, mask, layout, ctx)
        seen.setdefault(stream.name, {})[index] = (x.detach(), mask, out[0].detach(), out[2], ctx.missing_type)
        return out
    model.prompt.before_block = hook
    try:
        with torch.no_grad():
            model(batch)
    finally:
        del model.prompt.before_block
    return seen


# ------------------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("backbone", ["clip", "vilt"])
@pytest.mark.parametrize("over", [dict([s]) for s in SWITCHES] + COMBINED,
                         ids=[f"{k}={v}" for k, v in SWITCHES] + ["+".join(map(str, c.values())) for c in COMBINED])
def test_builds_and_trains_one_step(backbone, over):
    model = _model(backbone, **over)
    model.train()
    batch = _batch(backbone)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    loss = task_loss("food101", model(batch)["logits"], batch["label"])
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(params.values(), lr=0.1).step()
    new = [n for n in params if n.startswith("prompt.") and any(t in n for k, t in NEW_PARAMETERS.items() if k in over)]
    assert all(k not in NEW_PARAMETERS for k in over) or new, over
    for name in new:   # what the switch adds is trained
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
        assert not torch.equal(params[name].detach(), before[name]), name
    assert all(torch.isfinite(p).all() for p in params.values())


# ------------------------------------------------------------------------------------------------ (b)
@pytest.mark.parametrize("backbone", ["clip", "vilt"])
@pytest.mark.parametrize("key,value", SWITCHES, ids=[f"{k}={v}" for k, v in SWITCHES])
def test_not_a_no_op(backbone, key, value):
    """Same seed, every shared tensor copied from the default model: the outputs still differ."""
    default = _model(backbone)
    variant = _with_shared_weights(_model(backbone, **{key: value}), default)
    batch = _batch(backbone)
    with torch.no_grad():
        a, b = default(batch)["logits"], variant(batch)["logits"]
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-6)


def test_defaults_add_no_state():
    for backbone in ("clip", "vilt"):
        names = list(_model(backbone).state_dict())
        assert not any("deep" in n or ".proj." in n for n in names if n.startswith("prompt."))


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_fc_projection_is_one_linear_after_the_layernorm(backbone):
    learner = _model(backbone, dcp_projection="fc").prompt.prompt_learner
    default = _model(backbone).prompt.prompt_learner
    for side in ("image", "text"):
        fc, mlp = getattr(learner, f"compound_prompt_projections_{side}"), \
            getattr(default, f"compound_prompt_projections_{side}")
        assert len(fc) == len(mlp) == 2
        assert all(isinstance(m, nn.Linear) for m in fc)
        assert (fc[0].in_features, fc[0].out_features) == (mlp[0][0].in_features, mlp[0][2].out_features)
        assert len(getattr(learner, f"layernorm_{side}")) == 2
    names = dict(learner.named_parameters())
    assert "compound_prompt_projections_image.1.weight" in names and "compound_prompt_projections_image.1.0.weight" \
        not in names


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_unimodal_chain_reads_its_own_side_only(backbone):
    model = _model(backbone, dcp_correlated_inputs="uni")
    learner, bi = model.prompt.prompt_learner, _model(backbone).prompt.prompt_learner
    info = model.prompt.info
    dv, dt = info.width_of("image"), info.width_of("text")
    for l in range(2):   # input width = the side's own width (bi-modal: both)
        assert learner.compound_prompt_projections_text[l][0].in_features == dt
        assert learner.compound_prompt_projections_image[l][0].in_features == dv
        assert learner.layernorm_text[l].normalized_shape == (dt,) and learner.layernorm_image[l].normalized_shape == (dv,)
        assert bi.compound_prompt_projections_text[l][0].in_features == dv + dt
        assert learner.compound_prompt_projections_text[l][0].out_features == dt // 16
    for chain, coupled in ((learner, False), (bi, True)):
        img, txt = chain._layer_prompts()
        image_init = [chain.visual_prompt_complete, chain.visual_prompt_missing]
        text_init = [chain.text_prompt_complete, chain.text_prompt_missing]
        g_txt = torch.autograd.grad(sum(t.sum() for t in txt), image_init, allow_unused=True, retain_graph=True)
        g_img = torch.autograd.grad(sum(t.sum() for t in img), text_init, allow_unused=True, retain_graph=True)
        for g in (*g_txt, *g_img):
            assert (g is not None and g.abs().sum() > 0) == coupled
        own = torch.autograd.grad(sum(t.sum() for t in txt), text_init)
        assert all(g.abs().sum() > 0 for g in own)


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
@pytest.mark.parametrize("mode", ["attention", "max", "avg"])
def test_dynamic_depth_replaces_the_dynamic_tokens_with_fresh_ones(backbone, mode):
    """Block 1: Dyn = the block-1 generator on the block input's data tokens; R replaced (depth 2), C inherited."""
    model = _model(backbone, dcp_dynamic_depth=3, dcp_dynamic_mode=mode)
    assert len(model.prompt.dynamic_deep) == 2
    assert model.prompt.dynamic_deep[0] is not model.prompt.dynamic_deep[1]
    seen = _record(model, _batch(backbone))
    for stream in model.prompt.info.streams:
        for index in (1, 2):
            x, mask, out, layout, mt = seen[stream.name][index]
            dyn, common, layer = layout.span("dcp.dynamic"), layout.span("dcp.common"), layout.span("dcp.layer")
            key_mask = mask[:, dyn.stop:] if stream.masks_padding else None
            with torch.no_grad():
                want = model.prompt.dynamic_deep[index - 1][stream.name](x[:, dyn.stop:], key_mask, mt)
            torch.testing.assert_close(out[:, dyn], want, rtol=0, atol=0)
            assert not torch.allclose(out[:, dyn], x[:, dyn])
            assert torch.equal(out[:, common], x[:, common]) and torch.equal(out[:, dyn.stop:], x[:, dyn.stop:])
            assert torch.equal(out[:, layer], x[:, layer]) == (index >= 2)   # prompt_depth 2


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_common_depth_gives_each_block_its_own_common_prompts(backbone):
    model = _model(backbone, dcp_common_depth=3)
    learner, info = model.prompt.prompt_learner, model.prompt.info
    dv, dt = info.width_of("image"), info.width_of("text")
    assert learner.deep_common_prompts.shape == (2, 3, N, dt)
    assert len(learner.deep_common_projections_image) == 2 and len(learner.deep_common_projections_text) == 2
    assert learner.deep_common_projections_image[0][2].out_features == dv
    seen = _record(model, _batch(backbone))
    for stream in info.streams:
        for index in (1, 2):
            x, _, out, layout, mt = seen[stream.name][index]
            common, dyn = layout.span("dcp.common"), layout.span("dcp.dynamic")
            with torch.no_grad():
                c = learner.deep_common_prompts[index - 1]
                per_side = {"text": learner.deep_common_projections_text[index - 1](c),
                            "image": learner.deep_common_projections_image[index - 1](c)}
                want = torch.cat([per_side[m] for m in stream.modalities], dim=1)[mt]
            torch.testing.assert_close(out[:, common], want, rtol=0, atol=0)
            assert torch.equal(out[:, dyn], x[:, dyn]) and torch.equal(out[:, dyn.stop:], x[:, dyn.stop:])


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_common_projection_forms(backbone):
    info = _model(backbone).prompt.info
    dv, dt = info.width_of("image"), info.width_of("text")
    fc = _model(backbone, dcp_common_projection="fc").prompt.prompt_learner
    assert isinstance(fc.common_prompt_projection_image, nn.Linear)
    assert isinstance(fc.common_prompt_projection_text, nn.Linear)
    for r in (4, 8, 16):
        learner = _model(backbone, dcp_common_reduction=r).prompt.prompt_learner
        assert learner.common_prompt_projection_image[0].out_features == dt // r
        assert learner.common_prompt_projection_text[0].out_features == dt // r
        assert learner.compound_prompt_projections_text[0][0].out_features == (dv + dt) // 16   # chain unchanged


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
@pytest.mark.parametrize("unimodal", [False, True])
def test_reduction_sets_the_chain_hidden_width(backbone, unimodal):
    info = _model(backbone).prompt.info
    dv, dt = info.width_of("image"), info.width_of("text")
    inputs = {"dcp_correlated_inputs": "uni"} if unimodal else {}
    for r in (2, 4, 16):
        learner = _model(backbone, dcp_reduction=r, **inputs).prompt.prompt_learner
        for side, width in (("image", dv), ("text", dt)):
            mlp = getattr(learner, f"compound_prompt_projections_{side}")[0]
            d_in = width if unimodal else dv + dt
            assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (d_in, d_in // r, width)
        assert learner.common_prompt_projection_text[0].out_features == dt // 16   # G unchanged


def test_narrow_attention_at_full_width_is_the_reference_attention():
    """NarrowAttention(width, width) with nn.MultiheadAttention's weights computes the same attention, with and without
    a key-padding mask; at a smaller inner width it holds 4 * width * inner + 3 * inner + width parameters."""
    torch.manual_seed(0)
    width, n = 16, 3
    mha = nn.MultiheadAttention(width, 1, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    narrow = NarrowAttention(width, width)
    q_w, k_w, v_w = mha.in_proj_weight.chunk(3)
    q_b, k_b, v_b = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, w, b in ((narrow.q_proj, q_w, q_b), (narrow.k_proj, k_w, k_b), (narrow.v_proj, v_w, v_b)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        narrow.out_proj.load_state_dict(mha.out_proj.state_dict())
    query, data = torch.randn(4, n, width), torch.randn(4, 7, width)
    padding = torch.zeros(4, 7, dtype=torch.bool)
    padding[1, 4:] = True
    padding[3, 2:] = True
    for mask in (None, padding):
        want = mha(query, data, data, key_padding_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(narrow(query, data, mask), want, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in NarrowAttention(768, 8).parameters()) == 4 * 768 * 8 + 3 * 8 + 768


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_dynamic_width_narrows_every_stream(backbone):
    model = _model(backbone, dcp_dynamic_width=8)
    for stream in model.prompt.info.streams:
        attn = model.prompt.dynamic[stream.name].attn_prompt
        assert isinstance(attn, NarrowAttention)
        assert (attn.q_proj.in_features, attn.q_proj.out_features, attn.out_proj.out_features) == (
            stream.width, 8, stream.width)
        assert model.prompt.dynamic[stream.name].prompts_dynamic_complete.shape == (N, 1, stream.width)
    seen = _record(model, _batch(backbone))
    for stream in model.prompt.info.streams:   # the inserted tokens are the narrow attention of the block-0 input
        x, mask, out, layout, types = seen[stream.name][0]
        gen = model.prompt.dynamic[stream.name]
        queries = torch.stack([gen.prompts_dynamic_complete[:, 0], gen.prompts_dynamic_image[:, 0],
                               gen.prompts_dynamic_text[:, 0]])[types]
        with torch.no_grad():
            want = gen.attn_prompt(queries, x, ~mask if stream.masks_padding else None)
        torch.testing.assert_close(out[:, layout.span("dcp.dynamic")], want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["max", "min", "avg"])
def test_window_pool(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 5, generator=g)
    for n in (1, 4, 11, 13):   # 13 > 11 tokens: overlapping one-token windows, as adaptive pooling
        got = window_pool(x, None, n, mode)
        t = x.transpose(1, 2)
        want = {"max": lambda: nn.functional.adaptive_max_pool1d(t, n),
                "min": lambda: -nn.functional.adaptive_max_pool1d(-t, n),
                "avg": lambda: nn.functional.adaptive_avg_pool1d(t, n)}[mode]().transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False                      # row 1: windows 2 and 3 (of 4) hold padding only, window 1 part of it
    got = window_pool(x, mask, 4, mode)
    torch.testing.assert_close(got[0], window_pool(x[:1], None, 4, mode)[0])
    assert torch.equal(got[1, 3], torch.zeros(5))
    reduce = {"max": lambda w: w.amax(0), "min": lambda w: w.amin(0), "avg": lambda w: w.mean(0)}[mode]
    torch.testing.assert_close(got[1, 1], reduce(x[1, 2:6]))   # window 1 = positions 2..5, all real


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
@pytest.mark.parametrize("mode", ["max", "min", "avg"])
def test_pooled_dynamic_prompts_are_a_linear_of_the_window_pool(backbone, mode):
    model = _model(backbone, dcp_dynamic_mode=mode)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not any("attn_prompt" in n or "prompts_dynamic_" in n for n in names)
    seen = _record(model, _batch(backbone))
    for stream in model.prompt.info.streams:
        x, mask, out, layout, _ = seen[stream.name][0]
        gen = model.prompt.dynamic[stream.name]
        assert isinstance(gen.proj, nn.Linear) and gen.proj.in_features == gen.proj.out_features == stream.width
        with torch.no_grad():
            want = gen.proj(window_pool(x, mask if stream.masks_padding else None, N, mode))
        torch.testing.assert_close(out[:, layout.span("dcp.dynamic")], want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ (c)
@pytest.mark.parametrize("over,message", [
    ({"dcp_projection": "linear"}, r"^dcp_projection='linear' must be one of mlp, fc$"),
    ({"dcp_correlated_inputs": "both"}, r"^dcp_correlated_inputs='both' must be one of bi, uni$"),
    ({"dcp_dynamic_mode": "sum"}, r"^dcp_dynamic_mode='sum' must be one of attention, max, min, avg$"),
    ({"dcp_common_projection": 3}, r"^dcp_common_projection=3 must be one of mlp, fc$"),
    ({"dcp_dynamic_depth": 0}, r"^dcp_dynamic_depth=0 must be an integer in 1\.\.3 \(the CLIP"),
    ({"dcp_dynamic_depth": 4}, r"^dcp_dynamic_depth=4 must be an integer in 1\.\.3"),
    ({"dcp_dynamic_depth": True}, r"^dcp_dynamic_depth=True must be an integer"),
    ({"dcp_common_depth": 2.0}, r"^dcp_common_depth=2\.0 must be an integer in 1\.\.3"),
    ({"dcp_common_depth": -1}, r"^dcp_common_depth=-1 must be an integer"),
    ({"dcp_common_reduction": 0}, r"^dcp_common_reduction must be a positive integer, got 0$"),
    ({"dcp_common_reduction": "8"}, r"^dcp_common_reduction must be a positive integer, got '8'$"),
    ({"dcp_common_reduction": 64}, r"^dcp_common_reduction=64 leaves the modal-common MLP no hidden unit \(text "
                                   r"width 32 // 64 = 0\); choose dcp_common_reduction <= 32$"),
    ({"dcp_correlated": False, "dcp_projection": "fc"}, r"^dcp_projection='fc' has no effect: dcp_correlated=False"),
    ({"prompt_depth": 0, "dcp_dynamic": False, "dcp_common": False, "dcp_correlated_inputs": "uni"},
     r"^dcp_correlated_inputs='uni' has no effect: dcp_correlated=False \(or prompt_depth=0\)"),
    ({"dcp_dynamic": False, "dcp_dynamic_depth": 2}, r"^dcp_dynamic_depth=2 has no effect: dcp_dynamic=False"),
    ({"dcp_dynamic": False, "dcp_dynamic_mode": "max"}, r"^dcp_dynamic_mode='max' has no effect"),
    ({"dcp_common": False, "dcp_common_depth": 2}, r"^dcp_common_depth=2 has no effect: dcp_common=False"),
    ({"dcp_common": False, "dcp_common_projection": "fc"}, r"^dcp_common_projection='fc' has no effect"),
    ({"dcp_common": False, "dcp_common_reduction": 4}, r"^dcp_common_reduction=4 has no effect"),
    ({"dcp_common_projection": "fc", "dcp_common_reduction": 4},
     r"^dcp_common_reduction=4 has no effect with dcp_common_projection='fc'"),
    ({"dcp_reduction": 0}, r"^dcp_reduction must be a positive integer, got 0$"),
    ({"dcp_reduction": "8"}, r"^dcp_reduction must be a positive integer, got '8'$"),
    ({"dcp_reduction": 81}, r"^dcp_reduction=81 leaves the correlated MLP no hidden unit \(input width 80 // 81 = "
                            r"0\); choose dcp_reduction <= 80$"),
    ({"dcp_correlated_inputs": "uni", "dcp_reduction": 40},
     r"^dcp_reduction=40 leaves the correlated MLP no hidden unit \(input width 32 // 40"),
    ({"dcp_projection": "fc", "dcp_reduction": 4}, r"^dcp_reduction=4 has no effect with dcp_projection='fc'"),
    ({"dcp_correlated": False, "dcp_reduction": 4}, r"^dcp_reduction=4 has no effect: dcp_correlated=False"),
    ({"dcp_dynamic_width": -1}, r"^dcp_dynamic_width must be 0 \(the stream's width, as the reference\) or a "
                                r"positive integer, got -1$"),
    ({"dcp_dynamic_width": True}, r"^dcp_dynamic_width must be 0 .* got True$"),
    ({"dcp_dynamic_width": 2.5}, r"^dcp_dynamic_width must be 0 .* got 2\.5$"),
    ({"dcp_dynamic": False, "dcp_dynamic_width": 8}, r"^dcp_dynamic_width=8 has no effect: dcp_dynamic=False"),
    ({"dcp_dynamic_mode": "avg", "dcp_dynamic_width": 8},
     r"^dcp_dynamic_width=8 has no effect with dcp_dynamic_mode='avg'"),
    ({"dcp_dynamic_mode": "avg", "dcp_dynamic_trainable": True},
     r"^dcp_dynamic_trainable=True has no effect with dcp_dynamic_mode='avg'"),
])
def test_invalid_values_are_one_line_errors(over, message):
    with pytest.raises(UserInputError, match=message) as err:
        _model("clip", **over)
    assert "\n" not in str(err.value)


def test_config_validation_reads_the_switches():
    """run.py's validation (before any work) refuses the same values in one line, and accepts every valid one."""
    from mdpl.config.validate import check_prompt_sizes
    base = {"prompt_method": "dcp", "backbone": "clip", "clip_vision_layers": 12, "clip_text_layers": 12}
    for key, value in SWITCHES:
        check_prompt_sizes({**base, key: value})
    with pytest.raises(UserInputError, match=r"dcp_dynamic_depth=13 must be an integer in 1\.\.12"):
        check_prompt_sizes({**base, "dcp_dynamic_depth": 13})
    assert set(DCPConfig.structural_keys()) >= {k for k, _ in SWITCHES}
