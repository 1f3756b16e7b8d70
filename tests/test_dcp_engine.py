"""DCP through the engine and run.py on synthetic data (raw -> make_arrow -> run.run -> checkpoint -> test_only), CPU.

* `task_finetune_<ds> dcp tiny` resolves to a consistent tiny model (prompt_length multiple of 3, transform size =
  image_size), and so does `task_finetune_<ds> tiny dcp` (the preset sets only prompt_method);
* learning: a randomly initialised, frozen tiny CLIP with DCP's trainable set (prompt learner, attn_prompt,
  ln_post, visual proj, ln_final, head; docs/methods.md §6.6) separates synthetic Hateful Memes (30 % missing) far above
  chance (AUROC 0.5);
* persistence (D-34): the Lightning checkpoint holds the six dynamic-query buffers; the module rebuilt by run.py's
  test_only path gives the trained module's logits exactly (all three missing types) and the same test metrics;
* a checkpoint with the dynamic buffers stripped: an mdpl checkpoint -> ValueError naming them; a reference-style
  state dict (no hyper_parameters, given as load_path) -> refused unless dcp_dynamic_queries names a file with
  exactly those queries, which are then loaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import run as run_script
from runs import datamodule_of, resolved_config, run_quiet
from mdpl.data.datamodule import MDPLDataModule
from mdpl.data.synthetic import write_synthetic
from mdpl.data.writers import make_arrow
from mdpl.engine.trainer import build_trainer

COUNTS = dict(n_train=192, n_val=48, n_test=48)
MISSING = {"train": 0.3, "val": 0.3, "test": 0.3}
TRAIN = dict(learning_rate=2e-2, max_epoch=8, per_gpu_batchsize=16, batch_size=16, val_check_interval=1.0,
             missing_ratio=MISSING)


def resolve(*named: str, **updates) -> dict:
    """Resolved Sacred config of the named configs (left to right) plus `updates`."""
    return resolved_config(named, updates)


pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_batch(cfg: dict) -> dict:
    """The whole val split as one batch, after the device-side dummies (docs/methods.md §1.4)."""
    dm = datamodule_of(cfg)
    dm.setup("validate")
    batch = next(iter(DataLoader(dm.datasets["val"], batch_size=64, collate_fn=dm.collator)))
    return dm.on_after_batch_transfer(batch, 0)


@torch.no_grad()
def logits_of(module: torch.nn.Module, batch: dict) -> torch.Tensor:
    was_training = module.training
    module.eval()
    logits = module(batch)["logits"].detach().clone()
    module.train(was_training)
    return logits


class LogitsAtFitEnd(pl.Callback):
    """Logits of the in-memory module on `batch` when fit ends (final weights = last.ckpt, before the test reload)."""

    def __init__(self, batch: dict) -> None:
        self.batch, self.logits = batch, None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logits = logits_of(pl_module, self.batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One DCP training run (run.run) on synthetic hatememes, 30 % missing (both types)."""
    base = tmp_path_factory.mktemp("dcp_engine")
    write_synthetic("hatememes", base / "raw", **COUNTS)
    make_arrow("hatememes", base / "raw", base / "arrow", progress=False)
    cfg = resolve("task_finetune_hatememes", "dcp", "tiny", data_root=str(base / "arrow"),
                  log_dir=str(base / "result"), **TRAIN)
    batch = fixed_batch(cfg)
    assert sorted(batch["missing_type"].unique().tolist()) == [0, 1, 2]
    probe = LogitsAtFitEnd(batch)

    def build_trainer_with_probe(*args, **kwargs) -> pl.Trainer:
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(probe)
        return trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mdpl.engine.session.build_trainer", build_trainer_with_probe)
        out = run_quiet(cfg)
    assert probe.logits is not None
    return {"cfg": cfg, "batch": batch, "out": out, "fit_logits": probe.logits, "base": base,
            "last": str(Path(out["run_dir"]) / "checkpoints" / "last.ckpt")}


