"""Regenerate tests/fixtures/ref_aoept_{A,B}.pt from the AOEPT reference code (tests/fixtures/README.md, "AOEPT").

    python tools/parity/make_aoept.py --refs REFS_DIR [--out DIR]

Needs transformers 4.x (the reference's CLIP loop indexes the tuple a 4.x ``CLIPEncoderLayer`` returns, AOEPT-D13 in
docs/methods.md): run it with an interpreter that has transformers 4.57.1 and this project's other packages
(``make_all.py --tf4-python``). REFS_DIR holds the checkout ``AOEPT`` at the pinned commit (tools/parity/common.py).
Only the reference's model modules are imported (never its trainer: wandb, hydra); run-time shims only: a silent
``loguru`` stand-in when it is not installed, and ``Base.get_pretrained_backbone`` builds a Hugging Face CLIP at the
tiny sizes below (eager attention) with the weights of ``tests/dcp_hashinit.py`` instead of downloading ViT-B/16,
then calls the reference's own position-table resize.

Prototypes: a small random "cluster" file (the reference's [layers, K, D] layout) is what the reference loads; mdpl
receives the same tensors (the clustering itself is tested on its own, tests/test_aoept.py). Config A: the reference's
text read-out (``eos_token_id`` 2, one row holding id 2, AOEPT-D1 ``reference``), Food-101 head; config B: a real EOT id
(the largest, AOEPT-D1 ``eot``), MM-IMDb's multi-label head, other sizes. Every trainable tensor is perturbed from
generators seeded by crc32(name) (gates well away from 0.5, logits above rounding) and stored with the memory.

Stored, in eval mode on CPU in float32 (one thread): the proxy prompts, logits, the auxiliary loss, the total loss
(task + α·aux) and the gradient of every trainable tensor. A second run writes the same bytes.
"""
from __future__ import annotations

import sys
import tempfile
import types
import zlib
from pathlib import Path
from typing import Any

import torch

from common import (REFERENCES, classification_loss, detached, generator_main, prepare_tf4_reference)
from make_mora import CONTEXT, hf_config, hf_state, loguru_stand_in, openai_shapes

from dcp_hashinit import checksum, hashed_tensor  # noqa: E402  (tests/ is on sys.path through make_mora)

SOT, EOT = 998, 999
CONFIGS: dict[str, dict[str, Any]] = {
    "A": dict(sizes=dict(clip_embed_dim=32, image_size=32, clip_patch_size=16, clip_vision_width=48,
                         clip_vision_layers=3, clip_vision_head_width=24, clip_vocab_size=1000, clip_text_width=32,
                         clip_text_heads=2, clip_text_layers=3),
              method=dict(aoept_length=3, aoept_shared_length=3, aoept_depth=2, aoept_reduction=4, aoept_heads=8,
                          aoept_prototypes=5, aoept_consistency_loss_weight=0.05, aoept_text_pool="reference"),
              eos=2, dataset="food101", num_classes=101,
              rows=[(0, 12), (1, 0), (2, 30), (0, 75), (2, 4), (1, 7)], with_id_2=(0, 2)),
    "B": dict(sizes=dict(clip_embed_dim=40, image_size=32, clip_patch_size=8, clip_vision_width=32,
                         clip_vision_layers=3, clip_vision_head_width=8, clip_vocab_size=1000, clip_text_width=40,
                         clip_text_heads=4, clip_text_layers=3),
              method=dict(aoept_length=2, aoept_shared_length=4, aoept_depth=2, aoept_reduction=4, aoept_heads=4,
                          aoept_prototypes=6, aoept_consistency_loss_weight=0.2, aoept_text_pool="eot"),
              eos=EOT, dataset="mmimdb", num_classes=23,
              rows=[(2, 20), (0, 5), (1, 0), (0, 75), (2, 1), (0, 9)], with_id_2=()),
}
"""(missing type, real tokens between SOT and EOT) per row; 75 fills all 77 positions. ``with_id_2``: rows whose text
holds the id 2 (where config A's reference reads the text feature). The text projection is square (embed = text
width, AOEPT-D14)."""


# ------------------------------------------------------------------------------------------- reference
def import_reference(refs: Path) -> types.ModuleType:
    """The reference's ``core.model.AOEPT.AOEPT_CLIP_model`` (transformers 4.x checked first)."""
    prepare_tf4_reference(refs, "aoept", "make_aoept.py", "AOEPT-D13")
    loguru_stand_in()
    import core.model.AOEPT.AOEPT_CLIP_model as model_module
    return model_module


