"""Every prompt method on every backbone: build, forward, learn, save/reload, trainable counts.

Cells: {none, map, memprompt, dcp, scp, msps} x {vilt, clip}, built by `mdpl.models.build_classifier` from the
`tiny` named config (random-initialised backbones, CPU). Original pairings keep their own parity tests
(test_parity_vilt.py, test_dcp.py); here the cross pairings get the same contract checks.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mdpl.backbones.clip import residual_block
from mdpl.errors import UserInputError
from mdpl.models import PromptedClassifier, build_classifier
from mdpl.prompts import PromptContext

METHODS = ("none", "map", "memprompt", "dcp", "scp", "msps")
BACKBONES = ("vilt", "clip")
CELLS = [(m, b) for b in BACKBONES for m in METHODS]
PRESET = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp", "scp": "scp", "msps": "msps"}
IGNORES_MISSING_TYPE = ("none", "scp")   # SCP conditions on the read-out token only (docs/methods.md §14)
SOT, EOT = 49406, 49407


def resolve(*named: str, **updates) -> dict:
    from config import ex
    return dict(ex.run("print_config", named_configs=list(named), config_updates=updates).config)


@pytest.fixture(scope="module")
def tiny() -> dict:
    return resolve("tiny", dataset="hatememes")


def build(tiny: dict, method: str, backbone: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random-init backbone warnings
        return build_classifier({**tiny, "prompt_method": method, "backbone": backbone, **over})


def batch(backbone: str, labels: torch.Tensor, types: torch.Tensor, seed: int = 0) -> dict:
    """Synthetic batch whose label shifts the image and picks the words: learnable by a frozen backbone."""
    g = torch.Generator().manual_seed(seed)
    b = labels.shape[0]
    image = torch.randn(b, 3, 64, 64, generator=g) + 1.5 * labels[:, None, None, None].float()
    words = torch.randint(10, 50, (b, 6), generator=g) + 50 * labels[:, None]
    if backbone == "vilt":
        ids = torch.zeros(b, 24, dtype=torch.long)
        ids[:, 0], ids[:, 1:7], ids[:, 7] = 101, words + 1000, 102
        return {"image": image, "image_sizes": torch.full((b, 2), 64), "text_ids": ids,
                "text_masks": (ids != 0).long(), "missing_type": types, "label": labels}
    ids = torch.zeros(b, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1:7], ids[:, 7] = SOT, words + 1000, EOT
    return {"image": image, "text_ids": ids, "missing_type": types, "label": labels}


def informative(model) -> None:
    """Scale the frozen random ViLT's weights x6: at its N(0, 0.02) init the text [CLS] carries almost no
    sample information (uniform attention, tiny values), so nothing could be learnt without pre-training."""
    with torch.no_grad():
        for module in model.backbone.transformer.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.mul_(6.0)


def types_for(b: int) -> torch.Tensor:
    return torch.arange(b) % 3


@pytest.mark.parametrize("method,backbone", CELLS)
def test_forward_shapes_and_missing_awareness(tiny, method, backbone) -> None:
    model = build(tiny, method, backbone).eval()
    assert type(model) is PromptedClassifier    # one classifier class for every method x backbone pairing
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    b = batch(backbone, labels, types_for(6))
    with torch.no_grad():  # MAP's init is permutation-symmetric across types (no positions): perturb it
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        out = model(b)
        flipped = model({**b, "missing_type": (b["missing_type"] + 1) % 3})
    dim = {"vilt": tiny["hidden_size"], "clip": 2 * tiny["clip_embed_dim"]}[backbone]
    assert out["logits"].shape == (6, 2) and out["pooled"].shape == (6, dim)
    assert torch.isfinite(out["logits"]).all()
    changed = not torch.allclose(out["logits"], flipped["logits"], atol=1e-6)
    # 'none' and SCP ignore the missing type; every other prompt method selects its prompts by it
    assert changed == (method not in IGNORES_MISSING_TYPE)
    if backbone == "clip":  # pooled = [f_v ; f_t]: DCP zeroes the half of the missing modality (docs/methods.md
        # §6.5), the other methods keep both towers' features
        e = tiny["clip_embed_dim"]
        types = b["missing_type"]
        image_half, text_half = out["pooled"][:, :e], out["pooled"][:, e:]
        zero_text = text_half.eq(0).all(1)
        zero_image = image_half.eq(0).all(1)
        if method == "dcp":
            assert torch.equal(zero_text, types == 1) and torch.equal(zero_image, types == 2)
        else:
            assert not zero_text.any() and not zero_image.any()


@pytest.mark.parametrize("method,backbone", CELLS)
def test_trains_saves_reloads(tiny, method, backbone, tmp_path) -> None:
    """A few Adam steps on a learnable synthetic batch lower the loss and fit it above chance; a saved
    state dict reloads into a freshly built (differently seeded) model with identical logits."""
    model = build(tiny, method, backbone, drop_rate=0.0)
    if backbone == "vilt":
        informative(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    labels = torch.arange(12) % 2
    train = batch(backbone, labels, types_for(12), seed=1)
    losses = []
    for _ in range(12):
        model.train()
        loss = F.cross_entropy(model(train)["logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(train)["logits"]
    assert F.cross_entropy(logits, labels).item() < 0.6 * losses[0]
    assert (logits.argmax(1) == labels).float().mean() >= 0.75
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(tiny, method, backbone, seed=123, drop_rate=0.0).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(train)["logits"], logits)
        fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
        assert torch.equal(fresh(train)["logits"], logits)


def test_clip_attention_prompts_extend_keys(tiny) -> None:
    """MAP attention-level prompts on CLIP: the K/V block equals open_clip's block without prompts when
    the prompt keys are masked out by -inf scores, and the model runs end to end."""
    model = build(tiny, "map", "clip", prompt_type="attention").eval()
    block = model.backbone.text_encoder.blocks[0]
    x = torch.randn(2, 77, tiny["clip_text_width"])
    mask = model.backbone.text_encoder.causal_mask(77, x.device)
    tower = model.backbone.text_encoder
    real = torch.ones(2, 77, dtype=torch.bool)   # run_block's mask: the real tokens (CLIP ignores it)
    ref = block(x, attn_mask=mask)  # open_clip's own forward (nn.MultiheadAttention)
    torch.testing.assert_close(tower.run_block(0, x, real), ref, atol=1e-5, rtol=0)
    zeros = torch.zeros(2, 0, x.shape[-1])
    torch.testing.assert_close(tower.run_block(0, x, real, (zeros, zeros)), ref, atol=1e-5, rtol=0)
    k = torch.randn(2, 3, x.shape[-1])
    with_prompts = tower.run_block(0, x, real, (k, k))
    assert not torch.allclose(with_prompts, ref, atol=1e-4)
    # the tower builds its causal mask itself; the same mask as booleans (True = attend) gives the same block
    torch.testing.assert_close(residual_block(block, x, mask, (k, k)), with_prompts, atol=1e-5, rtol=0)
    allowed = torch.ones(77, 77, dtype=torch.bool).tril()
    torch.testing.assert_close(residual_block(block, x, allowed, (k, k)), with_prompts, atol=1e-5, rtol=0)
    out = model(batch("clip", torch.tensor([0, 1, 1]), types_for(3)))
    assert out["logits"].shape == (3, 2)


def test_dcp_vilt_layout_replaces_layer_prompts(tiny) -> None:
    """DCP on ViLT: [R_t;R_v | C_t;C_v | Dyn | text | image] at block 0; blocks 1..depth-1 replace R only."""
    model = build(tiny, "dcp", "vilt").eval()
    n = model.prompt.layout.prompt_length // 3
    assert n == 2                                       # tiny's DCP prompt_length, 6
    b = batch("vilt", torch.tensor([0, 1]), torch.tensor([0, 2]))
    x, mask, layout = model.backbone.embed_joint(b["text_ids"], b["text_masks"], b["image"], b["image_sizes"])
    mt = b["missing_type"]
    stream = model.backbone.info.stream("joint")
    ctx = PromptContext(mt, model.prompt.prepare(mt))
    x1, mask1, layout1 = model.prompt.before_block(stream, 0, x, mask, layout, ctx)
    assert layout1.names == ["dcp.layer", "dcp.common", "dcp.dynamic", "text", "image"]
    assert [s.length for s in layout1.segments[:3]] == [2 * n, 2 * n, n]
    assert torch.equal(x1[:, 5 * n:], x) and bool(mask1[:, :5 * n].all())
    x2, _, layout2 = model.prompt.before_block(stream, 1, x1, mask1, layout1, ctx)
    assert layout2 == layout1
    assert torch.equal(x2[:, 2 * n:], x1[:, 2 * n:]) and not torch.equal(x2[:, :2 * n], x1[:, :2 * n])
    assert layout2.offset("text") == 5 * n             # the pooled text [CLS]


def test_two_tower_memprompt_prepends_per_tower(tiny) -> None:
    """MemPrompt on CLIP: [S, G] prepended in each tower with that tower's width; accumulating."""
    model = build(tiny, "memprompt", "clip").eval()
    seen: dict[str, list] = {"image": [], "text": []}
    hook = model.prompt.before_block

    def spy(stream, index, x, mask, layout, ctx):
        x, mask, layout = hook(stream, index, x, mask, layout, ctx)
        seen[stream.name].append((x.shape[-1], layout.names))
        return x, mask, layout

    model.prompt.before_block = spy
    model(batch("clip", torch.tensor([0, 1]), torch.tensor([1, 2])))
    assert seen["image"][-1] == (tiny["clip_vision_width"], ["mem.shared_v.1", "mem.gen_v.1", "mem.shared_v.0",
                                                              "mem.gen_v.0", "image"])
    assert seen["text"][-1] == (tiny["clip_text_width"], ["mem.shared_t.1", "mem.gen_t.1", "mem.shared_t.0",
                                                           "mem.gen_t.0", "text"])


