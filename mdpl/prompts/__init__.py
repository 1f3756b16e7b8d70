"""Prompt methods for the ViLT backbone (METHODS.md §3, §4) and their shared interface.

`build_prompt_method(config, info)` builds the method named by ``config["prompt_method"]``.
"""
from mdpl.prompts.base import BackboneInfo, PromptMethod
from mdpl.prompts.layout import IMAGE, TEXT, Segment, TokenLayout, splice_tokens
from mdpl.prompts.registry import available_prompt_methods, build_prompt_method, register_prompt_method

__all__ = [
    "BackboneInfo", "PromptMethod", "TokenLayout", "Segment", "splice_tokens", "TEXT", "IMAGE",
    "build_prompt_method", "register_prompt_method", "available_prompt_methods",
]