def offline_backbone(spec: dict[str, Any], openai: dict[str, torch.Tensor]):
    """A stand-in for ``Base.get_pretrained_backbone``: the tiny Hugging Face CLIP with the hashed weights, frozen,
    eager attention, the text positions resized by the reference's own method when the length differs."""
    from transformers import CLIPModel

    def get_pretrained_backbone(self, model: str, model_id: str | None = None, seq_len: int | None = None):
        config = hf_config(spec["sizes"])
        config.text_config.eos_token_id = spec["eos"]
        config._attn_implementation = "eager"
        config.text_config._attn_implementation = config.vision_config._attn_implementation = "eager"
        backbone = CLIPModel(config)
        missing, unexpected = backbone.load_state_dict(hf_state(openai), strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
        backbone.requires_grad_(False)
        if seq_len is not None and seq_len != backbone.text_model.config.max_position_embeddings:
            self._resize_clip_position_embeddings(backbone, seq_len)
        return backbone

    return get_pretrained_backbone


def cluster_file(spec: dict[str, Any], folder: Path) -> Path:
    """A reference-layout prototype file [layers, K, D] per tower (the path names "cluster", as the loader wants)."""
    m, s = spec["method"], spec["sizes"]
    g = torch.Generator().manual_seed(zlib.crc32(b"prototypes"))
    layers = s["clip_text_layers"]
    data = {"text_token": torch.randn(layers, m["aoept_prototypes"], s["clip_text_width"], generator=g),
            "vision_token": torch.randn(layers, m["aoept_prototypes"], s["clip_vision_width"], generator=g)}
    path = folder / "collect_token_cluster_tiny.pt"
    torch.save(data, path)
    return path


def build_reference(module: types.ModuleType, spec: dict[str, Any], openai: dict[str, torch.Tensor],
                    folder: Path) -> torch.nn.Module:
    m = spec["method"]
    from core.model.Base import base_model
    base_model.Base.get_pretrained_backbone = offline_backbone(spec, openai)
    torch.manual_seed(0)
    model = module.AOEPT(cls_num=spec["num_classes"], init_from_token=str(cluster_file(spec, folder)),
                         prompt_strategy="attention", L=m["aoept_length"], L_shared=m["aoept_shared_length"],
                         seq_len=CONTEXT, prompt_depth=m["aoept_depth"], attn_num_heads=m["aoept_heads"],
                         reduction_ratio=m["aoept_reduction"], loss_alpha=m["aoept_consistency_loss_weight"])
    return model.eval()


def perturb_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor plus noise from a generator seeded by crc32(name): gate last layers and the head
    N(0, 0.5²) / N(0, 0.3²) (gates spread over (0, 1), logits above rounding), the rest + N(0, 0.05²) (LNs off 1/0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad or name == "logit_scale":
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g)
            if name.startswith("classifier."):
                p.copy_(0.3 * noise)
            elif "gate_net.2" in name:
                p.copy_(0.5 * noise)
            else:
                p.add_(0.05 * noise)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------- batch
def make_batch(name: str, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mdpl's batch: ``text_ids`` [B, 77] (SOT, tokens, EOT, zeros; the id 2 in the rows ``with_id_2``), ``image``,
    ``missing_type`` (every type, at least two rows with each modality) and ``label``."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rows, size, c = spec["rows"], spec["sizes"]["image_size"], spec["num_classes"]
    ids = torch.zeros(len(rows), CONTEXT, dtype=torch.long)
    image = torch.randn(len(rows), 3, size, size, generator=g)
    for i, (missing, real) in enumerate(rows):
        ids[i, 0], ids[i, 1:real + 1], ids[i, real + 1] = SOT, torch.randint(3, SOT, (real,), generator=g), EOT
        if i in spec["with_id_2"]:
            ids[i, 1 + real // 2] = 2
        if missing == 2:
            image[i] = -1.5
    if spec["dataset"] == "mmimdb":
        label = (torch.rand(len(rows), c, generator=g) < 0.3).float()
    else:
        label = torch.randint(0, c, (len(rows),), generator=g)
    return {"text_ids": ids, "image": image, "missing_type": torch.tensor([m for m, _ in rows]), "label": label}


def make_fixture(module: types.ModuleType, name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    shapes = openai_shapes(spec["sizes"])
    keys = sorted(shapes)
    openai = {k: hashed_tensor(k, shapes[k]) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_reference(module, spec, openai, Path(tmp))
    initial = perturb_trainable(model)
    batch = make_batch(name, spec)
    ids, types_ = batch["text_ids"], batch["missing_type"]
    missing_masks = torch.stack([types_ == 1, types_ == 2], dim=1)
    out = model(input_ids=ids, pixel_values=batch["image"], attention_mask=(ids != 0).long(),
                missing_masks=missing_masks)
    task = classification_loss(spec["dataset"], out["logits"], batch["label"])
    total, _ = model.cal_loss(out["logits"], out["probs"], aux_loss=out["aux_loss"], label=batch["label"])
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        proxies = dict(zip(("text", "image", "shared_text", "shared_image"),
                           (t[:, 0] for t in model._get_proxy_prompts(1))))
    import transformers
    return detached({
        "meta": {"repository": REFERENCES["aoept"].repo, "commit": REFERENCES["aoept"].commit,
                 "class": "AOEPT (CLIP)",
                 "stack": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}},
        "config": {"dataset": spec["dataset"], "backbone": "clip", **spec["sizes"], **spec["method"]},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(openai[k]) for k in keys]),
        "batch": batch, "trainable": initial,
        **reference_outputs(model, out, proxies, task, total, grads)})


def reference_outputs(model: torch.nn.Module, out: dict, proxies: dict, task: torch.Tensor, total: torch.Tensor,
                      grads: dict) -> dict[str, Any]:
    """What every AOEPT fixture records of the reference's run: its memory, proxies, logits, losses and gradients."""
    return {"memory": {"text": model.text_init_tokens.detach().clone(),
                       "image": model.vision_init_tokens.detach().clone()},
            "proxies": proxies, "logits": out["logits"], "aux_loss": out["aux_loss"], "task_loss": task,
            "loss": total, "grads": grads}


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.splitlines()[0], "aoept", CONFIGS, import_reference, make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
