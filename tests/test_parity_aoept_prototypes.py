"""AOEPT's prepared artefacts against its reference code (tests/fixtures/README.md, "AOEPT prototypes").

Fixtures ``ref_aoept_prototypes_{A,B}.pt`` (tools/parity/make_aoept_prototypes.py) hold
* ``collected``: the pooled input of every block per tower from the reference's token-collection pass, on the backbone
  and batch of ``ref_aoept_{A,B}.pt`` (all three missing types; the missing modality zeroed); ``collected_vilt``: the
  same from its ViLT collection pass on those of ``ref_aoept_vilt_{A,B}.pt`` (the missing modality also hidden as keys,
  but for a missing text's [CLS]: AOEPT-D22);
* ``tokens`` / ``centres``: token tensors in the collection file's layout ([rows, layers, width], all-zero rows for
  samples without the modality) and the prototypes the reference's ``cluster_per_layer`` (scikit-learn k-means, seed 42,
  10 restarts) made of them after its ``filter_zero_tokens``.

mdpl's preparation stage pools the same features (``pooled_batch`` with AOEPT's feature requests) and, with AOEPT's
k-means request, finds the same prototypes: the same partition of every layer's rows and centres equal to float32
rounding. The prototypes' order differs (the seeding differs, docs/methods.md §18.2) and is immaterial: the memory is
attended as keys and values, a permutation-invariant read.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from golden import fixture_loader  # noqa: E402
from test_parity_aoept import build  # noqa: E402
from test_parity_aoept_vilt import batch_of, build as build_vilt, fixture as vilt_fixture  # noqa: E402

from mdpl.engine.kmeans import assign  # noqa: E402
from mdpl.engine.preparation import Collector, compute, pooled_batch  # noqa: E402
from mdpl.prompts.preparation import PreparationNeed  # noqa: E402

CONFIGS = ("A", "B")
FEATURE_ATOL = 1e-5
CENTRE_RTOL = 1e-6          # of the largest centre entry (sklearn and mdpl sum the cluster means in other orders)

pytestmark = pytest.mark.usefixtures("one_thread")

fixture = fixture_loader("ref_aoept_prototypes_{}.pt",
                         "make it with tools/parity/make_aoept_prototypes.py under the transformers-4.x environment")
model_fixture = fixture_loader("ref_aoept_{}.pt", "make it with tools/parity/make_aoept.py under transformers 4.x")


def aoept_need(config: str, layers: int | None = None, k: int | None = None, model=None) -> PreparationNeed:
    """AOEPT's own preparation need for the fixture's (or the given) model, with every block input or another k when
    asked."""
    need = (model or build(config)).prompt.preparation_needs()
    features = tuple(dataclasses.replace(f, layers=tuple(range(layers))) for f in need.features) if layers else \
        need.features
    kmeans = tuple(dataclasses.replace(r, k=k) for r in need.kmeans) if k else need.kmeans
    return dataclasses.replace(need, features=features, kmeans=kmeans)


@pytest.mark.parametrize("config", CONFIGS)
def test_collection_pass_pools_the_reference_features(config) -> None:
    rec, model_rec = fixture(config), model_fixture(config)
    model = build(config)
    layers = rec["collected"]["text"].shape[1]
    with torch.no_grad():
        ours = pooled_batch(model.backbone, Collector(aoept_need(config, layers), model.backbone.info),
                            model_rec["batch"])
    missing = model_rec["batch"]["missing_type"]
    for modality, code in (("text", 1), ("image", 2)):
        ref = rec["collected"][modality]
        assert ours[modality].shape == ref.shape
        assert bool((ref[missing == code] == 0).all()) and bool((ref[missing != code].abs().sum(-1) > 0).all())
        torch.testing.assert_close(ours[modality], ref, atol=FEATURE_ATOL, rtol=0, msg=modality)


def vilt_features(config: str, collection_mask: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """mdpl's pooled ViLT features for ``ref_aoept_vilt_<config>``'s batch (AOEPT's need, every block) and the batch's
    missing types."""
    rec = vilt_fixture(config)
    model = build_vilt(config, aoept_vilt_collection_mask=collection_mask)
    need = aoept_need(config, model=model)
    with torch.no_grad():
        return pooled_batch(model.backbone, Collector(need, model.backbone.info), batch_of(rec)), \
            rec["batch"]["missing_type"]


@pytest.mark.parametrize("config", CONFIGS)
def test_vilt_collection_pass_pools_the_reference_features(config) -> None:
    """AOEPT-D22 ``reference``: the missing text's [CLS] stays a key, as in the reference's ViLT collection pass."""
    ref = fixture(config)["collected_vilt"]
    ours, missing = vilt_features(config, "reference")
    for modality, code in (("text", 1), ("image", 2)):
        assert ours[modality].shape == ref[modality].shape
        assert bool((ref[modality][missing == code] == 0).all())
        torch.testing.assert_close(ours[modality], ref[modality], atol=FEATURE_ATOL, rtol=0, msg=modality)


def test_vilt_default_collection_hides_the_whole_missing_text() -> None:
    """mdpl's default (``segment``) differs from the reference only in the image features of text-missing rows after
    block 0."""
    ref = fixture("A")["collected_vilt"]
    ours, missing = vilt_features("A", "segment")
    text_missing = missing == 1
    torch.testing.assert_close(ours["text"], ref["text"], atol=FEATURE_ATOL, rtol=0)
    torch.testing.assert_close(ours["image"][~text_missing], ref["image"][~text_missing], atol=FEATURE_ATOL, rtol=0)
    # block input 0 (the embeddings) is the same; from block 1 on the [CLS] key has acted
    assert (ours["image"][text_missing, 1:] - ref["image"][text_missing, 1:]).abs().amax(-1).min() > 1e-3


def matched(ref: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """The order of `ours` [k, D] that lines it up with `ref` [k, D] (nearest centre; asserted one-to-one)."""
    order = torch.cdist(ref, ours).argmin(1)
    assert sorted(order.tolist()) == list(range(len(ref))), "the prototypes are not one-to-one"
    return order


@pytest.mark.parametrize("config", CONFIGS)
def test_kmeans_gives_the_reference_prototypes(config) -> None:
    rec = fixture(config)
    k = rec["config"]["prototypes"]
    need = aoept_need("A", k=k)
    assert [(r.iters, r.n_init, r.seed, r.tol, r.drop_zero_rows) for r in need.kmeans] == [(300, 10, 42, 1e-4, True)] * 2
    centres, _ = compute(need, rec["tokens"], torch.device("cpu"))
    for modality in ("text", "image"):
        ref, ours, x = rec["centres"][modality], centres[modality], rec["tokens"][modality]
        x = x[x.flatten(1).abs().sum(1) > 0].transpose(0, 1)
        assert ours.shape == ref.shape == (rec["config"]["layers"], min(k, x.shape[1]), x.shape[2])
        for layer in range(ref.shape[0]):
            order = matched(ref[layer], ours[layer])
            scale = ref[layer].abs().max()
            assert (ours[layer][order] - ref[layer]).abs().max() <= CENTRE_RTOL * scale, (modality, layer)
            ref_labels, _ = assign(x[layer:layer + 1], ref[layer:layer + 1])
            our_labels, _ = assign(x[layer:layer + 1], ours[layer][order].unsqueeze(0))
            assert torch.equal(ref_labels, our_labels), (modality, layer)


def test_more_prototypes_than_rows_keeps_one_per_row() -> None:
    """Config B's image rows are fewer than K: both sides keep k' = rows prototypes, the rows themselves."""
    rec = fixture("B")
    x = rec["tokens"]["image"]
    rows = x[x.flatten(1).abs().sum(1) > 0]
    assert rows.shape[0] < rec["config"]["prototypes"]
    centres, _ = compute(aoept_need("A", k=rec["config"]["prototypes"]), rec["tokens"], torch.device("cpu"))
    for layer in range(rows.shape[1]):
        for side in (rec["centres"]["image"][layer], centres["image"][layer]):
            torch.testing.assert_close(side[matched(rows[:, layer], side)], rows[:, layer], rtol=0,
                                       atol=CENTRE_RTOL * rows[:, layer].abs().max().item())
