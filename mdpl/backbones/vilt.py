"""ViLT single-stream backbone (Kim et al., ICML 2021) as used by MAP and MemPrompt (docs/methods.md §2).

One stream, ``"joint"`` = ``[text ; image]`` tokens: embed -> ``transformer.forward_blocks`` (the encoder protocol,
``mdpl.backbones.encoder``) -> ``transformer.norm`` -> pooler on the text [CLS] -> the MLP head of §2.1.

Module names match the ViLT checkpoint keys of docs/methods.md §2.2 (``text_embeddings.*``,
``token_type_embeddings.*``, ``transformer.{cls_token,pos_embed,patch_embed.proj,blocks.i.*,norm}``,
``pooler.dense.*``), so that checkpoint loads directly (see `mdpl.backbones.vilt_weights`).

Differences from the reference that do not change outputs (§2.3, D-24): the visual embedding is
vectorised (no per-image loop) and deterministic — valid patches in row-major order, then padding
patches (the bottom-right patch of the padded grid, which is a zero patch like every padding patch).
With a positive ``max_image_len`` cap the first ``cap`` valid patches are kept (the reference keeps a
random subset).
"""
from __future__ import annotations

import warnings
import dataclasses
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from transformers.models.bert.modeling_bert import BertConfig, BertEmbeddings

from mdpl.backbones.attention import adapted_linear, prefixed_attention, project_qkv, take_rows
from mdpl.backbones.base import Backbone, Batch
from mdpl.backbones.card import BackboneCard, BackboneSizes, WeightsSpec
from mdpl.backbones.encoder import StreamEncoder
from mdpl.backbones.registry import register_backbone
from mdpl.backbones.vilt_weights import load_reference_checkpoint, load_vilt_checkpoint
from mdpl.errors import UserInputError
from mdpl.prompts.adapters import QKV_MAPS, WeightAdapter
from mdpl.prompts.base import JOINT, MethodConfig, PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout

VIT_LN_EPS = 1e-6   # timm ViT LayerNorm (§2.1)
BERT_LN_EPS = 1e-12  # BERT embeddings LayerNorm (§2.1)
VARIANT_LN_EPS = {"map": VIT_LN_EPS, "hf": BERT_LN_EPS}
"""``vilt_variant`` -> epsilon of the blocks' and the final LayerNorm: the original (timm) ViLT of MAP's lineage, or
Hugging Face's ``ViltModel`` (``layer_norm_eps`` 1e-12), which RAGPT's baselines (MSPs, §16) run on."""


def _init_linear_embedding(module: nn.Module, std: float = 0.02) -> None:
    """Reference `init_weights`: Linear/Embedding N(0, std), biases 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Pooler(nn.Module):
    """ViLT pooler: tanh(W h + b) of one token (§2.1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(token))


class PatchEmbed(nn.Module):
    """Conv patch embedding, kernel = stride = patch size, with bias."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image)


def timm_mlp(mlp: nn.Module, h: torch.Tensor, adapters: Mapping[str, WeightAdapter]) -> torch.Tensor:
    """timm's ``Mlp`` forward (fc1, act, drop1, norm, fc2, drop2) with fc1 / fc2 through their adapters."""
    z = mlp.drop1(mlp.act(adapted_linear(h, mlp.fc1.weight, mlp.fc1.bias, adapters.get("fc1"))))
    return mlp.drop2(adapted_linear(mlp.norm(z), mlp.fc2.weight, mlp.fc2.bias, adapters.get("fc2")))


