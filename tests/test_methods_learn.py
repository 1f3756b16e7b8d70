"""Every prompt method must matter: no inert prompt, no missing gradient path, no prompt that is never selected.

Cells: MAP (input- and attention-level prompts), MemPrompt, DCP (plus DCP with trainable dynamic queries) and SCP,
each on ViLT and on CLIP, built by `mdpl.models.build_classifier` from `<preset> on_<backbone> tiny`
(random-initialised backbones, CPU, no dropout). One synthetic batch of six rows holds every missing type:
rows 0, 3 complete, rows 1, 4 text missing, rows 2, 5 image missing (dummies of `apply_missing`).

a. two optimizer steps: every trainable tensor gets a non-zero gradient at both steps and moves, and the
   loss of the rows of one missing type reaches exactly the prompt tensors that type selects;
b. perturbing one prompt tensor changes the logits of exactly the rows whose type uses it (all three types
   are covered by each method), zeroing all of them changes every row;
c. with the backbone and head weights of a no-prompt baseline copied in, the method's logits differ from the
   baseline's on every row;
d. the trainable set is exactly the method's parameters + the backbone parts the backbone declares + the
   head, and it is larger than the baseline's; finetune=True trains every tensor that gets a gradient.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from runs import resolved_config
from mdpl.data.missing import apply_missing
from mdpl.engine.optim import build_optimizer
from mdpl.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp", "scp": "scp"}
SWITCH = {"vilt": "on_vilt", "clip": "on_clip"}
VARIANTS = {
    "map-input": ("map", {"prompt_type": "input"}),
    "map-attention": ("map", {"prompt_type": "attention"}),
    "memprompt": ("memprompt", {}),
    "dcp": ("dcp", {}),
    "dcp-dynamic-trainable": ("dcp", {"dcp_dynamic_trainable": True}),
    "scp": ("scp", {"scp_pool_dropout": 0.0}),
}
BACKBONES = ("vilt", "clip")
CELLS = [(v, b) for v in VARIANTS for b in BACKBONES]
IDS = [f"{v}-{b}" for v, b in CELLS]
TYPES = torch.tensor([0, 1, 2, 0, 1, 2])          # complete, text missing, image missing (twice)
LABELS = torch.tensor([0, 1, 2, 3, 4, 5])         # food101: 101 classes
SOT, EOT, CLS, SEP = 49406, 49407, 101, 102
# An inert prompt leaves the logits bit-identical (rows untouched by a prompt are), so any clear change shows a path.
# Smallest change observed: ~1e-5 (DCP's text-tower dynamic queries on the random tiny CLIP, whose token embeddings
# are so small that its block-0 prompt attention is near-uniform); typical changes are 1e-3 to 1e-1.
CHANGED = 1e-6
SAME = 1e-7

# Trainable tensors that never receive a gradient by design, with the reason.
NEVER_UPDATED = {
    ("dcp-dynamic-trainable", "clip"): {
        # skipping the tower whose feature half is zeroed is exact: the reference zeroes that half after
        # encoding, so a text-missing row's text tower (and an image-missing row's image tower) gets no gradient
        # either; these query sets are selected only by those rows.
        "prompt.dynamic.text.prompts_dynamic_image",
        "prompt.dynamic.image.prompts_dynamic_text",
    },
}

# Learned prompt tensors (not their projections) -> the missing types whose rows select them.
MAP_USE = {"complete_prompt": {0}, "missing_text_prompt": {1}, "missing_img_prompt": {2}}
DCP_USE = {  # image init prompt / text init prompt / common prompt / dynamic queries per type (DCP's selection table)
    "visual_prompt_complete": {0, 1}, "visual_prompt_missing": {2},
    "text_prompt_complete": {0, 2}, "text_prompt_missing": {1},
    "common_prompt_complete": {0}, "common_prompt_image": {1}, "common_prompt_text": {2},
    "prompts_dynamic_complete": {0}, "prompts_dynamic_image": {1}, "prompts_dynamic_text": {2},
}


@functools.lru_cache(maxsize=None)
def _config(method: str, backbone: str, updates: tuple) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):   # print_config prints the whole config
        return resolved_config([PRESET[method], SWITCH[backbone], "tiny"],
                               {"dataset": "food101", "drop_rate": 0.0, **dict(updates)})


def config(method: str, backbone: str, **updates) -> dict:
    cfg = dict(_config(method, backbone, tuple(sorted(updates.items()))))
    assert (cfg["prompt_method"], cfg["backbone"]) == (method, backbone)
    return cfg


def build(method: str, backbone: str, seed: int = 0, **updates) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # random-init backbone warnings
        model = build_classifier(config(method, backbone, **updates))
    if backbone == "vilt":
        informative(model)
    return model


def informative(model: torch.nn.Module) -> None:
    """Scale the random ViLT's linear / conv weights x6 so that tokens carry sample information: at the N(0, 0.02)
    init attention is near-uniform and values tiny, so every prompt's effect on the logits would be tiny too."""
    with torch.no_grad():
        for module in model.backbone.transformer.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.mul_(6.0)


