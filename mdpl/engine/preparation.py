"""The preparation stage: what a method's ``preparation_needs()`` asks for, computed once over the training split
with the frozen backbone, stored beside the data and handed to ``load_prepared`` (docs/architecture.md,
"Preparation"; docs/training.md, "Prepared artefacts").

* **Collection**: the run's classifier with a :class:`Collector` in place of its method (it inserts nothing and pools
  the block inputs the need names), in evaluation mode, fp32, without gradients, on the run's device, in batches of
  ``per_gpu_batchsize``, the training items in dataset order. Under DDP rank r takes items r, r+W, ...; the shards
  are gathered on rank 0 in item order.
* **Chunks**: each rank saves its pooled features every ``CHUNK_BATCHES`` batches (atomically) under
  ``<artefact>.partial/``; a killed preparation resumes from the chunks it finished (each chunk is recomputed with the
  same batches, so the result is identical to an uninterrupted run) and the folder is removed once the artefact exists.
* **Retrieval**: with another backbone over every split (``mdpl.engine.retrieval``): each rank embeds its share of
  every split (items r, r+W, ...), gathered on rank 0 (not chunked: a kill redoes it).
* **Artefact**: rank 0 computes k-means centres (``mdpl.engine.kmeans``) and neighbour lists (``mdpl.engine.topk``),
  within the features and over the retriever's, and writes ``<data_root>/prepared/<dataset>-<key>.pt`` atomically;
  every rank then reads it and calls
  ``load_prepared``. ``key`` hashes everything the result depends on (:func:`dependencies`): the training arrow
  file's identity, the missing table, the data pipeline, the backbone's sizes and frozen weights, the need. Other
  inputs give another key, hence another file: an artefact is never reused for changed inputs. A file under the key
  whose recorded dependencies differ (copied or edited by hand) is refused with one ``error:`` line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from mdpl.atomic import write_atomic
from mdpl.errors import UserInputError
from mdpl.engine.kmeans import kmeans
from mdpl.engine.identity import file_identity, frozen_state, tensor_digest
from mdpl.engine.retrieval import embed_shard, neighbours, retrieval_dependencies
from mdpl.engine.topk import exact_topk
from mdpl.prompts.base import MISSING_TYPE_OF, MethodConfig, PromptContext, PromptMethod, StreamInfo
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout
from mdpl.prompts.preparation import FeatureRequest, PreparationNeed, PreparedArtifact

FORMAT = 1
SPLIT = "train"
CHUNK_BATCHES = 50
"""Batches per chunk file (what a killed preparation loses at most, per rank)."""


# ------------------------------------------------------------------------------------------------ collection
class _Collected(Exception):
    """Raised by the collector once a stream's last requested layer is pooled: the blocks after it are not run."""


class Collector(PromptMethod):
    """A method that inserts nothing and pools the block inputs a :class:`PreparationNeed` asks for."""

    def __init__(self, need: PreparationNeed, info) -> None:
        super().__init__(MethodConfig(), info)
        self.need = need
        names = {s.name for s in info.streams}
        unknown = sorted({f.stream for f in need.features} - names)
        if unknown:
            raise ValueError(f"preparation needs name streams {unknown}; the backbone has {sorted(names)}")
        self.requested = [s for s in info.streams if any(f.stream == s.name for f in need.features)]
        for f in need.features:
            depth = info.stream(f.stream).num_layers
            if not all(0 <= i <= depth for i in f.layers):
                raise ValueError(f"feature {f.name!r}: layers {f.layers} outside 0..{depth} (block inputs)")
        self.last = {s.name: max(max(f.layers) for f in need.features if f.stream == s.name) for s in self.requested}
        self.pooled: dict[str, list[torch.Tensor | None]] = {}

    def reset(self) -> None:
        self.pooled = {f.name: [None] * len(f.layers) for f in self.need.features}

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        if index == 0 and self.need.mask_missing and stream.joint:
            mask = mask_missing(mask, layout, ctx.missing_type, self.need.mask_keeps_first)
        self.pool(stream, index, x, mask, layout, ctx.missing_type)
        if index >= self.last[stream.name]:
            raise _Collected
        return x, mask, layout

    def pool(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
             missing_type: torch.Tensor) -> None:
        """Pool block input `index` of `stream` for every request that names it."""
        for f in self.need.features:
            if f.stream == stream.name and index in f.layers:
                self.pooled[f.name][f.layers.index(index)] = pool_feature(f, stream, x, mask, layout, missing_type)

    def result(self) -> dict[str, torch.Tensor]:
        """Name -> [B, layers, width] of the last batch."""
        return {name: torch.stack(parts, 1) for name, parts in self.pooled.items()}


