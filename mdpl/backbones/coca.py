"""CoCa backbone (Yu et al., 2022; open_clip ``coca_ViT-B-32``, the backbone of DCP's appendix Table 6), exposed as
two streams of the encoder protocol (docs/methods.md §5b, docs/architecture.md).

The towers are our own :class:`~mdpl.backbones.encoder.StreamEncoder` modules that *adopt* the sub-modules of
open_clip's CoCa towers (built by the same open_clip functions ``CoCa.__init__`` calls), so their state-dict keys
are open_clip's: ``image_encoder.<k>`` <-> ``visual.<k>``, ``text_encoder.<k>`` <-> ``text.<k>``, plus
``logit_scale`` (``mdpl.backbones.coca_weights`` reads the files). CoCa's multimodal text decoder (captioning) is
not built: the classifier reads the two contrastive embeddings only.

* ``"image"``: conv -> [CLS] -> +pos -> ln_pre -> blocks -> the **attentional pooler** (``attn_pool``: learned
  queries attending over the output tokens; its first query is CoCa's contrastive image embedding) -> ``ln_post``
  -> @ ``proj``. The pooler reads every token of the last block, so this stream has no one read-out token:
  `CocaVisionTower.block_steps` runs the blocks (the method's hooks as on every stream) and, when the
  classifier asks for its read-out, returns the pooler output [B, 1, E] instead; ``pool`` applies ln_post and proj.
  ``coca_pool_prompts`` says whether the pooler also attends over the prompt tokens (default: no, data tokens only).
* ``"text"`` (the *unimodal* text tower): token + position embeddings of the 76 ids, CoCa's learned ``cls_emb``
  appended at the end (position 77) -> causal blocks -> ``ln_final`` of the appended CLS -> @ ``text_projection``.
  Besides the causal mask, open_clip's CoCa masks padding keys for every query; its (legacy) mask is shifted by one
  position: key 0 is always visible, key j >= 1 is visible when id j-1 is not padding (so SOT ... EOT and the first
  padding position), and the CLS key only when the text fills all 76 positions. The stream's ``mask`` carries
  exactly these visible keys (prompts: visible), so the layout of the data tokens is ``[text (76) ; text_cls (1)]``.

The feature is ``[f_v ; f_t]`` and the head a linear layer, as on CLIP. All sequences are batch-first ``[B, L, D]``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from mdpl.backbones.attention import adapted_linear, prefixed_attention, project_qkv, take_rows
from mdpl.backbones.base import Batch, load_pretrained
from mdpl.backbones.card import BackboneCard, WeightsSpec
from mdpl.backbones.clip import (TwoTowerBackbone, TwoTowerSizes, batch_rows, block_mlp, open_clip_linear_map, open_clip_mlp,
                                 open_clip_query_parts, residual_block)
from mdpl.backbones.coca_weights import (backbone_to_open_clip_key, check_coca_state_dict, open_clip_to_backbone_key,
                                        read_coca_checkpoint)
from mdpl.backbones.encoder import BlocksOut, StreamEncoder
from mdpl.backbones.registry import register_backbone
from mdpl.data.tokenizers import CLIP_VOCAB_SIZE
from mdpl.errors import UserInputError
from mdpl.prompts.adapters import WeightAdapter
from mdpl.prompts.base import PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout

TEXT_CLS = "text_cls"
"""Layout segment of CoCa's appended text CLS token (after the 76 text positions, prompts go in front)."""


