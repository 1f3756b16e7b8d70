"""SCP (docs/methods.md §14) beyond the reference parity of test_parity_scp.py: the block-query interface on every
backbone, the token layout, the two-tower mapping, config errors, and training through run.py on ViLT and CLIP
(CoCa: tests/test_coca.py)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdpl.errors import UserInputError
from mdpl.models import build_classifier
from mdpl.prompts import PromptContext
from mdpl.prompts.layout import TEXT, TokenLayout
from mdpl.config.validate import validate_config
from runs import resolved_config, run_quiet, synthetic_arrows, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")
SOT, EOT = 49406, 49407


def tiny_model(backbone: str, **over):
    cfg = resolved_config(["task_finetune_food101", "scp", "tiny"], {"backbone": backbone, **over})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_classifier(cfg).eval()


def perturb(model: torch.nn.Module) -> None:
    """Move the LayerNorm affines and biases away from 1 / 0 (random init), so that the norm and bias terms count."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("backbone", ["vilt", "clip", "coca"])
def test_block_query_is_the_blocks_own_query(backbone: str) -> None:
    """ctx.block_query = the block's own norm and the query rows of its in-projection (the live weights): equal to
    the queries the block computes in its attention; norm_eps replaces only the epsilon."""
    model = tiny_model(backbone)
    perturb(model)
    for name, encoder in model.backbone.encoders().items():
        for index, block in enumerate(encoder.blocks):
            x = torch.randn(2, 5, encoder.info.width)
            if backbone == "vilt":
                norm, weight, bias = block.norm1, block.attn.qkv.weight, block.attn.qkv.bias
            else:
                norm, weight, bias = block.ln_1, block.attn.in_proj_weight, block.attn.in_proj_bias
            q = F.linear(norm(x), weight, bias).chunk(3, dim=-1)[0]
            torch.testing.assert_close(PromptContext(torch.zeros(2), blocks=encoder).block_query(index, x), q,
                                       atol=1e-6, rtol=0, msg=f"{name} block {index}")
            other = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, 0.5)
            q_other = F.linear(other, weight, bias).chunk(3, dim=-1)[0]
            torch.testing.assert_close(encoder.block_query(index, x, 0.5), q_other, atol=1e-6, rtol=0)


def test_vilt_layout_accumulates_and_conditions_on_the_text_cls() -> None:
    """Tiny SCP (static block 0, conditioned block 1; k=2, F=1): [scp.1 ; scp.static.0 ; text ; image], the
    conditioned tokens = [fixed ; pool read by the chunks of block 1's query of the text [CLS] at its input]."""
    model = tiny_model("vilt")
    perturb(model)
    stream = model.backbone.info.stream("joint")
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 102, 0, 0, 0]])
    x, mask, layout = model.backbone.embed_joint(ids, (ids != 0).long(), torch.randn(2, 3, 64, 64))
    ctx = PromptContext(torch.tensor([0, 1]), blocks=model.backbone.transformer,
                        readout=lambda lay: torch.full((2,), lay.offset(TEXT)))
    x0, mask0, layout0 = model.prompt.before_block(stream, 0, x, mask, layout, ctx)
    assert layout0.names == ["scp.static.0", TEXT, "image"] and layout0.length("scp.static.0") == 3
    h = model.backbone.transformer.run_block(0, x0, mask0)
    x1, mask1, layout1 = model.prompt.before_block(stream, 1, h, mask0, layout0, ctx)
    assert layout1.names == ["scp.1", "scp.static.0", TEXT, "image"] and layout1.offset(TEXT) == 6
    assert bool(mask1[:, :6].all()) and torch.equal(x1[:, 3:], h)
    prompts = model.prompt.streams["joint"]
    cls = h[:, 3]
    blk = model.backbone.transformer.blocks[1]
    q = F.linear(F.layer_norm(cls, (64,), blk.norm1.weight, blk.norm1.bias, 1e-5), blk.attn.qkv.weight[:64],
                 blk.attn.qkv.bias[:64]).reshape(2, 2, 32)
    weights = torch.softmax(q @ prompts.keys[0].t() / math.sqrt(64), dim=-1)
    expected = torch.cat([prompts.fixed[0].expand(2, -1, -1), weights @ prompts.values[0]], dim=1)
    torch.testing.assert_close(x1[:, :3], expected, atol=1e-6, rtol=0)


