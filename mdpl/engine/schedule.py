"""Learning-rate schedule: warmup + polynomial (or cosine) decay, stepped per optimizer step (METHODS.md §7.4, D-47).

The multiplier of step s (LambdaLR, so the very first update uses multiplier(0) = 0 when W > 0):
* s < W: s / W
* W <= s <= T: ((lr - end_lr) * (1 - (s-W)/(T-W))^power + end_lr) / lr   (power 1, end_lr 0 -> linear to 0)
* s > T: end_lr / lr
This is HuggingFace's `get_polynomial_decay_schedule_with_warmup`, which the references use with
lr = the optimizer's default lr (= learning_rate). `decay_power='cosine'` gives HuggingFace's cosine
schedule with warmup (half a cosine from 1 to 0 over T-W steps).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


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


def polynomial_multiplier(step: int, warmup: int, total: int, power: float, lr: float, end_lr: float) -> float:
    """LR multiplier of optimizer step `step` (see module docstring)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if step > total:
        return end_lr / lr
    remaining = 1.0 - (step - warmup) / max(1, total - warmup)
    return ((lr - end_lr) * remaining**power + end_lr) / lr


def cosine_multiplier(step: int, warmup: int, total: int) -> float:
    """Warmup, then 0.5 * (1 + cos(pi * progress)) clipped at 0 (HuggingFace cosine, 0.5 cycles)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_multiplier_fn(config: dict, total: int) -> Callable[[int], float]:
    """The per-step multiplier for config keys warmup_steps, decay_power, learning_rate, end_lr."""
    warm = warmup_steps(config["warmup_steps"], total)
    power = config.get("decay_power", 1)
    if power == "cosine":
        return partial(cosine_multiplier, warmup=warm, total=total)
    lr = float(config["learning_rate"])
    if lr <= 0:
        raise ValueError(f"learning_rate must be > 0 for the polynomial schedule, got {lr}")
    return partial(polynomial_multiplier, warmup=warm, total=total, power=float(power), lr=lr,
                   end_lr=float(config.get("end_lr", 0.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict, total: int) -> LambdaLR:
    """LambdaLR with `lr_multiplier_fn` (same multiplier for every group; step it every optimizer step)."""
    return LambdaLR(optimizer, lr_multiplier_fn(config, total))
