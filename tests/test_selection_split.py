"""``selection_split`` (docs/methods.md §8): the validation loop reads the configured split, so
checkpoint selection and early stopping follow it; ``test`` reproduces references that select on the test split."""
from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest

from mdpl.errors import UserInputError
from runs import datamodule_of, resolved_config, run_quiet, synthetic_arrows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("selection")
    data = synthetic_arrows(root, "hatememes", 16, 6, 10)
    return resolved_config(["task_finetune_hatememes", "baseline", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "log_dir": str(root / "result"), "max_epoch": 1, "logger": "csv", "val_check_interval": 1.0})


def test_validation_loop_reads_the_selection_split(config) -> None:
    dm = datamodule_of({**config, "selection_split": "test"})
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "test"}
    assert len(dm.val_dataloader().dataset) == 10
    dm.trainer = SimpleNamespace(training=False, testing=False, validating=True)
    assert dm._current_split() == "test"                   # the batch's split (RAGPT's neighbour lists, overrides)
    default = datamodule_of(config)
    default.setup("fit")
    assert set(default.datasets) == {"train", "val"} and len(default.val_dataloader().dataset) == 6


def logged_validation(run_dir: str) -> dict[str, float]:
    """The validation loop's logged values (``val/...`` keys) of the run's only validation."""
    rows = list(csv.DictReader(next(Path(run_dir).rglob("metrics.csv")).open()))
    row = next(r for r in rows if r.get("val/the_metric"))
    return {k.replace("/val/", "/test/"): float(v) for k, v in row.items() if "/val/" in k and v}


def test_selection_on_test_validates_on_the_test_split(config) -> None:
    """One epoch: the checkpoint tested is the one validated, so with ``selection_split=test`` the validation loop's
    logged values (loss, accuracy, AUROC) are the test values; with ``val`` they come from the 6 other items."""
    on_test = run_quiet({**config, "selection_split": "test", "exp_name": "on_test"})
    logged = logged_validation(on_test["run_dir"])
    assert set(logged) == {"hatememes/test/loss", "hatememes/test/accuracy", "hatememes/test/AUROC"}
    for key, value in logged.items():
        assert value == pytest.approx(on_test["test"][key], abs=1e-6), key
    on_val = run_quiet({**config, "exp_name": "on_val"})
    assert on_val["test"] == on_test["test"]
    logged = logged_validation(on_val["run_dir"])
    assert logged["hatememes/test/loss"] != pytest.approx(on_val["test"]["hatememes/test/loss"], abs=1e-4)


def test_unknown_selection_split_is_one_error_line(config) -> None:
    from mdpl.config.validate import validate_config
    for value in ("train", "dev"):
        with pytest.raises(UserInputError, match="selection_split") as err:
            validate_config({**config, "selection_split": value})
        assert "\n" not in str(err.value)
