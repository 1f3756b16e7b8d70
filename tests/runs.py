"""Helpers shared by the tests that train through ``run.py``: quiet runs and resolved Sacred configs."""
from __future__ import annotations

import warnings
from typing import Iterable

import run as run_script

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
"""Trainer options that keep test output short."""


def typed(flat: dict):
    """The run config (``mdpl.config.RunConfig``) of a flat test config: what the package's functions take."""
    from mdpl.config import RunConfig
    return RunConfig.coerce(flat)


def datamodule_of(flat: dict):
    """The data module of a flat test config (``mdpl.engine.session.build_datamodule``)."""
    from mdpl.engine.session import build_datamodule
    return build_datamodule(typed(flat))


def as_run(flat: dict, backbone: str):
    """The run config (``mdpl.config.RunConfig``) of a flat test config on `backbone`: what a backbone builder takes."""
    from mdpl.config import RunConfig
    return RunConfig.coerce({**flat, "backbone": backbone})


def resolved_config(named: Iterable[str], updates: dict) -> dict:
    """The Sacred config of ``config.py`` with the named configs and updates applied (``print_config``)."""
    from config import ex
    return dict(ex.run("print_config", named_configs=list(named), config_updates=updates).config)


def run_quiet(config: dict, **overrides) -> dict:
    """``run.run(config)`` without progress bars, model summary or warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_script.run(config, **QUIET, **overrides)


def synthetic_arrows(root, dataset: str, n_train: int, n_val: int, n_test: int) -> dict:
    """A synthetic ``dataset`` written in its raw layout and converted with make_arrow, plus a tiny BERT vocabulary
    under ``root``: ``{"arrow", "tok", "vocab_size"}`` (the config keys data_root, tokenizer, vocab_size)."""
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
    from mdpl.data.writers import make_arrow

    write_synthetic(dataset, root / "raw", n_train, n_val, n_test, seed=0)
    make_arrow(dataset, root / "raw", root / "arrow", progress=False)
    vocab = write_wordpiece_vocab(root / "tok" / "vocab.txt")
    return {"arrow": root / "arrow", "tok": vocab.parent, "vocab_size": len(vocab.read_text().split())}


def assert_same_run(ref, resumed) -> None:
    """Two run directories ended alike: the same final weights (bit for bit), step and LR schedule, and the same best
    checkpoint tested with the same metrics (a resumed run against the uninterrupted one)."""
    import json
    from pathlib import Path

    import torch

    def load(path):
        return torch.load(path, map_location="cpu", weights_only=False)

    ref_last, res_last = load(Path(ref) / "checkpoints" / "last.ckpt"), load(Path(resumed) / "checkpoints" / "last.ckpt")
    assert ref_last["global_step"] == res_last["global_step"]
    assert ref_last["lr_schedulers"] == res_last["lr_schedulers"]
    assert ref_last["state_dict"].keys() == res_last["state_dict"].keys()
    different = [k for k, v in ref_last["state_dict"].items() if not torch.equal(v, res_last["state_dict"][k])]
    assert not different, f"weights differ: {different[:5]}"
    ref_out = json.loads((Path(ref) / "test_metrics.json").read_text())
    res_out = json.loads((Path(resumed) / "test_metrics.json").read_text())
    assert Path(ref_out["checkpoint"]).name == Path(res_out["checkpoint"]).name    # the same "best" epoch
    assert ref_out["metrics"] == res_out["metrics"]


def tiny_run_config(tmp_path, method: str, backbone: str, dataset: str = "hatememes", **updates) -> dict:
    """The `tiny` config of ``method`` on ``backbone`` over a synthetic ``dataset`` of 32 / 16 / 16 items under
    ``tmp_path``, one epoch, logging under ``tmp_path/result``; ``updates`` last."""
    data = synthetic_arrows(tmp_path, dataset, 32, 16, 16)
    return resolved_config([f"task_finetune_{dataset}", method, "tiny"], {
        "backbone": backbone, "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]),
        "vocab_size": data["vocab_size"], "log_dir": str(tmp_path / "result"), "max_epoch": 1, **updates})
