"""AOEPT (mdpl/prompts/aoept.py, docs/methods.md §18): preparation, gates, switches, config, and a run through run.py.

The reference parity is tests/test_parity_aoept.py (CLIP) and tests/test_parity_aoept_vilt.py (ViLT); here: the
clustering on a well-separated case (the prototypes do not depend on k-means seeding there), the gates' forced opening
on rows whose source modality is missing, ViLT's prompt mixing and memory layouts (AOEPT-D2), the defect switches
acting, one-line config errors, the preset, and training + ``test_only`` through ``run.py`` with the preparation stage
on CLIP and on ViLT.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runs import resolved_config, run_quiet, synthetic_arrows  # noqa: E402
from tiny_models import tiny_batch, tiny_model  # noqa: E402

from mdpl.config.validate import validate_config  # noqa: E402
from mdpl.engine.kmeans import kmeans  # noqa: E402
from mdpl.errors import UserInputError  # noqa: E402
from mdpl.prompts.aoept import AOEPTState  # noqa: E402


def model_with_memory(backbone: str = "clip", seed: int = 0, **over):
    """The tiny AOEPT model with random prototypes and gates moved off their init, in eval mode."""
    model = tiny_model("aoept", backbone, aoept_depth=2, **over).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompt.text_memory.normal_(generator=g)
        model.prompt.image_memory.normal_(generator=g)
        for p in model.prompt.gates.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_kmeans_finds_well_separated_prototypes_whatever_the_seed() -> None:
    """The reference clusters with sklearn (k-means++, n_init 10, seed 42), mdpl with its own exact k-means: on
    well-separated groups every seeding gives the groups' means, the prototypes the reference would get."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2, 4, 8, generator=g) * 20                       # 2 layers, 4 groups, width 8
    x = (true[:, :, None, :] + 0.1 * torch.randn(2, 4, 25, 8, generator=g)).reshape(2, 100, 8)
    means = x.reshape(2, 4, 25, 8).mean(2)
    for seed in (0, 42):
        centres = kmeans(x, 4, iters=300, seed=seed, n_init=10).centres
        for layer in range(2):
            order = torch.cdist(means[layer], centres[layer]).argmin(1)
            assert sorted(order.tolist()) == [0, 1, 2, 3]
            torch.testing.assert_close(centres[layer][order], means[layer], atol=1e-4, rtol=0)


def test_preparation_need_and_loading() -> None:
    model = tiny_model("aoept", "clip", aoept_depth=2, aoept_prototypes=4)
    need = model.prompt.preparation_needs()
    assert [(f.name, f.stream, f.layers, f.segment, f.pooling, f.zero_missing) for f in need.features] == [
        ("text", "text", (0, 1), "text", "mean", True), ("image", "image", (0, 1), "image", "mean", True)]
    assert [(k.k, k.iters, k.n_init, k.seed, k.tol) for k in need.kmeans] == [(4, 20, 1, 42, 1e-4)] * 2
    from mdpl.prompts.preparation import PreparedArtifact
    text, image = torch.randn(2, 3, 32), torch.randn(2, 4, 48)           # fewer text rows than K: k' = 3
    model.prompt.load_prepared(PreparedArtifact("k", {}, torch.arange(5), centres={"text": text, "image": image}))
    assert torch.equal(model.prompt.memory("text"), text) and torch.equal(model.prompt.memory("image"), image)
    assert model.prompt.memory_rows.tolist() == [3, 4]


def test_gates_open_where_the_source_modality_is_missing() -> None:
    """Text prompts are the ungated proxies on image-missing rows, image prompts on text-missing rows; elsewhere
    they are gated (smaller)."""
    model = model_with_memory()
    batch = tiny_batch("clip")
    captured: dict = {}
    original = model.prompt.prepare

    def prepare(missing_type):
        captured["state"] = original(missing_type)
        return captured["state"]

    model.prompt.prepare = prepare
    with torch.no_grad():
        model(batch)
    state: AOEPTState = captured["state"]
    types = batch["missing_type"]
    for stream, opened in (("text", 2), ("image", 1)):
        for index, own in enumerate(state.gated[stream]):
            proxy = state.proxies[stream][index]
            rows = types == opened
            torch.testing.assert_close(own[rows], proxy.expand(int(rows.sum()), -1, -1))
            gated = own[~rows]
            assert (gated.abs() < proxy.abs() + 1e-7).all() and not torch.allclose(gated, proxy.expand_as(gated))