@dataclass(frozen=True)
class CocaSizes(TwoTowerSizes):
    """CoCa's config section (keys ``coca_<field>``, and the run's ``image_size``); defaults: open_clip's
    ``coca_ViT-B-32`` (its image tower and unimodal text tower)."""

    PREFIX: ClassVar[str] = "coca_"
    described_as: ClassVar[str] = "the CoCa backbone (coca_vision_layers, coca_text_layers)"
    # coca_path: a local open_clip CoCa state dict (.bin, .pt, .safetensors)

    patch_size: int = 32
    context_length: int = dataclasses.field(default=76, metadata={"minimum": 2, "hint": (
        " (text ids: SOT, the text and EOT; coca_ViT-B-32: 76)")})   # CoCa appends its CLS token as position 77
    attn_pooler_heads: int = 8
    pool_prompts: bool = False   # True: the attentional pooler (image feature) also attends over the prompt tokens

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CocaSizes":
        return cls.from_flat(config)

    def check(self) -> None:
        super().check()
        example = ("coca_ViT-B-32: image_size=224 coca_patch_size=32, coca_vision_width=768 "
                   "coca_vision_head_width=64, coca_text_width=512 coca_text_heads=8, coca_embed_dim=512 "
                   "coca_attn_pooler_heads=8")
        for name, divisor in (("image_size", "patch_size"), ("vision_width", "vision_head_width"),
                              ("text_width", "text_heads"), ("embed_dim", "attn_pooler_heads")):
            self.require_multiple(name, divisor, example)
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise UserInputError(f"coca_vocab_size={self.vocab_size} must be {CLIP_VOCAB_SIZE}: CoCa's tokenizer "
                                 f"(OpenAI BPE) gives {CLIP_VOCAB_SIZE} token ids")


