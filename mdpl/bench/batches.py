"""Synthetic batches in the collated batch format (``mdpl.data.collate``): mixed missing types with the dummies
applied, real texts of a length in each dataset's ``bench_text_fill`` range, images at its typical aspects."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from mdpl.config import RunConfig
from mdpl.data.missing import apply_missing
from mdpl.data.registry import dataset_spec

MISSING_PROBS = (0.3, 0.35, 0.35)  # complete / text missing / image missing: missing_ratio 0.7, 'both'
VILT_CLS, VILT_SEP = 101, 102
CLIP_SOT, CLIP_EOT = 49406, 49407


def missing_counts(batch_size: int, probs: tuple[float, ...] = MISSING_PROBS) -> list[int]:
    """Rows per missing type in a batch of ``batch_size``: ``probs`` scaled to the batch, rounded by largest
    remainder (ties to the earlier type), so every batch carries the stated mix as closely as its size allows
    (batch 20: 6 / 7 / 7; batch 4: 1 / 2 / 1). A random draw would let a small batch miss half its images."""
    exact = [p * batch_size for p in probs]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(probs)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def _missing_types(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    counts = missing_counts(batch_size)
    types = torch.cat([torch.full((c,), t, dtype=torch.long) for t, c in enumerate(counts)])
    return types[torch.randperm(batch_size, generator=gen)]


def _labels(dataset: str, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    spec = dataset_spec(dataset)
    if spec.multi_label:
        return (torch.rand(batch_size, spec.num_classes, generator=gen) < 0.15).float()
    return torch.randint(0, spec.num_classes, (batch_size,), generator=gen)


def _text(batch_size: int, length: int, fill: tuple[int, int], vocab: tuple[int, int], start: int, end: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[start] + random ids + [end] + zero padding, with per-sample real lengths drawn from ``fill``."""
    lo, hi = min(fill[0], length), min(fill[1], length)
    n = torch.randint(max(2, lo), max(2, hi) + 1, (batch_size,), generator=gen)
    pos = torch.arange(length)[None]
    ids = torch.randint(vocab[0], vocab[1], (batch_size, length), generator=gen)
    ids = torch.where(pos < n[:, None], ids, torch.zeros_like(ids))
    ids[:, 0] = start
    ids[torch.arange(batch_size), n - 1] = end
    return ids.long(), (pos < n[:, None]).long()


def _images(run: RunConfig, batch_size: int, size_key: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, their [h, w] sizes): one square of ``image_size`` for a fixed-size transform ('clip', 'square'); for ViLT's
    aspect-keeping resize ('pixelbert'), the dataset's typical patch grids, zero beyond each image."""
    if run.pipeline.transform != "pixelbert":
        side = int(run.backbone.image_size)
        return torch.randn(batch_size, 3, side, side, generator=gen), torch.full((batch_size, 2), side, dtype=torch.long)
    cycle = dataset_spec(run.data.dataset).bench_patch_grids[size_key]
    sizes = torch.tensor([cycle[i % len(cycle)] for i in range(batch_size)], dtype=torch.long) * int(run.backbone.patch_size)
    h, w = (int(v) for v in sizes.max(dim=0).values)
    image = torch.randn(batch_size, 3, h, w, generator=gen)
    valid = ((torch.arange(h)[None, :, None] < sizes[:, 0, None, None])
             & (torch.arange(w)[None, None, :] < sizes[:, 1, None, None]))
    return image * valid[:, None], sizes


def _texts(run: RunConfig, batch_size: int, size_key: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(ids, masks, dummy ids) of the backbone's tokenizer ('bert': [CLS] .. [SEP] over ids from 1000; 'bpe':
    SOT .. EOT), ``text_length`` ids, cut to the batch's longest text where the pipeline pads dynamically."""
    fill = dataset_spec(run.data.dataset).bench_text_fill[size_key]
    length = int(run.backbone.text_length)
    if run.card.tokenizer == "bert":
        start, end, vocab = VILT_CLS, VILT_SEP, (1000, int(run.backbone.text_vocab_size))
    else:
        start, end, vocab = CLIP_SOT, CLIP_EOT, (1, CLIP_SOT)
    ids, masks = _text(batch_size, length, fill, vocab, start, end, gen)
    if run.pipeline.dynamic_text_padding:   # as the collator: cut to the longest real text of the batch
        length = max(2, int(masks.sum(dim=1).max()))
        ids, masks = ids[:, :length].contiguous(), masks[:, :length].contiguous()
    dummy_ids = torch.zeros(1, ids.shape[1], dtype=torch.long)
    dummy_ids[0, :2] = torch.tensor([start, end])
    return ids, masks, dummy_ids


def synthetic_batch(config: RunConfig | Mapping, batch_size: int, size_key: str, device: torch.device,
                    seed: int = 0, complete: bool = False) -> dict:
    """One batch in the collated batch format (on ``device``, dummies applied) for the config's backbone; every row
    complete with `complete` (a preparation need with ``missing='complete'``)."""
    run = RunConfig.coerce(config)
    gen = torch.Generator().manual_seed(seed)
    image, sizes = _images(run, batch_size, size_key, gen)
    ids, masks, dummy_ids = _texts(run, batch_size, size_key, gen)
    dummy_masks = (dummy_ids != 0).long()
    batch = {"image": image, "image_sizes": sizes, "text_ids": ids, "text_masks": masks,
             "label": _labels(run.data.dataset, batch_size, gen), "missing_type": _missing_types(batch_size, gen),
             "row_index": torch.arange(batch_size), "item_index": torch.arange(batch_size)}
    if complete:   # drawn anyway: the other tensors do not depend on `complete`
        batch["missing_type"] = torch.zeros_like(batch["missing_type"])
    batch = {k: v.to(device) for k, v in batch.items()}
    # as the collator does: the sizes as Python ints too, so ViLT sizes its patch tensor without a device sync
    batch["image_sizes_host"] = tuple((int(h), int(w)) for h, w in sizes.tolist())
    batch["text_len_host"] = max(2, int(masks.sum(dim=1).max()))   # the collator's bound on the real text length
    return apply_missing(batch, batch["missing_type"], dummy_ids, dummy_masks)
