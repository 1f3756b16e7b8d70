"""The two optional pieces of the method interface, each proved by a toy method defined in this file alone
(docs/architecture.md, "The method interface"):

* **weight adapters**: ``ToyAdapters`` declares LoRA (or DoRA) adapters on named linear maps of the upper blocks of
  every stream; the block loop computes those maps through them, the freezing routine trains them, and
  ``merge_adapters`` folds them into the frozen weights (merged and unmerged logits agree; a merged checkpoint
  loads and evaluates without adapters);
* **auxiliary losses**: ``ToyAux`` adds learned tokens and a loss term of its own on them; the term is logged as
  ``train/aux/<name>``, weighted by its config field and added to the training loss only.

Both train end to end through ``run.run`` on ViLT and CLIP at tiny size.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from runs import resolved_config, run_quiet, synthetic_arrows
from tiny_models import tiny_batch, tiny_model
from mdpl.engine.losses import task_loss
from mdpl.engine.module import MDPLModule, load_for_test, parameter_report
from mdpl.errors import UserInputError
from mdpl.prompts import MethodConfig, PromptMethod, registered, splice_tokens
from mdpl.prompts.adapters import LINEAR_MAPS, AdapterSpec, DecomposedAdapter, LowRankAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ toy methods
@dataclass(frozen=True)
class ToyAdaptersConfig(MethodConfig):
    """Rank, adapted maps and blocks (counted from the top) of the toy adapters; DoRA with a magnitude norm axis."""

    toy_rank: int = 4
    toy_maps: tuple[str, ...] = ("q", "v")
    toy_top_blocks: int = 2
    toy_magnitude: str = ""          # "" (LoRA), "column" or "row" (DoRA)
    TINY = {"toy_rank": 2}


class ToyAdapters(PromptMethod):
    """No tokens: adapters on ``toy_maps`` of the top ``toy_top_blocks`` blocks of every stream."""

    config_class = ToyAdaptersConfig
    title = "Toy adapters"

    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        c = self.config
        return tuple(AdapterSpec(s.name, tuple(range(s.num_layers - c.toy_top_blocks, s.num_layers)), c.toy_maps,
                                 rank=c.toy_rank, magnitude=bool(c.toy_magnitude), norm=c.toy_magnitude or "column")
                     for s in self.info.streams)


@dataclass(frozen=True)
class ToyAuxConfig(MethodConfig):
    """Tokens per stream and the weight of the auxiliary term ``toy_pull`` (a field named ``<term>_loss_weight``)."""

    toy_aux_tokens: int = 2
    toy_pull_loss_weight: float = 0.5


class ToyAux(PromptMethod):
    """Per-type tokens in front of every stream before block 0, and an auxiliary term pulling them towards 1."""

    config_class = ToyAuxConfig
    title = "Toy auxiliary loss"
    aux_loss_names = ("toy_pull",)

    def __init__(self, config: ToyAuxConfig, info) -> None:
        super().__init__(config, info)
        widths = {s.name: s.width for s in info.streams}
        self.tokens = nn.ParameterDict({name: nn.Parameter(torch.zeros(config.toy_aux_tokens, width))
                                        for name, width in widths.items()})   # one set for every missing type

    def before_block(self, stream, index, x, mask, layout, ctx):
        if index == 0:   # the same tokens in front of every sample
            shared = self.tokens[stream.name].expand(x.shape[0], -1, -1)
            x, mask = splice_tokens(x, mask, 0, [shared])
            layout = layout.prepend([("toy", self.config.toy_aux_tokens)])
        return x, mask, layout

    def aux_losses(self, prepared):
        return {"toy_pull": torch.stack([(t - 1).pow(2).mean() for t in self.tokens.values()]).mean()}


@pytest.fixture(scope="module", autouse=True)
def toys():
    with registered(ToyAdapters, "toy_adapters"), registered(ToyAux, "toy_aux"):
        yield


def _randomise(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial adapters (LoRA's B starts at zero, DoRA's magnitude at the weight's norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch)["logits"]


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_adapters_start_as_the_frozen_model_and_count_their_parameters(backbone) -> None:
    plain, adapted = tiny_model("none", backbone), tiny_model("toy_adapters", backbone, toy_maps=list(LINEAR_MAPS))
    torch.testing.assert_close(_logits(adapted, tiny_batch(backbone)), _logits(plain, tiny_batch(backbone)),
                               atol=1e-6, rtol=0)
    streams = adapted.backbone.info.streams
    expected = 0
    for s in streams:
        hidden = adapted.backbone.encoders()[s.name].linear_map(0, "fc1")[0].shape[0]
        shapes = [(s.width, s.width)] * 4 + [(hidden, s.width), (s.width, hidden)]     # q k v out fc1 fc2
        expected += 2 * sum(2 * (o + i) for o, i in shapes)                          # rank 2, two blocks
    assert adapted.adapter_parameter_count() == expected
    total, trainable = adapted.trainable_parameters_report()
    assert (total, trainable) == (plain.trainable_parameters_report()[0] + expected,
                                  plain.trainable_parameters_report()[1] + expected)
    assert f"of which weight adapters {expected:,}" in parameter_report(adapted)
    names = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert {f"prompt.adapters.{streams[0].name}_{streams[0].num_layers - 1}_q.lora_A",
            f"prompt.adapters.{streams[0].name}_{streams[0].num_layers - 1}_fc2.lora_B"} <= names
    assert not any(n.startswith("backbone.") and ("qkv" in n or "in_proj" in n) for n in names)   # W stays frozen


@pytest.mark.parametrize("magnitude", ["", "column", "row"])
@pytest.mark.parametrize("backbone", ["vilt", "clip", "coca"])
def test_merged_and_unmerged_logits_agree(backbone, magnitude) -> None:
    over = dict(toy_maps=list(LINEAR_MAPS), toy_magnitude=magnitude)
    if backbone == "coca":
        over = {**over, **dict(coca_embed_dim=32, image_size=32, coca_patch_size=16, coca_vision_width=48,
                               coca_vision_layers=2, coca_vision_head_width=24, coca_attn_pooler_heads=4,
                               coca_vocab_size=1000, coca_text_width=32, coca_text_heads=2, coca_text_layers=2)}
    model = tiny_model("toy_adapters", backbone, **over)
    kind = DecomposedAdapter if magnitude else LowRankAdapter
    assert all(type(a) is kind for a in model.prompt.adapters.values())
    _randomise(model)
    batch = tiny_batch("clip" if backbone == "coca" else backbone)
    if backbone == "coca":
        batch["text_ids"] = batch["text_ids"][:, :76]
    unmerged = _logits(model, batch)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    model.merge_adapters(keep_originals=True)                  # evaluation of a model that trains on
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=0)
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("in_proj" in k or "qkv" in k or "proj" in k or "fc" in k for k in changed)
    model.unmerge_adapters()
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=0, rtol=0)

    model.merge_adapters()                                     # for good: no adapter left, a marker in the state
    assert len(model.prompt.adapters) == 0 and model.has_merged_adapters
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=0)
    state = model.state_dict()
    assert "adapters_merged" in state and not any(".adapters." in k for k in state)


def test_adapted_maps_are_views_of_the_fused_in_projection() -> None:
    model = tiny_model("toy_adapters", "clip", toy_maps=["k"])
    block = model.backbone.image_encoder.blocks[-1]
    weight, bias = model.backbone.image_encoder.linear_map(len(model.backbone.image_encoder.blocks) - 1, "k")
    width = block.attn.embed_dim
    assert weight.data_ptr() == block.attn.in_proj_weight[width:].data_ptr()    # a slice, not a copy
    assert bias.data_ptr() == block.attn.in_proj_bias[width:].data_ptr()
    _randomise(model)
    batch = tiny_batch("clip")
    model.train()
    model(batch)["logits"].sum().backward()
    adapter = model.prompt.adapters[f"image_{len(model.backbone.image_encoder.blocks) - 1}_k"]
    assert adapter.lora_A.grad is not None and adapter.lora_A.grad.abs().sum() > 0
    assert block.attn.in_proj_weight.grad is None                                 # frozen


def test_bad_adapter_specs_are_one_line_errors() -> None:
    with pytest.raises(UserInputError, match="adapter maps"):
        tiny_model("toy_adapters", "vilt", toy_maps=["qkv"])
    with pytest.raises(UserInputError, match="adapter blocks"):
        tiny_model("toy_adapters", "vilt", toy_top_blocks=5)


def test_merged_checkpoint_evaluates_without_adapters(tmp_path) -> None:
    config = {**_tiny_config("clip", "toy_adapters"), "toy_maps": ["q", "fc1"]}
    torch.manual_seed(0)
    module = MDPLModule(config)
    _randomise(module.model)
    batch = tiny_batch("clip")
    want = _logits(module.model, batch)
    path = tmp_path / "unmerged.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": module.config.to_flat()}}, path)

    from mdpl.api import export_merged
    merged_path = export_merged(path, tmp_path / "merged.ckpt")
    merged = torch.load(merged_path, map_location="cpu", weights_only=False)
    assert "model.adapters_merged" in merged["state_dict"]
    assert not any(".adapters." in k for k in merged["state_dict"])

    fresh = MDPLModule(config, weights_from_checkpoint=True)
    assert len(fresh.model.prompt.adapters) > 0
    load_for_test(fresh, merged)
    assert len(fresh.model.prompt.adapters) == 0          # the merged weights carry the adapters
    torch.testing.assert_close(_logits(fresh.model, batch), want, atol=1e-5, rtol=0)

    again = MDPLModule(config, weights_from_checkpoint=True)
    load_for_test(again, torch.load(path, map_location="cpu", weights_only=False))   # unmerged: adapters kept
    assert len(again.model.prompt.adapters) > 0
    torch.testing.assert_close(_logits(again.model, batch), want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ aux losses
def _tiny_config(backbone: str, method: str) -> dict:
    from tiny_models import CLIP, VILT
    return {**(VILT if backbone == "vilt" else CLIP), "dataset": "food101", "backbone": backbone,
            "prompt_method": method, "method_sizes": "tiny", "learning_rate": 1e-2, "weight_decay": 0.0,
            "optim_type": "adamw", "warmup_steps": 0.0, "max_epoch": 1, "max_steps": None, "end_lr": 0.0,
            "decay_power": 1, "lr_mult": 1, "seed": 0, "load_path": "", "clip_path": ""}


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_aux_loss_is_in_the_training_loss_only(backbone) -> None:
    batch = tiny_batch(backbone)
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        module = MDPLModule({**_tiny_config(backbone, "toy_aux"), "toy_pull_loss_weight": weight})
        module.log = lambda *args, **kwargs: None
        out = module.model.eval()(batch)
        assert set(out["aux_losses"]) == {"toy_pull"}
        task = task_loss("food101", out["logits"], batch["label"])
        torch.testing.assert_close(out["aux_losses"]["toy_pull"], torch.tensor(1.0))    # tokens start at 0
        train = module.training_step(batch, 0)
        torch.testing.assert_close(train, task + weight * out["aux_losses"]["toy_pull"])
        module.validation_step(batch, 0)
        losses[weight] = (float(train), float(module.loss_means["val_phase"].compute()), float(task))
    assert losses[0.5][0] == pytest.approx(losses[0.0][0] + 0.5, abs=1e-6)    # the training loss changes ...
    assert losses[0.5][1] == losses[0.0][1] == pytest.approx(losses[0.0][2])  # ... the validation loss does not


def test_an_aux_term_needs_its_weight_field() -> None:
    class NoWeight(ToyAux):
        aux_loss_names = ("unweighted",)

    with registered(NoWeight, "toy_no_weight"), pytest.raises(TypeError, match="unweighted_loss_weight"):
        tiny_model("toy_no_weight", "vilt")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("adapters_aux"), "food101", 64, 16, 16)


def _run_config(data: dict, backbone: str, method: str, log_dir: Path, **updates) -> dict:
    return resolved_config(["task_finetune_food101", "on_vilt" if backbone == "vilt" else "on_clip", "tiny"], {
        "prompt_method": method, "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]),
        "vocab_size": data["vocab_size"], "log_dir": str(log_dir), "max_epoch": 1, "per_gpu_batchsize": 16,
        "batch_size": 16, "val_check_interval": 1.0, "load_path": "", "clip_path": "", "logger": "csv",
        **updates})


def _logged(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_toy_adapters_train_end_to_end(data, tmp_path, backbone) -> None:
    config = _run_config(data, backbone, "toy_adapters", tmp_path / "result")
    out = run_quiet(config)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    lora_b = [v for k, v in state.items() if k.startswith("model.prompt.adapters.") and k.endswith("lora_B")]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "the adapters did not train"
    assert "model.adapters_merged" not in state                # checkpoints of a training run keep the adapters

    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    from mdpl.api import export_merged
    merged = export_merged(out["best_model_path"], tmp_path / "merged.ckpt")
    from_merged = run_quiet({**config, "test_only": True, "load_path": str(merged),
                             "log_dir": str(tmp_path / "test_merged")})
    for key, value in out["test"].items():
        assert abs(again["test"][key] - value) <= 1e-6, key
        assert abs(from_merged["test"][key] - value) <= 1e-5, key


@pytest.mark.parametrize("backbone", ["vilt", "clip"])
def test_toy_aux_loss_is_logged_end_to_end(data, tmp_path, backbone) -> None:
    out = run_quiet(_run_config(data, backbone, "toy_aux", tmp_path / "result"))
    rows = _logged(Path(out["run_dir"]))
    aux = [float(r["train/aux/toy_pull"]) for r in rows if r.get("train/aux/toy_pull")]
    assert aux and all(0.0 < v <= 1.0 + 1e-6 for v in aux)
    assert not any(k.startswith(("val/aux", "test/aux")) for k in rows[0])
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"]
