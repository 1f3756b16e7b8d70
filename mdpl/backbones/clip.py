"""CLIP ViT-B/16 backbone (docs/methods.md §5), built with open_clip and exposed as two streams.

The two towers are our own thin :class:`~mdpl.backbones.encoder.StreamEncoder` modules that *adopt* the
sub-modules of an ``open_clip`` CLIP model (QuickGELU variant, §5.1), so their state-dict keys are exactly
OpenAI's: ``image_encoder.<k>`` <-> ``visual.<k>`` and ``text_encoder.<k>`` <-> ``<k>`` (text keys), plus
``logit_scale`` (``mdpl.backbones.clip_weights`` reads the files). Streams: ``"image"`` (conv -> [CLS] -> +pos ->
ln_pre -> blocks -> ln_post of the CLS -> @proj) and ``"text"`` (token + position embeddings -> causal blocks ->
ln_final -> EOT token -> @text_projection); the feature is ``[f_v ; f_t]`` and the head a linear layer (§6.5).
All sequences are batch-first ``[B, L, D]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.backbones.attention import adapted_linear, prefixed_attention, project_qkv, take_rows
from mdpl.backbones.base import Backbone, Batch, load_pretrained
from mdpl.backbones.card import BackboneCard, BackboneSizes, WeightsSpec
from mdpl.backbones.clip_weights import (backbone_to_openai_key, check_state_dict, openai_to_backbone_key,
                                        read_openai_checkpoint)
from mdpl.backbones.encoder import StreamEncoder
from mdpl.backbones.registry import register_backbone
from mdpl.data.tokenizers import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE
from mdpl.errors import UserInputError
from mdpl.prompts.adapters import MLP_MAPS, QKV_MAPS, WeightAdapter
from mdpl.prompts.base import StreamInfo
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout


@dataclass(frozen=True)
class TwoTowerSizes(BackboneSizes):
    """What the sizes of the open_clip two-tower backbones (CLIP, CoCa) share: image and text towers
    (``vision_layers`` / ``text_layers``) and BPE texts of ``context_length`` ids from ``vocab_size`` tokens.
    Defaults: OpenAI CLIP ViT-B/16 (§5.1); a subclass names its key prefix and changes what differs."""

    TINY: ClassVar[Mapping[str, Any]] = {"embed_dim": 32, "vision_width": 64, "vision_layers": 2,
                                         "vision_head_width": 32, "text_width": 64, "text_heads": 2, "text_layers": 2}

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_head_width: int = 64
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    path: str = ""        # the pre-trained weights file; "" = random init
    sha256: str = ""      # optional SHA-256 check of the weights file

    @property
    def stream_widths(self) -> dict[str, int]:
        return {"image": self.vision_width, "text": self.text_width}

    @property
    def depth(self) -> int:
        return min(self.vision_layers, self.text_layers)

    @property
    def text_length(self) -> int:
        return self.context_length

    @property
    def text_vocab_size(self) -> int:
        return self.vocab_size


@dataclass(frozen=True)
class ClipSizes(TwoTowerSizes):
    """CLIP's config section (keys ``clip_<field>``, and the run's ``image_size``); defaults: OpenAI ViT-B/16
    (§5.1), only tests change them."""

    PREFIX: ClassVar[str] = "clip_"
    described_as: ClassVar[str] = "the CLIP backbone (clip_vision_layers, clip_text_layers)"
    # clip_path: a local ViT-B-16.pt (TorchScript archive) or an OpenAI-layout state dict

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ClipSizes":
        return cls.from_flat(config)

    def check(self) -> None:
        super().check()
        example = ("ViT-B/16: image_size=224 clip_patch_size=16, clip_vision_width=768 clip_vision_head_width=64, "
                   "clip_text_width=512 clip_text_heads=8")
        for name, divisor in (("image_size", "patch_size"), ("vision_width", "vision_head_width"),
                              ("text_width", "text_heads")):
            self.require_multiple(name, divisor, example)
        for name, fixed, what in (("context_length", CLIP_CONTEXT_LENGTH, "text positions"),
                                  ("vocab_size", CLIP_VOCAB_SIZE, "token ids")):
            if getattr(self, name) != fixed:
                raise UserInputError(f"{self.flat_key(name)}={getattr(self, name)} must be {fixed}: the CLIP "
                                     f"tokenizer (OpenAI BPE) always gives {fixed} {what}")


def _build_open_clip(sizes: ClipSizes) -> nn.Module:
    """An open_clip CLIP with QuickGELU (§5.1), randomly initialised; never downloads."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if sizes.vision_width % sizes.vision_head_width:
        raise UserInputError(f"clip_vision_width={sizes.vision_width} must be a multiple of clip_vision_head_width")
    vision = CLIPVisionCfg(image_size=sizes.image_size, patch_size=sizes.patch_size, width=sizes.vision_width,
                           layers=sizes.vision_layers, head_width=sizes.vision_head_width)
    text = CLIPTextCfg(context_length=sizes.context_length, vocab_size=sizes.vocab_size, width=sizes.text_width,
                       heads=sizes.text_heads, layers=sizes.text_layers)
    return CLIP(embed_dim=sizes.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


class _Tower(StreamEncoder):
    """Common block access for both towers (open_clip ``Transformer`` under ``self.transformer``)."""

    transformer: nn.Module
    stream_name: str = ""
    causal: bool = False

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual attention blocks (open_clip ``ResidualAttentionBlock``)."""
        return self.transformer.resblocks

    @property
    def width(self) -> int:
        return int(self.transformer.width)

    @property
    def info(self) -> StreamInfo:
        heads = int(self.blocks[0].attn.num_heads)
        return StreamInfo(self.stream_name, self.width, len(self.blocks), heads, (self.stream_name,),
                          causal=self.causal, masks_padding=False)

    def query_parts(self, index: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        return open_clip_query_parts(self.blocks[index])

    def attention_mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The tower's attention mask for a sequence of `length` tokens (CLIP masks no padding)."""
        return None

    def run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None,
                  adapters: Mapping[str, WeightAdapter] | None = None, key_mask: bool = False) -> torch.Tensor:
        """Block ``index`` on batch-first ``x`` [B, L, D] (`residual_block`); `mask` (real tokens) is unused unless
        `key_mask`: CLIP attends to padding; the text tower's causal mask follows the current length. Only the
        positions `query_index` when given, the maps named in `adapters` through them (`StreamEncoder.run_block`). A
        causal tower's block over the whole square sequence (no prompt keys / values, every query) passes SDPA
        `is_causal` instead of the mask tensor. `key_mask` (a method's ``masks_padding_keys``): the keys where `mask`
        is False are hidden from every query as well, itself included (Hugging Face's CLIP text model with an
        attention mask)."""
        if key_mask and mask is not None:
            return residual_block(self.blocks[index], x, self.padding_mask(mask), kv_prefix, query_index,
                                  adapters=adapters)
        if self.causal and kv_prefix is None and query_index is None:
            return residual_block(self.blocks[index], x, is_causal=True, adapters=adapters)
        attn_mask = self.attention_mask(x.shape[1], x.device, x.dtype)
        return residual_block(self.blocks[index], x, attn_mask, kv_prefix, query_index, adapters=adapters)

    def padding_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool [B, 1, L, L] (True = attend): the real keys of every row (`mask` [B, L]), and only earlier ones on a
        causal tower."""
        allowed = mask[:, None, None, :]
        if self.causal:
            n = mask.shape[1]
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril_()
        return allowed

    def linear_map(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return open_clip_linear_map(self.blocks[index], name)


def open_clip_linear_map(block: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) views of map `name` of an open_clip ``ResidualAttentionBlock``: q / k / v are row slices
    of the fused ``attn.in_proj_weight`` / ``in_proj_bias`` (never copied), out is ``attn.out_proj``, fc1 / fc2 the
    MLP's ``c_fc`` / ``c_proj``."""
    attn = block.attn
    if name in QKV_MAPS:
        c = attn.embed_dim
        rows = slice(QKV_MAPS.index(name) * c, (QKV_MAPS.index(name) + 1) * c)
        bias = attn.in_proj_bias
        return attn.in_proj_weight[rows], None if bias is None else bias[rows]
    linear = {"out": attn.out_proj, "fc1": block.mlp.c_fc, "fc2": block.mlp.c_proj}[name]
    return linear.weight, linear.bias


