"""Regenerate tests/fixtures/ref_aoept_prototypes_{A,B}.pt: AOEPT's prepared artefacts as its own code computes them.

    python tools/parity/make_aoept_prototypes.py --refs REFS_DIR [--out DIR]

**Collection.** The reference's plain CLIP model in its token-collection mode (``core/model/CLIP/CLIP_CLIP_model.py``
with ``statis: collect_token``, mean pooling) runs on the batch and backbone of ``make_aoept.py``'s config of the same
name (tiny CLIP, hashed weights) and records the pooled input of every block per tower, the missing modality zeroed;
its plain ViLT model (``core/model/ViLT/ViLT_ViLT_model.py``, the same mode) does the same on the batch and backbone of
``make_aoept_vilt.py``'s config (the missing modality also hidden as keys, AOEPT-D22); mdpl's preparation stage must
pool the same features.

**Clustering.** The reference turns the pooled block inputs of the training split ([samples, layers, width] per modality, all-zero
rows for a missing modality) into prototypes with its own functions ``filter_zero_tokens`` and ``cluster_per_layer``
(``core/model/AOEPT/preprocess/cluster_tokens.py``: scikit-learn ``KMeans`` per layer, k-means++ seeds, 10 restarts,
300 iterations, ``random_state`` 42). They are imported from the checkout at the pinned commit and run on fixed token
tensors here; mdpl's preparation stage must give the same prototypes (tests/test_parity_aoept_prototypes.py).

Needs transformers 4.x (AOEPT-D13) and scikit-learn, which this project does not install: run it with the scratch
interpreter of ``make_all.py --tf4-python``. scikit-learn runs on one thread, so a second run writes the same bytes.

The tokens are groups around well-separated random centres with unequal sizes and spreads (so the clustering has one
answer, which a k-means with other seeds must find too), per layer other groups; config B asks for more prototypes
than it has non-zero rows in one modality (the reference then keeps one prototype per row).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import torch

from common import (REFERENCES, detached, generator_main, import_path, ordered_patches, prepare_tf4_reference,
                    silenced_stdout)
import make_aoept
import make_aoept_vilt

CONFIGS: dict[str, dict[str, Any]] = {
    "A": dict(layers=3, prototypes=4, text=dict(width=16, groups=(9, 14, 5, 12), zero_rows=6),
              image=dict(width=24, groups=(10, 7, 13, 8), zero_rows=4), seed=0),
    "B": dict(layers=2, prototypes=6, text=dict(width=12, groups=(20, 3, 11, 6, 8, 15), zero_rows=9),
              image=dict(width=20, groups=(2, 1, 1, 1), zero_rows=11), seed=1),
}
"""Per modality: the width, the group sizes of every layer and how many all-zero rows (missing modality) are mixed
in. Group centres are N(0, 8²), points N(centre, s²) with s in [0.3, 1.2) per group."""
RANDOM_STATE = 42
"""The clustering script's default ``random_state`` (the run scripts do not change it)."""


def tokens(spec: dict[str, Any], layers: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, layers, width]: per layer, the groups' points in a random row order; the zero rows interleaved."""
    width, sizes = spec["width"], spec["groups"]
    n = sum(sizes)
    per_layer = []
    for _ in range(layers):
        centres = 8 * torch.randn(len(sizes), width, generator=generator)
        spread = 0.3 + 0.9 * torch.rand(len(sizes), generator=generator)
        points = torch.cat([centres[g] + spread[g] * torch.randn(size, width, generator=generator)
                            for g, size in enumerate(sizes)])
        per_layer.append(points[torch.randperm(n, generator=generator)])
    filled = torch.stack(per_layer, 1)
    out = torch.zeros(n + spec["zero_rows"], layers, width)
    zero = torch.randperm(n + spec["zero_rows"], generator=generator)[:spec["zero_rows"]]
    keep = torch.ones(out.shape[0], dtype=torch.bool)
    keep[zero] = False
    out[keep] = filled
    return out


def import_reference(refs: Path) -> types.ModuleType:
    """The reference's clustering module (scikit-learn checked first: one clear line otherwise)."""
    try:
        import sklearn  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise SystemExit("error: make_aoept_prototypes.py needs scikit-learn (the reference clusters with it): run "
                         "it with the scratch interpreter of make_all.py --tf4-python") from None
    threadpool_limits(1)                       # one summation order: the same bytes on every run
    path = prepare_tf4_reference(refs, "aoept", "make_aoept_prototypes.py", "AOEPT-D13")
    import_path(path / "core" / "model" / "AOEPT" / "preprocess")
    make_aoept.loguru_stand_in()
    import cluster_tokens
    return cluster_tokens