def test_clip_text_stream_conditions_on_the_eot() -> None:
    """On CLIP each tower's conditioned prompts read its own read-out token: the text EOT, wherever it is."""
    model = tiny_model("clip")
    perturb(model)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :4] = torch.tensor([SOT, 300, 301, EOT])
    ids[1, :2] = torch.tensor([SOT, EOT])
    batch = {"text_ids": ids, "image": torch.zeros(2, 3, 64, 64)}
    stream = model.backbone.info.stream(TEXT)
    x = torch.randn(2, 79, stream.width)
    layout = TokenLayout([("scp.static.0", 3), (TEXT, 76)])
    ctx = PromptContext(torch.zeros(2, dtype=torch.long), blocks=model.backbone.text_encoder,
                        readout=lambda lay: model.backbone.readout(TEXT, lay, batch))
    out = model.prompt.conditioned_prompts(model.prompt.streams[TEXT], 1, x, layout, ctx)
    moved = x.clone()
    moved[0, 3 + 3], moved[1, 3 + 1] = x[1, 3 + 1], x[0, 3 + 3]            # swap the two rows' EOT states
    swapped = model.prompt.conditioned_prompts(model.prompt.streams[TEXT], 1, moved, layout, ctx)
    torch.testing.assert_close(swapped, out.flip(0), atol=1e-6, rtol=0)
    other = x.clone()
    other[:, 3 + 5:] += 1.0                                                 # after both EOTs: not read
    torch.testing.assert_close(model.prompt.conditioned_prompts(model.prompt.streams[TEXT], 1, other, layout, ctx),
                               out, atol=0, rtol=0)


@pytest.mark.parametrize("updates,message", [
    ({"backbone": "clip", "scp_length": 12}, r"scp_length=12 must divide .* e\.g\. scp_length=16"),
    ({"scp_layers": [1], "scp_static_layers": [0, 1]}, "in both scp_layers and scp_static_layers"),
    ({"scp_layers": []}, "scp_layers=\\[\\] conditions no block"),
    ({"scp_layers": [2]}, "outside 0..1"),
    ({"scp_pool_scale": "sqrt"}, "choose width"),
    ({"scp_pool_dropout": 1.0}, r"scp_pool_dropout must be in \[0, 1\)"),
    ({"scp_fixed_prompts": -1}, "scp_fixed_prompts must be a non-negative integer"),
    ({"prompt_length": 4}, "prompt_length=4 is read only by map and dcp"),
])
def test_config_errors_are_one_line(updates, message) -> None:
    cfg = resolved_config(["task_finetune_food101", "scp", "tiny"], {})
    if updates.get("backbone") == "clip":
        cfg = resolved_config(["task_finetune_food101", "scp", "on_clip"], {})
        updates = {"scp_length": 12}
    with pytest.raises(UserInputError, match=message):
        validate_config({**cfg, **updates}, check_data=False)


def test_preset_is_the_documented_command() -> None:
    cfg = resolved_config(["task_finetune_hatememes", "scp"], {})
    assert (cfg["scp_length"], cfg["scp_pool_size"], cfg["scp_fixed_prompts"]) == (12, 32, 4)
    assert (cfg["scp_layers"], cfg["scp_static_layers"]) == ([6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5])
    assert (cfg["learning_rate"], cfg["seed"], cfg["backbone"], cfg["max_epoch"]) == (1e-2, 0, "vilt", 20)
    assert cfg["missing_type"] == {"train": "both", "val": "both", "test": "both"}
    assert cfg["prompt_length"] is None and cfg["dynamic_text_padding"] is True


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_trains_through_run_and_test_only_reproduces(tmp_path, backbone: str) -> None:
    config = tiny_run_config(tmp_path, "scp", backbone, per_gpu_batchsize=16, batch_size=16)
    out = run_quiet(config)
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"] and "hatememes/test/AUROC" in metrics
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    prompt_keys = sorted(k for k in state if k.startswith("model.prompt."))
    streams = ["joint"] if backbone == "vilt" else ["image", "text"]
    assert prompt_keys == sorted(f"model.prompt.streams.{s}.{kind}.0" for s in streams
                                 for kind in ("static", "fixed", "keys", "values"))
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key
