"""Golden fixtures of SCP from its reference code: ``tests/fixtures/ref_scp_{A,B}.pt`` (tests/fixtures/README.md, "SCP").

Usage: ``python tools/parity/make_scp.py --refs REFS [--out tests/fixtures]``, where ``REFS`` is a folder holding a checkout of
``vittoriopipoli/SCP_WACV2025`` (as ``REFS/SCP_WACV2025``) at the pinned commit, or that checkout itself. Without one,
or at another commit, the script prints the ``git`` commands that make it and exits with status 2.

The reference code is imported at run time, never copied: its package ``vilt/`` goes on ``sys.path``, and run-time
shims let the 2021-2024 code run on today's stack without editing it (transformers' removed ``AdamW`` and
``DataCollatorForWholeWordMask``, ``pytorch_lightning.metrics``, the torchmetrics-0.9 functional F1 / AUROC its
metric classes call, timm's pretrained loader made a no-op, a ViT factory of the reference's own builder at the tiny
sizes, and ``torch.cuda.current_device`` answering ``"cpu"``). The model is built from the reference's Sacred config
(``task_finetune_<dataset>`` + the tiny overrides below), its every tensor set from ``tests/vilt_hashinit.py`` (the
frozen query copies from their blocks, as the reference takes them after a checkpoint load), and run in eval mode on
CPU in float32. A second run rewrites the files byte for byte.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import subprocess
import sys
import types
import warnings
from pathlib import Path

import torch

from mdpl.config.run_config import to_plain   # the installed package (pip install -e .)

REPO = "https://github.com/vittoriopipoli/SCP_WACV2025"
COMMIT = "2e91072b3bbc82a335b6bb6449526e0fbf077093"
NAME = "SCP_WACV2025"
ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("mmimdb", "food101", "hatememes")
FULL_GRAD_LIMIT = 16384
"""Gradients of at most this many values are stored in full; larger ones (pooler, head) as `SAMPLED` values."""
SAMPLED = 512

COMMON = dict(hidden_size=768, mlp_ratio=1, vocab_size=100, max_image_len=-1, drop_rate=0.1, load_path="",
              vit="vit_probe_tiny", precision=32, num_workers=0, prompt_type="input", learnt_p=True,
              multi_layer_prompt=True, test_only=False, finetune_first=False)
"""Every config: the width the reference's 768-column query slices need, eval mode (no dropout)."""
CONFIGS = {
    "A": dict(num_layers=4, num_heads=12, image_size=64, patch_size=32, max_text_len=16, prompt_length=4,
              pool_size=8, fixed_prompts=2, prompt_layers=[2, 3], fixed_prompt_layers=[0, 1]),
    "B": dict(num_layers=6, num_heads=8, image_size=64, patch_size=16, max_text_len=12, prompt_length=6,
              pool_size=5, fixed_prompts=0, prompt_layers=[4, 5], fixed_prompt_layers=[0, 1]),
}
BATCH = {
    # (batch H, W, [(missing type, real text tokens incl. [CLS]/[SEP])])
    "A": (64, 64, [(0, 11), (1, 2), (2, 16), (0, 7)]),
    "B": (64, 80, [(2, 9), (0, 12), (1, 2), (0, 5)]),
}
CLS, SEP = 3, 4
SAVED_CONFIG_KEYS = (
    "hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "image_size", "max_text_len", "vocab_size",
    "max_image_len", "drop_rate", "learning_rate", "weight_decay", "lr_mult", "optim_type", "prompt_type",
    "prompt_length", "pool_size", "fixed_prompts", "prompt_layers", "fixed_prompt_layers", "learnt_p",
    "multi_layer_prompt", "loss_names", "mmimdb_class_num", "food101_class_num", "hatememes_class_num",
    "model_name")


# ------------------------------------------------------------------------------------------------ checkout
def checkout_of(refs: Path) -> Path:
    """The reference checkout under `refs` at the pinned commit; prints how to make it and exits 2 otherwise."""
    folder = refs if (refs / "vilt").is_dir() else refs / NAME
    head = ""
    if (folder / "vilt").is_dir():
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
        head = done.stdout.strip()
    if head != COMMIT:
        what = f"is at {head}" if head else "is missing"
        print(f"the SCP reference checkout {folder} {what}; make it with:\n"
              f"  git clone {REPO} {refs / NAME}\n  git -C {refs / NAME} checkout {COMMIT}", file=sys.stderr)
        sys.exit(2)
    return folder


