"""Numerical parity of mdpl's RAGPT with its reference code (tests/fixtures/README.md, "RAGPT").

Fixtures ``ref_ragpt_{A,B}.pt`` (written by tools/parity/make_ragpt.py from ``Jian-Lang/RAGPT``) hold a tiny fixed
retrieval problem (training memory and test queries, one vector per item and channel) with the reference's neighbour
ids, and per dataset head: the reference config and training setting ('text', 'image' or 'both': which generators
exist and the encoding of its missing mask), the names / shapes / float64 checksums of its state dict (values
regenerated from ``tests/vilt_hashinit.py``, the memory bank too), one batch of one split with every missing type of
that setting, the label lists the reference's datasets picked, and the reference logits, loss and the gradient of
every trainable tensor (eval mode, float32, CPU).

For every (config, head) this file checks that mdpl's exact top-k (``mdpl.engine.topk``) gives the reference's
neighbour ids, then builds ``mdpl.models.build_classifier`` on ViLT with ``vilt_variant=hf drop_rate=0``, loads the
regenerated state, hands the method the bank and mdpl's neighbour lists (as ``load_prepared`` would) and runs the
batch **as mdpl's pipeline gives it** (a text-missing row has the empty text's [CLS][SEP] ids and mask, an
image-missing row the all-ones dummy image; the reference had the dummy text's all-ones mask and the real image):
the label lists, logits (atol 1e-5 of their scale), loss (rtol 1e-5) and every gradient (rtol 1e-4 + atol 1e-5 of its
scale; a complex filter's as real pairs) must match.
"""
from __future__ import annotations

import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from golden import fixture_loader, load_ragpt_vilt
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from vilt_hashinit import checksum, hashed_ragpt_bank, hashed_ragpt_state  # noqa: E402

from mdpl.engine.losses import task_loss  # noqa: E402
from mdpl.engine.topk import exact_topk  # noqa: E402
from mdpl.models import build_classifier  # noqa: E402

CONFIGS = ("A", "B")
HEADS = ("mmimdb", "food101", "hatememes")
CASES = [pytest.param(c, h, id=f"{c}-{h}") for c in CONFIGS for h in HEADS]
PIXEL_LEVELS, PIXEL_BLOCK = 127, 8
CLS, SEP = 3, 4
IMAGE_TOKENS = 145
SCALE_TOL = 1e-5
"""Logits and gradients: elementwise atol = 1e-5 of the tensor's largest reference magnitude (the prototype logits
reach ~30; float32 summation orders differ by ~1e-6 of that scale), plus rtol 1e-4 for gradients."""
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0, msg: str = "") -> None:
    """assert_close with atol relative to the reference tensor's scale."""
    atol = SCALE_TOL * float(expected.abs().max()) + GRAD_ATOL
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)
GENERATORS = {"text": ["text"], "image": ["image"], "both": ["text", "image"]}

pytestmark = pytest.mark.usefixtures("one_thread")


fixture = fixture_loader("ref_ragpt_{}.pt", "python tools/parity/make_ragpt.py --refs REFS_DIR")


@lru_cache(maxsize=None)
def reference_state(config: str, head: str) -> dict[str, torch.Tensor]:
    """The reference state dict regenerated from the hash init, checked against the fixture's checksums."""
    rec = fixture(config)[head]
    state = hashed_ragpt_state({k: tuple(rec["shapes"][k]) for k in rec["keys"]})
    sums = torch.stack([checksum(state[k]) for k in rec["keys"]])
    assert torch.allclose(sums, rec["checksums"], rtol=1e-12, atol=0), "regenerated weights differ from the fixture's"
    return state