def test_dcp_tiny_config_is_consistent_in_either_order(tmp_path) -> None:
    cfg = resolve("task_finetune_food101", "dcp", "tiny")
    assert (cfg["backbone"], cfg["prompt_method"], cfg["prompt_length"] % 3) == ("clip", "dcp", 0)
    assert cfg["image_size"] == 64 and "clip_image_size" not in cfg   # one image size: transform and tower
    assert resolve("task_finetune_food101", "tiny", "dcp") == cfg


def test_dcp_learns_above_chance(trained) -> None:
    """Frozen random tiny CLIP + DCP: test AUROC and accuracy well above chance (0.5) after 8 epochs."""
    metrics = trained["out"]["test"]
    assert metrics["test/the_metric"] == metrics["hatememes/test/AUROC"]
    assert metrics["hatememes/test/AUROC"] >= 0.8, metrics
    assert metrics["hatememes/test/accuracy"] >= 0.7, metrics


def test_checkpoint_holds_dynamic_buffers_and_test_only_reproduces(trained) -> None:
    cfg, batch = trained["cfg"], trained["batch"]
    ckpt = torch.load(trained["last"], map_location="cpu", weights_only=False)
    dynamic = sorted(k for k in ckpt["state_dict"] if ".prompts_dynamic_" in k)
    assert len(dynamic) == 6 and all(k.startswith("model.prompt.dynamic.") for k in dynamic)
    # run.py's test_only loading path rebuilds the module from the checkpoint alone (fresh random init first)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = run_script.build_test_module({**cfg, "test_only": True, "load_path": trained["last"]})
    assert torch.equal(logits_of(rebuilt, batch), trained["fit_logits"])
    # and the full test_only run on the best checkpoint reproduces the training run's test metrics exactly
    out = trained["out"]
    again = run_quiet({**cfg, "test_only": True, "load_path": out["best_model_path"]})
    assert again["test"] == out["test"]


def test_checkpoint_without_dynamic_buffers(trained, tmp_path) -> None:
    cfg = {**trained["cfg"], "test_only": True}
    ckpt = torch.load(trained["last"], map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    stripped = {k: v for k, v in state.items() if ".prompts_dynamic_" not in k}
    # an mdpl checkpoint lacking them is damaged: a clear error naming the keys, never random queries
    torch.save({**ckpt, "state_dict": stripped}, tmp_path / "stripped.ckpt")
    with pytest.raises(ValueError, match="prompts_dynamic_"):
        run_script.build_test_module({**cfg, "load_path": str(tmp_path / "stripped.ckpt")})
    # a reference-style DCP checkpoint (no mdpl config) lacks them by design: evaluating it needs the queries of
    # its run from a side file; without one it is refused (other queries would be another model)
    reference = {k[len("model."):]: v for k, v in stripped.items()}
    torch.save({"state_dict": reference}, tmp_path / "reference.ckpt")
    cfg_ref = {**cfg, "load_path": str(tmp_path / "reference.ckpt")}
    with pytest.raises(ValueError, match="lacks its dynamic prompt queries.*dcp_dynamic_queries="):
        run_script.build_test_module(cfg_ref)
    queries = {k[len("model."):]: v for k, v in state.items() if ".prompts_dynamic_" in k}
    torch.save(dict(list(queries.items())[:-1]), tmp_path / "too_few.pt")
    with pytest.raises(ValueError, match="must hold exactly the keys"):
        run_script.build_test_module({**cfg_ref, "dcp_dynamic_queries": str(tmp_path / "too_few.pt")})
    torch.save(queries, tmp_path / "queries.pt")
    module = run_script.build_test_module({**cfg_ref, "dcp_dynamic_queries": str(tmp_path / "queries.pt")})
    own = module.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.items())
    assert all(torch.equal(own[k], v) for k, v in queries.items()) and len(queries) == 6
