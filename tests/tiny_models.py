"""Tiny random classifiers and one batch with mixed text lengths and all three missing types, shared by the model
tests (exact cuts, DCP ablations)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from mdpl.models import build_classifier

VILT = dict(hidden_size=32, num_layers=3, num_heads=4, image_size=64, patch_size=32, max_text_len=12, vocab_size=100,
            drop_rate=0.0)
CLIP = dict(clip_embed_dim=32, image_size=32, clip_patch_size=16, clip_vision_width=48, clip_vision_layers=3,
            clip_vision_head_width=24, clip_vocab_size=1000, clip_text_width=32, clip_text_heads=2, clip_text_layers=3)
TYPES = torch.tensor([0, 1, 2, 0, 2, 1])


def tiny_model(method: str, backbone: str, seed: int = 0, **over) -> nn.Module:
    """A tiny random classifier on synthetic Food-101 (101 classes), the method at its `tiny` sizes."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_classifier({**(VILT if backbone == "vilt" else CLIP), "dataset": "food101", "backbone": backbone,
                                 "prompt_method": method, "method_sizes": "tiny", **over})


def tiny_batch(backbone: str) -> dict:
    """Six samples, texts of different lengths (ViLT: 12 ids at most; CLIP: 77), missing types 0 1 2 0 2 1."""
    g = torch.Generator().manual_seed(1)
    b = len(TYPES)
    if backbone == "vilt":
        ids = torch.randint(1, 100, (b, 12), generator=g)
        masks = torch.ones(b, 12, dtype=torch.long)
        for i, n in enumerate((12, 3, 7, 1, 9, 5)):
            ids[i, n:], masks[i, n:] = 0, 0
        return {"text_ids": ids, "text_masks": masks, "image": torch.randn(b, 3, 64, 64, generator=g),
                "missing_type": TYPES, "label": torch.randint(0, 101, (b,), generator=g)}
    ids = torch.zeros(b, 77, dtype=torch.long)
    for i, n in enumerate((70, 3, 20, 1, 40, 9)):
        ids[i, 0], ids[i, 1:n + 1], ids[i, n + 1] = 998, torch.randint(1, 900, (n,), generator=g), 999
    return {"text_ids": ids, "image": torch.randn(b, 3, 32, 32, generator=g), "missing_type": TYPES,
            "label": torch.randint(0, 101, (b,), generator=g)}