def make_batch(backbone: str, seed: int = 0) -> dict:
    """Six distinct rows, TYPES' dummies applied (text: the encoding of '', image: ones)."""
    cfg = config("none", backbone)
    g = torch.Generator().manual_seed(seed)
    b = len(TYPES)
    side = cfg["image_size"]
    length, start, end = (77, SOT, EOT) if backbone == "clip" else (cfg["max_text_len"], CLS, SEP)
    ids = torch.zeros(b, length, dtype=torch.long)
    ids[:, 1:9] = torch.randint(1000, 2000, (b, 8), generator=g)
    ids[:, 0], ids[:, 9] = start, end
    dummy = torch.zeros(1, length, dtype=torch.long)
    dummy[0, :2] = torch.tensor([start, end])
    batch = {"image": torch.randn(b, 3, side, side, generator=g), "image_sizes": torch.full((b, 2), side),
             "text_ids": ids, "text_masks": (ids != 0).long(), "label": LABELS}
    return apply_missing(batch, TYPES, dummy, (dummy != 0).long())


def is_method_key(model: torch.nn.Module, name: str) -> bool:
    """Whether a parameter / buffer name belongs to the prompt method (every method, on every backbone, lives
    under the classifier's ``prompt``)."""
    return name.startswith("prompt.")


def declared_backbone(model: torch.nn.Module, backbone: str) -> set[str]:
    """Backbone parameters the backbone declares trainable (its ``trainable_parts``): ViLT's pooler (MAP/MemPrompt's
    rule); CLIP's ln_post, ln_final and vision proj (DCP's rule, kept for every method on CLIP)."""
    names = {n for n, _ in model.named_parameters() if not is_method_key(model, n)}
    if backbone == "vilt":
        return {n for n in names if n.startswith("backbone.pooler.")}
    parts = ("backbone.image_encoder.ln_post.", "backbone.text_encoder.ln_final.")
    return {n for n in names if n.startswith(parts) or n == "backbone.image_encoder.proj"}


def head_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("food101_classifier.")}


def prompt_tensors(model: torch.nn.Module, method: str, exempt: set[str] = frozenset()) -> dict[str, set[int]]:
    """The method's learned prompt tensors (parameters) -> the missing types whose rows they affect (none for the
    `exempt` ones, see NEVER_UPDATED)."""
    out: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        if not is_method_key(model, name):
            continue
        parts = name.split(".")
        if method == "map" and parts[-1] in MAP_USE:
            out[name] = MAP_USE[parts[-1]]
        elif method == "memprompt" and parts[-2] == "shared_missing_t":
            out[name] = {0, 1}       # complete rows use S_t + S_v, text-missing rows S_t
        elif method == "memprompt" and parts[-2] == "shared_missing_v":
            out[name] = {0, 2}
        elif method == "memprompt" and parts[-1] == "prompt_memory":
            out[name] = {0, 1, 2}    # generative prompts ignore the missing type
        elif method == "dcp" and parts[-1] in DCP_USE:
            out[name] = DCP_USE[parts[-1]]
        elif method == "scp":
            out[name] = {0, 1, 2}    # SCP never reads the missing type: every tensor reaches every row
    return {name: (set() if name in exempt else types) for name, types in out.items()}


