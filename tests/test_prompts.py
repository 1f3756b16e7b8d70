"""Prompt methods (docs/methods.md §3 MAP, §4 MemPrompt, 'none'), token layout, registry, classifier counts."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mdpl.backbones.vilt import BackboneOutput
from mdpl.errors import UserInputError
from mdpl.models import build_classifier
from mdpl.prompts import (IMAGE, TEXT, BackboneInfo, PromptContext, StreamInfo, TokenLayout, build_method,
                          splice_tokens)
from mdpl.prompts.map import MapConfig, MissingAwarePrompts
from mdpl.prompts.memprompt import MemPrompt, MemPromptConfig, PromptMemory
from mdpl.config.validate import validate_config

TINY = dict(vocab_size=60, hidden_size=32, num_layers=3, num_heads=4, mlp_ratio=4, patch_size=8,
            image_size=32, max_text_len=10, drop_rate=0.1, load_path="", dataset="mmimdb")
STREAM = StreamInfo("joint", width=32, num_layers=3, num_heads=4, modalities=(TEXT, IMAGE))  # ViLT's one stream
INFO = BackboneInfo((STREAM,))


def _build(**over):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_classifier({**TINY, **over}).eval()


def _batch(b=4, hw=(32, 32), sizes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [(32, 32), (24, 32), (32, 16), (16, 24)][:b]
    img = torch.zeros(b, 3, *hw)
    for i, (h, w) in enumerate(sizes):
        img[i, :, :h, :w] = torch.rand(3, h, w, generator=g) * 2 - 1
    ids = torch.randint(5, 60, (b, 10), generator=g)
    masks = torch.ones(b, 10, dtype=torch.long)
    masks[:, 7:] = 0
    return {"image": img, "image_sizes": torch.tensor(sizes), "text_ids": ids, "text_masks": masks,
            "missing_type": torch.tensor([0, 1, 2, 0, 1, 2][:b])}


def _noisy(model):
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _map(**options) -> MissingAwarePrompts:
    return MissingAwarePrompts(MapConfig.from_config(options), INFO)


def _prompted_features(model, batch) -> BackboneOutput:
    """The joint ViLT stream with the model's method: embed -> the block loop with its hooks -> final LayerNorm."""
    x, mask, layout = model.backbone.embed("joint", batch)
    mt = batch["missing_type"]
    ctx = PromptContext(mt, model.prompt.prepare(mt))
    x, mask, layout = model.backbone.encoders()["joint"].forward_blocks(x, mask, layout, model.prompt, ctx)
    return BackboneOutput(hidden=model.backbone.transformer.norm(x), mask=mask, layout=layout)


# --- layout ------------------------------------------------------------------------------------------
def test_token_layout_offsets_and_splice():
    lay = TokenLayout([("text", 5), ("image", 7)]).prepend([("p0", 2)]).insert_after("text", [("q0", 3)])
    assert lay.names == ["p0", "text", "q0", "image"] and lay.total == 17
    assert lay.offset("text") == 2 and lay.span("image") == slice(10, 17) and lay.end("text") == 7
    with pytest.raises(ValueError):
        lay.prepend([("text", 1)])
    x, mask = torch.zeros(2, 4, 3), torch.tensor([[True, True, False, False]] * 2)
    x2, m2 = splice_tokens(x, mask, 2, [torch.ones(2, 1, 3), 2 * torch.ones(2, 2, 3)])
    assert x2[:, 2:5, 0].tolist() == [[1, 2, 2]] * 2 and m2[0].tolist() == [True] * 5 + [False, False]


# --- MAP -----------------------------------------------------------------------------------------------
def test_map_init_per_spec():
    inp = _map(prompt_type="input", prompt_length=6, prompt_layers=[0, 1])
    att = _map(prompt_type="attention", prompt_length=6, prompt_layers=[0, 1])
    for mod, extra in ((inp, False), (att, True)):
        for t, (name, k) in enumerate((("complete_prompt", 0), ("missing_text_prompt", 2),
                                       ("missing_img_prompt", 1))):
            p = getattr(mod, name)
            assert p.shape == (2, 6, 32)
            ones = {k, 3 + k} if extra else {k}
            for tok in range(6):
                assert torch.all(p[:, tok] == (1.0 if tok in ones else 0.0)), (name, tok)
    assert _map(prompt_layers=[0, 2], multi_layer_prompt=False).complete_prompt.shape[0] == 1


def test_map_selection_by_index_equals_per_sample_loop():
    mod = _map(prompt_length=4, prompt_layers=[0, 2])
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    mt = torch.tensor([2, 0, 1, 1, 0, 2])
    names = ["complete_prompt", "missing_text_prompt", "missing_img_prompt"]
    for j, layer in enumerate([0, 2]):
        loop = torch.stack([getattr(mod, names[int(t)])[j] for t in mt])
        assert torch.equal(mod.select(STREAM, layer, mt), loop)