class ViLTVisionTransformer(StreamEncoder):
    """The ViT part of ViLT (``transformer.*`` keys): patch embed, CLS, position grid, blocks, norm; the encoder
    of the joint stream."""

    def __init__(self, *, hidden_size: int, num_layers: int, num_heads: int, mlp_ratio: float,
                 patch_size: int, image_size: int, drop_rate: float, ln_eps: float = VIT_LN_EPS):
        super().__init__()
        if image_size % patch_size:
            raise UserInputError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise UserInputError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, hidden_size))
        self.pos_drop = nn.Dropout(drop_rate)
        norm = partial(nn.LayerNorm, eps=ln_eps)
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=drop_rate,
                  attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=norm)
            for _ in range(num_layers)
        )
        self.norm = norm(hidden_size)

    @property
    def info(self) -> StreamInfo:
        return StreamInfo(JOINT, self.pos_embed.shape[-1], len(self.blocks), self.num_heads, (TEXT, IMAGE),
                          causal=False, masks_padding=True)

    def query_parts(self, index: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        """timm block: ``norm1`` and ``attn.qkv``."""
        blk = self.blocks[index]
        return blk.norm1, blk.attn.qkv.weight, blk.attn.qkv.bias

    def run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None,
                  adapters: Mapping[str, WeightAdapter] | None = None) -> torch.Tensor:
        """timm pre-LN ``Block`` `index` with a key-padding mask; optional prompt K/V after the projection (§3.3);
        only the positions `query_index` when given; the maps named in `adapters` through them
        (`StreamEncoder.run_block`)."""
        blk = self.blocks[index]
        attn = blk.attn
        adapters = adapters or {}
        h = blk.norm1(x)
        q, k, v = project_qkv(h, attn.qkv.weight, attn.qkv.bias, query_index, adapters)
        out = prefixed_attention(q, k, v, attn.num_heads, mask[:, None, None, :], kv_prefix,
                                 attn.attn_drop.p if attn.training else 0.0)
        x = x if query_index is None else take_rows(x, query_index)
        projected = adapted_linear(attn.norm(out), attn.proj.weight, attn.proj.bias, adapters.get("out"))
        x = x + blk.drop_path1(blk.ls1(attn.proj_drop(projected)))
        h = blk.norm2(x)
        mlp = blk.mlp(h) if not adapters else timm_mlp(blk.mlp, h, adapters)
        return x + blk.drop_path2(blk.ls2(mlp))

    def linear_map(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q / k / v: row slices of the fused ``attn.qkv``; out: ``attn.proj``; fc1 / fc2: the MLP's."""
        blk = self.blocks[index]
        if name in QKV_MAPS:
            c = blk.attn.qkv.in_features
            rows = slice(QKV_MAPS.index(name) * c, (QKV_MAPS.index(name) + 1) * c)
            bias = blk.attn.qkv.bias
            return blk.attn.qkv.weight[rows], None if bias is None else bias[rows]
        linear = {"out": blk.attn.proj, "fc1": blk.mlp.fc1, "fc2": blk.mlp.fc2}[name]
        return linear.weight, linear.bias

    def reset_parameters(self) -> None:
        """timm-style init used when no checkpoint is loaded (reference `_init_weights`)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


@dataclass
class BackboneOutput:
    """Final hidden states (after `transformer.norm`), key mask and token layout."""

    hidden: torch.Tensor   # [B, N, D]
    mask: torch.Tensor     # bool [B, N]
    layout: TokenLayout


def _align_corners_source(dst: torch.Tensor, out_size: torch.Tensor, in_size: int,
                          dtype: torch.dtype = torch.float32):
    """Bilinear align_corners=True source taps for output index `dst` of a resize in_size -> out_size.

    Mirrors PyTorch's upsample kernel: scale = (in-1)/(out-1) (0 if out == 1), src = scale*dst,
    i0 = floor(src), i1 = min(i0+1, in-1), weight of i1 = src - i0 — computed in `dtype` (the
    table's: the kernel's accumulation type is float for float32 and double for float64 inputs).
    """
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # half/bfloat16 tables: the kernel computes taps in float
    denom = (out_size - 1).clamp(min=1).to(dtype)
    scale = torch.where(out_size > 1, float(in_size - 1) / denom, torch.zeros_like(denom))
    src = scale * dst.to(dtype)
    i0 = src.floor().long().clamp(max=in_size - 1)
    lam = src - i0.to(dtype)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, lam


@dataclass(frozen=True)
class ViLTSizes(BackboneSizes):
    """ViLT's config section (its keys have these names); defaults: ViLT-B/32 (§2.1)."""

    TINY: ClassVar[Mapping[str, Any]] = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "mlp_ratio": 2,
                                         "patch_size": 16}
    described_as: ClassVar[str] = "the ViLT backbone (num_layers)"

    vocab_size: int = 30522           # checked against the tokenizer; a mismatch is an error
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 32
    image_size: int = 384             # 'pixelbert' shorter side
    max_text_len: int = 40            # BERT tokens per text (padded); the tokenizer checks its minimum
    drop_rate: float = 0.1
    max_image_len: int = dataclasses.field(default=-1, metadata={"minimum": -1})  # cap on image patches (-1: none)
    # interpolate the checkpoint's 40 text positions to a longer max_text_len (the reference does on every task)
    interpolate_text_positions: bool = False
    # LayerNorm epsilon of the blocks and the final norm: 'map' (timm ViLT, 1e-6) | 'hf' (Hugging Face ViltModel, 1e-12)
    vilt_variant: str = "map"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ViLTSizes":
        return cls.from_flat(config)

    def encoder_sizes(self) -> dict[str, Any]:
        """The keyword arguments of `ViLTBackbone`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "interpolate_text_positions"}

    def check(self) -> None:
        super().check()
        if self.vilt_variant not in VARIANT_LN_EPS:
            raise UserInputError(f"vilt_variant={self.vilt_variant!r}; choose map (timm ViLT, LayerNorm eps 1e-6) or hf "
                                 "(Hugging Face ViltModel, eps 1e-12)")
        if self.max_image_len == 0:
            raise UserInputError(f"max_image_len={self.max_image_len!r} must be -1 (no cap) or a positive number of "
                                 "image patches")
        if not (isinstance(self.drop_rate, (int, float)) and not isinstance(self.drop_rate, bool)
                and 0.0 <= self.drop_rate < 1.0):
            raise UserInputError(f"drop_rate={self.drop_rate!r} must be a number in [0, 1) (a dropout probability, "
                                 "e.g. drop_rate=0.1)")
        if not (isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
                and self.mlp_ratio > 0):
            raise UserInputError(f"mlp_ratio={self.mlp_ratio!r} must be a number > 0 (MLP width / hidden_size, "
                                 "e.g. mlp_ratio=4)")
        if self.hidden_size % self.num_heads:
            raise UserInputError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                                 "each attention head gets hidden_size / num_heads channels (e.g. hidden_size=768 "
                                 "num_heads=12)")
        if self.image_size < 32:
            raise UserInputError(f"image_size={self.image_size} is too small for ViLT: its transform scales the "
                                 "shorter image side to image_size and floors both sides to multiples of 32, so "
                                 "image_size must be >= 32 (e.g. image_size=384)")
        if self.image_size % self.patch_size:
            raise UserInputError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}: "
                                 "ViLT's position grid has image_size / patch_size patches a side (e.g. "
                                 "image_size=384 patch_size=32)")

    @property
    def depth(self) -> int:
        return self.num_layers

    @property
    def stream_widths(self) -> dict[str, int]:
        return {"joint": self.hidden_size}

    @property
    def text_length(self) -> int:
        return self.max_text_len

    @property
    def text_vocab_size(self) -> int:
        return self.vocab_size


class ViLTBackbone(Backbone):
    """ViLT: BERT text embeddings + ViT-B/32 joint encoder + pooler (§2)."""

    described_as = "the ViLT backbone (num_layers)"

    def __init__(self, *, vocab_size: int = 30522, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4, patch_size: int = 32, image_size: int = 384,
                 max_text_len: int = 40, drop_rate: float = 0.1, max_image_len: int = -1, vilt_variant: str = "map"):
        super().__init__()
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.max_text_len = max_text_len
        self.max_image_len = max_image_len
        bert = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, intermediate_size=int(hidden_size * mlp_ratio),
                          max_position_embeddings=max_text_len, hidden_dropout_prob=drop_rate,
                          attention_probs_dropout_prob=drop_rate, layer_norm_eps=BERT_LN_EPS)
        self.text_embeddings = BertEmbeddings(bert)
        _init_linear_embedding(self.text_embeddings)
        self.token_type_embeddings = nn.Embedding(2, hidden_size)
        _init_linear_embedding(self.token_type_embeddings)
        self.transformer = ViLTVisionTransformer(
            hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
            patch_size=patch_size, image_size=image_size, drop_rate=drop_rate, ln_eps=VARIANT_LN_EPS[vilt_variant])
        self.transformer.reset_parameters()
        self.pooler = Pooler(hidden_size)
        _init_linear_embedding(self.pooler)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ViLTBackbone":
        """Sizes from a flat config (the keys of config.py)."""
        return cls(**ViLTSizes.from_flat(config).encoder_sizes())

    # --- the Backbone protocol (mdpl.backbones.base) ------------------------------------------------
    def encoders(self) -> dict[str, StreamEncoder]:
        return {JOINT: self.transformer}

    def embed(self, stream: str, batch: Batch,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """The joint ``[text ; image]`` input of every row (ViLT has one stream: nothing to skip)."""
        if rows is not None:
            raise ValueError("the ViLT joint stream runs on every row")
        return self.embed_joint(batch["text_ids"], batch["text_masks"], batch["image"], batch.get("image_sizes"),
                                batch.get("image_sizes_host"))

    def readout(self, stream: str, layout: TokenLayout, batch: Batch,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The text [CLS], wherever the prompts moved it."""
        n = batch["text_ids"].shape[0]
        return torch.full((n,), layout.offset(TEXT), dtype=torch.long, device=batch["text_ids"].device)

    def pool(self, stream: str, token: torch.Tensor) -> torch.Tensor:
        """tanh(W norm(h_[CLS]) + b) (§2.1)."""
        return self.pooler(self.transformer.norm(token))

    def build_head(self, num_classes: int) -> nn.Module:
        return build_vilt_head(self.hidden_size, num_classes)

    def trainable_parts(self) -> list[nn.Module | nn.Parameter]:
        return [self.pooler]

    def frozen_parts(self) -> list[nn.Module]:
        return [self.transformer, self.text_embeddings, self.token_type_embeddings]

    # --- embeddings -------------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """BERT embeddings + modality embedding 0: [B, Lt, D] (§2.4)."""
        if text_ids.shape[1] > self.max_text_len:
            raise ValueError(f"text length {text_ids.shape[1]} exceeds max_text_len {self.max_text_len}")
        return self.text_embeddings(input_ids=text_ids) + self.token_type_embeddings.weight[0]

    def patch_grid(self, image: torch.Tensor, image_sizes: torch.Tensor | None = None):
        """Valid patch rows h and columns w per image (§2.3 step 2), each int64 [B].

        From `image_sizes` (valid pixel h, w): ceil(pixels / patch). Otherwise the reference rule:
        a patch is valid iff its top-left pixel has a non-zero channel sum; h counts valid patch
        rows down the first column, w valid columns along the first row.
        """
        p = self.transformer.patch_size
        hp, wp = image.shape[-2] // p, image.shape[-1] // p
        if image_sizes is not None:
            sizes = image_sizes.to(image.device).long()
            h = torch.div(sizes[:, 0] + p - 1, p, rounding_mode="floor").clamp(1, hp)
            w = torch.div(sizes[:, 1] + p - 1, p, rounding_mode="floor").clamp(1, wp)
            return h, w
        valid = (image.sum(dim=1) != 0).float()[:, None]
        valid = F.interpolate(valid, size=(hp, wp), mode="nearest").long()[:, 0]
        h = valid[:, :, 0].sum(dim=1).clamp(min=1)
        w = valid[:, 0, :].sum(dim=1).clamp(min=1)
        return h, w

    def _grid_positions(self, rows: torch.Tensor, cols: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
        """Position embeddings at (rows, cols) of the G×G grid resized to h×w, bilinear align_corners=True.

        rows/cols [B, M], h/w [B]; returns [B, M, D] — the gather of the reference's per-image
        `F.interpolate` (§2.3 step 3) without a loop over images.
        """
        g = self.transformer.grid
        table = self.transformer.pos_embed[0, 1:].view(g, g, -1)
        y0, y1, ly = _align_corners_source(rows, h[:, None], g, table.dtype)
        x0, x1, lx = _align_corners_source(cols, w[:, None], g, table.dtype)
        ly, lx = ly[..., None].to(table.dtype), lx[..., None].to(table.dtype)
        top = (1 - lx) * table[y0, x0] + lx * table[y0, x1]
        bottom = (1 - lx) * table[y1, x0] + lx * table[y1, x1]
        return (1 - ly) * top + ly * bottom

    def max_valid_patches(self, host_sizes: Sequence[Sequence[int]], hp: int, wp: int) -> int:
        """max_b h_b * w_b of `patch_grid` computed on the host from Python (h, w) pixel sizes (no device sync)."""
        p = self.transformer.patch_size
        return max(min(max(-(-int(h) // p), 1), hp) * min(max(-(-int(w) // p), 1), wp) for h, w in host_sizes)

    def embed_image(self, image: torch.Tensor, image_sizes: torch.Tensor | None = None,
                    host_sizes: Sequence[Sequence[int]] | None = None):
        """Visual tokens [B, 1+M, D] (with modality embedding 1) and bool mask [B, 1+M] (§2.3).

        `host_sizes` (optional, with `image_sizes`): the same sizes as Python ints (the collator's
        ``image_sizes_host``), so M = max valid patches is known without a host-device sync.
        """
        patches = self.transformer.patch_embed(image)  # [B, D, Hp, Wp]
        b, d, hp, wp = patches.shape
        h, w = self.patch_grid(image, image_sizes)
        n_valid = h * w
        if image_sizes is not None and host_sizes is not None and len(host_sizes) == b:
            m = self.max_valid_patches(host_sizes, hp, wp)
        else:
            m = int(n_valid.max())
        if self.max_image_len is not None and self.max_image_len > 0:
            m = min(m, int(self.max_image_len))
        slot = torch.arange(m, device=image.device)[None]            # [1, M]
        valid = slot < n_valid[:, None]                               # [B, M]
        rows = torch.div(slot, w[:, None], rounding_mode="floor")
        cols = slot - rows * w[:, None]
        flat = torch.where(valid, rows * wp + cols, torch.full_like(rows, hp * wp - 1))
        tokens = patches.flatten(2).transpose(1, 2).gather(1, flat[..., None].expand(-1, -1, d))
        pos = self._grid_positions(rows.clamp(max=hp - 1), cols, h, w) * valid[..., None].to(tokens.dtype)
        vit = self.transformer
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, tokens + pos], dim=1)
        x = vit.pos_drop(x) + self.token_type_embeddings.weight[1]
        mask = torch.cat([valid.new_ones(b, 1), valid], dim=1)
        return x, mask

    def embed_joint(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor,
                    image_sizes: torch.Tensor | None = None, host_sizes: Sequence[Sequence[int]] | None = None):
        """Joint input [text ; image], bool key mask and its layout (§2.4)."""
        text = self.embed_text(text_ids)
        img, img_mask = self.embed_image(image, image_sizes, host_sizes)
        x = torch.cat([text, img.to(text.dtype)], dim=1)
        mask = torch.cat([text_masks.bool(), img_mask], dim=1)
        return x, mask, TokenLayout([(TEXT, text.shape[1]), (IMAGE, img.shape[1])])

    # --- plain ViLT (no prompts) ---------------------------------------------------------------------
    def forward_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor,
                         image_sizes: torch.Tensor | None = None) -> BackboneOutput:
        """Embed, every block (no prompts), final LayerNorm."""
        x, mask, layout = self.embed_joint(text_ids, text_masks, image, image_sizes)
        ctx = PromptContext(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        x, mask, layout = self.transformer.forward_blocks(x, mask, layout, PromptMethod(MethodConfig(), self.info), ctx)
        return BackboneOutput(hidden=self.transformer.norm(x), mask=mask, layout=layout)

    def forward(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor,
                image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Plain ViLT pooled output (text [CLS]) without prompts."""
        out = self.forward_features(text_ids, text_masks, image, image_sizes)
        return self.pooler(out.hidden[:, out.layout.offset(TEXT)])


HEAD_LN_EPS = 1e-5


def build_vilt_head(hidden_size: int, num_classes: int) -> nn.Sequential:
    """Linear(D, 2D) -> LayerNorm(2D, eps 1e-5) -> GELU -> Linear(2D, C); N(0, 0.02) weights, zero biases (§2.1)."""
    head = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.LayerNorm(2 * hidden_size, eps=HEAD_LN_EPS),
                         nn.GELU(), nn.Linear(2 * hidden_size, num_classes))
    _init_linear_embedding(head)
    return head


def build_vilt_backbone(run: Any) -> ViLTBackbone:
    """ViLT from the run config's sizes, with the pre-trained checkpoint ``load_path`` (skipped with ``test_only``:
    the evaluated checkpoint holds every weight)."""
    sizes: ViLTSizes = run.backbone
    backbone = ViLTBackbone(**sizes.encoder_sizes())
    if run.trainer.test_only:
        return backbone
    if run.model.load_path:
        backbone.weights_report = load_vilt_checkpoint(backbone, run.model.load_path,
                                                       interpolate_text_positions=sizes.interpolate_text_positions)
    else:
        warnings.warn("load_path is empty: the ViLT backbone is randomly initialised (not a useful model; set "
                      "load_path to vilt_200k_mlm_itm.ckpt)")
    return backbone


VILT = register_backbone(BackboneCard(
    name="vilt", build=build_vilt_backbone, weights_file="vilt_200k_mlm_itm.ckpt", tokenizer_dir="bert-base-uncased", sizes=ViLTSizes, tokenizer="bert", transform="pixelbert",
    weights=WeightsSpec(key="load_path", placeholder="<vilt_200k_mlm_itm.ckpt>", example="vilt_200k_mlm_itm.ckpt",
                        what="the ViLT checkpoint file (vilt_200k_mlm_itm.ckpt) or a Hugging Face ViltModel folder"),
    model_keys=("hidden_size", "num_layers", "num_heads", "patch_size"), dynamic_text_padding=True,
    reference_reader=load_reference_checkpoint), default=True)