def open_clip_mlp(mlp: nn.Module, h: torch.Tensor, adapters: Mapping[str, WeightAdapter]) -> torch.Tensor:
    """open_clip's block MLP (``c_fc``, activation, optional norm, ``c_proj``) with the maps fc1 / fc2 through their
    adapters; `block_mlp` when neither is adapted."""
    if not any(name in adapters for name in MLP_MAPS):
        return block_mlp(mlp, h)
    for name, module in mlp.named_children():
        if name == "c_fc":
            h = adapted_linear(h, module.weight, module.bias, adapters.get("fc1"))
        elif name == "c_proj":
            h = adapted_linear(h, module.weight, module.bias, adapters.get("fc2"))
        else:
            h = module(h)
    return h


def open_clip_query_parts(block: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """An open_clip ``ResidualAttentionBlock``'s ``ln_1`` and fused ``attn.in_proj_weight`` / ``in_proj_bias`` (rows
    q, k, v): what ``StreamEncoder.block_query`` reads."""
    return block.ln_1, block.attn.in_proj_weight, block.attn.in_proj_bias


def residual_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                   query_index: torch.Tensor | None = None, is_causal: bool = False,
                   adapters: Mapping[str, WeightAdapter] | None = None) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` on batch-first ``x`` [B, L, D] with fused SDPA.

    Computes ``block(x, attn_mask=attn_mask)``: x + ls_1(MHA(ln_1 x)), then + ls_2(MLP(ln_2 x)), with the block's
    own weights. It does not call ``block.attn`` (``nn.MultiheadAttention``): that module moves the sequence first
    with a transpose, and when ``x`` needs gradients (prompt tokens in the sequence) ``torch.matmul`` then runs the
    QKV projection as a batched matmul over L copies of the weight; here the projection is one matmul on the
    contiguous input (DCP's CPU training step: 48 % of its time was that batched matmul).

    ``attn_mask``: additive [L, L] (the text tower's causal mask) or boolean (True = attend), [L, L] or per row
    [B, 1, L, L].
    ``kv_prefix``: raw keys / values [B, P, D] (after the in-projection) put in front of the sequence's and visible
    to every query — MAP's attention-level prompts (§3.3).
    ``query_index``: long [B]; only that position of each row is computed -> [B, 1, D] (its row of the mask).
    ``is_causal``: causal attention without a mask tensor (in place of the additive causal ``attn_mask``).
    ``adapters``: map name -> weight adapter (``open_clip_linear_map`` names the maps); those maps through them.
    """
    attn = block.attn
    if attn.dropout or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
        raise ValueError("residual_block supports open_clip's plain self-attention only")
    adapters = adapters or {}
    q, k, v = project_qkv(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias, query_index, adapters)
    if query_index is not None:
        x = take_rows(x, query_index)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask[query_index][:, None, None, :]
        elif attn_mask is not None:                                   # per-row masks [B, 1, L, L]
            rows = torch.arange(x.shape[0], device=x.device)
            attn_mask = attn_mask[rows, :, query_index][:, :, None, :]
    out = prefixed_attention(q, k, v, attn.num_heads, attn_mask, kv_prefix, is_causal=is_causal)
    x = x + block.ls_1(attn.out_proj(out) if not adapters else
                       adapted_linear(out, attn.out_proj.weight, attn.out_proj.bias, adapters.get("out")))
    if adapters:
        return x + block.ls_2(open_clip_mlp(block.mlp, block.ln_2(x), adapters))
    return x + block.ls_2(block_mlp(block.mlp, block.ln_2(x)))


QUICK_GELU_SCALE = 1.702
"""open_clip's ``QuickGELU``: x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""


def block_mlp(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """open_clip's block MLP ``c_proj(act(c_fc(h)))``.

    With ``QuickGELU`` the constant folds away: x * sigmoid(a x) = silu(a x) / a, so the MLP is
    ``c_proj(silu(a c_fc(h)) / a)``: one fused SiLU pass forward and one backward, where the module runs seven
    elementwise passes over the [N, 4D] hidden tensor and keeps two more of them for the backward (DCP's CPU
    training step spent 12 % of its time there). The factors a and 1/a ride on the two matmuls as ``addmm``'s
    ``alpha`` / ``beta``: no scaled copy of a weight is made, so autograd keeps only views of the module's own
    weights for the backward (a scaled copy per call kept ~300 MB of weight copies alive until the backward of CLIP
    ViT-B/16). The same function up to float rounding (tests/test_clip_backbone.py)."""
    from open_clip.transformer import QuickGELU   # the class whose constant is folded, nothing that looks like it

    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if not (isinstance(getattr(mlp, "gelu", None), QuickGELU) and isinstance(fc, nn.Linear)
            and isinstance(proj, nn.Linear) and fc.bias is not None and proj.bias is not None):
        return mlp(h)
    a, rows = QUICK_GELU_SCALE, h.reshape(-1, h.shape[-1])
    hidden = F.silu(torch.addmm(fc.bias, rows, fc.weight.t(), beta=a, alpha=a))       # silu(a (h W^T + b))
    out = torch.addmm(proj.bias, hidden, proj.weight.t(), alpha=1.0 / a)             # hidden W^T / a + b
    return out.reshape(*h.shape[:-1], out.shape[-1])


class ClipVisionTower(_Tower):
    """Vision tower, the ``"image"`` stream (§5.2)."""

    stream_name = IMAGE

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "ln_pre", "transformer", "ln_post"):
            setattr(self, name, getattr(visual, name))
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.proj = visual.proj

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B,3,H,W] -> ``ln_pre`` output [B, 1+N, D] (block-0 input)."""
        x = self.conv1(image.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor, cls_index: int = 0) -> torch.Tensor:
        """Token ``cls_index`` of the last block output -> ``ln_post`` -> @ ``proj`` -> [B, E]."""
        return self.ln_post(x[:, cls_index]) @ self.proj

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Plain CLIP image features (no prompts)."""
        x = self.embed(image)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x)
        return self.pool(x)


class ClipTextTower(_Tower):
    """Text tower, the ``"text"`` stream (§5.2): causal attention."""

    stream_name = TEXT
    causal = True

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        for name in ("transformer", "token_embedding", "ln_final"):
            setattr(self, name, getattr(clip_model, name))
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        if not isinstance(self.text_projection, nn.Parameter):
            raise ValueError("open_clip built a text projection module; expected the OpenAI [width, embed] matrix")

    def position_table(self) -> torch.Tensor:
        """The text positions' additive embeddings [77, D] (``embed`` adds them to the token embeddings)."""
        return self.positional_embedding

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def embed(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Ids [B, 77] -> token + positional embeddings [B, 77, D] (not layer-normed, §6.4)."""
        if text_ids.shape[1] != self.context_length:
            raise ValueError(f"text_ids has length {text_ids.shape[1]}; CLIP needs exactly {self.context_length}")
        return self.token_embedding(text_ids) + self.positional_embedding.to(self.token_embedding.weight.dtype)

    @staticmethod
    def causal_mask(length: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive [length, length] mask, -inf above the diagonal (prompt tokens included, §6.4)."""
        return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)

    def attention_mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The causal mask of the current length, made once per (length, device, dtype) rather than per block."""
        key = (length, device, dtype, torch.is_inference_mode_enabled())   # no inference tensor in autograd
        cached = getattr(self, "_causal_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.causal_mask(length, device, dtype))
            self._causal_cache = cached
        return cached[1]

    def pool(self, x: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Data-token outputs [B, 77, D] -> ``ln_final`` -> EOT (= argmax id) -> @ ``text_projection``."""
        eot = text_ids.argmax(dim=-1)
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]) @ self.text_projection

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Plain CLIP text features (no prompts)."""
        x = self.embed(text_ids)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x)
        return self.pool(x, text_ids)

    def unordered(self, text_ids: torch.Tensor) -> torch.Tensor:
        """The ``unordered`` text feature [B, E]: every token gets position embedding 1 and attends to every real
        token (up to EOT, no causal mask), then ``ln_final`` -> EOT -> @ ``text_projection``. What a Hugging Face
        ``CLIPTextModel`` gives when its embeddings receive the all-ones attention mask as ``position_ids`` and its
        encoder runs without the causal mask (a retriever's text features in RAGPT's reference, RAGPT-D6): a
        function of the token multiset and the EOT."""
        eot = text_ids.argmax(dim=-1, keepdim=True)
        real = torch.arange(text_ids.shape[1], device=text_ids.device) <= eot
        x = self.token_embedding(text_ids) + self.positional_embedding[1].to(self.token_embedding.weight.dtype)
        for block in self.blocks:
            x = residual_block(block, x, real[:, None, None, :])
        return self.pool(x, text_ids)


def batch_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


class TwoTowerBackbone(Backbone):
    """What the open_clip two-tower backbones (CLIP, CoCa) share: ``image_encoder`` / ``text_encoder`` towers with
    ``ln_post``, ``proj``, ``ln_final``, a ``text_projection`` of the joint width, and ``logit_scale``."""

    image_encoder: nn.Module
    text_encoder: nn.Module
    logit_scale: nn.Parameter

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.text_projection.shape[1])

    def encoders(self) -> dict[str, StreamEncoder]:
        return {IMAGE: self.image_encoder, TEXT: self.text_encoder}

    def embed_image(self, batch: Batch, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 TokenLayout]:
        """The image stream's block-0 input: CLS + patches, all real tokens."""
        x = self.image_encoder.embed(batch_rows(batch["image"], rows))
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), TokenLayout([(IMAGE, x.shape[1])])

    def build_head(self, num_classes: int) -> nn.Module:
        """Linear(2E, C), N(0, 0.02) / 0 (§6.5)."""
        head = nn.Linear(2 * self.embed_dim, num_classes)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def trainable_parts(self) -> list[nn.Module | nn.Parameter]:
        """The backbone parts DCP trains (§6.6: ``ln_post``, ``ln_final``, visual ``proj``), trained under every method
        so that methods compare alike."""
        return [self.image_encoder.ln_post, self.text_encoder.ln_final, self.image_encoder.proj]

    def optional_parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """``text_projection``: the text tower's output projection (frozen unless a method asks)."""
        return {"text_projection": [self.text_encoder.text_projection]}

    def untrained_parts(self) -> list[nn.Module | nn.Parameter]:
        return [self.logit_scale]

    def frozen_parts(self) -> list[nn.Module]:
        return [self.image_encoder, self.text_encoder]


class ClipBackbone(TwoTowerBackbone):
    """The two CLIP towers (``image_encoder``, ``text_encoder``) and ``logit_scale`` (used by no classifier)."""

    described_as = "the CLIP backbone (clip_vision_layers, clip_text_layers)"
    text_feature_variants = ("unordered",)
    """Text features besides the tower's own, for retrieval (``RetrievalRequest.text_features``)."""

    def text_feature(self, batch: Batch, variant: str) -> torch.Tensor:
        """The text feature `variant` [B, E] of the batch's complete texts (``ClipTextTower.unordered``)."""
        if variant != "unordered":
            raise ValueError(f"text feature {variant!r}: one of {self.text_feature_variants}")
        return self.text_encoder.unordered(batch["text_ids"])

    def __init__(self, sizes: ClipSizes) -> None:
        super().__init__()
        oc = _build_open_clip(sizes)
        self.sizes = sizes
        self.image_encoder = ClipVisionTower(oc.visual)
        self.text_encoder = ClipTextTower(oc)
        self.logit_scale = oc.logit_scale

    # --- the Backbone protocol (mdpl.backbones.base) ------------------------------------------------
    def embed(self, stream: str, batch: Batch,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Image: CLS + patches, all real; text: the 77 positions, real where the id is not 0 (padding)."""
        if stream == IMAGE:
            return self.embed_image(batch, rows)
        ids = batch_rows(batch["text_ids"], rows)
        x = self.text_encoder.embed(ids)
        return x, ids != 0, TokenLayout([(TEXT, x.shape[1])])

    def readout(self, stream: str, layout: TokenLayout, batch: Batch,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The image CLS, or the text EOT (= the largest id), wherever the prompts moved them."""
        if stream == IMAGE:
            n = batch["image"].shape[0] if rows is None else rows.shape[0]
            return torch.full((n,), layout.offset(IMAGE), dtype=torch.long, device=batch["image"].device)
        return batch_rows(batch["text_ids"], rows).argmax(dim=-1) + layout.offset(TEXT)

    def token_ids(self, stream: str, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The text stream's BPE ids [B, 77] (``PromptContext.token_ids``); None for the image stream."""
        return batch_rows(batch["text_ids"], rows) if stream == TEXT else None

    def needed_length(self, stream: str, batch: Batch) -> int | None:
        """Text: up to the last EOT of the batch (causal attention: later positions cannot change it), from the
        collator's host-side ``text_len_host`` when present (no device sync)."""
        if stream != TEXT:
            return None
        if "text_len_host" in batch:
            return int(batch["text_len_host"])
        return int((batch["text_ids"] != 0).sum(dim=1).max())

    def pool(self, stream: str, token: torch.Tensor) -> torch.Tensor:
        """f_v = ln_post(CLS) @ proj; f_t = ln_final(EOT) @ text_projection (§5.2)."""
        if stream == IMAGE:
            return self.image_encoder.ln_post(token) @ self.image_encoder.proj
        return self.text_encoder.ln_final(token) @ self.text_encoder.text_projection

    # --- weights ------------------------------------------------------------------------------------
    def load_openai_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load an OpenAI-layout state dict (``visual.*``, text keys, ``logit_scale``)."""
        mapped = {openai_to_backbone_key(k): v for k, v in state_dict.items()}
        check_state_dict(mapped, self.state_dict(), what="OpenAI CLIP checkpoint")
        self.load_state_dict(mapped, strict=True)

    def openai_state_dict(self) -> dict[str, torch.Tensor]:
        """This backbone's weights in OpenAI layout."""
        return {backbone_to_openai_key(k): v for k, v in self.state_dict().items()}


def build_clip_backbone(run: Any) -> ClipBackbone:
    """ClipBackbone from the run config's sizes with the weights of ``clip_path`` (`load_pretrained`: random init +
    warning if empty; not read with ``test_only``)."""
    sizes: ClipSizes = run.backbone
    backbone = ClipBackbone(sizes)
    return load_pretrained(backbone, sizes.path, sizes.sha256, run.trainer.test_only, CLIP.weights, "CLIP",
                           backbone.load_openai_state_dict)


CLIP = register_backbone(BackboneCard(
    name="clip", build=build_clip_backbone, weights_file="ViT-B-16.pt", sizes=ClipSizes, tokenizer="bpe", transform="clip",
    weights=WeightsSpec(key="clip_path", sha_key="clip_sha256", placeholder="<ViT-B-16.pt>", example="ViT-B-16.pt",
                        what="a local ViT-B-16.pt (OpenAI JIT archive) or an OpenAI-layout CLIP state dict",
                        read=read_openai_checkpoint),
    model_keys=("clip_embed_dim", "image_size", "clip_patch_size", "clip_vision_width", "clip_vision_layers",
                "clip_vision_head_width", "clip_text_width", "clip_text_heads", "clip_text_layers")))
