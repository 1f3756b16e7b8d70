"""`test_only` evaluates every weight of the file or nothing (run.build_test_module, engine.module.load_for_test).

A tiny MAP / MemPrompt model is trained (synthetic Food-101, CPU); its weights are written again in the layout of
the original MAP / MemPrompt code (reference key names, the Lightning `state_dict`, their config under
`hyper_parameters.config`; the inverse key mapping is written out here). Evaluated with `test_only`, that file gives
exactly the test metrics of the mdpl checkpoint. Files that cannot be loaded completely are refused with one line:
a ViLT pre-training checkpoint (no trained head), another method's or dataset's checkpoint, a stored config that
changes the model, missing or unexpected tensors.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run as run_script
from runs import resolved_config, run_quiet, synthetic_arrows

REPO = Path(__file__).resolve().parent.parent
# Keys that the references' config shares with mdpl's (same name and meaning).
SHARED = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "max_text_len", "vocab_size",
          "image_size", "drop_rate", "max_image_len", "learning_rate", "weight_decay")
METHOD_SHARED = {"map": ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt"),
                 "memprompt": ("gen_prompt_length", "gen_prompt_layers", "shared_prompt_length",
                               "shared_prompt_layers", "mem_size", "top_k")}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("reference_ckpt_data"), "food101", 32, 8, 9)


def make_config(data: dict, log_dir: Path, method: str, **updates) -> dict:
    updates = {"data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
               "log_dir": str(log_dir), "per_gpu_batchsize": 4, "batch_size": 4, "max_epoch": 1,
               "learning_rate": 5e-2, "deterministic": True, **updates}
    return resolved_config(["task_finetune_food101", method, "tiny"], updates)


def reference_key(key: str) -> str:
    """mdpl `MDPLModule` state-dict key -> the key the original MAP / MemPrompt LightningModule uses."""
    key = key[len("model."):]
    for prefix in ("backbone.", "prompt."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key   # the head: food101_classifier.*


def reference_checkpoint(mdpl_ckpt: dict, config: dict) -> dict:
    """The same weights as the reference code saves them, with its config (only its own keys) and the legacy
    `text_embeddings.position_ids` buffer of old transformers."""
    state = {reference_key(k): v for k, v in mdpl_ckpt["state_dict"].items()}
    state["text_embeddings.position_ids"] = torch.arange(config["max_text_len"])[None]
    method = config["prompt_method"]
    ref_config = {k: config[k] for k in SHARED + METHOD_SHARED[method]}
    ref_config.update(exp_name="finetune_food101", datasets=["Food101"], loss_names={"food101": 1, "mmimdb": 0},
                      bottleneck_dim=8 if method == "memprompt" else 0)   # MemPrompt stores an unused value
    return {"epoch": 0, "global_step": 8, "state_dict": state, "hyper_parameters": {"config": ref_config}}


@pytest.fixture(scope="module", params=["map", "memprompt"])
def trained(request, data, tmp_path_factory) -> dict:
    """A 1-epoch tiny run of the method, its test_only metrics, and the same weights in the reference layout."""
    method, folder = request.param, tmp_path_factory.mktemp(f"trained_{request.param}")
    cfg = make_config(data, folder / "result", method)
    last = Path(run_quiet(cfg)["run_dir"]) / "checkpoints" / "last.ckpt"
    test_cfg = {**cfg, "test_only": True, "load_path": str(last)}
    own = run_quiet(test_cfg)["test"]
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    reference = folder / "reference.ckpt"
    torch.save(reference_checkpoint(ckpt, cfg), reference)
    return {"method": method, "cfg": cfg, "test_cfg": test_cfg, "own": own, "reference": reference,
            "folder": folder}


def data_of(trained: dict) -> dict:
    """The `data` fixture's entries, read back from the trained run's config."""
    cfg = trained["cfg"]
    return {"arrow": cfg["data_root"], "tok": cfg["tokenizer"], "vocab_size": cfg["vocab_size"]}


def save_variant(trained: dict, tmp_path: Path, state_edit=None, config_edit=None) -> str:
    ckpt = torch.load(trained["reference"], map_location="cpu", weights_only=False)
    if state_edit:
        ckpt["state_dict"] = state_edit(dict(ckpt["state_dict"]))
    if config_edit:
        ckpt["hyper_parameters"]["config"] = config_edit(dict(ckpt["hyper_parameters"]["config"]))
    path = tmp_path / "variant.ckpt"
    torch.save(ckpt, path)
    return str(path)


def refusal(trained: dict, load_path: str, **config) -> str:
    """The UserInputError of build_test_module (one line, naming the file)."""
    with pytest.raises(ValueError) as err:
        run_script.build_test_module({**trained["test_cfg"], "load_path": load_path, **config})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot evaluate {load_path}: "), message
    return message


# ------------------------------------------------------------------------------------------- equality
def test_reference_layout_gives_the_same_test_metrics(trained, tmp_path) -> None:
    cfg = {**trained["test_cfg"], "load_path": str(trained["reference"]), "log_dir": str(tmp_path / "result")}
    metrics = run_quiet(cfg)["test"]
    assert set(metrics) == set(trained["own"]) >= {"test/the_metric", "food101/test/accuracy", "food101/test/loss"}
    for key, value in trained["own"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_plain_state_dict_in_reference_layout_loads_every_weight(trained, tmp_path) -> None:
    """Without the Lightning wrapper (no stored config): the same tensors as from the mdpl checkpoint."""
    ckpt = torch.load(trained["reference"], map_location="cpu", weights_only=False)
    torch.save(ckpt["state_dict"], tmp_path / "plain.pt")
    torch.manual_seed(1)
    ours = run_script.build_test_module(trained["test_cfg"]).model.state_dict()
    torch.manual_seed(2)
    theirs = run_script.build_test_module({**trained["test_cfg"], "load_path": str(tmp_path / "plain.pt")})
    theirs = theirs.model.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())


# ------------------------------------------------------------------------------------------- refusals
def test_vilt_pretraining_checkpoint_is_refused(trained, tmp_path) -> None:
    """Backbone + pre-training heads, no classifier: nothing trained to evaluate (no run directory is made)."""
    def pretraining(state: dict) -> dict:
        kept = {k: v for k, v in state.items() if k.startswith(("text_embeddings.", "token_type_embeddings.",
                                                                  "transformer.", "pooler."))}
        return {**kept, "mlm_score.bias": torch.zeros(4), "itm_score.fc.weight": torch.zeros(2, 4)}

    path = save_variant(trained, tmp_path, state_edit=pretraining)
    log_dir = tmp_path / "result"
    with pytest.raises(ValueError, match=r"holds no trained classifier head \(food101_classifier\.\*\): a ViLT "
                                         r"pre-training or backbone-only checkpoint cannot be evaluated"):
        run_quiet({**trained["test_cfg"], "load_path": path, "log_dir": str(log_dir)})
    assert not log_dir.exists()


def test_checkpoint_of_another_method_or_dataset_is_refused(trained, tmp_path) -> None:
    other = "memprompt" if trained["method"] == "map" else "map"
    cfg = make_config(data_of(trained), tmp_path, other)
    with pytest.raises(ValueError, match=rf"holds the prompt modules of {trained['method']}, but prompt_method is "
                                         rf"'{other}'; select the method the checkpoint was trained with"):
        run_script.build_test_module({**cfg, "test_only": True, "load_path": str(trained["reference"])})
    baseline = make_config(data_of(trained), tmp_path, "baseline")
    with pytest.raises(ValueError, match=rf"prompt modules of {trained['method']}, but prompt_method is 'none'"):
        run_script.build_test_module({**baseline, "test_only": True, "load_path": str(trained["reference"])})

    dcp_vilt = make_config(data_of(trained), tmp_path, "dcp", backbone="vilt")
    with pytest.raises(ValueError, match=r"it was not written by mdpl, and 'dcp' on ViLT has no reference code"):
        run_script.build_test_module({**dcp_vilt, "test_only": True, "load_path": str(trained["reference"])})

    def other_head(state: dict) -> dict:
        return {k.replace("food101_classifier", "mmimdb_classifier"): v for k, v in state.items()}

    message = refusal(trained, save_variant(trained, tmp_path, state_edit=other_head))
    assert "it was trained on mmimdb (head mmimdb_classifier), not on dataset='food101'" in message


def test_stored_config_that_changes_the_model_is_refused(trained, tmp_path) -> None:
    key, value = ("prompt_type", "attention") if trained["method"] == "map" else ("top_k", 3)

    def edit(config: dict) -> dict:
        return {**config, key: value, "num_heads": 4}

    message = refusal(trained, save_variant(trained, tmp_path, config_edit=edit))
    assert f"its stored training config disagrees with this config (the model would compute something else): " \
           f"num_heads: checkpoint=4 vs config=2; {key}: checkpoint={value!r} vs config=" in message
    assert message.endswith("; set these keys to the checkpoint's values")


def test_missing_or_unexpected_tensors_are_refused_by_name(trained, tmp_path) -> None:
    def drop(state: dict) -> dict:
        return {k: v for k, v in state.items() if k != "pooler.dense.bias"}

    def extra(state: dict) -> dict:
        return {**state, "food101_classifier.9.weight": torch.zeros(3)}

    assert "missing 1 ['backbone.pooler.dense.bias'], unexpected 0 []" in \
        refusal(trained, save_variant(trained, tmp_path, state_edit=drop))
    assert "missing 0 [], unexpected 1 ['food101_classifier.9.weight']" in \
        refusal(trained, save_variant(trained, tmp_path, state_edit=extra))


def test_cli_refuses_a_pretraining_checkpoint_in_one_line(data, tmp_path) -> None:
    """The command of a user who passes the ViLT checkpoint itself: `error: ...`, exit status 2, no run folder."""
    from mdpl.models import build_classifier

    cfg = make_config(data, tmp_path / "result", "map")
    with pytest.warns(UserWarning, match="load_path is empty"):
        backbone = build_classifier(cfg).backbone.state_dict()      # ViLT checkpoint keys (text_embeddings.*, ...)
    path = tmp_path / "vilt_pretrained.ckpt"
    torch.save({"state_dict": backbone}, path)
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}  # one-line errors, no traceback
    cmd = [sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", "test_only=True",
           f"load_path={path}", f"data_root={cfg['data_root']}", f"tokenizer={cfg['tokenizer']}",
           f"vocab_size={cfg['vocab_size']}", f"log_dir={tmp_path / 'result'}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot evaluate {path}: it holds no trained "
                                                   f"classifier head (food101_classifier.*)"), out.stderr[-2000:]
    assert not (tmp_path / "result").exists()
