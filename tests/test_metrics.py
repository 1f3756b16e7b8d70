"""Task metrics vs hand-computed values (docs/methods.md §8, torchmetrics 0.9.3 semantics)."""
from __future__ import annotations

import math

import pytest
import torch

from mdpl.engine.metrics import Accuracy, BinaryAUROC, MultilabelF1, build_task_metrics

# 4 samples x 4 labels. Label 3 never occurs (no TP/FP/FN) -> dropped from macro.
PREDS = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
TARGET = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
# per class: c0 tp2 -> F1 1; c1 fp1 fn1 -> 0; c2 fp1 -> 0; c3 absent.
EXPECTED = {
    "F1_Macro": 1 / 3,                   # (1 + 0 + 0) / 3, class 3 dropped (would be 1/4 if kept)
    "F1_Micro": 4 / 7,                   # P = 2/4, R = 2/3
    "F1_Weighted": 2 / 3,                # supports c0 = 2, c1 = 1 -> (2*1 + 1*0) / 3
    "F1_Samples": (2 / 3 + 0 + 2 / 3 + 0) / 4,   # sample 1 has no positives and no predictions -> 0
}


def _logits(preds: torch.Tensor) -> torch.Tensor:
    return torch.where(preds.bool(), torch.tensor(2.0), torch.tensor(-2.0))


def test_multilabel_f1_hand_values() -> None:
    metric = MultilabelF1(4)
    metric.update(_logits(PREDS), TARGET)
    out = metric.compute()
    for name, value in EXPECTED.items():
        assert out[name].item() == pytest.approx(value, abs=1e-6), name


def test_multilabel_f1_accumulates_over_batches() -> None:
    metric = MultilabelF1(4)
    metric.update(_logits(PREDS[:1]), TARGET[:1])
    metric.update(_logits(PREDS[1:]), TARGET[1:])
    out = metric.compute()
    for name, value in EXPECTED.items():
        assert out[name].item() == pytest.approx(value, abs=1e-6), name
    metric.reset()
    assert int(metric.n_samples) == 0 and int(metric.tp.sum()) == 0


def test_threshold_is_inclusive_at_half() -> None:
    metric = MultilabelF1(2)
    metric.update(torch.tensor([[0.0, -1e-3]]), torch.tensor([[1.0, 1.0]]))  # sigmoid(0) = 0.5 -> positive
    assert metric.tp.tolist() == [1, 0] and metric.fn.tolist() == [0, 1]


def test_accuracy_ignores_minus_100() -> None:
    metric = Accuracy()
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    metric.update(logits, torch.tensor([0, 2, 2, -100]))
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_binary_auroc_with_tie() -> None:
    # positives score 0.9, 0.4; negatives 0.6, 0.2, 0.4 -> (3 + 1 + 0.5) / 6 = 0.75
    p = torch.tensor([0.9, 0.4, 0.6, 0.2, 0.4])
    x = torch.log(p / (1 - p))
    logits = torch.stack([torch.zeros_like(x), x], dim=1)
    metric = BinaryAUROC()
    metric.update(logits[:2], torch.tensor([1, 1]))
    metric.update(logits[2:], torch.tensor([0, 0, 0]))
    assert metric.compute().item() == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("dataset,primary,names", [
    ("mmimdb", "F1_Macro", {"F1_Micro", "F1_Macro", "F1_Samples", "F1_Weighted"}),
    ("food101", "accuracy", {"accuracy"}),
    ("hatememes", "AUROC", {"AUROC", "accuracy"}),
])
def test_task_metrics_bundle(dataset: str, primary: str, names: set[str]) -> None:
    metrics = build_task_metrics(dataset)
    assert metrics.primary == primary and not metrics.has_updates
    n_cls = {"mmimdb": 23, "food101": 101, "hatememes": 2}[dataset]
    logits = torch.randn(8, n_cls)
    target = (torch.rand(8, 23) > 0.7).float() if dataset == "mmimdb" else torch.arange(8) % n_cls
    metrics.update(logits, target)
    out = metrics.compute()
    assert set(out) == names and all(math.isfinite(v.item()) for v in out.values())
    if dataset == "hatememes":
        assert out["accuracy"].item() == pytest.approx((logits.argmax(1) == target).float().mean().item())


