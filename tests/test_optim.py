"""Parameter groups, legacy AdamW update and LR schedule (docs/methods.md §7.3-7.4)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdpl.engine.optim import LegacyAdamW, build_optimizer, build_param_groups
from mdpl.engine.schedule import build_scheduler, lr_multiplier_fn, total_steps, warmup_steps


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.attn = nn.Linear(4, 4)


class _Stub(nn.Module):
    """Names: transformer.blocks.0.norm1.weight, pooler.dense.bias, mmimdb_classifier.1.weight, prompt, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.blocks = nn.ModuleList([_Block()])
        self.transformer.patch_embed = nn.Linear(4, 4)
        self.transformer.patch_embed.requires_grad_(False)      # frozen -> in no group
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(4, 4)
        self.mmimdb_classifier = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
        self.prompt = nn.Parameter(torch.zeros(2, 4))


CFG = {"dataset": "mmimdb", "learning_rate": 1e-2, "weight_decay": 2e-2, "lr_mult": 10, "optimizer_impl": "legacy_hf",
       "warmup_steps": 0.1, "decay_power": 1, "end_lr": 0.0}


def test_param_groups_follow_substring_rules() -> None:
    model = _Stub()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in build_param_groups(model, CFG)}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got["decay"] == ["pooler.dense.weight", "prompt", "transformer.blocks.0.attn.weight"]
    assert got["no_decay"] == ["pooler.dense.bias", "transformer.blocks.0.attn.bias",
                               "transformer.blocks.0.norm1.bias", "transformer.blocks.0.norm1.weight"]
    # the head's LayerNorm weight (`mmimdb_classifier.1.weight`) is decayed: no pattern matches it
    assert got["head_decay"] == ["mmimdb_classifier.0.weight", "mmimdb_classifier.1.weight", "mmimdb_classifier.3.weight"]
    assert got["head_no_decay"] == ["mmimdb_classifier.0.bias", "mmimdb_classifier.1.bias", "mmimdb_classifier.3.bias"]
    assert [(g["weight_decay"], g["lr"]) for g in groups.values()] == [
        (2e-2, 1e-2), (0.0, 1e-2), (2e-2, pytest.approx(1e-1)), (0.0, pytest.approx(1e-1))]
    assert all("patch_embed" not in n for ns in got.values() for n in ns)


def test_optimizer_impl_selection() -> None:
    assert isinstance(build_optimizer(_Stub(), CFG), LegacyAdamW)
    opt = build_optimizer(_Stub(), {**CFG, "optimizer_impl": "torch"})
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    with pytest.raises(ValueError, match="optimizer_impl"):
        build_optimizer(_Stub(), {**CFG, "optimizer_impl": "sgd"})


def _hand_step(p, m, v, g, t, lr, wd, b1=0.9, b2=0.98, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (math.sqrt(1 - b2**t) / (1 - b1**t)) * m / (v.sqrt() + eps)
    return p - lr * wd * p, m, v


def test_legacy_adamw_matches_hand_computed_steps() -> None:
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = [torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64), torch.tensor([-0.2, 0.0, 1.0], dtype=torch.float64)]
    param = nn.Parameter(p0.clone())
    opt = LegacyAdamW([{"params": [param], "weight_decay": 0.1}], lr=0.01)
    p, m, v = p0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        p, m, v = _hand_step(p, m, v, g, t, lr=0.01, wd=0.1)
        torch.testing.assert_close(param.detach(), p, rtol=0, atol=1e-15)
    # differs from torch.optim.AdamW (decay before the step, eps on sqrt(v_hat))
    param2 = nn.Parameter(p0.clone())
    opt2 = torch.optim.AdamW([param2], lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    for g in grads:
        param2.grad = g.clone()
        opt2.step()
    assert not torch.allclose(param2.detach(), p, rtol=0, atol=1e-12)


def test_legacy_adamw_skips_params_without_grad_and_zero_grad_still_decays() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = LegacyAdamW([{"params": [a, b], "weight_decay": 0.5}], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    b.grad = torch.zeros(2)                    # zero-filled grad (reference parity): moments stay 0, decay applies
    a.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.full((2,), 1 - 0.1 * 0.5))
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1


def test_total_and_warmup_steps() -> None:
    assert total_steps(1001, 20, 4, None) == 5005          # floor(1001*20/4)
    assert total_steps(1001, 20, 4, -1) == 5005
    assert total_steps(1001, 20, 3, None) == 6673          # floor(20020/3)
    assert total_steps(1001, 20, 4, 2500) == 2500
    assert warmup_steps(0.1, 5005) == 500 and warmup_steps(2500, 5005) == 2500 and warmup_steps(0.0, 10) == 0


def test_polynomial_schedule_values() -> None:
    fn = lr_multiplier_fn({**CFG, "warmup_steps": 0.1}, 100)    # W = 10
    assert [fn(s) for s in (0, 1, 5, 10)] == pytest.approx([0.0, 0.1, 0.5, 1.0])
    assert fn(55) == pytest.approx(0.5) and fn(100) == pytest.approx(0.0) and fn(150) == 0.0
    sq = lr_multiplier_fn({**CFG, "warmup_steps": 0, "decay_power": 2, "end_lr": 1e-3}, 10)
    assert sq(5) == pytest.approx(((1e-2 - 1e-3) * 0.25 + 1e-3) / 1e-2) and sq(11) == pytest.approx(0.1)
    cos = lr_multiplier_fn({**CFG, "warmup_steps": 10, "decay_power": "cosine"}, 110)
    assert cos(5) == pytest.approx(0.5) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)