def mdpl_config(ref: dict[str, Any], head: str, retrieved: int) -> dict[str, Any]:
    """mdpl's flat config for the reference's ViltConfig and ragpt arguments."""
    return dict(dataset=head, backbone="vilt", prompt_method="ragpt", load_path="", test_only=False, finetune=False,
                hidden_size=ref["hidden_size"], num_layers=ref["num_hidden_layers"],
                num_heads=ref["num_attention_heads"], mlp_ratio=ref["intermediate_size"] / ref["hidden_size"],
                patch_size=ref["patch_size"], image_size=ref["image_size"], max_text_len=ref["max_text_len"],
                vocab_size=ref["vocab_size"], drop_rate=0.0, vilt_variant="hf", interpolate_text_positions=True,
                dynamic_text_padding=False, ragpt_k=ref["k"],
                ragpt_label_neighbours=ref["k"] if head == "hatememes" else retrieved,
                ragpt_prompt_pos=ref["prompt_pos"], ragpt_prompt_len=ref["prompt_len"],
                ragpt_generators=GENERATORS[ref["missing_type"]])


def mdpl_name(reference: str, head: str, experiment: str) -> str:
    """Reference key -> mdpl key (the 'text' / 'image' settings' single generator ``MMG`` is that modality's)."""
    first, _, rest = reference.partition(".")
    if first == "classifier":
        return f"{head}_classifier.mlp.{rest}"
    if first == "pooler":
        return f"backbone.{reference}"
    if first == "label_enhanced":
        return "prompt.label_embedding"
    if first == "dynamic_prompt":
        return f"prompt.prompter.{rest}"
    modality = {"MMG_t": "text", "MMG_i": "image", "MMG": experiment}[first]
    return f"prompt.generators.{modality}.{'weight' if rest == 'W' else rest}"


