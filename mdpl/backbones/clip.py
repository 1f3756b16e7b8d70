"""CLIP ViT-B/16 backbone (METHODS.md §5), built with open_clip and exposed block by block.

The two towers are our own thin modules that *adopt* the sub-modules of an ``open_clip`` CLIP model
(QuickGELU variant, §5.1), so their state-dict keys are exactly OpenAI's:
``image_encoder.<k>`` <-> ``visual.<k>`` and ``text_encoder.<k>`` <-> ``<k>`` (text keys), plus
``logit_scale``. This is also the layout of DCP checkpoints under ``model.`` (§6.6).

Prompt methods drive the towers themselves: ``embed`` -> ``run_block`` for every block (inserting
prompt tokens in between) -> ``pool``. All sequences are batch-first ``[B, L, D]``.

Weights: ``read_openai_checkpoint(path)`` accepts OpenAI's TorchScript archive (``ViT-B-16.pt``) or a
plain state dict; nothing is ever downloaded (D-42).
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mdpl.errors import UserInputError

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Integer entries of OpenAI's JIT state dict that are not parameters (§5.1); dropped on load."""

TEXT_KEY_ROOTS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
"""OpenAI top-level keys that belong to the text tower."""

VIT_B16_SHA256 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
"""SHA-256 of OpenAI's ``ViT-B-16.pt`` (part of its download URL)."""


@dataclass(frozen=True)
class ClipSizes:
    """Tower hyper-parameters; defaults are OpenAI ViT-B/16 (§5.1). Config keys: ``clip_<field>``."""

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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ClipSizes":
        """Read ``clip_<field>`` keys (missing keys keep the ViT-B/16 default)."""
        kwargs = {f.name: int(config[f"clip_{f.name}"]) for f in fields(cls) if f"clip_{f.name}" in config}
        return cls(**kwargs)


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


class _Tower(nn.Module):
    """Common block access for both towers (open_clip ``Transformer`` under ``self.transformer``)."""

    transformer: nn.Module

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual attention blocks (open_clip ``ResidualAttentionBlock``)."""
        return self.transformer.resblocks

    @property
    def width(self) -> int:
        return int(self.transformer.width)

    def run_block(self, index: int, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Apply block ``index`` to batch-first ``x`` [B, L, D] (see `residual_block`)."""
        return residual_block(self.blocks[index], x, attn_mask, kv_prefix)


