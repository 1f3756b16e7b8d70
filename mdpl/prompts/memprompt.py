"""MemPrompt — memory-driven prompts (Zhao et al., IJCAI 2025; docs/methods.md §4).

Per prompt layer l (position j in the layer lists; D-28), for each modality a stream carries:

* generative prompts G_t, G_v: retrieved from two `PromptMemory` banks with queries = element-wise max over the
  stream's text / image segment (§4.2, §4.3 steps 1-2);
* shared prompts S_t, S_v: ``bottleneck(shared_missing_t + shared_missing_v | _t | _v)`` chosen by missing type —
  the three variants are computed once and gathered (D-27);
* insertion: on the joint ViLT stream ``[S_t, G_t, <text side>, S_v, G_v, <image side>]`` with mask ones
  (§4.3 step 4); in a layer with only one kind of prompt, that kind is inserted the same way (identical to the
  reference for shared-only layers; for generative-only layers the reference's offsets assume all shared prompts
  precede all generative ones — not reachable with identical layer lists — and mdpl uses this consistent
  insertion instead). On a CLIP tower (our mapping, not defined by the paper) ``[S, G]`` of its modality are
  prepended to the tower's sequence; the shared prompts live in the text width and ``bottleneck_images`` maps
  them to the image width; the classifier keeps both features (no zeroing: the shared prompts carry the type).

State-dict keys follow the reference (``gen_t_prompt_memory.{j}.prompt_memory``, ``.prompt_keys``,
``gen_v_prompt_memory.{j}.*``, ``shared_missing_t.{j}``, ``shared_missing_v.{j}``, ``bottleneck_texts.{j}.{0,2}.*``,
``bottleneck_images.{j}.{0,2}.*``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (BackboneInfo, MethodConfig, PromptContext, PromptMethod, StreamInfo, check_layers,
                               check_positive)
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout, splice_tokens
from mdpl.prompts.registry import register_method


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
    """Key-addressed prompt bank (docs/methods.md §4.2): cosine top-k, softmax, weighted sum."""

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


def _projection(d_in: int, width: int, d_out: int) -> nn.Sequential:
    """Linear(d_in, width) -> GELU -> Linear(width, d_out); keys ``.0`` / ``.2`` as in the reference."""
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, d_out))


def _init_projection(module: nn.Module) -> None:
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
class MemPromptConfig(MethodConfig):
    """MemPrompt's keys with the paper's values (§4.1)."""

    gen_prompt_length: int = 16
    gen_prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    shared_prompt_length: int = 16
    shared_prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    mem_size: int = 16
    top_k: int = 5
    bottleneck_dim: int = 48                # the reference hard-codes hidden_size // 16
    memprompt_mask_padding: bool = False    # True: retrieval max-pool ignores padding (batch-invariant, D-30)
    dynamic_text_padding: bool = dataclasses.field(default=False, metadata={"shared_key": True})
    """Not a MemPrompt key: the data option padding texts to each batch's longest, whose padding length varies,
    so the text query then ignores padding."""

    TINY = {"gen_prompt_length": 4, "gen_prompt_layers": [0, 1], "shared_prompt_length": 4,
            "shared_prompt_layers": [0, 1], "mem_size": 4, "top_k": 2, "bottleneck_dim": 8}

    def check(self, info: BackboneInfo) -> None:
        for key in ("gen_prompt_length", "shared_prompt_length", "mem_size", "top_k", "bottleneck_dim"):
            check_positive(key, getattr(self, key))
        check_layers("gen_prompt_layers", self.gen_prompt_layers, info, True)
        check_layers("shared_prompt_layers", self.shared_prompt_layers, info, True)
        if not self.gen_prompt_layers and not self.shared_prompt_layers:
            raise UserInputError("gen_prompt_layers and shared_prompt_layers are both empty: MemPrompt would prompt "
                                 "no layer; give at least one of them layers (e.g. gen_prompt_layers=[0,1,2,3,4,5])")
        if self.top_k > self.mem_size:
            raise UserInputError(f"top_k={self.top_k} exceeds mem_size={self.mem_size}: MemPrompt retrieves top_k of "
                                 "the mem_size memory prompts; lower top_k")


@register_method("memprompt")
class MemPrompt(PromptMethod):
    """MemPrompt (§4) on every stream of the backbone."""

    title = "MemPrompt"
    in_demo = True
    preset = "memprompt"
    paper_run = (5e-3, 42)
    paper_learning_rates = {"hatememes": 1e-3}   # the reference's Hateful Memes config
    paper_missing_type = "image"                 # the reference config's missing type on every split (D-32)
    padding_is_inert = False    # the text query max-pools over [PAD] positions too (D-30)
    paper_tables = "mdpl.experiments.papers.memprompt:tables"
    reference_prompt_keys = ("gen_t_prompt_memory.", "gen_v_prompt_memory.", "shared_missing_t.", "shared_missing_v.",
                             "bottleneck_texts.", "bottleneck_images.")
    reference_config_keys = ("gen_prompt_length", "gen_prompt_layers", "shared_prompt_length", "shared_prompt_layers",
                             "mem_size", "top_k")   # the stored bottleneck_dim is unused by its code
    config_class = MemPromptConfig

    def __init__(self, config: MemPromptConfig, info: BackboneInfo):
        super().__init__(config, info)
        self.gen_prompt_layers, self.shared_prompt_layers = list(config.gen_prompt_layers), list(
            config.shared_prompt_layers)
        self.mask_padding = config.memprompt_mask_padding
        self.mask_text_padding = self.mask_padding or config.dynamic_text_padding
        self._gen_slot = {layer: j for j, layer in enumerate(self.gen_prompt_layers)}
        self._shared_slot = {layer: j for j, layer in enumerate(self.shared_prompt_layers)}
        dt, dv, c = info.width_of(TEXT), info.width_of(IMAGE), config
        n_gen, n_sh = len(self.gen_prompt_layers), len(self.shared_prompt_layers)
        # Construction order follows the reference (§4.1) for RNG parity.
        self.gen_v_prompt_memory = _memories(n_gen, c.mem_size, c.gen_prompt_length, dv, c.top_k)
        self.gen_t_prompt_memory = _memories(n_gen, c.mem_size, c.gen_prompt_length, dt, c.top_k)
        self.shared_missing_t = _shared_prompts(n_sh, c.shared_prompt_length, dt)
        self.shared_missing_v = _shared_prompts(n_sh, c.shared_prompt_length, dt)
        self.bottleneck_texts = nn.ModuleList(_projection(dt, c.bottleneck_dim, dt) for _ in range(n_sh))
        self.bottleneck_images = nn.ModuleList(_projection(dt, c.bottleneck_dim, dv) for _ in range(n_sh))
        _init_projection(self.bottleneck_images)
        _init_projection(self.bottleneck_texts)

    # --- prompt construction ------------------------------------------------------------------------
    def shared_prompt(self, modality: str, layer: int, missing_type: torch.Tensor) -> torch.Tensor:
        """S_t or S_v [B, Ls, width]: per-type variants gathered by missing type (§4.3 step 3, D-27)."""
        j = self._shared_slot[layer]
        t, v = self.shared_missing_t[j], self.shared_missing_v[j]
        per_type = torch.stack([t + v, t, v])  # [3, Ls, D]: complete, text missing, image missing
        proj = self.bottleneck_texts[j] if modality == TEXT else self.bottleneck_images[j]
        return proj(per_type)[missing_type]

    def generative_prompt(self, modality: str, layer: int, x: torch.Tensor, mask: torch.Tensor,
                          layout: TokenLayout) -> torch.Tensor:
        """G_t or G_v [B, Lg, width], retrieved with the max-pooled segment as query (§4.3 steps 1-2)."""
        j = self._gen_slot[layer]
        if modality == TEXT:
            return self.gen_t_prompt_memory[j](_segment_max(x, mask, layout.span(TEXT), self.mask_text_padding))
        return self.gen_v_prompt_memory[j](_segment_max(x, mask, layout.span(IMAGE), self.mask_padding))

    def _side_prompts(self, modality: str, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
                      ctx: PromptContext) -> list[tuple[str, torch.Tensor]]:
        """[(segment name, tokens)] inserted in front of `modality`'s side: shared, then generative."""
        side = "t" if modality == TEXT else "v"
        out = []
        if index in self._shared_slot:
            out.append((f"mem.shared_{side}.{index}", self.shared_prompt(modality, index, ctx.missing_type)))
        if index in self._gen_slot:
            out.append((f"mem.gen_{side}.{index}", self.generative_prompt(modality, index, x, mask, layout)))
        return out

    def reads_every_position_until(self, stream: StreamInfo) -> int:
        """The retrieval queries max-pool over every text position, [PAD] included, unless padding is masked."""
        if TEXT not in stream.modalities or self.mask_text_padding or not self.gen_prompt_layers:
            return -1
        return max(self.gen_prompt_layers)

    # --- hook ----------------------------------------------------------------------------------------
    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        sides = {m: self._side_prompts(m, index, x, mask, layout, ctx) for m in stream.modalities}
        image_new = sides.get(IMAGE, [])
        if image_new and TEXT in layout:   # joint stream: right after the text side, which it leaves unchanged
            x, mask = splice_tokens(x, mask, layout.end(TEXT), [t for _, t in image_new])
            layout = layout.insert_after(TEXT, [(n, t.shape[1]) for n, t in image_new])
            image_new = []
        front = sides.get(TEXT, []) + image_new
        if front:
            x, mask = splice_tokens(x, mask, 0, [t for _, t in front])
            layout = layout.prepend([(n, t.shape[1]) for n, t in front])
        return x, mask, layout

    @classmethod
    def added_tokens(cls, config: MemPromptConfig, info: BackboneInfo) -> dict[str, int]:
        """Per modality: shared and generative prompts of every prompted layer accumulate."""
        per_side = (len(config.shared_prompt_layers) * config.shared_prompt_length
                    + len(config.gen_prompt_layers) * config.gen_prompt_length)
        return {stream.name: per_side * len(stream.modalities) for stream in info.streams}
