"""Checkpoints written by the reference code itself, evaluated with ``run.py ... test_only=True``.

``tests/fixtures/ref_ckpt_{map,memprompt,dcp}.pt`` come from ``tools/parity/make_reference_checkpoints.py``: the
MAP and MemPrompt LightningModules trained for two steps by a Lightning Trainer and saved by it (the file's bytes),
and the DCP module's state-dict layout (``model.prompt_learner.*``, dynamic queries on block 0 of each tower) with
hashed values plus the ``dcp_dynamic_queries`` side file the reference never writes; each with the reference
module's logits on the synthetic test split. For each method this test

* evaluates the file in a fresh ``python run.py with ... test_only=True`` process and checks its metrics equal those
  of the same weights evaluated in this process;
* checks mdpl's logits on the test split equal the reference module's (atol 1e-5), and the accuracy run.py reports
  is the reference logits' accuracy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import run as run_script
from dcp_hashinit import hashed_tensor
from runs import datamodule_of, resolved_config, run_quiet, synthetic_arrows

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
LOGITS_ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def load_fixture(method: str) -> dict[str, Any]:
    path = FIXTURES / f"ref_ckpt_{method}.pt"
    assert path.is_file(), f"{path.name} is missing: regenerate it (tests/fixtures/README.md, tools/parity/)"
    return torch.load(path, map_location="cpu", weights_only=True)


def write_checkpoint(fixture: dict[str, Any], folder: Path) -> dict[str, str]:
    """The reference checkpoint as a file (and DCP's queries side file); the config keys that point at them."""
    path = folder / "reference.ckpt"
    if "checkpoint_bytes" in fixture:
        path.write_bytes(fixture["checkpoint_bytes"].numpy().tobytes())
        return {"load_path": str(path)}
    state = {k: hashed_tensor(k, shape) for k, shape in fixture["state_shapes"].items()}
    torch.save({"epoch": 0, "global_step": 0, "state_dict": state, "hyper_parameters": fixture["hyper_parameters"]},
               path)
    queries = folder / "dynamic_queries.pt"
    torch.save(fixture["dynamic_queries"], queries)
    return {"load_path": str(path), "dcp_dynamic_queries": str(queries)}


def nested(updates: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (``missing_ratio.test``) as nested dicts for Sacred's config_updates."""
    out: dict[str, Any] = {}
    for key, value in updates.items():
        outer, _, inner = key.partition(".")
        if inner:
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module", params=["map", "memprompt", "dcp"])
def case(request, tmp_path_factory) -> dict[str, Any]:
    method = request.param
    fixture = load_fixture(method)
    folder = tmp_path_factory.mktemp(f"refckpt_{method}")
    data = fixture["data"]
    paths = synthetic_arrows(folder / "data", data["dataset"], data["n_train"], data["n_val"], data["n_test"])
    files = write_checkpoint(fixture, folder)
    updates = {"data_root": str(paths["arrow"]), "tokenizer": str(paths["tok"]), "vocab_size": paths["vocab_size"],
               "test_only": True, **files, **fixture["updates"]}
    named = [f"task_finetune_{data['dataset']}", method, "tiny"]
    return {"method": method, "fixture": fixture, "folder": folder, "named": named, "updates": updates}


def config_of(case: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    return resolved_config(case["named"], nested({**case["updates"], "log_dir": str(log_dir)}))


def cli_metrics(case: dict[str, Any]) -> dict[str, float]:
    """Test metrics of ``python run.py with ... test_only=True`` in a fresh process."""
    log_dir = case["folder"] / "cli"
    args = [f"{k}={v!r}" for k, v in {**case["updates"], "log_dir": str(log_dir)}.items()]
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}
    out = subprocess.run([sys.executable, "run.py", "with", *case["named"], *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = list(log_dir.rglob("test_metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())["metrics"]


def test_run_py_test_only_equals_in_process_evaluation(case) -> None:
    cli = cli_metrics(case)
    own = run_quiet(config_of(case, case["folder"] / "in_process"))["test"]
    head = case["fixture"]["data"]["dataset"]
    assert set(cli) == set(own) >= {"test/the_metric", f"{head}/test/accuracy", f"{head}/test/loss"}
    for key, value in own.items():
        assert cli[key] == pytest.approx(value, abs=1e-6), key
    # the accuracy the reference module's own logits give on the same rows
    labels = torch.cat([b["label"] for b in split_batches(config_of(case, case["folder"] / "batches"))])
    reference = case["fixture"]["test_logits"]
    accuracy = (reference.argmax(-1) == labels).double().mean().item()
    assert cli[f"{head}/test/accuracy"] == pytest.approx(accuracy, abs=1e-6)   # a float32 metric


def test_logits_equal_the_reference_modules(case) -> None:
    cfg = config_of(case, case["folder"] / "logits")
    module = run_script.build_test_module(cfg).eval()
    with torch.no_grad():
        logits = torch.cat([module.model(b)["logits"] for b in split_batches(cfg)])
    reference = case["fixture"]["test_logits"]
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= LOGITS_ATOL


def test_checkpoint_has_the_reference_layout(case) -> None:
    """The names the reference code uses, not mdpl's (and no dynamic queries in DCP's state dict)."""
    fixture = case["fixture"]
    if "checkpoint_bytes" in fixture:
        ckpt = torch.load(case["updates"]["load_path"], map_location="cpu", weights_only=False)
        keys = set(ckpt["state_dict"])
        assert "hyper_parameters" in ckpt and "optimizer_states" in ckpt
        assert {"text_embeddings.word_embeddings.weight", "transformer.blocks.0.attn.qkv.weight",
                "pooler.dense.weight"} <= keys
        assert ("complete_prompt" in keys) == (case["method"] == "map")
        assert any(k.startswith("gen_t_prompt_memory.") for k in keys) == (case["method"] == "memprompt")
    else:
        keys = set(fixture["state_shapes"])
        assert any(k.startswith("model.prompt_learner.") for k in keys)
        assert not any("prompts_dynamic" in k for k in keys)
        assert sorted(fixture["dynamic_queries"]) == sorted(
            f"model.{t}_encoder.transformer.resblocks.0.prompts_dynamic_{n}"
            for t in ("image", "text") for n in ("complete", "image", "text"))
    assert not any(k.startswith(("backbone.", "prompt.")) for k in keys)


def split_batches(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The test split as the model receives it (missing types resolved, dummies applied), in loader order."""
    from mdpl.data.datamodule import MDPLDataModule
    dm = datamodule_of(cfg)
    dm.setup("test")
    return [dm.on_after_batch_transfer(dm.on_before_batch_transfer(b, 0), 0) for b in dm.test_dataloader()]


