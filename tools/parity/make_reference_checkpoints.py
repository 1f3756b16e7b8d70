"""Regenerate tests/fixtures/ref_ckpt_{map,memprompt,dcp}.pt: checkpoints in the reference code's own layout.

    python tools/parity/make_reference_checkpoints.py --refs REFS_DIR --method {map,memprompt,dcp}

Each file holds a checkpoint that the reference module itself produced, at the tiny sizes of mdpl's ``tiny``
config on a synthetic split (``data``), plus that module's logits on the test split, so that
tests/test_reference_checkpoints.py can evaluate it with ``run.py ... test_only=True``:

* MAP / MemPrompt: the reference LightningModule is trained for two steps by a Lightning ``Trainer`` on the
  synthetic train split and saved with ``Trainer.save_checkpoint``; the file's bytes are stored as they are.
* DCP: the reference hard-codes CLIP widths 768/512 and a 49,408-token vocabulary (~60 M values), too large to
  store. Its checkpoint is described instead: the reference module's state-dict keys and shapes, its values being
  ``tests/dcp_hashinit.py``'s pure function of (key, shape), its hyper-parameters, and the dynamic prompt queries
  that the reference never saves (the ``dcp_dynamic_queries`` side file, reference key names).

The test split's batches come from mdpl's data module (the same rows, missing types and dummies as ``run.py``)
and are fed to the reference in its collate format.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from common import (REFERENCES, add_tiny_vit_factory, cpu_get_device, detached, fixtures_dir, lightning2_module,
                    offline_load_pretrained, patch_my_metrics, prepare_reference, repo_root, sacred_config,
                    save_deterministic, silenced_stdout)

sys.path.insert(0, str(repo_root()))
sys.path.insert(0, str(repo_root() / "tests"))

from mdpl.config.run_config import to_plain  # noqa: E402

FORWARD_SEED = 1234
MISSING = {"missing_ratio.train": 0.5, "missing_ratio.val": 0.5, "missing_ratio.test": 0.5,
           "missing_type.train": "both", "missing_type.val": "both", "missing_type.test": "both"}
BATCH = {"per_gpu_batchsize": 4, "batch_size": 4}
# mdpl config keys that the reference configs share (same name and meaning), taken over from mdpl's config.
SHARED = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "max_text_len", "vocab_size",
          "image_size", "drop_rate", "max_image_len", "learning_rate", "weight_decay")
METHOD_KEYS = {"map": ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt"),
               "memprompt": ("gen_prompt_length", "gen_prompt_layers", "shared_prompt_length",
                             "shared_prompt_layers", "mem_size", "top_k")}
# Per method: dataset, split sizes and mdpl config overrides (on top of `task_finetune_<dataset> <method> tiny`).
PLANS: dict[str, dict[str, Any]] = {
    "map": {"data": {"dataset": "food101", "n_train": 8, "n_val": 4, "n_test": 12, "seed": 0},
            "updates": {**BATCH, **MISSING}},
    "memprompt": {"data": {"dataset": "food101", "n_train": 8, "n_val": 4, "n_test": 12, "seed": 0},
                  "updates": {**BATCH, **MISSING, "bottleneck_dim": 4}},     # the reference: hidden_size // 16
    "dcp": {"data": {"dataset": "hatememes", "n_train": 8, "n_val": 4, "n_test": 12, "seed": 0},
            "updates": {**BATCH, **MISSING, "clip_embed_dim": 512, "clip_vision_width": 768, "clip_vision_layers": 3,
                        "clip_vision_head_width": 64, "clip_text_width": 512, "clip_text_heads": 8,
                        "clip_text_layers": 3, "clip_vocab_size": 49408, "image_size": 64, "prompt_length": 6,
                        "prompt_depth": 2}},
}


def synthetic_data(root: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The synthetic split of ``data`` under ``root`` (mdpl's writer; deterministic for its seed)."""
    from runs import synthetic_arrows
    assert data["seed"] == 0, "synthetic_arrows writes seed 0"
    with contextlib.redirect_stdout(io.StringIO()):
        return synthetic_arrows(root, data["dataset"], data["n_train"], data["n_val"], data["n_test"])