def expected_prompt_count(variant: str, backbone: str) -> int:
    layers = 2                                        # tiny: prompt / gen / shared layers [0, 1]
    towers = 2 if backbone == "clip" else 1
    return {"map-input": 3 * towers, "map-attention": 3 * towers, "memprompt": 4 * layers,
            "dcp": 7, "dcp-dynamic-trainable": 7 + 3 * towers,
            "scp": 4 * towers}[variant]   # tiny SCP: one static block; fixed, keys, values of one conditioned block


def task_loss(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    if rows is None:
        return F.cross_entropy(logits, LABELS)
    return F.cross_entropy(logits[rows], LABELS[rows])


@functools.lru_cache(maxsize=None)
def trained(variant: str, backbone: str):
    """Two AdamW steps on the batch: (model, [per step: names with no gradient], names that did not move,
    {MemPrompt memory: [per step: slots with a gradient]})."""
    method, updates = VARIANTS[variant]
    model = build(method, backbone, **updates).train()
    batch = make_batch(backbone)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = build_optimizer(model, config(method, backbone, learning_rate=1e-2, **updates))   # the training optimizer
    silent, memory_slots = [], {n: [] for n in params if n.endswith("prompt_memory")}
    for _ in range(2):
        opt.zero_grad()
        task_loss(model(batch)["logits"]).backward()
        silent.append({n for n, p in params.items() if p.grad is None or not bool(p.grad.ne(0).any())})
        for name, slots in memory_slots.items():
            slots.append(int(params[name].grad.flatten(1).ne(0).any(1).sum()))
        if method == "map":   # every prompt token of every layer slice (both K and V halves in attention mode)
            for name in prompt_tensors(model, method):
                rows = params[name].grad.flatten(2).ne(0).any(-1)          # [P, L]
                assert bool(rows.all()), f"{name}: prompt tokens without gradient {(~rows).nonzero().tolist()}"
        opt.step()
    unmoved = {n for n, p in params.items() if torch.equal(p.detach(), start[n])}
    return model.eval(), silent, unmoved, memory_slots


# --- a. gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,backbone", CELLS, ids=IDS)
def test_every_trainable_tensor_gets_gradient_and_moves(variant, backbone) -> None:
    model, silent, unmoved, memory_slots = trained(variant, backbone)
    exempt = NEVER_UPDATED.get((variant, backbone), set())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert exempt <= trainable
    method_params = {n for n in trainable if is_method_key(model, n)}
    assert method_params, "the method has no trainable tensor"
    for step, names in enumerate(silent):
        assert names == exempt, f"step {step}: no gradient reached {sorted(names - exempt)}"
    assert not unmoved - exempt, f"not updated by the optimizer: {sorted(unmoved - exempt)}"   # (exempt: decay only)
    for name, slots in memory_slots.items():   # retrieval: at least top_k memory slots got a gradient
        assert min(slots) >= config("memprompt", backbone)["top_k"], (name, slots)


@pytest.mark.parametrize("variant,backbone", CELLS, ids=IDS)
def test_rows_of_one_type_reach_exactly_their_prompts(variant, backbone) -> None:
    method, updates = VARIANTS[variant]
    model = build(method, backbone, **updates).train()
    batch = make_batch(backbone)
    prompts = prompt_tensors(model, method, NEVER_UPDATED.get((variant, backbone), set()))
    assert len(prompts) == expected_prompt_count(variant, backbone), sorted(prompts)
    params = dict(model.named_parameters())
    for t in range(3):
        model.zero_grad(set_to_none=True)
        task_loss(model(batch)["logits"], TYPES == t).backward()
        for name, types in prompts.items():
            grad = params[name].grad
            reached = grad is not None and bool(grad.ne(0).any())
            expected = t in types
            assert reached == expected, f"type {t} rows {'did not reach' if expected else 'reached'} {name}"


# --- b. the prompts change the logits ---------------------------------------------------------------------
@pytest.mark.parametrize("variant,backbone", CELLS, ids=IDS)
def test_perturbing_a_prompt_changes_exactly_the_rows_that_select_it(variant, backbone) -> None:
    method = VARIANTS[variant][0]
    model = copy.deepcopy(trained(variant, backbone)[0]).eval()
    batch = make_batch(backbone, seed=1)
    params = dict(model.named_parameters())
    prompts = prompt_tensors(model, method, NEVER_UPDATED.get((variant, backbone), set()))
    assert set().union(*prompts.values()) == {0, 1, 2}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = model(batch)["logits"]
        for name, types in prompts.items():
            saved = params[name].detach().clone()
            params[name].add_(torch.randn(saved.shape, generator=g))
            moved = (model(batch)["logits"] - ref).abs().amax(1)
            params[name].copy_(saved)
            for row, t in enumerate(TYPES.tolist()):
                if t in types:
                    assert moved[row] > CHANGED, f"perturbing {name} left row {row} (type {t}) unchanged"
                else:
                    assert moved[row] <= SAME, f"perturbing {name} changed row {row} (type {t}): {moved[row]:.2e}"
        assert torch.equal(model(batch)["logits"], ref)
        for name in prompts:
            params[name].zero_()
        moved = (model(batch)["logits"] - ref).abs().amax(1)
    assert bool((moved > CHANGED).all()), f"zeroing every prompt left rows unchanged: {moved.tolist()}"


# --- c. not the baseline ---------------------------------------------------------------------------------
def copy_shared_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load the baseline's backbone and head into `target`: every key of `target` but the method's is set."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    method_keys = {k for k in target.state_dict() if is_method_key(target, k)}
    assert set(result.missing_keys) == method_keys, sorted(set(result.missing_keys) ^ method_keys)


@pytest.mark.parametrize("variant,backbone", CELLS, ids=IDS)
def test_differs_from_baseline_with_the_same_shared_weights(variant, backbone) -> None:
    method, updates = VARIANTS[variant]
    baseline = build("none", backbone, seed=0).eval()
    model = build(method, backbone, seed=1, **updates).eval()
    batch = make_batch(backbone)
    with torch.no_grad():
        before = (model(batch)["logits"] - baseline(batch)["logits"]).abs().amax(1)
        copy_shared_weights(baseline, model)
        diff = (model(batch)["logits"] - baseline(batch)["logits"]).abs().amax(1)
        again = build("none", backbone, seed=1).eval()
        copy_shared_weights(baseline, again)
        control = (again(batch)["logits"] - baseline(batch)["logits"]).abs().amax()
    assert bool((before > CHANGED).all())   # other seed: other backbone and head
    assert float(control) == 0.0            # the copy leaves only the method as a difference
    assert bool((diff > CHANGED).all()), f"{variant} on {backbone}: rows equal to the baseline: {diff.tolist()}"


# --- d. trainable set ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,backbone", [("none", b) for b in BACKBONES] + CELLS,
                         ids=[f"none-{b}" for b in BACKBONES] + IDS)
