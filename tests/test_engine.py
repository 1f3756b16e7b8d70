"""Engine end to end on CPU with a stub classifier and a stub DataModule (contract batch format).

fit reduces the loss, writes best + last checkpoints, ends with a test on the best checkpoint; test_only
reloads that checkpoint into a freshly initialised model and reproduces the metrics; mismatches are errors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import run as run_script
from mdpl.engine.module import MDPLModule
from mdpl.engine.trainer import accumulation, build_trainer, resolve_precision

N_CLS = 23


class StubClassifier(nn.Module):
    """Contract forward API; frozen 'backbone', trainable pooler + `mmimdb_classifier` head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.transformer = nn.Module()
        self.transformer.blocks = nn.ModuleList([nn.Module()])
        self.transformer.blocks[0].attn = nn.Linear(48 + 6, 32)
        self.transformer.blocks[0].norm1 = nn.LayerNorm(32)
        self.transformer.requires_grad_(False)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(32, 32)
        self.mmimdb_classifier = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, N_CLS))
        self.frozen_mode_calls = 0

    def forward(self, batch: dict) -> dict:
        x = torch.cat([batch["image"].flatten(1), batch["text_ids"].float() / 10], dim=1)
        h = self.transformer.blocks[0].norm1(self.transformer.blocks[0].attn(x))
        pooled = torch.tanh(self.pooler.dense(h))
        return {"logits": self.mmimdb_classifier(pooled), "pooled": pooled}

    def set_frozen_modes(self) -> None:
        self.frozen_mode_calls += 1

    def trainable_parameters_report(self) -> tuple[int, int]:
        ps = list(self.parameters())
        return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