# ------------------------------------------------- same numbers as torchmetrics' classes, without host syncs
def _batches_with_ignored(n_cls: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, n_cls, generator=g).round(decimals=1)        # rounding makes ties in the scores
    target = torch.randint(0, n_cls, (40,), generator=g)
    logits[::3] = logits[::3].index_put((torch.arange(14), target[::3]), torch.tensor(9.0))   # some right answers
    target[[0, 7, 8, 23, 39]] = -100
    return [(logits[s], target[s]) for s in (slice(0, 9), slice(9, 25), slice(25, 40))]


@pytest.mark.parametrize("n_cls", [2, 5, 101])
def test_accuracy_equals_torchmetrics_multiclass_accuracy(n_cls: int) -> None:
    from torchmetrics.classification import MulticlassAccuracy

    ours, ref = Accuracy(), MulticlassAccuracy(num_classes=n_cls, average="micro", ignore_index=-100)
    for logits, target in _batches_with_ignored(n_cls, seed=n_cls):
        ours.update(logits, target)
        ref.update(logits, target)
    assert ours.compute().dtype == torch.float32 and ours.compute().item() == ref.compute().item()
    assert 0.0 < ours.compute().item() < 1.0


def test_binary_auroc_equals_torchmetrics_binary_auroc() -> None:
    from torchmetrics.classification import BinaryAUROC as TMBinaryAUROC

    ours, ref = BinaryAUROC(), TMBinaryAUROC(thresholds=None, ignore_index=-100)
    for logits, target in _batches_with_ignored(2, seed=3):
        ours.update(logits, target)
        ref.update(torch.softmax(logits, dim=-1)[:, 1], target)
    assert ours.compute().item() == ref.compute().item() and 0.0 < ours.compute().item() < 1.0


def _host_sync_ops(fn) -> list[str]:
    """aten ops run by ``fn()`` that make a CUDA host wait: boolean-mask indexing, nonzero, .item()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            bool_index = name in ("aten.index", "aten.index_put_", "aten.index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
            if bool_index or name in ("aten.nonzero", "aten.masked_select", "aten._local_scalar_dense"):
                found.append(name)
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return found


def test_metric_updates_make_no_host_sync_unlike_torchmetrics_ignore_index() -> None:
    """Why Accuracy / BinaryAUROC keep their own update: torchmetrics drops ignore_index targets by boolean
    indexing in update (a host-device sync every training step); ours mask arithmetically."""
    from torchmetrics.classification import BinaryAUROC as TMBinaryAUROC
    from torchmetrics.classification import MulticlassAccuracy

    logits, target = _batches_with_ignored(2)[1]
    probs = torch.softmax(logits, dim=-1)[:, 1]
    acc, auroc, f1 = Accuracy(), BinaryAUROC(), MultilabelF1(2)
    assert _host_sync_ops(lambda: acc.update(logits, target)) == []
    assert _host_sync_ops(lambda: auroc.update(logits, target)) == []
    assert _host_sync_ops(lambda: f1.update(logits, (target > 0).float()[:, None].expand(-1, 2))) == []
    tm_acc = MulticlassAccuracy(num_classes=2, average="micro", ignore_index=-100, validate_args=False)
    assert "aten.index" in _host_sync_ops(lambda: tm_acc.update(logits, target))
    tm_auroc = TMBinaryAUROC(thresholds=None, ignore_index=-100, validate_args=False)
    assert "aten.index" in _host_sync_ops(lambda: tm_auroc.update(probs, target))
