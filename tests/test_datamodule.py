"""Arrow datasets, collation and the LightningDataModule (the batch format every model reads)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from conftest import _SCHEMAS, make_rows, write_arrow
from mdpl.data.collate import Collator
from mdpl.data.constants import NUM_CLASSES
from mdpl.data.dataset import ArrowMultimodalDataset
from mdpl.data.datamodule import MDPLDataModule
from mdpl.data.missing import MissingSpec, make_missing_table
from mdpl.data.transforms import build_transform
from runs import datamodule_of, typed


def _check_batch(batch: dict, dataset: str, text_len: int, bsz: int) -> None:
    img = batch["image"]
    assert img.dtype == torch.float32 and img.shape[:2] == (bsz, 3)
    sizes = batch["image_sizes"]
    assert sizes.dtype == torch.long and sizes.shape == (bsz, 2)
    assert int(sizes[:, 0].max()) == img.shape[2] and int(sizes[:, 1].max()) == img.shape[3]
    for key in ("text_ids", "text_masks"):
        assert batch[key].dtype == torch.long and batch[key].shape == (bsz, text_len)
    if dataset == "mmimdb":
        assert batch["label"].dtype == torch.float32 and batch["label"].shape == (bsz, 23)
    else:
        assert batch["label"].dtype == torch.long and batch["label"].shape == (bsz,)
        assert int(batch["label"].max()) < NUM_CLASSES[dataset]
    for key in ("missing_type", "row_index", "item_index"):
        assert batch[key].dtype == torch.long and batch[key].shape == (bsz,)


@pytest.mark.parametrize("dataset", ["mmimdb", "food101", "hatememes"])
def test_vilt_batches_all_datasets(dataset, arrow_root, bert_vocab_dir, data_config):
    cfg = data_config(dataset, arrow_root(dataset), bert_vocab_dir)
    dm = datamodule_of(cfg)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert train.n_rows == 6 and len(train) == (12 if dataset == "mmimdb" else 6)  # MM-IMDb: 1+2+3 plots x2
    batch = next(iter(dm.train_dataloader()))
    _check_batch(batch, dataset, 16, 4)
    assert torch.equal(batch["missing_type"], train.missing_table[batch["row_index"]])
    out = dm.on_after_batch_transfer(batch, 0)
    _check_batch(out, dataset, 16, 4)
    d_ids, d_masks = dm.dummy_text()
    text_missing = out["missing_type"] == 1
    assert torch.equal(out["text_ids"][text_missing], d_ids.expand(int(text_missing.sum()), -1))
    assert torch.equal(out["text_ids"][~text_missing], batch["text_ids"][~text_missing])
    dm.setup("test")
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["item_index"].tolist() == [0, 1, 2, 3]  # not shuffled


def test_clip_batches(arrow_root, data_config):
    cfg = data_config("food101", arrow_root("food101"), None, backbone="clip", image_size=224)
    dm = datamodule_of(cfg)
    dm.setup("validate")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    _check_batch(batch, "food101", 77, 4)
    assert batch["image"].shape == (4, 3, 224, 224)
    assert torch.equal(batch["text_masks"], (batch["text_ids"] != 0).long())
    assert dm.dummy_text()[0][0, :3].tolist() == [49406, 49407, 0]


def _dataset_side_batch(ds: ArrowMultimodalDataset, collator: Collator, types: list[int]) -> dict:
    """Reference behaviour (docs/methods.md §1.4): replace the item's image by ones / its text by '' before collation."""
    items = []
    for idx, mtype in enumerate(types):
        item = dict(ds[idx])
        if mtype == 2:
            item["image"] = torch.ones_like(item["image"])
        if mtype == 1:
            item["text"] = ""
        items.append(item)
    return collator(items)


@pytest.mark.parametrize("backbone,image_size", [("vilt", 64), ("clip", 224)])
def test_device_dummies_equal_dataset_dummies(backbone, image_size, arrow_root, bert_vocab_dir, data_config):
    cfg = data_config("mmimdb", arrow_root("mmimdb"), bert_vocab_dir, backbone=backbone, image_size=image_size)
    dm = datamodule_of(cfg)
    ds = ArrowMultimodalDataset(cfg["data_root"], "mmimdb", "train", build_transform(typed(cfg).pipeline))
    types = [0, 2, 1, 2, 1, 0]
    batch = dm.collator([ds[i] for i in range(len(types))])
    device_side = dm.on_after_batch_transfer({**batch, "missing_type": torch.tensor(types)}, 0)
    reference = _dataset_side_batch(ds, dm.collator, types)
    for key in ("image", "image_sizes", "text_ids", "text_masks", "label"):
        assert torch.equal(device_side[key], reference[key]), key
    if backbone == "vilt":
        assert len(set(map(tuple, batch["image_sizes"].tolist()))) > 1  # padding really exercised


def test_mmimdb_items_per_plot_and_per_movie(arrow_root, bert_vocab_dir, data_config):
    root = arrow_root("mmimdb", mmimdb_plots=(3, 1, 2, 1, 1, 2))
    tf = build_transform(typed(data_config("mmimdb", root)).pipeline)
    per_plot = ArrowMultimodalDataset(root, "mmimdb", "train", tf)
    per_movie = ArrowMultimodalDataset(root, "mmimdb", "train", tf, mmimdb_items="movie")
    assert per_plot.item_rows.tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 5, 5]
    assert per_movie.item_rows.tolist() == [0, 1, 2, 3, 4, 5]
    plots = pa.ipc.open_file(str(root / "mmimdb_train.arrow")).read_all().column("plots").to_pylist()
    assert [per_plot[i]["text"] for i in range(3)] == plots[0]
    assert per_movie[2]["text"] == plots[2][0] and per_movie[2]["item_index"] == 2
    assert torch.equal(per_plot[4]["label"], per_plot[5]["label"])


