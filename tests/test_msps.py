"""MSPs (docs/methods.md §16) beyond the reference parity of test_parity_msps.py: the init, the per-type selection,
the image-key masking, the orthogonality term and its place in the training loss, the two-tower mapping, config
errors, the preset, and training through run.py on ViLT and CLIP (the term logged every step)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mdpl.config.validate import validate_config
from mdpl.engine.losses import task_loss
from mdpl.engine.module import MDPLModule
from mdpl.errors import UserInputError
from mdpl.prompts import PromptContext
from mdpl.prompts.layout import IMAGE, TEXT
from mdpl.prompts.msps import abs_cosine
from runs import resolved_config, run_quiet, synthetic_arrows, tiny_run_config
from tiny_models import CLIP, TYPES, VILT, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_prompts(model: torch.nn.Module, seed: int = 3) -> None:
    """Prompts away from the deterministic init (which is exactly orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_init_is_the_references() -> None:
    """Zeros with token 2 and L/2+2 ones (text missing), token 1 and L/2+1 (image missing); L=4 in tiny: the value
    half's token 4 is out of range and absent, as in the reference's slicing."""
    model = tiny_model("msps", "vilt")
    text, image = model.prompt.prompt_text_missing, model.prompt.prompt_image_missing
    assert text.shape == image.shape == (2, 4, 32)
    assert torch.equal(text.sum(-1), torch.tensor([[0.0, 0.0, 32.0, 0.0]] * 2))
    assert torch.equal(image.sum(-1), torch.tensor([[0.0, 32.0, 0.0, 32.0]] * 2))
    assert float(model.prompt.aux_losses(None)["msps_ortho"].detach()) == 0.0


def test_selection_by_type_complete_is_the_sum() -> None:
    model = tiny_model("msps", "vilt")
    randomize_prompts(model)
    stream = model.backbone.info.stream("joint")
    text, image = model.prompt.prompt_text_missing, model.prompt.prompt_image_missing
    with torch.no_grad():
        for index in (0, 1):
            k, v = model.prompt.attention_prompts(stream, index, torch.zeros(6, 5, 32), PromptContext(TYPES))
            want = torch.stack([{0: text[index] + image[index], 1: text[index], 2: image[index]}[int(t)] for t in TYPES])
            assert torch.equal(torch.cat([k, v], dim=1), want) and k.shape == (6, 2, 32)
        assert model.prompt.attention_prompts(stream, 2, torch.zeros(6, 5, 32), PromptContext(TYPES)) is None


def test_image_keys_of_image_missing_rows_are_masked_on_the_joint_stream_only() -> None:
    model = tiny_model("msps", "vilt")
    batch = tiny_batch("vilt")
    stream = model.backbone.info.stream("joint")
    x, mask, layout = model.backbone.embed_joint(batch["text_ids"], batch["text_masks"], batch["image"])
    _, masked, same = model.prompt.before_block(stream, 0, x, mask, layout, PromptContext(TYPES))
    assert same == layout
    image = layout.span(IMAGE)
    assert not bool(masked[TYPES == 2][:, image].any()) and bool(mask[TYPES == 2][:, image].all())
    assert torch.equal(masked[TYPES != 2], mask[TYPES != 2])
    assert torch.equal(masked[:, layout.span(TEXT)], mask[:, layout.span(TEXT)])
    assert model.prompt.before_block(stream, 1, x, mask, layout, PromptContext(TYPES))[1] is mask
    off = tiny_model("msps", "vilt", msps_mask_missing_image=False)
    assert off.prompt.before_block(stream, 0, x, mask, layout, PromptContext(TYPES))[1] is mask
    clip = tiny_model("msps", "clip")
    tower = clip.backbone.info.stream(IMAGE)
    assert clip.prompt.before_block(tower, 0, x, mask, layout, PromptContext(TYPES))[1] is mask


def test_ortho_term_is_the_absolute_cosine_and_has_no_gradient_at_init() -> None:
    model = tiny_model("msps", "vilt")
    term = model.prompt.aux_losses(None)["msps_ortho"]
    term.backward()
    assert float(term) == 0.0 and all(float(p.grad.abs().max()) == 0.0 for p in model.prompt.parameters())
    randomize_prompts(model)
    t, i = model.prompt.prompt_text_missing, model.prompt.prompt_image_missing
    want = (t * i).sum().abs() / (t.norm() * i.norm())
    torch.testing.assert_close(model.prompt.aux_losses(None)["msps_ortho"], want, rtol=1e-6, atol=0)
    per_layer = tiny_model("msps", "vilt", msps_ortho_mode="per_layer")
    randomize_prompts(per_layer)
    t, i = per_layer.prompt.prompt_text_missing, per_layer.prompt.prompt_image_missing
    torch.testing.assert_close(per_layer.prompt.aux_losses(None)["msps_ortho"],
                               (abs_cosine(t[0], i[0]) + abs_cosine(t[1], i[1])) / 2, rtol=1e-6, atol=0)


def test_two_towers_have_their_own_pairs_and_the_mean_term() -> None:
    model = tiny_model("msps", "clip")
    randomize_prompts(model)
    names = sorted(n for n, _ in model.prompt.named_parameters())
    assert names == [f"{s}_prompts.prompt_{m}_missing" for s in ("image", "text") for m in ("image", "text")]
    assert model.prompt.image_prompts.prompt_text_missing.shape == (2, 4, 48)
    assert model.prompt.text_prompts.prompt_text_missing.shape == (2, 4, 32)
    towers = [abs_cosine(*model.prompt.pair(s)) for s in ("image", "text")]
    torch.testing.assert_close(model.prompt.aux_losses(None)["msps_ortho"], (towers[0] + towers[1]) / 2)


@pytest.mark.parametrize("backbone", ["vilt", "clip", "coca"])
def test_every_type_reaches_its_prompts_on_every_backbone(backbone) -> None:
    """Gradients: rows missing the text reach only the text-missing tensor, complete rows both."""
    if backbone == "coca":
        cfg = resolved_config(["task_finetune_food101", "msps", "tiny", "on_coca"], {})
        from mdpl.models import build_classifier
        torch.manual_seed(0)
        model = build_classifier(cfg)
        batch = tiny_batch("clip")
        batch["text_ids"] = batch["text_ids"][:, :cfg["coca_context_length"]]
        batch["image"] = torch.randn(6, 3, cfg["image_size"], cfg["image_size"])
    else:
        model, batch = tiny_model("msps", backbone), tiny_batch(backbone)
    for kind, reached in ((1, {"text"}), (2, {"image"}), (0, {"text", "image"})):
        model.zero_grad()
        rows = (TYPES == kind).nonzero()[:, 0]
        sub = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == TYPES.shape else v for k, v in batch.items()}
        model(sub)["logits"].sum().backward()
        got = {m for n, p in model.prompt.named_parameters() for m in ("text", "image")
               if n.endswith(f"prompt_{m}_missing") and p.grad is not None and float(p.grad.abs().sum()) > 0}
        assert got == reached, (backbone, kind)


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_the_term_is_in_the_training_loss_only(backbone) -> None:
    batch = tiny_batch(backbone)
    torch.manual_seed(0)
    module = MDPLModule({**(VILT if backbone == "vilt" else CLIP), "dataset": "food101", "backbone": backbone,
                         "prompt_method": "msps", "method_sizes": "tiny", "msps_ortho_loss_weight": 0.5,
                         "load_path": "", "clip_path": "", "max_epoch": 1, "warmup_steps": 0.0})
    module.log = lambda *args, **kwargs: None
    randomize_prompts(module.model)
    out = module.model.eval()(batch)
    term = out["aux_losses"]["msps_ortho"]
    assert 0.0 < float(term) < 1.0
    task = task_loss("food101", out["logits"], batch["label"])
    torch.testing.assert_close(module.training_step(batch, 0), task + 0.5 * term)
    module.validation_step(batch, 0)
    assert float(module.loss_means["val_phase"].compute()) == pytest.approx(float(task))


