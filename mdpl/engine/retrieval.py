"""Retrieval with another backbone for the preparation stage (``RetrievalRequest``; docs/architecture.md,
"Preparation").

The *retriever* is a registered two-tower backbone (e.g. CLIP) built from the run's config with the request's
backbone, local weight file (empty: the card's random initialisation, tests only) and image size (its other sizes:
the run's keys of that backbone), no prompts, frozen,
in evaluation mode, fp32, on the run's device, with its own data pipeline (its tokenizer and transform). Every item of
every requested split is embedded **complete** (both modalities), one feature per tower (the backbone's own pooled
feature: CLIP's projected image CLS and text EOT, or a text-feature variant the retriever offers,
``RetrievalRequest.text_features``). Per split and modality the exact top-k (``mdpl.engine.topk``) among the memory
items' features of the same modality gives the neighbour lists. The memory is the training split (or the request's
``memory`` splits, in turn); by default a query that is a memory item never returns itself (by item index),
``self_exclusion="position"`` instead bars memory row p to query p of every split (:func:`excluded_rows`). Under
DDP every rank embeds its share of each split (:func:`embed_shard`); rank 0 gathers the shares and computes the lists
(:func:`neighbours`) while building the artefact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError
from mdpl.engine.identity import file_identity
from mdpl.engine.topk import exact_topk
from mdpl.prompts.preparation import RetrievalRequest

TRAIN = "train"


def retriever_run(run: RunConfig, req: RetrievalRequest) -> RunConfig:
    """The retriever's run config: the run's, with the request's backbone, weights and image size, no method."""
    from mdpl.backbones.registry import available_backbones, backbone_card
    from mdpl.prompts.registry import baseline_method

    if req.backbone not in available_backbones():
        raise UserInputError(f"retriever backbone {req.backbone!r} is not registered; choose one of "
                             f"{', '.join(available_backbones())}")
    if req.weights and not Path(req.weights).is_file():
        raise UserInputError(f"retriever weights {req.weights!r} ({req.backbone}) is not a file")
    card = backbone_card(req.backbone)
    flat = run.to_flat()
    pretrained = flat.get(run.card.weights.key, "")
    if pretrained and not req.weights:
        raise UserInputError(f"{req.weights_key or 'the retriever weight file'} is empty: the {req.backbone} "
                             f"retriever would be random (its neighbours too) while the backbone is pre-trained "
                             f"({run.card.weights.key}={pretrained}); give the retriever's local weight file")
    flat.update({"backbone": req.backbone, "prompt_method": baseline_method(), "image_size": int(req.image_size),
                 "test_only": False, "finetune": False, "load_path": "", "dynamic_text_padding": False,
                 "image_transform": ""})
    flat[card.weights.key] = str(req.weights)
    return RunConfig.from_flat(flat)


def retrieval_dependencies(run: RunConfig, req: RetrievalRequest) -> dict[str, Any]:
    """What the retrieval depends on besides the need: the retriever's weight file and sizes, each split's arrow
    file."""
    from mdpl.data.dataset import arrow_path
    import dataclasses

    rrun = retriever_run(run, req)
    weights = file_identity(Path(req.weights)) if req.weights else None
    return {"weights": weights, "sizes": dataclasses.asdict(rrun.backbone),
            "pipeline": dataclasses.asdict(rrun.pipeline),
            "splits": {s: file_identity(arrow_path(run.data.data_root, run.data.dataset, s)) for s in req.splits}}


def excluded_rows(split: str, n_queries: int, sizes: dict[str, int], memory: tuple[str, ...],
                  mode: str) -> torch.Tensor | None:
    """Long [n_queries]: the memory row each query of `split` may not return (-1: none), or None. `sizes`: split ->
    items; the memory is `memory`'s splits in turn. ``index``: a memory split's queries bar their own rows;
    ``position``: query p bars memory row p whatever its split (rows past the memory: none)."""
    total = sum(sizes[s] for s in memory)
    if mode == "position":
        rows = torch.arange(n_queries)
        return torch.where(rows < total, rows, torch.full_like(rows, -1))
    if split not in memory:
        return None
    offset = sum(sizes[s] for s in memory[:memory.index(split)])
    return offset + torch.arange(n_queries)


