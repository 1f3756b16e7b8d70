"""Regenerate tests/fixtures/ref_aoept_vilt_{A,B}.pt from the AOEPT reference's ViLT model (tests/fixtures/README.md,
"AOEPT on ViLT").

    python tools/parity/make_aoept_vilt.py --refs REFS_DIR [--out DIR]

Needs transformers 4.x (the reference's ViLT loop indexes the tuple a 4.x ``ViltLayer`` returns; AOEPT-D13 in
docs/methods.md): run it with an interpreter that has transformers 4.57.1 and this project's other packages
(``make_all.py --tf4-python``). REFS_DIR holds the checkout ``AOEPT`` at the pinned commit (tools/parity/common.py).
Only the reference's model modules are imported (``core.model.AOEPT.AOEPT_ViLT_model``), with the shims of
make_aoept.py: a silent ``loguru`` stand-in when it is not installed, and ``Base.get_pretrained_backbone`` builds a tiny
Hugging Face ``ViltModel`` (eager attention, no dropout) whose every tensor is ``tests/vilt_hashinit.py``'s hash of its
key, then calls the reference's own text-position resize when the text length differs (config B: 8 -> 12 positions,
AOEPT-D9). The visual embedding draws its patch order with ``torch.multinomial``: made the identity order here (valid
patches row-major, then the first padding patches, all equal), mdpl's order.

Prototypes: a small random "cluster" file in the reference's [layers, K, D] layout, which the reference loader reads
as [samples, layers, D] (AOEPT-D2); the file's tensors are stored, and mdpl loads the same tensors through its own
preparation hook under ``aoept_vilt_memory_layout=reference``. Config A: Hateful Memes' two-class head
(cross-entropy), L = Ls = 3; config B: MM-IMDb's multi-label head, L = 2, Ls = 4, the resized text positions. Both:
6 rows with every missing type (the reference's dummies: ``''`` text, an all-ones image), padded texts and one image
per config with a padded patch grid (AOEPT-D8: its filler patches enter the image mean). Every trainable tensor is
perturbed as in make_aoept.py.

Stored, in eval mode on CPU in float32 (one thread): the proxy prompts, the memory, logits, the auxiliary loss, the
task and total loss and the gradient of every trainable tensor. A second run writes the same bytes.
"""
from __future__ import annotations

import sys
import tempfile
import types
import zlib
from pathlib import Path
from typing import Any

import torch

from common import (PIXEL_LEVELS, REFERENCES, classification_loss, detached, generator_main, ordered_patches,
                    prepare_tf4_reference)
from make_aoept import perturb_trainable, reference_outputs
from make_mora import loguru_stand_in

from vilt_hashinit import checksum, hashed_vilt_tensor  # noqa: E402  (tests/ is on sys.path through generator_main)

CLS, SEP = 3, 4
VILT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=8, image_size=48, patch_size=16, max_image_length=-1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0)
CONFIGS: dict[str, dict[str, Any]] = {
    "A": dict(seq_len=8, dataset="hatememes", num_classes=2,
              method=dict(aoept_length=3, aoept_shared_length=3, aoept_depth=2, aoept_reduction=4, aoept_heads=4,
                          aoept_prototypes=5, aoept_consistency_loss_weight=0.05),
              rows=[(0, 5, 48, 48), (1, 2, 48, 48), (2, 8, 48, 48), (0, 3, 32, 48), (2, 6, 48, 48), (1, 2, 48, 32)]),
    "B": dict(seq_len=12, dataset="mmimdb", num_classes=23,
              method=dict(aoept_length=2, aoept_shared_length=4, aoept_depth=2, aoept_reduction=8, aoept_heads=4,
                          aoept_prototypes=4, aoept_consistency_loss_weight=0.2),
              rows=[(2, 12, 48, 48), (0, 7, 48, 32), (1, 2, 48, 48), (0, 4, 48, 48), (2, 3, 48, 48), (0, 10, 32, 32)]),
}
"""(missing type, real text tokens incl. [CLS]/[SEP], valid image height, width) per row; a text-missing row holds
the dummy ``''`` ([CLS][SEP]), an image-missing row the all-ones dummy over the whole image."""


# ------------------------------------------------------------------------------------------- reference
def import_reference(refs: Path) -> types.ModuleType:
    """The reference's ``core.model.AOEPT.AOEPT_ViLT_model`` (transformers 4.x checked first)."""
    prepare_tf4_reference(refs, "aoept", "make_aoept_vilt.py", "AOEPT-D13")
    loguru_stand_in()
    import core.model.AOEPT.AOEPT_ViLT_model as model_module
    return model_module


def vilt_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every floating tensor of the tiny Hugging Face ``ViltModel``."""
    from transformers import ViltConfig, ViltModel
    model = ViltModel(ViltConfig(**VILT))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def offline_backbone(state: dict[str, torch.Tensor]):
    """A stand-in for ``Base.get_pretrained_backbone``: the tiny ``ViltModel`` with the hashed weights, frozen, eager
    attention, the text positions resized by the reference's own method when the length differs."""
    from transformers import ViltConfig, ViltModel

    def get_pretrained_backbone(self, model: str, model_id: str | None = None, seq_len: int | None = None):
        config = ViltConfig(**VILT)
        config._attn_implementation = "eager"
        backbone = ViltModel(config)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        assert not unexpected and all(not backbone.state_dict()[k].is_floating_point() for k in missing), missing
        backbone.requires_grad_(False)
        if seq_len is not None and seq_len != backbone.config.max_position_embeddings:
            self._resize_vilt_position_embeddings(backbone, seq_len)
        return backbone

    return get_pretrained_backbone


