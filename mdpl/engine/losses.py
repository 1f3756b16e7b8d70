"""Task losses (docs/methods.md §7.5); the dataset's spec (mdpl/data/registry.py) chooses one."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from mdpl.data.registry import dataset_spec


def bce_with_logits(logits: Tensor, label: Tensor) -> Tensor:
    """Multi-label: binary cross-entropy with logits over all outputs, mean over B x C (MM-IMDb)."""
    return F.binary_cross_entropy_with_logits(logits.float(), label.float(), reduction="mean")


def cross_entropy(logits: Tensor, label: Tensor) -> Tensor:
    """Single-label: cross-entropy over C logits, targets -100 ignored (Food-101; Hateful Memes with 2 logits,
    not a single sigmoid output)."""
    return F.cross_entropy(logits.float(), label.long(), ignore_index=-100)


#: loss kind (``DatasetSpec.loss``) -> loss function ``(logits, label) -> scalar``.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"bce_with_logits": bce_with_logits,
                                                         "cross_entropy": cross_entropy}


def loss_fn(dataset: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss function of ``dataset``: its spec's loss kind, or the spec's own callable."""
    loss = dataset_spec(dataset).loss
    return LOSSES[loss] if isinstance(loss, str) else loss


def task_loss(dataset: str, logits: Tensor, label: Tensor) -> Tensor:
    """Loss of one batch with the loss of ``dataset``'s spec (mmimdb: BCE-with-logits; food101, hatememes: CE)."""
    return loss_fn(dataset)(logits, label)
