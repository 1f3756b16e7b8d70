"""Golden fixtures of RAGPT from its reference code: ``tests/fixtures/ref_ragpt_{A,B}.pt`` (tests/fixtures/README.md,
"RAGPT").

Usage: ``python tools/parity/make_ragpt.py --refs REFS [--out tests/fixtures]``, where ``REFS`` holds a checkout of
``Jian-Lang/RAGPT`` (as ``REFS/RAGPT``) at the pinned commit (``tools/parity/common.py``). Without one, or at another
commit, the script prints the ``git`` commands that make it and exits with status 2.

The reference code is imported at run time, never copied: ``src/`` goes on ``sys.path`` and ``model`` (the RAGPT
model and its Hugging Face ``ViltModel`` copy) and ``utils.core_tools`` (the retriever's top-k, ``MCR``) are imported,
with the transformers-5 shim of make_msps.py (and a stub ``omegaconf``, imported by its trainer for a type
hint, when that package is absent). Per config:

* **Retrieval**: a tiny fixed memory of training items with retrieval vectors per channel (image, text) and a few
  test items; the reference's ``MCR._compute_similarity_in_batches`` (its object made without ``__init__``, which
  would download CLIP) gives every training and test query's neighbour ids (training queries without themselves).
* **Bank**: the memory items' ViLT embeddings [M, n, 768] per modality, regenerated from ``tests/vilt_hashinit.py``
  (``hashed_ragpt_bank``); the reference's dataset rule picks each batch row's k neighbours (text missing: the
  image-to-image list for both modalities; image missing: text-to-text; complete: text-to-text for the text,
  image-to-image for the image) and its label list (Hateful Memes: the first k; otherwise all).
* **Model**: ``ragpt`` on a tiny ``ViltConfig`` (768 wide, 40 text positions: hard-coded by the copy; image 96 / patch
  8 = the 145 image tokens the copy hard-codes), every tensor hashed (``hashed_ragpt_state``; the complex filters as
  real pairs), eval mode (no generator dropout), float32 on CPU. The copy orders the image patches with
  ``torch.multinomial``: made the identity order here (mdpl's default row-major order, RAGPT-D8).
  Recorded: logits, the reference's loss (BCE-with-logits on MM-IMDb, else cross-entropy) and the gradient of every
  trainable tensor (a complex filter's as real pairs).

A second run rewrites the files byte for byte.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

from common import (CLS, DATASET_CLASSES as CLASSES, PIXEL_LEVELS, SEP, classification_loss, detached, generator_main,
                    import_path, ordered_patches, quiet_warnings, sampled_grad, share_heads, silenced_stdout,
                    verify_checkout)
from make_msps import tiny_vilt

DATASETS = tuple(CLASSES)
FULL_GRAD_LIMIT = 1024
"""Gradients of at most this many values are stored in full; larger ones as `SAMPLED` values and the norm."""
SAMPLED = 192
PIXEL_BLOCK = 8
"""Pixels are stored at 1/8 resolution and repeated in 8x8 blocks (one value per patch: a small fixture)."""
IMAGE_TOKENS = 145
MEMORY, TEST_ITEMS, RETRIEVAL_DIM = 10, 4, 8

COMMON = dict(hidden_size=768, max_position_embeddings=40, vocab_size=128, image_size=96, patch_size=8,
              pad_token_id=0)
CONFIGS = {
    "A": dict(vilt=dict(num_hidden_layers=2, num_attention_heads=12, intermediate_size=256), max_text_len=48,
              prompt_pos=1, prompt_len=3, k=2, retrieved=4, split="train", items=[3, 0, 7, 5, 1, 9]),
    "B": dict(vilt=dict(num_hidden_layers=3, num_attention_heads=8, intermediate_size=384), max_text_len=40,
              prompt_pos=0, prompt_len=4, k=3, retrieved=5, split="test", items=[2, 0, 3, 1, 2, 0]),
}
EXPERIMENT = {"A": {"mmimdb": "both", "food101": "text", "hatememes": "image"},
              "B": {"mmimdb": "text", "food101": "both", "hatememes": "both"}}
ROWS = {
    # (mdpl missing type: 0 complete, 1 text missing, 2 image missing; real text tokens incl. [CLS]/[SEP])
    "both": [(0, 11), (1, 2), (2, 16), (0, 7), (2, 5), (1, 2)],
    "text": [(0, 11), (1, 2), (0, 16), (1, 2), (0, 5), (0, 9)],
    "image": [(2, 9), (0, 12), (2, 3), (0, 5), (0, 8), (2, 6)],
}
ENCODING = {"both": {1: 0, 2: 1, 0: 2}, "text": {1: 0, 0: 1}, "image": {2: 0, 0: 1}}
"""mdpl type -> the reference's ``missing_mask`` value per experiment (``ragpt_config.yaml``, lines 1-2)."""


