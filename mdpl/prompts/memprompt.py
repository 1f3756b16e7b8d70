"""MemPrompt — memory-driven prompts on ViLT (Zhao et al., IJCAI 2025; METHODS.md §4).

Per prompt layer l (position j in the layer lists; D-28):

* generative prompts G_t, G_v: retrieved from two `PromptMemory` banks with queries = element-wise
  max over the current text / image segment (§4.2, §4.3 steps 1-2);
* shared prompts S_t, S_v: ``bottleneck(shared_missing_t + shared_missing_v | _t | _v)`` chosen by
  missing type — the three variants are computed once and gathered (D-27);
* insertion: ``[S_t, G_t, <text side>, S_v, G_v, <image side>]`` with mask ones (§4.3 step 4).
  In a layer with only one kind of prompt, that kind is prepended the same way (identical to the
  reference for shared-only layers; for generative-only layers the reference's offsets assume all
  shared prompts precede all generative ones — not reachable with identical layer lists — and
  mdpl uses the consistent front insertion instead).

State-dict keys follow the reference (`gen_t_prompt_memory.{j}.prompt_memory`, `.prompt_keys`,
`gen_v_prompt_memory.{j}.*`, `shared_missing_t.{j}`, `shared_missing_v.{j}`,
`bottleneck_texts.{j}.{0,2}.*`, `bottleneck_images.{j}.{0,2}.*`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import BackboneInfo, PromptMethod, check_layers, check_positive
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout, splice_tokens
from mdpl.prompts.registry import register_prompt_method, register_two_tower_method
from mdpl.prompts.towers import TwoTowerInfo, TwoTowerPromptMethod


def _kaiming_normal_fan_in(*shape: int) -> torch.Tensor:
    """A tensor drawn like the reference's memories: Kaiming-normal, a=sqrt(5), fan-in mode (§4.1)."""
    tensor = torch.empty(shape)
    nn.init.kaiming_normal_(tensor, a=math.sqrt(5))
    return tensor


def _memories(n: int, mem_size: int, length: int, width: int, top_k: int) -> nn.ModuleList:
    """One PromptMemory per prompted layer."""
    return nn.ModuleList(PromptMemory(mem_size, length, width, top_k) for _ in range(n))


def _shared_prompts(n: int, length: int, width: int) -> nn.ParameterList:
    """One shared prompt [length, width] ~ N(0, 0.02) per prompted layer (§4.1)."""
    return nn.ParameterList(nn.Parameter(nn.init.normal_(torch.empty(length, width), std=0.02)) for _ in range(n))


