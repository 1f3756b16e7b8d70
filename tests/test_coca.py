"""CoCa backbone (mdpl/backbones/coca.py, docs/methods.md §5b): open_clip layout and weights, the same embeddings as
open_clip's own CoCa, strict file checks, and every method trained and evaluated on it through run.py.

Tiny random CoCa models are built by open_clip itself (``open_clip.coca_model.CoCa`` from a config dict), saved in
its layout (decoder included) and read back through ``coca_path``; nothing is downloaded.
"""
from __future__ import annotations

from runs import as_run, typed

import json
import warnings
from pathlib import Path

import pytest
import torch

from mdpl.backbones.attention import take_rows
from mdpl.backbones.coca import (TEXT_CLS, CocaBackbone, CocaSizes, build_coca_backbone,
                                 coca_open_clip_config)
from mdpl.backbones.coca_weights import DECODER_PREFIX, read_coca_checkpoint
from mdpl.backbones.clip_weights import sha256_of
from mdpl.errors import UserInputError
from mdpl.models import build_classifier
from mdpl.prompts.base import MISSING_TYPE_OF, PromptContext
from runs import resolved_config, run_quiet, synthetic_arrows

METHODS = ("none", "map", "memprompt", "dcp", "scp")
PRESET = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp", "scp": "scp"}
SOT, EOT = 49406, 49407
TINY = dict(coca_embed_dim=32, image_size=64, coca_patch_size=16, coca_vision_width=48, coca_vision_layers=2,
            coca_vision_head_width=24, coca_attn_pooler_heads=4, coca_context_length=12, coca_vocab_size=1000,
            coca_text_width=32, coca_text_heads=2, coca_text_layers=2)
TYPES = torch.tensor([0, 1, 2, 0, 2, 1])
LENGTHS = (12, 3, 7, 1, 10, 5)          # text ids used per row (12 = the full context: the CLS then sees itself)

pytestmark = pytest.mark.usefixtures("one_thread")