def test_scheduler_first_update_at_zero_and_per_group() -> None:
    model = _Stub()
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG, total=20)                 # W = 2
    assert [g["lr"] for g in opt.param_groups] == [0.0] * 4
    opt.step()                                                  # no grads: a no-op
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3, 5e-3, 5e-2, 5e-2])


def _reference_multiplier(step: int, warm: int, total: int, power: float, lr: float, end_lr: float) -> float:
    """The §7.4 schedule written out (warmup, polynomial decay to end_lr, end_lr / lr after T)."""
    if step < warm:
        return step / max(1, warm)
    if step > total:
        return end_lr / lr
    return ((lr - end_lr) * (1.0 - (step - warm) / max(1, total - warm)) ** power + end_lr) / lr


@pytest.mark.parametrize("warmup,total,power,end_lr,extra", [
    (0.1, 100, 1, 0.0, 7),        # the papers' setting; 7 steps past T run at end_lr (Lightning's last partial batches)
    (0.1, 5005, 1, 0.0, 3),       # T of MM-IMDb's reference run (W = 500)
    (0, 10, 2, 1e-3, 5),          # no warmup, squared decay to a non-zero end_lr
    (25, 20, 1, 0.0, 5),          # warmup longer than T
    (5, 5, 1, 1e-4, 4),           # T == W
    (0, 0, 1, 0.0, 3),            # a run of 0 optimizer steps
])
def test_scheduler_matches_reference_schedule_every_step(warmup, total: int, power: int, end_lr: float, extra: int) -> None:
    """The transformers scheduler gives, at every optimizer step (also past T), exactly the reference lr per group."""
    cfg = {**CFG, "warmup_steps": warmup, "decay_power": power, "end_lr": end_lr}
    opt = build_optimizer(_Stub(), cfg)
    sched = build_scheduler(opt, cfg, total)
    warm, lr = warmup_steps(warmup, total), cfg["learning_rate"]
    bases = [g["initial_lr"] for g in opt.param_groups]
    assert bases == [1e-2, 1e-2, pytest.approx(1e-1), pytest.approx(1e-1)]
    fn = lr_multiplier_fn(cfg, total)
    for step in range(total + extra):
        expected = _reference_multiplier(step, warm, total, power, lr, end_lr)
        assert fn(step) == expected, step
        assert [g["lr"] for g in opt.param_groups] == [b * expected for b in bases], step
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [b * (end_lr / lr) for b in bases]   # past T: end_lr


def test_cosine_scheduler_matches_reference_every_step() -> None:
    cfg = {**CFG, "warmup_steps": 0.1, "decay_power": "cosine"}
    opt = build_optimizer(_Stub(), cfg)
    sched = build_scheduler(opt, cfg, 50)                                          # W = 5
    for step in range(56):
        expected = step / 5 if step < 5 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((step - 5) / 45))))
        assert opt.param_groups[0]["lr"] == 1e-2 * expected, step
        opt.step()
        sched.step()


def test_polynomial_schedule_refuses_end_lr_not_below_lr() -> None:
    with pytest.raises(ValueError, match="end_lr"):
        build_scheduler(build_optimizer(_Stub(), CFG), {**CFG, "end_lr": 1e-2}, 10)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        lr_multiplier_fn({**CFG, "learning_rate": 0.0}, 10)