# Full paper sizes (MM-IMDb, each method's preset): (total, trainable). Original pairings match docs/methods.md
# §3.4 (MAP 2,031,383), §4.1 (MemPrompt 5,358,935), §6.6 (DCP 2,006,784 + 2,362,368 + 1,050,624 +
# 1,536 + 1,024 + 393,216 + 23,575 = 5,839,127), §14.3 (SCP 2,062,103) and §16.3 (MSPs 1,957,655). SCP on CLIP needs scp_length=16 (12 does
# not divide the text width 512).
FULL_COUNTS = {
    ("none", "vilt"): (113_570_327, 1_810_199),
    ("map", "vilt"): (113_791_511, 2_031_383),
    ("memprompt", "vilt"): (117_119_063, 5_358_935),
    ("dcp", "vilt"): (118_847_735, 7_087_607),
    ("none", "clip"): (149_644_312, 419_351),
    ("map", "clip"): (150_012_952, 787_991),
    ("memprompt", "clip"): (152_503_384, 3_278_423),
    ("dcp", "clip"): (155_064_088, 5_839_127),
    ("scp", "vilt"): (113_822_231, 2_062_103),
    ("scp", "clip"): (150_089_752, 864_791),
    ("none", "coca"): (152_616_216, 287_767),
    ("map", "coca"): (152_984_856, 656_407),
    ("memprompt", "coca"): (155_475_288, 3_146_839),
    ("dcp", "coca"): (158_035_992, 5_707_543),
    ("scp", "coca"): (153_061_656, 733_207),
    ("msps", "vilt"): (113_717_783, 1_957_655),
    ("msps", "clip"): (149_890_072, 665_111),
    ("msps", "coca"): (152_861_976, 533_527),
}
PAPER_SIZE_UPDATES = {("scp", "clip"): {"scp_length": 16}, ("scp", "coca"): {"scp_length": 16}}