@pytest.mark.parametrize("switch,value", [("aoept_text_pool", "eot"), ("aoept_feature_pool", "masked"),
                                          ("aoept_text_positions", "pretrained")])
def test_each_defect_switch_changes_the_output(switch, value) -> None:
    batch = tiny_batch("clip")
    with torch.no_grad():
        ref = model_with_memory()(batch)
        other = model_with_memory(**{switch: value})(batch)
    changed = (ref["logits"] - other["logits"]).abs().max() + (ref["aux_loss"] - other["aux_loss"]).abs()
    assert changed > 1e-6


def test_closed_gates_start_near_zero() -> None:
    model = tiny_model("aoept", "clip", aoept_gate_init="closed")
    gate = torch.sigmoid(model.prompt.gates["text"][0](torch.randn(3, 48)))
    torch.testing.assert_close(gate, torch.full_like(gate, torch.sigmoid(torch.tensor(-5.0)).item()))


def test_the_term_is_a_consistency_loss_of_the_present_rows() -> None:
    model = model_with_memory()
    out = model(tiny_batch("clip"))
    term = out["aux_losses"]["aoept_consistency"]
    assert term > 0 and term.requires_grad
    torch.testing.assert_close(out["aux_loss"], 0.05 * term)
    term.backward()
    assert model.prompt.logit_scale.grad is not None and model.prompt.text_query.grad.abs().sum() > 0


def vilt_with_memory(**over):
    return model_with_memory("vilt", 1, **over)


def test_vilt_preparation_need_and_memory_layouts() -> None:
    """ViLT: block inputs of the joint stream, the missing modality hidden; ``per_layer`` keeps block i's prototypes,
    ``reference`` (AOEPT-D2) prototype i of every block, and needs at least d prototypes."""
    from mdpl.prompts.preparation import PreparedArtifact
    per_layer = tiny_model("aoept", "vilt", aoept_depth=2, aoept_prototypes=4)
    reference = tiny_model("aoept", "vilt", aoept_depth=2, aoept_prototypes=4, aoept_vilt_memory_layout="reference")
    blocks = reference.backbone.info.num_layers
    for model, layers in ((per_layer, (0, 1)), (reference, tuple(range(blocks)))):
        need = model.prompt.preparation_needs()
        assert need.mask_missing
        assert [(f.stream, f.layers, f.segment, f.pooling) for f in need.features] == [
            ("joint", layers, "text", "mean"), ("joint", layers, "image", "mean")]
    centres = {m: torch.randn(blocks, 4, 32) for m in ("text", "image")}
    artifact = PreparedArtifact("k", {}, torch.arange(5), centres=centres)
    per_layer.prompt.load_prepared(artifact)
    reference.prompt.load_prepared(artifact)
    assert torch.equal(per_layer.prompt.memory("text"), centres["text"][:2])
    assert torch.equal(reference.prompt.memory("image"), centres["image"][:, :2].transpose(0, 1))
    assert reference.prompt.memory_rows.tolist() == [blocks, blocks]
    few = PreparedArtifact("k", {}, torch.arange(5), centres={m: c[:, :1] for m, c in centres.items()})
    with pytest.raises(UserInputError, match="needs|prototypes"):
        reference.prompt.load_prepared(few)


def test_vilt_own_prompt_mixes_by_missing_type_and_gates_open() -> None:
    """ViLT: the own slot holds p_t on text-missing rows, p_v on image-missing rows, (p_t + p_v) / 2 on complete ones;
    p_t is the ungated T_i where the image is missing, p_v the ungated V_i where the text is missing; one gate per
    role for every block (AOEPT-D12)."""
    model = vilt_with_memory()
    assert all(len(model.prompt.gates[k]) == 1 for k in ("text", "image", "shared"))
    types = torch.tensor([0, 1, 2, 0, 2, 1])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        state = model.prompt.prepare(types)
        state.means["text"][0], state.means["image"][0] = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
        prompts = model.prompt.joint_prompts(1, types, state)
    p_t, p_v = state.gated["text"][0], state.gated["image"][0]
    ls = model.prompt.config.aoept_shared_length
    own = prompts[:, ls:]
    torch.testing.assert_close(own[types == 1], p_t[types == 1])
    torch.testing.assert_close(own[types == 2], p_v[types == 2])
    torch.testing.assert_close(own[types == 0], (p_t[types == 0] + p_v[types == 0]) / 2)
    torch.testing.assert_close(p_t[types == 2], state.proxies["text"][1].expand(2, -1, -1))
    torch.testing.assert_close(p_v[types == 1], state.proxies["image"][1].expand(2, -1, -1))
    assert not torch.allclose(p_t[types == 0], state.proxies["text"][1].expand(2, -1, -1))


