"""Task metrics with torchmetrics-0.9.3 semantics (docs/methods.md §8, defect D-51).

All metrics accumulate over a whole epoch and are `torchmetrics.Metric`s, so their tensor states are
reduced across DDP ranks when `compute()` is called:

* `MultilabelF1` (MM-IMDb): per-class TP/FP/FN sums (micro, macro, weighted) and a running
  sum/count of per-sample F1 (samples) -- all "sum" states, constant memory. Hand-written on purpose:
  torchmetrics >= 1.0 keeps absent classes in the macro mean and has no samples average (0.9.3 semantics).
* `Accuracy` (Food-101, Hateful Memes): correct/total sums.
* `BinaryAUROC` (Hateful Memes): "cat" states of softmax[:, 1] and targets (ROC needs all scores); the
  ROC-AUC itself is torchmetrics' `binary_auroc`.

`Accuracy` and `BinaryAUROC` give exactly the numbers of torchmetrics' `MulticlassAccuracy(average="micro",
ignore_index=-100)` and `BinaryAUROC(thresholds=None, ignore_index=-100)` (tests/test_metrics.py) but keep
their own `update`: torchmetrics drops ignored targets by boolean indexing there, a host-device sync on
every training step; here the -100 mask is arithmetic (sync-free).

`build_task_metrics(dataset)` returns a `TaskMetrics` bundle built from the dataset's spec
(mdpl/data/registry.py: `metrics` kinds of `METRIC_KINDS` or own factories, `primary_metric`) with the
metric names logged by the engine and the name of the primary metric (`the_metric`).

`metric_inputs="logits"` (config key; default "probabilities") gives the scores the legacy torchmetrics 0.9.3
classes see when a reference hands them raw logits: F1 thresholds the raw logit (logit >= 0.5, i.e. p >= 0.622)
and AUROC is the macro one-vs-rest AUROC over the raw logit columns, ½[AUC(z_1, y = 1) + AUC(z_0, y = 0)], not the
binary AUROC of softmax[:, 1] (`LOGIT_KINDS`). `primary_metric` (config key; "" = the dataset's) picks another
logged value as `the_metric` (e.g. F1_Micro).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from mdpl.config.sections import METRIC_INPUTS
from mdpl.data.registry import F1_NAMES, dataset_spec

IGNORE_INDEX = -100


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0/0 (and x/0) := 0, as torchmetrics 0.9.3's `_safe_divide`."""
    den = den.to(num.dtype)
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


def _f1_from_pr(precision: Tensor, recall: Tensor) -> Tensor:
    """F1 = 2PR/(P+R), 0 where P+R = 0 (torchmetrics 0.9.3 `_fbeta_compute` with beta=1)."""
    denom = precision + recall
    return _safe_div(2 * precision * recall, denom)


def multilabel_f1_from_stats(tp: Tensor, fp: Tensor, fn: Tensor) -> dict[str, Tensor]:
    """Micro, macro and weighted F1 from per-class counts [C] (docs/methods.md §8).

    Macro drops classes with TP+FP+FN = 0 (torchmetrics 0.9.3); weighted uses support TP+FN.
    """
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    micro = _f1_from_pr(_safe_div(tp.sum(), tp.sum() + fp.sum()), _safe_div(tp.sum(), tp.sum() + fn.sum()))
    per_class = _f1_from_pr(_safe_div(tp, tp + fp), _safe_div(tp, tp + fn))
    present = (tp + fp + fn) > 0
    macro = per_class[present].mean() if bool(present.any()) else per_class.new_zeros(())
    support = tp + fn
    weighted = _safe_div((per_class * support).sum(), support.sum())
    return {"F1_Micro": micro, "F1_Macro": macro, "F1_Weighted": weighted}


