"""Learning-rate schedule: warmup + polynomial (or cosine) decay, stepped per optimizer step (docs/methods.md §7.4, D-47).

The multiplier of step s (LambdaLR, so the very first update uses multiplier(0) = 0 when W > 0):
* s < W: s / W
* W <= s <= T: ((lr - end_lr) * (1 - (s-W)/(T-W))^power + end_lr) / lr   (power 1, end_lr 0 -> linear to 0)
* s > T: end_lr / lr
This is HuggingFace's `get_polynomial_decay_schedule_with_warmup`, which the references use with lr = the
optimizer's default lr (= learning_rate); it is used here as is. `decay_power='cosine'` gives HuggingFace's
`get_cosine_schedule_with_warmup` (half a cosine from 1 to 0 over T-W steps).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError


def total_steps(batches_per_epoch: int, max_epoch: int, accumulate: int, max_steps: int | None = None) -> int:
    """T = max_steps if set (not None and > 0), else floor(batches_per_epoch * max_epoch / accumulate).

    `batches_per_epoch` is the number of per-device batches of one epoch (len(train_dataloader)).
    Lightning >= 2 encodes "no max_steps" as -1 (handled like None).
    """
    if max_steps is not None and int(max_steps) > 0:
        return int(max_steps)
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    return (int(batches_per_epoch) * int(max_epoch)) // int(accumulate)


def warmup_steps(warmup: float | int, total: int) -> int:
    """W = floor(warmup * T) for a float fraction < 1, else int(warmup) steps."""
    if isinstance(warmup, float) and warmup < 1:
        return int(math.floor(warmup * total))
    return int(warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig | Mapping, total: int) -> LambdaLR:
    """HuggingFace's warmup + polynomial (or cosine) LambdaLR for config keys warmup_steps, decay_power, end_lr.

    The same multiplier for every group (lr_init = the optimizer's default lr); step it every optimizer step.
    """
    optim = RunConfig.coerce(config).optim
    warm = warmup_steps(optim.warmup_steps, total)
    power = optim.decay_power
    if power == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warm, total)
    lr, end_lr = float(optimizer.defaults["lr"]), float(optim.end_lr)
    if lr <= 0:
        raise UserInputError(f"learning_rate must be > 0 for the polynomial schedule, got {lr}")
    if end_lr >= lr:
        raise UserInputError(f"end_lr ({end_lr}) must be smaller than learning_rate ({lr}) for the polynomial schedule")
    # T == W (e.g. a run of 0 optimizer steps): HuggingFace divides by T - W = 0 at step T; T = W + 1 gives the
    # same multipliers there (1 at step W, end_lr / lr after it) for any power > 0.
    return get_polynomial_decay_schedule_with_warmup(optimizer, warm, total + 1 if total == warm else total,
                                                     lr_end=end_lr, power=float(power))


def lr_multiplier_fn(config: RunConfig | Mapping, total: int) -> Callable[[int], float]:
    """The per-step multiplier of `build_scheduler` for the run's learning rate."""
    run = RunConfig.coerce(config)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(run.optim.learning_rate))
    return build_scheduler(probe, run, total).lr_lambdas[0]
