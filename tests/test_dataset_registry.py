"""The dataset registry (mdpl/data/registry.py): a dataset is one DatasetSpec.

* a toy fourth dataset defined entirely in this file (3 classes, single-label, its own raw layout, synthetic
  generator, arrow writer, loss and metrics) is registered for one test, written with ``write_synthetic``,
  converted with ``make_arrow``, trained and tested through ``run.py`` with a tiny ViLT -- no file under mdpl/
  names it;
* the built-in specs reproduce the behaviour of the former per-dataset if-chains (classes, metrics, losses,
  arrow stems, text columns, class names, text lengths of the task configs);
* an unknown dataset name is a one-line UserInputError naming the registered ones.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import Metric

from mdpl.data import constants
from mdpl.data.registry import (BUILTIN_DATASETS, DatasetSpec, available_datasets, dataset_spec, register_dataset,
                                registered, unregister_dataset)
from mdpl.data.writers.common import ImageFile, SplitPlan, write_splits
from mdpl.engine.losses import task_loss
from mdpl.engine.metrics import build_task_metrics
from mdpl.errors import UserInputError
from runs import typed

# ------------------------------------------------------------------------------------- the toy dataset
TOY = "toyset"
TOY_CLASSES = ("red", "green", "blue")
TOY_COLOURS = ((220, 30, 30), (30, 170, 40), (30, 60, 220))
TOY_WORDS = ("fresh", "old", "new")   # one keyword per class, all in the synthetic WordPiece vocabulary
TOY_SCHEMA = pa.schema([("image", pa.binary()), ("text", pa.list_(pa.string())), ("label", pa.int64()),
                        ("split", pa.string())])
COUNTS = {"train": 12, "val": 6, "test": 9}


def write_toy_raw(root: Path, counts: dict[str, int], rng, image_size: int, layout: str) -> None:
    """Raw layout: ``<root>/<split>.jsonl`` lines ``{"img", "text", "label"}`` and ``<root>/img/<split>_<i>.png``;
    the class is the image colour and a keyword of the text."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        lines = []
        for i in range(n):
            label, name = i % len(TOY_CLASSES), f"img/{split}_{i}.png"
            Image.new("RGB", (image_size, image_size), TOY_COLOURS[label]).save(root / name, format="PNG")
            text = f"the {TOY_WORDS[label]} {rng.choice(['day', 'night', 'city'])}"
            lines.append(json.dumps({"img": name, "text": text, "label": label}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_toy_arrow(root: Path, out: Path, *, strict: bool = False, max_side: int | None = None, progress: bool = True,
                   overwrite: bool = False, log=print, workers: int = 1) -> list:
    """The toy writer: one plan per split, written with mdpl's shared atomic writer."""
    def row_maker(split: str):
        def make_row(line: str) -> dict:
            obj = json.loads(line)
            return {"image": ImageFile(root / obj["img"]), "text": [obj["text"]], "label": obj["label"],
                    "split": split}
        return make_row

    spec = dataset_spec(TOY)
    plans = [SplitPlan(split, spec.arrow_stem(split), (root / f"{split}.jsonl").read_text().splitlines(),
                       row_maker(split)) for split in ("train", "val", "test")]
    return write_splits(plans, Path(out), TOY_SCHEMA, TOY, strict=strict, progress=progress, overwrite=overwrite,
                        log=log, max_side=max_side, workers=workers)


def smoothed_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The toy's own loss: cross-entropy with label smoothing 0.1."""
    return F.cross_entropy(logits.float(), label.long(), label_smoothing=0.1)


class SampleCount(Metric):
    """Counts the labelled samples seen (a metric the toy adds to accuracy)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        self.count += (target != -100).sum()

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        return self.count.float()


def n_samples(num_classes: int) -> Metric:
    """Metric factory of the toy spec: logged as ``n_samples``."""
    return SampleCount()


TOY_SPEC = DatasetSpec(name=TOY, num_classes=3, class_names=TOY_CLASSES, schema=TOY_SCHEMA,
                       loss=smoothed_cross_entropy, metrics=("accuracy", n_samples), primary_metric="accuracy",
                       writer=make_toy_arrow, synthetic=write_toy_raw, synthetic_layouts=("jsonl",))


@pytest.fixture
def toyset():
    """The toy spec, registered for one test only."""
    with registered(TOY_SPEC) as spec:
        yield spec
    assert TOY not in available_datasets()


def test_toy_dataset_is_read_through_its_spec(toyset, tmp_path) -> None:
    from runs import synthetic_arrows
    from mdpl.data.dataset import ArrowMultimodalDataset
    from mdpl.data.transforms import build_transform

    data = synthetic_arrows(tmp_path, TOY, *COUNTS.values())
    assert sorted(p.name for p in data["arrow"].iterdir()) == ["toyset_test.arrow", "toyset_train.arrow",
                                                                "toyset_val.arrow"]
    ds = ArrowMultimodalDataset(data["arrow"], TOY, "test", build_transform(typed({"image_size": 64, "backbone": "vilt"}).pipeline))
    assert len(ds) == COUNTS["test"] and ds.labels.tolist() == [i % 3 for i in range(COUNTS["test"])]
    item = ds[4]
    assert item["label"] == 1 and item["text"].startswith(f"the {TOY_WORDS[1]} ")
    logits, label = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(task_loss(TOY, logits, label), smoothed_cross_entropy(logits, label))


def test_toy_dataset_trains_and_tests_end_to_end(toyset, tmp_path) -> None:
    from runs import resolved_config, run_quiet, synthetic_arrows

    data = synthetic_arrows(tmp_path / "data", TOY, *COUNTS.values())
    updates = {"dataset": TOY, "exp_name": "finetune_toyset", "data_root": str(data["arrow"]),
               "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"], "log_dir": str(tmp_path / "result"),
               "max_epoch": 1, "val_check_interval": 1.0}
    out = run_quiet(resolved_config(["task_finetune_food101", "baseline", "tiny"], updates))
    saved = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    accuracy = saved[f"{TOY}/test/accuracy"]
    assert math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0
    assert saved["test/the_metric"] == pytest.approx(accuracy)
    assert saved[f"{TOY}/test/n_samples"] == COUNTS["test"]
    assert math.isfinite(saved[f"{TOY}/test/loss"])
    assert Path(out["best_model_path"]).name.startswith("best-")


def test_toy_dataset_is_a_make_arrow_and_synthetic_choice_only_while_registered(toyset) -> None:
    import make_arrow
    from mdpl.data.synthetic import synthetic_datasets
    from mdpl.data.writers import writer_datasets

    assert TOY in writer_datasets() and TOY in synthetic_datasets()
    choices = next(a.choices for a in make_arrow.build_parser()._actions if a.dest == "dataset")
    assert TOY in choices
    unregister_dataset(TOY)
    try:
        assert TOY not in writer_datasets() and TOY not in synthetic_datasets()
    finally:
        register_dataset(TOY_SPEC)


# ---------------------------------------------------------------------------------------- registry rules
def test_registering_again_is_idempotent_and_a_different_spec_is_refused(toyset) -> None:
    assert register_dataset(TOY_SPEC) is TOY_SPEC
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec(name=TOY, num_classes=4))
    assert dataset_spec(TOY) is TOY_SPEC


def test_registered_is_scoped_and_refuses_to_replace_a_builtin() -> None:
    with registered(DatasetSpec(name="scoped", num_classes=2)) as spec:
        assert dataset_spec("scoped") is spec
    assert "scoped" not in available_datasets()
    with pytest.raises(ValueError, match="already registered"):
        with registered(DatasetSpec(name="food101", num_classes=7)):
            pass
    with registered(dataset_spec("food101")):   # an equal spec: a no-op that leaves the built-in registered
        pass
    assert dataset_spec("food101").num_classes == 101 and available_datasets()[:3] == list(BUILTIN_DATASETS)


def test_spec_defaults_and_checks() -> None:
    spec = DatasetSpec(name="plain", num_classes=4)
    assert spec.arrow_splits == {"train": "plain_train", "val": "plain_val", "test": "plain_test"}
    assert (spec.loss, spec.metrics, spec.primary_metric) == ("cross_entropy", ("accuracy",), "accuracy")
    multi = DatasetSpec(name="tags", num_classes=5, multi_label=True)
    assert (multi.loss, multi.metrics, multi.primary_metric) == ("bce_with_logits", ("f1",), "F1_Macro")
    for bad in (dict(num_classes=0), dict(num_classes=3, class_names=("a", "b")), dict(num_classes=2, loss="mse"),
                dict(num_classes=2, text_items="some"), dict(num_classes=2, arrow_splits={"train": "x"})):
        with pytest.raises(ValueError):
            DatasetSpec(name="bad", **bad)
    assert pickle.loads(pickle.dumps(dataset_spec("mmimdb"))) == dataset_spec("mmimdb")


@pytest.mark.parametrize("call", [dataset_spec, lambda n: task_loss(n, torch.zeros(1, 2), torch.zeros(1)),
                                  build_task_metrics])
def test_unknown_dataset_is_a_one_line_user_error(call) -> None:
    with pytest.raises(UserInputError) as err:
        call("imdb")
    message = str(err.value)
    assert "\n" not in message and "unknown dataset 'imdb'" in message
    assert "mmimdb, food101, hatememes" in message


def test_validate_accepts_exactly_the_registered_datasets(toyset) -> None:
    from mdpl.config.validate import check_dataset_and_backbone

    check_dataset_and_backbone({"dataset": TOY, "backbone": "vilt"})
    unregister_dataset(TOY)
    try:
        with pytest.raises(UserInputError, match=r"unknown dataset 'toyset'; choose one of mmimdb, food101, hatememes"):
            check_dataset_and_backbone({"dataset": TOY, "backbone": "vilt"})
    finally:
        register_dataset(TOY_SPEC)


# ------------------------------------------------------------------------------------------- built-ins
def test_builtin_specs_are_the_former_constants() -> None:
    assert available_datasets()[:3] == list(BUILTIN_DATASETS) == ["mmimdb", "food101", "hatememes"]
    assert {n: dataset_spec(n).num_classes for n in BUILTIN_DATASETS} == {"mmimdb": 23, "food101": 101,
                                                                           "hatememes": 2}
    assert [dataset_spec(n).multi_label for n in BUILTIN_DATASETS] == [True, False, False]
    assert dataset_spec("mmimdb").arrow_splits == {"train": "mmimdb_train", "val": "mmimdb_dev", "test": "mmimdb_test"}
    assert dataset_spec("food101").arrow_splits == {"train": "food101_train", "val": "food101_val",
                                                    "test": "food101_test"}
    assert dataset_spec("hatememes").arrow_splits == {"train": "hatememes_train", "val": "hatememes_dev",
                                                      "test": "hatememes_test"}
    assert [dataset_spec(n).text_column for n in BUILTIN_DATASETS] == ["plots", "text", "text"]
    assert [dataset_spec(n).text_items for n in BUILTIN_DATASETS] == ["selectable", "per_text", "per_text"]
    assert dataset_spec("mmimdb").class_names[:3] == ("Drama", "Comedy", "Romance")
    assert len(dataset_spec("mmimdb").class_names) == 23 and dataset_spec("food101").class_names is None
    assert dataset_spec("hatememes").class_names == ("not hateful", "hateful")
    # the backward-compatible views are derived from the specs
    assert constants.NUM_CLASSES == {n: dataset_spec(n).num_classes for n in BUILTIN_DATASETS}
    assert constants.ARROW_SPLITS == {n: dataset_spec(n).arrow_splits for n in BUILTIN_DATASETS}
    assert constants.TEXT_COLUMN == {"mmimdb": "plots", "food101": "text", "hatememes": "text"}
    assert constants.MMIMDB_GENRES == list(dataset_spec("mmimdb").class_names)


@pytest.mark.parametrize("dataset,names,primary", [
    ("mmimdb", {"F1_Micro", "F1_Macro", "F1_Samples", "F1_Weighted"}, "F1_Macro"),
    ("food101", {"accuracy"}, "accuracy"),
    ("hatememes", {"AUROC", "accuracy"}, "AUROC"),
])
def test_builtin_metrics_and_losses(dataset, names, primary) -> None:
    spec = dataset_spec(dataset)
    metrics = build_task_metrics(dataset)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, spec.num_classes, generator=gen)
    if spec.multi_label:
        target = (torch.rand(8, spec.num_classes, generator=gen) > 0.7).float()
        expected = F.binary_cross_entropy_with_logits(logits, target)
    else:
        target = torch.arange(8) % spec.num_classes
        expected = F.cross_entropy(logits, target)
    metrics.update(logits, target)
    assert set(metrics.compute()) == names and metrics.primary == spec.primary_metric == primary
    assert spec.loss == ("bce_with_logits" if dataset == "mmimdb" else "cross_entropy")
    assert torch.equal(task_loss(dataset, logits, target), expected)


def test_builtin_writers_and_generators() -> None:
    from mdpl.data import synthetic
    from mdpl.data.writers import food101, hatememes, mmimdb, writer_datasets

    assert writer_datasets()[:3] == list(BUILTIN_DATASETS)
    assert [dataset_spec(n).make_arrow_fn() for n in BUILTIN_DATASETS] == [mmimdb.make_arrow, food101.make_arrow,
                                                                           hatememes.make_arrow]
    assert [dataset_spec(n).arrow_schema() for n in BUILTIN_DATASETS] == [mmimdb.SCHEMA, food101.SCHEMA,
                                                                          hatememes.SCHEMA]
    assert [dataset_spec(n).writer_options for n in BUILTIN_DATASETS] == [
        (), ("val_fraction", "seed"), ("train_file", "dev_file", "test_file")]
    assert synthetic.LAYOUTS == {"mmimdb": ("split", "archive"), "food101": ("both", "json", "csv"),
                                 "hatememes": ("data", "flat")}
    assert [dataset_spec(n).synthetic_fn() for n in BUILTIN_DATASETS] == [
        synthetic._write_mmimdb, synthetic._write_food101, synthetic._write_hatememes]


@pytest.mark.parametrize("dataset", BUILTIN_DATASETS)
def test_builtin_text_length_is_the_task_configs(dataset) -> None:
    from runs import resolved_config

    cfg = resolved_config([f"task_finetune_{dataset}", "baseline"], {})
    spec = dataset_spec(dataset)
    assert cfg["dataset"] == dataset and cfg["max_text_len"] == spec.max_text_len
    assert (cfg["max_epoch"], cfg["val_check_interval"]) == (spec.max_epoch, spec.val_check_interval)
