"""CLIP backbone (docs/methods.md §5): OpenAI-layout loading, towers block by block, strict key checks."""
from __future__ import annotations

from runs import as_run

import warnings

import pytest
import torch
from torch import nn

from mdpl.backbones.clip import ClipBackbone, ClipSizes, _build_open_clip, build_clip_backbone, residual_block
from mdpl.backbones.clip_weights import OPENAI_EXTRA_KEYS, read_openai_checkpoint, sha256_of

TINY = dict(clip_embed_dim=32, image_size=32, clip_patch_size=16, clip_vision_width=48, clip_vision_layers=2,
            clip_vision_head_width=24, clip_vocab_size=1000, clip_text_width=32, clip_text_heads=2, clip_text_layers=2)


def _random_backbone(seed: int = 0) -> ClipBackbone:
    torch.manual_seed(seed)
    return ClipBackbone(ClipSizes.from_config(TINY))


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    ids[:, 0] = 998
    ids[:, 1:6] = torch.randint(1, 900, (batch, 5), generator=g)
    ids[torch.arange(batch), torch.tensor([6, 3, 2])[:batch]] = 999        # EOT = largest id
    return image, ids


def _features(backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
    image, ids = _inputs()
    with torch.no_grad():
        return backbone.image_encoder(image), backbone.text_encoder(ids)


def test_openai_key_layout_and_sizes():
    sd = _random_backbone().openai_state_dict()
    assert sd["visual.conv1.weight"].shape == (48, 3, 16, 16)
    assert sd["visual.proj"].shape == (48, 32) and sd["text_projection"].shape == (32, 32)
    assert sd["token_embedding.weight"].shape == (1000, 32) and sd["positional_embedding"].shape == (77, 32)
    assert sd["visual.positional_embedding"].shape == (5, 48)
    assert "transformer.resblocks.1.mlp.c_proj.weight" in sd and "logit_scale" in sd
    assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in sd)
    default = ClipSizes()
    assert (default.vision_width, default.vision_layers, default.text_width, default.text_heads) == (768, 12, 512, 8)


def test_towers_match_open_clip_encoders():
    """Our embed -> blocks -> pool equals open_clip's own encode_image/encode_text (QuickGELU, causal mask)."""
    backbone = _random_backbone()
    oc = _build_open_clip(ClipSizes.from_config(TINY))
    oc.load_state_dict(backbone.openai_state_dict(), strict=True)
    image, ids = _inputs()
    f_v, f_t = _features(backbone)
    with torch.no_grad():
        assert torch.allclose(f_v, oc.encode_image(image), atol=1e-6)
        assert torch.allclose(f_t, oc.encode_text(ids), atol=1e-6)
    blk = backbone.image_encoder.blocks[0]
    assert isinstance(blk.mlp.gelu, type(oc.visual.transformer.resblocks[0].mlp.gelu))
    assert type(blk.mlp.gelu).__name__ == "QuickGELU"