class PromptMemory(nn.Module):
    """Key-addressed prompt bank (METHODS.md §4.2): cosine top-k, softmax, weighted sum."""

    def __init__(self, mem_size: int, prompt_length: int, dim: int, top_k: int):
        super().__init__()
        self.top_k = min(top_k, mem_size)
        # Creation order memory -> keys matters for RNG parity with the reference (§4.1).
        self.prompt_memory = nn.Parameter(_kaiming_normal_fan_in(mem_size, prompt_length, dim))
        self.prompt_keys = nn.Parameter(_kaiming_normal_fan_in(mem_size, dim))

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [B, mem] between queries [B, D] and the keys."""
        q = F.normalize(query, dim=-1)
        k = F.normalize(self.prompt_keys, dim=-1)
        return q @ k.t()

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """Prompt [B, length, D] = sum_k softmax(s_I)_k M_k over the top-k slots I."""
        s = self.scores(query)
        idx = torch.topk(s, k=self.top_k, dim=1, largest=True, sorted=False).indices
        idx = torch.sort(idx, dim=1).values  # fixed summation order (D-33)
        w = torch.softmax(torch.gather(s, 1, idx), dim=1)
        selected = self.prompt_memory[idx]  # [B, k, length, D]
        return (selected * w[:, :, None, None].to(selected.dtype)).sum(dim=1)


def _bottleneck(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))


def _init_bottleneck(module: nn.Module) -> None:
    """N(0, 0.02) weights, zero biases (reference `init_weights`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            nn.init.zeros_(m.bias)


def _segment_max(x: torch.Tensor, mask: torch.Tensor, span: slice, mask_padding: bool) -> torch.Tensor:
    """Element-wise max over positions `span` (reference: padding included; D-30 option masks it)."""
    seg = x[:, span]
    if mask_padding:
        seg = seg.masked_fill(~mask[:, span, None], torch.finfo(seg.dtype).min)
    return seg.max(dim=1).values


@dataclass(frozen=True)
class MemPromptOptions:
    """MemPrompt's sizes (METHODS.md §4.1 defaults), shared by the ViLT and the two-tower variant."""

    gen_prompt_length: int = 16
    gen_prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    shared_prompt_length: int = 16
    shared_prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    mem_size: int = 16
    top_k: int = 5
    bottleneck_dim: int = 48
    mask_padding: bool = False  # max-pool the queries over real tokens only (D-30; reference: padding included)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], hidden_size: int) -> "MemPromptOptions":
        """The options from the config; ``bottleneck_dim`` defaults to ``hidden_size // 16``."""
        prompt_type = config.get("prompt_type", "input")
        if prompt_type != "input":
            raise UserInputError(f"MemPrompt only supports prompt_type='input', got {prompt_type!r}")
        return cls(
            gen_prompt_length=config.get("gen_prompt_length", cls.gen_prompt_length),
            gen_prompt_layers=tuple(config.get("gen_prompt_layers", cls.gen_prompt_layers)),
            shared_prompt_length=config.get("shared_prompt_length", cls.shared_prompt_length),
            shared_prompt_layers=tuple(config.get("shared_prompt_layers", cls.shared_prompt_layers)),
            mem_size=config.get("mem_size", cls.mem_size),
            top_k=config.get("top_k", cls.top_k),
            bottleneck_dim=config.get("bottleneck_dim", hidden_size // 16),
            mask_padding=bool(config.get("memprompt_mask_padding", False)),
        )

    def checked_layers(self, num_layers: int) -> tuple[list[int], list[int]]:
        """Validate every size; return the (generative, shared) prompt layers."""
        for key in ("gen_prompt_length", "shared_prompt_length", "mem_size", "top_k", "bottleneck_dim"):
            check_positive(key, getattr(self, key))
        gen = check_layers("gen_prompt_layers", self.gen_prompt_layers, num_layers, True)
        shared = check_layers("shared_prompt_layers", self.shared_prompt_layers, num_layers, True)
        if not gen and not shared:
            raise UserInputError("MemPrompt needs at least one of gen_prompt_layers / shared_prompt_layers")
        return gen, shared


@register_prompt_method("memprompt")
class MemPrompt(PromptMethod):
    """MemPrompt (METHODS.md §4)."""

    def __init__(self, info: BackboneInfo, options: MemPromptOptions = MemPromptOptions(),
                 mask_text_padding: bool = False):
        """``mask_text_padding``: mask the text query's padding only (set with ``dynamic_text_padding``,
        whose padding length varies per batch)."""
        super().__init__(info)
        self.gen_prompt_layers, self.shared_prompt_layers = options.checked_layers(info.num_layers)
        self.mask_padding = options.mask_padding
        self.mask_text_padding = self.mask_padding or bool(mask_text_padding)
        self._gen_slot = {l: j for j, l in enumerate(self.gen_prompt_layers)}
        self._shared_slot = {l: j for j, l in enumerate(self.shared_prompt_layers)}
        d, n_gen, n_sh = info.hidden_size, len(self.gen_prompt_layers), len(self.shared_prompt_layers)
        o = options
        # Construction order follows the reference (§4.1) for RNG parity.
        self.gen_v_prompt_memory = _memories(n_gen, o.mem_size, o.gen_prompt_length, d, o.top_k)
        self.gen_t_prompt_memory = _memories(n_gen, o.mem_size, o.gen_prompt_length, d, o.top_k)
        self.shared_missing_t = _shared_prompts(n_sh, o.shared_prompt_length, d)
        self.shared_missing_v = _shared_prompts(n_sh, o.shared_prompt_length, d)
        self.bottleneck_texts = nn.ModuleList(_bottleneck(d, o.bottleneck_dim) for _ in range(n_sh))
        self.bottleneck_images = nn.ModuleList(_bottleneck(d, o.bottleneck_dim) for _ in range(n_sh))
        _init_bottleneck(self.bottleneck_images)
        _init_bottleneck(self.bottleneck_texts)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: BackboneInfo) -> "MemPrompt":
        return cls(info, MemPromptOptions.from_config(config, info.hidden_size),
                   mask_text_padding=bool(config.get("dynamic_text_padding", False)))

    # --- prompt construction ------------------------------------------------------------------------
    def shared_prompts(self, layer: int, missing_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_t, S_v), each [B, Ls, D]: per-type variants gathered by missing type (§4.3 step 3, D-27)."""
        j = self._shared_slot[layer]
        t, v = self.shared_missing_t[j], self.shared_missing_v[j]
        per_type = torch.stack([t + v, t, v])  # [3, Ls, D]: complete, text missing, image missing
        mt = missing_type.long()
        return self.bottleneck_texts[j](per_type)[mt], self.bottleneck_images[j](per_type)[mt]

    def generative_prompts(
        self, layer: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_t, G_v), each [B, Lg, D], retrieved with max-pooled segment queries (§4.3 steps 1-2)."""
        j = self._gen_slot[layer]
        q_text = _segment_max(x, mask, layout.span(TEXT), self.mask_text_padding)
        q_image = _segment_max(x, mask, layout.span(IMAGE), self.mask_padding)
        return self.gen_t_prompt_memory[j](q_text), self.gen_v_prompt_memory[j](q_image)

    # --- hook ----------------------------------------------------------------------------------------
    def before_block(
        self, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, missing_type: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        text_new: list[tuple[str, torch.Tensor]] = []
        image_new: list[tuple[str, torch.Tensor]] = []
        if index in self._shared_slot:
            s_t, s_v = self.shared_prompts(index, missing_type)
            text_new.append((f"mem.shared_t.{index}", s_t))
            image_new.append((f"mem.shared_v.{index}", s_v))
        if index in self._gen_slot:
            g_t, g_v = self.generative_prompts(index, x, mask, layout)
            text_new.append((f"mem.gen_t.{index}", g_t))
            image_new.append((f"mem.gen_v.{index}", g_v))
        if not text_new:
            return x, mask, layout
        # image side first (its position is after the text side, which is unchanged by it)
        x, mask = splice_tokens(x, mask, layout.end(TEXT), [t for _, t in image_new])
        x, mask = splice_tokens(x, mask, 0, [t for _, t in text_new])
        layout = layout.insert_after(TEXT, [(n, t.shape[1]) for n, t in image_new])
        layout = layout.prepend([(n, t.shape[1]) for n, t in text_new])
        return x, mask, layout


def _projection(d_in: int, width: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, width) -> GELU -> Linear(width, d_out), N(0, 0.02) weights, zero biases."""
    module = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, d_out))
    _init_bottleneck(module)
    return module


@register_two_tower_method("memprompt")
class MemPromptTwoTower(TwoTowerPromptMethod):
    """MemPrompt on CLIP (two towers) — our mapping, not defined by the MemPrompt paper (§4 → §5).

    * Text memory ``gen_t_prompt_memory.{j}`` (text width) feeds the text tower, with query = the
      element-wise max over the text tower's 77 token positions (padding included unless
      ``memprompt_mask_padding``); image memory ``gen_v_prompt_memory.{j}`` (image width) feeds the
      image tower, query = max over its CLS + patch tokens (§4.2, §4.3 steps 1-2).
    * Shared prompts: ``shared_missing_t`` / ``shared_missing_v`` live in one space (the text width,
      so complete samples can sum them as in §4.3 step 3); ``bottleneck_texts`` maps it to the text
      width, ``bottleneck_images`` to the image width (Linear → GELU → Linear, ``bottleneck_dim``).
    * Insertion: per tower ``[S, G, <tower sequence>]``, accumulating as on ViLT (§4.3 step 4);
      the text tower's causal mask grows with them.
    * Features: image CLS / text EOT at their shifted positions; [f_v ; f_t] with no zeroing (as on
      ViLT, both towers encode the dummy inputs; the shared prompts carry the missing type).
    """

    def __init__(self, info: TwoTowerInfo, options: MemPromptOptions = MemPromptOptions()):
        super().__init__(info)
        gen, shared = options.checked_layers(info.num_layers)
        self.mask_padding = options.mask_padding
        self._gen_slot = {l: j for j, l in enumerate(gen)}
        self._shared_slot = {l: j for j, l in enumerate(shared)}
        dv, dt, o = info.image.hidden_size, info.text.hidden_size, options
        self.gen_v_prompt_memory = _memories(len(gen), o.mem_size, o.gen_prompt_length, dv, o.top_k)
        self.gen_t_prompt_memory = _memories(len(gen), o.mem_size, o.gen_prompt_length, dt, o.top_k)
        self.shared_missing_t = _shared_prompts(len(shared), o.shared_prompt_length, dt)
        self.shared_missing_v = _shared_prompts(len(shared), o.shared_prompt_length, dt)
        self.bottleneck_texts = nn.ModuleList(_projection(dt, o.bottleneck_dim, dt) for _ in shared)
        self.bottleneck_images = nn.ModuleList(_projection(dt, o.bottleneck_dim, dv) for _ in shared)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: TwoTowerInfo) -> "MemPromptTwoTower":
        return cls(info, MemPromptOptions.from_config(config, info.text.hidden_size))

    def shared_prompt(self, tower: str, layer: int, missing_type: torch.Tensor) -> torch.Tensor:
        """S for `tower`: [B, Ls, width], per-type variants gathered by missing type (§4.3 step 3)."""
        j = self._shared_slot[layer]
        t, v = self.shared_missing_t[j], self.shared_missing_v[j]
        per_type = torch.stack([t + v, t, v])  # complete, text missing, image missing
        proj = self.bottleneck_images[j] if tower == IMAGE else self.bottleneck_texts[j]
        return proj(per_type)[missing_type.long()]

    def tower_before_block(
        self, tower: str, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
        missing_type: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        side = "v" if tower == IMAGE else "t"
        new: list[tuple[str, torch.Tensor]] = []
        if index in self._shared_slot:
            new.append((f"mem.shared_{side}.{index}", self.shared_prompt(tower, index, missing_type)))
        if index in self._gen_slot:
            memory = (self.gen_v_prompt_memory if tower == IMAGE else self.gen_t_prompt_memory)[self._gen_slot[index]]
            query = _segment_max(x, mask, layout.span(tower), self.mask_padding)
            new.append((f"mem.gen_{side}.{index}", memory(query)))
        if not new:
            return x, mask, layout
        x, mask = splice_tokens(x, mask, 0, [t for _, t in new])
        return x, mask, layout.prepend([(n, t.shape[1]) for n, t in new])