def mdpl_config(method: str, data_paths: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """mdpl's resolved config of the evaluation (the test passes the same named configs and overrides)."""
    from runs import resolved_config
    plan = PLANS[method]
    updates: dict[str, Any] = {"data_root": str(data_paths["arrow"]), "tokenizer": str(data_paths["tok"]),
                               "vocab_size": data_paths["vocab_size"], "log_dir": str(log_dir)}
    for key, value in plan["updates"].items():
        outer, _, inner = key.partition(".")
        if inner:
            updates.setdefault(outer, {})[inner] = value
        else:
            updates[key] = value
    with contextlib.redirect_stdout(io.StringIO()):
        return resolved_config([f"task_finetune_{plan['data']['dataset']}", method, "tiny"], updates)


def mdpl_batches(cfg: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The split's batches as mdpl's model receives them (missing types resolved, dummies applied)."""
    from mdpl.config import RunConfig
    from mdpl.engine.session import build_datamodule
    dm = build_datamodule(RunConfig.coerce(cfg))
    dm.setup("fit" if split == "train" else "test")
    loader = {"train": dm.train_dataloader, "test": dm.test_dataloader}[split]()
    torch.manual_seed(0)
    return [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in loader]


def vilt_reference_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """An mdpl batch in the MAP / MemPrompt collate format."""
    return {"text_ids": batch["text_ids"], "text_labels": torch.full_like(batch["text_ids"], -100),
            "text_masks": batch["text_masks"], "image": [batch["image"]],
            "missing_type": [float(t) for t in batch["missing_type"].tolist()], "label": batch["label"].tolist()}


def reference_config(method: str, ex: Any, cfg: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    updates = {k: cfg[k] for k in SHARED + METHOD_KEYS[method]}
    return sacred_config(ex, cfg["dataset"], {**updates, **extra})


def load_vilt_reference(method: str, refs: Path) -> tuple[type, Any, Any]:
    """(module class, Sacred experiment, set_task) of MAP or MemPrompt, shims installed."""
    prepare_reference(refs, method)
    package = REFERENCES[method].package
    my_metrics = __import__(f"{package}.gadgets.my_metrics", fromlist=["x"])
    vit = __import__(f"{package}.modules.vision_transformer_prompts", fromlist=["x"])
    modules = __import__(f"{package}.modules", fromlist=["x"])
    ex = __import__(f"{package}.config", fromlist=["x"]).ex
    patch_my_metrics(my_metrics)
    offline_load_pretrained(vit)
    add_tiny_vit_factory(vit)
    cls = modules.ViLTransformerSS if method == "map" else modules.MemPromptTransformer
    return cls, ex, modules.vilt_utils.set_task


@torch.no_grad()
def reference_logits(model: torch.nn.Module, set_task: Any, batches: Iterable[dict], head: str) -> torch.Tensor:
    model.eval()
    out = []
    for batch in batches:
        set_task(model)
        torch.manual_seed(FORWARD_SEED)
        out.append(model(batch)[f"{head}_logits"])
    return torch.cat(out)


def vilt_checkpoint(method: str, refs: Path, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Two training steps of the reference module by a Lightning Trainer, saved by it; its test-split logits."""
    import pytorch_lightning as pl
    cls, ex, set_task = load_vilt_reference(method, refs)
    ref_cfg = reference_config(method, ex, cfg, {"load_path": "", "vit": "vit_tiny_from_config", "precision": 32,
                                                 "num_workers": 0, "max_steps": 2})
    train = [vilt_reference_batch(b) for b in mdpl_batches(cfg, "train")]
    test = [vilt_reference_batch(b) for b in mdpl_batches(cfg, "test")]
    torch.manual_seed(0)
    with silenced_stdout():
        model = lightning2_module(cls)(ref_cfg)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=str(folder))
        trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=None, shuffle=False))
        trainer.save_checkpoint(folder / "reference.ckpt")
    data = (folder / "reference.ckpt").read_bytes()
    with silenced_stdout():                  # a module detached from the trainer, with the saved weights
        fresh = cls(ref_cfg)
    fresh.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)["state_dict"])
    return {"checkpoint_bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "test_logits": reference_logits(fresh, set_task, test, cfg["dataset"])}


def dcp_checkpoint(refs: Path, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The reference DCP module with hashed weights: its state-dict layout, hyper-parameters, dynamic queries and
    test-split logits (texts given as mdpl's token ids through a ``tokenize`` look-up)."""
    import make_dcp
    ref = make_dcp.load_reference(refs, make_dcp.openai_layout_state_file(folder))
    model, dynamic = make_dcp.hashed_model(ref, cfg["dataset"])
    import clip.modules.clip as dclip
    test = mdpl_batches(cfg, "test")
    rows = torch.cat([b["text_ids"] for b in test]).to(torch.int32)
    original = dclip.tokenize
    dclip.tokenize = lambda text, context_length=77, truncate=False: rows[int(text)][None]
    batches, start = [], 0
    for b in test:
        n = b["text_ids"].shape[0]
        batches.append({"text": ([str(i) for i in range(start, start + n)],), "image": [b["image"]],
                        "missing_type": b["missing_type"].tolist(), "label": b["label"].tolist()})
        start += n
    try:
        with cpu_get_device():
            logits = reference_logits(model, ref["set_task"], batches, cfg["dataset"])
    finally:
        dclip.tokenize = original
    state = model.state_dict()
    return {"state_shapes": {k: list(v.shape) for k, v in state.items()},
            "hyper_parameters": {"config": to_plain(dict(model.hparams["config"]))},
            "dynamic_queries": dynamic, "test_logits": logits}


def make_fixture(method: str, refs: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = synthetic_data(folder / "data", PLANS[method]["data"])
        cfg = mdpl_config(method, paths, folder / "result")
        made = dcp_checkpoint(refs, cfg, folder) if method == "dcp" else vilt_checkpoint(method, refs, cfg, folder)
    return detached({"method": method, "reference": f"{REFERENCES[method].repo}@{REFERENCES[method].commit}",
                     "data": dict(PLANS[method]["data"]), "updates": dict(PLANS[method]["updates"]), **made})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", required=True, type=Path, help="folder holding the reference checkouts")
    parser.add_argument("--method", required=True, choices=sorted(PLANS))
    parser.add_argument("--out", type=Path, default=fixtures_dir())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)              # one summation order on every machine
    path = args.out / f"ref_ckpt_{args.method}.pt"
    print(f"{path.name}  sha256 {save_deterministic(make_fixture(args.method, args.refs), path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