def test_map_input_mode_prepends_and_pools_text_cls():
    model = _noisy(_build(prompt_method="map", prompt_length=4, prompt_layers=[0, 2]))
    batch = _batch()
    with torch.no_grad():
        out = _prompted_features(model, batch)
        res = model(batch)
    assert out.layout.names == ["map.2", "map.0", "text", "image"]
    assert out.layout.offset("text") == 8 and out.hidden.shape[1] == 8 + 10 + 17
    assert out.mask[:, :8].all()
    torch.testing.assert_close(res["pooled"], model.backbone.pooler(out.hidden[:, 8]))
    assert res["logits"].shape == (4, 23)


def test_map_attention_mode_keeps_length():
    model = _noisy(_build(prompt_method="map", prompt_type="attention", prompt_length=4, prompt_layers=[1]))
    batch = _batch()
    ctx = PromptContext(batch["missing_type"])
    with torch.no_grad():
        out = _prompted_features(model, batch)
        k, v = model.prompt.attention_prompts(STREAM, 1, out.hidden, ctx)
        plain = model.backbone.forward_features(batch["text_ids"], batch["text_masks"], batch["image"],
                                                batch["image_sizes"])
    assert out.layout.names == ["text", "image"] and out.hidden.shape == plain.hidden.shape
    assert k.shape == v.shape == (4, 2, 32) and model.prompt.attention_prompts(STREAM, 0, out.hidden, ctx) is None
    assert not torch.allclose(out.hidden, plain.hidden)  # prompts act
    assert out.layout.offset("text") == 0   # the pooled text [CLS] stays in front


def test_map_missing_type_changes_output_per_sample_only():
    model = _noisy(_build(prompt_method="map", prompt_length=4, prompt_layers=[0, 1]))
    batch = _batch()
    with torch.no_grad():
        a = model(batch)["logits"]
        batch2 = dict(batch, missing_type=torch.tensor([0, 1, 0, 0]))  # sample 2 changed
        b = model(batch2)["logits"]
    assert torch.allclose(a[[0, 1, 3]], b[[0, 1, 3]], atol=1e-6) and not torch.allclose(a[2], b[2])