def cluster_data(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Reference-layout prototypes [layers, K, D] per modality (what its clustering script writes)."""
    g = torch.Generator().manual_seed(zlib.crc32(b"vilt-prototypes"))
    shape = (VILT["num_hidden_layers"], spec["method"]["aoept_prototypes"], VILT["hidden_size"])
    return {"text_token": torch.randn(shape, generator=g), "vision_token": torch.randn(shape, generator=g)}


def build_reference(module: types.ModuleType, spec: dict[str, Any], state: dict[str, torch.Tensor],
                    centres: dict[str, torch.Tensor], folder: Path) -> torch.nn.Module:
    m = spec["method"]
    from core.model.Base import base_model
    base_model.Base.get_pretrained_backbone = offline_backbone(state)
    path = folder / "collect_token_cluster_tiny.pt"         # the loader's "cluster" branch (AOEPT-D2)
    torch.save(centres, path)
    torch.manual_seed(0)
    model = module.AOEPT(cls_num=spec["num_classes"], init_from_token=str(path), prompt_strategy="attention",
                         L=m["aoept_length"], L_shared=m["aoept_shared_length"], seq_len=spec["seq_len"],
                         prompt_depth=m["aoept_depth"], attn_num_heads=m["aoept_heads"],
                         reduction_ratio=m["aoept_reduction"], loss_alpha=m["aoept_consistency_loss_weight"])
    return model.eval()


# ------------------------------------------------------------------------------------------- batch
def make_batch(name: str, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mdpl's batch: ``text_ids`` / ``text_masks`` [B, seq_len], ``pixels`` (int8 levels, image = pixels / 127, zero
    outside the valid area), ``image_sizes``, ``missing_type`` and ``label``."""
    g = torch.Generator().manual_seed(zlib.crc32(f"aoept-vilt-{name}".encode()))
    rows, length, size, c = spec["rows"], spec["seq_len"], VILT["image_size"], spec["num_classes"]
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    masks = torch.zeros(len(rows), length, dtype=torch.long)
    pixels = torch.zeros(len(rows), 3, size, size, dtype=torch.int8)
    for i, (missing, real, h, w) in enumerate(rows):
        ids[i, :real] = torch.randint(5, VILT["vocab_size"], (real,), generator=g)
        ids[i, 0], ids[i, real - 1] = CLS, SEP
        masks[i, :real] = 1
        if missing == 2:
            pixels[i] = PIXEL_LEVELS
        else:
            pixels[i, :, :h, :w] = torch.randint(-PIXEL_LEVELS, PIXEL_LEVELS + 1, (3, h, w), generator=g)
    if spec["dataset"] == "mmimdb":
        label = (torch.rand(len(rows), c, generator=g) < 0.3).float()
    else:
        label = torch.randint(0, c, (len(rows),), generator=g)
    return {"text_ids": ids, "text_masks": masks, "pixels": pixels,
            "image_sizes": torch.tensor([[h, w] for _, _, h, w in rows]),
            "missing_type": torch.tensor([r[0] for r in rows]), "label": label}


def reference_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's model inputs: pixel values and mask, the [B, 2] (text, image) missing flags."""
    size = batch["pixels"].shape[-1]
    pixel_mask = torch.zeros(len(batch["image_sizes"]), size, size, dtype=torch.long)
    for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
        pixel_mask[i, :h, :w] = 1
    types_ = batch["missing_type"]
    return {"input_ids": batch["text_ids"], "attention_mask": batch["text_masks"],
            "pixel_values": batch["pixels"].float() / PIXEL_LEVELS, "pixel_mask": pixel_mask,
            "missing_masks": torch.stack([types_ == 1, types_ == 2], dim=1)}


def make_fixture(module: types.ModuleType, name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    shapes = vilt_shapes()
    keys = sorted(shapes)
    state = {k: hashed_vilt_tensor(k, shapes[k]) for k in keys}
    centres = cluster_data(spec)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_reference(module, spec, state, centres, Path(tmp))
    initial = perturb_trainable(model)
    batch = make_batch(name, spec)
    with ordered_patches():
        out = model(**reference_inputs(batch))
    task = classification_loss(spec["dataset"], out["logits"], batch["label"])
    total, _ = model.cal_loss(out["logits"], out["probs"], aux_loss=out["aux_loss"], label=batch["label"])
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        proxies = dict(zip(("text", "image", "shared"), (t[:, 0] for t in model._get_proxy_prompts(1))))
    import transformers
    return detached({
        "meta": {"repository": REFERENCES["aoept"].repo, "commit": REFERENCES["aoept"].commit,
                 "class": "AOEPT (ViLT)",
                 "stack": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}},
        "config": {"dataset": spec["dataset"], "backbone": "vilt", "seq_len": spec["seq_len"], **VILT,
                   **spec["method"]},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(state[k]) for k in keys]),
        "batch": batch, "trainable": initial, "centres": {"text": centres["text_token"], "image": centres["vision_token"]},
        **reference_outputs(model, out, proxies, task, total, grads)})


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.splitlines()[0], "aoept_vilt", CONFIGS, import_reference, make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