def build(config: str, head: str, **over):
    """mdpl's classifier with the reference weights (HF ViLT reader for the backbone, the rest by name)."""
    rec = fixture(config)[head]
    ref = rec["config"]
    cfg = {**mdpl_config(ref, head, int(fixture(config)["meta"]["retrieved"])), **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    state = reference_state(config, head)
    hf = load_ragpt_vilt(model, state)
    rest = {mdpl_name(k, head, ref["missing_type"]): v for k, v in state.items() if k not in hf
            and not k.startswith(("embedding_layer.", "encoder_layer."))}
    own = model.state_dict()
    assert set(rest) <= set(own), sorted(set(rest) - set(own))
    model.load_state_dict({**own, **rest}, strict=True)
    give_bank(model, config, head)
    return model.eval()


def mdpl_lists(config: str) -> dict[str, torch.Tensor]:
    """``<split>/<modality>`` -> neighbour ids by mdpl's exact top-k (training queries exclude themselves)."""
    out = {}
    k = int(fixture(config)["meta"]["retrieved"])
    for modality, rec in fixture(config)["retrieval"].items():
        memory = rec["train_vectors"]
        out[f"train/{modality}"] = exact_topk(memory, memory, k, exclude=torch.arange(memory.shape[0]))[0]
        out[f"test/{modality}"] = exact_topk(rec["test_vectors"], memory, k)[0]
    return out


def give_bank(model, config: str, head: str) -> None:
    """What ``load_prepared`` would give the method: the bank, the training labels, the neighbour lists."""
    meta, rec = fixture(config)["meta"], fixture(config)[head]
    memory, length = int(meta["memory"]), rec["config"]["max_text_len"]
    labels = rec["memory_labels"]
    if labels.dim() == 1:
        labels = F.one_hot(labels, model.prompt.label_embedding.shape[0])
    model.prompt.bank = {"text": hashed_ragpt_bank("text", (memory, length, 768)),
                         "image": hashed_ragpt_bank("image", (memory, IMAGE_TOKENS, 768)),
                         "labels": labels.float(), **mdpl_lists(config)}


def batch_of(config: str, head: str) -> dict:
    """The fixture's batch as mdpl's pipeline gives it: '' for a missing text, ones for a missing image."""
    rec = fixture(config)[head]
    b = dict(rec["batch"])
    image = b.pop("pixels").repeat_interleave(PIXEL_BLOCK, -1).repeat_interleave(PIXEL_BLOCK, -2).float()
    image = image / PIXEL_LEVELS
    types = b["missing_type"]
    image[types == 2] = 1.0
    ids, masks = b["text_ids"].clone(), b["text_masks"].clone()
    ids[types == 1], masks[types == 1] = 0, 0
    ids[types == 1, 0], ids[types == 1, 1] = CLS, SEP
    masks[types == 1, :2] = 1
    return {**b, "image": image, "text_ids": ids, "text_masks": masks, "split": rec["config"]["split"]}


@pytest.mark.parametrize("config", CONFIGS)
def test_exact_topk_gives_the_reference_neighbour_ids(config) -> None:
    """mdpl's exact top-k on the fixed memory = the reference retriever's lists (training queries without
    themselves, test queries with every training item)."""
    ours = mdpl_lists(config)
    for modality, rec in fixture(config)["retrieval"].items():
        for split in ("train", "test"):
            assert torch.equal(ours[f"{split}/{modality}"], rec[split]), (split, modality)
            assert ours[f"{split}/{modality}"].shape[1] == int(fixture(config)["meta"]["retrieved"])


@pytest.mark.parametrize("config,head", CASES)
def test_label_lists_match_reference(config, head) -> None:
    """The label vectors of the neighbours each row's label token averages (by missing type, RAGPT-D4)."""
    rec = fixture(config)[head]
    model = build(config, head)
    batch = batch_of(config, head)
    _, _, labels = model.prompt.gather(batch["missing_type"], batch)
    ref = rec["label_lists"]
    if ref.dim() == 2:
        ref = F.one_hot(ref, labels.shape[-1])
    assert torch.equal(labels, ref.float())


@pytest.mark.parametrize("config,head", CASES)
def test_logits_and_loss_match_reference(config, head) -> None:
    rec = fixture(config)[head]
    model = build(config, head)
    batch = batch_of(config, head)
    with torch.no_grad():
        out = model(batch)
    close(out["logits"], rec["logits"])
    torch.testing.assert_close(task_loss(head, out["logits"], batch["label"]), rec["loss"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("config,head", CASES)
def test_every_trainable_gradient_matches_reference(config, head) -> None:
    rec = fixture(config)[head]
    experiment = rec["config"]["missing_type"]
    model = build(config, head)
    batch = batch_of(config, head)
    task_loss(head, model(batch)["logits"], batch["label"]).backward()
    params = dict(model.named_parameters())
    names = {mdpl_name(n, head, experiment) for n in rec["trainable"]}
    assert {n for n, p in params.items() if p.requires_grad} == names
    assert set(rec["grads"]) == set(rec["trainable"])
    for name, ref in rec["grads"].items():
        grad = params[mdpl_name(name, head, experiment)].grad
        assert grad is not None, name
        if "full" in ref:
            close(grad, ref["full"], GRAD_RTOL, name)
        else:
            close(grad.reshape(-1)[ref["idx"]], ref["val"], GRAD_RTOL, name)
            torch.testing.assert_close(grad.double().norm(), ref["norm"], atol=0, rtol=GRAD_RTOL, msg=name)


def test_switches_change_outputs() -> None:
    """The text dummy's all-ones mask (RAGPT-D10) and the HF ViLT variant are live switches."""
    batch = batch_of("A", "mmimdb")
    with torch.no_grad():
        ref = build("A", "mmimdb")(batch)["logits"]
        unmasked = build("A", "mmimdb", ragpt_text_dummy_mask=False)(batch)["logits"]
        timm = build("A", "mmimdb", vilt_variant="map")(batch)["logits"]
    text_missing = batch["missing_type"] == 1
    assert (unmasked - ref)[text_missing].abs().max() > 1e-3
    torch.testing.assert_close(unmasked[~text_missing], ref[~text_missing], atol=1e-5, rtol=0)
    assert (timm - ref).abs().max() > 0
