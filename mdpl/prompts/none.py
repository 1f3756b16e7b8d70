"""'none': the no-prompt baseline (frozen ViLT, trainable pooler + head; METHODS.md §10.3 D-25)."""
from __future__ import annotations

from mdpl.prompts.base import PromptMethod
from mdpl.prompts.registry import register_prompt_method, register_two_tower_method
from mdpl.prompts.towers import TwoTowerPromptMethod


@register_prompt_method("none")
class NoPrompt(PromptMethod):
    """Inserts nothing; the pooled token is the text [CLS] (index 0)."""


@register_two_tower_method("none")
class NoPromptTwoTower(TwoTowerPromptMethod):
    """CLIP baseline: inserts nothing in either tower (frozen CLIP + the trainable parts of METHODS §6.6 + head)."""
