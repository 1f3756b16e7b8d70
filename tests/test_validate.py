"""Config validation (mdpl/config/validate.py): every bad setting -> one-line ValueError naming the key and the fix;
`python run.py with prompt_method=bogus` exits non-zero with that line on stderr, before any work.
There is no default method, and a key that only another method reads is refused."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import run as run_script
from mdpl.data.constants import ARROW_SPLITS
from mdpl.config.validate import complete_method_keys, validate_config
from runs import resolved_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"none": "baseline", "map": "map", "memprompt": "memprompt", "dcp": "dcp"}


@pytest.fixture(scope="module")
def resolved() -> dict:
    """method -> the resolved Sacred config of `task_finetune_food101 <preset> tiny` ('' -> no method named)."""
    configs = {m: resolved_config(["task_finetune_food101", p, "tiny"], {}) for m, p in PRESETS.items()}
    configs[""] = resolved_config(["task_finetune_food101", "tiny"], {})
    return configs


@pytest.fixture
def data_root(tmp_path, arrow_root) -> str:
    """A fresh folder holding small food101 arrow files."""
    for stem in ARROW_SPLITS["food101"].values():
        shutil.copy(arrow_root("food101") / f"{stem}.arrow", tmp_path / f"{stem}.arrow")
    return str(tmp_path)


@pytest.fixture
def good(resolved, data_root) -> dict:
    """A valid MAP config whose data_root holds small food101 arrow files."""
    return {**resolved["map"], "data_root": data_root}


def test_valid_configs_pass(resolved, data_root) -> None:
    for method in PRESETS:
        validate_config({**resolved[method], "data_root": data_root})
    for method in ("none", "map", "memprompt"):                       # every method on both backbones
        validate_config({**resolved[method], "backbone": "clip", "data_root": data_root})
    validate_config({**resolved["dcp"], "backbone": "vilt", "data_root": data_root})
    validate_config({**resolved["map"], "data_root": ""}, check_data=False)


BAD = [
    ("map", {"dataset": "imagenet"}, r"unknown dataset 'imagenet'; choose one of mmimdb, food101, hatememes"),
    ("map", {"backbone": "resnet"}, r"unknown backbone 'resnet'; choose one of vilt, clip"),
    ("map", {"prompt_method": "bogus"},
     r"unknown prompt_method 'bogus'; registered methods: none, map, memprompt, dcp, scp, mora, msps, ragpt, aoept"),
    ("map", {"backbone": "clip", "prompt_layers": [0, 12]},
     r"prompt_layers=\[0, 12\] has layers \[12\] outside 0\.\.1 \(the CLIP backbone"),
    ("dcp", {"backbone": "vilt", "prompt_depth": 3}, r"prompt_depth=3 must be an integer in 0\.\.2 \(the ViLT"),
    ("map", {"prompt_layers": [0, 2]}, r"prompt_layers=\[0, 2\] has layers \[2\] outside 0\.\.1 .*2 layers"),
    ("map", {"prompt_layers": [-1]}, r"prompt_layers=\[-1\] has layers \[-1\] outside"),
    ("map", {"prompt_length": 0}, r"prompt_length must be a positive integer, got 0"),
    ("memprompt", {"gen_prompt_layers": [5]}, r"gen_prompt_layers=\[5\] has layers \[5\] outside"),
    ("memprompt", {"shared_prompt_length": -1}, r"shared_prompt_length must be a positive integer"),
    ("memprompt", {"top_k": 5, "mem_size": 4}, r"top_k=5 exceeds mem_size=4"),
    ("dcp", {"prompt_depth": 3}, r"prompt_depth=3 must be an integer in 0\.\.2 \(the CLIP"),
    ("map", {"per_gpu_batchsize": 0}, r"per_gpu_batchsize must be a positive integer, got 0"),
    ("map", {"learning_rate": 0.0}, r"learning_rate must be > 0, got 0.0"),
    ("map", {"missing_ratio": {"train": 0.7, "val": 1.5, "test": 0.7}},
     r"missing_ratio\.val=1\.5 must be a number in \[0, 1\]"),
    ("map", {"missing_ratio": {"train": 0.7}}, r"missing_ratio must be a dict with keys train, val, test"),
    ("map", {"missing_type": {"train": "both", "val": "audio", "test": "both"}},
     r"missing_type\.val='audio' is not a missing type; choose one of text, image, both"),
    ("map", {"test_ratio": -0.1}, r"test_ratio=-0\.1 must be a number in \[0, 1\]"),
    ("map", {"test_type": "none"}, r"test_type='none' is not a missing type"),
    ("map", {"test_only": True, "load_path": ""}, r"test_only=True needs load_path=<checkpoint\.ckpt>"),
    ("map", {"load_path": "/nonexistent/vilt.ckpt"}, r"load_path '/nonexistent/vilt\.ckpt' does not exist"),
    ("map", {"data_root": "/nonexistent/arrow"}, r"data_root='/nonexistent/arrow' is not a folder; it must hold "
                                                 r"food101_train\.arrow, food101_val\.arrow, food101_test\.arrow .*"
                                                 r"python make_arrow\.py --dataset food101"),
    # no default method: the papers' commands name none (MAP's adds prompt_type=attention)
    ("", {}, r"^no prompt method selected: name a method preset \(baseline, map, memprompt, dcp, scp, mora, msps, ragpt, aoept, e\.g\. `with "
             r"task_finetune_mmimdb map`\) or set prompt_method=none\|map\|memprompt\|dcp\|scp\|mora\|msps\|ragpt\|aoept$"),
    ("", {"prompt_type": "attention"}, r"or set prompt_method=none\|map\|memprompt\|dcp\|scp\|mora\|msps\|ragpt\|aoept \(prompt_type is read by "
                                       r"map: name `map`\)$"),
    # a key only another method reads: it would be ignored silently
    ("memprompt", {"prompt_type": "attention"}, r"^prompt_type='attention' is read only by map, but prompt_method is "
                                                r"'memprompt'; remove prompt_type or select map$"),
    ("map", {"top_k": 3}, r"^top_k=3 is read only by memprompt, but prompt_method is 'map'; remove top_k or select "
                          r"memprompt$"),
    ("none", {"prompt_depth": 4}, r"^prompt_depth=4 is read only by dcp, but prompt_method is 'none'"),
    ("memprompt", {"prompt_length": 16}, r"^prompt_length=16 is read only by map and dcp, but prompt_method is "
                                         r"'memprompt'; remove prompt_length or select map / dcp$"),
    ("dcp", {"gen_prompt_layers": [0]}, r"^gen_prompt_layers=\[0\] is read only by memprompt"),
    ("map", {"method_sizes": "huge"}, r"method_sizes='huge' must be one of paper, tiny"),
]


@pytest.mark.parametrize("method,override,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_config_raises_one_line(resolved, data_root, method, override, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        validate_config({**resolved[method], "data_root": data_root, **override})
    assert "\n" not in str(info.value)


def test_method_keys_follow_the_selected_method(resolved) -> None:
    """Only the selected method's keys have values (tiny's small ones here); the others are None."""
    assert resolved[""]["prompt_method"] == "" and resolved["none"]["prompt_method"] == "none"
    assert all(resolved[""][k] is None for k in ("prompt_type", "prompt_length", "top_k", "prompt_depth"))
    assert (resolved["map"]["prompt_type"], resolved["map"]["prompt_length"], resolved["map"]["top_k"]) == \
        ("input", 6, None)
    assert (resolved["memprompt"]["top_k"], resolved["memprompt"]["mem_size"], resolved["memprompt"]["prompt_type"]) \
        == (2, 4, None)
    assert (resolved["dcp"]["prompt_length"], resolved["dcp"]["prompt_depth"], resolved["dcp"]["gen_prompt_length"]) \
        == (6, 2, None)
    paper = resolved_config(["task_finetune_food101", "memprompt"], {"top_k": 3})
    assert (paper["gen_prompt_length"], paper["mem_size"], paper["top_k"], paper["bottleneck_dim"]) == (16, 16, 3, 48)


def test_complete_method_keys_fills_a_method_chosen_afterwards(resolved) -> None:
    """A config resolved without a method, given one later (tests, the demo): its keys get the defaults."""
    done = complete_method_keys({**resolved[""], "prompt_method": "memprompt"})
    assert (done["gen_prompt_length"], done["top_k"], done["bottleneck_dim"]) == (4, 2, 8)      # method_sizes='tiny'
    assert "prompt_type" not in done and "prompt_depth" not in done                            # None keys dropped
    paper = complete_method_keys({"prompt_method": "dcp", "prompt_length": 12})
    assert (paper["prompt_length"], paper["prompt_depth"], paper["dcp_dynamic"]) == (12, 6, True)


def test_missing_arrow_files_listed(good) -> None:
    (Path(good["data_root"]) / "food101_val.arrow").unlink()
    with pytest.raises(ValueError, match=r"lacks food101_val\.arrow \(expected food101_train\.arrow, "
                                         r"food101_val\.arrow, food101_test\.arrow\); create them with "
                                         r"`python make_arrow\.py --dataset food101 --root .* --out "):
        validate_config(good)
    validate_config({**good, "test_only": True, "load_path": good["data_root"]})   # test_only reads only test


def test_run_validates_before_any_work(resolved, data_root, tmp_path) -> None:
    log_dir = tmp_path / "result"
    with pytest.raises(ValueError, match="top_k=9 exceeds mem_size=4"):
        run_script.run({**resolved["memprompt"], "data_root": data_root, "top_k": 9, "log_dir": str(log_dir)})
    with pytest.raises(ValueError, match="no prompt method selected"):
        run_script.run({**resolved[""], "data_root": data_root, "log_dir": str(log_dir)})
    assert not log_dir.exists()   # no run directory was made


def _cli_errors(*args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "run.py", "with", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")], proc.stderr


def test_cli_bad_method_exits_with_one_line() -> None:
    code, lines, stderr = _cli_errors("task_finetune_food101", "prompt_method=bogus")
    assert code == 2
    assert lines == ["error: unknown prompt_method 'bogus'; registered methods: none, map, memprompt, dcp, scp, mora, msps, ragpt, aoept"]
    assert "Traceback" not in stderr


def test_cli_without_method_exits_with_one_line() -> None:
    """MAP's own command (task config + prompt_type, no preset) no longer trains the no-prompt baseline."""
    code, lines, stderr = _cli_errors("task_finetune_food101", "prompt_type=attention")
    assert code == 2 and "Traceback" not in stderr
    assert lines == ["error: no prompt method selected: name a method preset (baseline, map, memprompt, dcp, scp, mora, msps, ragpt, aoept, "
                     "e.g. `with task_finetune_mmimdb map`) or set prompt_method=none|map|memprompt|dcp|scp|mora|msps|ragpt|aoept "
                     "(prompt_type is read by map: name `map`)"]


def test_cli_non_integer_seed_is_one_line() -> None:
    # Sacred seeds its RNGs before run.py sees the config; a config hook catches the seed first
    proc = subprocess.run([sys.executable, "run.py", "with", "task_finetune_food101", "map", "tiny", "seed=abc"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] == [
        "error: seed='abc' must be an integer, e.g. seed=0"]
