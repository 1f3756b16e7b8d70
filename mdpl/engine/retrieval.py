"""Retrieval with another backbone for the preparation stage (``RetrievalRequest``; docs/architecture.md,
"Preparation").

The *retriever* is a registered two-tower backbone (e.g. CLIP) built from the run's config with the request's
backbone, local weight file (empty: the card's random initialisation, tests only) and image size (its other sizes:
the run's keys of that backbone), no prompts, frozen,
in evaluation mode, fp32, on the run's device, with its own data pipeline (its tokenizer and transform). Every item of
every requested split is embedded **complete** (both modalities), one feature per tower (the backbone's own pooled
feature: CLIP's projected image CLS and text EOT). Per split and modality the exact top-k
(``mdpl.engine.topk``) among the training items' features of the same modality gives the neighbour lists; a training
query never returns itself (by item index). Rank 0 only (the stage calls it while building the artefact).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError
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
    flat.update({"backbone": req.backbone, "prompt_method": baseline_method(), "image_size": int(req.image_size),
                 "test_only": False, "finetune": False, "load_path": "", "dynamic_text_padding": False,
                 "image_transform": ""})
    flat[card.weights.key] = str(req.weights)
    return RunConfig.from_flat(flat)


def retrieval_dependencies(run: RunConfig, req: RetrievalRequest) -> dict[str, Any]:
    """What the retrieval depends on besides the need: the retriever's weight file and sizes, each split's arrow
    file."""
    from mdpl.data.dataset import arrow_path
    from mdpl.engine.preparation import file_identity
    import dataclasses

    rrun = retriever_run(run, req)
    weights = file_identity(Path(req.weights)) if req.weights else None
    return {"weights": weights, "sizes": dataclasses.asdict(rrun.backbone),
            "pipeline": dataclasses.asdict(rrun.pipeline),
            "splits": {s: file_identity(arrow_path(run.data.data_root, run.data.dataset, s)) for s in req.splits}}


@torch.no_grad()
def split_features(model, datamodule, split: str, device: torch.device, progress: bool) -> dict[str, torch.Tensor]:
    """Modality -> [N_split, E]: each tower's feature of every item of `split`, complete, in item order."""
    from tqdm.auto import tqdm

    dataset = datamodule.datasets.get(split) or datamodule.build_dataset(split)
    datamodule.datasets[split] = dataset
    streams = model.backbone.info.streams
    parts: dict[str, list[torch.Tensor]] = {s.modalities[0]: [] for s in streams}
    loader = datamodule.items_loader(split, list(range(len(dataset))))
    for batch in tqdm(loader, desc=f"retrieval {split}", unit="batch", disable=not progress, leave=False):
        batch = datamodule.device_batch(batch, device, split, complete=True)
        types = batch["missing_type"].long()
        for stream in streams:
            parts[stream.modalities[0]].append(model.encode(stream, batch, types, None).float().cpu())
    return {m: torch.cat(p) for m, p in parts.items()}


def retrieve(run: RunConfig, req: RetrievalRequest, device: torch.device,
             progress: bool = False) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Split -> modality -> {"indices" long [N_split, k], "scores" [N_split, k]}: the nearest training items."""
    from mdpl.data.datamodule import MDPLDataModule
    from mdpl.models import build_classifier

    rrun = retriever_run(run, req)
    model = build_classifier(rrun).to(device).eval()
    if any(s.joint for s in model.backbone.info.streams):
        raise UserInputError(f"the retriever {req.backbone!r} has a joint stream; retrieval needs one tower per "
                             "modality (e.g. clip)")
    datamodule = MDPLDataModule(rrun.data, rrun.missing, rrun.pipeline, rrun.experiment.seed)
    features = {s: split_features(model, datamodule, s, device, progress) for s in dict.fromkeys((TRAIN, *req.splits))}
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for split in req.splits:
        out[split] = {}
        for modality, memory in features[TRAIN].items():
            queries = features[split][modality]
            exclude = torch.arange(queries.shape[0]) if split == TRAIN else None
            indices, scores = exact_topk(queries.to(device), memory.to(device), req.k, req.metric,
                                         None if exclude is None else exclude.to(device))
            out[split][modality] = {"indices": indices.cpu(), "scores": scores.cpu()}
    return out
