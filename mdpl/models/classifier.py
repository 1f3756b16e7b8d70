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

Weight adapters (``mdpl.prompts.adapters``): the method's ``adapter_specs`` are resolved here against the streams'
linear maps (``StreamEncoder.linear_map``) and built by the method (its ``adapters``, trained with it). The block
loop computes the adapted maps through them; :meth:`PromptedClassifier.merge_adapters` folds them into the frozen
weights (the model then runs the plain block loop, and its state dict carries ``adapters_merged`` instead of the
adapters, so a merged checkpoint loads into a classifier that drops its adapters first, :meth:`accept_state`).

Auxiliary losses: ``forward`` adds the method's terms (``aux_losses``, unweighted) and their weighted sum
(``aux_loss``) to its output when the method declares any; the engine adds ``aux_loss`` to the training loss only.
Build order (backbone, its weights, head, method) follows the ViLT references for RNG parity (§4.1).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mdpl.backbones.base import Backbone
from mdpl.backbones.encoder import BlocksOut, run_to_end
from mdpl.backbones.registry import build_backbone
from mdpl.data.registry import dataset_spec
from mdpl.prompts.adapters import AdapterSite
from mdpl.prompts.base import MISSING_TYPE_OF, PromptContext, PromptMethod, StreamInfo
from mdpl.config.run_config import RunConfig
from mdpl.prompts.registry import build_method


