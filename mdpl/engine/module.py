"""`MDPLModule`: the LightningModule that trains and evaluates one classifier (docs/methods.md §7-§8, §10.5).

Logged keys (D-50: test runs log under `test/`, not `val/` as the references did):
* every training step: `{dataset}/train/loss`;
* every train epoch end: `{dataset}/train/{metric}`, `train/the_metric`;
* every validation/test epoch end: `{dataset}/{val|test}/{metric}`, `{dataset}/{val|test}/loss`,
  `{val|test}/the_metric` (= the primary metric of the task; checkpoints monitor `val/the_metric`).
Metric names: mmimdb F1_Micro, F1_Macro, F1_Samples, F1_Weighted; food101 accuracy; hatememes AUROC, accuracy.

A method's auxiliary loss terms (``PromptMethod.aux_losses``, weighted by its config) are added to the training loss
only: `{dataset}/train/loss` is the task loss plus the weighted terms, each unweighted term is logged every step as
`train/aux/<name>`; validation and test losses and metrics are the task's alone. A method's weight adapters are
merged into the frozen weights for testing (``PromptedClassifier.merge_adapters``) and restored afterwards;
validation runs them unmerged.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from mdpl.config import RunConfig, checkpoint_mismatches, size_differences, to_plain  # noqa: F401 (to_plain: re-exported)
from mdpl.engine.losses import task_loss
from mdpl.engine.metrics import build_task_metrics
from mdpl.engine.sweep import MissingSweep
from mdpl.engine.optim import build_optimizer
from mdpl.engine.schedule import build_scheduler, total_steps, warmup_steps
from mdpl.errors import UserInputError

PHASES = ("train", "val", "test")


def parameter_report(model: nn.Module) -> str:
    """'parameters: total T, trainable N (P %)' from `trainable_parameters_report()` or by counting."""
    if hasattr(model, "trainable_parameters_report"):
        total, trainable = model.trainable_parameters_report()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pct = 100.0 * trainable / max(1, total)
    adapters = model.adapter_parameter_count() if hasattr(model, "adapter_parameter_count") else 0
    of_which = f", of which weight adapters {adapters:,}" if adapters else ""
    return f"parameters: total {total:,}, trainable {trainable:,} ({pct:.3f} %){of_which}"


def checkpoint_build_config(run: RunConfig) -> RunConfig:
    """The run config that builds the classifier whose every weight a checkpoint gives afterwards: test_only, with
    no pre-training or checkpoint file to open (``load_path`` and the backbone's weights file emptied)."""
    return run.replace(**{"test_only": True, "load_path": "", run.card.weights.key: ""})


class MDPLModule(pl.LightningModule):
    """Classifier + loss (§7.5) + metrics (§8) + optimizer (§7.3) + schedule (§7.4).

    `model` injects a prebuilt classifier (tests, test_only); by default `mdpl.models.build_classifier(config)`.
    The config is stored (as a plain copy) in `hparams.config` and therefore in every checkpoint.
    `weights_from_checkpoint=True` (set by `load_from_checkpoint`) builds the classifier without reading the
    pre-training files the config names (`load_path`, `clip_path`): a checkpoint then gives every weight.
    """

    SYNC_FREE_DEVICES: tuple[str, ...] = ("cpu",)  # reading a tensor here costs no device sync: check every step

    def __init__(self, config: RunConfig | Mapping, model: nn.Module | None = None,
                 weights_from_checkpoint: bool = False, sweep: MissingSweep | None = None) -> None:
        """`config`: the run config, or its flat form (a checkpoint's ``hyper_parameters.config``, converted here).
        `sweep` (``mdpl.engine.sweep.prepare_sweep``): test every missing scenario in one pass instead of the
        configured one."""
        super().__init__()
        self.sweep = sweep
        self.config = RunConfig.coerce(config)
        self.save_hyperparameters({"config": self.config.to_flat()})   # the storage format: every flat key
        self.dataset = self.config.data.dataset
        if model is None:
            from mdpl.models import build_classifier  # lazy: tests inject stub models
            model = build_classifier(checkpoint_build_config(self.config) if weights_from_checkpoint else self.config)
        if self.config.trainer.compile:  # opt-in; in place, so state-dict keys (checkpoints) are unchanged
            model.compile()
        self.model = model
        # ModuleDict keys may not shadow nn.Module attributes ('train'), hence the '_phase' suffix.
        trainer = self.config.trainer
        self.metrics = nn.ModuleDict({f"{p}_phase": build_task_metrics(self.dataset, trainer.metric_inputs,
                                                                       trainer.primary_metric) for p in PHASES})
        self.loss_means = nn.ModuleDict({f"{p}_phase": MeanMetric() for p in PHASES})
        self.total_steps: int | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, **kwargs):
        """Lightning's `load_from_checkpoint`: the module of the checkpoint's stored config, every weight from the
        file. The pre-training files of that config (`load_path`, `clip_path`) are not read: they may be gone."""
        kwargs.setdefault("weights_from_checkpoint", True)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

    # ------------------------------------------------------------------ forward / steps
    def forward(self, batch: dict) -> dict:
        return self.model(batch)

    def _forward_loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        logits = self.model(batch)["logits"]
        return logits, task_loss(self.dataset, logits, batch["label"])

    def _update_metrics(self, phase: str, logits: Tensor, label: Tensor, loss: Tensor) -> None:
        self.metrics[f"{phase}_phase"].update(logits.detach(), label)
        self.loss_means[f"{phase}_phase"].update(loss.detach(), weight=label.shape[0])

    def _shared_step(self, batch: dict, phase: str) -> Tensor:
        logits, loss = self._forward_loss(batch)
        self._update_metrics(phase, logits, batch["label"], loss)
        return loss

    # ------------------------------------------------------------------ non-finite loss guard (no per-step sync)
    def _track_nonfinite(self, loss: Tensor) -> None:
        """Remember the first non-finite training loss and its global step in device tensors (no host sync)."""
        loss = loss.detach().float()
        if getattr(self, "_nf_step", None) is None or self._nf_step.device != loss.device:
            self._nf_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._nf_loss = torch.zeros((), device=loss.device)
            self._nf_checked_step = int(self.global_step)
        first = (self._nf_step < 0) & ~torch.isfinite(loss)
        self._nf_step = torch.where(first, torch.full_like(self._nf_step, int(self.global_step)), self._nf_step)
        self._nf_loss = torch.where(first, loss, self._nf_loss)
        self._nf_pending = getattr(self, "_nf_pending", 0) + 1

    def _check_nonfinite(self, force: bool = False) -> None:
        """Raise on a recorded non-finite loss: every step on the CPU or without a trainer (a sync is free there),
        else every `log_every_n_steps` training steps and at validation / epoch ends (`force`): one sync per check."""
        if getattr(self, "_nf_step", None) is None:
            return
        trainer = self._trainer
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) if trainer is not None else 1
        if not (force or self._nf_step.device.type in self.SYNC_FREE_DEVICES or self._nf_pending >= every):
            return
        self._nf_pending = 0
        step, since = int(self._nf_step), self._nf_checked_step
        self._nf_checked_step = int(self.global_step)
        if step >= 0:
            raise FloatingPointError(
                f"non-finite training loss {float(self._nf_loss)} at global step {step} (checked over global steps "
                f"{since}-{self.global_step}, epoch {self.current_epoch}); lower learning_rate, "
                f"or use precision=32 / bf16 to rule out fp16 overflow")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Task loss plus the method's weighted auxiliary terms (module docstring)."""
        out = self.model(batch)
        logits = out["logits"]
        loss = task_loss(self.dataset, logits, batch["label"])
        if "aux_loss" in out:
            loss = loss + out["aux_loss"].to(loss.dtype)
            for name, term in out["aux_losses"].items():
                self.log(f"train/aux/{name}", term.detach(), on_step=True, on_epoch=False,
                         batch_size=batch["label"].shape[0])
        self._track_nonfinite(loss)
        self._check_nonfinite()
        self._update_metrics("train", logits, batch["label"], loss)
        self.log(f"{self.dataset}/train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["label"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.sweep is not None:  # every missing scenario per batch (mdpl/engine/sweep.py)
            return self.sweep.step(self.model, batch)
        self._shared_step(batch, "test")

    # ------------------------------------------------------------------ epoch ends
    def _log_epoch(self, phase: str) -> dict[str, float]:
        """Compute (DDP-reduced), log and reset the epoch metrics of `phase`."""
        metrics = self.metrics[f"{phase}_phase"]
        if not metrics.has_updates:
            return {}
        values = metrics.compute()
        values["loss"] = self.loss_means[f"{phase}_phase"].compute()
        # the values are already reduced over the DDP ranks (equal on all): a max over ranks keeps them exactly
        # and tells Lightning they are synchronised (no sync_dist warning)
        for name, value in values.items():
            self.log(f"{self.dataset}/{phase}/{name}", value, prog_bar=False, sync_dist=True, reduce_fx="max")
        self.log(f"{phase}/the_metric", values[metrics.primary], prog_bar=phase != "train", sync_dist=True,
                 reduce_fx="max")
        metrics.reset()
        self.loss_means[f"{phase}_phase"].reset()
        return {k: float(v) for k, v in values.items()}

    def on_train_epoch_start(self) -> None:
        if hasattr(self.model, "set_frozen_modes"):
            self.model.set_frozen_modes()

    def on_train_epoch_end(self) -> None:
        self._check_nonfinite(force=True)
        self._log_epoch("train")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # before a checkpoint of this validation can be written
            self._check_nonfinite(force=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_start(self) -> None:
        if hasattr(self.model, "merge_adapters"):
            self.model.merge_adapters(keep_originals=True)

    def on_test_end(self) -> None:
        if hasattr(self.model, "unmerge_adapters"):
            self.model.unmerge_adapters()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of a model whose adapters were merged loads into a classifier without adapters."""
        if hasattr(self.model, "accept_state"):
            self.model.accept_state(checkpoint.get("state_dict", {}), prefix="model.")

    def on_test_epoch_end(self) -> None:
        if self.sweep is not None:
            return self.sweep.log_to(self)
        self._log_epoch("test")

    def on_fit_start(self) -> None:
        rank_zero_info(f"[mdpl] {parameter_report(self.model)}")

    # ------------------------------------------------------------------ optimisation
    def _schedule_total_steps(self) -> int:
        """Reference formula T = floor(len(train_loader) * max_epochs / accumulate) unless max_steps > 0 (D-47).

        len(train_loader) = `trainer.num_training_batches` (per-device batches per epoch, after
        limit_train_batches). Lightning runs ceil(batches / accumulate) * epochs optimizer steps (it steps
        on an incomplete accumulation at each epoch end), so a few final steps run at end_lr, as in the references.
        """
        trainer = self.trainer
        _ = trainer.estimated_stepping_batches  # makes Lightning set up the train dataloader
        batches = trainer.num_training_batches
        max_steps = trainer.max_steps  # -1 = not set (config max_steps None)
        if batches == float("inf"):
            if max_steps is None or max_steps <= 0:
                raise ValueError("the train dataloader has no length; set max_steps for the LR schedule")
            return int(max_steps)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else self.config.optim.max_epoch
        return total_steps(int(batches), int(epochs), int(trainer.accumulate_grad_batches), max_steps)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.config)
        self.total_steps = self._schedule_total_steps()
        scheduler = build_scheduler(optimizer, self.config, self.total_steps)
        rank_zero_info(f"[mdpl] LR schedule: {self.total_steps} optimizer steps, warmup "
                       f"{warmup_steps(self.config.optim.warmup_steps, self.total_steps)}, decay_power "
                       f"{self.config.optim.decay_power}, optimizer {type(optimizer).__name__}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Parity mode (optimizer_impl='legacy_hf'): zero-filled grads, so untouched params still decay (D-48)."""
        optimizer.zero_grad(set_to_none=self.config.optim.optimizer_impl != "legacy_hf")


def read_test_checkpoint(path: str | Path) -> object:
    """The object stored in the file `path` (a .ckpt / .pt; .safetensors as a state dict) for ``test_only``.

    Raises UserInputError (one line) for a folder or a file that PyTorch cannot read.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"load_path {str(path)!r} is a folder; test_only=True needs the .ckpt file written by a "
                             f"training run (e.g. <run_dir>/checkpoints/best-*.ckpt)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return dict(load_file(str(path)))
        return torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint the user provides
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise UserInputError(f"cannot read load_path {str(path)!r} as a PyTorch checkpoint: "
                             f"{type(err).__name__}: {err}") from None


def load_for_test(module: MDPLModule, checkpoint: object) -> str:
    """Load every weight of `module` from `checkpoint` (test_only); returns 'mdpl' or 'reference'.

    An mdpl checkpoint is loaded strictly after checking that its config agrees with the module's on the
    model-defining keys (``RunConfig.model_keys``). Any other file must be a trained checkpoint of the selected method
    that `mdpl.models.checkpoints.load_trained_weights` reads completely (the original MAP / MemPrompt code's,
    through the key converter). Raises UserInputError (one line) naming the mismatched or offending keys.
    """
    if not is_mdpl_checkpoint(checkpoint):
        from mdpl.models.checkpoints import load_trained_weights
        load_trained_weights(module.model, checkpoint, module.config)
        return "reference"
    mismatches = checkpoint_mismatches(checkpoint["hyper_parameters"]["config"], module.config)
    if mismatches:
        raise UserInputError("checkpoint does not match the config: " + "; ".join(mismatches))
    from mdpl.models.checkpoints import upgrade_state
    state = upgrade_state(checkpoint["state_dict"], module.config.experiment.prompt_method, prefix="model.")
    if hasattr(module.model, "accept_state"):
        module.model.accept_state(state, prefix="model.")   # a merged checkpoint: no adapters to load
    own, given = set(module.state_dict()), set(state)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:  # e.g. DCP dynamic queries (prompts_dynamic_*) stripped from the file (D-34)
        raise UserInputError(f"checkpoint state_dict lacks {len(missing)} keys {missing[:6]} and has "
                             f"{len(unexpected)} unexpected keys {unexpected[:6]}; it was not written by this "
                             f"model's mdpl version")
    check_shapes(state, module.state_dict(), checkpoint["hyper_parameters"]["config"], module.config)
    module.load_state_dict(state, strict=True)
    return "mdpl"


def check_shapes(state: Mapping[str, Tensor], own: Mapping[str, Tensor], ckpt_config: Mapping,
                 run: RunConfig) -> None:
    """UserInputError (one line) when a tensor of the checkpoint has another shape than the module's, naming the
    size keys whose checkpoint value differs from this run's (e.g. trained with another ``max_text_len``)."""
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if isinstance(v, Tensor) and k in own and tuple(v.shape) != tuple(own[k].shape)]
    if not shapes:
        return
    keys = size_differences(ckpt_config, run)
    cause = (f"it was trained with {', '.join(keys)}: pass the training run's values" if keys
             else "it was trained with other size keys: pass the training run's values")
    raise UserInputError(f"{len(shapes)} checkpoint tensors have other shapes than this config's model "
                         f"(e.g. {'; '.join(shapes[:2])}); {cause}")


def is_mdpl_checkpoint(checkpoint: object) -> bool:
    """True if `checkpoint` was written by MDPLModule: a state_dict and hyper_parameters.config holding mdpl's
    ``prompt_method`` key (the references store their own config there, without it)."""
    hp = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    config = hp.get("config") if isinstance(hp, Mapping) else None
    return isinstance(config, Mapping) and "prompt_method" in config and "state_dict" in checkpoint