def samplewise_f1(preds: Tensor, target: Tensor) -> Tensor:
    """Per-sample F1 over the labels of each row [N]; 0 when P+R = 0 (no positives predicted or true)."""
    tp = (preds & target).sum(dim=1).double()
    fp = (preds & ~target).sum(dim=1).double()
    fn = (~preds & target).sum(dim=1).double()
    return _f1_from_pr(_safe_div(tp, tp + fp), _safe_div(tp, tp + fn))


class MultilabelF1(Metric):
    """MM-IMDb F1 (micro, macro, samples, weighted) at p = sigmoid(logit) >= threshold (docs/methods.md §8)."""

    full_state_update = False

    def __init__(self, num_labels: int, threshold: float = 0.5, on_logits: bool = False, **kwargs) -> None:
        """`on_logits`: threshold the raw logit instead of sigmoid(logit) (``metric_inputs="logits"``)."""
        super().__init__(**kwargs)
        self.num_labels, self.threshold, self.on_logits = num_labels, threshold, on_logits
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples_f1_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """logits [N, C] (raw), target [N, C] multi-hot (0/1, any dtype)."""
        if logits.shape != target.shape or logits.shape[-1] != self.num_labels:
            raise ValueError(f"MultilabelF1 expects logits and targets [N, {self.num_labels}], got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        scores = logits.detach().float()
        preds = (scores if self.on_logits else torch.sigmoid(scores)) >= self.threshold
        target = target.detach() > 0.5
        self.tp += (preds & target).sum(dim=0)
        self.fp += (preds & ~target).sum(dim=0)
        self.fn += (~preds & target).sum(dim=0)
        self.samples_f1_sum += samplewise_f1(preds, target).sum()
        self.n_samples += preds.shape[0]

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        out = multilabel_f1_from_stats(self.tp, self.fp, self.fn)
        out["F1_Samples"] = _safe_div(self.samples_f1_sum, self.n_samples.double())
        return {k: out[k].float() for k in F1_NAMES}


class Accuracy(Metric):
    """mean(argmax(logits) == label) over targets != -100 (docs/methods.md §8, Food-101 / Hateful Memes)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        keep = target != IGNORE_INDEX  # mask arithmetic, not boolean indexing: no host sync per step
        pred = logits.detach().argmax(dim=-1)
        self.correct += ((pred == target) & keep).sum()
        self.total += keep.sum()

    def compute(self) -> Tensor:  # type: ignore[override]
        return _safe_div(self.correct.double(), self.total.double()).float()


class BinaryAUROC(Metric):
    """ROC-AUC of softmax(logits)[:, 1] vs label (trapezoidal ROC, exact thresholds; docs/methods.md §8).

    Equals torchmetrics 0.9.3's 2-class macro one-vs-rest AUROC. With a single class present the
    AUC is undefined; torchmetrics returns 0 (with a warning) and so do we.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("probs", [], dist_reduce_fx="cat")
        self.add_state("targets", [], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"BinaryAUROC expects 2-class logits [N, 2], got {tuple(logits.shape)}")
        # All rows are stored (no boolean indexing, hence no host sync per step); ignored targets
        # (-100) are dropped in `compute`.
        self.probs.append(torch.softmax(logits.detach().float(), dim=-1)[:, 1])
        self.targets.append(target.detach().long())

    def compute(self) -> Tensor:  # type: ignore[override]
        probs, targets = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        keep = targets != IGNORE_INDEX
        return binary_auroc(probs[keep], targets[keep], thresholds=None).float()


class LogitColumnsAUROC(BinaryAUROC):
    """Macro one-vs-rest AUROC over the raw logit columns of 2-class logits: ½[AUC(z_1, y = 1) + AUC(z_0, y = 0)]
    (torchmetrics 0.9.3 ``AUROC(num_classes=2)`` fed raw logits; ``metric_inputs="logits"``)."""

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"LogitColumnsAUROC expects 2-class logits [N, 2], got {tuple(logits.shape)}")
        self.probs.append(logits.detach().float())      # both columns, raw
        self.targets.append(target.detach().long())

    def compute(self) -> Tensor:  # type: ignore[override]
        scores, targets = dim_zero_cat(self.probs), dim_zero_cat(self.targets)
        keep = targets != IGNORE_INDEX
        scores, targets = scores[keep], targets[keep]
        per_class = [binary_auroc(scores[:, c], (targets == c).long(), thresholds=None) for c in (0, 1)]
        return torch.stack(per_class).mean().float()


