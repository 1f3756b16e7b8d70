"""A prompt method defined outside mdpl (tests/test_plugins.py installs this file as a plugin): before block 0 of
every stream, `toy_prompt_length` learnt tokens chosen by the row's missing type are put in front of the sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mdpl.prompts.base import MethodConfig, PromptContext, PromptMethod, StreamInfo, check_positive
from mdpl.prompts.layout import TokenLayout, splice_tokens
from mdpl.prompts.registry import register_method


@dataclass(frozen=True)
class ToyPromptConfig(MethodConfig):
    """The method's keys: prompt tokens per missing type, and the scale of their random init."""

    toy_prompt_length: int = 8
    toy_init_std: float = 0.02
    TINY = {"toy_prompt_length": 3}

    def check(self, info) -> None:
        check_positive("toy_prompt_length", self.toy_prompt_length)


@register_method("toyprompt")
class ToyPrompt(PromptMethod):
    """One [3, P, width] parameter per stream; row r gets slice missing_type[r] before block 0."""

    config_class = ToyPromptConfig
    paper_tables = "mdpl_toy_method:paper_tables"
    title, preset, paper_run = "toy prompt", "toyprompt", (1e-2, 0)

    def __init__(self, config: ToyPromptConfig, info) -> None:
        super().__init__(config, info)
        self.prompts = nn.ParameterDict({
            s.name: nn.Parameter(torch.randn(3, config.toy_prompt_length, s.width) * config.toy_init_std)
            for s in info.streams})

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        if index != 0:
            return x, mask, layout
        x, mask = splice_tokens(x, mask, 0, [self.prompts[stream.name][ctx.missing_type]])
        return x, mask, layout.prepend([("toy", self.config.toy_prompt_length)])

    @classmethod
    def added_tokens(cls, config: ToyPromptConfig, info) -> dict[str, int]:
        return {s.name: config.toy_prompt_length for s in info.streams}


def paper_tables() -> list:
    """One table of one cell: the method on Food-101 at 70 % missing of both modalities."""
    from mdpl.experiments.matrix import Table, make_cell
    cell = make_cell("toy", "food101", "toyprompt", ("both", 0.7))
    return [Table("toy_main", "Toy prompt on Food-101", "table", [cell])]