def test_state_dict_round_trip_plain_and_fp16(tmp_path):
    src = _random_backbone(0)
    sd = src.openai_state_dict()
    path = tmp_path / "clip.pt"
    torch.save({**sd, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(1000)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dst = build_clip_backbone(as_run({**TINY, "clip_path": str(path)}, "clip"))
    for a, b in zip(_features(src), _features(dst)):
        assert torch.equal(a, b)
    # fp16 checkpoint (as OpenAI ships it): loaded as fp32 holding fp16-representable values
    torch.save({k: v.half() for k, v in sd.items()}, path)
    loaded = read_openai_checkpoint(str(path))
    assert all(v.dtype == torch.float32 for v in loaded.values())
    assert torch.equal(loaded["visual.proj"], sd["visual.proj"].half().float())
    assert not set(OPENAI_EXTRA_KEYS) & set(loaded)


class _Holder(nn.Module):
    """A scriptable module tree whose state dict is a given OpenAI-layout dict (stand-in for ViT-B-16.pt)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in sd.items():
            *path, leaf = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_buffer(leaf, value.clone())

    def forward(self) -> torch.Tensor:
        return torch.zeros(1)


def test_jit_archive_round_trip(tmp_path):
    src = _random_backbone(0)
    sd = {k: v.half() for k, v in src.openai_state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(1000))
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)           # torch.jit deprecation
        torch.jit.save(torch.jit.script(_Holder(sd)), str(path))
    dst = build_clip_backbone(as_run({**TINY, "clip_path": str(path), "clip_sha256": sha256_of(str(path))}, "clip"))
    ref = _random_backbone(0)
    ref.load_openai_state_dict({k: v.float() for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS})
    for a, b in zip(_features(ref), _features(dst)):
        assert torch.equal(a, b)


def test_strict_errors_and_missing_file(tmp_path):
    backbone = _random_backbone()
    sd = backbone.openai_state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        backbone.load_openai_state_dict({k: v for k, v in sd.items() if k != "visual.ln_post.weight"})
    with pytest.raises(ValueError, match="unexpected keys"):
        backbone.load_openai_state_dict({**sd, "visual.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatches"):
        backbone.load_openai_state_dict({**sd, "visual.proj": torch.zeros(48, 64)})
    with pytest.raises(FileNotFoundError, match="clip_path"):
        build_clip_backbone(as_run({**TINY, "clip_path": str(tmp_path / "absent.pt")}, "clip"))
    path = tmp_path / "clip.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="SHA-256"):
        read_openai_checkpoint(str(path), sha256="0" * 64)
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_clip_backbone(as_run(TINY, "clip"))


def test_text_tower_causal_and_eot():
    """Tokens after the EOT do not change the feature (causal mask); the feature is taken at argmax id."""
    backbone = _random_backbone()
    _, ids = _inputs()
    changed = ids.clone()
    changed[0, 10:] = 5
    with torch.no_grad():
        a, b = backbone.text_encoder(ids), backbone.text_encoder(changed)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="77"):
        backbone.text_encoder(ids[:, :40])


def test_causal_blocks_use_is_causal_and_equal_the_mask(monkeypatch):
    """A text block over the whole square sequence passes SDPA `is_causal` (no mask tensor); with prompt keys / values
    or a single read-out query it keeps the mask. Both give the masked computation's output."""
    from mdpl.backbones import attention

    backbone = _random_backbone()
    tower = backbone.text_encoder
    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    _, ids = _inputs()
    x = tower.embed(ids)
    mask = tower.attention_mask(x.shape[1], x.device, x.dtype)
    with torch.no_grad():
        fast = tower.run_block(0, x)
        want = residual_block(tower.blocks[0], x, mask)
        last = tower.run_block(0, x, query_index=torch.tensor([6, 3, 2]))
    assert calls[0] == (True, True) and calls[1] == (False, False) and calls[2] == (False, False)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[:, 0], want[torch.arange(3), torch.tensor([6, 3, 2])], rtol=1e-5, atol=1e-6)
    assert backbone.image_encoder.attention_mask(5, x.device, x.dtype) is None   # the image tower: no mask at all


def test_quick_gelu_mlp_folds_the_constant_exactly():
    """block_mlp with QuickGELU (silu form, constant folded into the weights) equals open_clip's MLP module, output
    and input gradient; another activation runs the module itself."""
    from mdpl.backbones.clip import block_mlp

    mlp = _random_backbone().image_encoder.blocks[0].mlp
    assert type(mlp.gelu).__name__ == "QuickGELU"
    h = torch.randn(3, 5, 48, requires_grad=True)
    want = mlp(h)
    (g_want,) = torch.autograd.grad(want.square().sum(), h)
    activation_calls = []
    quick = mlp.gelu.forward
    mlp.gelu.forward = lambda x: activation_calls.append(1) or quick(x)
    got = block_mlp(mlp, h)
    assert activation_calls == []          # the folded path ran, not the module's activation
    (g_got,) = torch.autograd.grad(got.square().sum(), h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    mlp.gelu = nn.GELU()
    torch.testing.assert_close(block_mlp(mlp, h), mlp(h), rtol=0, atol=0)


def test_quick_gelu_mlp_keeps_no_weight_copy_for_the_backward():
    """The folded MLP of a frozen block (DCP: gradients flow to the prompts through it) saves for the backward only
    the module's own weights (views of their storage) and activations: no per-call scaled copy of a weight."""
    from mdpl.backbones.clip import block_mlp

    mlp = _random_backbone().image_encoder.blocks[0].mlp.requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    h = torch.randn(3, 5, 48, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_mlp(mlp, h)
    weight_sized = [t for t in saved if t.numel() == mlp.c_fc.weight.numel()]
    assert len(weight_sized) == 2                                        # W_fc (for d h) and W_proj (for d hidden)
    assert all(t.untyped_storage().data_ptr() in weights for t in weight_sized)
    assert sum(t.numel() for t in saved) <= 2 * mlp.c_fc.weight.numel() + 3 * 5 * 4 * 48   # + the SiLU input
    out.sum().backward()
    assert h.grad is not None and mlp.c_fc.weight.grad is None
