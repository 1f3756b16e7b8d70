"""Task losses (METHODS.md §7.5)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def task_loss(dataset: str, logits: Tensor, label: Tensor) -> Tensor:
    """Loss of one batch.

    * mmimdb: binary cross-entropy with logits over the 23 outputs, mean over B x 23.
    * food101: cross-entropy over 101 logits (targets -100 ignored).
    * hatememes: cross-entropy over 2 logits (not a single sigmoid output).
    """
    if dataset == "mmimdb":
        return F.binary_cross_entropy_with_logits(logits.float(), label.float(), reduction="mean")
    if dataset in ("food101", "hatememes"):
        return F.cross_entropy(logits.float(), label.long(), ignore_index=-100)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of mmimdb, food101, hatememes")
