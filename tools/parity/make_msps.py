"""Golden fixtures of MSPs from its reference re-implementation: ``tests/fixtures/ref_msps_{A,B}.pt``
(tests/fixtures/README.md, "MSPs").

Usage: ``python tools/parity/make_msps.py --refs REFS [--out tests/fixtures]``, where ``REFS`` holds a checkout of
``Jian-Lang/RAGPT`` (as ``REFS/RAGPT``) at the pinned commit (``tools/parity/common.py``). Without one, or at another
commit, the script prints the ``git`` commands that make it and exits with status 2.

The reference code is imported at run time, never copied: ``src/`` goes on ``sys.path`` and the baseline's own
packages ``baselines.msps.vilt`` (its Hugging Face ``ViltModel`` copy) and ``baselines.msps.model`` are imported.
One run-time shim: transformers 5 no longer has ``pytorch_utils.find_pruneable_heads_and_indices`` (imported at
module level, used only for head pruning, which never runs). The model is built offline from a tiny ``ViltConfig``
(768 wide: the copy hard-codes the width and 40 text positions), every tensor set from ``tests/vilt_hashinit.py``
(``hashed_msps_state``: the two prompt tensors far from orthogonal), and run in eval mode (the copy has no dropout) on
CPU in float32, with its prints silenced (MSPS-D6). The loss is the reference's ``compute_loss`` (task loss + 1.0 ·
``ortho_loss``), written out because ``utils.core_tools`` imports the whole RAGPT stack. A second run rewrites the
files byte for byte.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from common import (CLS, DATASET_CLASSES as CLASSES, PIXEL_LEVELS, SEP, classification_loss, detached, generator_main,
                    import_path, quiet_warnings, sampled_grad, share_heads, silenced_stdout, verify_checkout)

DATASETS = tuple(CLASSES)
FULL_GRAD_LIMIT = 4096
"""Gradients of at most this many values are stored in full; larger ones (prompts, pooler, head) as `SAMPLED` values."""
SAMPLED = 512
CHANNELS = 16
"""Prompt channels stored per row, block and token (hash-chosen), besides each token's float64 sum over all channels."""

COMMON = dict(hidden_size=768, max_position_embeddings=40, vocab_size=128, image_size=32, pad_token_id=0)
"""ViltConfig of every model (the copy's text embedding hard-codes width 768 and 40 position rows)."""
CONFIGS = {
    "A": dict(vilt=dict(num_hidden_layers=3, num_attention_heads=12, intermediate_size=384, patch_size=16),
              max_text_len=48, prompt_num=2, prompt_len=4),
    "B": dict(vilt=dict(num_hidden_layers=3, num_attention_heads=8, intermediate_size=768, patch_size=8),
              max_text_len=40, prompt_num=3, prompt_len=6),
}
EXPERIMENT = {"A": {"mmimdb": "both", "food101": "both", "hatememes": "both"},
              "B": {"mmimdb": "text", "food101": "image", "hatememes": "both"}}
"""The reference's ``missing_type`` (training setting) per head: it fixes the encoding of ``missing_mask``."""
ROWS = {
    # (mdpl missing type: 0 complete, 1 text missing, 2 image missing; real text tokens incl. [CLS]/[SEP])
    "both": [(0, 11), (1, 2), (2, 16), (0, 7), (2, 5), (1, 2)],
    "text": [(0, 11), (1, 2), (0, 16), (1, 2), (0, 5)],
    "image": [(2, 9), (0, 12), (2, 3), (0, 5), (0, 8)],
}
ENCODING = {"both": {1: 0, 2: 1, 0: 2}, "text": {1: 0, 0: 1}, "image": {2: 0, 0: 1}}
"""mdpl type -> the reference's ``missing_mask`` value per experiment (``msps_config.yaml``, lines 1-2)."""


def import_reference(path: Path) -> Any:
    """The reference's model class and ViLT copy (the transformers-5 shim first)."""
    quiet_warnings()
    import transformers.pytorch_utils as pytorch_utils
    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = None   # head pruning only; never called
    import_path(path / "src")
    from baselines.msps.model.msps import msps
    from baselines.msps.vilt.configuration_vilt import ViltConfig
    from baselines.msps.vilt.modeling_vilt import ViltModel
    return msps, ViltConfig, ViltModel


def fake_batch(name: str, experiment: str, cfg: dict, task: str) -> dict:
    """Rows of every missing type of the experiment; dummies as the reference's datasets and collator: ``''`` text
    ([CLS][SEP] + padding), image pixels set to 1.0."""
    rows = ROWS[experiment]
    g = torch.Generator().manual_seed(11 if name == "A" else 12)
    b, length = len(rows), cfg["max_text_len"]
    ids = torch.zeros(b, length, dtype=torch.long)
    masks = torch.zeros(b, length, dtype=torch.long)
    size = COMMON["image_size"]
    levels = torch.randint(-PIXEL_LEVELS, PIXEL_LEVELS + 1, (b, 3, size, size), generator=g, dtype=torch.int8)
    for i, (missing, real) in enumerate(rows):
        ids[i, :real] = torch.randint(5, COMMON["vocab_size"], (real,), generator=g)
        ids[i, 0], ids[i, real - 1] = CLS, SEP
        masks[i, :real] = 1
        if missing == 2:
            levels[i] = PIXEL_LEVELS
    classes = CLASSES[task]
    label = {"mmimdb": torch.tensor([[float((c + i) % 3 == 0) for c in range(classes)] for i in range(b)]),
             "food101": torch.tensor([(17 * i + 5) % classes for i in range(b)]),
             "hatememes": torch.tensor([i % 2 for i in range(b)])}[task]
    return {"text_ids": ids, "text_masks": masks, "pixels": levels, "image": levels.float() / PIXEL_LEVELS, "label": label,
            "missing_type": torch.tensor([m for m, _ in rows]),
            "missing_mask": [ENCODING[experiment][m] for m, _ in rows]}