def mask_missing(mask: torch.Tensor, layout: TokenLayout, missing_type: torch.Tensor,
                 keeps_first: tuple[str, ...] = ()) -> torch.Tensor:
    """The key mask with the missing modality's segment masked in the rows that lack it (from its second token on
    for the segments in `keeps_first`)."""
    mask = mask.clone()
    for segment in (TEXT, IMAGE):
        if segment in layout:
            keep = (missing_type != MISSING_TYPE_OF[segment]).unsqueeze(1)
            span = layout.span(segment)
            if segment in keeps_first:
                span = slice(span.start + 1, span.stop)
            mask[:, span] &= keep
    return mask


def _modality(f: FeatureRequest, stream: StreamInfo) -> str | None:
    if f.segment in (TEXT, IMAGE):
        return f.segment
    return None if stream.joint else stream.modalities[0]


def pool_feature(f: FeatureRequest, stream: StreamInfo, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout,
                 missing_type: torch.Tensor) -> torch.Tensor:
    """[B, width] ([B, span, width] with ``tokens``): the request's span of x [B, N, width] pooled (``POOLINGS``),
    zero where its modality is missing with ``zero_missing``."""
    span = layout.span(f.segment) if f.segment is not None else slice(0, x.shape[1])
    xs, ms = x[:, span].float(), mask[:, span]
    if f.pooling == "mean":
        weights = ms.unsqueeze(2).to(xs.dtype)
        pooled = (xs * weights).sum(1) / weights.sum(1).clamp_min(1)
    elif f.pooling == "mean_all":
        pooled = xs.mean(1)
    elif f.pooling == "tokens":
        pooled = xs
    else:
        pooled = xs[:, 0]
    if f.zero_missing:
        modality = _modality(f, stream)
        if modality is None:
            raise ValueError(f"feature {f.name!r}: zero_missing needs a text or image segment on a joint stream")
        keep = (missing_type != MISSING_TYPE_OF[modality]).to(pooled.dtype)
        pooled = pooled * keep.view(-1, *([1] * (pooled.dim() - 1)))
    return pooled


def pooled_batch(backbone, collector: Collector, batch: dict) -> dict[str, torch.Tensor]:
    """The need's features [B, layers, width] of one device batch (every requested stream, blocks after the last
    requested layer skipped)."""
    collector.reset()
    types = batch["missing_type"].long()
    encoders = backbone.encoders()
    for stream in collector.requested:
        x, mask, layout = backbone.embed(stream.name, batch, None)
        try:
            x, mask, layout = encoders[stream.name].forward_blocks(x, mask, layout, collector, PromptContext(types))
        except _Collected:
            continue
        collector.pool(stream, stream.num_layers, x, mask, layout, types)
    return collector.result()


