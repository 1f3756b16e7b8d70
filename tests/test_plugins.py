"""A method, a dataset and a backbone defined outside mdpl, one file each (tests/plugin_package/), used through the
command line only: installed as a throw-away distribution (a ``*.dist-info`` with ``entry_points.txt`` on the
subprocess's PYTHONPATH) or imported with the run key ``plugins=[...]``.

One training run (toy method on the toy backbone and dataset, tiny sizes) is shared by the assertions: it trains and
tests, ``test_only`` on its checkpoint reproduces the metrics (the checkpoint's ``plugins`` are imported again),
``print_config`` lists the plugins' keys, ``scripts/reproduce.py --tiny`` runs the plugin method's one-cell table,
and a missing or broken plugin is one ``error:`` line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FILES = ROOT / "tests" / "plugin_package"
MODULES = ("mdpl_toy_method", "mdpl_toy_dataset", "mdpl_toy_backbone")
ENTRY_POINTS = ("[mdpl.methods]\ntoyprompt = mdpl_toy_method\n\n[mdpl.datasets]\ntoyshapes = mdpl_toy_dataset\n\n"
                "[mdpl.backbones]\ntoyvit = mdpl_toy_backbone\n")
RUN = ("task_finetune_toyshapes", "toyprompt", "on_toyvit", "tiny", "max_epoch=1", "logger=csv")


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, paths)]), MDPL_DEBUG="")
    env.pop("WANDB_MODE", None)
    return env


def _python(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _site(folder: Path, entry_points: str | None) -> Path:
    """The plugin modules in `folder`, with a distribution's metadata declaring `entry_points` when given."""
    folder.mkdir(parents=True)
    for name in MODULES:
        shutil.copy(PLUGIN_FILES / f"{name}.py", folder)
    if entry_points is not None:
        info = folder / "mdpl_toy-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mdpl-toy\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(entry_points)
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plugins")
    return {"installed": _site(base / "installed", ENTRY_POINTS), "loose": _site(base / "loose", None),
            "broken": _site(base / "broken", "[mdpl.methods]\nbroken = mdpl_no_such_module\n"), "base": base}


@pytest.fixture(scope="module")
def data_root(sites) -> Path:
    """The toy dataset's arrow files, written by its own synthetic generator and raw-layout writer."""
    out = sites["base"] / "arrow"
    code = ("from mdpl.data.synthetic import write_synthetic; from mdpl.data.writers import make_arrow; "
            f"write_synthetic('toyshapes', {str(sites['base'] / 'raw')!r}, 24, 8, 16, seed=0); "
            f"make_arrow('toyshapes', {str(sites['base'] / 'raw')!r}, {str(out)!r}, progress=False)")
    done = _python(["-c", code], _env(sites["installed"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(sites, data_root) -> dict:
    """One run of the three plugins, imported with the `plugins` key (no distribution installed)."""
    log_dir = sites["base"] / "runs"
    plugins = "plugins=[" + ",".join(MODULES) + "]"
    done = _python(["run.py", "with", *RUN, plugins, f"data_root={data_root}", f"log_dir={log_dir}"],
                   _env(sites["loose"]))
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = list(log_dir.glob("*/version_*"))
    return {"run_dir": run_dir, "log_dir": log_dir, "data_root": data_root,
            **json.loads((run_dir / "test_metrics.json").read_text())}


def test_plugin_run_trains_tests_and_reloads(sites, trained):
    metrics = trained["metrics"]
    assert set(metrics) >= {"toyshapes/test/accuracy", "test/the_metric"}
    assert 0.0 <= metrics["toyshapes/test/accuracy"] <= 1.0
    config = json.loads(json.dumps(__import__("torch").load(trained["checkpoint"], map_location="cpu",
                                                            weights_only=False)["hyper_parameters"]["config"]))
    assert config["prompt_method"] == "toyprompt" and config["backbone"] == "toyvit"
    assert config["dataset"] == "toyshapes" and config["toy_prompt_length"] == 3 and config["toyvit_vision_layers"] == 2
    # test_only without restating `plugins`: the checkpoint's config names them
    done = _python(["run.py", "with", *RUN, f"data_root={trained['data_root']}", f"log_dir={trained['log_dir']}",
                    f"load_path={trained['checkpoint']}", "test_only=True"], _env(sites["loose"]))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((max(trained["log_dir"].glob("*/version_*")) / "test_metrics.json").read_text())["metrics"]
    assert again.keys() == metrics.keys()
    for key, value in metrics.items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_print_config_lists_the_installed_plugins_keys(sites):
    done = _python(["run.py", "print_config", "with", *RUN], _env(sites["installed"]))
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("toy_prompt_length = 3", "toyvit_vision_layers = 2", "dataset = 'toyshapes'", "max_text_len = 24"):
        assert key in _plain(done.stdout), key
    # without the plugin the method's keys are not config keys at all
    plain = _python(["run.py", "print_config", "with", "task_finetune_food101", "map"], _env())
    assert plain.returncode == 0 and "toy_prompt_length" not in plain.stdout


def _plain(text: str) -> str:
    """Sacred's print_config output without its colour codes."""
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("site, extra, expected", [
    ("loose", "plugins=[mdpl_no_such_plugin]", "error: plugins: cannot import 'mdpl_no_such_plugin'"),
    ("broken", "", "error: plugin entry point broken = mdpl_no_such_module (group mdpl.methods) failed to load"),
])
def test_a_missing_plugin_is_one_error_line(sites, site, extra, expected):
    done = _python(["run.py", "print_config", "with", "task_finetune_food101", "map", *([extra] if extra else [])],
                   _env(sites[site]))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr[-2000:]


def test_reproduce_runs_the_plugin_methods_table(sites, tmp_path):
    out = tmp_path / "repro"
    done = _python(["scripts/reproduce.py", "toy_main", "--tiny", "--out", str(out), "--seeds", "0"],
                   _env(sites["installed"]), timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    table = (out / "toy_main.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1 | toy | food101 |"))
    assert row.rstrip().endswith("| done |")
    (results,) = list((out / "runs").rglob("results.csv"))
    header, first = results.read_text().splitlines()[:2]
    assert header.startswith("dataset,method,backbone") and first.startswith("food101,toyprompt,vilt,")
