"""Optimizer: the references' four parameter groups and AdamW (docs/methods.md §7.3, defect D-48).

`optimizer_impl='legacy_hf'` selects `LegacyAdamW`, our implementation of the update rule of
HuggingFace's removed `transformers.AdamW` (bias correction folded into the step size, eps added to
sqrt(v) rather than sqrt(v_hat), decoupled weight decay applied *after* the Adam step to the updated
parameter). `optimizer_impl='torch'` selects `torch.optim.AdamW`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from mdpl.config.run_config import RunConfig
from mdpl.errors import UserInputError

BETAS = (0.9, 0.98)
EPS = 1e-8
NO_DECAY_PATTERNS = (
    "bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
    "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight",
)


def param_group_index(name: str, head_names: Iterable[str]) -> int:
    """0..3 = group 1..4 of docs/methods.md §7.3: +1 if no-decay pattern, +2 if head name (substring rules)."""
    no_decay = any(p in name for p in NO_DECAY_PATTERNS)
    head = any(h in name for h in head_names)
    return int(no_decay) + 2 * int(head)


def build_param_groups(model: nn.Module, config: RunConfig | Mapping) -> list[dict]:
    """The four groups over all named parameters that require grad (empty groups are dropped).

    Groups: decay/base lr, no-decay/base lr, decay/head lr, no-decay/head lr, where head lr =
    learning_rate * lr_mult and decay = weight_decay. Each group carries a "name" for LR logging.
    """
    run = RunConfig.coerce(config)
    lr, wd = float(run.optim.learning_rate), float(run.optim.weight_decay)
    head_lr = lr * float(run.optim.lr_mult)
    heads = (f"{run.data.dataset}_classifier",)
    specs = [("decay", wd, lr), ("no_decay", 0.0, lr), ("head_decay", wd, head_lr), ("head_no_decay", 0.0, head_lr)]
    buckets: list[list[Tensor]] = [[], [], [], []]
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets[param_group_index(name, heads)].append(param)
    groups = [{"params": ps, "weight_decay": d, "lr": r, "name": n} for (n, d, r), ps in zip(specs, buckets) if ps]
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimize")
    return groups


class LegacyAdamW(torch.optim.Optimizer):
    """Legacy HuggingFace AdamW update (docs/methods.md §7.3), per parameter with a gradient at step t:

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    p <- p - lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps);  then  p <- p - lr*wd*p.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = BETAS, eps: float = EPS,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LegacyAdamW hyper-parameters lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, step_sizes = [], [], [], [], []
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LegacyAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            step_size = group["lr"]
            if group["correct_bias"]:  # same operation order as the legacy implementation
                step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            step_sizes.append(-step_size)
        if not params:
            return
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
        if group["weight_decay"] > 0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def build_optimizer(model: nn.Module, config: RunConfig | Mapping) -> torch.optim.Optimizer:
    """AdamW (betas (0.9, 0.98), eps 1e-8) over `build_param_groups`; impl from config optimizer_impl."""
    run = RunConfig.coerce(config)
    groups = build_param_groups(model, run)
    lr = float(run.optim.learning_rate)
    impl = run.optim.optimizer_impl
    if impl == "legacy_hf":
        return LegacyAdamW(groups, lr=lr, betas=BETAS, eps=EPS)
    if impl == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)
    raise UserInputError(f"optimizer_impl={impl!r} is not supported; use 'legacy_hf' or 'torch'")