def test_missing_arrow_file_error(tmp_path, data_config):
    with pytest.raises(FileNotFoundError, match="make_arrow.py --dataset food101"):
        ArrowMultimodalDataset(tmp_path, "food101", "train", build_transform(typed(data_config("food101", tmp_path)).pipeline))


def test_corrupt_image_names_row(tmp_path, data_config):
    cols = make_rows("food101", "train", 3)
    cols["image"][1] = b"\xff\xd8garbage"
    write_arrow(tmp_path / "food101_train.arrow", _SCHEMAS["food101"], cols)
    ds = ArrowMultimodalDataset(tmp_path, "food101", "train", build_transform(typed(data_config("food101", tmp_path)).pipeline))
    assert ds[0]["image"].shape[0] == 3
    with pytest.raises(ValueError, match="row 1 .*apple_pie_1.jpg"):
        ds[1]


def test_tables_overrides_and_sweep_tables(arrow_root, bert_vocab_dir, data_config):
    root = arrow_root("hatememes")
    cfg = data_config("hatememes", root, bert_vocab_dir, test_ratio=1.0, test_type="image")
    before = copy.deepcopy(cfg)
    dm = datamodule_of(cfg)
    assert cfg == before
    dm.setup("test")
    assert dm.specs["test"] == MissingSpec("image", 1.0, 0.5, 0)
    assert dm.missing_table("test").tolist() == [2, 2, 2, 2]
    sweep = MissingSpec("text", 0.5, 0.5, 0)
    table = dm.missing_table("train", sweep)  # split not set up: row count read from the arrow file
    assert torch.equal(table, make_missing_table(6, sweep, "hatememes", "train"))
    assert (root / "missing_tables" / "hatememes_train_missing_text_r0.50_b0.50_s0.pt").is_file()


def test_simulate_missing_on_training_batches(arrow_root, bert_vocab_dir, data_config):
    cfg = data_config("food101", arrow_root("food101"), bert_vocab_dir, simulate_missing=True,
                      missing_ratio={"train": 0.0, "val": 0.0, "test": 0.0})
    dm = datamodule_of(cfg)
    batch = dm.collator([dm.build_dataset("train")[i] for i in range(6)])
    assert batch["missing_type"].tolist() == [0] * 6
    dm.trainer = SimpleNamespace(training=False, current_epoch=0)
    assert dm.on_after_batch_transfer(batch, 0)["missing_type"].tolist() == [0] * 6  # evaluation: untouched
    dm.trainer = SimpleNamespace(training=True, current_epoch=0)
    sims = [dm.on_after_batch_transfer(batch, 0)["missing_type"] for _ in range(2)]
    assert torch.equal(sims[0], sims[1])
    epochs = {tuple(dm.batch_missing_types(batch, True, e).tolist()) for e in range(6)}
    assert len(epochs) > 1 and all(set(e) <= {0, 1, 2} for e in epochs)


def test_worker_loader(arrow_root, bert_vocab_dir, data_config):
    cfg = data_config("hatememes", arrow_root("hatememes"), bert_vocab_dir, num_workers=1, per_gpu_batchsize=3)
    dm = datamodule_of(cfg)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["item_index"].tolist() for b in batches] == [[0, 1, 2], [3]]


def test_lightning_applies_hook_in_training(arrow_root, bert_vocab_dir, data_config):
    """Lightning calls the DataModule's on_after_batch_transfer: the model sees dummies and simulated types."""
    import pytorch_lightning as pl

    seen: list[dict] = []

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append(batch)
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    cfg = data_config("food101", arrow_root("food101"), bert_vocab_dir, per_gpu_batchsize=6, simulate_missing=True,
                      missing_ratio={"train": 0.5, "val": 0.5, "test": 0.5}, missing_type={"train": "text",
                      "val": "text", "test": "text"})
    dm = datamodule_of(cfg)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen) == 2
    for epoch, batch in enumerate(seen):
        table = dm.datasets["train"].missing_table[batch["row_index"]]
        expected = dm.batch_missing_types({"missing_type": table, "item_index": batch["item_index"]}, True, epoch)
        assert torch.equal(batch["missing_type"], expected)
        text_missing = batch["missing_type"] == 1
        assert torch.equal(batch["text_ids"][text_missing],
                           dm.dummy_text()[0].expand(int(text_missing.sum()), -1))


def test_missing_override_for_sweeps(arrow_root, bert_vocab_dir, data_config):
    cfg = data_config("food101", arrow_root("food101"), bert_vocab_dir)
    dm = datamodule_of(cfg)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    dm.trainer = SimpleNamespace(training=False, testing=True, current_epoch=0)
    dm.set_missing_override("test", MissingSpec("image", 1.0))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["missing_type"].tolist() == [2, 2, 2, 2]
    h, w = out["image"].shape[2:]
    rows = torch.arange(h)[None, :] < batch["image_sizes"][:, 0:1]
    cols = torch.arange(w)[None, :] < batch["image_sizes"][:, 1:2]
    expected = (rows[:, None, :, None] & cols[:, None, None, :]).float().expand_as(out["image"])
    assert torch.equal(out["image"], expected)  # ones in the valid region, zero padding
    dm.set_missing_override("test", None)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)["missing_type"], batch["missing_type"])
