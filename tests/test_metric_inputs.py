"""``metric_inputs="logits"`` and ``primary_metric`` (docs/methods.md §8): the scores torchmetrics 0.9.3's legacy
classes see when a reference hands them raw logits (F1 at logit >= 0.5; AUROC as the macro over the two raw logit
columns), checked against plain formulas; the default stays mdpl's (sigmoid / softmax)."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from mdpl.config.validate import check_data_options
from mdpl.engine.metrics import build_task_metrics
from mdpl.errors import UserInputError


def logits_and_targets(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 23, generator=g) * 1.5, (torch.rand(40, 23, generator=g) < 0.3).float()


def plain_f1(preds: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(micro, samples): pooled 2TP / (2TP + FP + FN); per-row F1 (0 when undefined) averaged over rows."""
    t = target.bool()
    tp, fp, fn = (preds & t).sum(), (preds & ~t).sum(), (~preds & t).sum()
    micro = float(2 * tp / (2 * tp + fp + fn))
    rows = []
    for p, y in zip(preds, t):
        a, b, c = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
        rows.append(0.0 if 2 * a + b + c == 0 else 2 * a / (2 * a + b + c))
    return micro, sum(rows) / len(rows)


def test_multilabel_f1_on_raw_logits() -> None:
    logits, target = logits_and_targets()
    values = {}
    for inputs in ("probabilities", "logits"):
        metrics = build_task_metrics("mmimdb", inputs, "F1_Micro" if inputs == "logits" else "")
        metrics.update(logits, target)
        values[inputs] = (metrics.compute(), metrics.primary)
    raw, primary = values["logits"]
    micro, samples = plain_f1(logits >= 0.5, target)
    assert primary == "F1_Micro" and values["probabilities"][1] == "F1_Macro"
    assert float(raw["F1_Micro"]) == pytest.approx(micro, abs=1e-6)
    assert float(raw["F1_Samples"]) == pytest.approx(samples, abs=1e-6)
    default = plain_f1(logits >= 0.0, target)      # sigmoid >= 0.5 <=> logit >= 0
    assert float(values["probabilities"][0]["F1_Micro"]) == pytest.approx(default[0], abs=1e-6)
    assert abs(micro - default[0]) > 1e-3


def test_auroc_on_raw_logit_columns() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 2, generator=g) * 2
    target = torch.randint(0, 2, (50,), generator=g)
    expected = 0.5 * (float(binary_auroc(logits[:, 1], target)) + float(binary_auroc(logits[:, 0], 1 - target)))
    softmax = float(binary_auroc(torch.softmax(logits, -1)[:, 1], target))
    values = {}
    for inputs in ("probabilities", "logits"):
        metrics = build_task_metrics("hatememes", inputs)
        metrics.update(logits, target)
        values[inputs] = metrics.compute()
    assert float(values["logits"]["AUROC"]) == pytest.approx(expected, abs=1e-6)
    assert float(values["probabilities"]["AUROC"]) == pytest.approx(softmax, abs=1e-6)
    assert abs(expected - softmax) > 1e-3
    assert float(values["logits"]["accuracy"]) == float(values["probabilities"]["accuracy"])


def test_bad_values_are_one_error_line() -> None:
    for over, key in (({"metric_inputs": "scores"}, "metric_inputs"),
                      ({"primary_metric": "F1_Micro", "dataset": "food101"}, "primary_metric")):
        with pytest.raises(UserInputError, match=key) as err:
            check_data_options({"dataset": "mmimdb", **over})
        assert "\n" not in str(err.value)