def open_clip_coca(sizes: CocaSizes, seed: int = 0) -> torch.nn.Module:
    """open_clip's own CoCa at `sizes`, its random init perturbed (LayerNorms, biases, CLS away from 1 / 0)."""
    from open_clip.coca_model import CoCa

    torch.manual_seed(seed)
    model = CoCa(**coca_open_clip_config(sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(n: int = 6, context: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context, dtype=torch.long)
    for i, used in enumerate(LENGTHS[:n]):
        used = min(used + 2, context)
        ids[i, :used] = torch.randint(1, 900, (used,), generator=g)
        ids[i, 0], ids[i, used - 1] = 998, 999
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "text_ids": ids, "missing_type": TYPES[:n],
            "label": torch.randint(0, 101, (n,), generator=g)}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny open_clip CoCa saved with torch.save in open_clip's layout (decoder and logit_scale included)."""
    model = open_clip_coca(CocaSizes.from_config(TINY))
    path = tmp_path_factory.mktemp("coca") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model


def loaded(path: Path, **over) -> CocaBackbone:
    return build_coca_backbone(as_run({**TINY, "coca_path": str(path), **over}, "coca"))


# ------------------------------------------------------------------------------------------------ layout, weights
def test_default_sizes_are_open_clips_coca_vit_b32() -> None:
    import open_clip

    shipped = json.loads((Path(open_clip.__file__).parent / "model_configs" / "coca_ViT-B-32.json").read_text())
    ours = coca_open_clip_config(CocaSizes())
    assert ours["embed_dim"] == shipped["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in shipped[tower].items():
            assert ours[tower][key] == value, (tower, key)
    assert CocaSizes().vision_head_width == 64   # open_clip's default head width: 768 / 64 = 12 heads


def test_open_clip_key_layout(tiny_file) -> None:
    _, model = tiny_file
    backbone = loaded(tiny_file[0])
    theirs = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(DECODER_PREFIX)}
    ours = {k: v.shape for k, v in backbone.open_clip_state_dict().items()}
    assert ours == theirs
    assert "visual.attn_pool.query" in ours and "text.cls_emb" in ours and "logit_scale" in ours
    info = backbone.info
    assert [s.name for s in info.streams] == ["image", "text"]
    image, text = info.streams
    assert (image.width, image.num_layers, image.num_heads, image.causal) == (48, 2, 2, False)
    assert (text.width, text.num_layers, text.num_heads, text.causal, text.masks_padding) == (32, 2, 2, True, True)


def test_weights_give_open_clips_embeddings(tiny_file) -> None:
    """Read through coca_path, the towers give open_clip's encode_image / encode_text (normalize=False); the
    classifier's features (method none) are exactly those two embeddings."""
    path, model = tiny_file
    backbone = loaded(path)
    b = batch()
    with torch.no_grad():
        f_v, f_t = backbone.image_encoder(b["image"]), backbone.text_encoder(b["text_ids"])
        torch.testing.assert_close(f_v, model.encode_image(b["image"], normalize=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(f_t, model.encode_text(b["text_ids"], normalize=False), atol=1e-5, rtol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = build_classifier({**TINY, "coca_path": str(path), "backbone": "coca", "dataset": "food101",
                                    "prompt_method": "none"}).eval()
        pooled = clf({**b, "missing_type": torch.zeros(6, dtype=torch.long)})["pooled"]
    torch.testing.assert_close(pooled, torch.cat([f_v, f_t], dim=1), atol=1e-5, rtol=0)


def test_safetensors_and_training_checkpoints_load(tiny_file, tmp_path) -> None:
    from safetensors.torch import save_file

    path, model = tiny_file
    reference = loaded(path).state_dict()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "coca.safetensors"))
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    for name in ("coca.safetensors", "epoch_3.pt"):
        other = loaded(tmp_path / name).state_dict()
        assert all(torch.equal(other[k], v) for k, v in reference.items()), name


def test_text_mask_is_open_clips(tiny_file) -> None:
    """open_clip's legacy CoCa mask, shifted by one: SOT..EOT and the first padding position, the CLS key only for a
    text filling the context."""
    backbone = loaded(tiny_file[0])
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, :4] = torch.tensor([998, 5, 6, 999])
    ids[1] = torch.arange(1, 13)
    _, mask = backbone.text_encoder.embed(ids)
    assert mask[0].tolist() == [True] * 5 + [False] * 8
    assert mask[1].tolist() == [True] * 13
    x, mask, layout = backbone.embed("text", {"text_ids": ids})
    assert layout.names == ["text", TEXT_CLS] and layout.total == x.shape[1] == 13
    assert backbone.readout("text", layout.prepend([("p", 3)]), {"text_ids": ids}).tolist() == [15, 15]


def test_wrong_or_truncated_file_is_one_error(tiny_file, tmp_path) -> None:
    path = tiny_file[0]
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.bin").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.bin")
    from mdpl.backbones.clip import ClipBackbone, ClipSizes
    torch.save(ClipBackbone(ClipSizes(embed_dim=32, image_size=64, vision_width=48, vision_layers=2,
                                      vision_head_width=24, text_width=32, text_heads=2, text_layers=2,
                                      vocab_size=1000)).openai_state_dict(), tmp_path / "clip.pt")
    cases = {"cut.bin": "cannot read coca_path", "text.bin": "cannot read coca_path",
             "list.bin": "not a CoCa state dict", "missing.bin": "does not exist",
             "clip.pt": r"CoCa checkpoint does not match the model: \d+ missing keys .*coca_\* size keys"}
    for name, message in cases.items():
        with pytest.raises(UserInputError, match=message) as err:
            loaded(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match=r"shape mismatches .*coca_\* size keys"):
        loaded(path, coca_text_width=64)
    with pytest.raises(UserInputError, match="differs from coca_sha256"):
        loaded(path, coca_sha256="0" * 64)
    assert isinstance(loaded(path, coca_sha256=sha256_of(str(path))), CocaBackbone)
    assert read_coca_checkpoint(str(path)).keys().isdisjoint({k for k in tiny_file[1].state_dict()
                                                             if k.startswith(DECODER_PREFIX)})


