"""Missing tables, simulation, overrides and device-side dummies (docs/methods.md §1.4, D-11..D-15)."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from mdpl.data.settings import MissingConfig
from mdpl.data.missing import (MissingSpec, apply_missing, import_reference_table, load_or_create_missing_table,
                               make_missing_table, missing_counts, missing_specs, missing_table_path,
                               reference_table_name, simulated_types, table_sha256)
from mdpl.errors import UserInputError


@pytest.mark.parametrize("n_rows", [10, 97, 1000])
@pytest.mark.parametrize("mtype", ["text", "image", "both"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 1.0])
def test_exact_counts(n_rows, mtype, ratio):
    table = make_missing_table(n_rows, MissingSpec(mtype, ratio, 0.5, 0), "mmimdb", "train")
    assert table.dtype == torch.long and table.shape == (n_rows,)
    n_missing = round(n_rows * ratio)
    n_text, n_image = int((table == 1).sum()), int((table == 2).sum())
    assert n_text + n_image == n_missing and int((table == 0).sum()) == n_rows - n_missing
    if mtype == "text":
        assert n_image == 0
    elif mtype == "image":
        assert n_text == 0
    else:
        assert n_image == round(n_missing * 0.5)
    assert (n_text, n_image) == missing_counts(n_rows, MissingSpec(mtype, ratio))


def test_both_ratio_shares():
    table = make_missing_table(1000, MissingSpec("both", 0.7, 0.2, 3), "food101", "test")
    assert int((table == 2).sum()) == 140 and int((table == 1).sum()) == 560


def test_deterministic_and_parameter_dependent():
    spec = MissingSpec("both", 0.7, 0.5, 0)
    a = make_missing_table(500, spec, "mmimdb", "train")
    assert torch.equal(a, make_missing_table(500, spec, "mmimdb", "train"))
    for other in [(MissingSpec("both", 0.7, 0.5, 1), "mmimdb", "train"),
                  (spec, "mmimdb", "val"), (spec, "food101", "train"),
                  (MissingSpec("both", 0.7, 0.4, 0), "mmimdb", "train")]:
        assert not torch.equal(a, make_missing_table(500, *other))


def test_no_global_rng_consumed(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    states = (random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy())
    make_missing_table(100, MissingSpec("both", 0.7), "mmimdb", "train")
    load_or_create_missing_table(tmp_path, "mmimdb_train", 100, MissingSpec("image", 0.5), "mmimdb", "train")
    simulated_types(torch.zeros(8, dtype=torch.long), 3, 0, torch.arange(8))
    assert random.getstate() == states[0]
    assert torch.equal(torch.get_rng_state(), states[1])
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_independent_of_construction_order():
    spec_a, spec_b = MissingSpec("text", 0.3), MissingSpec("image", 0.6)
    first = make_missing_table(50, spec_a, "hatememes", "test")
    make_missing_table(80, spec_b, "hatememes", "train")
    assert torch.equal(first, make_missing_table(50, spec_a, "hatememes", "test"))


def test_file_name_encodes_parameters(tmp_path):
    base = MissingSpec("both", 0.7, 0.5, 0)
    path = missing_table_path(tmp_path, "mmimdb_train", base)
    assert path.name == "mmimdb_train_missing_both_r0.70_b0.50_s0.pt"
    others = [MissingSpec("text", 0.7, 0.5, 0), MissingSpec("both", 0.6, 0.5, 0), MissingSpec("both", 0.7, 0.4, 0),
              MissingSpec("both", 0.7, 0.5, 1), MissingSpec("both", 0.705, 0.5, 0)]
    names = {missing_table_path(tmp_path, "mmimdb_train", s).name for s in others}
    assert len(names) == len(others) and path.name not in names


def test_cache_roundtrip_and_payload(tmp_path):
    spec = MissingSpec("both", 0.7, 0.5, 0)
    table = load_or_create_missing_table(tmp_path, "food101_val", 40, spec, "food101", "val")
    path = missing_table_path(tmp_path, "food101_val", spec)
    payload = torch.load(path, weights_only=True)
    assert payload["n_rows"] == 40 and payload["spec"] == spec.to_dict() and "version" in payload
    assert torch.equal(payload["table"], table) and payload["sha256"] == table_sha256(table)
    assert not list(tmp_path.glob("*.tmp"))
    # a valid cached file is loaded (another valid table with its own hash proves it is read, not regenerated)
    flipped = table.flip(0)
    assert not torch.equal(flipped, table)
    torch.save({**payload, "table": flipped, "sha256": table_sha256(flipped)}, path)
    loaded = load_or_create_missing_table(tmp_path, "food101_val", 40, spec, "food101", "val")
    assert torch.equal(loaded, flipped)


def _refusal(tmp_path, spec, n_rows=20, stem="mmimdb_test", dataset="mmimdb", split="test") -> str:
    """The one-line error of loading the cached table; the file must be left as it was."""
    path = missing_table_path(tmp_path, stem, spec)
    before = path.read_bytes()
    with pytest.raises(UserInputError) as err:
        load_or_create_missing_table(tmp_path, stem, n_rows, spec, dataset, split)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "delete the file to regenerate" in msg and "fix the config" in msg
    assert path.read_bytes() == before
    return msg


def _save_table(tmp_path, spec, table, overrides=None, stem="mmimdb_test"):
    """Save a payload as the writer does (20 rows of mmimdb test), with some fields overridden."""
    payload = {"table": table, "n_rows": 20, "spec": spec.to_dict(), "version": 1, "dataset": "mmimdb",
               "split": "test", "sha256": table_sha256(table), **(overrides or {})}
    torch.save(payload, missing_table_path(tmp_path, stem, spec))
    return payload


def test_length_mismatch_is_refused_not_regenerated(tmp_path):
    spec = MissingSpec("text", 0.5)
    load_or_create_missing_table(tmp_path, "hatememes_dev", 30, spec, "hatememes", "val")
    msg = _refusal(tmp_path, spec, 31, "hatememes_dev", "hatememes", "val")
    assert "30 rows but the arrow split has 31" in msg


def test_spec_mismatch_and_garbage_are_refused(tmp_path):
    spec = MissingSpec("image", 0.5, 0.5, 0)
    table = make_missing_table(20, spec, "mmimdb", "test")
    _save_table(tmp_path, spec, table, {"spec": {**spec.to_dict(), "seed": 9}})
    assert "'seed': 9" in _refusal(tmp_path, spec)
    missing_table_path(tmp_path, "mmimdb_test", spec).write_bytes(b"not a torch file")
    assert "cannot be read" in _refusal(tmp_path, spec)
    torch.save(table, missing_table_path(tmp_path, "mmimdb_test", spec))  # a bare tensor (reference format)
    assert "not an mdpl missing-table file" in _refusal(tmp_path, spec)


def test_values_outside_type_codes_are_refused(tmp_path):
    spec = MissingSpec("image", 0.5)
    table = make_missing_table(20, spec, "mmimdb", "test")
    table[table == 0] = 3
    _save_table(tmp_path, spec, table)
    assert "values [3] outside the type codes" in _refusal(tmp_path, spec)


def test_counts_that_do_not_match_ratio_and_type_are_refused(tmp_path):
    spec = MissingSpec("both", 0.5, 0.5)                 # 20 rows: 5 text-missing, 5 image-missing
    table = make_missing_table(20, spec, "mmimdb", "test")
    table[table == 2] = 1                                # still valid codes, but 10 text / 0 image
    _save_table(tmp_path, spec, table)
    msg = _refusal(tmp_path, spec)
    assert "10 text-missing and 0 image-missing rows" in msg and "means 5 and 5" in msg


def test_content_hash_mismatch_is_refused(tmp_path):
    spec = MissingSpec("text", 0.5)
    table = make_missing_table(20, spec, "mmimdb", "test")
    payload = _save_table(tmp_path, spec, table)
    swapped = table.clone()
    one, zero = int((table == 1).nonzero()[0]), int((table == 0).nonzero()[0])
    swapped[one], swapped[zero] = 0, 1                   # same counts, other rows
    torch.save({**payload, "table": swapped}, missing_table_path(tmp_path, "mmimdb_test", spec))
    assert "content hash differs" in _refusal(tmp_path, spec)


def test_table_without_hash_is_accepted_only_if_valid(tmp_path):
    spec = MissingSpec("both", 0.5, 0.5)
    table = make_missing_table(20, spec, "mmimdb", "test").flip(0)
    payload = _save_table(tmp_path, spec, table)
    del payload["sha256"]                                # a file written before the hash existed
    torch.save(payload, missing_table_path(tmp_path, "mmimdb_test", spec))
    assert torch.equal(load_or_create_missing_table(tmp_path, "mmimdb_test", 20, spec, "mmimdb", "test"), table)
    zeros = torch.zeros(20, dtype=torch.long)
    torch.save({**payload, "table": zeros}, missing_table_path(tmp_path, "mmimdb_test", spec))
    assert "0 text-missing and 0 image-missing rows" in _refusal(tmp_path, spec)


def test_ratio_zero_writes_nothing(tmp_path):
    table = load_or_create_missing_table(tmp_path, "mmimdb_train", 12, MissingSpec("both", 0.0), "mmimdb", "train")
    assert torch.equal(table, torch.zeros(12, dtype=torch.long)) and not list(tmp_path.iterdir())


def test_only_local_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    spec = MissingSpec("text", 0.5)
    table = load_or_create_missing_table(tmp_path, "mmimdb_train", 12, spec, "mmimdb", "train")
    assert int((table == 1).sum()) == 6 and not list(tmp_path.iterdir())


def test_import_reference_table(tmp_path):
    ref = torch.tensor([0.0, 1.0, 2.0, 0.0, 2.0])
    torch.save(ref, tmp_path / reference_table_name("mmimdb_train", "both", 0.7))
    assert reference_table_name("mmimdb_train", "both", 0.7) == "mmimdb_train_missing_both_07.pt"
    assert reference_table_name("food101_val", "text", 1.0) == "food101_val_missing_text_10.pt"
    table = import_reference_table(tmp_path / "mmimdb_train_missing_both_07.pt")
    assert table.dtype == torch.long and table.tolist() == [0, 1, 2, 0, 2]
    torch.save(torch.tensor([0.0, 3.0]), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="0, 1 or 2"):
        import_reference_table(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        import_reference_table(tmp_path / "absent.pt")


def test_overrides_apply_to_copies():
    config = {"missing_ratio": {"train": 0.7, "val": 0.7, "test": 0.7},
              "missing_type": {"train": "both", "val": "both", "test": "both"},
              "both_ratio": 0.5, "seed": 4, "test_ratio": 0.3, "test_type": "image"}
    before = copy.deepcopy(config)
    specs = missing_specs(MissingConfig.from_flat(config), config["seed"])
    assert config == before
    assert specs["train"] == MissingSpec("both", 0.7, 0.5, 4)
    assert specs["val"] == specs["test"] == MissingSpec("image", 0.3, 0.5, 4)
    with pytest.raises(ValueError, match="missing type"):
        missing_specs(MissingConfig.from_flat({**config, "test_type": "audio"}), 4)


def test_simulated_types():
    n = 3000
    table = torch.zeros(n, dtype=torch.long)
    table[:300] = 1
    table[300:600] = 2
    items = torch.arange(n)
    e0 = simulated_types(table, epoch=0, seed=0, item_index=items)
    assert torch.equal(e0[:600], table[:600])
    counts = torch.bincount(e0[600:], minlength=3)
    assert all(abs(int(c) - 800) < 100 for c in counts)
    assert torch.equal(e0, simulated_types(table, 0, 0, items))
    assert not torch.equal(e0, simulated_types(table, 1, 0, items))
    assert not torch.equal(e0, simulated_types(table, 0, 1, items))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64]  # batch composition irrelevant
    assert torch.equal(simulated_types(table[perm], 0, 0, perm), e0[perm])


def test_apply_missing_regions_and_no_mutation():
    image = torch.randn(3, 3, 6, 8)
    sizes = torch.tensor([[6, 8], [4, 5], [2, 3]])
    image[1, :, 4:, :] = 0
    image[1, :, :, 5:] = 0
    ids = torch.arange(30).reshape(3, 10)
    masks = torch.ones(3, 10, dtype=torch.long)
    batch = {"image": image, "image_sizes": sizes, "text_ids": ids, "text_masks": masks, "label": torch.zeros(3)}
    snapshot = {k: v.clone() for k, v in batch.items()}
    d_ids, d_masks = torch.tensor([[2, 3] + [0] * 8]), torch.tensor([[1, 1] + [0] * 8])
    out = apply_missing(batch, torch.tensor([0, 2, 1]), d_ids, d_masks)
    for k, v in snapshot.items():
        assert torch.equal(batch[k], v)
    assert out is not batch and out["label"] is batch["label"]
    assert torch.equal(out["image"][0], image[0]) and torch.equal(out["image"][2], image[2])
    assert torch.equal(out["image"][1, :, :4, :5], torch.ones(3, 4, 5))
    assert float(out["image"][1, :, 4:].abs().sum() + out["image"][1, :, :, 5:].abs().sum()) == 0.0
    assert torch.equal(out["text_ids"][2], d_ids[0]) and torch.equal(out["text_masks"][2], d_masks[0])
    assert torch.equal(out["text_ids"][:2], ids[:2])
    assert out["missing_type"].dtype == torch.long and out["missing_type"].tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="length"):
        apply_missing(batch, torch.zeros(3), d_ids[:, :5], d_masks[:, :5])
