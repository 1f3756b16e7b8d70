"""Batch collation (the batch format every model reads).

Images are zero-padded bottom/right to the batch maximum and stacked; ``image_sizes`` keeps each
valid (h, w), and ``image_sizes_host`` the same sizes as a tuple of Python ``(h, w)`` ints (it stays on the
host through the device transfer, so ViLT sizes its patch sequence without a host-device sync). Texts are
tokenised here, batched (inside the DataLoader workers); with ``dynamic_text_padding`` (ViLT) the batch is
cut to its longest text instead of ``max_text_len`` (see config.py ``dynamic_text_padding``). Missing-modality
dummies are NOT applied here: the batch carries the table's ``missing_type`` and the DataModule applies
simulation + dummies on device (mdpl/data/missing.py, ``apply_missing``).
"""
from __future__ import annotations

from typing import Sequence

import torch


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad [3, h, w] tensors bottom/right to the max (h, w) -> ([B, 3, Hmax, Wmax], sizes int64 [B, 2])."""
    sizes = torch.tensor([[img.shape[-2], img.shape[-1]] for img in images], dtype=torch.long)
    h_max, w_max = (int(v) for v in sizes.max(dim=0).values)
    if all(img.shape[-2:] == (h_max, w_max) for img in images):
        return torch.stack(list(images)), sizes
    out = images[0].new_empty((len(images), images[0].shape[0], h_max, w_max))   # one write per pixel, no F.pad
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        out[i, :, :h, :w] = img
        out[i, :, h:, :] = 0
        out[i, :, :h, w:] = 0
    return out, sizes


class Collator:
    """Picklable collate function: items of :class:`mdpl.data.dataset.ArrowMultimodalDataset` -> batch dict."""

    def __init__(self, tokenizer, dynamic_text_padding: bool = False) -> None:
        self.tokenizer = tokenizer
        self.dynamic_text_padding = bool(dynamic_text_padding)

    def __call__(self, items: Sequence[dict]) -> dict:
        image, image_sizes = pad_images([it["image"] for it in items])
        texts = [it["text"] for it in items]
        text_ids, text_masks = self.tokenizer.encode(texts)
        if self.dynamic_text_padding:  # right padding: the longest real text bounds every sample's tokens
            length = max(2, int(text_masks.sum(dim=1).max()))
            text_ids, text_masks = text_ids[:, :length].contiguous(), text_masks[:, :length].contiguous()
        labels = [it["label"] for it in items]
        label = (torch.stack(labels).float() if isinstance(labels[0], torch.Tensor)
                 else torch.tensor(labels, dtype=torch.long))
        return {
            "image": image,
            "image_sizes": image_sizes,
            "image_sizes_host": tuple((int(h), int(w)) for h, w in image_sizes.tolist()),
            "text": texts,
            "text_ids": text_ids,
            "text_masks": text_masks,
            "text_len_host": max(2, int(text_masks.sum(dim=1).max())),   # longest real text (a device-sync-free bound)
            "label": label,
            "missing_type": torch.tensor([it["missing_type"] for it in items], dtype=torch.long),
            "row_index": torch.tensor([it["row_index"] for it in items], dtype=torch.long),
            "item_index": torch.tensor([it["item_index"] for it in items], dtype=torch.long),
        }
