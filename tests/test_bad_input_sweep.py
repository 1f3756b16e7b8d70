"""A sweep of mistakes in the run settings and input files: each ends as one UserInputError line before any work.

Every case runs ``run.run(config)`` in-process (tiny configs, synthetic Food-101 arrows copied to a private folder)
and checks the error type, a fragment of the message (the key, the bad value, what to do), that the message is one
line, and that nothing was written: no log_dir (so no run directory) and no missing_tables folder. Before these
checks existed, each case ended in a Python traceback (ValueError, ZeroDivisionError, KeyError, pickle errors,
NotADirectoryError, ...), ran silently with a wrong setting (``finetune='yes'``, ``max_epoch=0``, ``warmup_steps=1.5``,
``mlp_ratio=0``, CLIP ``image_size`` not a multiple of ``clip_patch_size``, ``clip_sha256`` without ``clip_path``,
...), or printed a misleading line (``test_only='no'`` read as True). A handful of cases also go through the real
``python run.py`` CLI: exit status 2, exactly one ``error: `` line and no traceback.
"""
from __future__ import annotations

from runs import as_run

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import VOCAB
from mdpl.data.constants import ARROW_SPLITS
from mdpl.errors import UserInputError
from runs import resolved_config, run_quiet

ROOT = Path(__file__).resolve().parent.parent
FOOD = ["task_finetune_food101", "map", "tiny"]
DCP = ["task_finetune_food101", "dcp", "tiny"]
MAP_CLIP = ["task_finetune_food101", "map", "on_clip", "tiny"]
MEMPROMPT = ["task_finetune_food101", "memprompt", "tiny"]
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory, arrow_root, bert_vocab_dir) -> dict[str, Path]:
    """Private food101 arrows, a vocab folder, and bad files: text, truncated zip checkpoint, folders, a wrong-keys
    checkpoint, a tiny OpenAI-layout CLIP state dict."""
    from mdpl.backbones.clip import build_clip_backbone

    root = tmp_path_factory.mktemp("bad_input_sweep")
    arrow = root / "arrow"
    arrow.mkdir()
    for stem in ARROW_SPLITS["food101"].values():
        shutil.copy(arrow_root("food101") / f"{stem}.arrow", arrow / f"{stem}.arrow")
    (root / "text.ckpt").write_text("not a checkpoint\n")
    good = root / "good.ckpt"
    torch.save({"state_dict": {"model.head.weight": torch.zeros(2, 2)}, "epoch": 0}, good)  # a zip, other keys
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "empty_dir").mkdir()
    (root / "tok_without_vocab").mkdir()
    cfg = resolved_config(DCP, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # random init: clip_path is empty
        clip = build_clip_backbone(as_run({**cfg, "clip_path": ""}, "clip"))
    torch.save(clip.openai_state_dict(), root / "clip.pt")
    return {"arrow": arrow, "tok": bert_vocab_dir, "text": root / "text.ckpt", "good": good,
            "truncated": root / "truncated.ckpt", "empty_dir": root / "empty_dir",
            "tok_without_vocab": root / "tok_without_vocab", "clip": root / "clip.pt", "missing": root / "absent.pt"}


_RESOLVED: dict[tuple, dict] = {}


def make_config(files: dict, log_dir: Path, named: list[str], overrides: dict) -> dict:
    """The resolved tiny config of `named` on the private arrows, with `overrides` (values as the CLI would parse
    them; '{name}' strings are replaced by the paths in `files`) applied on top."""
    key = tuple(named)
    if key not in _RESOLVED:
        _RESOLVED[key] = resolved_config(named, {"per_gpu_batchsize": 4, "batch_size": 4, "max_epoch": 1,
                                                 "vocab_size": len(VOCAB)})
    paths = {key: str(path) for key, path in files.items()}
    resolved = {k: v.format(**paths) if isinstance(v, str) and v.startswith("{") else v for k, v in overrides.items()}
    return {**_RESOLVED[key], "data_root": paths["arrow"], "tokenizer": paths["tok"], "log_dir": str(log_dir),
            **resolved}


# (id, named configs, overrides, regex fragment of the one-line message)
CASES = [
    # --- strings where numbers go, and on/off keys that are not booleans
    ("learning_rate str", FOOD, {"learning_rate": "abc"}, r"learning_rate must be > 0, got 'abc'"),
    ("max_epoch str", FOOD, {"max_epoch": "abc"}, r"max_epoch='abc' must be a positive integer"),
    ("num_gpus str", FOOD, {"num_gpus": "abc"}, r"num_gpus='abc' must be an integer >= 0"),
    ("vocab_size str", FOOD, {"vocab_size": "abc"}, r"vocab_size='abc' must be a positive integer"),
    ("weight_decay str", FOOD, {"weight_decay": "abc"}, r"weight_decay='abc' must be a number >= 0"),
    ("lr_mult str", FOOD, {"lr_mult": "abc"}, r"lr_mult='abc' must be a number > 0"),
    ("checkpoint_every_n_steps str", FOOD, {"checkpoint_every_n_steps": "abc"},
     r"checkpoint_every_n_steps='abc' must be an integer >= 0"),
    ("test_only 'no'", FOOD, {"test_only": "no"}, r"^test_only='no' must be True or False"),
    ("finetune 'yes'", FOOD, {"finetune": "yes"}, r"^finetune='yes' must be True or False"),
    ("simulate_missing 0.5", FOOD, {"simulate_missing": 0.5}, r"^simulate_missing=0\.5 must be True or False"),
    # --- trainer
    pytest.param("num_gpus without CUDA", FOOD, {"num_gpus": 1}, r"num_gpus=1 but CUDA is not available.*num_gpus=0",
                 marks=pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")),
    ("num_gpus -1", FOOD, {"num_gpus": -1}, r"num_gpus=-1 must be an integer >= 0"),
    ("num_nodes 0", FOOD, {"num_nodes": 0}, r"num_nodes=0 must be a positive integer"),
    ("num_cpu_processes 0", FOOD, {"num_cpu_processes": 0}, r"num_cpu_processes=0 must be a positive integer"),
    ("num_workers -1", FOOD, {"num_workers": -1}, r"num_workers=-1 must be an integer >= 0"),
    ("precision bogus", FOOD, {"precision": "bogus"}, r"precision='bogus' is not supported; use one of .*32-true"),
    ("precision 17", FOOD, {"precision": 17}, r"precision=17 is not supported"),
    ("deterministic maybe", FOOD, {"deterministic": "maybe"}, r"deterministic='maybe' must be True, False or 'warn'"),
    ("max_epoch 0", FOOD, {"max_epoch": 0}, r"max_epoch=0 must be a positive integer"),
    ("max_steps 0", FOOD, {"max_steps": 0}, r"max_steps=0 must be a positive number of optimizer steps"),
    ("val_check_interval 0", FOOD, {"val_check_interval": 0}, r"val_check_interval=0 must be a fraction"),
    ("val_check_interval str", FOOD, {"val_check_interval": "abc"}, r"val_check_interval='abc' must be"),
    ("exp_name empty", FOOD, {"exp_name": ""}, r"exp_name is empty"),
    # --- model sizes
    ("image_size below patch", FOOD, {"image_size": 8}, r"image_size=8 is too small for ViLT"),
    ("image_size not multiple", FOOD, {"image_size": 72}, r"image_size=72 is not a multiple of patch_size=16"),
    ("patch_size 0", FOOD, {"patch_size": 0}, r"patch_size=0 must be a positive integer"),
    ("hidden_size vs heads", FOOD, {"hidden_size": 65}, r"hidden_size=65 is not divisible by num_heads=2"),
    ("num_heads 0", FOOD, {"num_heads": 0}, r"num_heads=0 must be a positive integer"),
    ("num_layers 0", FOOD, {"num_layers": 0}, r"num_layers=0 must be a positive integer"),
    ("mlp_ratio 0", FOOD, {"mlp_ratio": 0}, r"mlp_ratio=0 must be a number > 0"),
    ("drop_rate 1.5", FOOD, {"drop_rate": 1.5}, r"drop_rate=1\.5 must be a number in \[0, 1\)"),
    ("max_image_len 0", FOOD, {"max_image_len": 0}, r"max_image_len=0 must be -1 \(no cap\)"),
    ("clip image_size vs patch", DCP, {"image_size": 60},
     r"image_size=60 is not a multiple of clip_patch_size=16"),
    ("clip_vision_width vs head", DCP, {"clip_vision_width": 48},
     r"clip_vision_width=48 is not a multiple of clip_vision_head_width=32"),
    ("clip_text_width vs heads", DCP, {"clip_text_heads": 3},
     r"clip_text_width=64 is not a multiple of clip_text_heads=3"),
    ("clip_context_length", DCP, {"clip_context_length": 10}, r"clip_context_length=10 must be 77"),
    # --- method options
    ("dcp prompt_length 7", DCP, {"prompt_length": 7}, r"prompt_length=7 must be a multiple of 3 for dcp"),
    ("dcp depth 0 with dynamic", DCP, {"prompt_depth": 0}, r"prompt_depth=0 inserts no prompts.*dcp_dynamic=False"),
    ("map prompt_type bogus", FOOD, {"prompt_type": "bogus"}, r"prompt_type='bogus' is not a MAP prompt type"),
    ("map attention odd length", FOOD, {"prompt_type": "attention", "prompt_length": 5},
     r"prompt_length=5 must be even with prompt_type=attention"),
    ("map no prompt layers", FOOD, {"prompt_layers": []}, r"prompt_layers=\[\] prompts no layer"),
    ("map repeated layer", FOOD, {"prompt_layers": [0, 0]}, r"prompt_layers=\[0, 0\] names a layer twice"),
    ("memprompt no layers", MEMPROMPT, {"gen_prompt_layers": [], "shared_prompt_layers": []},
     r"gen_prompt_layers and shared_prompt_layers are both empty"),
    # --- optimisation
    ("decay_power bogus", FOOD, {"decay_power": "bogus"}, r"decay_power='bogus' must be a polynomial power >= 0"),
    ("decay_power negative", FOOD, {"decay_power": -1}, r"decay_power=-1 must be a polynomial power"),
    ("warmup_steps negative", FOOD, {"warmup_steps": -5}, r"warmup_steps=-5 must be a number of optimizer steps"),
    ("warmup_steps float above 1", FOOD, {"warmup_steps": 1.5}, r"warmup_steps=1\.5 .* fraction .* in \[0, 1\)"),
    ("weight_decay negative", FOOD, {"weight_decay": -1}, r"weight_decay=-1 must be a number >= 0"),
    ("end_lr above learning_rate", FOOD, {"end_lr": 1.0}, r"end_lr=1\.0 must be smaller than learning_rate=0\.001"),
    ("optimizer_impl bogus", FOOD, {"optimizer_impl": "bogus"}, r"optimizer_impl='bogus' is not supported"),
    # --- data options and the evaluation sweep
    ("mmimdb_items bogus", FOOD, {"mmimdb_items": "bogus"}, r"mmimdb_items='bogus' must be one of plot, movie"),
    ("test_types unknown", FOOD, {"test_types": ["foo"]}, r"test_types has unknown missing types \['foo'\]"),
    ("test_ratios above 1", FOOD, {"test_ratios": [2]}, r"test_ratios has values outside \[0, 1\]: \[2\.0\]"),
    ("test_ratios str", FOOD, {"test_ratios": "abc"}, r"test_ratios='abc' must be a list of numbers"),
    ("test_types empty", FOOD, {"test_types": []}, r"test_types is empty; give e\.g\. test_types=\[text,image,both\]"),
    # --- files and folders
    ("tokenizer without vocab.txt", FOOD, {"tokenizer": "{tok_without_vocab}"}, r"is a folder without vocab\.txt"),
    ("tokenizer absent", FOOD, {"tokenizer": "{missing}"}, r"tokenizer='.*absent\.pt' does not exist"),
    ("log_dir under a file", FOOD, {"log_dir": "{text}/result"}, r"log_dir='.*text\.ckpt/result' cannot be created: "
                                                                 r".*text\.ckpt is a file"),
    ("missing_table_root under a file", FOOD, {"missing_table_root": "{text}/tables"},
     r"missing_table_root='.*text\.ckpt/tables' cannot be created"),
    ("clip_path text file", DCP, {"clip_path": "{text}"}, r"clip_path '.*text\.ckpt' is not a PyTorch checkpoint"),
    ("clip_path folder", DCP, {"clip_path": "{empty_dir}"}, r"clip_path '.*empty_dir' is a folder"),
    ("clip_path absent", DCP, {"clip_path": "{missing}"}, r"clip_path '.*absent\.pt' does not exist"),
    ("clip_path truncated", DCP, {"clip_path": "{truncated}"}, r"is a damaged or truncated zip archive"),
    ("clip_path other keys", DCP, {"clip_path": "{good}"}, r"clip_path .*good\.ckpt: OpenAI CLIP checkpoint does "
                                                           r"not match the model"),
    ("clip_sha256 wrong", DCP, {"clip_path": "{clip}", "clip_sha256": "0" * 64},
     r"SHA-256 of clip_path .*clip\.pt differs from clip_sha256=0{64}"),
    ("clip_sha256 not hex", DCP, {"clip_path": "{clip}", "clip_sha256": "abc"}, r"clip_sha256='abc' is not a SHA-256"),
    ("clip_sha256 without clip_path", DCP, {"clip_sha256": "0" * 64}, r"clip_sha256 is set but clip_path is empty"),
    ("clip_path on vilt", FOOD, {"clip_path": "{clip}"}, r"clip_path='.*clip\.pt' is read only by backbone=clip"),
    ("load_path text file", FOOD, {"load_path": "{text}"}, r"load_path '.*text\.ckpt' is not a PyTorch checkpoint"),
    ("load_path truncated", FOOD, {"load_path": "{truncated}"}, r"load_path '.*truncated\.ckpt' is a damaged or "
                                                                r"truncated zip archive"),
    ("load_path empty folder", FOOD, {"load_path": "{empty_dir}"}, r"is a folder without model\.safetensors or "
                                                                   r"pytorch_model\.bin"),
    ("load_path other keys", FOOD, {"load_path": "{good}"}, r"ViLT checkpoint .*good\.ckpt lacks \d+ backbone keys"),
    ("load_path truncated test_only", FOOD, {"load_path": "{truncated}", "test_only": True},
     r"load_path '.*truncated\.ckpt' is a damaged .*test_only=True needs the \.ckpt"),
    ("resume_from text file", FOOD, {"resume_from": "{text}"}, r"resume_from '.*text\.ckpt' is not a PyTorch "
                                                               r"checkpoint"),
    ("resume_from truncated", FOOD, {"resume_from": "{truncated}"}, r"resume_from '.*truncated\.ckpt' is a damaged"),
    ("resume_from folder", FOOD, {"resume_from": "{empty_dir}"}, r"resume_from '.*empty_dir' is a folder"),
    ("dcp_dynamic_queries absent", DCP, {"dcp_dynamic_queries": "{missing}"},
     r"dcp_dynamic_queries='.*absent\.pt' is not a file"),
]


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,named,overrides,fragment", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_line_before_any_work(files, tmp_path, name, named, overrides, fragment) -> None:
    log_dir = tmp_path / "result"
    config = make_config(files, log_dir, named, overrides)
    with pytest.raises(UserInputError, match=fragment) as err:
        run_quiet(config)
    assert "\n" not in str(err.value)
    assert not log_dir.exists(), sorted(p.name for p in log_dir.rglob("*"))      # no run directory
    assert not (files["arrow"] / "missing_tables").exists()                      # no missing table written


# ------------------------------------------------------------------------------------------- the CLI
CLI_CASES = [
    ("learning_rate str", FOOD, ["learning_rate=abc"], "learning_rate must be > 0, got 'abc'"),
    ("test_only no", FOOD, ["test_only=no"], "test_only='no' must be True or False"),
    ("dcp prompt_length 7", DCP, ["prompt_length=7"], "prompt_length=7 must be a multiple of 3 for dcp"),
    ("resume_from text file", FOOD, ["resume_from={text}"], "is not a PyTorch checkpoint"),
    ("log_dir under a file", FOOD, ["log_dir={text}/result"], "is a file; the run directories go there"),
    ("test_ratios above 1", FOOD, ["test_ratios=[2]"], "test_ratios has values outside [0, 1]: [2.0]"),
]


@pytest.mark.parametrize("name,named,args,fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_error_line(files, tmp_path, name, named, args, fragment) -> None:
    paths = {key: str(path) for key, path in files.items()}
    log_dir = tmp_path / "result"
    args = [a.format(**paths) for a in args]
    base = [f"data_root={files['arrow']}", f"tokenizer={files['tok']}", f"vocab_size={len(VOCAB)}", "max_epoch=1"]
    if not any(a.startswith("log_dir=") for a in args):
        base.append(f"log_dir={log_dir}")
    env = {k: v for k, v in os.environ.items() if k not in ("MDPL_RUN_DIR", "MDPL_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "run.py", "with", *named, *base, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0], out.stderr[-2000:]
    assert not log_dir.exists() and not (files["arrow"] / "missing_tables").exists()
