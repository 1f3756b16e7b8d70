"""The encoder protocol: a stream is embed -> :meth:`StreamEncoder.forward_blocks` -> norm (timm's
``forward_features``), and the block loop here is the only place where prompt methods act (docs/architecture.md).

Every backbone exposes its streams as `StreamEncoder` modules (ViLT: the joint stream; CLIP: the image and the
text tower). A subclass says how one block runs (:meth:`StreamEncoder.run_block`, through
``mdpl.backbones.attention.prefixed_attention``) and describes itself as a
:class:`~mdpl.prompts.base.StreamInfo`; :meth:`StreamEncoder.forward_blocks` runs the loop with the method's
hooks before every block, and computes the maps a method adapts (``method.block_adapters``) through its weight
adapters (:meth:`StreamEncoder.linear_map` names each block's linear maps).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.adapters import WeightAdapter
from mdpl.prompts.base import PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.layout import TokenLayout


class BlocksOut(NamedTuple):
    """The last item of :meth:`StreamEncoder.block_steps`: the last block's tokens, their mask and layout. (The loop
    yields it rather than returning it: ``torch.compile`` of torch < 2.12 loses a generator's return value.)"""

    x: torch.Tensor
    mask: torch.Tensor
    layout: TokenLayout


def run_to_end(steps: Iterator[int | BlocksOut]) -> BlocksOut:
    """Advance a :meth:`StreamEncoder.block_steps` loop to its end; its :class:`BlocksOut`."""
    item = None
    for item in steps:
        pass
    assert isinstance(item, BlocksOut), "a block loop ends with its BlocksOut"
    return item


class StreamEncoder(nn.Module):
    """One token stream of a backbone: its blocks and how one runs. Subclasses set `blocks` and `info`."""

    blocks: nn.ModuleList

    @property
    def info(self) -> StreamInfo:
        raise NotImplementedError

    def run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None,
                  adapters: Mapping[str, WeightAdapter] | None = None) -> torch.Tensor:
        """Block `index` on x [B, N, D]; `mask` bool [B, N] (True = real token); optional prompt keys/values.
        With `query_index` (long [B]) only that position of each row is computed (keys and values still come
        from every position): the output is [B, 1, D]. `adapters` (map name -> weight adapter, passed only when
        the method adapts this block): those linear maps are computed through their adapters."""
        raise NotImplementedError

    def query_parts(self, index: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        """Block `index`'s pre-attention norm module and its fused in-projection (weight [3C, C] with the query rows
        first, bias [3C] or None): what :meth:`block_query` reads."""
        raise NotImplementedError

    def block_query(self, index: int, x: torch.Tensor, norm_eps: float | None = None) -> torch.Tensor:
        """Block `index`'s own queries of tokens x [..., C] (``mdpl.prompts.base.FrozenBlocks``): the block's norm
        (with `norm_eps` in place of its epsilon when given), then the query rows of its in-projection. The live
        frozen weights are read (open_clip's fused ``in_proj_weight`` is sliced, not copied)."""
        norm, weight, bias = self.query_parts(index)
        if norm_eps is None:
            h = norm(x)
        else:
            h = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm_eps)
        c = x.shape[-1]
        return F.linear(h, weight[:c], None if bias is None else bias[:c])

    def linear_map(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen (weight [out, in], bias [out] or None) of the linear map `name` (``q``, ``k``, ``v``, ``out``,
        ``fc1``, ``fc2``: ``mdpl.prompts.adapters.LINEAR_MAPS``) of block `index`: views of the block's own
        parameters (rows of a fused in-projection), made on every call so that they follow the parameters. A
        stream whose ``run_block`` takes ``adapters`` implements it."""
        raise UserInputError(f"the {self.info.name!r} stream of this backbone has no named linear maps: weight "
                             f"adapters cannot run on it")

    def position_table(self) -> torch.Tensor | None:
        """The additive position embeddings of the stream's data tokens [N, width] (the live frozen table), or None
        when the stream has none a method may re-read (``PromptContext.position_table``)."""
        return None

    def forward_blocks(self, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, method: PromptMethod,
                       ctx: PromptContext, readout: Callable[[TokenLayout], torch.Tensor] | None = None,
                       needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Every block, each preceded by the method's hooks: tokens in or out, then extra keys/values.

        `readout` (layout -> long [B]): the position each row's feature is read from after the last block; the last
        block then computes only that position (exact: no other output of it is read) and x comes back [B, 1, D].
        `needed` (causal streams): how many leading positions of the stream's data segment can matter (up to the
        last read-out token); the rest is dropped once the method has read every position for the last time.
        The loop itself is :meth:`block_steps`, run to its end.
        """
        return tuple(run_to_end(self.block_steps(x, mask, layout, method, ctx, readout, needed)))

    def block_steps(self, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, method: PromptMethod,
                    ctx: PromptContext, readout: Callable[[TokenLayout], torch.Tensor] | None = None,
                    needed: int | None = None) -> Generator[int | BlocksOut, None, None]:
        """:meth:`forward_blocks` one block at a time: a generator that yields -1 once the method's ``after_block``
        has seen the embeddings, then the index of each block once it has run (and ``after_block`` has seen its
        output), and last a :class:`BlocksOut` (``run_to_end`` drives it to that). The classifier
        advances the streams of a method with a ``lock_step_order`` through it block by block, interleaved."""
        info = self.info
        if ctx.blocks is None:
            ctx = dataclasses.replace(ctx, blocks=self)
        if ctx.readout is None and readout is not None:
            ctx = dataclasses.replace(ctx, readout=readout)
        last = len(self.blocks) - 1
        cut = max(method.reads_every_position_until(info), 0) if needed is not None else -1
        extra = {"key_mask": True} if method.masks_padding_keys(info) and not info.masks_padding else {}
        method.after_block(info, -1, x, mask, layout, ctx)          # the embeddings (block 0's input)
        yield -1
        for index in range(len(self.blocks)):
            x, mask, layout = method.before_block(info, index, x, mask, layout, ctx)
            if index == cut:
                x, mask, layout = _drop_tail(x, mask, layout, info.name, needed)
            kv_prefix = method.attention_prompts(info, index, x, ctx)
            query_index = readout(layout) if readout is not None and index == last else None
            adapters = method.block_adapters(info, index)
            if adapters:
                x = self.run_block(index, x, mask, kv_prefix, query_index, adapters=adapters, **extra)
            else:
                x = self.run_block(index, x, mask, kv_prefix, query_index, **extra)
            method.after_block(info, index, x, mask, layout, ctx)
            yield index
        yield BlocksOut(x, mask, layout)


def _drop_tail(x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, segment: str,
               needed: int) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
    """Keep the first `needed` positions of `segment` when it ends the sequence (prompts go in front)."""
    if segment not in layout or layout.end(segment) != layout.total or needed >= layout.length(segment):
        return x, mask, layout
    end = layout.offset(segment) + needed
    return x[:, :end], mask[:, :end], layout.resized(segment, needed)
