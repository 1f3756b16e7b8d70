"""ViLT backbone (docs/methods.md §2): visual embedding, masking, prompt attention, freezing modes."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mdpl.backbones.attention import prefixed_attention
from mdpl.backbones.vilt import ViLTBackbone
from mdpl.models import build_classifier

TINY = dict(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4, patch_size=8,
            image_size=32, max_text_len=12, drop_rate=0.1)


def _backbone(**over) -> ViLTBackbone:
    torch.manual_seed(0)
    m = ViLTBackbone(**{**TINY, **over}).eval()
    with torch.no_grad():  # non-trivial biases / LN affine so that every term is exercised
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _padded_images(sizes: list[tuple[int, int]], hw: tuple[int, int]) -> torch.Tensor:
    torch.manual_seed(1)
    img = torch.zeros(len(sizes), 3, *hw)
    for b, (h, w) in enumerate(sizes):
        img[b, :, :h, :w] = torch.rand(3, h, w) * 2 - 1
    return img


def _oracle_visual(m: ViLTBackbone, img: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-image oracle of §2.3: valid patches row-major + interpolated position + modality 1."""
    vit, p, g = m.transformer, m.transformer.patch_size, m.transformer.grid
    grid = vit.pos_embed[:, 1:].transpose(1, 2).reshape(1, -1, g, g)
    out = []
    for b, (hpix, wpix) in enumerate(sizes):
        h, w = -(-hpix // p), -(-wpix // p)
        feats = vit.patch_embed(img[b : b + 1])[0, :, :h, :w]                  # [D, h, w]
        pos = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0]
        out.append((feats + pos).flatten(1).t() + m.token_type_embeddings.weight[1])
    return out


def test_visual_embedding_matches_per_image_oracle():
    m = _backbone()
    sizes = [(32, 48), (24, 40), (16, 16), (32, 8)]
    img = _padded_images(sizes, (32, 48))
    with torch.no_grad():
        x, mask = m.embed_image(img)
        oracle = _oracle_visual(m, img, sizes)
    counts = [o.shape[0] for o in oracle]
    assert x.shape == (4, 1 + max(counts), 32) and mask.dtype == torch.bool
    cls = m.transformer.cls_token[0, 0] + m.transformer.pos_embed[0, 0] + m.token_type_embeddings.weight[1]
    pad = m.transformer.patch_embed.proj.bias + m.token_type_embeddings.weight[1]
    for b, n in enumerate(counts):
        assert mask[b].sum().item() == 1 + n and mask[b, : 1 + n].all()
        torch.testing.assert_close(x[b, 0], cls, atol=1e-6, rtol=0)
        torch.testing.assert_close(x[b, 1 : 1 + n], oracle[b], atol=1e-5, rtol=0)
        if n < max(counts):  # padding tokens: a zero patch, no position embedding
            torch.testing.assert_close(x[b, 1 + n :], pad.expand(max(counts) - n, -1), atol=1e-6, rtol=0)


def test_image_sizes_and_pixel_rule_agree():
    m = _backbone()
    sizes = [(32, 32), (24, 32), (32, 20), (9, 17)]
    img = _padded_images(sizes, (32, 32))
    h, w = m.patch_grid(img)
    assert h.tolist() == [4, 3, 4, 2] and w.tolist() == [4, 4, 3, 3]
    h2, w2 = m.patch_grid(img, torch.tensor(sizes))
    assert torch.equal(h, h2) and torch.equal(w, w2)
    with torch.no_grad():
        a, ma = m.embed_image(img)
        b, mb = m.embed_image(img, torch.tensor(sizes))
    assert torch.equal(a, b) and torch.equal(ma, mb)


def test_max_image_len_caps_tokens():
    m = _backbone(max_image_len=5)
    img = _padded_images([(32, 32), (8, 16)], (32, 32))
    with torch.no_grad():
        x, mask = m.embed_image(img)
    assert x.shape[1] == 6 and mask.sum(1).tolist() == [6, 3]


def test_masked_keys_do_not_change_outputs():
    """Text padding ids and image padding content are masked keys: the text [CLS] output is unchanged."""
    m = _backbone()
    ids = torch.randint(5, 60, (2, 12))
    masks = torch.ones(2, 12, dtype=torch.long)
    masks[:, 7:] = 0
    img = _padded_images([(32, 32), (16, 24)], (32, 32))
    with torch.no_grad():
        ref = m(ids, masks, img)
        ids2 = ids.clone()
        ids2[:, 7:] = torch.randint(5, 60, (2, 5))
        assert torch.allclose(m(ids2, masks, img), ref, atol=1e-6)
        # second image alone (no padding patches needed) gives the same pooled output
        alone = m(ids[1:], masks[1:], img[1:, :, :16, :24])
        torch.testing.assert_close(alone, ref[1:], atol=1e-5, rtol=0)


def _manual_attention(attn, h, mask, kp, vp):
    b, n, c = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(b, n, 3, c).unbind(2)
    k, v = torch.cat([kp, k], 1), torch.cat([vp, v], 1)
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5
    keep = torch.cat([torch.ones(b, kp.shape[1], dtype=torch.bool), mask], 1)
    logits = logits.masked_fill(~keep[:, None, None], float("-inf"))
    out = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


def test_prompt_attention_matches_masked_softmax_and_plain_block():
    m = _backbone()
    blk = m.transformer.blocks[0]
    x = torch.randn(3, 10, 32)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    kp, vp = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).chunk(3, dim=-1)
        ours = blk.attn.proj(prefixed_attention(q, k, v, blk.attn.num_heads, mask[:, None, None, :], (kp, vp)))
        torch.testing.assert_close(ours, _manual_attention(blk.attn, h, mask, kp, vp), atol=1e-5, rtol=0)
        empty = torch.zeros(3, 0, 32)
        vit = m.transformer
        torch.testing.assert_close(vit.run_block(0, x, mask, (empty, empty)), vit.run_block(0, x, mask),
                                   atol=1e-5, rtol=0)
        # the shared block runner equals timm's own Block with the same key-padding mask
        torch.testing.assert_close(vit.run_block(0, x, mask), blk(x, attn_mask=mask[:, None, None, :]),
                                   atol=1e-5, rtol=0)


def test_frozen_modes_follow_config():
    cfg = dict(TINY, dataset="hatememes", prompt_method="none", load_path="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mode = build_classifier(cfg)
        eval_mode = build_classifier(dict(cfg, frozen_eval_mode=True))
    for model, expect in ((ref_mode, True), (eval_mode, False)):
        model.train()
        model.set_frozen_modes()
        assert model.backbone.transformer.pos_drop.training is expect
        assert model.backbone.text_embeddings.dropout.training is expect
        assert model.hatememes_classifier.training and model.backbone.pooler.training