# ------------------------------------------------------------------------------------------------ shims
def install_shims() -> None:
    """Run-time replacements that let the reference import on today's stack (module docstring); nothing is edited."""
    import pytorch_lightning as pl
    import torchmetrics
    import transformers
    import transformers.optimization as optimization

    if not hasattr(optimization, "AdamW"):
        optimization.AdamW = torch.optim.AdamW
    if not hasattr(transformers, "DataCollatorForWholeWordMask"):
        transformers.DataCollatorForWholeWordMask = functools.partial(transformers.DataCollatorForLanguageModeling,
                                                                      whole_word_mask=True)
    metrics = types.ModuleType("pytorch_lightning.metrics")
    metrics.Metric = torchmetrics.Metric
    sys.modules.setdefault("pytorch_lightning.metrics", metrics)
    if not hasattr(pl, "metrics"):
        pl.metrics = metrics
    torch.cuda.current_device = lambda: "cpu"


def patch_vit(vit_module: types.ModuleType) -> None:
    """No pretrained download (random init, then the hashed weights), and the reference's ViT builder at tiny
    sizes (its own factories hard-code ViT-B/32-384)."""
    vit_module.load_pretrained = lambda *args, **kwargs: None

    def vit_probe_tiny(pretrained: bool = False, **kwargs):
        c = kwargs["config"]
        return vit_module._create_vision_transformer(
            "vit_base_patch32_384", pretrained=pretrained, img_size=c["image_size"], patch_size=c["patch_size"],
            embed_dim=c["hidden_size"], depth=c["num_layers"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
            **kwargs)

    vit_module.vit_probe_tiny = vit_probe_tiny


def tm09_f1_score(preds: torch.Tensor, target: torch.Tensor, average: str = "micro", threshold: float = 0.5,
                  **_: object) -> torch.Tensor:
    """torchmetrics 0.9's multilabel F1 on probabilities (what the reference's ``F1_Score`` calls)."""
    preds = (preds >= threshold).long() if preds.is_floating_point() else preds
    target = target.long()
    tp, fp, fn = preds * target, preds * (1 - target), (1 - preds) * target
    dims = {"micro": None, "samples": 1}.get(average, 0)
    if dims is None:
        return _f1(tp.sum(), fp.sum(), fn.sum())
    tp, fp, fn = tp.sum(dims), fp.sum(dims), fn.sum(dims)
    score = _f1(tp, fp, fn)
    if average == "samples":
        return score.mean()
    weight = (tp + fp + fn != 0).float() if average == "macro" else (tp + fn).float()
    return (score * weight).sum() / weight.sum()


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    den = (2 * tp + fp + fn).float()
    return torch.where(den > 0, 2 * tp.float() / den.clamp_min(1e-12), torch.zeros_like(den))


def tm09_auroc(preds: torch.Tensor, target: torch.Tensor, **_: object) -> torch.Tensor:
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc
    if preds.ndim == 2 and preds.shape[-1] > 1:
        return multiclass_auroc(preds, target.long(), num_classes=preds.shape[-1], average="macro")
    return binary_auroc(preds.reshape(-1), target.reshape(-1).long())


def import_reference(folder: Path) -> types.SimpleNamespace:
    """The reference's modules, shimmed."""
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(folder))
    install_shims()
    import vilt.modules.vision_transformer_prompts as vit
    patch_vit(vit)
    import vilt.gadgets.my_metrics as my_metrics
    from vilt.config import ex
    from vilt.modules import vilt_utils
    from vilt.modules.vilt_missing_aware_prompt_module_QKV_ps import ViLTransformerSS_QKV_ps
    my_metrics.f1_score, my_metrics.auroc = tm09_f1_score, tm09_auroc

    @ex.main
    def _resolved(_config):
        return copy.deepcopy(_config)

    return types.SimpleNamespace(ex=ex, vilt_utils=vilt_utils, model_class=ViLTransformerSS_QKV_ps)