def build_open_clip_towers(sizes: CocaSizes) -> tuple[nn.Module, nn.Module]:
    """open_clip's CoCa image tower (attentional pooler) and unimodal text tower (appended CLS), randomly initialised
    by the functions ``open_clip.coca_model.CoCa`` builds them with (GELU, no QuickGELU); never downloads."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower

    for key, divisor in (("vision_width", "vision_head_width"), ("text_width", "text_heads"),
                         ("embed_dim", "attn_pooler_heads")):
        if getattr(sizes, key) % getattr(sizes, divisor):
            raise UserInputError(f"coca_{key}={getattr(sizes, key)} must be a multiple of coca_{divisor}="
                                 f"{getattr(sizes, divisor)}")
    vision = CLIPVisionCfg(image_size=sizes.image_size, patch_size=sizes.patch_size, width=sizes.vision_width,
                           layers=sizes.vision_layers, head_width=sizes.vision_head_width, attentional_pool=True,
                           attn_pooler_heads=sizes.attn_pooler_heads, output_tokens=True)
    text = CLIPTextCfg(context_length=sizes.context_length, vocab_size=sizes.vocab_size, width=sizes.text_width,
                       heads=sizes.text_heads, layers=sizes.text_layers, embed_cls=True, output_tokens=True)
    return (_build_vision_tower(sizes.embed_dim, vision, quick_gelu=False),
            _build_text_tower(sizes.embed_dim, text, quick_gelu=False))


def coca_open_clip_config(sizes: CocaSizes) -> dict[str, Any]:
    """The open_clip model config (``coca_ViT-B-32.json`` layout) of `sizes`: ``open_clip.coca_model.CoCa(**cfg)``
    builds the model whose towers these are (tests compare against it)."""
    return {"embed_dim": sizes.embed_dim,
            "vision_cfg": {"image_size": sizes.image_size, "layers": sizes.vision_layers, "width": sizes.vision_width,
                           "head_width": sizes.vision_head_width, "patch_size": sizes.patch_size,
                           "attentional_pool": True, "attn_pooler_heads": sizes.attn_pooler_heads,
                           "output_tokens": True},
            "text_cfg": {"context_length": sizes.context_length, "vocab_size": sizes.vocab_size,
                         "width": sizes.text_width, "heads": sizes.text_heads, "layers": sizes.text_layers,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": sizes.context_length, "vocab_size": sizes.vocab_size,
                               "width": sizes.text_width, "heads": sizes.text_heads, "layers": sizes.text_layers,
                               "attn_pooler_heads": sizes.attn_pooler_heads}}


def _check_plain_blocks(transformer: nn.Module) -> None:
    for block in transformer.resblocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ValueError("the CoCa towers must use open_clip's default ResidualAttentionBlock")


class CocaVisionTower(StreamEncoder):
    """Image tower, the ``"image"`` stream: CLIP's ViT blocks, then CoCa's attentional pooler over the output."""

    def __init__(self, visual: nn.Module, pool_prompts: bool = False) -> None:
        super().__init__()
        if visual.attn_pool is None or visual.attn_pool_contrastive is not None or visual.pool_type != "tok":
            raise ValueError("expected open_clip's CoCa image tower (attentional_pool=True, pool_type='tok')")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("patch dropout is not supported")
        _check_plain_blocks(visual.transformer)
        for name in ("conv1", "ln_pre", "transformer", "attn_pool", "ln_post"):
            setattr(self, name, getattr(visual, name))
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.proj = visual.proj
        self.pool_prompts = bool(pool_prompts)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def info(self) -> StreamInfo:
        return StreamInfo(IMAGE, int(self.transformer.width), len(self.blocks), int(self.blocks[0].attn.num_heads),
                          (IMAGE,), causal=False, masks_padding=False)

    def query_parts(self, index: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        return open_clip_query_parts(self.blocks[index])

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B,3,H,W] -> ``ln_pre`` output [B, 1+N, D] (block-0 input)."""
        x = self.conv1(image.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None,
                  adapters: Mapping[str, WeightAdapter] | None = None) -> torch.Tensor:
        """Block ``index`` (open_clip ``ResidualAttentionBlock``, no mask: every image token is real)."""
        return residual_block(self.blocks[index], x, None, kv_prefix, query_index, adapters=adapters)

    def linear_map(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return open_clip_linear_map(self.blocks[index], name)

    def attentional_pool(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """CoCa's contrastive image embedding before ``ln_post``: the first query of ``attn_pool`` over the last
        block's tokens [B, N, D] -> [B, E]. With a `layout` and ``pool_prompts`` off, over the image segment only
        (CLS + patches, the tokens the pooler was pre-trained on); otherwise over every token, prompts included.
        (open_clip computes all its queries; the others feed the captioning decoder, and each query's output depends
        on that query alone.)"""
        if layout is not None and not self.pool_prompts:
            x = x[:, layout.span(IMAGE)]
        pooler = self.attn_pool
        kv = pooler.ln_k(x)
        query = pooler.ln_q(pooler.query[:1]).to(kv.dtype).expand(x.shape[0], -1, -1)
        return pooler.attn(query, kv, kv, need_weights=False)[0][:, 0]

    def block_steps(self, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, method: PromptMethod,
                    ctx: PromptContext, readout=None, *args: Any, **kwargs: Any):
        """``StreamEncoder.block_steps`` with every position of the last block computed (the pooler reads them
        all); with `readout` (the classifier's read-out request) the output is the pooler's [B, 1, E], which
        ``CocaBackbone.pool`` turns into the feature; without it, the last block's tokens [B, N, D] as on any
        stream."""
        for item in super().block_steps(x, mask, layout, method, ctx, None, *args, **kwargs):
            if isinstance(item, BlocksOut):
                break
            yield item
        if readout is not None:
            item = BlocksOut(self.attentional_pool(item.x, item.layout)[:, None], item.mask, item.layout)
        yield item

    def pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooler output [B, E] -> ``ln_post`` -> @ ``proj`` -> [B, E]."""
        return self.ln_post(pooled) @ self.proj

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Plain CoCa image embedding, unnormalised (open_clip ``encode_image(normalize=False)``)."""
        x = self.embed(image)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x)
        return self.pool(self.attentional_pool(x))


class CocaTextTower(StreamEncoder):
    """Unimodal text tower, the ``"text"`` stream: causal blocks over ``[76 ids ; CLS]``, padding keys masked."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        if getattr(text, "cls_emb", None) is None or not isinstance(text.text_projection, nn.Parameter):
            raise ValueError("expected open_clip's CoCa text tower (embed_cls=True, a [width, embed] text_projection)")
        if getattr(text, "attn_mask", None) is None or getattr(text, "use_pad_mask", False):
            raise ValueError("expected open_clip's causal CoCa text tower")
        _check_plain_blocks(text.transformer)
        for name in ("token_embedding", "transformer", "ln_final"):
            setattr(self, name, getattr(text, name))
        self.positional_embedding = text.positional_embedding
        self.cls_emb = text.cls_emb
        self.text_projection = text.text_projection
        self.pad_id = int(text.pad_id)
        self.correct_cls_mask = bool(getattr(text, "correct_cls_mask", False))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def query_parts(self, index: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
        return open_clip_query_parts(self.blocks[index])

    @property
    def context_length(self) -> int:
        """Text ids per sample (76 for coca_ViT-B-32); the CLS takes one more position."""
        return int(self.positional_embedding.shape[0]) - 1

    @property
    def info(self) -> StreamInfo:
        return StreamInfo(TEXT, int(self.transformer.width), len(self.blocks), int(self.blocks[0].attn.num_heads),
                          (TEXT,), causal=True, masks_padding=True)

    def embed(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, 76] -> ``[tokens ; cls_emb]`` + positional embeddings [B, 77, D], and the keys open_clip's CoCa
        attention reads [B, 77] (module docstring; ``correct_cls_mask``: the real ids and the CLS)."""
        if text_ids.shape[1] != self.context_length:
            raise ValueError(f"text_ids has length {text_ids.shape[1]}; CoCa needs exactly {self.context_length}")
        x = self.token_embedding(text_ids)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        valid = text_ids != self.pad_id
        always = valid.new_ones(valid.shape[0], 1)
        keys = torch.cat([valid, always] if self.correct_cls_mask else [always, valid], dim=1)
        return x, keys

    def run_block(self, index: int, x: torch.Tensor, mask: torch.Tensor,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                  query_index: torch.Tensor | None = None,
                  adapters: Mapping[str, WeightAdapter] | None = None) -> torch.Tensor:
        """Block ``index`` on x [B, N, D]: causal attention over the keys `mask` marks (prompt keys / values of
        `kv_prefix` visible to every query); only the positions `query_index` when given -> [B, 1, D]; the maps
        named in `adapters` through them."""
        block = self.blocks[index]
        attn = block.attn
        if attn.dropout or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            raise ValueError("CocaTextTower supports open_clip's plain self-attention only")
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        if query_index is None:
            attn_mask = (mask[:, None, :] & (positions[None, :] <= positions[:, None]))[:, None]   # [B, 1, N, N]
        else:
            attn_mask = (mask & (positions[None, :] <= query_index[:, None]))[:, None, None, :]   # [B, 1, 1, N]
        q, k, v = project_qkv(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias, query_index, adapters)
        if query_index is not None:
            x = take_rows(x, query_index)
        out = prefixed_attention(q, k, v, attn.num_heads, attn_mask, kv_prefix)
        if adapters:
            x = x + block.ls_1(adapted_linear(out, attn.out_proj.weight, attn.out_proj.bias, adapters.get("out")))
            return x + block.ls_2(open_clip_mlp(block.mlp, block.ln_2(x), adapters))
        x = x + block.ls_1(attn.out_proj(out))
        return x + block.ls_2(block_mlp(block.mlp, block.ln_2(x)))

    def linear_map(self, index: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return open_clip_linear_map(self.blocks[index], name)

    def pool(self, token: torch.Tensor) -> torch.Tensor:
        """The CLS output [B, D] -> ``ln_final`` -> @ ``text_projection`` -> [B, E]."""
        return self.ln_final(token) @ self.text_projection

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Plain CoCa text embedding, unnormalised (open_clip ``encode_text(normalize=False)``)."""
        x, mask = self.embed(text_ids)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, mask)
        return self.pool(x[:, -1])


class CocaBackbone(TwoTowerBackbone):
    """The two CoCa towers (``image_encoder``, ``text_encoder``) and ``logit_scale`` (used by no classifier)."""

    described_as = "the CoCa backbone (coca_vision_layers, coca_text_layers)"

    def __init__(self, sizes: CocaSizes, pool_prompts: bool = False) -> None:
        super().__init__()
        visual, text = build_open_clip_towers(sizes)
        self.sizes = sizes
        self.image_encoder = CocaVisionTower(visual, pool_prompts)
        self.text_encoder = CocaTextTower(text)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    # --- the Backbone protocol (mdpl.backbones.base) ------------------------------------------------
    def embed(self, stream: str, batch: Batch,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Image: CLS + patches, all real; text: the 76 positions and the CLS, masked as open_clip's CoCa does."""
        if stream == IMAGE:
            return self.embed_image(batch, rows)
        x, mask = self.text_encoder.embed(batch_rows(batch["text_ids"], rows))
        return x, mask, TokenLayout([(TEXT, x.shape[1] - 1), (TEXT_CLS, 1)])

    def readout(self, stream: str, layout: TokenLayout, batch: Batch,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Text: the appended CLS, wherever the prompts moved it. Image: the CLS position, for completeness only —
        the image feature is the attentional pooler's over every token (``CocaVisionTower.block_steps``)."""
        key = IMAGE if stream == IMAGE else "text_ids"
        n = batch[key].shape[0] if rows is None else rows.shape[0]
        position = layout.offset(IMAGE) if stream == IMAGE else layout.offset(TEXT_CLS)
        return torch.full((n,), position, dtype=torch.long, device=batch[key].device)

    def pool(self, stream: str, token: torch.Tensor) -> torch.Tensor:
        """f_v = ln_post(attentional pooler) @ proj; f_t = ln_final(CLS) @ text_projection."""
        if stream == IMAGE:
            return self.image_encoder.pool(token)
        return self.text_encoder.pool(token)

    # --- weights ------------------------------------------------------------------------------------
    def load_open_clip_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load an open_clip-layout CoCa state dict (``visual.*``, ``text.*``, ``logit_scale``; read by
        ``coca_weights.read_coca_checkpoint``, which drops the decoder)."""
        mapped = {open_clip_to_backbone_key(k): v for k, v in state_dict.items()}
        if "logit_scale" in mapped:
            mapped["logit_scale"] = mapped["logit_scale"].reshape(self.logit_scale.shape)
        check_coca_state_dict(mapped, self.state_dict(), what="open_clip CoCa checkpoint")
        self.load_state_dict(mapped, strict=True)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """This backbone's weights in open_clip layout (no decoder)."""
        return {backbone_to_open_clip_key(k): v for k, v in self.state_dict().items()}


def build_coca_backbone(run: Any) -> CocaBackbone:
    """CocaBackbone from the run config's sizes (``coca_pool_prompts`` included), with the weights of ``coca_path``
    (`load_pretrained`: random init + warning if empty; not read with ``test_only``)."""
    sizes: CocaSizes = run.backbone
    backbone = CocaBackbone(sizes, sizes.pool_prompts)
    return load_pretrained(backbone, sizes.path, sizes.sha256, run.trainer.test_only, COCA.weights, "CoCa",
                           backbone.load_open_clip_state_dict)


COCA = register_backbone(BackboneCard(
    name="coca", build=build_coca_backbone, weights_file="coca_ViT-B-32.bin", sizes=CocaSizes, tokenizer="bpe", transform="clip",
    weights=WeightsSpec(key="coca_path", sha_key="coca_sha256", placeholder="<CoCa checkpoint>",
                        example="open_clip_pytorch_model.bin",
                        what="a local open_clip CoCa checkpoint (open_clip_pytorch_model.bin, a .pt state dict or a "
                             ".safetensors file)", read=read_coca_checkpoint),
    model_keys=("coca_embed_dim", "image_size", "coca_patch_size", "coca_vision_width", "coca_vision_layers",
                "coca_vision_head_width", "coca_attn_pooler_heads", "coca_context_length", "coca_text_width",
                "coca_text_heads", "coca_text_layers", "coca_pool_prompts")))