class PromptedClassifier(nn.Module):
    """Backbone + prompt method + ``{dataset}_classifier``. ``forward(batch) -> {"logits", "pooled"}``."""

    def __init__(self, config: RunConfig | Mapping[str, Any], backbone: Backbone | None = None) -> None:
        """`config`: the run config (a flat dict is typed first)."""
        super().__init__()
        run = RunConfig.coerce(config)
        self.dataset = run.data.dataset
        num_classes = dataset_spec(self.dataset).num_classes
        self.finetune = bool(run.model.finetune)
        self.frozen_eval_mode = bool(run.model.frozen_eval_mode)
        self.backbone = backbone if backbone is not None else build_backbone(run)
        self.head_name = f"{self.dataset}_classifier"
        self.add_module(self.head_name, self.backbone.build_head(num_classes))
        self.prompt: PromptMethod = build_method(run.experiment.prompt_method, run.method, self.backbone.info)
        own_head = self.prompt.build_head(num_classes)
        if own_head is not None:     # the method's own head replaces the backbone's
            self.add_module(self.head_name, own_head)
        self._attach_adapters()
        self._apply_freezing()
        self._originals: list[tuple[AdapterSite, torch.Tensor]] | None = None

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    # --- weight adapters ------------------------------------------------------------------------------
    def _attach_adapters(self) -> None:
        """Build the method's declared adapters, each from the frozen weight of the map it adapts."""
        specs = self.prompt.adapter_specs()
        if not specs:
            return
        encoders = self.backbone.encoders()
        depths = {name: len(encoder.blocks) for name, encoder in encoders.items()}
        for spec in specs:
            spec.check(depths)
            for site in spec.sites():
                weight, _ = encoders[site.stream].linear_map(site.block, site.map)
                self.prompt.add_adapter(site, self.prompt.build_adapter(site, spec, weight.detach()))

    def _frozen_weight(self, site: AdapterSite) -> torch.Tensor:
        return self.backbone.encoders()[site.stream].linear_map(site.block, site.map)[0]

    @property
    def has_merged_adapters(self) -> bool:
        """Whether the method's adapters were merged into the weights for good (``merge_adapters()``)."""
        return "adapters_merged" in self._buffers

    @torch.no_grad()
    def merge_adapters(self, keep_originals: bool = False) -> "PromptedClassifier":
        """Fold every adapter into the frozen weight it adapts (``WeightAdapter.merged_weight``: evaluation mode,
        float32), in place; the model then runs no adapter code. By default for good (export): the adapters are
        removed and the state dict gains the marker ``adapters_merged``. With `keep_originals` (evaluation of a
        model that trains on): the adapted weights are saved, the adapters only switched off, and
        :meth:`unmerge_adapters` restores both."""
        sites = self.prompt.adapter_sites()
        if not sites or self._originals is not None:
            return self
        originals = []
        for site, adapter in sites:
            weight = self._frozen_weight(site)
            merged = adapter.merged_weight(weight)
            if keep_originals:
                originals.append((site, weight.detach().clone()))
            weight.copy_(merged)
        if keep_originals:
            self._originals = originals
            self.prompt.adapters_enabled = False
        else:
            self._drop_adapters()
        return self

    @torch.no_grad()
    def unmerge_adapters(self) -> None:
        """Undo ``merge_adapters(keep_originals=True)``: the saved weights back, the adapters on again."""
        if self._originals is None:
            return
        for site, original in self._originals:
            self._frozen_weight(site).copy_(original)
        self._originals = None
        self.prompt.adapters_enabled = True

    def _drop_adapters(self) -> None:
        self.prompt.remove_adapters()
        self.register_buffer("adapters_merged", torch.ones((), dtype=torch.bool))

    def accept_state(self, state: Mapping[str, Any], prefix: str = "") -> None:
        """Before `state` (keys under `prefix`) is loaded strictly: a merged state (its ``adapters_merged`` marker)
        needs a classifier without adapters — the frozen weights it holds already carry them."""
        if f"{prefix}adapters_merged" in state and not self.has_merged_adapters:
            self._drop_adapters()

    def adapter_parameter_count(self) -> int:
        """Parameters of the method's weight adapters (0 without adapters or once merged)."""
        return sum(p.numel() for p in self.prompt.adapters.parameters())

    # --- freezing -----------------------------------------------------------------------------------
    def _apply_freezing(self) -> None:
        """Also trains the adapters, whatever the method's ``trainable_parameters`` lists."""
        learned = {id(p) for p in self.prompt.trainable_parameters()}
        learned |= {id(p) for p in self.prompt.adapters.parameters()}
        self.requires_grad_(self.finetune)
        parts = self.backbone.trainable_parts() if self.prompt.trains_backbone_parts else []
        optional = self.backbone.optional_parts()
        for name in self.prompt.extra_backbone_parts:
            parts = [*parts, *optional.get(name, [])]
        for item in [*parts, self.head]:
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
        """(total, trainable) parameter counts (adapters included: ``adapter_parameter_count``)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    # --- forward ------------------------------------------------------------------------------------
    def _drops(self, stream: StreamInfo) -> bool:
        return self.prompt.drops_missing_streams and not stream.joint

    def encode(self, stream: StreamInfo, batch: Mapping[str, Any], missing_type: torch.Tensor,
               prepared: Any) -> torch.Tensor:
        """The feature [B, F] of one stream."""
        steps, finish = self._stream_steps(stream, batch, missing_type, prepared)
        return finish(run_to_end(steps).x)

    def _stream_steps(self, stream: StreamInfo, batch: Mapping[str, Any], missing_type: torch.Tensor,
                      prepared: Any) -> tuple[Iterator[int | BlocksOut], Callable[[torch.Tensor], torch.Tensor]]:
        """The block loop of one stream as a generator (``StreamEncoder.block_steps``) and the function that turns its
        read-out token into the feature [B, F]."""
        dropped = MISSING_TYPE_OF[stream.modalities[0]]
        keep = missing_type != dropped if self._drops(stream) else None
        rows = None
        if keep is not None and self.prompt.skip_missing:
            rows = _kept_rows(keep, batch.get("missing_type_host"), dropped)
        x, mask, layout = self.backbone.embed(stream.name, batch, rows)
        ctx = PromptContext(missing_type if rows is None else missing_type[rows], prepared,
                            token_ids=self.backbone.token_ids(stream.name, batch, rows))
        segment = self.prompt.readout_segment(stream)
        if segment is None:
            base = partial(self.backbone.readout, stream.name, batch=batch, rows=rows)
        else:
            n = missing_type.shape[0] if rows is None else rows.shape[0]
            base = partial(_segment_start, segment, n, missing_type.device)
        ctx.readout = lambda layout: self.prompt.readout_override(stream, layout, base(layout), ctx)
        encoder = self.backbone.encoders()[stream.name]
        needed = self.backbone.needed_length(stream.name, batch)
        steps = encoder.block_steps(x, mask, layout, self.prompt, ctx, ctx.readout, needed)

        def finish(token: torch.Tensor) -> torch.Tensor:
            feature = self.backbone.pool(stream.name, token[:, 0])
            if keep is None:
                return feature
            if rows is None:
                return feature * keep.unsqueeze(1).to(feature.dtype)
            full = feature.new_zeros(missing_type.shape[0], feature.shape[1])
            return full.index_copy(0, rows, feature)

        return steps, finish

    def encode_lock_step(self, order: Sequence[str], batch: Mapping[str, Any], missing_type: torch.Tensor,
                         prepared: Any) -> list[torch.Tensor]:
        """The features of every stream (in ``info.streams`` order) with the streams advanced in one block loop:
        block ``i`` of each stream in `order`, then block ``i + 1`` (``PromptMethod.lock_step_order``)."""
        streams = {s.name: s for s in self.backbone.info.streams}
        if sorted(order) != sorted(streams):
            raise ValueError(f"lock_step_order {tuple(order)} must name every stream {tuple(streams)} once")
        runs = {name: self._stream_steps(streams[name], batch, missing_type, prepared) for name in order}
        tokens: dict[str, torch.Tensor] = {}
        while len(tokens) < len(runs):
            for name in order:
                if name in tokens:
                    continue
                item = next(runs[name][0])
                if isinstance(item, BlocksOut):
                    tokens[name] = item.x
        return [runs[s.name][1](tokens[s.name]) for s in self.backbone.info.streams]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Logits [B, C] and the concatenated stream features ``pooled`` [B, F]."""
        image = batch["image"]
        missing_type = batch.get("missing_type")
        if missing_type is None:
            missing_type = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        missing_type = missing_type.to(image.device).long()
        prepared = self.prompt.prepare_batch(missing_type, batch)
        order = self.prompt.lock_step_order(self.backbone.info)
        if order is None or self.backbone.info.single_stream:
            features = [self.encode(s, batch, missing_type, prepared) for s in self.backbone.info.streams]
        else:
            features = self.encode_lock_step(order, batch, missing_type, prepared)
        pooled = torch.cat([f.to(features[0].dtype) for f in features], dim=1)
        out = {"logits": self.prompt.head_logits(self.head, pooled, prepared), "pooled": pooled}
        if self.prompt.aux_loss_names:
            out.update(self._aux_losses(prepared))
        return out

    def _aux_losses(self, prepared: Any) -> dict[str, Any]:
        """``aux_losses`` (name -> unweighted term) and ``aux_loss`` (their weighted sum) of the method."""
        terms = self.prompt.aux_losses(prepared)
        unknown = sorted(set(terms) - set(self.prompt.aux_loss_names))
        if unknown:
            raise ValueError(f"{type(self.prompt).__name__}.aux_losses returned {unknown}, not in its aux_loss_names")
        total = sum((self.prompt.aux_loss_weight(name) * term for name, term in terms.items()),
                    torch.zeros((), device=self.head_device()))
        return {"aux_losses": terms, "aux_loss": total}

    def head_device(self) -> torch.device:
        return next(self.head.parameters()).device


def _segment_start(segment: str, rows: int, device: torch.device, layout) -> torch.Tensor:
    """Long [rows]: the first position of a method's segment in `layout` (``PromptMethod.readout_segment``)."""
    return torch.full((rows,), layout.offset(segment), dtype=torch.long, device=device)


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


def build_classifier(config: RunConfig | Mapping[str, Any]) -> PromptedClassifier:
    """The classifier of a run config (a flat dict is typed first): backbone, method and dataset are independent.
    On a backbone whose pre-trained weights come from another key (its card's ``weights``, e.g. ``clip_path``), a
    ``load_path`` outside ``test_only`` is an mdpl checkpoint of this classifier to start from, loaded strictly."""
    from mdpl.models.checkpoints import load_classifier_checkpoint

    run = RunConfig.coerce(config)
    model = PromptedClassifier(run)
    path = run.model.load_path
    if path and not run.trainer.test_only and run.card.weights.key != "load_path":
        load_classifier_checkpoint(model, path)
    return model