# ------------------------------------------------------------------------------------------------ identity
def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings (what a stored artefact records)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def dependencies(run, need: PreparationNeed, dataset, backbone: nn.Module,
                 more: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the artefact depends on: data (arrow file, items, missing table, pipeline), backbone (sizes,
    frozen weights; all weights with ``finetune``) and the need. The run seed enters only through the missing table.
    `more`: split -> dataset of the splits collected after the training split (``PreparationNeed.splits``)."""
    tables = [("table", dataset.missing_table)] + [(f"table/{s}", d.missing_table) for s, d in (more or {}).items()]
    table = None if need.missing == "complete" else tensor_digest(tables)
    return _plain({
        "format": FORMAT, "dataset": run.data.dataset, "split": SPLIT, "items": len(dataset),
        "arrow": file_identity(Path(dataset.path)), "missing_table": table,
        "data": {"mmimdb_items": run.data.mmimdb_items}, "pipeline": dataclasses.asdict(run.pipeline),
        "backbone": {"name": run.card.name, "sizes": dataclasses.asdict(run.backbone),
                     "weights_sha256": tensor_digest(frozen_state(backbone, not run.model.finetune))},
        "need": need.as_dict(),
        "retrieval": {req.name: retrieval_dependencies(run, req) for req in need.retrieval},
    **({"memory_splits": {s: {"items": len(d), "arrow": file_identity(Path(d.path))} for s, d in more.items()}}
       if more else {}),
    })


def artefact_key(deps: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:20]


def artefact_path(data_root: str | Path, dataset: str, key: str) -> Path:
    """``<data_root>/prepared/<dataset>-<key>.pt``."""
    return Path(data_root) / "prepared" / f"{dataset}-{key}.pt"


# ------------------------------------------------------------------------------------------------ processes
class Group:
    """This process's place in a torch.distributed group (one process without one)."""

    def __init__(self) -> None:
        d = torch.distributed
        self.on = d.is_available() and d.is_initialized() and d.get_world_size() > 1
        self.rank = d.get_rank() if self.on else 0
        self.world = d.get_world_size() if self.on else 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not self.on:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out


# ------------------------------------------------------------------------------------------------ chunks
def _load(path: Path) -> Any:
    """A saved object, its tensors memory-mapped (a memory bank need not fit in memory twice)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda fh: torch.save(obj, fh))


def _chunk_done(path: Path, key: str, items: list[int]) -> dict[str, torch.Tensor] | None:
    """The features of a finished chunk file for these items under this key, else None."""
    if not path.is_file():
        return None
    try:
        chunk = _load(path)
    except Exception:  # noqa: BLE001 - an unreadable leftover is recomputed
        return None
    if chunk.get("key") != key or chunk.get("items") != items:
        return None
    return chunk["features"]


def collect_shard(model, need: PreparationNeed, datamodule, items: list[int], device: torch.device, key: str,
                  partial: Path, chunk_batches: int, progress: bool,
                  on_chunk: Callable[[int], None] | None, split: str = SPLIT) -> dict[str, torch.Tensor]:
    """This rank's features (name -> [len(items), layers, width], in the order of `items` of `split`), chunk by
    chunk."""
    from tqdm.auto import tqdm

    collector = Collector(need, model.backbone.info)
    size = max(1, chunk_batches * int(datamodule.data.per_gpu_batchsize))
    pieces = [items[i:i + size] for i in range(0, len(items), size)]
    batches = -(-len(items) // int(datamodule.data.per_gpu_batchsize))
    bar = tqdm(total=batches, desc=f"preparation {split}", unit="batch", disable=not progress, leave=False)
    done: list[dict[str, torch.Tensor]] = []
    for index, piece in enumerate(pieces):
        path = partial / f"chunk{index:05d}.pt"
        features = _chunk_done(path, key, piece)
        if features is None:
            features = _collect(model, collector, datamodule, piece, device, need, bar, split)
            _save(path, {"key": key, "items": piece, "features": features})
        else:
            bar.update(-(-len(piece) // int(datamodule.data.per_gpu_batchsize)))
        done.append(features)
        if on_chunk is not None:
            on_chunk(index)
    bar.close()
    names = [f.name for f in need.features]
    return {n: torch.cat([d[n] for d in done]) if done else torch.zeros(0) for n in names}


@torch.no_grad()
def _collect(model, collector: Collector, datamodule, items: list[int], device: torch.device,
             need: PreparationNeed, bar, split: str = SPLIT) -> dict[str, torch.Tensor]:
    parts: list[dict[str, torch.Tensor]] = []
    for batch in datamodule.items_loader(split, items):
        batch = datamodule.device_batch(batch, device, split, complete=need.missing == "complete")
        dtypes = {f.name: getattr(torch, f.dtype) for f in need.features}
        parts.append({k: v.to("cpu", dtypes[k]) for k, v in pooled_batch(model.backbone, collector, batch).items()})
        bar.update(1)
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


# ------------------------------------------------------------------------------------------------ artefact
def assemble(parts: list[tuple[list[int], dict[str, torch.Tensor]]], n_items: int) -> dict[str, torch.Tensor]:
    """The ranks' features in item order (every item exactly once)."""
    items = torch.tensor([i for its, _ in parts for i in its], dtype=torch.long)
    if not torch.equal(items.sort().values, torch.arange(n_items)):
        raise RuntimeError(f"the preparation's shards cover {items.numel()} items, not each of {n_items} once")
    order = items.argsort()
    names = parts[0][1].keys()
    return {n: torch.cat([f[n] for its, f in parts if its])[order] for n in names}


def compute(need: PreparationNeed, features: dict[str, torch.Tensor],
            device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """K-means centres (name -> [layers, k', width]) and neighbour lists (name -> {indices, scores})."""
    centres, neighbours = {}, {}
    for req in need.kmeans:
        f = features[req.feature]
        rows = f.flatten(1).abs().sum(1) > 0 if req.drop_zero_rows else torch.ones(f.shape[0], dtype=torch.bool)
        x = f[rows].transpose(0, 1).contiguous().to(device)
        if x.shape[1] == 0:
            raise RuntimeError(f"k-means over {req.feature!r}: no rows to cluster")
        result = kmeans(x, min(req.k, x.shape[1]), req.iters, req.seed, req.n_init, req.tol)
        centres[req.feature] = result.centres.cpu()
    for req in need.neighbours:
        x = features[req.feature][:, need.feature(req.feature).layers.index(req.layer)].to(device)
        exclude = torch.arange(x.shape[0], device=device) if req.exclude_self else None
        indices, scores = exact_topk(x, x, req.k, req.metric, exclude)
        neighbours[req.feature] = {"indices": indices.cpu(), "scores": scores.cpu()}
    return centres, neighbours


def read_artifact(path: Path, deps: dict[str, Any], key: str) -> PreparedArtifact:
    """The stored artefact, refused (UserInputError) when unreadable or recorded for other inputs."""
    try:
        stored = _load(path)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise UserInputError(f"prepared artefact {path} cannot be read ({type(err).__name__}); delete it and run "
                             f"again to rebuild it") from None
    recorded = stored.get("dependencies") if isinstance(stored, dict) else None
    if recorded != deps:
        differ = sorted(k for k in set(deps) | set(recorded or {}) if (recorded or {}).get(k) != deps.get(k))
        raise UserInputError(f"prepared artefact {path} was computed from other inputs (differing: "
                             f"{', '.join(differ)}); it is not used: delete it and run again to rebuild it")
    return PreparedArtifact(key=key, dependencies=recorded, item_index=stored["item_index"],
                            features=stored["features"], centres=stored["centres"],
                            neighbours={k: (v["indices"], v["scores"]) for k, v in stored["neighbours"].items()},
                            retrieved={name: {split: {m: (v["indices"], v["scores"]) for m, v in lists.items()}
                                              for split, lists in per_split.items()}
                                       for name, per_split in stored.get("retrieved", {}).items()},
                            labels=stored.get("labels"))


def _build(run, need: PreparationNeed, parts: dict[str, list], embedded: dict[str, list], datasets: dict[str, Any],
           deps: dict[str, Any], key: str, path: Path, device: torch.device) -> None:
    """Rank 0: the artefact from the gathered shards (split -> the ranks' parts) and the ranks' retriever features
    (request -> the ranks' :func:`embed_shard`), written atomically; the chunk folder removed. The rows are the need's
    splits in turn."""
    per_split = [assemble(parts[s], len(datasets[s])) for s in need.splits]
    features = {n: torch.cat([f[n] for f in per_split]) for n in per_split[0]}
    n_items = sum(len(datasets[s]) for s in need.splits)
    centres, neighbour_lists = compute(need, features, device)
    retrieved = {req.name: neighbours(req, retriever_features(embedded[req.name]), device) for req in need.retrieval}
    labels = (torch.cat([datasets[s].labels[datasets[s].item_rows] for s in need.splits])
              if need.keep_labels else None)
    _save(path, {"format": FORMAT, "key": key, "dependencies": deps, "item_index": torch.arange(n_items),
                 "features": features if need.keep_features else {}, "centres": centres, "neighbours": neighbour_lists,
                 "retrieved": retrieved, "labels": labels})
    shutil.rmtree(partial_folder(path), ignore_errors=True)


def retriever_features(shares: list[dict[str, tuple[list[int], dict[str, torch.Tensor]]]]) -> dict[str, dict]:
    """Split -> modality -> features of every item in item order, from the ranks' :func:`embed_shard` shares."""
    return {split: assemble([share[split] for share in shares],
                            sum(len(share[split][0]) for share in shares)) for split in shares[0]}


def partial_folder(path: Path) -> Path:
    return path.with_name(path.stem + ".partial")


# ------------------------------------------------------------------------------------------------ the stage
def run_preparation(run, model, datamodule, device: torch.device | str = "cpu", progress: bool = True,
                    on_chunk: Callable[[int], None] | None = None,
                    chunk_batches: int = CHUNK_BATCHES) -> PreparedArtifact | None:
    """The preparation of `model`'s method (a ``PromptedClassifier``) for run config `run`: computed (or read) and
    handed to ``load_prepared`` on every rank; None when the method needs none. `on_chunk(i)` is called after this
    rank's chunk i is on disk (tests)."""
    need = model.prompt.preparation_needs()
    if need is None:
        return None
    device = torch.device(device)
    group = Group()
    for split in need.splits:
        if split not in datamodule.datasets:
            datamodule.datasets[split] = datamodule.build_dataset(split)
    datasets = {s: datamodule.datasets[s] for s in need.splits}
    deps = dependencies(run, need, datasets[SPLIT], model.backbone, {s: d for s, d in datasets.items() if s != SPLIT})
    key = artefact_key(deps)
    path = artefact_path(run.data.data_root, run.data.dataset, key)
    if not group.broadcast(path.is_file()):
        parts = {}
        for split, dataset in datasets.items():
            items = list(range(group.rank, len(dataset), group.world))
            rank = f"rank{group.rank}of{group.world}"
            partial = partial_folder(path) / (rank if split == SPLIT else f"{split}-{rank}")
            with evaluation_mode(model):
                shard = collect_shard(model, need, datamodule, items, device, key, partial, chunk_batches,
                                      progress and group.rank == 0, on_chunk, split)
            parts[split] = group.gather((items, shard))
        embedded = {req.name: group.gather(embed_shard(run, req, device, group.rank, group.world,
                                                       progress and group.rank == 0)) for req in need.retrieval}
        error = None
        if group.rank == 0:
            try:
                _build(run, need, parts, embedded, datasets, deps, key, path, device)
            except BaseException as err:   # tell the other ranks instead of leaving them waiting
                error = err
        message = group.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"global rank 0 could not build the prepared artefact: {message}")
    artifact = read_artifact(path, deps, key)
    model.prompt.load_prepared(artifact)
    return artifact


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block (no dropout), each restored to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class PreparationStage(pl.Callback):
    """Runs :func:`run_preparation` on every rank in the trainer's ``setup`` (the processes are connected; before
    Lightning restores a checkpoint), on the strategy's device, once per trainer.

    The checkpoint wins: when fit resumes, Lightning restores the method's tensors after ``load_prepared``; for
    ``test_only`` (``stage == "test"``: the weights were loaded before the trainer existed) the method's state is
    put back after ``load_prepared``, which then supplies only what checkpoints do not hold."""

    def __init__(self, run, progress: bool = True) -> None:
        self.run = run
        self.progress = progress
        self.done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.done or stage not in ("fit", "test"):
            return
        self.done = True
        method = getattr(pl_module.model, "prompt", None)   # injected models (tests) may have no method
        if not isinstance(method, PromptMethod) or method.preparation_needs() is None:
            return
        pl_module.to(trainer.strategy.root_device)   # where the strategy puts it next anyway
        kept = {k: v.clone() for k, v in method.state_dict().items()} if stage == "test" else None
        run_preparation(self.run, pl_module.model, trainer.datamodule, trainer.strategy.root_device,
                        progress=self.progress and trainer.is_global_zero)
        if kept is not None:
            method.load_state_dict(kept)
