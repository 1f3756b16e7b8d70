"""Image transforms of the backbones (docs/methods.md §1.5): ViLT 'pixelbert' and OpenAI CLIP.

Both take an RGB PIL image (the dataset decodes and converts to RGB) and return a float32 tensor
[3, H, W]; no augmentation, identical for train and evaluation (as in the references).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from mdpl.data.settings import DataPipeline


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXELBERT_MEAN = (0.5, 0.5, 0.5)
PIXELBERT_STD = (0.5, 0.5, 0.5)


def minmax_size(width: int, height: int, shorter: int, longer: int, multiple: int = 32) -> tuple[int, int]:
    """Target ``(width, height)`` of the ViLT min-max resize (docs/methods.md §1.5 step 2).

    Scale the shorter side to ``shorter``; if the longer side then exceeds ``longer`` scale both down
    so it equals ``longer``; round half up; floor each side to a multiple of ``multiple``.
    """
    scale = shorter / min(width, height)
    new_w, new_h = width * scale, height * scale
    if height < width:
        new_h = float(shorter)
    else:
        new_w = float(shorter)
    biggest = max(new_w, new_h)
    if biggest > longer:
        new_w, new_h = new_w * longer / biggest, new_h * longer / biggest
    new_w, new_h = int(new_w + 0.5), int(new_h + 0.5)
    return new_w // multiple * multiple, new_h // multiple * multiple


class MinMaxResize:
    """PIL bicubic resize to :func:`minmax_size` (ViLT's 'pixelbert' geometry)."""

    def __init__(self, shorter: int = 384, longer: int | None = None, multiple: int = 32) -> None:
        self.shorter = shorter
        self.longer = longer if longer is not None else math.floor(1333 / 800 * shorter)
        self.multiple = multiple

    def __call__(self, image: Image.Image) -> Image.Image:
        size = minmax_size(image.width, image.height, self.shorter, self.longer, self.multiple)
        if min(size) <= 0:
            raise ValueError(f"image {image.width}x{image.height} too small for min-max resize to "
                             f"multiples of {self.multiple}")
        return image.resize(size, resample=Image.BICUBIC)

    def __repr__(self) -> str:
        return f"MinMaxResize(shorter={self.shorter}, longer={self.longer}, multiple={self.multiple})"


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def pixelbert_transform(image_size: int = 384, multiple: int = 32) -> Callable[[Image.Image], torch.Tensor]:
    """ViLT 'pixelbert' (docs/methods.md §1.5): min-max resize (shorter=image_size, longer<=1333/800*image_size,
    sides floored to ``multiple``), to tensor, normalise mean=std=0.5 (range [-1, 1])."""
    return T.Compose([T.Lambda(_to_rgb), MinMaxResize(image_size, multiple=multiple), T.ToTensor(),
                      T.Normalize(PIXELBERT_MEAN, PIXELBERT_STD)])


def clip_transform(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """OpenAI CLIP preprocessing (docs/methods.md §1.5): shorter side -> image_size (PIL bicubic), centre crop,
    RGB, to tensor, normalise with the OpenAI mean/std."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def square_transform(image_size: int = 384) -> Callable[[Image.Image], torch.Tensor]:
    """Both sides resized to image_size (PIL bilinear, aspect ratio not kept), to tensor, normalise mean=std=0.5: the
    image processing of RAGPT's reference (every image gives the same full patch grid; docs/methods.md RAGPT-D7)."""
    return T.Compose([T.Lambda(_to_rgb), T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR),
                      T.ToTensor(), T.Normalize(PIXELBERT_MEAN, PIXELBERT_STD)])


TRANSFORMS: dict[str, Callable[[int], Callable[[Image.Image], torch.Tensor]]] = {
    "pixelbert": pixelbert_transform, "clip": clip_transform, "square": square_transform}
"""A backbone card's ``transform`` id -> the transform builder (of ``image_size``)."""


def build_transform(pipeline: DataPipeline) -> Callable[[Image.Image], torch.Tensor]:
    """The transform the run's backbone card names (``pixelbert`` for ViLT, ``clip`` for the open_clip towers), or the
    run's ``image_transform`` when set, at the run's ``image_size``."""
    return TRANSFORMS[pipeline.transform](int(pipeline.image_size))
