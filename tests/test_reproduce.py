"""scripts/reproduce.py and mdpl.experiments: the paper-reproduction driver over run.py.

* every table's --dry-run exits 0 and prints one command per runnable cell and seed, with the keys the cell
  means (checked exactly on a few cells) and keys that run.py's config has; run.py's own CLI parses them;
* one small real table (dcp_length, 5 cells) with --tiny end to end on the CPU: the .md/.csv carry every cell,
  ours, the paper's number and the difference;
* re-running skips the finished cells (no new run directory); a finished training whose results lack a
  scenario is re-evaluated with test_only (no new training);
* --cells i/N shards partition the runnable cells; the registry's paper ids resolve in paper_results.csv.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdpl.data.registry import BUILTIN_DATASETS, dataset_spec
from mdpl.experiments import estimate, executor, matrix, results, summary
from mdpl.experiments.matrix import Context
from mdpl.experiments.papers import dcp as dcp_paper

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce.py"
PAPER_CSV = REPO / "scripts" / "paper_results.csv"


TABLES = matrix.tables()


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dry_run_commands(stdout: str) -> dict[tuple[str, str, int], list[str]]:
    """(table, cell id, seed) -> argv of the printed command."""
    out, header = {}, None
    for line in stdout.splitlines():
        if line.startswith("# ") and " seed " in line and "[" in line and not line.startswith("# skip"):
            table, cell = line[2:].split(" ", 2)[:2]
            header = (table, cell, int(line.rsplit(" seed ", 1)[1]))
        elif line.startswith("python run.py with ") and header is not None:
            out[header] = shlex.split(line)
            header = None
    return out


def cell_by(table: str, **want):
    found = [c for c in TABLES[table].cells
             if all(getattr(c, k) == v for k, v in want.items() if k != "keys") and
             ("keys" not in want or dict(c.keys) == want["keys"])]
    assert len(found) == 1, (table, want, found)
    return found[0]


# ------------------------------------------------------------------------------------------------ (a)
@pytest.fixture(scope="module")
def dry_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    res = cli("all", "--dry-run", "--data-root", "/data/arrow", "--weights", "/w", "--out", str(out),
              "--seeds", "0,1")
    assert res.returncode == 0, res.stderr
    return {"stdout": res.stdout, "commands": dry_run_commands(res.stdout), "out": out}


def test_dry_run_every_table_one_command_per_runnable_cell_and_seed(dry_all):
    commands = dry_all["commands"]
    for name, table in TABLES.items():
        got = {(cell, seed) for t, cell, seed in commands if t == name}
        assert got == {(c.id, s) for c in table.runnable for s in (0, 1)}, name
    for argv in commands.values():
        assert argv[:3] == ["python", "run.py", "with"] and argv[3].startswith("task_finetune_")
        keys = [a.split("=", 1)[0] for a in argv[3:] if "=" in a]
        assert len(keys) == len(set(keys)), argv                      # no key given twice
    assert not list(dry_all["out"].iterdir())                          # a dry run writes nothing
    # every not-yet-expressible cell is named with its switch, never run
    for name, table in TABLES.items():
        for cell in table.cells:
            if cell.needs:
                assert f"# skip {name} {cell.id} [{cell.label}]: not yet expressible: needs {cell.needs}" \
                    in dry_all["stdout"]


def _cmd(dry_all, table: str, seed: int = 0, **want) -> str:
    return shlex.join(dry_all["commands"][(table, cell_by(table, **want).id, seed)])


def test_dry_run_exact_cells(dry_all):
    # DCP Table 4, MM-IMDb, missing text 50 %, DCP on CLIP: train = val = test setting, one scenario
    cmd = _cmd(dry_all, "dcp_main", seed=1, dataset="mmimdb", method="dcp", train=("text", 0.5))
    assert cmd.startswith("python run.py with task_finetune_mmimdb dcp missing_type.train=text missing_type.val=text "
                          "missing_type.test=text missing_ratio.train=0.5 missing_ratio.val=0.5 missing_ratio.test=0.5 "
                          "data_root=/data/arrow/mmimdb clip_path=/w/ViT-B-16.pt seed=1 log_dir=")
    assert cmd.endswith(" 'test_types=[text]' 'test_ratios=[0.5]'") and "load_path" not in cmd
    # its baseline is the frozen CLIP (baseline on_clip)
    cmd = _cmd(dry_all, "dcp_main", dataset="hatememes", method="none", train=("both", 0.9))
    assert "with task_finetune_hatememes baseline on_clip missing_type.train=both" in cmd
    assert "missing_ratio.test=0.9 data_root=/data/arrow/hatememes clip_path=/w/ViT-B-16.pt seed=0" in cmd
    # Table 7: DCP on ViLT reads the ViLT checkpoint and the BERT vocabulary
    cmd = _cmd(dry_all, "dcp_table7", dataset="food101", method="dcp", train=("image", 0.7))
    assert ("with task_finetune_food101 dcp on_vilt missing_type.train=image" in cmd and
            "load_path=/w/vilt_200k_mlm_itm.ckpt tokenizer=/w/bert-base-uncased seed=0" in cmd)
    # the MAP run of Table 7 is the map_main run, swept over the scenarios of every table using it
    shared = _cmd(dry_all, "dcp_table7", dataset="food101", method="map", train=("image", 0.7))
    assert shared == _cmd(dry_all, "map_main", dataset="food101", method="map", train=("image", 0.7), keys={})
    assert shared.endswith(" 'test_types=[text,image,both]' 'test_ratios=[0.0,0.1,0.3,0.5,0.7,0.9,1.0]'")
    # component / design ablations, MemPrompt ablations, MAP attention, learning rate of MemPrompt on Hateful Memes
    cmd = _cmd(dry_all, "dcp_components", keys={"dcp_dynamic": False, "dcp_common": False})
    assert "missing_ratio.test=0.7 dcp_dynamic=False dcp_common=False data_root=" in cmd
    assert "'gen_prompt_layers=[]' data_root=/data/arrow/mmimdb load_path=" in _cmd(
        dry_all, "memprompt_ablation", label="w/o generative prompts")
    assert "missing_type.train=image" in _cmd(dry_all, "memprompt_ablation", label="w/o shared prompts")
    assert "shared_prompt_layers=[]" in _cmd(dry_all, "memprompt_ablation", label="w/o shared prompts")
    assert " mem_size=16 top_k=8 " in _cmd(dry_all, "memprompt_top_k", x=8)
    assert " prompt_depth=12 data_root=" in _cmd(dry_all, "dcp_depth", x=12)        # real runs: no tiny keys
    assert " prompt_length=60 " in _cmd(dry_all, "dcp_length", x=60)
    assert " prompt_type=attention " in _cmd(dry_all, "map_main", dataset="mmimdb", label="MAP attention",
                                             train=("both", 0.7))
    assert " learning_rate=0.001 " in _cmd(dry_all, "memprompt_main", dataset="hatememes", method="memprompt",
                                           train=("text", 0.7))
    # Fig. 4: trained at missing-both 30 %, swept over every type and rate
    cmd = _cmd(dry_all, "dcp_fig4", train=("both", 0.3))
    assert "missing_ratio.train=0.3" in cmd and cmd.endswith(
        "'test_types=[text,image,both]' 'test_ratios=[0.0,0.1,0.3,0.5,0.7,0.9,1.0]'")
    # Table 6: baseline and DCP on CoCa (on_coca) read the open_clip CoCa state dict from WEIGHTS
    cmd = _cmd(dry_all, "dcp_table6_coca", dataset="food101", method="dcp", train=("image", 0.7))
    assert ("with task_finetune_food101 dcp on_coca missing_type.train=image" in cmd and
            " data_root=/data/arrow/food101 coca_path=/w/coca_ViT-B-32.bin seed=0 " in cmd)
    assert "clip_path" not in cmd and "load_path" not in cmd and "tokenizer" not in cmd
    assert cmd.endswith(" 'test_types=[image]' 'test_ratios=[0.7]'")
    cmd = _cmd(dry_all, "dcp_table6_coca", dataset="hatememes", method="none", train=("both", 0.7))
    assert "with task_finetune_hatememes baseline on_coca missing_type.train=both" in cmd
    assert "coca_path=/w/coca_ViT-B-32.bin" in cmd
    # Fig. 5: complete training data, simulate_missing re-draws each item's case every epoch; swept on 'both'
    cmd = _cmd(dry_all, "dcp_fig5", method="dcp", train=("both", 0.0))
    assert "missing_ratio.train=0.0 missing_ratio.val=0.0" in cmd and " simulate_missing=True " in cmd
    assert cmd.endswith(" 'test_types=[both]' 'test_ratios=[0.0,0.1,0.3,0.5,0.7,0.9,1.0]'")
    # Table 5: the budget keys (MMP = map on_clip)
    cmd = _cmd(dry_all, "dcp_table5", label="MMP 1.6M parameters")
    assert "with task_finetune_mmimdb map on_clip " in cmd and " prompt_length=69 " in cmd
    assert " prompt_length=66 prompt_depth=9 " in _cmd(dry_all, "dcp_table5", label="DCP 6.4M parameters")


def test_table5_budget_keys_match_their_counts():
    """Every runnable DCP Table 5 cell, built at full size on the meta device from its Sacred presets + keys: its
    method parameters (trainable minus `baseline on_clip`'s) are the count in TABLE5_KEYS / the cell note, within
    4 % of the budget (one MMP token on 6 layers is 23,040); the DCP budgets below DCP's fewest parameters at full
    channel width shrink the channels."""
    import warnings

    import torch
    from sacred.initialize import create_run

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from config import ex
    from mdpl.models import build_classifier

    def trainable(named: list[str], keys: dict) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = dict(create_run(ex, "print_config", named_configs=named,
                                  config_updates={"load_path": "", "clip_path": "", **keys}).config)
            with torch.device("meta"):
                return build_classifier(cfg).trainable_parameters_report()[1]

    base = trainable(["task_finetune_mmimdb", "baseline", "on_clip"], {})
    assert base == 419_351
    table = TABLES["dcp_table5"]
    assert {(c.method, c.label.split()[1]) for c in table.runnable} == set(dcp_paper.TABLE5_KEYS)
    for cell in table.runnable:
        budget = float(cell.label.split()[1][:-1]) * 1e6
        count = trainable(matrix.named_configs(cell, tiny=False), dict(cell.keys)) - base
        assert count == dcp_paper.TABLE5_KEYS[(cell.method, cell.label.split()[1])][1], cell.label
        assert abs(count - budget) <= 0.04 * budget, (cell.label, count)   # worst: MMP 0.2M, +3.7 %
        assert f"{count / 1e6:.2f} M method parameters" in cell.note
    assert trainable(["task_finetune_mmimdb", "dcp"], {"prompt_length": 3, "prompt_depth": 1}) - base == \
        dcp_paper.TABLE5_MIN_DCP
    assert not any(c.needs for c in table.cells)
    assert {budget for (method, budget), (keys, _) in dcp_paper.TABLE5_KEYS.items()
            if method == "dcp" and any(k.startswith("dcp_") for k, _ in keys)} == {"0.2M", "1.6M", "2.8M"}


def test_dry_run_keys_exist_in_config_and_run_py_parses_them(dry_all, tmp_path):
    """Every key a command sets is a key of config.py, and run.py's Sacred CLI reads two commands as meant."""
    from runs import resolved_config

    known = set(resolved_config(["task_finetune_mmimdb", "dcp"], {}))
    tiny = cli("all", "--dry-run", "--tiny", "--out", str(tmp_path), "--seeds", "0")
    assert tiny.returncode == 0, tiny.stderr
    tiny_commands = dry_run_commands(tiny.stdout)
    assert all(argv[5] == "tiny" or argv[6] == "tiny" for argv in tiny_commands.values())   # after task + method
    for argv in [*dry_all["commands"].values(), *tiny_commands.values()]:
        used = {a.split("=", 1)[0].split(".")[0] for a in argv[3:] if "=" in a}
        assert used <= known, (used - known, argv)
    coca = [argv for (table, _, _), argv in tiny_commands.items() if table == "dcp_table6_coca"]
    assert len(coca) == 18 and all(argv[5:7] == ["on_coca", "tiny"] and not any("coca_path" in a for a in argv)
                                   for argv in coca)     # --tiny: random-init CoCa at the tiny sizes
    for table, want, expect in (
            ("memprompt_ablation", {"label": "w/o generative prompts"}, ["gen_prompt_layers = []", "mem_size = 16"]),
            ("dcp_table7", {"dataset": "hatememes", "method": "dcp", "train": ("both", 0.7)},
             ["backbone = 'vilt'", "prompt_method = 'dcp'", "test_types = '[both]'", "test_ratios = [0.7]",
              "load_path = '/w/vilt_200k_mlm_itm.ckpt'"]),
            ("dcp_table6_coca", {"dataset": "mmimdb", "method": "dcp", "train": ("text", 0.7)},
             ["backbone = 'coca'", "prompt_method = 'dcp'", "coca_path = '/w/coca_ViT-B-32.bin'",
              "image_size = 224"])):
        argv = dry_all["commands"][(table, cell_by(table, **want).id, 0)]
        res = subprocess.run([sys.executable, "run.py", "print_config", *argv[2:]], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        for text in expect:
            assert text in res.stdout, (text, res.stdout[-3000:])


# ------------------------------------------------------------------------------------------ (b), (c)
def _version_dirs(out: Path) -> set[Path]:
    return set((out / "runs").rglob("version_*"))


def test_tiny_table_end_to_end_then_resume(tmp_path):
    """dcp_length (5 cells with a paper number each) on synthetic data, one seed, 2 runs at a time; then a second
    run skips every cell; then a run whose results.csv is gone is re-evaluated, not retrained."""
    table = TABLES["dcp_length"]
    started = time.perf_counter()
    res = cli("dcp_length", "--tiny", "--out", str(tmp_path), "--seeds", "0", "--jobs", "2")
    elapsed = time.perf_counter() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"dcp_length --tiny: {elapsed:.0f} s")
    runs = _version_dirs(tmp_path)
    assert len(runs) == len(table.cells)

    with open(tmp_path / "dcp_length.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    paper = {r["id"]: float(r["value"]) for r in csv.DictReader(open(PAPER_CSV, newline=""))}
    assert [r["cell"] for r in rows] == [c.id for c in table.cells]
    for row, cell in zip(rows, table.cells):
        assert row["status"] == "done" and row["n"] == "1" and row["seeds"] == "0"
        assert 0 <= float(row["ours_mean"]) <= 100 and float(row["ours_std"]) == 0.0
        assert float(row["paper"]) == paper[cell.paper] and row["paper_split"] == "val"
        assert float(row["diff"]) == pytest.approx(float(row["ours_val_best_mean"]) - float(row["paper"]), abs=1e-3)
        assert row["diff_basis"] == "val (best)" and row["x"] == str(cell.x)
    md = (tmp_path / "dcp_length.md").read_text()
    for row, cell in zip(rows, table.cells):
        line = next(x for x in md.splitlines() if x.startswith(f"| {row['index']} | {cell.label} |"))
        assert f"| {row['paper']} | val | {float(row['diff']):+.2f} | done |" in line
        assert f"| {float(row['ours_mean']):.2f} |" in line
    assert "Δ = ours − paper" in md
    png = tmp_path / "dcp_length.png"
    assert png.is_file() and png.stat().st_size > 5_000

    # (c) resumable: nothing runs again, every cell is reported as done
    res = cli("dcp_length", "--tiny", "--out", str(tmp_path), "--seeds", "0", "--jobs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _version_dirs(tmp_path) == runs
    assert res.stdout.count("# skip dcp_length ") == len(table.cells) and "training ..." not in res.stdout
    assert list(csv.DictReader(open(tmp_path / "dcp_length.csv", newline=""))) == rows

    # a finished training without the cell's results (e.g. the table gained a scenario): evaluated, not retrained
    first = table.cells[0]
    (done,) = [p for p in runs if p.is_relative_to(matrix.seed_dir(first, _tiny_ctx(tmp_path), 0))]
    (done / "results.csv").unlink()
    res = cli("dcp_length", "--tiny", "--out", str(tmp_path), "--seeds", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    new = _version_dirs(tmp_path) - runs
    assert len(new) == 1 and (next(iter(new)).parents[1].name == "eval"), new
    assert f"{first.id} [{first.label}] seed 0: evaluating ..." in res.stdout
    log = (matrix.seed_dir(first, _tiny_ctx(tmp_path), 0) / "eval.log").read_text()
    assert "test_only=True" in log and f"load_path={done}/checkpoints/best-" in log


def _tiny_ctx(out: Path):
    return Context(out=out, tiny=True, seeds=(0,))


# ------------------------------------------------------------------------------------------------ (d)
def _shard_ids(capsys, table: str, shard: str) -> list[str]:
    ctx = Context(out=Path("/nonexistent/out"), data_root="/d", weights="/w", seeds=(0,))
    i, n = (int(v) for v in shard.split("/"))
    assert executor.execute(TABLES[table], ctx, (i, n), dry_run=True) == 0
    return [cell for (_, cell, _) in dry_run_commands(capsys.readouterr().out)]


@pytest.mark.parametrize("n", [2, 3])
def test_cells_shards_partition_the_runnable_cells(capsys, n):
    for name, table in TABLES.items():
        shards = [_shard_ids(capsys, name, f"{i}/{n}") for i in range(1, n + 1)]
        flat = [c for s in shards for c in s]
        assert sorted(flat) == sorted(c.id for c in table.runnable), name     # every cell once
        assert len(flat) == len(set(flat))
        if len(table.runnable) >= n:
            assert all(shards), name                                          # round robin: none empty


def test_cli_refuses_bad_arguments(tmp_path):
    for args in (["dcp_main", "--cells", "0/2", "--dry-run"], ["dcp_main", "--cells", "3/2", "--dry-run"],
                 ["nope", "--dry-run"], ["dcp_main"], ["dcp_main", "--dry-run", "--set", "seed=3"],
                 ["dcp_main", "--dry-run", "--seeds", "0,0"], ["dcp_main", "--dry-run", "--jobs", "0"]):
        res = cli(*args, "--out", str(tmp_path))
        assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("scripts/reproduce.py: error:"), args
    for key in ("coca_path", "clip_path", "load_path"):   # the weight files are the driver's (--weights)
        assert cli("dcp_main", "--dry-run", "--set", f"{key}=/elsewhere", "--out", str(tmp_path)).returncode == 2
    # a real run checks its data and weights before running anything
    assert cli("dcp_fig3", "--data-root", str(tmp_path / "no"), "--weights", str(tmp_path / "w"),
               "--out", str(tmp_path / "out"), "--seeds", "0").returncode == 1
    assert not (tmp_path / "out" / "runs").exists()


# ------------------------------------------------------------------------------------ registry & data
def test_registry_and_paper_results():
    with open(PAPER_CSV, newline="") as fh:
        paper = list(csv.DictReader(fh))
    ids = [r["id"] for r in paper]
    assert len(ids) == len(set(ids))
    assert "/work/shared" not in PAPER_CSV.read_text() and "shared" not in PAPER_CSV.read_text()
    values = {r["id"]: r["value"] for r in paper}
    for pid, value in {"dcp/t4/mmimdb/test/both/70/dcp": "51.42", "dcp/t4/food101/val/image/90/dcp": "86.26",
                       "dcp/t4/hatememes/test/text/90/mmp": "57.21", "dcp/t4/food101/test/image/50/dept": "82.14",
                       "dcp/t7/hatememes/both/mmp": "66.07", "dcp/t7/mmimdb/text/dcp": "45.26",
                       "dcp/t6/food101/image/dcp": "86.26", "dcp/t1/no_projection": "52.54",
                       "dcp/t8/len36": "54.24", "dcp/t5/mmp/0.2M": "51.34",
                       "memprompt/abstract/food101/memprompt": "77.06"}.items():
        assert values[pid] == value, pid
    assert sum(r["source"] == "Table 4" for r in paper) == 3 * 9 * 10
    ctx = Context(out=Path("/x"))
    counts = {}
    for name, table in TABLES.items():
        ids_t = [c.id for c in table.cells]
        assert len(ids_t) == len(set(ids_t)), name
        keys = [matrix.run_key(c, ctx) for c in table.runnable]
        assert len(keys) == len(set(keys)), name          # shards of one table never train the same run
        for cell in table.cells:
            assert not cell.paper or cell.paper in values, (name, cell.paper)
        counts[name] = (len(table.cells), len(table.runnable))
    assert counts["dcp_main"] == (54, 54) and counts["map_main"] == (27, 27) and counts["dcp_table7"] == (18, 18)
    assert counts["dcp_fig5"] == (3, 3) and counts["dcp_table6_coca"] == (18, 18) and counts["dcp_design"] == (14, 14)
    assert counts["dcp_table5"] == (12, 12) and counts["scp_main"] == (27, 27) and counts["mora_main"] == (27, 27)
    assert counts["msps_main"] == (36, 36)
    builtin = [n for n in TABLES if n.split("_")[0] in ("dcp", "map", "memprompt", "scp", "mora", "msps")]
    assert len(builtin) == 20                             # a plugin's paper tables come on top of these
    assert sum(counts[n][0] for n in builtin) == 328 and sum(counts[n][1] for n in builtin) == 328
    assert len({matrix.run_key(c, ctx) for n in builtin for c in TABLES[n].runnable}) == 197
    # SCP's numbers were not found (no paper column); MoRA's 70 % numbers are its missing-both cells
    assert not any(c.paper for c in TABLES["scp_main"].cells)
    linked = {c.paper: values[c.paper] for c in TABLES["mora_main"].cells if c.paper}
    assert linked == {"mora/t70/mmimdb/mora": "52.97", "mora/t70/food101/mora": "83.77",
                      "mora/t70/hatememes/mora": "70.15", "mora/t70/mmimdb/dcp": "51.42",
                      "mora/t70/food101/dcp": "81.87", "mora/t70/hatememes/dcp": "66.08"}
    assert all(c.train == ("both", 0.7) for c in TABLES["mora_main"].cells if c.paper)
    assert linked["mora/t70/mmimdb/dcp"] == values["dcp/t4/mmimdb/test/both/70/dcp"]   # why 'both' is read
    # MSPs' own numbers were not found: only RAGPT's re-run on a metric the cells report (HM AUROC, text missing)
    linked = [(c.dataset, c.train, c.method, values[c.paper]) for c in TABLES["msps_main"].cells if c.paper]
    assert linked == [("hatememes", ("text", 0.7), "msps", "59.60")]
    map_runs = {matrix.run_key(c, ctx) for c in TABLES["map_main"].runnable}
    new = {matrix.run_key(c, ctx) for c in TABLES["msps_main"].runnable} - map_runs
    assert len(new) == 9 and all(c.method == "msps" for c in TABLES["msps_main"].runnable
                                 if matrix.run_key(c, ctx) in new)
    # the CoCa runs are their own: no other table trains a CoCa run, and each names the backbone in its folder
    coca = {matrix.run_key(c, ctx) for c in TABLES["dcp_table6_coca"].runnable}
    assert len(coca) == 18 and all("@coca-" in k for k in coca)
    assert not coca & {matrix.run_key(c, ctx) for n, t in TABLES.items() if n != "dcp_table6_coca" for c in t.runnable}
    # the DCP cells of Table 4 all carry their paper number
    assert all(c.paper for c in TABLES["dcp_main"].cells if c.method == "dcp")


def test_resource_keys_do_not_change_a_runs_identity():
    """--set of a resource key (pixel_cache: an exact loader cache; weight checksums) keeps the run folder; a key
    that changes what the run computes gives another one."""
    cell = cell_by("dcp_table6_coca", dataset="mmimdb", method="dcp", train=("both", 0.7))
    base = Context(out=Path("/x"))
    key = matrix.run_key(cell, base)
    for extra in (("pixel_cache", "True"), ("pixel_cache", "/cache"), ("coca_sha256", "ab" * 32),
                  ("per_gpu_batchsize", "32")):
        assert matrix.run_key(cell, Context(out=Path("/x"), sets=(extra,))) == key, extra
    assert matrix.run_key(cell, Context(out=Path("/x"), sets=(("coca_pool_prompts", "True"),))) != key
    assert matrix.is_resource_key("pixel_cache") and matrix.is_resource_key("coca_sha256")
    # a real run checks the CoCa weights file before it starts
    problems = executor.check_inputs([cell], Context(out=Path("/x"), data_root="/nonexistent/arrow", weights="/nonexistent/w"))
    assert "missing: /nonexistent/w/coca_ViT-B-32.bin" in problems


def test_report_mean_std_over_seeds_and_the_papers_split(tmp_path):
    """collect() from fabricated run outputs: mean ± sample std over seeds, val-split paper compared with the best
    validation score, a seed without results leaves the cell partial."""
    ctx = Context(out=tmp_path, seeds=(0, 1, 2))
    cell = cell_by("dcp_length", x=12)
    for seed, (test, vals) in {0: (0.40, [0.30, 0.50]), 1: (0.44, [0.52])}.items():
        run = matrix.seed_dir(cell, ctx, seed) / "finetune_mmimdb_seed0_from_scratch" / "version_0"
        (run / "csv").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "best-epoch00-step1.ckpt").write_text("x")
        (run / "test_metrics.json").write_text(json.dumps({"checkpoint": str(run / "checkpoints/best-epoch00-step1.ckpt"),
                                                           "metrics": {}}))
        (run / "results.csv").write_text("dataset,method,backbone,checkpoint,type,ratio,seed,F1_Macro,F1_Micro,loss\n"
                                         f"mmimdb,dcp,clip,c,both,0.7,{seed},{test},0.9,1.0\n")
        (run / "csv" / "metrics.csv").write_text("epoch,val/the_metric,step\n" +
                                                 "".join(f"0,{v},1\n,,2\n" for v in vals))
    rows = summary.collect(TABLES["dcp_length"], ctx, summary.load_paper(PAPER_CSV))
    row = rows[0]
    assert (row["n"], row["seeds"], row["status"]) == (2, "0 1", "2/3 seeds")
    assert float(row["ours_mean"]) == pytest.approx(42.0) and float(row["ours_std"]) == pytest.approx(2.8284, abs=1e-4)
    assert float(row["ours_val_best_mean"]) == pytest.approx(51.0)          # best of each run: 50, 52
    assert float(row["diff"]) == pytest.approx(51.0 - 53.56) and row["paper"] == "53.56"
    assert all(r["status"] == "pending" and r["ours_mean"] == "" for r in rows[1:])
    md = summary.markdown(TABLES["dcp_length"], rows, ctx, "")
    assert "| 1 | prompt_length=12 | mmimdb | F1-Macro | both 70% | both 70% | 42.00 ± 2.83 | 51.00 ± 1.41 | 53.56 | " \
           "val | -2.56 | 2/3 seeds |" in md
    # a killed training (last.ckpt, no test) resumes; a finished one with missing scenarios is re-evaluated
    other = cell_by("dcp_length", x=24)
    run = matrix.seed_dir(other, ctx, 0) / "finetune_mmimdb_seed0_from_scratch" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("x")
    assert results.training_state(other, ctx, 0)[0] == "resume"
    cmd = matrix.train_command(other, ctx, 0, (["both"], [0.7]), resume=True)
    assert cmd[-1] == "resume=True"
    assert results.training_state(cell, ctx, 0)[0] == "trained"


def test_list_and_device_hours_from_bench_json(tmp_path):
    res = cli("--list")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for name in TABLES:
        assert f"\n{name} " in out
    assert "distinct training runs per seed" in out
    bench = {"rows": [{"method": m, "backbone": b, "dataset": d, "precision": "bf16-mixed", "status": "ok",
                       "train_samples_per_s": 100.0, "eval_samples_per_s": 400.0}
                      for m, b in (("dcp", "clip"), ("map", "vilt")) for d in BUILTIN_DATASETS]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    ctx = Context(out=tmp_path)
    cell = cell_by("dcp_length", x=12)
    n_train, n_val, n_test = dataset_spec("mmimdb").nominal_sizes
    expected = (20 * n_train / 100 + 20 * 5 * n_val / 400 + 1 * n_test / 400) / 3600
    assert estimate.run_hours(cell, ctx, bench["rows"], "bf16-mixed", 1) == pytest.approx(expected)
    res = cli("dcp_length", "--list", "--bench", str(tmp_path / "bench.json"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "dcp_length" in out and "prompt_length=60" in out


def test_device_hours_from_counted_flops_and_an_assumed_mfu(tmp_path):
    """--assume-mfu: sample passes x the bench's FLOPs per sample / (peak x MFU); rows of any precision serve."""
    bench = {"rows": [{"method": "dcp", "backbone": "clip", "dataset": d, "precision": "fp32", "status": "ok",
                       "train_samples_per_s": 1.0, "eval_samples_per_s": 2.0,
                       "train_gflops_per_sample": 30.0, "eval_gflops_per_sample": 10.0} for d in BUILTIN_DATASETS]}
    cell = cell_by("dcp_length", x=12)
    n_train, n_val, n_test = dataset_spec("mmimdb").nominal_sizes
    flops = 1e9 * (20 * n_train * 30.0 + (20 * 5 * n_val + 2 * n_test) * 10.0)
    got = estimate.run_hours(cell, Context(out=tmp_path), bench["rows"], "bf16-mixed", 2, mfu=0.25)
    assert got == pytest.approx(flops / (989e12 * 0.25) / 3600)
    assert estimate.run_hours(cell, Context(out=tmp_path), bench["rows"], "bf16-mixed", 2) is None   # no bf16 row
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    res = cli("dcp_length", "--list", "--bench", str(tmp_path / "bench.json"), "--assume-mfu", "0.25")
    assert res.returncode == 0 and "25% assumed MFU" in res.stdout, res.stderr
    assert cli("--list", "--bench", str(tmp_path / "bench.json"), "--assume-mfu", "2").returncode == 2


# ------------------------------------------------------------------------------------ all methods, one protocol
def test_all_methods_table_is_built_from_the_registry():
    """Every registered method is a row (on its paper's backbone), the baseline once per backbone; a method
    registered later (a plugin) is a row too, with no edit elsewhere."""
    from mdpl.backbones.registry import method_backbone
    from mdpl.experiments import protocol
    from mdpl.prompts.base import PromptMethod
    from mdpl.prompts.registry import available_methods, registered

    table = TABLES["all_methods"]
    assert "all_methods" in cli("--list").stdout
    rows = {(c.method, c.net) for c in table.cells}
    assert rows == {("none", "vilt"), ("none", "clip"), *((m, method_backbone(m)) for m in available_methods())}
    assert len(table.cells) == 9 * len(rows) and not any(c.paper or c.needs for c in table.cells)
    assert {(c.dataset, c.train, c.test_types, c.test_ratios) for c in table.cells} == {
        (ds, (t, 0.7), (t,), (0.7,)) for ds in BUILTIN_DATASETS for t in ("text", "image", "both")}
    ctx = Context(out=Path("/x"))   # shared runs: MAP on ViLT is map_main's, DCP on CLIP dcp_main's
    assert matrix.run_key(cell_by("all_methods", method="map", dataset="food101", train=("image", 0.7)), ctx) == \
        matrix.run_key(cell_by("map_main", method="map", dataset="food101", train=("image", 0.7), keys={}), ctx)
    papers = {matrix.run_key(c, ctx) for name, t in TABLES.items() if name != "all_methods" for c in t.cells}
    assert {matrix.run_key(c, ctx) for c in table.cells} <= papers    # no training of its own (paper_cell keys)

    class Plugged(PromptMethod):
        title = "Plugged"
        paper_backbone = "coca"

    with registered(Plugged, "plugged"):
        plugged = protocol.all_methods_table()
    labels = list(dict.fromkeys(c.label for c in plugged.cells))
    assert labels[-1] == "Plugged (coca)" and "baseline (coca)" in labels
    assert len(plugged.cells) == len(table.cells) + 2 * 9


def test_all_methods_tiny_one_scenario_of_every_row(tmp_path):
    """--tiny with --cells k/9 (the cells are row-major over the 9 scenarios): one cell of every row runs, here
    Hateful Memes with the text missing (the scenario no figure sweeps, so each run tests once)."""
    from mdpl.experiments import protocol

    table = TABLES["all_methods"]
    k = protocol.scenarios().index(("hatememes", "text")) + 1
    res = cli("all_methods", "--tiny", "--out", str(tmp_path), "--seeds", "0", "--jobs", "2",
              "--cells", f"{k}/{len(protocol.scenarios())}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(tmp_path / "all_methods.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["cell"] for r in rows] == [c.id for c in table.cells]
    done = [r for r in rows if r["status"] == "done"]
    assert {(r["method"], r["backbone"]) for r in done} == {(c.method, c.net) for c in table.cells}
    assert len(done) == len(protocol.protocol_rows())
    for r in done:
        assert (r["dataset"], r["test_type"], r["n"]) == ("hatememes", "text", "1")
        assert 0 <= float(r["ours_mean"]) <= 100 and r["paper"] == ""
    assert all(r["status"] == "pending" for r in rows if r not in done)
    assert (tmp_path / "all_methods.png").stat().st_size > 5_000


def test_weight_files_of_cell_keys_resolve_in_the_weights_folder():
    """A cell key naming a file of the weights folder (RAGPT's retriever): the command holds its path in --weights,
    the run's identity only its name; --tiny uses a random retriever (no file)."""
    cell = next(c for c in TABLES["ragpt_main"].cells if c.method == "ragpt")
    ours, other = Context(out=Path("/x"), weights="/w1"), Context(out=Path("/x"), weights="/w2")
    assert "ragpt_retriever_path=/w1/ViT-L-14-336px.pt" in matrix.train_command(cell, ours, 0, (["text"], [0.7]))
    assert matrix.run_key(cell, ours) == matrix.run_key(cell, other)
    tiny = matrix.train_command(cell, Context(out=Path("/x"), tiny=True), 0, (["text"], [0.7]))
    assert "ragpt_retriever_path=" in tiny and not any("ViT-L" in a for a in tiny)