@pytest.mark.parametrize("method,backbone", CELLS + [(m, "coca") for m in METHODS])
def test_trainable_counts_at_paper_sizes(method, backbone) -> None:
    """Built on the meta device (no memory, no weights): the method x backbone parameter table (README "Every method
    on every backbone"), its CoCa ViT-B/32 column included."""
    cfg = resolve("task_finetune_mmimdb", PRESET[method], backbone=backbone,
                  image_size=384 if backbone == "vilt" else 224, **PAPER_SIZE_UPDATES.get((method, backbone), {}))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    assert model.trainable_parameters_report() == FULL_COUNTS[(method, backbone)]


def test_ragpt_counts_at_reference_sizes_and_refuses_two_towers() -> None:
    """RAGPT (ViLT only): the reference's 'both' model on MM-IMDb at max_text_len 128 and 384² images (145 image
    tokens) trains 7,527,936 values (the complex filters counted as real pairs, docs/methods.md §17.3); on CLIP and
    CoCa the method is one error line."""
    cfg = resolve("task_finetune_mmimdb", "ragpt", image_size=384, max_text_len=128)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    total, trainable = model.trainable_parameters_report()
    assert trainable == 7_527_936, (total, trainable)
    for backbone in ("clip", "coca"):
        with pytest.raises(UserInputError, match="^ragpt replaces embeddings") as err:
            build_classifier(resolve("task_finetune_mmimdb", "ragpt", backbone=backbone, image_size=224))
        assert "\n" not in str(err.value)