def test_vilt_forward_loss_and_head() -> None:
    """ViLT: logits and a positive consistency term with gradients into the prompts and the pooler; the head is the
    reference's Linear(D, 2D), LayerNorm, GELU, Linear(2D, C)."""
    model = vilt_with_memory()
    out = model(tiny_batch("vilt"))
    term = out["aux_losses"]["aoept_consistency"]
    assert term > 0
    (out["logits"].sum() + term).backward()
    assert model.prompt.shared_query.grad.abs().sum() > 0 and model.backbone.pooler.dense.weight.grad is not None
    head = model.head
    assert [type(m).__name__ for m in head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert head[0].out_features == 64 and head[1].eps == 1e-5


@pytest.mark.parametrize("updates,message", [
    ({"backbone": "vilt", "aoept_vilt_memory_layout": "rows"},
     "aoept_vilt_memory_layout='rows' must be one of per_layer, reference"),
    ({"backbone": "clip", "aoept_depth": 2}, "aoept_depth=2 must be below the 2 blocks"),
    ({"backbone": "clip", "aoept_heads": 5}, "must divide the"),
    ({"backbone": "clip", "aoept_text_pool": "cls"}, "aoept_text_pool='cls' must be one of reference, eot"),
    ({"backbone": "clip", "aoept_consistency_loss_weight": -1.0}, "must be a number >= 0"),
])
def test_config_errors_are_one_line(updates, message) -> None:
    cfg = resolved_config(["task_finetune_food101", "aoept", "tiny"], {})
    with pytest.raises(UserInputError, match=message):
        validate_config({**cfg, **updates}, check_data=False)


def test_coca_is_refused_in_one_line() -> None:
    cfg = resolved_config(["task_finetune_food101", "aoept", "tiny"], {"backbone": "coca"})
    from mdpl.models import build_classifier
    with pytest.raises(UserInputError, match="AOEPT is mapped onto CLIP's two towers .* and ViLT's joint stream only"):
        build_classifier(cfg)


def test_preset_is_the_reference_config() -> None:
    cfg = resolved_config(["task_finetune_mmimdb", "aoept"], {})
    sizes = ("aoept_length", "aoept_shared_length", "aoept_depth", "aoept_reduction")
    assert tuple(cfg[k] for k in sizes) == (5, 5, 4, 16)
    assert (cfg["aoept_prototypes"], cfg["aoept_kmeans_seed"], cfg["aoept_consistency_loss_weight"]) == (256, 42, 0.05)
    assert (cfg["learning_rate"], cfg["seed"], cfg["backbone"]) == (2e-2, 2026, "clip")


@pytest.mark.parametrize("backbone", ["clip", "vilt"])
def test_trains_with_preparation_through_run_and_test_only_reproduces(tmp_path, backbone) -> None:
    data = synthetic_arrows(tmp_path, "food101", 24, 8, 8)
    config = resolved_config(["task_finetune_food101", "aoept", "tiny"], {"backbone": backbone,
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "log_dir": str(tmp_path / "result"), "max_epoch": 1, "logger": "csv", "per_gpu_batchsize": 8,
        "batch_size": 8, "learning_rate": 1e-2, "val_check_interval": 1.0})
    out = run_quiet(config)
    rows = list(csv.DictReader((Path(out["run_dir"]) / "csv" / "metrics.csv").open()))
    terms = [float(r["train/aux/aoept_consistency"]) for r in rows if r.get("train/aux/aoept_consistency")]
    assert terms and all(t > 0 for t in terms)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    rows_used = state["model.prompt.memory_rows"]
    assert rows_used.tolist() == [3, 3]                   # K = 3 prototypes per tower from the training split
    assert state["model.prompt.text_memory"].abs().sum() > 0 and state["model.prompt.image_memory"].abs().sum() > 0
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key
