"""ViLT 'pixelbert' and CLIP image transforms (docs/methods.md §1.5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mdpl.data.transforms import (CLIP_MEAN, CLIP_STD, build_transform, clip_transform, minmax_size,
                                  pixelbert_transform)
from runs import typed


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.mark.parametrize("size,expected", [
    ((500, 375), (512, 384)),      # landscape 4:3: shorter -> 384, longer 512
    ((375, 500), (384, 512)),      # portrait
    ((1000, 200), (608, 128)),     # very wide: longer capped at 639 -> 639x127.8 -> round 639x128 -> floor32
    ((400, 400), (384, 384)),
    ((182, 268), (384, 544)),      # typical MM-IMDb poster: 384 x 565.5 -> 566 -> 544
])
def test_minmax_size_reference_values(size, expected):
    assert minmax_size(*size, shorter=384, longer=math.floor(1333 / 800 * 384)) == expected


@pytest.mark.parametrize("wh", [(64, 96), (120, 80), (50, 50), (300, 40), (33, 190)])
def test_pixelbert_sizes_and_values(wh):
    img = _noise(*wh)
    out = pixelbert_transform(384)(img)
    assert out.dtype == torch.float32 and out.shape[0] == 3
    h, w = out.shape[1:]
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) <= 384 and max(h, w) <= 639 and min(h, w) > 0
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # exact semantics: PIL bicubic resize of the PIL image, then (x/255 - 0.5) / 0.5
    ref = np.asarray(img.resize((w, h), resample=Image.BICUBIC), dtype=np.float32) / 255.0
    ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(out, ref, atol=1e-6)


def test_pixelbert_multiple_argument_and_modes():
    out = pixelbert_transform(64, multiple=16)(_noise(70, 110, mode="L"))
    assert out.shape == (3, 96, 64)
    assert pixelbert_transform(64)(_noise(80, 80, mode="RGBA")).shape == (3, 64, 64)


@pytest.mark.parametrize("wh", [(64, 96), (300, 40), (224, 224), (500, 375)])
def test_clip_transform_matches_open_clip(wh):
    import open_clip

    img = _noise(*wh, seed=1)
    out = clip_transform(224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    ref = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)(img)
    assert torch.allclose(out, ref, atol=1e-6)


def test_build_transform_dispatch():
    img = _noise(100, 60)
    assert build_transform(typed({"backbone": "vilt", "image_size": 64}).pipeline)(img).shape == (3, 64, 96)
    assert build_transform(typed({"backbone": "clip", "image_size": 224}).pipeline)(img).shape == (3, 224, 224)   # and every
    # other open_clip two-tower backbone (an unknown backbone never gets here: config validation refuses it)