def residual_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` on batch-first ``x`` [B, L, D] with fused SDPA.

    Computes ``block(x, attn_mask=attn_mask)``: x + ls_1(MHA(ln_1 x)), then + ls_2(MLP(ln_2 x)), with the
    block's own weights. It does not call ``block.attn`` (``nn.MultiheadAttention``): that module moves
    the sequence first with a transpose, and when ``x`` needs gradients (prompt tokens in the
    sequence) ``torch.matmul`` then runs the QKV projection as a batched matmul over L copies of the
    weight; here the projection is one matmul on the contiguous input (DCP's CPU training step: 48 % of
    its time was that batched matmul).

    ``attn_mask``: additive [L, L] (the text tower's causal mask) or boolean (True = attend).
    ``kv_prefix``: raw keys / values [B, P, D] (after the in-projection) put in front of the sequence's
    and visible to every query — MAP's attention-level prompts (METHODS.md §3.3).
    """
    attn = block.attn
    if attn.dropout or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
        raise ValueError("residual_block supports open_clip's plain self-attention only")
    n = x.shape[1]
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    mask = attn_mask
    if kv_prefix is not None:
        k = torch.cat([kv_prefix[0].to(k.dtype), k], dim=1)
        v = torch.cat([kv_prefix[1].to(v.dtype), v], dim=1)
        if mask is not None:
            visible = True if mask.dtype == torch.bool else 0.0  # every query sees every prompt key
            mask = torch.cat([mask.new_full((n, kv_prefix[0].shape[1]), visible), mask], dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b l (h d) -> b h l d", h=attn.num_heads)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    x = x + block.ls_1(attn.out_proj(rearrange(out, "b h l d -> b l (h d)")))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class ClipVisionTower(_Tower):
    """Vision tower: conv -> [CLS] -> +pos -> ln_pre -> blocks -> token -> ln_post -> @proj (§5.2)."""

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
    """Text tower: token emb + pos -> causal blocks -> ln_final -> EOT token -> @text_projection (§5.2)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        for name in ("transformer", "token_embedding", "ln_final"):
            setattr(self, name, getattr(clip_model, name))
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection = clip_model.text_projection
        if not isinstance(self.text_projection, nn.Parameter):
            raise ValueError("open_clip built a text projection module; expected the OpenAI [width, embed] matrix")

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

    def pool(self, x: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Data-token outputs [B, 77, D] -> ``ln_final`` -> EOT (= argmax id) -> @ ``text_projection``."""
        x = self.ln_final(x)
        eot = text_ids.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Plain CLIP text features (no prompts)."""
        x = self.embed(text_ids)
        mask = self.causal_mask(x.shape[1], x.device, x.dtype)
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, mask)
        return self.pool(x, text_ids)


class ClipBackbone(nn.Module):
    """The two CLIP towers (``image_encoder``, ``text_encoder``) and ``logit_scale`` (unused by DCP)."""

    def __init__(self, sizes: ClipSizes) -> None:
        super().__init__()
        oc = _build_open_clip(sizes)
        self.sizes = sizes
        self.image_encoder = ClipVisionTower(oc.visual)
        self.text_encoder = ClipTextTower(oc)
        self.logit_scale = oc.logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.text_projection.shape[1])

    def load_openai_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load an OpenAI-layout state dict (``visual.*``, text keys, ``logit_scale``)."""
        mapped = {openai_to_backbone_key(k): v for k, v in state_dict.items()}
        own = {k: v for k, v in self.state_dict().items() if not _is_prompt_key(k)}
        check_state_dict(mapped, own, what="OpenAI CLIP checkpoint")
        self.load_state_dict(mapped, strict=False)

    def openai_state_dict(self) -> dict[str, torch.Tensor]:
        """This backbone's weights in OpenAI layout (prompt modules attached to blocks excluded)."""
        return {backbone_to_openai_key(k): v for k, v in self.state_dict().items() if not _is_prompt_key(k)}


def _is_prompt_key(key: str) -> bool:
    """Keys of modules a prompt method attached to a block (``attn_prompt``, ``prompts_dynamic_*``)."""
    return ".attn_prompt." in key or ".prompts_dynamic_" in key


def openai_to_backbone_key(key: str) -> str:
    """``visual.X`` -> ``image_encoder.X``; text keys -> ``text_encoder.X``; ``logit_scale`` unchanged."""
    if key.startswith("visual."):
        return "image_encoder." + key[len("visual."):]
    if key.startswith(TEXT_KEY_ROOTS):
        return "text_encoder." + key
    return key


def backbone_to_openai_key(key: str) -> str:
    """Inverse of :func:`openai_to_backbone_key`."""
    if key.startswith("image_encoder."):
        return "visual." + key[len("image_encoder."):]
    if key.startswith("text_encoder."):
        return key[len("text_encoder."):]
    return key


def check_state_dict(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise UserInputError (a ValueError) listing missing / unexpected keys and shape mismatches (strict loading,
    D-38): `given` comes from a file the user names (clip_path, load_path)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(given) & set(expected)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise UserInputError(f"{what} does not match the model: " + "; ".join(problems)
                         + " — check the clip_* size keys / the checkpoint file")


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (holds ``constants.pkl``/``code/``), False for a ``torch.save`` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_openai_checkpoint(path: str, sha256: str = "") -> dict[str, torch.Tensor]:
    """Read an OpenAI CLIP checkpoint: TorchScript archive or plain (``torch.save``) state dict.

    Drops ``input_resolution``/``context_length``/``vocab_size`` and casts floating tensors to fp32
    (§5.1: DCP computes in an fp32 model holding fp16-representable values). Optional SHA-256 check.
    Not ``open_clip.create_model(pretrained=<file>)``: its one ``weights_only`` flag either refuses TorchScript
    archives (True) or unpickles any plain file (False), and it builds named configs only (not ``clip_*`` sizes).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint {path!r} not found; set clip_path to a local ViT-B-16.pt "
                                "(OpenAI JIT archive) or an OpenAI-layout state dict — nothing is downloaded")
    if sha256 and sha256_of(path) != sha256.lower():
        raise UserInputError(f"SHA-256 of clip_path {path} differs from clip_sha256={sha256}; the file is corrupt "
                             "or another model")
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)       # torch.jit is deprecated; OpenAI ships JIT files
                state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
                state = state["state_dict"]
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read clip_path {path} as a CLIP checkpoint ({type(err).__name__}: {err}); "
                             "pass a local ViT-B-16.pt or an OpenAI-layout state dict") from None
    if not isinstance(state, Mapping):
        raise UserInputError(f"clip_path {path} holds a {type(state).__name__}, not a CLIP state dict")
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRA_KEYS:
            continue
        out[key] = value.float() if torch.is_floating_point(value) else value
    return out


def build_clip_backbone(config: Mapping[str, Any]) -> ClipBackbone:
    """ClipBackbone from ``clip_*`` size keys; loads ``clip_path`` (random init + warning if empty)."""
    backbone = ClipBackbone(ClipSizes.from_config(config))
    path = str(config.get("clip_path", "") or "")
    if path:
        state = read_openai_checkpoint(path, str(config.get("clip_sha256", "") or ""))
        try:
            backbone.load_openai_state_dict(state)
        except UserInputError as err:
            raise UserInputError(f"clip_path {path}: {err}") from None
    else:
        warnings.warn("clip_path is empty: the CLIP backbone is randomly initialised (tests only)", stacklevel=2)
    return backbone