def import_reference(path: Path) -> Any:
    """The reference's model class, ViLT copy and retriever class (the transformers-5 shim first)."""
    quiet_warnings()
    import transformers.pytorch_utils as pytorch_utils
    for name in ("find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(pytorch_utils, name):
            setattr(pytorch_utils, name, None)     # head pruning only; never called
    if importlib.util.find_spec("omegaconf") is None:   # the package's trainer imports it for a type hint only
        stub = types.ModuleType("omegaconf")
        stub.DictConfig = dict
        sys.modules["omegaconf"] = stub
    import_path(path / "src")
    from model import ragpt
    from model.vilt.configuration_vilt import ViltConfig
    from model.vilt.modeling_vilt import ViltModel
    from utils.core_tools import MCR
    return ragpt, ViltConfig, ViltModel, MCR


def memory_labels(task: str) -> torch.Tensor:
    """The memory items' labels: class ids, or multi-hot [M, 23] for MM-IMDb."""
    if task == "mmimdb":
        return torch.tensor([[float((3 * c + i) % 4 == 0) for c in range(CLASSES[task])] for i in range(MEMORY)])
    return torch.tensor([(37 * i + 11) % CLASSES[task] for i in range(MEMORY)])


def retrieval(ref: Any, name: str) -> dict:
    """Retrieval vectors (train memory, test queries) per channel and the reference's neighbour ids per split."""
    mcr_class = ref[3]
    spec = CONFIGS[name]
    g = torch.Generator().manual_seed(21 if name == "A" else 22)
    out: dict[str, Any] = {}
    for channel in ("image", "text"):
        train = torch.randn(MEMORY, RETRIEVAL_DIM, generator=g)
        test = torch.randn(TEST_ITEMS, RETRIEVAL_DIM, generator=g)
        mcr = object.__new__(mcr_class)
        mcr.batch_size, mcr.top_k, mcr.device = 3, spec["retrieved"] + 1, "cpu"
        ids = list(range(MEMORY))
        # train queries sit at their own memory positions (self excluded); test queries after them (nothing excluded)
        lists, _, _ = mcr._compute_similarity_in_batches(torch.cat([train, test]), train, ids, ids)
        out[channel] = {"train_vectors": train, "test_vectors": test,
                        "train": torch.tensor(lists[:MEMORY]), "test": torch.tensor(lists[MEMORY:])}
    return out


def neighbour_inputs(name: str, task: str, retrieved: dict, batch: dict, bank: dict) -> dict:
    """The reference's per-sample inputs from the lists (its datasets' rule): r_t, r_i, r_l."""
    spec = CONFIGS[name]
    k, split = spec["k"], spec["split"]
    labels = memory_labels(task)
    r_t, r_i, r_l = [], [], []
    for row, item in enumerate(spec["items"]):
        i2i, t2t = retrieved["image"][split][item], retrieved["text"][split][item]
        missing = int(batch["missing_type"][row])
        text_list = i2i if missing == 1 else t2t
        image_list = t2t if missing == 2 else i2i
        label_list = t2t if missing == 2 else i2i
        r_t.append(bank["text"][text_list[:k]])
        r_i.append(bank["image"][image_list[:k]])
        r_l.append(labels[label_list[:k] if task == "hatememes" else label_list])
    return {"r_t": torch.stack(r_t), "r_i": torch.stack(r_i), "r_l": torch.stack(r_l)}


def fake_batch(name: str, experiment: str, task: str) -> dict:
    """Rows of every missing type of the experiment as the reference's datasets give them: a text-missing row has the
    dummy text's all-ones mask (its tokens are replaced in the model), an image-missing row keeps its real image."""
    rows, spec = ROWS[experiment], CONFIGS[name]
    g = torch.Generator().manual_seed(11 if name == "A" else 12)
    b, length = len(rows), spec["max_text_len"]
    ids = torch.zeros(b, length, dtype=torch.long)
    masks = torch.zeros(b, length, dtype=torch.long)
    size = COMMON["image_size"]
    small = size // PIXEL_BLOCK
    levels = torch.randint(-PIXEL_LEVELS, PIXEL_LEVELS + 1, (b, 3, small, small), generator=g, dtype=torch.int8)
    for i, (missing, real) in enumerate(rows):
        n = length if missing == 1 else real
        ids[i, :n] = torch.randint(5, COMMON["vocab_size"], (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = CLS, SEP
        masks[i, :n] = 1
    classes = CLASSES[task]
    label = {"mmimdb": torch.tensor([[float((c + i) % 3 == 0) for c in range(classes)] for i in range(b)]),
             "food101": torch.tensor([(17 * i + 5) % classes for i in range(b)]),
             "hatememes": torch.tensor([i % 2 for i in range(b)])}[task]
    return {"text_ids": ids, "text_masks": masks, "pixels": levels, "label": label,
            "missing_type": torch.tensor([m for m, _ in rows]),
            "missing_mask": torch.tensor([ENCODING[experiment][m] for m, _ in rows])}


def pixels(levels: torch.Tensor) -> torch.Tensor:
    """The float image of stored int8 levels [B, 3, h, w]: each value repeated over a PIXEL_BLOCK² block, / 127."""
    return levels.repeat_interleave(PIXEL_BLOCK, -1).repeat_interleave(PIXEL_BLOCK, -2).float() / PIXEL_LEVELS






def real_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's floating state, complex tensors as real pairs [..., 2]."""
    return {k: torch.view_as_real(v) if v.is_complex() else v for k, v in model.state_dict().items()
            if v.is_floating_point() or v.is_complex()}


def load_real_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    model.load_state_dict({**own, **{k: torch.view_as_complex(v.contiguous()) if own[k].is_complex() else v
                                     for k, v in state.items()}}, strict=True)


def run_head(ref: Any, name: str, task: str, retrieved: dict) -> dict:
    """One reference model (config `name`, head `task`): weights, batch, neighbours, outputs, gradients."""
    from vilt_hashinit import checksum, hashed_ragpt_bank, hashed_ragpt_state
    ragpt, vilt_config, vilt_model, _ = ref
    spec, experiment = CONFIGS[name], EXPERIMENT[name][task]
    vilt = tiny_vilt(vilt_config, vilt_model, COMMON, spec)
    model = ragpt(vilt=vilt, dataset_name=task, max_text_len=spec["max_text_len"], max_image_len=IMAGE_TOKENS,
                  missing_type=experiment, device="cpu", prompt_pos=spec["prompt_pos"], prompt_len=spec["prompt_len"],
                  dropout_rate=0.2).eval()
    shapes = {k: tuple(v.shape) for k, v in real_state(model).items()}
    state = hashed_ragpt_state(shapes)
    load_real_state(model, state)
    batch = fake_batch(name, experiment, task)
    bank = {"text": hashed_ragpt_bank("text", (MEMORY, spec["max_text_len"], 768)),
            "image": hashed_ragpt_bank("image", (MEMORY, IMAGE_TOKENS, 768))}
    inputs = neighbour_inputs(name, task, retrieved, batch, bank)
    with ordered_patches(padding=False), silenced_stdout():
        out = model(input_ids=batch["text_ids"], pixel_values=pixels(batch["pixels"]),
                    pixel_mask=torch.ones(len(batch["label"]), COMMON["image_size"], COMMON["image_size"],
                                          dtype=torch.long),
                    token_type_ids=torch.zeros_like(batch["text_ids"]), attention_mask=batch["text_masks"],
                    r_t_list=inputs["r_t"], r_i_list=inputs["r_i"], r_l_list=inputs["r_l"],
                    missing_mask=batch["missing_mask"])
    loss = classification_loss(task, out["output"], batch["label"])
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grad = torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad
            grads[n] = {"full": grad.clone()} if grad.numel() <= FULL_GRAD_LIMIT else sampled_grad(n, grad, SAMPLED)
    keys = sorted(shapes)
    return detached({
        "config": {**COMMON, **spec["vilt"], "max_text_len": spec["max_text_len"], "prompt_pos": spec["prompt_pos"],
                   "prompt_len": spec["prompt_len"], "k": spec["k"], "missing_type": experiment,
                   "dataset_name": task, "split": spec["split"]},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(state[k]) for k in keys]),
        "batch": {**{k: v for k, v in batch.items() if k != "missing_mask"},
                  "item_index": torch.tensor(spec["items"])},
        "memory_labels": memory_labels(task),
        "label_lists": inputs["r_l"],
        "logits": out["output"], "loss": loss, "trainable": trainable, "grads": grads,
    })


def make_fixture(ref: Any, name: str) -> dict:
    import transformers
    meta = {"repository": "Jian-Lang/RAGPT", "class": "model.ragpt",
            "stack": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
            "memory": MEMORY, "retrieved": CONFIGS[name]["retrieved"]}
    retrieved = retrieval(ref, name)
    heads = share_heads({task: run_head(ref, name, task, retrieved) for task in DATASETS})
    return {"meta": meta, "retrieval": detached(retrieved), **heads}


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.split("\n\n")[0], "ragpt", CONFIGS,
                          lambda refs: import_reference(verify_checkout(refs, "ragpt")), make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
