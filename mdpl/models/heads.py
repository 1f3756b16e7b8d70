"""Task heads (METHODS.md §2.1): the ViLT MLP classifier."""
from __future__ import annotations

from torch import nn

HEAD_LN_EPS = 1e-5


def head_attribute(dataset: str) -> str:
    """Attribute / state-dict name of the head, e.g. ``mmimdb_classifier`` (§7.3 matches on it)."""
    return f"{dataset}_classifier"


def build_vilt_head(hidden_size: int, num_classes: int) -> nn.Sequential:
    """Linear(D, 2D) -> LayerNorm(2D, eps 1e-5) -> GELU -> Linear(2D, C); N(0, 0.02) weights, zero biases."""
    head = nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size),
        nn.LayerNorm(2 * hidden_size, eps=HEAD_LN_EPS),
        nn.GELU(),
        nn.Linear(2 * hidden_size, num_classes),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return head