def prompt_channels(width: int) -> torch.Tensor:
    """The `CHANNELS` hash-chosen channels of the stored prompt samples."""
    g = torch.Generator().manual_seed(5)
    return torch.randperm(width, generator=g)[:CHANNELS].sort().values


def prompt_record(prompts: torch.Tensor) -> dict:
    """What each prompted layer got per row ([B, N, L, D]): every token's float64 sum, and `CHANNELS` channels."""
    return {"prompt_sums": prompts.double().sum(-1), "prompt_channels": prompts[..., prompt_channels(prompts.shape[-1])]}


def record_layer_inputs(model: Any) -> tuple[list, list]:
    """Forward pre-hooks on the prompted layers: (the per-row prompts, the additive key mask) each receives."""
    prompts, masks = [], []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("missing_aware_prompt") is not None:
            prompts.append(kwargs["missing_aware_prompt"].detach().clone())
            masks.append(kwargs["attention_mask"].detach().clone())

    for layer in model.encoder_layer:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    return prompts, masks


def tiny_vilt(vilt_config: Any, vilt_model: Any, common: dict, spec: dict) -> Any:
    """RAGPT's copy of the Hugging Face ViLT at a fixture's sizes (``common`` + the config's ``vilt``), built after
    seeding 0 (its random init is overwritten by the hashed state; seeding keeps any leftover deterministic)."""
    torch.manual_seed(0)
    return vilt_model(vilt_config(**common, **spec["vilt"]))


def run_head(ref: Any, name: str, task: str) -> dict:
    """One reference model (config `name`, head `task`): weights, batch, prompts and masks, outputs, gradients."""
    from vilt_hashinit import checksum, hashed_msps_state
    msps, vilt_config, vilt_model = ref
    spec, experiment = CONFIGS[name], EXPERIMENT[name][task]
    vilt = tiny_vilt(vilt_config, vilt_model, COMMON, spec)
    model = msps(vilt=vilt, dataset_name=task, max_text_len=spec["max_text_len"], missing_type=experiment,
                 learnt_p=True, prompt_type="attention", prompt_num=spec["prompt_num"], prompt_len=spec["prompt_len"],
                 device="cpu").eval()
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items() if v.is_floating_point()}
    state = {**own, **hashed_msps_state(shapes)}
    model.load_state_dict(state, strict=True)
    batch = fake_batch(name, experiment, spec, task)
    prompts, masks = record_layer_inputs(model)
    torch.manual_seed(1234)                       # the copy orders image patches with torch.multinomial
    with silenced_stdout():
        out = model(input_ids=batch["text_ids"], pixel_values=batch["image"],
                    pixel_mask=torch.ones(batch["image"].shape[0], *batch["image"].shape[-2:], dtype=torch.long),
                    token_type_ids=torch.zeros_like(batch["text_ids"]), attention_mask=batch["text_masks"],
                    missing_mask=batch["missing_mask"])
    loss = classification_loss(task, out["output"], batch["label"]) + out["ortho_loss"]
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: {"full": p.grad.clone()} if p.grad.numel() <= FULL_GRAD_LIMIT else sampled_grad(n, p.grad, SAMPLED)
             for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    keys = sorted(shapes)
    return detached({
        "config": {**COMMON, **spec["vilt"], "max_text_len": spec["max_text_len"], "prompt_num": spec["prompt_num"],
                   "prompt_len": spec["prompt_len"], "missing_type": experiment, "dataset_name": task},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(state[k]) for k in keys]),
        "batch": {k: v for k, v in batch.items() if k not in ("missing_mask", "image")},
        **prompt_record(torch.stack(prompts, dim=1)),
        "key_mask": masks[0][:, 0, 0] == 0,                     # bool [B, L/2 + tokens]: keys the rows attend to
        "logits": out["output"], "ortho_loss": out["ortho_loss"], "loss": loss,
        "trainable": trainable, "grads": grads,
    })


def make_fixture(ref: Any, name: str) -> dict:
    import transformers
    meta = {"repository": "Jian-Lang/RAGPT", "class": "baselines.msps.model.msps",
            "stack": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}}
    return {"meta": meta, **share_heads({task: run_head(ref, name, task) for task in DATASETS})}


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.split("\n\n")[0], "msps", CONFIGS,
                          lambda refs: import_reference(verify_checkout(refs, "ragpt")), make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
