"""ViLT weight loading (docs/methods.md §2.2, D-20, D-22): Lightning ckpt, HF ViltModel layout, fine-tuned ckpts."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mdpl.backbones.vilt import ViLTBackbone
from mdpl.backbones.vilt_weights import (interpolate_text_positions, load_reference_finetuned,
                                         load_vilt_checkpoint)
from mdpl.errors import UserInputError
from mdpl.models import build_classifier

TINY = dict(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4, patch_size=8,
            image_size=32, drop_rate=0.1)
POS = "text_embeddings.position_embeddings.weight"


def _save_vilt_ckpt(tmp_path, max_text_len=8, **over):
    torch.manual_seed(0)
    src = ViLTBackbone(**{**TINY, **over}, max_text_len=max_text_len)
    state = dict(src.state_dict())
    state["text_embeddings.position_ids"] = torch.arange(max_text_len)[None]
    state["mlm_score.decoder.weight"] = torch.zeros(3, 3)
    state["itm_score.fc.weight"] = torch.zeros(2, 32)
    path = tmp_path / "vilt.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    return src, path


def test_lightning_ckpt_round_trip_with_position_interpolation(tmp_path):
    src, path = _save_vilt_ckpt(tmp_path, max_text_len=8)
    dst = ViLTBackbone(**TINY, max_text_len=20)
    report = load_vilt_checkpoint(dst, path, interpolate_text_positions=True)
    assert sorted(report.ignored) == ["itm_score.fc.weight", "mlm_score.decoder.weight",
                                      "text_embeddings.position_ids"]
    assert report.unexpected == [] and report.missing == []
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for k, v in src_sd.items():
        if k != POS:
            assert torch.equal(dst_sd[k], v), k
    old, new = src_sd[POS], dst_sd[POS]
    assert new.shape == (20, 32)
    for j in (0, 1, 7, 13, 19):  # §2.2 formula: s = (j+0.5)·L0/L − 0.5, clamped at 0
        s = max((j + 0.5) * 8 / 20 - 0.5, 0.0)
        i0 = math.floor(s)
        i1, lam = min(i0 + 1, 7), s - i0
        torch.testing.assert_close(new[j], (1 - lam) * old[i0] + lam * old[i1], atol=1e-6, rtol=0)


def test_longer_max_text_len_needs_the_interpolation_key(tmp_path, monkeypatch):
    src, path = _save_vilt_ckpt(tmp_path, max_text_len=8)
    dst = ViLTBackbone(**TINY, max_text_len=20)
    before = dst.state_dict()[POS].clone()
    with pytest.raises(UserInputError) as err:
        load_vilt_checkpoint(dst, path)
    msg = str(err.value)
    assert "\n" not in msg and "max_text_len=20" in msg and "8 text positions" in msg
    assert "interpolate_text_positions=True" in msg
    assert torch.equal(dst.state_dict()[POS], before)                    # nothing loaded
    lines: list[str] = []
    monkeypatch.setattr("pytorch_lightning.utilities.rank_zero_info", lines.append)
    report = load_vilt_checkpoint(dst, path, interpolate_text_positions=True)
    assert lines == ["[mdpl] text positions interpolated 8 -> 20"] and report.notes == [lines[0][7:]]
    # a shorter max_text_len needs no key; equal lengths are loaded as they are, without a log line
    short = load_vilt_checkpoint(ViLTBackbone(**TINY, max_text_len=4), path)
    same = load_vilt_checkpoint(ViLTBackbone(**TINY, max_text_len=8), path)
    assert short.notes == ["text positions interpolated 8 -> 4"] and same.notes == [] and len(lines) == 2


def test_task_configs_set_the_interpolation_key():
    from runs import resolved_config

    assert resolved_config([], {})["interpolate_text_positions"] is False
    for task in ("mmimdb", "food101", "hatememes"):
        cfg = resolved_config([f"task_finetune_{task}"], {})
        assert cfg["interpolate_text_positions"] is True and cfg["max_text_len"] > 40


def test_interpolation_is_identity_at_same_length():
    t = torch.randn(40, 6)
    assert torch.equal(interpolate_text_positions(t, 40), t)


def test_mismatched_checkpoint_is_refused(tmp_path):
    _, path = _save_vilt_ckpt(tmp_path, hidden_size=48, num_heads=4)
    with pytest.raises(ValueError, match="width|does not fit"):
        load_vilt_checkpoint(ViLTBackbone(**TINY, max_text_len=8), path)
    with pytest.raises(ValueError, match="lacks"):
        load_vilt_checkpoint(ViLTBackbone(**TINY, max_text_len=8), {"pooler.dense.bias": torch.zeros(32)})
    with pytest.raises(FileNotFoundError):
        load_vilt_checkpoint(ViLTBackbone(**TINY, max_text_len=8), tmp_path / "nope.ckpt")


def test_build_classifier_loads_load_path(tmp_path):
    src, path = _save_vilt_ckpt(tmp_path, max_text_len=8)
    model = build_classifier(dict(TINY, max_text_len=8, dataset="food101", prompt_method="map",
                                  prompt_length=2, prompt_layers=[0, 1], load_path=str(path)))
    assert torch.equal(model.backbone.transformer.pos_embed, src.transformer.pos_embed)
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_classifier(dict(TINY, max_text_len=8, dataset="food101", load_path=""))


def test_build_classifier_interpolates_text_positions_only_when_asked(tmp_path):
    src, path = _save_vilt_ckpt(tmp_path, max_text_len=8)
    config = dict(TINY, max_text_len=20, dataset="food101", prompt_method="map", prompt_length=2,
                  prompt_layers=[0, 1], load_path=str(path))
    with pytest.raises(UserInputError, match=r"max_text_len=20.*8.*interpolate_text_positions"):
        build_classifier(config)
    model = build_classifier({**config, "interpolate_text_positions": True})
    expected = interpolate_text_positions(src.state_dict()[POS], 20)
    assert torch.equal(model.backbone.state_dict()[POS], expected)


def test_hf_vilt_model_weights_give_same_outputs():
    """HF ViltModel weights load via the key mapping; pooled output and text tokens agree.

    Asserted: pooled output (text [CLS] through the pooler), the text-token hidden states and the
    image [CLS] hidden state — all invariant to HF's random patch order — plus the sum over the valid
    image tokens. Text-embedding tables are re-drawn with std 1 so that the LayerNorm-eps difference
    (ours: BERT 1e-12 / ViT 1e-6; HF config here: 1e-6 everywhere) is below 1e-6.
    """
    import transformers
    cfg = transformers.ViltConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, image_size=32, patch_size=8, max_position_embeddings=12,
                                  layer_norm_eps=1e-6, hidden_act="gelu", max_image_length=-1)
    torch.manual_seed(0)
    hf = transformers.ViltModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if "text_embeddings" in name else 0.1))
    ours = ViLTBackbone(**TINY, max_text_len=12).eval()
    report = load_vilt_checkpoint(ours, hf.state_dict())
    assert report.source_format == "huggingface-vilt" and report.missing == [] and report.unexpected == []

    ids = torch.randint(5, 60, (2, 12))
    masks = torch.ones(2, 12, dtype=torch.long)
    masks[1, 6:] = 0
    img = torch.zeros(2, 3, 32, 32)
    img[0] = torch.rand(3, 32, 32) * 2 - 1
    img[1, :, :16, :24] = torch.rand(3, 16, 24) * 2 - 1
    pixel_mask = (img.sum(1) != 0).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=masks, pixel_values=img, pixel_mask=pixel_mask)
        out = ours.forward_features(ids, masks, img)
        pooled = ours.pooler(out.hidden[:, 0])
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden[:, :13], ref.last_hidden_state[:, :13], atol=1e-5, rtol=0)
    for b, n in enumerate((16, 6)):  # valid image tokens: same multiset -> same sum
        torch.testing.assert_close(out.hidden[b, 13:13 + n].sum(0), ref.last_hidden_state[b, 13:13 + n].sum(0),
                                   atol=1e-4, rtol=0)


def _as_reference_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[k.split(".", 1)[1] if k.startswith(("backbone.", "prompt.")) else k] = v.clone()
    return out


@pytest.mark.parametrize("method", ["map", "memprompt", "none"])
def test_reference_finetuned_strict_round_trip(method):
    cfg = dict(TINY, max_text_len=8, dataset="mmimdb", prompt_method=method, prompt_length=2,
               prompt_layers=[0, 1], gen_prompt_length=2, shared_prompt_length=2, gen_prompt_layers=[0, 1],
               shared_prompt_layers=[0, 1], mem_size=3, top_k=2, bottleneck_dim=2, load_path="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        a = build_classifier(cfg)
        torch.manual_seed(2)
        b = build_classifier(cfg)
    state = _as_reference_state(a)
    state["text_embeddings.position_ids"] = torch.arange(8)[None]  # legacy key: allowed
    report = load_reference_finetuned(b, state)
    assert report.ignored == ["text_embeddings.position_ids"]
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    with pytest.raises(ValueError, match="unexpected"):
        load_reference_finetuned(b, {**state, "complete_prompt_extra": torch.zeros(1)})
    partial = dict(state)
    partial.pop("pooler.dense.bias")
    with pytest.raises(ValueError, match="missing"):
        load_reference_finetuned(b, partial)