#: metric kind (``DatasetSpec.metrics``) -> factory ``(num_classes) -> Metric``; the kind is also the
#: metric's key, i.e. its logged name when it computes one tensor.
METRIC_KINDS: dict[str, Callable[[int], Metric]] = {
    "f1": lambda num_classes: MultilabelF1(num_classes),
    "accuracy": lambda num_classes: Accuracy(),
    "AUROC": lambda num_classes: BinaryAUROC(),
}


LOGIT_KINDS: dict[str, Callable[[int], Metric]] = {
    "f1": lambda num_classes: MultilabelF1(num_classes, on_logits=True),
    "AUROC": lambda num_classes: LogitColumnsAUROC(),
}
"""The kinds that differ with ``metric_inputs="logits"`` (the others are the same on logits and probabilities)."""


def _metric_key(kind: str | Callable[[int], Metric]) -> str:
    return kind if isinstance(kind, str) else kind.__name__


def _build_metric(kind: str | Callable[[int], Metric], num_classes: int, inputs: str = "probabilities") -> Metric:
    """A kind of :data:`METRIC_KINDS` (:data:`LOGIT_KINDS` with `inputs` "logits") or a spec's own factory -> a
    fresh metric."""
    if inputs == "logits" and isinstance(kind, str) and kind in LOGIT_KINDS:
        return LOGIT_KINDS[kind](num_classes)
    if isinstance(kind, str):
        if kind not in METRIC_KINDS:
            raise ValueError(f"unknown metric kind {kind!r}; expected one of {', '.join(METRIC_KINDS)} or a callable")
        return METRIC_KINDS[kind](num_classes)
    return kind(num_classes)


class TaskMetrics(nn.Module):
    """The metrics of one task and phase: `update(logits, target)`, `compute() -> {name: value}`, `reset()`.

    `primary` names the value used as `the_metric` (docs/methods.md §8).
    """

    def __init__(self, dataset: str, num_classes: int | None = None, inputs: str = "probabilities",
                 primary: str = "") -> None:
        """`inputs`: ``METRIC_INPUTS`` (``metric_inputs``); `primary`: the logged value used as `the_metric`
        ("" = the dataset's ``primary_metric``)."""
        super().__init__()
        if inputs not in METRIC_INPUTS:
            raise ValueError(f"metric inputs {inputs!r}: one of {METRIC_INPUTS}")
        spec = dataset_spec(dataset)
        self.dataset = dataset
        n_classes = spec.num_classes if num_classes is None else num_classes
        self.metrics = nn.ModuleDict({_metric_key(m): _build_metric(m, n_classes, inputs) for m in spec.metrics})
        self.primary = primary or spec.primary_metric

    def update(self, logits: Tensor, target: Tensor) -> None:
        for metric in self.metrics.values():
            metric.update(logits, target)

    @property
    def has_updates(self) -> bool:
        return any(m.update_called for m in self.metrics.values())

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            out.update(value if isinstance(value, dict) else {name: value})
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def build_task_metrics(dataset: str, inputs: str = "probabilities", primary: str = "") -> TaskMetrics:
    """Metrics of ``dataset``'s spec (mmimdb: F1 x4, primary F1_Macro; food101: accuracy; hatememes: AUROC +
    accuracy), on ``metric_inputs`` `inputs`, `primary` overriding the spec's primary metric. An unknown dataset is a
    UserInputError naming the registered ones."""
    return TaskMetrics(dataset, inputs=inputs, primary=primary)
