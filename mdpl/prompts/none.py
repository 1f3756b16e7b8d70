"""'none': the no-prompt baseline (frozen backbone, trainable backbone head parts + task head; docs/methods.md
§10.3, D-25)."""
from __future__ import annotations

from mdpl.prompts.base import PromptMethod
from mdpl.prompts.registry import register_method


@register_method("none", baseline=True)
class NoPrompt(PromptMethod):
    """Inserts nothing in any stream."""

    title = "baseline (no prompt)"
    in_demo = True
    preset = "baseline"
