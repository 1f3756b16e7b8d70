"""The one classifier: backbone + prompt method + task head (docs/architecture.md; docs/methods.md §2-§6).

``forward(batch)``: the method's ``prepare`` once, then for every stream of the backbone: embed -> the stream's
block loop with the method's hooks -> the stream's feature; the features are concatenated (``pooled``) and the
head ``{dataset}_classifier`` gives the logits. A method with ``drops_missing_streams`` (DCP, §6.5) on a
multi-stream backbone zeroes the feature of a stream whose modality is missing, and with its ``skip_missing``
computes that stream only for the other rows (exact).

Freezing, one routine for every backbone and method (§3.4, §4.1, §6.6): everything trains with ``finetune=True``,
else nothing; then the backbone's ``trainable_parts`` (ViLT pooler; CLIP, CoCa ln_post, ln_final, proj), the method's
``trainable_parameters`` and the head train; the backbone's ``untrained_parts`` (CLIP logit scale) never do.
Frozen modules stay in train mode (reference behaviour, D-23) unless ``frozen_eval_mode=True``.
Build order (backbone, its weights, head, method) follows the ViLT references for RNG parity (§4.1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mdpl.backbones.base import Backbone
from mdpl.backbones.registry import build_backbone
from mdpl.data.registry import dataset_spec
from mdpl.prompts.base import MISSING_TYPE_OF, PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.keys import complete_method_keys
from mdpl.prompts.registry import build_method


class PromptedClassifier(nn.Module):
    """Backbone + prompt method + ``{dataset}_classifier``. ``forward(batch) -> {"logits", "pooled"}``."""

    def __init__(self, config: Mapping[str, Any], backbone: Backbone | None = None) -> None:
        super().__init__()
        self.dataset = str(config.get("dataset", "mmimdb"))
        num_classes = dataset_spec(self.dataset).num_classes
        self.finetune = bool(config.get("finetune", False))
        self.frozen_eval_mode = bool(config.get("frozen_eval_mode", False))
        self.backbone = backbone if backbone is not None else build_backbone(config)
        self.head_name = f"{self.dataset}_classifier"
        self.add_module(self.head_name, self.backbone.build_head(num_classes))
        self.prompt: PromptMethod = build_method(config, self.backbone.info)
        self._apply_freezing()

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    # --- freezing -----------------------------------------------------------------------------------
    def _apply_freezing(self) -> None:
        learned = {id(p) for p in self.prompt.trainable_parameters()}
        self.requires_grad_(self.finetune)
        for item in [*self.backbone.trainable_parts(), self.head]:
            item.requires_grad_(True)
        for p in self.prompt.parameters():
            p.requires_grad_(id(p) in learned)
        for item in self.backbone.untrained_parts():
            item.requires_grad_(False)

    def set_frozen_modes(self) -> None:
        """Frozen modules follow the model's mode (train, D-23) unless ``frozen_eval_mode``: then eval."""
        if self.finetune:
            return
        for module in self.backbone.frozen_parts():
            module.train(self.training and not self.frozen_eval_mode)

    def trainable_parameters_report(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    # --- forward ------------------------------------------------------------------------------------
    def _drops(self, stream: StreamInfo) -> bool:
        return self.prompt.drops_missing_streams and not stream.joint

    def encode(self, stream: StreamInfo, batch: Mapping[str, Any], missing_type: torch.Tensor,
               prepared: Any) -> torch.Tensor:
        """The feature [B, F] of one stream."""
        dropped = MISSING_TYPE_OF[stream.modalities[0]]
        keep = missing_type != dropped if self._drops(stream) else None
        rows = None
        if keep is not None and self.prompt.skip_missing:
            rows = _kept_rows(keep, batch.get("missing_type_host"), dropped)
        x, mask, layout = self.backbone.embed(stream.name, batch, rows)
        ctx = PromptContext(missing_type if rows is None else missing_type[rows], prepared)
        encoder = self.backbone.encoders()[stream.name]
        readout = partial(self.backbone.readout, stream.name, batch=batch, rows=rows)
        needed = self.backbone.needed_length(stream.name, batch)
        token, _, _ = encoder.forward_blocks(x, mask, layout, self.prompt, ctx, readout, needed)
        feature = self.backbone.pool(stream.name, token[:, 0])
        if keep is None:
            return feature
        if rows is None:
            return feature * keep.unsqueeze(1).to(feature.dtype)
        full = feature.new_zeros(missing_type.shape[0], feature.shape[1])
        return full.index_copy(0, rows, feature)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Logits [B, C] and the concatenated stream features ``pooled`` [B, F]."""
        image = batch["image"]
        missing_type = batch.get("missing_type")
        if missing_type is None:
            missing_type = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        missing_type = missing_type.to(image.device).long()
        prepared = self.prompt.prepare(missing_type)
        features = [self.encode(s, batch, missing_type, prepared) for s in self.backbone.info.streams]
        pooled = torch.cat([f.to(features[0].dtype) for f in features], dim=1)
        return {"logits": self.head(pooled), "pooled": pooled}


def _kept_rows(keep: torch.Tensor, host_types: Sequence[int] | None, dropped: int) -> torch.Tensor | None:
    """The rows that keep a stream's modality (long, ascending), or None when every row does. With the batch's host
    copy of its missing types there is no device sync: the count comes from the host and a stable sort of the
    device mask puts the kept rows first, in order. Without it, ``nonzero`` (one sync)."""
    if host_types is None:
        return None if bool(keep.all()) else keep.nonzero().squeeze(1)
    count = sum(int(t) != dropped for t in host_types)
    if count == len(host_types):
        return None
    return torch.argsort((~keep).to(torch.uint8), stable=True)[:count]


def build_classifier(config: Mapping[str, Any]) -> PromptedClassifier:
    """The classifier of a resolved config: backbone (``backbone``), method (``prompt_method``) and dataset are
    independent. The selected method's unset keys take its defaults (``method_sizes``). On a backbone whose
    pre-trained weights come from another key (CLIP: ``clip_path``), a ``load_path`` outside ``test_only`` is an mdpl
    checkpoint of this classifier to start from, loaded strictly."""
    from mdpl.backbones.registry import backbone_entry
    from mdpl.models.checkpoints import load_classifier_checkpoint

    config = complete_method_keys(config)
    model = PromptedClassifier(config)
    path = str(config.get("load_path", "") or "")
    if path and not config.get("test_only", False) and backbone_entry(str(config.get("backbone", "vilt"))).weights_key != "load_path":
        load_classifier_checkpoint(model, path)
    return model
