"""Streams in lock-step (``PromptMethod.lock_step_order``, docs/architecture.md "The method interface").

A method may ask the classifier to advance a two-tower backbone's streams block by block in one loop (AOEPT gates a
tower's prompts with the other tower's previous block). For every registered method whose hooks do not read across
streams, that loop must give the same logits, features and auxiliary losses as encoding the streams one after the
other, in either order; and the hooks must really interleave.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from mdpl.errors import UserInputError
from mdpl.models import build_classifier
from mdpl.prompts.registry import available_methods, method_class

BACKBONES = ("clip", "coca")
LOCK_STEP_METHODS = ("aoept",)   # methods that need lock-step (their hooks read the other stream)


def resolve(*named: str, **updates) -> dict:
    from config import ex
    return dict(ex.run("print_config", named_configs=list(named), config_updates=updates).config)


@pytest.fixture(scope="module")
def tiny() -> dict:
    return resolve("tiny", dataset="food101")


def build(tiny: dict, method: str, backbone: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_classifier({**tiny, "prompt_method": method, "backbone": backbone})


def batch_for(model, size: int) -> dict:
    """Six rows, all three missing types, texts of different lengths (ids as the backbone's tokenizer lays them)."""
    g = torch.Generator().manual_seed(3)
    length = model.backbone.encoders()["text"].context_length
    ids = torch.zeros(6, length, dtype=torch.long)
    for i, n in enumerate((1, 3, 5, 2, length - 2, 4)):
        ids[i, 0], ids[i, 1:n + 1], ids[i, n + 1] = 998, torch.randint(1, 900, (n,), generator=g), 999
    return {"text_ids": ids, "image": torch.randn(6, 3, size, size, generator=g),
            "missing_type": torch.tensor([0, 1, 2, 0, 2, 1]), "missing_type_host": (0, 1, 2, 0, 2, 1)}


def outputs(model, batch: dict, order) -> dict:
    model.prompt.lock_step_order = lambda info: order
    torch.manual_seed(5)
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", [m for m in available_methods() if m not in LOCK_STEP_METHODS])
def test_lock_step_gives_the_sequential_logits(tiny, method, backbone) -> None:
    try:
        model = build(tiny, method, backbone).eval()
    except UserInputError as err:                 # a method that refuses this backbone: in one line naming its streams
        assert "\n" not in str(err) and "streams" in str(err), str(err)
        return
    assert method_class(method).lock_step_order(model.prompt, model.backbone.info) is None
    batch = batch_for(model, tiny["image_size"])
    with torch.no_grad():
        for p in model.prompt.parameters():       # away from symmetric inits
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sequential = outputs(model, batch, None)
    for order in (("text", "image"), ("image", "text")):
        stepped = outputs(model, batch, order)
        torch.testing.assert_close(stepped["logits"], sequential["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stepped["pooled"], sequential["pooled"], rtol=1e-5, atol=1e-6)
        if "aux_loss" in sequential:
            torch.testing.assert_close(stepped["aux_loss"], sequential["aux_loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lock_step_interleaves_blocks_in_the_given_order(tiny, backbone) -> None:
    model = build(tiny, "none", backbone).eval()
    seen: list[tuple[str, int, str]] = []
    model.prompt.before_block = lambda s, i, x, m, l, c: (seen.append((s.name, i, "before")), (x, m, l))[1]
    model.prompt.after_block = lambda s, i, x, m, l, c: seen.append((s.name, i, "after"))
    outputs(model, batch_for(model, tiny["image_size"]), ("text", "image"))
    depth = model.backbone.info.num_layers
    embeddings = [("text", -1, "after"), ("image", -1, "after")]   # every stream's embeddings before any block
    blocks = [(s, i, w) for i in range(depth) for s in ("text", "image") for w in ("before", "after")]
    assert seen == embeddings + blocks
    seen.clear()
    outputs(model, batch_for(model, tiny["image_size"]), None)    # sequential: one stream's blocks, then the other's
    assert [s for s, _, _ in seen] == ["image"] * (2 * depth + 1) + ["text"] * (2 * depth + 1)
