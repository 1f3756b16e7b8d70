"""The run directory is made when the run starts (global rank 0, mdpl.engine.trainer.RunDirectory), and a run that
fails before its first training step still leaves no directory behind."""
from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import run as run_script
from test_engine import QUIET, StubClassifier, StubDataModule, StubDataset, make_config


class BrokenTrainSet(StubDataset):
    def __getitem__(self, i: int) -> dict:
        raise OSError("unreadable training item")


class BrokenTrainData(StubDataModule):
    """Validation works (the sanity check passes, so the run directory exists), the first training batch fails."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(BrokenTrainSet(64, 1), batch_size=self.batch)


def test_failure_before_the_first_step_leaves_no_run_directory(tmp_path) -> None:
    from mdpl.engine import session

    made, new_run_dir = [], session.new_run_dir

    def recorded(cfg, resume_path=None):   # the directory the run made, recorded before the run goes on
        path, created = new_run_dir(cfg, resume_path)
        made.append(path)
        return path, created

    config = make_config(tmp_path, max_epoch=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "new_run_dir", recorded)
        with pytest.raises(OSError, match="unreadable training item"):
            run_script.run(config, datamodule=BrokenTrainData(), model=StubClassifier(), **QUIET)
    assert made == [tmp_path / "result" / "stub_seed0_from_scratch" / "version_0"]   # it was made, then removed
    assert not (tmp_path / "result" / "stub_seed0_from_scratch").exists()


def test_next_free_version_and_fixed_directory(tmp_path) -> None:
    config = make_config(tmp_path, max_epoch=1)
    base = Path(config["log_dir"]) / "stub_seed0_from_scratch"
    (base / "version_0").mkdir(parents=True)          # e.g. a run started a moment earlier
    out = run_script.run(config, datamodule=StubDataModule(), model=StubClassifier(), **QUIET)
    assert Path(out["run_dir"]) == base / "version_1" and out["global_rank"] == 0
    assert (base / "version_1" / "checkpoints" / "last.ckpt").is_file() and not any((base / "version_0").iterdir())
