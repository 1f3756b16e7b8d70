"""DCP — Deep Correlated Prompting on CLIP (Hu et al., NeurIPS 2024), METHODS.md §6.

Pieces:
* :class:`DCPLayout` — one description of the prompt tokens of a tower (D-40): ``n = prompt_length // 3``
  layer prompts, then ``n`` common prompts, then ``n`` dynamic prompts (either may be switched off).
* :class:`DCPPromptLearner` — the per-type initial prompts, the correlated per-layer projection chain
  and the common-prompt projections (§6.1, §6.3), computed once per missing type and gathered (D-36).
* :func:`attach_dynamic_prompts` — block-0 single-head ``attn_prompt`` + persistent query buffers
  (``prompts_dynamic_{complete,image,text}``, D-34), registered on block 0 so keys match the reference.
* :class:`DCPNet` (``model.*`` in checkpoints) and :class:`DCPClassifier` (adds ``{dataset}_classifier``).

Missing types (§0): 0 complete, 1 text missing, 2 image missing.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.data.constants import NUM_CLASSES
from mdpl.errors import UserInputError
from mdpl.backbones.clip import ClipBackbone, ClipTextTower, _Tower, build_clip_backbone, check_state_dict
from mdpl.prompts.base import BackboneInfo, PromptMethod
from mdpl.prompts.layout import TokenLayout, splice_tokens
from mdpl.prompts.registry import register_prompt_method

DYNAMIC_NAMES = ("prompts_dynamic_complete", "prompts_dynamic_image", "prompts_dynamic_text")
"""Dynamic query sets in missing-type order 0, 1, 2 (§6.2)."""

DEFAULTS: dict[str, Any] = {
    "prompt_length": 36, "prompt_depth": 6, "dcp_correlated": True, "dcp_dynamic": True, "dcp_common": True,
    "dcp_dynamic_trainable": False, "dcp_independent_init": False, "dcp_skip_missing": True, "finetune": False,
}
"""DCP config keys and their defaults (reference values, §6)."""


def _cfg(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, DEFAULTS[key])


@dataclass(frozen=True)
class DCPLayout:
    """Token layout of the prompts in front of each tower's sequence (§6.4, D-40).

    Block 0 input: ``[layer prompts R (n) ; common C (n_common) ; dynamic Dyn (n_dynamic) ; data]``.
    Blocks 1..depth-1 replace the first ``n`` tokens; the others are inherited as ordinary tokens.
    ``depth == 0`` means no prompts at all (frozen CLIP + linear head, the "Baseline" of §6.7).
    """

    prompt_length: int = 36
    depth: int = 6
    correlated: bool = True
    dynamic: bool = True
    common: bool = True

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise UserInputError(f"prompt_depth must be >= 0, got {self.depth}")
        if self.depth == 0 and (self.dynamic or self.common):
            raise UserInputError("prompt_depth=0 inserts no prompts; also set dcp_dynamic=False and dcp_common=False")
        if self.depth > 0 and (self.prompt_length <= 0 or self.prompt_length % 3):
            raise UserInputError(f"DCP prompt_length must be a positive multiple of 3 (got {self.prompt_length}): "
                             "n = prompt_length/3 tokens each for layer, common and dynamic prompts")

    @property
    def n(self) -> int:
        """Layer-prompt tokens per layer (12 at prompt_length 36)."""
        return self.prompt_length // 3 if self.depth > 0 else 0

    @property
    def n_common(self) -> int:
        return self.n if self.common else 0

    @property
    def n_dynamic(self) -> int:
        return self.n if self.dynamic else 0

    @property
    def num_tokens(self) -> int:
        """Prompt tokens in front of the data tokens from block 0 on (36 by default)."""
        return self.n + self.n_common + self.n_dynamic

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DCPLayout":
        return cls(int(_cfg(config, "prompt_length")), int(_cfg(config, "prompt_depth")),
                   bool(_cfg(config, "dcp_correlated")), bool(_cfg(config, "dcp_dynamic")),
                   bool(_cfg(config, "dcp_common")))


def _normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.normal_(torch.empty(*shape), std=0.02))


def _bottleneck(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU (exact) -> Linear; keys ``.0`` / ``.2`` as in the reference (§6.1)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _replicate(module: nn.Module, count: int, independent: bool) -> nn.ModuleList:
    """``count`` deep copies of one initialised module (identical init, D-39) or fresh re-inits."""
    copies = [copy.deepcopy(module) for _ in range(count)]
    if independent:
        for m in copies[1:]:
            for layer in m.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
    return nn.ModuleList(copies)


class DCPPromptLearner(nn.Module):
    """Initial prompts, correlated projection chain and common prompts (``model.prompt_learner.*``, §6.1).

    ``correlated=False`` (our ablation, §6.7): every layer's ``n`` prompts are independent per-type
    parameters ``visual_prompts`` [depth, 3, n, Dv] / ``text_prompts`` [depth, 3, n, Dt] (MMP-style).
    """

    def __init__(self, layout: DCPLayout, vision_width: int, text_width: int, independent_init: bool = False,
                 reduction: int = 16) -> None:
        super().__init__()
        self.layout = layout
        n, depth, dv, dt = layout.n, layout.depth, vision_width, text_width
        joint = dv + dt
        if layout.correlated and depth > 0:
            self.visual_prompt_complete, self.visual_prompt_missing = _normal(n, dv), _normal(n, dv)
            self.text_prompt_complete, self.text_prompt_missing = _normal(n, dt), _normal(n, dt)
        if layout.common:
            self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text = (
                _normal(n, dt), _normal(n, dt), _normal(n, dt))
        if layout.correlated and depth > 0:
            self.compound_prompt_projections_text = _replicate(
                _bottleneck(joint, joint // reduction, dt), depth, independent_init)
            self.layernorm_text = nn.ModuleList([nn.LayerNorm(joint) for _ in range(depth)])
            self.compound_prompt_projections_image = _replicate(
                _bottleneck(joint, joint // reduction, dv), depth, independent_init)
            self.layernorm_image = nn.ModuleList([nn.LayerNorm(joint) for _ in range(depth)])
        elif depth > 0:
            self.visual_prompts = _normal(depth, 3, n, dv)
            self.text_prompts = _normal(depth, 3, n, dt)
        if layout.common:
            self.common_prompt_projection_image = _bottleneck(dt, dt // reduction, dv)
            self.common_prompt_projection_text = _bottleneck(dt, dt // reduction, dt)

    def _layer_prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type layer prompts R_v^l [3, n, Dv], R_t^l [3, n, Dt] for l < depth (§6.3)."""
        depth = self.layout.depth
        if not self.layout.correlated:
            return list(self.visual_prompts.unbind(0)), list(self.text_prompts.unbind(0))
        img = torch.stack([self.visual_prompt_complete, self.visual_prompt_complete, self.visual_prompt_missing])
        txt = torch.stack([self.text_prompt_complete, self.text_prompt_missing, self.text_prompt_complete])
        out_img, out_txt = [], []
        for layer in range(depth):
            u = torch.cat([img, txt], dim=-1)
            img = self.compound_prompt_projections_image[layer](self.layernorm_image[layer](u))
            txt = self.compound_prompt_projections_text[layer](self.layernorm_text[layer](u))
            out_img.append(img)
            out_txt.append(txt)
        return out_img, out_txt

    def per_type(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-type prompts per layer, index 0..2 = missing type: layer 0 = [R^0 ; C], others R^l."""
        if self.layout.depth == 0:
            return [], []
        img, txt = self._layer_prompts()
        if self.layout.common:
            common = torch.stack([self.common_prompt_complete, self.common_prompt_image, self.common_prompt_text])
            img[0] = torch.cat([img[0], self.common_prompt_projection_image(common)], dim=1)
            txt[0] = torch.cat([txt[0], self.common_prompt_projection_text(common)], dim=1)
        return img, txt

    def forward(self, missing_type: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prompts per layer gathered by sample: lists of [B, k_l, Dv] and [B, k_l, Dt]."""
        img, txt = self.per_type()
        return [p[missing_type] for p in img], [p[missing_type] for p in txt]


def attach_dynamic_prompts(block: nn.Module, n: int, width: int, trainable: bool = False) -> None:
    """Add ``attn_prompt`` (1-head MHA) and the three [n, 1, width] N(0, 0.02) query sets to ``block`` (§6.1).

    The queries are persistent buffers (saved, frozen; D-34) or, with ``trainable``, parameters.
    """
    block.attn_prompt = nn.MultiheadAttention(width, 1, batch_first=True)
    for name in DYNAMIC_NAMES:
        value = nn.init.normal_(torch.empty(n, 1, width), std=0.02)
        if trainable:
            block.register_parameter(name, nn.Parameter(value))
        else:
            block.register_buffer(name, value, persistent=True)


def dynamic_prompts(block: nn.Module, x: torch.Tensor, missing_type: torch.Tensor) -> torch.Tensor:
    """Dyn = MHA(query = the sample's query set, key = value = block-0 input ``x``) -> [B, n, D] (§6.4)."""
    queries = torch.stack([getattr(block, name)[:, 0] for name in DYNAMIC_NAMES])  # [3, n, D]
    q = queries[missing_type].to(x.dtype)
    return block.attn_prompt(q, x, x, need_weights=False)[0]


class DCPNet(nn.Module):
    """Prompt learner + both CLIP towers (``model.*`` keys of a DCP checkpoint, §6.6)."""

    def __init__(self, backbone: ClipBackbone, layout: DCPLayout, independent_init: bool = False,
                 dynamic_trainable: bool = False, skip_missing: bool = True) -> None:
        super().__init__()
        self.layout = layout
        self.skip_missing = skip_missing
        for tower in (backbone.image_encoder, backbone.text_encoder):
            if layout.depth > len(tower.blocks):
                raise UserInputError(f"prompt_depth={layout.depth} exceeds the {len(tower.blocks)} CLIP blocks")
        self.prompt_learner = DCPPromptLearner(layout, backbone.image_encoder.width, backbone.text_encoder.width,
                                               independent_init)
        self.image_encoder = backbone.image_encoder
        self.text_encoder = backbone.text_encoder
        self.logit_scale = backbone.logit_scale
        if layout.dynamic:
            for tower in (self.image_encoder, self.text_encoder):
                attach_dynamic_prompts(tower.blocks[0], layout.n, tower.width, dynamic_trainable)

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.text_projection.shape[1])

    def _run_blocks(self, tower: _Tower, x: torch.Tensor, prompts: list[torch.Tensor],
                    missing_type: torch.Tensor) -> torch.Tensor:
        """Blocks with insertion [R^0; C; Dyn; X] at block 0 and replacement of R at 1..depth-1 (§6.4)."""
        lay = self.layout
        mask = None
        if isinstance(tower, ClipTextTower):
            mask = tower.causal_mask(x.shape[1] + lay.num_tokens, x.device, x.dtype)
        for i in range(len(tower.blocks)):
            if i == 0 and lay.depth > 0:
                parts = [prompts[0].to(x.dtype)]
                if lay.dynamic:
                    parts.append(dynamic_prompts(tower.blocks[0], x, missing_type))
                x = torch.cat(parts + [x], dim=1)
            elif i < lay.depth:
                x = torch.cat([prompts[i].to(x.dtype), x[:, lay.n:]], dim=1)
            x = tower.run_block(i, x, mask)
        return x

    def encode_image(self, image: torch.Tensor, prompts: list[torch.Tensor], missing_type: torch.Tensor) -> torch.Tensor:
        """Image features [B, E]: CLS token after the prompts -> ln_post -> @proj (§5.2)."""
        tower = self.image_encoder
        x = self._run_blocks(tower, tower.embed(image), prompts, missing_type)
        return tower.pool(x, self.layout.num_tokens)

    def encode_text(self, text_ids: torch.Tensor, prompts: list[torch.Tensor], missing_type: torch.Tensor) -> torch.Tensor:
        """Text features [B, E]: drop prompt positions -> ln_final -> EOT -> @text_projection (§5.2)."""
        tower = self.text_encoder
        x = self._run_blocks(tower, tower.embed(text_ids), prompts, missing_type)
        return tower.pool(x[:, self.layout.num_tokens:], text_ids)

    def _encode_kept(self, encode, inputs: torch.Tensor, prompts: list[torch.Tensor], missing_type: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:
        """Encode the rows whose half is kept; zero rows elsewhere (exact skip, §6.5, §12)."""
        if not self.skip_missing or bool(keep.all()):
            feats = encode(inputs, [p[missing_type] for p in prompts], missing_type)
            return feats * keep.unsqueeze(1).to(feats.dtype)
        idx = keep.nonzero().squeeze(1)
        mt = missing_type[idx]
        feats = encode(inputs[idx], [p[mt] for p in prompts], mt)
        return feats.new_zeros(missing_type.shape[0], feats.shape[1]).index_copy(0, idx, feats)

    def forward(self, image: torch.Tensor, text_ids: torch.Tensor, missing_type: torch.Tensor) -> torch.Tensor:
        """z = [f_v ; f_t] [B, 2E] with the image half zeroed for type 2 and the text half for type 1 (§6.5)."""
        missing_type = missing_type.long()
        img_prompts, txt_prompts = self.prompt_learner.per_type()
        f_v = self._encode_kept(self.encode_image, image, img_prompts, missing_type, missing_type != 2)
        f_t = self._encode_kept(self.encode_text, text_ids, txt_prompts, missing_type, missing_type != 1)
        return torch.cat([f_v, f_t.to(f_v.dtype)], dim=1)


class DCPClassifier(nn.Module):
    """DCP model + ``{dataset}_classifier`` Linear(2E -> C) (§6.5); contract forward(batch) -> logits/pooled."""

    def __init__(self, config: Mapping[str, Any], backbone: ClipBackbone) -> None:
        super().__init__()
        self.dataset = str(config["dataset"])
        if self.dataset not in NUM_CLASSES:
            raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {self.dataset!r}")
        self.frozen_eval_mode = bool(config.get("frozen_eval_mode", False))
        self.model = DCPNet(backbone, DCPLayout.from_config(config), bool(_cfg(config, "dcp_independent_init")),
                            bool(_cfg(config, "dcp_dynamic_trainable")), bool(_cfg(config, "dcp_skip_missing")))
        head = nn.Linear(2 * self.model.embed_dim, NUM_CLASSES[self.dataset])
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        setattr(self, f"{self.dataset}_classifier", head)
        self._freeze(bool(_cfg(config, "finetune")))

    @property
    def head(self) -> nn.Linear:
        return getattr(self, f"{self.dataset}_classifier")

    def trainable_modules(self) -> list[nn.Module | nn.Parameter]:
        """The trainable set of §6.6, listed explicitly (D-41)."""
        m = self.model
        out: list[nn.Module | nn.Parameter] = [m.prompt_learner, m.image_encoder.ln_post, m.text_encoder.ln_final,
                                               m.image_encoder.proj, self.head]
        if m.layout.dynamic:
            out += [m.image_encoder.blocks[0].attn_prompt, m.text_encoder.blocks[0].attn_prompt]
        return out

    def _freeze(self, finetune: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(finetune)
        self.model.logit_scale.requires_grad_(False)   # unused by the classifier: no gradient, even with finetune
        for item in self.trainable_modules():
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                p.requires_grad_(True)
        # trainable dynamic queries (dcp_dynamic_trainable) are parameters of block 0: keep them trainable
        for block in ([self.model.image_encoder.blocks[0], self.model.text_encoder.blocks[0]]
                      if self.model.layout.dynamic else []):
            for name in DYNAMIC_NAMES:
                value = getattr(block, name)
                if isinstance(value, nn.Parameter):
                    value.requires_grad_(True)

    def trainable_parameters_report(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def set_frozen_modes(self) -> None:
        """Engine hook: CLIP has no dropout, so modes do not change outputs; honours ``frozen_eval_mode``."""
        if self.frozen_eval_mode and self.training:
            for module in self.modules():
                own = list(module.parameters(recurse=False))
                if own and not any(p.requires_grad for p in own):
                    module.eval()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: image [B,3,H,W], text_ids [B,77] (CLIP BPE ids), missing_type [B] -> logits, pooled [B, 2E]."""
        z = self.model(batch["image"], batch["text_ids"], batch["missing_type"])
        return {"logits": self.head(z), "pooled": z}

    def load_dcp_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                            dynamic: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Load a reference DCP checkpoint state dict (keys of §6.6) strictly.

        Reference checkpoints lack the dynamic queries (D-34): take them from ``dynamic`` (full keys such as
        ``model.image_encoder.transformer.resblocks.0.prompts_dynamic_complete``), else keep the current
        values and warn. Returns the list of dynamic keys that were not provided.
        """
        given = dict(state_dict)
        if dynamic:
            given.update(dynamic)
        own = self.state_dict()
        absent = [k for k in own if ".prompts_dynamic_" in k and k not in given]
        for key in absent:
            given[key] = own[key]
        if absent:
            warnings.warn(f"{len(absent)} dynamic prompt queries not in the checkpoint; keeping this model's values "
                          "(pass them with dynamic=... for parity with a reference run, D-34)", stacklevel=2)
        check_state_dict(given, own, what="DCP checkpoint")
        self.load_state_dict(given, strict=True)
        return absent


def check_image_size(config: Mapping[str, Any]) -> None:
    """The CLIP transform resizes to ``image_size``; the vision tower's positions fit ``clip_image_size``."""
    if "image_size" in config and "clip_image_size" in config \
            and int(config["image_size"]) != int(config["clip_image_size"]):
        raise UserInputError(f"image_size={config['image_size']} (CLIP transform) differs from clip_image_size="
                         f"{config['clip_image_size']} (CLIP model); set both to the same value (224 for ViT-B/16)")


def read_dcp_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Model state dict (keys of §6.6) of a reference DCP .ckpt, an mdpl .ckpt or a plain state dict file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_path {path!r} not found; pass a DCP checkpoint (.ckpt) or leave it empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint the user provides
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise UserInputError(f"cannot read load_path {path} as a PyTorch checkpoint ({type(err).__name__}: {err})"
                             ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserInputError(f"load_path {path} holds no state dict (expected a checkpoint of this classifier)")
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and isinstance(hp.get("config"), Mapping):  # mdpl: MDPLModule.model.<keys>
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return dict(state)


def clip_backbone_for_run(config: Mapping[str, Any]) -> ClipBackbone:
    """The CLIP backbone of a run: sizes checked against the transform; with ``test_only`` every weight
    comes from the checkpoint loaded afterwards, so ``clip_path`` is not read."""
    check_image_size(config)
    if not config.get("test_only", False):
        return build_clip_backbone(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="clip_path is empty")
        return build_clip_backbone({**config, "clip_path": ""})


def build_dcp_classifier(config: Mapping[str, Any]) -> DCPClassifier:
    """DCP classifier on a CLIP backbone built and loaded from the config (``clip_path``, ``clip_*`` sizes).

    ``load_path`` (a DCP checkpoint) is loaded over it with :meth:`DCPClassifier.load_dcp_state_dict`.
    With ``test_only`` the backbone is not read from ``clip_path``: every weight comes from the checkpoint.
    """
    model = DCPClassifier(config, clip_backbone_for_run(config))
    path = str(config.get("load_path", "") or "")
    if path:
        model.load_dcp_state_dict(read_dcp_checkpoint(path))
    return model


def dcp_loss(logits: torch.Tensor, label: torch.Tensor, dataset: str) -> torch.Tensor:
    """Task loss of §7.5 (for tests; the engine owns the training loss)."""
    if dataset == "mmimdb":
        return F.binary_cross_entropy_with_logits(logits, label.float())
    return F.cross_entropy(logits, label.long())


# ------------------------------------------------------------------------------------ DCP on ViLT
@register_prompt_method("dcp")
class DCPViLT(PromptMethod):
    """DCP on the single-stream ViLT (``backbone='vilt'``) — our mapping, not defined by the DCP paper.

    * Both "streams" have the ViLT width D: :class:`DCPPromptLearner` is built with image width =
      text width = D, so the correlated chain (§6.3) still generates each layer's image-side and
      text-side prompts from both sides' prompts of the previous layer (LN + bottleneck on [2D]).
    * Common prompts (§6.3): ``C_v``, ``C_t`` from the per-type common prompt, as on CLIP.
    * Dynamic prompts: one ``attn_prompt`` (1-head MHA, width D) with the three query sets
      ``prompts_dynamic_*`` (buffers unless ``dcp_dynamic_trainable``), attending over the block-0
      joint [text ; image] sequence with its key-padding mask (CLIP's text tower had no padding mask).
    * Insertion before block 0, in front of the joint sequence:
      ``[R_t^0 ; R_v^0 (2n) ; C_t ; C_v (2 n_common) ; Dyn (n_dynamic) ; text ; image]``, mask ones;
      before blocks 1..depth-1 the first 2n tokens are **replaced** by ``[R_t^l ; R_v^l]`` (§6.4).
    * Pooled = ViLT pooler on the text [CLS] (at offset 2n + 2 n_common + n_dynamic); ViLT MLP head;
      no feature zeroing (one joint feature). Trainable: prompt learner, ``attn_prompt``, pooler,
      head (ViLT frozen as for MAP, §3.4).
    """

    def __init__(self, info: BackboneInfo, layout: DCPLayout, independent_init: bool = False,
                 dynamic_trainable: bool = False) -> None:
        super().__init__(info)
        if layout.depth > info.num_layers:
            raise UserInputError(f"prompt_depth={layout.depth} exceeds the {info.num_layers} ViLT blocks")
        self.layout = layout
        self.prompt_learner = DCPPromptLearner(layout, info.hidden_size, info.hidden_size, independent_init)
        if layout.dynamic:
            attach_dynamic_prompts(self, layout.n, info.hidden_size, dynamic_trainable)
        self._prompts: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], info: BackboneInfo) -> "DCPViLT":
        return cls(info, DCPLayout.from_config(config), bool(_cfg(config, "dcp_independent_init")),
                   bool(_cfg(config, "dcp_dynamic_trainable")))

    def _dynamic(self, x: torch.Tensor, mask: torch.Tensor, missing_type: torch.Tensor) -> torch.Tensor:
        """Dyn [B, n, D]: the sample's query set attending over the joint sequence (padding masked)."""
        queries = torch.stack([getattr(self, name)[:, 0] for name in DYNAMIC_NAMES])  # [3, n, D]
        q = queries[missing_type].to(x.dtype)
        return self.attn_prompt(q, x, x, key_padding_mask=~mask, need_weights=False)[0]

    def before_block(self, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
                     missing_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        lay = self.layout
        if index >= lay.depth:
            return x, mask, layout
        if index == 0:
            self._prompts = self.prompt_learner.per_type()
        img, txt = self._prompts
        layer = torch.cat([txt[index][:, :lay.n], img[index][:, :lay.n]], dim=1)[missing_type]  # [B, 2n, D]
        if index == lay.depth - 1:
            self._prompts = None
        if index > 0:  # replace the evolved layer prompts, keep everything else (§6.4)
            span = layout.span("dcp.layer")
            return torch.cat([x[:, :span.start], layer.to(x.dtype), x[:, span.stop:]], dim=1), mask, layout
        new = [("dcp.layer", layer)]
        if lay.common:
            new.append(("dcp.common", torch.cat([txt[0][:, lay.n:], img[0][:, lay.n:]], dim=1)[missing_type]))
        if lay.dynamic:
            new.append(("dcp.dynamic", self._dynamic(x, mask, missing_type)))
        x, mask = splice_tokens(x, mask, 0, [t for _, t in new])
        return x, mask, layout.prepend([(n, t.shape[1]) for n, t in new])