class StubDataset(Dataset):
    """Items in the contract's format; multi-hot labels are a fixed function of the image."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 3, 4, 4, generator=g)
        proj = torch.randn(48, N_CLS, generator=torch.Generator().manual_seed(123))
        self.label = (self.image.flatten(1) @ proj > 3.0).float()
        self.text_ids = torch.randint(0, 100, (n, 6), generator=g)

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[i], "image_sizes": torch.tensor([4, 4]), "text_ids": self.text_ids[i],
                "text_masks": torch.ones(6, dtype=torch.long), "label": self.label[i],
                "missing_type": torch.tensor(i % 3), "row_index": torch.tensor(i), "item_index": torch.tensor(i)}


class StubDataModule(pl.LightningDataModule):
    def __init__(self, batch: int = 8) -> None:
        super().__init__()
        self.batch = batch
        self.train_set, self.val_set = StubDataset(64, 1), StubDataset(32, 2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch)

    def test_dataloader(self) -> DataLoader:  # same split as val: test must reproduce the best val metric
        return DataLoader(self.val_set, batch_size=self.batch)


def make_config(tmp_path: Path, **kw) -> dict:
    cfg = dict(exp_name="stub", seed=0, log_dir=str(tmp_path / "result"), dataset="mmimdb", backbone="vilt",
               prompt_method="none", hidden_size=32, num_layers=1, num_heads=1, patch_size=32, load_path="",
               per_gpu_batchsize=8, batch_size=16, num_gpus=0, num_nodes=1, precision=16, max_epoch=4,
               max_steps=None, warmup_steps=0.1, learning_rate=1e-2, weight_decay=2e-2, lr_mult=1,
               decay_power=1, end_lr=0.0, optimizer_impl="legacy_hf",
               val_check_interval=0.5, test_only=False, fast_dev_run=False)
    cfg.update(kw)
    return cfg


QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def _mean_loss(model: nn.Module, data: StubDataset) -> float:
    with torch.no_grad():
        batch = {"image": data.image, "text_ids": data.text_ids}
        return nn.functional.binary_cross_entropy_with_logits(model(batch)["logits"], data.label).item()


def test_fit_checkpoint_and_test_only_roundtrip(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    dm, model = StubDataModule(), StubClassifier(seed=0)
    before = _mean_loss(model, dm.train_set)
    frozen_before = model.transformer.blocks[0].attn.weight.clone()
    out = run_script.run(cfg, datamodule=dm, model=model, **QUIET)

    assert _mean_loss(model, dm.train_set) < 0.95 * before          # training reduced the loss (16 steps)
    assert torch.equal(model.transformer.blocks[0].attn.weight, frozen_before)   # frozen stays frozen
    assert model.frozen_mode_calls == cfg["max_epoch"]                 # on_train_epoch_start hook
    run_dir = Path(out["run_dir"])
    assert run_dir == tmp_path / "result" / "stub_seed0_from_scratch" / "version_0"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert (run_dir / "csv" / "metrics.csv").is_file() and any((run_dir / "tensorboard").iterdir())
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert saved["metrics"] == out["test"] and set(out["test"]) >= {"test/the_metric", "mmimdb/test/F1_Macro",
                                                                    "mmimdb/test/F1_Samples", "mmimdb/test/loss"}
    ckpt = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)
    best_score = float(ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "ModelCheckpoint" in k)]["best_model_score"])
    assert out["test"]["test/the_metric"] == pytest.approx(best_score, abs=1e-6)
    assert ckpt["hyper_parameters"]["config"]["dataset"] == "mmimdb"
    # 8 batches/epoch, accumulate 2 -> T = floor(8*4/2) = 16, W = 1
    assert ckpt["global_step"] <= 16

    # test_only: fresh (differently initialised) model, strict load, same metrics; new run directory
    cfg_test = make_config(tmp_path, test_only=True, load_path=out["best_model_path"])
    out2 = run_script.run(cfg_test, datamodule=StubDataModule(), model=StubClassifier(seed=99), **QUIET)
    for key, value in out["test"].items():
        assert out2["test"][key] == pytest.approx(value, abs=1e-6), key
    assert Path(out2["run_dir"]).parent.name == f"stub_seed0_from_{Path(out['best_model_path']).stem}"

    # a checkpoint of another method -> clear error naming the mismatch
    bad = make_config(tmp_path, test_only=True, load_path=out["best_model_path"], prompt_method="map")
    with pytest.raises(ValueError, match="prompt_method: checkpoint='none' vs config='map'"):
        run_script.run(bad, datamodule=StubDataModule(), model=StubClassifier(), **QUIET)


def test_schedule_total_steps_and_lr_logged(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_epoch=1, val_check_interval=1.0)
    module = MDPLModule(cfg, model=StubClassifier())
    trainer = build_trainer(cfg, tmp_path / "run", **QUIET)
    trainer.fit(module, datamodule=StubDataModule())
    assert module.total_steps == 4 and trainer.global_step == 4      # floor(8 * 1 / 2)
    assert trainer.callback_metrics["val/the_metric"].item() == pytest.approx(
        trainer.callback_metrics["mmimdb/val/F1_Macro"].item())
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 4 and trainer.optimizers[0].param_groups[0]["lr"] == 0.0   # W = 0 -> linear to 0 at T


def test_nonfinite_loss_raises_with_step() -> None:
    class NaNModel(StubClassifier):
        def forward(self, batch):
            out = super().forward(batch)
            return {**out, "logits": out["logits"] * float("nan")}

    module = MDPLModule(make_config(Path("/tmp")), model=NaNModel())
    batch = next(iter(StubDataModule().train_dataloader()))
    with pytest.raises(FloatingPointError, match="global step 0"):
        module.training_step(batch, 0)


def test_trainer_settings(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not available on the CPU"):
        assert resolve_precision(16, "cpu") == "32-true"
    assert resolve_precision("bf16", "gpu") == "bf16-mixed" and resolve_precision(32, "cpu") == "32-true"
    assert accumulation({"per_gpu_batchsize": 32, "batch_size": 256}, 2, 1) == 4
    assert accumulation({"per_gpu_batchsize": 512, "batch_size": 256}, 1, 1) == 1
    with pytest.raises(ValueError, match="per_gpu_batchsize must be > 0"):
        accumulation({"per_gpu_batchsize": 0, "batch_size": 256}, 1, 1)
    trainer = build_trainer(make_config(tmp_path, max_steps=7), tmp_path / "r", **QUIET)
    assert trainer.max_steps == 7 and trainer.accumulate_grad_batches == 2 and trainer.log_every_n_steps == 10
    assert build_trainer(make_config(tmp_path), tmp_path / "r2", **QUIET).max_steps == -1


def test_hparams_are_a_plain_copy(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, prompt_layers=(0, 1))
    module = MDPLModule(cfg, model=StubClassifier())
    cfg["learning_rate"] = 123.0
    assert module.hparams["config"]["learning_rate"] == 1e-2 and module.hparams["config"]["prompt_layers"] == [0, 1]
    assert math.isclose(module.config.optim.weight_decay, 2e-2)