def collected(name: str) -> dict[str, torch.Tensor]:
    """Pooled block inputs [B, layers, width] per tower from the reference's collection pass on config `name` of
    make_aoept.py (its backbone and batch)."""
    from core.model.Base import base_model
    from core.model.CLIP.CLIP_CLIP_model import CLIP

    spec = make_aoept.CONFIGS[name]
    shapes = make_aoept.openai_shapes(spec["sizes"])
    openai = {k: make_aoept.hashed_tensor(k, shapes[k]) for k in sorted(shapes)}
    base_model.Base.get_pretrained_backbone = make_aoept.offline_backbone(spec, openai)
    torch.manual_seed(0)
    with silenced_stdout():                 # the reference prints its parameter counts
        model = CLIP(seq_len=make_aoept.CONTEXT, cls_num=spec["num_classes"],
                     embed_dim=spec["sizes"]["clip_embed_dim"], cfg={"statis": "collect_token"},
                     token_pooling="mean").eval()
    batch = make_aoept.make_batch(name, spec)
    ids, types_ = batch["text_ids"], batch["missing_type"]
    with torch.no_grad():
        model(input_ids=ids, pixel_values=batch["image"], attention_mask=(ids != 0).long(),
              missing_masks=torch.stack([types_ == 1, types_ == 2], dim=1), ids=[str(i) for i in range(len(ids))])
    return stacked(model.token_collector[0], "text_eos", "vision_cls")


def collected_vilt(name: str) -> dict[str, torch.Tensor]:
    """The same from the reference's ViLT collection pass on config `name` of make_aoept_vilt.py."""
    from core.model.Base import base_model
    from core.model.ViLT.ViLT_ViLT_model import ViLT

    spec, shapes = make_aoept_vilt.CONFIGS[name], make_aoept_vilt.vilt_shapes()
    state = {k: make_aoept_vilt.hashed_vilt_tensor(k, shapes[k]) for k in sorted(shapes)}
    base_model.Base.get_pretrained_backbone = make_aoept_vilt.offline_backbone(state)
    torch.manual_seed(0)
    with silenced_stdout():
        model = ViLT(seq_len=spec["seq_len"], embed_dim=make_aoept_vilt.VILT["hidden_size"],
                     cls_num=spec["num_classes"], cfg={"statis": "collect_token"}, token_pooling="mean").eval()
    batch = make_aoept_vilt.make_batch(name, spec)
    with torch.no_grad(), ordered_patches():
        model(**make_aoept_vilt.reference_inputs(batch), ids=[str(i) for i in range(len(batch["label"]))])
    return stacked(model.token_collector[0], "text_token", "vision_token")


def stacked(layers: dict[int, dict[str, list]], text: str, image: str) -> dict[str, torch.Tensor]:
    """A token collector's per-layer lists as {"text", "image"}: [B, layers, width]."""
    return {"text": torch.stack([torch.cat(layers[i][text]) for i in sorted(layers)], 1),
            "image": torch.stack([torch.cat(layers[i][image]) for i in sorted(layers)], 1)}


def make_fixture(module: types.ModuleType, name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    generator = torch.Generator().manual_seed(spec["seed"])
    record: dict[str, Any] = {"collected": collected(name), "collected_vilt": collected_vilt(name), "tokens": {},
                              "centres": {}}
    for modality, key in (("text", "text_token"), ("image", "vision_token")):
        x = tokens(spec[modality], spec["layers"], generator)
        kept, _ = module.filter_zero_tokens(x)
        record["tokens"][modality] = x
        record["centres"][modality] = module.cluster_per_layer(kept, spec["prototypes"], RANDOM_STATE,
                                                                modality=key)
    import sklearn
    record["meta"] = {"repository": REFERENCES["aoept"].repo, "commit": REFERENCES["aoept"].commit,
                      "function": "cluster_per_layer", "random_state": RANDOM_STATE,
                      "stack": {"torch": str(torch.__version__), "scikit-learn": str(sklearn.__version__)}}
    record["config"] = {"layers": spec["layers"], "prototypes": spec["prototypes"]}
    return detached(record)


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.splitlines()[0], "aoept_prototypes", CONFIGS, import_reference, make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