def test_trainable_set_is_what_the_method_declares(variant, backbone) -> None:
    method, updates = VARIANTS.get(variant, ("none", {}))
    model = build(method, backbone, **updates)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    method_params = {n for n in named if is_method_key(model, n)}
    backbone_params = set(named) - method_params - head_names(model)
    declared = declared_backbone(model, backbone)
    assert declared and declared < backbone_params
    assert trainable & backbone_params == declared, sorted((trainable & backbone_params) ^ declared)
    assert trainable == method_params | declared | head_names(model)
    count = sum(named[n].numel() for n in trainable)
    baseline = build("none", backbone)
    base_count = sum(p.numel() for p in baseline.parameters() if p.requires_grad)
    if method == "none":
        assert not method_params and count == base_count
    else:
        assert method_params and count > base_count
        assert count - base_count == sum(named[n].numel() for n in method_params)
    # finetune=True trains everything but CLIP's contrastive temperature, which no classifier uses (trainable, it
    # would never get a gradient and DDP would stop on it); every trainable tensor gets a gradient
    tuned = build(method, backbone, finetune=True, **updates).train()
    frozen = {n for n, p in tuned.named_parameters() if not p.requires_grad}
    assert frozen == ({"backbone.logit_scale"} if backbone == "clip" else set())
    task_loss(tuned(make_batch(backbone))["logits"]).backward()
    silent = {n for n, p in tuned.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.ne(0).any())}
    assert silent == NEVER_UPDATED.get((variant, backbone), set())
