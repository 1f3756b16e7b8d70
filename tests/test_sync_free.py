"""DCP's row skipping without a device sync: the batch carries its missing types as a host tuple
(``missing_type_host``), set where the types are decided (the DataModule's host hook, the evaluation sweep,
``apply_missing`` on CPU tensors), and the classifier reads the kept-row count from it instead of ``nonzero``.

A device sync shows up as an aten op whose result size or value the host must read (``nonzero``,
``_local_scalar_dense`` behind ``bool()`` / ``.item()``); the tests count those ops during a forward.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mdpl.data.missing import MissingSpec, apply_missing
from mdpl.engine.sweep import MissingSweep

from tiny_models import TYPES, tiny_batch, tiny_model
from runs import datamodule_of

SYNC_OPS = ("nonzero", "_local_scalar_dense", "is_nonzero", "item")


class SyncOps(TorchDispatchMode):
    """Counts the aten ops that make the host wait for a device result."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _forward(model, batch) -> tuple[torch.Tensor, list[str]]:
    with torch.no_grad(), SyncOps() as ops:
        logits = model(batch)["logits"]
    return logits, ops.seen


def _dummies() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, :2] = torch.tensor([998, 999])
    return ids, (ids != 0).long()


def _clip_batch(types: torch.Tensor) -> dict:
    batch = {**tiny_batch("clip"), "missing_type": types}
    ids, masks = _dummies()
    batch["text_masks"] = (batch["text_ids"] != 0).long()
    batch["text_len_host"] = int(batch["text_masks"].sum(dim=1).max())   # as the collator (no sync either)
    return apply_missing(batch, types, ids, masks)


def test_apply_missing_keeps_a_host_copy_that_matches_the_types():
    batch = _clip_batch(TYPES)
    assert batch["missing_type_host"] == tuple(TYPES.tolist())
    ids, masks = _dummies()
    again = apply_missing(batch, torch.tensor([1, 1, 1, 0, 0, 0]), ids, masks)   # the old host copy is replaced
    assert again["missing_type_host"] == (1, 1, 1, 0, 0, 0)
    explicit = apply_missing(batch, TYPES, ids, masks, missing_type_host=[2, 2, 2, 2, 2, 2])
    assert explicit["missing_type_host"] == (2, 2, 2, 2, 2, 2)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    # types on a device and no host copy given: the stale copy is dropped, never carried along
    assert "missing_type_host" not in apply_missing(meta, TYPES.to("meta"), ids, masks)


def test_dcp_skips_rows_without_a_sync_and_gives_the_same_logits():
    model = tiny_model("dcp", "clip").eval()
    for types in (TYPES, torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([2, 2, 2, 2, 2, 2]),
                  torch.tensor([1, 0, 1, 0, 1, 1])):
        batch = _clip_batch(types)
        with_host, ops_host = _forward(model, batch)
        without = {k: v for k, v in batch.items() if k != "missing_type_host"}
        reference, ops_sync = _forward(model, without)
        assert ops_host == [], (types.tolist(), ops_host)
        if bool((types != 0).any()):   # the fallback path syncs: the probe sees it
            assert "nonzero" in ops_sync or "_local_scalar_dense" in ops_sync
        torch.testing.assert_close(with_host, reference, rtol=0, atol=0)
        unskipped = tiny_model("dcp", "clip", dcp_skip_missing=False).eval()
        torch.testing.assert_close(_forward(unskipped, batch)[0], reference, rtol=1e-5, atol=1e-6)


def test_sweep_passes_host_types_that_match_each_scenario():
    tables = [torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]), torch.tensor([2, 2, 2, 2, 2, 2, 2, 2])]
    specs = [MissingSpec("both", 0.7, 0.5, 0), MissingSpec("image", 1.0, 0.5, 0)]
    ids, masks = _dummies()
    sweep = MissingSweep("food101", specs, tables, ids, masks)
    seen = []

    def model(batch):
        seen.append(batch)
        return {"logits": torch.zeros(batch["image"].shape[0], 101)}

    rows = torch.tensor([5, 0, 3, 2, 7, 1])
    batch = {**tiny_batch("clip"), "row_index": rows, "row_index_host": tuple(rows.tolist()),
             "label": torch.zeros(6, dtype=torch.long)}
    batch["text_masks"] = (batch["text_ids"] != 0).long()
    sweep.step(model, batch)
    for table, scenario in zip(tables, seen):
        assert scenario["missing_type"].tolist() == table[rows].tolist()
        assert scenario["missing_type_host"] == tuple(table[rows].tolist())


def test_datamodule_resolves_types_once_on_the_host(arrow_root, bert_vocab_dir, data_config):
    """The host hook decides the types (simulation included) once; the device hook keeps them and the host copy."""
    from mdpl.data.datamodule import MDPLDataModule

    cfg = data_config("food101", arrow_root("food101"), bert_vocab_dir, simulate_missing=True,
                      missing_ratio={"train": 0.5, "val": 0.5, "test": 0.5})
    dm = datamodule_of(cfg)
    batch = dm.collator([dm.build_dataset("train")[i] for i in range(6)])
    for epoch in range(3):
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch)
        expected = dm.batch_missing_types(batch, True, epoch, "train")
        host = dm.on_before_batch_transfer(batch, 0)
        out = dm.on_after_batch_transfer(host, 0)
        assert torch.equal(out["missing_type"], expected)                       # simulated once, not twice
        assert out["missing_type_host"] == tuple(expected.tolist())
        assert out["row_index_host"] == tuple(batch["row_index"].tolist())
        assert torch.equal(dm.on_after_batch_transfer(batch, 0)["missing_type"], expected)   # device-only path
