"""Regenerate tests/fixtures/ref_dcp_tiny.pt from the DCP reference code.

    python tools/parity/make_dcp.py --refs REFS_DIR

REFS_DIR holds the checkout ``Deep_Correlated_Prompting`` at the pinned commit (tools/parity/common.py); the
command prints the ``git clone`` / ``git checkout`` lines when it is missing or elsewhere. The reference files are
imported, never edited. The reference hard-codes widths 768/512, so its weights (~60 M values) are not stored:
every tensor is ``tests/dcp_hashinit.py``'s pure function of (key, shape), and the fixture keeps checksums.
Layout: tests/fixtures/README.md ("DCP").
"""
from __future__ import annotations

import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from common import (cpu_get_device, detached, patch_my_metrics, prepare_reference, refs_argument, repo_root,
                    sacred_config, save_deterministic, silenced_stdout)

sys.path.insert(0, str(repo_root() / "tests"))
from dcp_hashinit import checksum, hashed_tensor  # noqa: E402

TASKS = ("mmimdb", "food101", "hatememes")
NUM_CLASSES = {"mmimdb": 23, "food101": 101, "hatememes": 2}
SIZES = dict(prompt_length=6, prompt_depth=2, layers=3, image_size=64, vision_width=768, text_width=512,
             embed_dim=512, vocab_size=49408)
LONG_TEXT = " ".join(["a long plot about a detective, a dog and a mysterious lighthouse on the coast"] * 8)
TEXTS = ["a photo of a cat", "", "an old movie about a detective and a dog", "", LONG_TEXT]
TYPES = [0, 1, 2, 1, 0]          # rows 1, 3: dummy text; row 2: dummy image (ones)
FULL_GRAD_MAX, SAMPLED = 4096, 512
DYNAMIC = ("prompts_dynamic_complete", "prompts_dynamic_image", "prompts_dynamic_text")


def openai_layout_state_file(folder: Path) -> Path:
    """A CLIP state dict in OpenAI's layout with the fixture's sizes (values are replaced later), so that the
    reference's own ``load_clip_to_cpu`` / ``build_model`` run unchanged."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=SIZES["embed_dim"], quick_gelu=True,
        vision_cfg=dict(image_size=SIZES["image_size"], patch_size=16, width=SIZES["vision_width"],
                        layers=SIZES["layers"], head_width=64),
        text_cfg=dict(context_length=77, vocab_size=SIZES["vocab_size"], width=SIZES["text_width"], heads=8,
                      layers=SIZES["layers"]))
    path = folder / "clip_openai_layout.pt"
    torch.save(model.state_dict(), path)
    return path


def load_reference(refs: Path, state_file: Path) -> dict[str, Any]:
    prepare_reference(refs, "dcp")
    import clip.gadgets.my_metrics as my_metrics
    import clip.modules.clip as dclip
    from clip.config import ex
    from clip.modules import CLIPransformerSS, clip_utils
    patch_my_metrics(my_metrics)
    dclip._download = lambda url, root=None: str(state_file)      # no network: the local random state dict
    return {"cls": CLIPransformerSS, "ex": ex, "set_task": clip_utils.set_task, "tokenize": dclip.tokenize}


def label_of(task: str) -> torch.Tensor:
    n = len(TYPES)
    if task == "mmimdb":
        return torch.tensor([[float((i + 2 * b) % 3 == 0) for i in range(23)] for b in range(n)])
    return torch.tensor([(29 * b + 5) % NUM_CLASSES[task] for b in range(n)])


def hashed_model(ref: dict[str, Any], task: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The reference model for ``task`` with every state-dict tensor and dynamic query set to its hashed value."""
    cfg = sacred_config(ref["ex"], task, dict(prompt_length=SIZES["prompt_length"], prompt_depth=SIZES["prompt_depth"],
                                              image_size=SIZES["image_size"], precision=32, load_path="",
                                              num_workers=0))
    torch.manual_seed(0)
    with silenced_stdout():
        model = ref["cls"](cfg)
    state = {k: hashed_tensor(k, v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    dynamic = {}
    for name, module in model.named_modules():
        for attr in DYNAMIC:
            if hasattr(module, attr):
                key = f"{name}.{attr}"
                dynamic[key] = hashed_tensor(key, getattr(module, attr).shape)
                setattr(module, attr, dynamic[key].clone())
    return model, dynamic


def grad_record(key: str, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Small gradients in full; large ones as 512 seeded positions, their values and the float64 norm."""
    if grad.numel() <= FULL_GRAD_MAX:
        return {"full": grad.detach().clone()}
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    idx = torch.randperm(grad.numel(), generator=g)[:SAMPLED].sort().values
    return {"idx": idx, "val": grad.reshape(-1)[idx].detach().clone(), "norm": grad.double().norm()}


def task_record(ref: dict[str, Any], task: str, image: torch.Tensor) -> dict[str, Any]:
    model, dynamic = hashed_model(ref, task)
    state = model.state_dict()
    keys = list(state)
    label = label_of(task)
    batch = {"text": (list(TEXTS),), "image": [image], "missing_type": list(TYPES), "label": label.tolist()}
    seen: dict[str, Any] = {}
    infer = model.infer
    model.infer = lambda b: seen.setdefault("ret", infer(b))
    model.train()                              # the reference's train-phase compute_<task>
    ref["set_task"](model)
    with cpu_get_device():
        out = model(batch)
    del model.infer
    loss = out[f"{task}_loss"]
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return detached({
        "keys": keys, "shapes": {k: list(v.shape) for k, v in state.items()},
        "checksums": torch.stack([checksum(state[k]) for k in keys]),
        "dynamic": dynamic, "label": label, "logits": out[f"{task}_logits"], "loss": loss,
        "cls_feats": seen["ret"]["cls_feats"], "trainable": trainable,
        "n_trainable": sum(params[n].numel() for n in trainable),
        "grads": {n: grad_record(n, params[n].grad) for n in trainable if params[n].grad is not None},
    })


def make_fixture(refs: Path) -> dict[str, Any]:
    import open_clip
    with tempfile.TemporaryDirectory() as folder:
        ref = load_reference(refs, openai_layout_state_file(Path(folder)))
        g = torch.Generator().manual_seed(7)
        image = torch.randn(len(TYPES), 3, SIZES["image_size"], SIZES["image_size"], generator=g)
        image[2] = 1.0
        text_ids = torch.stack([ref["tokenize"](t, context_length=77, truncate=True) for t in TEXTS]).squeeze(1)
        tasks = {task: task_record(ref, task, image) for task in TASKS}
    meta = {"reference": "hulianyuyy/Deep_Correlated_Prompting@3519534", "torch": str(torch.__version__),
            "open_clip": str(open_clip.__version__), **SIZES}
    return {"meta": meta, "types": torch.tensor(TYPES), "image": image, "tasks": tasks, "text_ids": text_ids}


def main(argv: list[str] | None = None) -> int:
    args = refs_argument(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)              # one summation order on every machine
    path = args.out / "ref_dcp_tiny.pt"
    print(f"{path.name}  sha256 {save_deterministic(make_fixture(args.refs), path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
