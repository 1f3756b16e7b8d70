"""Prompt methods and their one interface (docs/architecture.md; docs/methods.md §3, §4, §6).

`build_method(name, options, info)` builds the method registered as `name` with its config `options`.
"""
from mdpl.prompts.base import BackboneInfo, FrozenBlocks, MethodConfig, PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.layout import IMAGE, TEXT, Segment, TokenLayout, splice_tokens
from mdpl.prompts.preparation import (FeatureRequest, KMeansRequest, NeighbourRequest, PreparationNeed,
                                      PreparedArtifact)
from mdpl.prompts.registry import available_methods, build_method, method_class, register_method, registered

__all__ = [
    "BackboneInfo", "StreamInfo", "PromptContext", "FrozenBlocks", "MethodConfig", "PromptMethod", "TokenLayout", "Segment",
    "splice_tokens", "TEXT", "IMAGE", "build_method", "register_method", "registered", "available_methods",
    "method_class", "FeatureRequest", "KMeansRequest", "NeighbourRequest", "PreparationNeed", "PreparedArtifact",
]