# ------------------------------------------------------------------------------------------------ fixture
def fake_batch(name: str, cfg: dict, task: str) -> dict:
    """The batch of config `name`: every missing type, varied text padding, dummies as the reference's datasets."""
    height, width, rows = BATCH[name]
    g = torch.Generator().manual_seed(7 if name == "A" else 8)
    length, b = cfg["max_text_len"], len(rows)
    ids = torch.zeros(b, length, dtype=torch.long)
    masks = torch.zeros(b, length, dtype=torch.long)
    image = torch.empty(b, 3, height, width).uniform_(-1, 1, generator=g)
    for i, (missing, real) in enumerate(rows):
        ids[i, :real] = torch.randint(5, cfg["vocab_size"], (real,), generator=g)
        ids[i, 0], ids[i, real - 1] = CLS, SEP
        masks[i, :real] = 1
        if missing == 2:
            image[i] = 1.0
    classes = cfg[f"{task}_class_num"]
    label = {"mmimdb": [[int((c + i) % 3 == 0) for c in range(classes)] for i in range(b)],
             "food101": [(17 * i + 5) % classes for i in range(b)],
             "hatememes": [i % 2 for i in range(b)]}[task]
    return {"text_ids": ids, "text_labels": torch.full_like(ids, -100), "text_masks": masks, "image": [image],
            "missing_type": [float(m) for m, _ in rows], "label": label}


def stored_batch(batch: dict, task: str) -> dict:
    """The batch in mdpl's format (tensors; image sizes all valid)."""
    image = batch["image"][0]
    label = torch.tensor(batch["label"], dtype=torch.float32 if task == "mmimdb" else torch.long)
    return {"text_ids": batch["text_ids"], "text_masks": batch["text_masks"], "image": image,
            "image_sizes": torch.tensor([list(image.shape[-2:])] * image.shape[0]),
            "missing_type": torch.tensor(batch["missing_type"]).long(), "label": label}


def sampled_grad(name: str, grad: torch.Tensor) -> dict:
    """A gradient too large to store: `SAMPLED` hash-chosen flat indices with their values, and the float64 norm."""
    flat = grad.reshape(-1)
    g = torch.Generator().manual_seed(sum(name.encode()))
    idx = torch.randperm(flat.numel(), generator=g)[:SAMPLED].sort().values
    return {"idx": idx, "val": flat[idx].clone(), "norm": flat.double().norm()}


def run_head(ref: types.SimpleNamespace, name: str, task: str) -> dict:
    """One reference model (config `name`, head `task`): weights, batch, outputs, gradients."""
    from vilt_hashinit import checksum, hashed_scp_state
    cfg = ref.ex.run(named_configs=[f"task_finetune_{task}"], config_updates={**COMMON, **CONFIGS[name]},
                     options={"--loglevel": "ERROR"}).result
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = ref.model_class(cfg).eval()
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items() if v.is_floating_point()}
    state = {**own, **hashed_scp_state(shapes, list(cfg["prompt_layers"]))}
    model.load_state_dict(state, strict=True)
    batch = fake_batch(name, cfg, task)
    ref.vilt_utils.set_task(model)
    torch.manual_seed(1234)                       # the reference orders image patches with torch.multinomial
    with contextlib.redirect_stdout(io.StringIO()):
        out = model(batch)
    torch.manual_seed(1234)
    with torch.no_grad():
        infer = model.infer(batch)
    loss = out[f"{task}_loss"]
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grads[n] = {"full": p.grad.clone()} if p.grad.numel() <= FULL_GRAD_LIMIT else sampled_grad(n, p.grad)
    keys = sorted(shapes)
    return {
        "config": {k: to_plain(cfg[k]) for k in SAVED_CONFIG_KEYS},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(state[k]) for k in keys]),
        "batch": stored_batch(batch, task),
        "logits": out[f"{task}_logits"].detach().clone(),
        "pooled": infer["cls_feats"][:, 0].detach().clone() if infer["cls_feats"].ndim == 3
        else infer["cls_feats"].detach().clone(),
        "pool_attention": infer["A_list"].clone(),
        "loss": loss.detach().clone(),
        "trainable": trainable,
        "grads": grads,
    }


def make_fixture(ref: types.SimpleNamespace, name: str) -> dict:
    import pytorch_lightning as pl
    import timm
    import transformers
    meta = {"repository": REPO, "commit": COMMIT, "class": "ViLTransformerSS_QKV_ps",
            "stack": {"torch": str(torch.__version__), "pytorch_lightning": str(pl.__version__),
                      "timm": str(timm.__version__), "transformers": str(transformers.__version__)}}
    return {"meta": meta, **{task: run_head(ref, name, task) for task in DATASETS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", required=True, type=Path, help="folder holding the SCP_WACV2025 checkout (or the checkout itself)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    args = parser.parse_args(argv)
    folder = checkout_of(args.refs.resolve())
    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(1)                      # one summation order, run after run
    ref = import_reference(folder)
    for name in CONFIGS:
        path = args.out / f"ref_scp_{name}.pt"
        torch.save(make_fixture(ref, name), path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