@torch.no_grad()
def split_features(model, datamodule, split: str, device: torch.device, progress: bool,
                   text_features: str = "", items: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Modality -> [len(items), E]: each tower's feature of the items of `split` (default: every item, in order),
    complete (`text_features`: a variant of the text tower's, ``TwoTowerBackbone.text_feature``)."""
    from tqdm.auto import tqdm

    dataset = datamodule.datasets.get(split) or datamodule.build_dataset(split)
    datamodule.datasets[split] = dataset
    streams = model.backbone.info.streams
    parts: dict[str, list[torch.Tensor]] = {s.modalities[0]: [] for s in streams}
    loader = datamodule.items_loader(split, list(range(len(dataset))) if items is None else items)
    for batch in tqdm(loader, desc=f"retrieval {split}", unit="batch", disable=not progress, leave=False):
        batch = datamodule.device_batch(batch, device, split, complete=True)
        types = batch["missing_type"].long()
        for stream in streams:
            if text_features and stream.modalities[0] == "text":
                feature = model.backbone.text_feature(batch, text_features)
            else:
                feature = model.encode(stream, batch, types, None)
            parts[stream.modalities[0]].append(feature.float().cpu())
    width = {s.modalities[0]: 0 for s in streams}
    return {m: torch.cat(p) if p else torch.zeros(0, width[m]) for m, p in parts.items()}


def retriever(run: RunConfig, req: RetrievalRequest, device: torch.device):
    """The frozen retriever (a classifier without prompts, eval mode, on `device`) and its data module."""
    from mdpl.data.datamodule import MDPLDataModule
    from mdpl.models import build_classifier

    rrun = retriever_run(run, req)
    model = build_classifier(rrun).to(device).eval()
    if any(s.joint for s in model.backbone.info.streams):
        raise UserInputError(f"the retriever {req.backbone!r} has a joint stream; retrieval needs one tower per "
                             "modality (e.g. clip)")
    if req.text_features and req.text_features not in getattr(model.backbone, "text_feature_variants", ()):
        raise UserInputError(f"the retriever {req.backbone!r} has no text feature {req.text_features!r}")
    return model, MDPLDataModule(rrun.data, rrun.missing, rrun.pipeline, rrun.experiment.seed)


def embed_shard(run: RunConfig, req: RetrievalRequest, device: torch.device, rank: int = 0, world: int = 1,
                progress: bool = False) -> dict[str, tuple[list[int], dict[str, torch.Tensor]]]:
    """Split -> (this rank's items: every `world`-th from `rank`, modality -> their features [n, E]), for the memory
    splits and the query splits (a DDP rank's share; rank 0 gathers the shares)."""
    model, datamodule = retriever(run, req, device)
    out = {}
    for split in dict.fromkeys((*req.memory, *req.splits)):
        dataset = datamodule.datasets.get(split) or datamodule.build_dataset(split)
        datamodule.datasets[split] = dataset
        items = list(range(rank, len(dataset), world))
        out[split] = (items, split_features(model, datamodule, split, device, progress, req.text_features, items))
    return out


def neighbours(req: RetrievalRequest, features: dict[str, dict[str, torch.Tensor]],
               device: torch.device) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Split -> modality -> {"indices" long [N_split, k], "scores" [N_split, k]}: the nearest memory items by exact
    top-k, from every item's features (split -> modality -> [N_split, E], in item order)."""
    sizes = {s: next(iter(f.values())).shape[0] for s, f in features.items()}
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for split in req.splits:
        out[split] = {}
        for modality in features[TRAIN]:
            memory = torch.cat([features[s][modality] for s in req.memory])
            queries = features[split][modality]
            exclude = excluded_rows(split, queries.shape[0], sizes, req.memory, req.self_exclusion)
            indices, scores = exact_topk(queries.to(device), memory.to(device), req.k, req.metric,
                                         None if exclude is None else exclude.to(device))
            out[split][modality] = {"indices": indices.cpu(), "scores": scores.cpu()}
    return out


def retrieve(run: RunConfig, req: RetrievalRequest, device: torch.device,
             progress: bool = False) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """:func:`neighbours` of every item, embedded in this process."""
    return neighbours(req, {s: f for s, (_, f) in embed_shard(run, req, device, progress=progress).items()}, device)
