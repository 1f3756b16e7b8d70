"""`reference_missing_tables`: a missing table saved by a reference repo replaces mdpl's seeded one for its split,
checked (one type 0/1/2 per row of the arrow file); a wrong file is one line (docs/methods.md D-12)."""
from __future__ import annotations

import pytest
import torch

from runs import datamodule_of, resolved_config, synthetic_arrows
from mdpl.data.datamodule import MDPLDataModule
from mdpl.errors import UserInputError
from mdpl.config.validate import validate_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("reftables"), "hatememes", 20, 8, 8)


def _config(data: dict, tables: dict) -> dict:
    return resolved_config(["task_finetune_hatememes", "map", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "reference_missing_tables": {"train": "", "val": "", "test": "", **tables}})


def test_reference_table_replaces_the_seeded_one(data, tmp_path) -> None:
    table = torch.tensor([0.0, 1.0, 2.0, 2.0, 1.0, 0.0, 1.0, 2.0])   # the references save float tensors
    torch.save(table, tmp_path / "val.pt")
    config = _config(data, {"val": str(tmp_path / "val.pt")})
    validate_config(config)
    dm = datamodule_of(config)
    dm.setup("validate")
    got = [int(dm.datasets["val"][i]["missing_type"]) for i in range(8)]
    assert got == table.long().tolist()
    seeded = datamodule_of(_config(data, {}))
    seeded.setup("validate")
    assert not torch.equal(seeded.datasets["val"].missing_table, table.long())   # the import changed something


@pytest.mark.parametrize("content,match", [
    (torch.zeros(5), "has 5 entries, the val arrow file has 8 rows"),
    (torch.full((8,), 3.0), "values must be 0, 1 or 2"),
    (torch.zeros(2, 4), "expected a 1-D tensor")])
def test_a_wrong_table_is_one_line(data, tmp_path, content, match) -> None:
    torch.save(content, tmp_path / "bad.pt")
    dm = datamodule_of(_config(data, {"val": str(tmp_path / "bad.pt")}))
    with pytest.raises(UserInputError, match=match) as err:
        dm.setup("validate")
    assert "\n" not in str(err.value)


def test_a_missing_file_is_refused_before_any_work(data, tmp_path) -> None:
    with pytest.raises(UserInputError, match=r"reference_missing_tables.train=.* is not a file"):
        validate_config(_config(data, {"train": str(tmp_path / "nope.pt")}))