@pytest.mark.parametrize("updates,message", [
    ({"msps_length": 5}, r"msps_length=5 must be even"),
    ({"msps_length": 0}, r"msps_length must be a positive integer"),
    ({"msps_layers": []}, r"msps_layers=\[\] prompts no block"),
    ({"msps_layers": [2]}, "outside 0..1"),
    ({"msps_ortho_mode": "cosine"}, "choose global"),
    ({"msps_ortho_loss_weight": -1.0}, "msps_ortho_loss_weight must be a number >= 0"),
    ({"vilt_variant": "timm"}, "vilt_variant='timm'; choose map"),
])
def test_config_errors_are_one_line(updates, message) -> None:
    cfg = resolved_config(["task_finetune_food101", "msps", "tiny"], {})
    with pytest.raises(UserInputError, match=message):
        validate_config({**cfg, **updates}, check_data=False)


def test_preset_is_the_reference_config() -> None:
    cfg = resolved_config(["task_finetune_hatememes", "msps"], {})
    assert (cfg["msps_length"], cfg["msps_layers"], cfg["msps_ortho_loss_weight"]) == (16, [0, 1, 2, 3, 4, 5], 1.0)
    assert (cfg["msps_ortho_mode"], cfg["msps_mask_missing_image"]) == ("global", True)
    assert (cfg["learning_rate"], cfg["seed"], cfg["backbone"]) == (1e-3, 2024, "vilt")
    assert cfg["prompt_length"] is None and cfg["dynamic_text_padding"] is True


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_trains_through_run_logs_the_term_and_test_only_reproduces(tmp_path, backbone: str) -> None:
    config = tiny_run_config(tmp_path, "msps", backbone, logger="csv", per_gpu_batchsize=8, batch_size=8,
                             learning_rate=1e-2, val_check_interval=1.0)
    out = run_quiet(config)
    rows = list(csv.DictReader((Path(out["run_dir"]) / "csv" / "metrics.csv").open()))
    terms = [float(r["train/aux/msps_ortho"]) for r in rows if r.get("train/aux/msps_ortho")]
    # logged once per epoch here (4 steps); 0 at init (orthogonal), > 0 once the task gradients made the prompts overlap
    assert terms and all(0.0 < t <= 1.0 for t in terms)
    assert not any(k.startswith(("val/aux", "test/aux")) for k in rows[0])
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"] and "hatememes/test/AUROC" in metrics
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    prefixes = [""] if backbone == "vilt" else ["image_prompts.", "text_prompts."]
    assert sorted(k for k in state if k.startswith("model.prompt.")) == sorted(
        f"model.prompt.{p}prompt_{m}_missing" for p in prefixes for m in ("image", "text"))
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key
