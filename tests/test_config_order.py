"""Named configs do not depend on their order (config.py): every task x method preset, with or without a backbone
switch and `tiny`, in every order, resolves to one config, or the order is refused with one line
(`config.check_named_configs`, called by run.py before any work). A preset is the same as its prompt_method."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import check_named_configs
from runs import resolved_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ("task_finetune_mmimdb", "task_finetune_food101", "task_finetune_hatememes")
PRESETS = {"baseline": "none", "map": "map", "memprompt": "memprompt", "dcp": "dcp"}
EXTRAS = [(), ("on_clip",), ("on_vilt",), ("tiny",), ("on_clip", "tiny"), ("on_vilt", "tiny")]


def refusal(names: list[str]) -> str | None:
    """The one-line refusal of `names`, or None when run.py accepts them."""
    try:
        check_named_configs(names)
    except ValueError as err:
        assert "\n" not in str(err)
        return str(err)
    return None


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", PRESETS)
def test_task_and_method_in_either_order(task, preset) -> None:
    forward, backward = resolved_config([task, preset], {}), resolved_config([preset, task], {})
    assert forward == backward
    assert refusal([task, preset]) is None and refusal([preset, task]) is None
    assert forward == resolved_config([task], {"prompt_method": PRESETS[preset]})   # a preset = its prompt_method


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("extras", EXTRAS, ids=["-".join(e) or "plain" for e in EXTRAS])
def test_every_order_gives_one_config_or_a_refusal(preset, extras) -> None:
    for task in TASKS:
        canonical = resolved_config([task, preset, *extras], {})
        refused = 0
        for names in itertools.permutations([task, preset, *extras]):
            message = refusal(list(names))
            if message is None:
                assert resolved_config(list(names), {}) == canonical, names
            else:
                refused += 1
                assert message == f"name `tiny` after `{task}` (`with ... {task} ... tiny`): both set the run " \
                                  f"size and the later one wins"
                assert names.index("tiny") < names.index(task)
        n_orders = math.factorial(2 + len(extras))
        assert refused == (n_orders // 2 if "tiny" in extras else 0)   # exactly the orders with tiny first


def test_paper_values_for_the_documented_order() -> None:
    """`task method` keeps the values each paper used (learning rate, seed, backbone, transform size, prompts)."""
    expected = {"baseline": (1e-2, 0, "vilt", 384), "map": (1e-2, 0, "vilt", 384),
                "memprompt": (5e-3, 42, "vilt", 384), "dcp": (1e-2, 0, "clip", 224)}
    for preset, values in expected.items():
        cfg = resolved_config(["task_finetune_food101", preset], {})
        assert (cfg["learning_rate"], cfg["seed"], cfg["backbone"], cfg["image_size"]) == values, preset
    assert resolved_config(["task_finetune_mmimdb", "map"], {})["prompt_layers"] == [0, 1, 2, 3, 4, 5]
    assert resolved_config(["task_finetune_mmimdb", "dcp"], {})["prompt_length"] == 36
    switched = resolved_config(["on_clip", "task_finetune_hatememes", "map"], {})
    assert (switched["backbone"], switched["image_size"], switched["learning_rate"]) == ("clip", 224, 1e-2)
    small = resolved_config(["map", "task_finetune_hatememes", "tiny"], {"learning_rate": 0.5})
    assert (small["max_text_len"], small["prompt_length"], small["learning_rate"]) == (24, 6, 0.5)


@pytest.mark.parametrize("names,message", [
    (["task_finetune_food101", "map", "memprompt"], r"^named configs map and memprompt are both a method preset: "
                                                    r"name one$"),
    (["baseline", "dcp"], r"named configs baseline and dcp are both a method preset"),
    (["task_finetune_food101", "task_finetune_mmimdb", "map"], r"task_finetune_food101 and task_finetune_mmimdb "
                                                               r"are both a task"),
    (["map", "on_clip", "on_vilt"], r"on_clip and on_vilt are both a backbone switch"),
    (["demo", "tiny"], r"demo and tiny are both a size config"),
    (["demo", "task_finetune_food101"], r"^name `demo` after `task_finetune_food101`"),
])
def test_ambiguous_combinations_are_refused(names, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_named_configs(names)


def test_cli_refuses_tiny_before_the_task(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MDPL_DEBUG"}  # one-line errors, no traceback
    cmd = [sys.executable, "run.py", "with", "tiny", "task_finetune_food101", "map", f"log_dir={tmp_path / 'result'}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: name `tiny` after `task_finetune_food101` (`with ... task_finetune_food101 ... tiny`): "
                     "both set the run size and the later one wins"]
    assert not (tmp_path / "result").exists()


@pytest.mark.parametrize("task,preset,lr,seed,missing", [
    ("mmimdb", "memprompt", 5e-3, 42, "image"), ("food101", "memprompt", 5e-3, 42, "image"),
    ("hatememes", "memprompt", 1e-3, 42, "image"), ("hatememes", "map", 1e-2, 0, "both"),
    ("mmimdb", "dcp", 1e-2, 0, "both"), ("food101", "baseline", 1e-2, 0, "both")])
def test_presets_equal_the_reference_configurations(task, preset, lr, seed, missing) -> None:
    """Each preset trains as its reference config does on that dataset (MemPrompt: 1e-3 on Hateful Memes and the
    'image' missing type on every split, docs/methods.md D-32); the user's values still win."""
    from runs import resolved_config
    config = resolved_config([f"task_finetune_{task}", preset], {})
    assert (config["learning_rate"], config["seed"]) == (lr, seed)
    assert config["missing_type"] == {"train": missing, "val": missing, "test": missing}
    both = {"train": "both", "val": "both", "test": "both"}
    assert resolved_config([f"task_finetune_{task}", preset], {"missing_type": both})["missing_type"] == both
