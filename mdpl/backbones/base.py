"""What the classifier needs of a backbone (docs/architecture.md): its streams, how a batch enters each stream,
how each stream's output becomes a feature, the task head that reads the features, and which parts train.

A new backbone is one module subclassing :class:`Backbone` (its streams are
:class:`~mdpl.backbones.encoder.StreamEncoder` modules), a weight reader, and its card registered in the same file
(``mdpl.backbones.card``, ``mdpl.backbones.registry``). Prompt methods never see this class: only ``info`` (the streams' descriptions).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mdpl.backbones.encoder import StreamEncoder
from mdpl.errors import UserInputError
from mdpl.prompts.base import BackboneInfo
from mdpl.prompts.layout import TokenLayout

if TYPE_CHECKING:
    from mdpl.backbones.card import WeightsSpec

Batch = Mapping[str, object]


class Backbone(nn.Module):
    """Base class; subclasses implement every method below."""

    described_as = "the backbone"
    """How error messages name it, with its depth keys (e.g. "the ViLT backbone (num_layers)")."""

    def encoders(self) -> dict[str, StreamEncoder]:
        """Stream name -> encoder, in the order the classifier encodes them."""
        raise NotImplementedError

    @property
    def info(self) -> BackboneInfo:
        return BackboneInfo(tuple(encoder.info for encoder in self.encoders().values()), what=self.described_as)

    def embed(self, stream: str, batch: Batch,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Block-0 input of `stream`: tokens [B, N, D], bool mask [B, N] (True = real token) and the layout of its
        data segments; only the batch rows `rows` (long [R]) when given."""
        raise NotImplementedError

    def readout(self, stream: str, layout: TokenLayout, batch: Batch,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Long [B]: the position of the token each row's feature is read from, in the final `layout` (the text
        [CLS], the image CLS, the text EOT); the last block computes only these positions."""
        raise NotImplementedError

    def token_ids(self, stream: str, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ids of `stream`'s data tokens [B, N] (``PromptContext.token_ids``), or None (the default)."""
        return None

    def needed_length(self, stream: str, batch: Batch) -> int | None:
        """On a causal stream: how many leading data positions can change a read-out token (None: all)."""
        return None

    def pool(self, stream: str, token: torch.Tensor) -> torch.Tensor:
        """The feature [B, F] of `stream` from its read-out token [B, D] after the last block (norm, projection)."""
        raise NotImplementedError

    def build_head(self, num_classes: int) -> nn.Module:
        """The task head on the concatenated stream features."""
        raise NotImplementedError

    def optional_parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """Named frozen parts a method may ask to train (``PromptMethod.extra_backbone_parts``); none by default."""
        return {}

    def trainable_parts(self) -> list[nn.Module | nn.Parameter]:
        """Parts trained with the prompts while the rest of the backbone is frozen (ViLT: pooler)."""
        return []

    def untrained_parts(self) -> list[nn.Module | nn.Parameter]:
        """Parts no classifier uses, frozen even with ``finetune`` (CLIP's logit scale: it would get no gradient)."""
        return []

    def frozen_parts(self) -> list[nn.Module]:
        """Modules frozen without ``finetune``, put in eval mode as a whole by ``frozen_eval_mode``."""
        return [self]


def load_pretrained(backbone: Backbone, path: str, sha256: str, test_only: bool, weights: "WeightsSpec", name: str,
                    load: Callable[[Mapping[str, torch.Tensor]], None]) -> Backbone:
    """`backbone` with the weights of the file `path` (read by ``weights.read`` with its `sha256` check, loaded
    strictly); a warning when `path` is empty (random weights: tests only); nothing with `test_only` (every weight then
    comes from the evaluated checkpoint). A file that does not fit is one UserInputError naming ``weights.key``."""
    if test_only:
        return backbone
    if not path:
        warnings.warn(f"{weights.key} is empty: the {name} backbone is randomly initialised (tests only)", stacklevel=3)
        return backbone
    state = weights.read(path, sha256)
    try:
        load(state)
    except UserInputError as err:
        raise UserInputError(f"{weights.key} {path}: {err}") from None
    return backbone