# --- MemPrompt ----------------------------------------------------------------------------------------
def test_prompt_memory_matches_unsorted_reference_formula():
    torch.manual_seed(0)
    mem = PromptMemory(mem_size=7, prompt_length=3, dim=16, top_k=4)
    q = torch.randn(5, 16)
    out = mem(q)
    qn = q / q.norm(dim=-1, keepdim=True)
    kn = mem.prompt_keys / mem.prompt_keys.norm(dim=-1, keepdim=True)
    idx = torch.topk(qn @ kn.t(), 4, dim=1, sorted=False).indices
    w = torch.softmax((qn[:, None] * kn[idx]).sum(-1), dim=1)
    ref = (mem.prompt_memory[idx] * w[..., None, None]).sum(1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    big = PromptMemory(16, 16, 768, 5)  # kaiming-normal a=sqrt(5), fan_in: std = (1/sqrt3)/sqrt(fan_in)
    assert abs(big.prompt_memory.std().item() - (1 / math.sqrt(3)) / math.sqrt(16 * 768)) < 3e-4
    assert abs(big.prompt_keys.std().item() - (1 / math.sqrt(3)) / math.sqrt(768)) < 2e-3


def test_shared_prompts_gather_equals_per_sample_loop():
    mod = MemPrompt(MemPromptConfig(gen_prompt_length=2, shared_prompt_length=3, gen_prompt_layers=(0, 1),
                                    shared_prompt_layers=(1, 2), mem_size=4, top_k=2, bottleneck_dim=5), INFO)
    mt = torch.tensor([1, 0, 2, 2, 0])
    # layer 2 = position 1 in the shared list (D-28)
    st, sv = mod.shared_prompt(TEXT, 2, mt), mod.shared_prompt(IMAGE, 2, mt)
    t, v = mod.shared_missing_t[1], mod.shared_missing_v[1]
    for i, m in enumerate(mt.tolist()):
        s = t + v if m == 0 else (t if m == 1 else v)
        torch.testing.assert_close(st[i], mod.bottleneck_texts[1](s), atol=1e-6, rtol=0)
        torch.testing.assert_close(sv[i], mod.bottleneck_images[1](s), atol=1e-6, rtol=0)


def test_memprompt_layout_and_pooling():
    model = _build(prompt_method="memprompt", gen_prompt_length=3, shared_prompt_length=2,
                   gen_prompt_layers=[0, 1], shared_prompt_layers=[0, 1], mem_size=4, top_k=2, bottleneck_dim=4)
    batch = _batch()
    with torch.no_grad():
        out = _prompted_features(model, batch)
        res = model(batch)
    assert out.layout.names == ["mem.shared_t.1", "mem.gen_t.1", "mem.shared_t.0", "mem.gen_t.0", "text",
                                "mem.shared_v.1", "mem.gen_v.1", "mem.shared_v.0", "mem.gen_v.0", "image"]
    assert out.layout.offset("text") == 10 and out.layout.offset("image") == 10 + 10 + 10
    torch.testing.assert_close(res["pooled"], model.backbone.pooler(out.hidden[:, 10]))
    pm = out.mask
    assert pm[:, :10].all() and pm[:, 20:30].all() and not pm[:, 17:20].any()


def test_memprompt_default_sizes_give_192_prompt_tokens_per_side():
    stream = StreamInfo("joint", width=32, num_layers=12, num_heads=4, modalities=(TEXT, IMAGE))
    mod = MemPrompt(MemPromptConfig(), BackboneInfo((stream,)))  # default lengths 16, layers 0..5
    x, mask = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    lay = TokenLayout([("text", 4), ("image", 5)])
    ctx = PromptContext(torch.tensor([0, 2]))
    with torch.no_grad():
        for i in range(12):
            x, mask, lay = mod.before_block(stream, i, x, mask, lay, ctx)
    assert lay.offset("text") == 192 and lay.offset("image") - lay.end("text") == 192 and x.shape[1] == 9 + 384


@pytest.mark.parametrize("mask_padding", [True, False])
def test_memprompt_mask_padding_makes_predictions_batch_invariant(mask_padding):
    model = _build(prompt_method="memprompt", gen_prompt_length=3, shared_prompt_length=2,
                   gen_prompt_layers=[0, 1, 2], shared_prompt_layers=[0, 1, 2], mem_size=6, top_k=2,
                   bottleneck_dim=4, memprompt_mask_padding=mask_padding)
    with torch.no_grad():  # make padding patches (no position embedding) win the max in some dims
        model.backbone.transformer.pos_embed[..., :8] -= 3.0
        for p in list(model.prompt.parameters()) + list(model.mmimdb_classifier.parameters()):
            p.add_(0.5 * torch.randn_like(p))
    batch = _batch(sizes=[(16, 16), (32, 32), (24, 16), (32, 8)])
    alone = {k: v[:1] for k, v in batch.items()}
    alone["image"] = alone["image"][:, :, :16, :16]
    with torch.no_grad():
        in_batch = model(batch)["logits"][0]
        single = model(alone)["logits"][0]
    if mask_padding:
        torch.testing.assert_close(in_batch, single, atol=1e-5, rtol=0)
    else:  # reference behaviour (D-30): padding patches enter the max-pooled query
        assert not torch.allclose(in_batch, single, atol=1e-3)


# --- config validation / registry / counts ---------------------------------------------------------------
@pytest.mark.parametrize("over, match", [
    (dict(prompt_method="nope"), "unknown prompt_method"),
    (dict(prompt_method="map", prompt_layers=[0, 3]), "outside 0..2"),
    (dict(prompt_method="map", prompt_length=0), "prompt_length"),
    (dict(prompt_method="map", prompt_type="deep"), "prompt_type"),
    (dict(prompt_method="map", prompt_type="attention", prompt_length=5, prompt_layers=[0]), "even"),
    (dict(prompt_method="map", prompt_layers=[1, 1]), "names a layer twice"),
    (dict(prompt_method="memprompt", gen_prompt_layers=[0, 5]), "outside 0..2"),
    (dict(prompt_method="memprompt", top_k=0), "top_k"),
    (dict(dataset="cifar"), "dataset"),
])
def test_bad_config_raises_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _build(**over)


def test_memprompt_refuses_map_prompt_type():
    """prompt_type is a MAP key: MemPrompt does not read it, and config validation refuses it for memprompt."""
    assert "prompt_type" not in MemPromptConfig.keys() and "prompt_type" in MapConfig.keys()
    config = {**TINY, "prompt_method": "memprompt", "method_sizes": "tiny"}
    validate_config(config, check_data=False)
    with pytest.raises(UserInputError, match="prompt_type='attention' is read only by map"):
        validate_config({**config, "prompt_type": "attention"}, check_data=False)


def test_build_method_registry():
    assert type(build_method("map", MapConfig(prompt_layers=(0,)), INFO)).__name__ == "MissingAwarePrompts"
    assert build_method("", None, INFO).name == "none"


@pytest.mark.parametrize("method, expected", [("map", 2_031_383), ("memprompt", 5_358_935), ("none", 1_810_199)])
def test_trainable_counts_mmimdb_default_sizes(method, expected):
    """docs/methods.md §3.4 / §4.1 counts, built on the meta device (no memory, no init cost)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = build_classifier(dict(dataset="mmimdb", max_text_len=1024, load_path="", prompt_method=method))
    total, trainable = model.trainable_parameters_report()
    assert trainable == expected
    assert not any(p.requires_grad for p in model.backbone.transformer.parameters())
    assert all(p.requires_grad for p in model.backbone.pooler.parameters())
    assert all(p.requires_grad for p in model.mmimdb_classifier.parameters())


def test_finetune_and_learnt_p_flags():
    assert _build(prompt_method="none", finetune=True).trainable_parameters_report()[1] == \
        _build(prompt_method="none", finetune=True).trainable_parameters_report()[0]
    frozen = _build(prompt_method="map", prompt_layers=[0], learnt_p=False)
    assert not frozen.prompt.complete_prompt.requires_grad
    assert "mmimdb_classifier.0.weight" in frozen.state_dict() and "prompt.complete_prompt" in frozen.state_dict()