def test_test_only_reads_no_coca_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no "coca_path is empty" warning either
        backbone = build_coca_backbone(as_run({**TINY, "coca_path": "/nowhere/coca.bin", "test_only": True}, "coca"))
    assert isinstance(backbone, CocaBackbone)


# ------------------------------------------------------------------------------------------------ the forward pass
def _model(method: str, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_classifier({**TINY, "dataset": "food101", "backbone": "coca", "prompt_method": method,
                                 "method_sizes": "tiny", **over})


def _uncut_forward(model, b: dict) -> torch.Tensor:
    """Every position of every block computed; the image feature pooled from the tokens afterwards, the text
    feature read at the CLS."""
    mt = b["missing_type"]
    prepared = model.prompt.prepare(mt)
    features = []
    for stream in model.backbone.info.streams:
        keep = mt != MISSING_TYPE_OF[stream.name] if model.prompt.drops_missing_streams else torch.ones_like(mt) > 0
        encoder = model.backbone.encoders()[stream.name]
        x, mask, layout = model.backbone.embed(stream.name, b)
        ctx = PromptContext(mt, prepared, readout=lambda lay, name=stream.name: model.backbone.readout(name, lay, b))
        x, mask, layout = encoder.forward_blocks(x, mask, layout, model.prompt, ctx)
        if stream.name == "image":
            token = encoder.attentional_pool(x, layout)
        else:
            token = take_rows(x, model.backbone.readout(stream.name, layout, b))[:, 0]
        features.append(model.backbone.pool(stream.name, token) * keep[:, None])
    return model.head(torch.cat(features, dim=1))


@pytest.mark.parametrize("missing", [1, 2])
def test_dcp_with_every_row_missing_one_modality(missing: int) -> None:
    """DCP skips the stream of the missing modality; with no row left (here: the whole batch), its dynamic prompts
    run on zero rows (CoCa's text attention masks padding: a key-padding mask of zero rows)."""
    model = _model("dcp")
    b = {**batch(4), "missing_type": torch.full((4,), missing)}
    out = model(b)
    half = model.backbone.embed_dim
    dropped = out["pooled"][:, half:] if missing == 1 else out["pooled"][:, :half]
    assert torch.isfinite(out["logits"]).all() and torch.equal(dropped, torch.zeros_like(dropped))
    out["logits"].sum().backward()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_forward_and_exact_cut(method: str) -> None:
    """Each method builds and runs on CoCa; the classifier (last text block: the CLS only) equals the uncut pass."""
    # SCP's pool-attention dropout would draw other masks in the two passes
    model = _model(method, **{"dcp": {"dcp_skip_missing": False}, "scp": {"scp_pool_dropout": 0.0}}.get(method, {}))
    b = batch()
    cut = model(b)["logits"]
    assert cut.shape == (6, 101) and torch.isfinite(cut).all()
    torch.testing.assert_close(cut, _uncut_forward(model, b), atol=1e-5, rtol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(cut.square().sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_pool_prompts_switch() -> None:
    """The pooler over the image tokens only (default) or over the prompts too: the same without prompts."""
    b = batch()
    for method, differs in (("none", False), ("dcp", True)):
        with torch.no_grad():
            off = _model(method)(b)["pooled"]
            on = _model(method, coca_pool_prompts=True)(b)["pooled"]
        assert (not torch.allclose(off, on)) == differs, method
        torch.testing.assert_close(off[:, 32:], on[:, 32:])   # the text feature does not depend on it


def test_trainable_parts() -> None:
    model = _model("dcp")
    backbone = model.backbone
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder.ln_post.weight", "image_encoder.ln_post.bias", "image_encoder.proj",
                         "text_encoder.ln_final.weight", "text_encoder.ln_final.bias"}
    assert model.head.in_features == 64


# ------------------------------------------------------------------------------------------------ config, data
def test_named_config_and_validation(tmp_path) -> None:
    from config import check_named_configs
    from mdpl.config.validate import validate_config

    cfg = resolved_config(["task_finetune_hatememes", "dcp", "on_coca"], {})
    assert (cfg["backbone"], cfg["image_size"], cfg["coca_context_length"]) == ("coca", 224, 76)
    assert cfg == resolved_config(["on_coca", "dcp", "task_finetune_hatememes"], {})
    tiny = resolved_config(["task_finetune_hatememes", "map", "on_coca", "tiny"], {})
    assert tiny == resolved_config(["on_coca", "task_finetune_hatememes", "map", "tiny"], {})
    assert (tiny["coca_text_width"], tiny["image_size"]) == (64, 64)
    with pytest.raises(UserInputError, match="on_clip and on_coca are both a backbone switch"):
        check_named_configs(["task_finetune_hatememes", "on_clip", "on_coca"])
    for updates, message in (
            ({"coca_path": "x.bin", "backbone": "clip"}, "coca_path='x.bin' is read only by backbone=coca"),
            ({"coca_path": str(tmp_path / "none.bin")}, "coca_path .* does not exist"),
            ({"coca_sha256": "abc"}, "coca_sha256 is set but coca_path is empty"),
            ({"coca_text_heads": 3}, "coca_text_width=64 is not a multiple of coca_text_heads=3"),
            ({"coca_vocab_size": 1000}, "coca_vocab_size=1000 must be 49408"),
            ({"coca_pool_prompts": "yes"}, "coca_pool_prompts='yes' must be True or False"),
            ({"prompt_layers": [0, 2]}, r"the CoCa backbone \(coca_vision_layers, coca_text_layers\)")):
        with pytest.raises(UserInputError, match=message):
            validate_config({**tiny, **updates}, check_data=False)
    (tmp_path / "cut.bin").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(UserInputError, match="truncated zip"):
        validate_config({**tiny, "coca_path": str(tmp_path / "cut.bin")}, check_data=False)


def test_tokenizer_and_transform_are_open_clips() -> None:
    import open_clip

    from mdpl.data.tokenizers import build_tokenizer
    from mdpl.data.transforms import build_transform

    tok = build_tokenizer(typed({"backbone": "coca", "coca_context_length": 76}).pipeline)   # config.py's value
    texts = ["a photo of a cat", "word " * 100, ""]
    ids, masks = tok.encode(texts)
    assert ids.shape == (3, 76) and torch.equal(ids, open_clip.get_tokenizer("coca_ViT-B-32")(texts))
    assert torch.equal(masks, (ids != 0).long())
    assert ids[1, -1] == EOT and ids[2, :3].tolist() == [SOT, EOT, 0]
    assert repr(build_transform(typed({"backbone": "coca", "image_size": 224}).pipeline)) == \
        repr(build_transform(typed({"backbone": "clip", "image_size": 224}).pipeline))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    """Synthetic Hateful Memes and the `tiny` CoCa as an open_clip file (decoder included)."""
    root = tmp_path_factory.mktemp("coca_e2e")
    data = synthetic_arrows(root, "hatememes", 32, 16, 16)
    tiny = resolved_config(["task_finetune_hatememes", "baseline", "on_coca", "tiny"], {})
    path = root / "coca_tiny.bin"
    torch.save(open_clip_coca(CocaSizes.from_config(tiny)).state_dict(), path)
    return {**data, "coca": path}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates_through_run(e2e, tmp_path, method: str) -> None:
    config = resolved_config(["task_finetune_hatememes", PRESET[method], "on_coca", "tiny"], {
        "data_root": str(e2e["arrow"]), "coca_path": str(e2e["coca"]), "log_dir": str(tmp_path / "result"),
        "max_epoch": 1, "per_gpu_batchsize": 16, "batch_size": 16, "val_check_interval": 1.0})
    out = run_quiet(config)
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"] and metrics
    ckpt = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1
    state = ckpt["state_dict"]
    assert not any(k.startswith("model.backbone.text_decoder") for k in state)
    original = read_coca_checkpoint(str(e2e["coca"]))
    frozen = "model.backbone.image_encoder.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(state[frozen], original["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert not torch.equal(state["model.backbone.image_encoder.proj"], original["visual.proj"])   # trained part
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "coca_path": str(tmp_path / "gone.bin"), "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key
