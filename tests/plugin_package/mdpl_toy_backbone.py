"""A backbone defined outside mdpl (tests/test_plugins.py installs this file as a plugin): a small two-tower ViT
(image) + causal text transformer, assembled from mdpl's CLIP towers (StreamEncoder modules) with its own sizes and
keys (``toyvit_*``); randomly initialised, no weight file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mdpl.backbones.card import BackboneCard, WeightsSpec
from mdpl.backbones.clip import ClipBackbone, ClipSizes
from mdpl.backbones.registry import register_backbone

NAME = "toyvit"


@dataclass(frozen=True)
class ToyVitSizes(ClipSizes):
    """Keys ``toyvit_<field>``; defaults: a 4-layer, 128-wide ViT-S/16-like pair of towers."""

    PREFIX: ClassVar[str] = "toyvit_"
    described_as: ClassVar[str] = "the toy ViT backbone (toyvit_vision_layers, toyvit_text_layers)"

    embed_dim: int = 64
    image_size: int = 224
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 4


class ToyVitBackbone(ClipBackbone):
    described_as = ToyVitSizes.described_as


def build(run: Any) -> ToyVitBackbone:
    """Random weights (the plugin has no pre-trained file)."""
    return ToyVitBackbone(run.backbone)


register_backbone(BackboneCard(
    name=NAME, build=build, sizes=ToyVitSizes, tokenizer="bpe", transform="clip",
    weights=WeightsSpec(key="toyvit_path", sha_key="toyvit_sha256", what="no file: random initialisation"),
    model_keys=tuple(ToyVitSizes.flat_key(k) for k in ("embed_dim", "image_size", "vision_width", "vision_layers",
                                                         "text_width", "text_layers"))))
