"""Config validation (mdpl/validate.py): every bad setting -> one-line ValueError naming the key and the fix;
`python run.py with prompt_method=bogus` exits non-zero with that line on stderr, before any work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import run as run_script
from mdpl.data.constants import ARROW_SPLITS
from mdpl.validate import validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_config() -> dict:
    """The resolved Sacred config of `task_finetune_food101 map tiny` (a plain dict)."""
    from config import ex
    return dict(ex.run("print_config", named_configs=["task_finetune_food101", "map", "tiny"]).config)


@pytest.fixture
def good(base_config, tmp_path) -> dict:
    """A valid config whose data_root holds (empty) food101 arrow files."""
    for stem in ARROW_SPLITS["food101"].values():
        (tmp_path / f"{stem}.arrow").write_bytes(b"")
    return {**base_config, "data_root": str(tmp_path)}


def test_valid_configs_pass(good) -> None:
    validate_config(good)
    validate_config({**good, "prompt_method": "memprompt"})
    validate_config({**good, "prompt_method": "none"})
    validate_config({**good, "backbone": "clip", "prompt_method": "dcp"})
    for method in ("none", "map", "memprompt"):                       # every method on both backbones
        validate_config({**good, "backbone": "clip", "prompt_method": method})
    validate_config({**good, "backbone": "vilt", "prompt_method": "dcp"})
    validate_config({**good, "data_root": ""}, check_data=False)


BAD = [
    ({"dataset": "imagenet"}, r"unknown dataset 'imagenet'; choose one of mmimdb, food101, hatememes"),
    ({"backbone": "resnet"}, r"unknown backbone 'resnet'; choose one of vilt, clip"),
    ({"prompt_method": "bogus"}, r"unknown prompt_method 'bogus'; registered methods: dcp, map, memprompt, none"),
    ({"backbone": "clip", "prompt_method": "map", "prompt_layers": [0, 12]},
     r"prompt_layers=\[0, 12\] has layers \[12\] outside 0\.\.1 \(the CLIP backbone"),
    ({"prompt_method": "dcp", "prompt_depth": 3}, r"prompt_depth=3 must be an integer in 0\.\.2 \(the ViLT"),
    ({"prompt_layers": [0, 2]}, r"prompt_layers=\[0, 2\] has layers \[2\] outside 0\.\.1 .*2 layers"),
    ({"prompt_layers": [-1]}, r"prompt_layers=\[-1\] has layers \[-1\] outside"),
    ({"prompt_length": 0}, r"prompt_length must be a positive integer, got 0"),
    ({"prompt_method": "memprompt", "gen_prompt_layers": [5]}, r"gen_prompt_layers=\[5\] has layers \[5\] outside"),
    ({"prompt_method": "memprompt", "shared_prompt_length": -1}, r"shared_prompt_length must be a positive integer"),
    ({"prompt_method": "memprompt", "top_k": 5, "mem_size": 4}, r"top_k=5 exceeds mem_size=4"),
    ({"backbone": "clip", "prompt_method": "dcp", "prompt_depth": 3}, r"prompt_depth=3 must be an integer in 0\.\.2"),
    ({"per_gpu_batchsize": 0}, r"per_gpu_batchsize must be a positive integer, got 0"),
    ({"learning_rate": 0.0}, r"learning_rate must be > 0, got 0.0"),
    ({"missing_ratio": {"train": 0.7, "val": 1.5, "test": 0.7}}, r"missing_ratio\.val=1\.5 must be a number in \[0, 1\]"),
    ({"missing_ratio": {"train": 0.7}}, r"missing_ratio must be a dict with keys train, val, test"),
    ({"missing_type": {"train": "both", "val": "audio", "test": "both"}},
     r"missing_type\.val='audio' is not a missing type; choose one of text, image, both"),
    ({"test_ratio": -0.1}, r"test_ratio=-0\.1 must be a number in \[0, 1\]"),
    ({"test_type": "none"}, r"test_type='none' is not a missing type"),
    ({"test_only": True, "load_path": ""}, r"test_only=True needs load_path=<checkpoint\.ckpt>"),
    ({"load_path": "/nonexistent/vilt.ckpt"}, r"load_path '/nonexistent/vilt\.ckpt' does not exist"),
    ({"data_root": "/nonexistent/arrow"}, r"data_root='/nonexistent/arrow' is not a folder; it must hold "
                                          r"food101_train\.arrow, food101_val\.arrow, food101_test\.arrow .*"
                                          r"python make_arrow\.py --dataset food101"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_raises_one_line(good, override, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        validate_config({**good, **override})
    assert "\n" not in str(info.value)


def test_missing_arrow_files_listed(good) -> None:
    (Path(good["data_root"]) / "food101_val.arrow").unlink()
    with pytest.raises(ValueError, match=r"lacks food101_val\.arrow \(expected food101_train\.arrow, "
                                         r"food101_val\.arrow, food101_test\.arrow\); create them with "
                                         r"`python make_arrow\.py --dataset food101 --root .* --out "):
        validate_config(good)
    validate_config({**good, "test_only": True, "load_path": good["data_root"]})   # test_only reads only test


def test_run_validates_before_any_work(good, tmp_path) -> None:
    log_dir = tmp_path / "result"
    with pytest.raises(ValueError, match="top_k=9 exceeds mem_size=4"):
        run_script.run({**good, "prompt_method": "memprompt", "top_k": 9, "log_dir": str(log_dir)})
    assert not log_dir.exists()   # no run directory was made


def test_cli_bad_method_exits_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "run.py", "with", "prompt_method=bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: unknown prompt_method 'bogus'; registered methods: dcp, map, memprompt, "
                     "none (backbone 'vilt': dcp, map, memprompt, none; backbone 'clip': dcp, map, memprompt, none)"]
    assert "Traceback" not in proc.stderr
