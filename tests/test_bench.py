"""scripts/bench.py and mdpl.bench: the smallest run produces a full table; its FLOPs are FlopCounterMode counts of
each row's own forward / training step (equal to a direct count on the same model and batches, and the forward to the
count of the math attention decomposition), and its MFU is FLOPs / step time / peak as printed."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdpl.bench.batches import synthetic_batch
from mdpl.bench.models import build_model, resolve_config
from mdpl.bench.steps import bench_row
from mdpl.data.registry import dataset_spec
from mdpl.prompts.base import PromptMethod
from mdpl.prompts.registry import available_methods, method_class
from mdpl.backbones.registry import method_backbone

ROOT = Path(__file__).resolve().parents[1]


def bench_cli(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """scripts/bench.py in a subprocess: (its --json result, its stdout)."""
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def options(**overrides) -> argparse.Namespace:
    """The options of one `--small --steps 1 --warmup 0` row, as scripts/bench.py parses them."""
    return argparse.Namespace(**{"small": True, "steps": 1, "warmup": 0, "text_padding": "default", "backbone": "paper",
                                 "compile": False, "peak_tflops": None, "tf32": False, **overrides})


def test_small_run_writes_a_row_per_method_and_precision(tmp_path):
    saved, _ = bench_cli(tmp_path, "--small", "--steps", "1", "--warmup", "0", "--device", "cpu", "--datasets",
                         "hatememes", "--precisions", "fp32,bf16-mixed", "--loader-workers", "0",
                         "--loader-batches", "2", "--loader-rows", "12", "--loader-batch-size", "4")
    rows = {(r["method"], r["precision"]): r for r in saved["rows"]}
    assert set(rows) == {(m, p) for m in available_methods() for p in ("fp32", "bf16-mixed")}
    assert {"scp", "mora"} <= {m for m, _ in rows}          # the newer methods have their rows
    for (method, _), r in rows.items():
        assert r["status"] == "ok" and r["batch"] == 8 and r["dataset"] == "hatememes"
        assert r["backbone"] == method_backbone(method)     # vilt, but clip for DCP and MoRA
        assert r["train_samples_per_s"] > 0 and r["eval_samples_per_s"] > 0
        assert r["train_gflops_per_sample"] > r["eval_gflops_per_sample"] > 0
        # executed vs needed FLOPs, peak memory; a method's batch-independent work (its ``prepare``: AOEPT's proxy
        # prompts) is paid once per batch but once per sample in the per-sample sum: up to 1 % more "needed"
        slack = 1e-2 if method == "aoept" else 1e-9
        for phase in ("train", "eval"):
            assert 0 < r[f"{phase}_gflops_needed_per_sample"] <= r[f"{phase}_gflops_per_sample"] * (1 + slack)
            assert f"{phase}_peak_mib" in r
        assert r["train_mfu"] is None  # no peak FLOP/s known on CPU without --peak-tflops
        assert 0 < r["params_trainable"] < r["params_total"]
    # input prompts lengthen the ViLT sequence (tiny: MAP 2 x 6 tokens, MemPrompt 2 x (2x4 + 2x4))
    seq = {m: rows[(m, "fp32")]["seq_len"] for m in ("none", "map", "memprompt")}
    assert seq["none"] < seq["map"] < seq["memprompt"]
    assert [(r["dataset"], r["backbone"]) for r in saved["loader"]] == [("hatememes", "vilt"), ("hatememes", "clip")]
    assert all(r["images_per_s"] > 0 and r["batches_timed"] == 2 for r in saved["loader"])
    assert saved["meta"]["complete"] is True


def test_fp16_is_skipped_on_cpu():
    row = bench_row("none", "hatememes", "fp16-mixed", 2, options(), torch.device("cpu"))
    assert row["status"].startswith("skipped")


def direct_counts(method: str, dataset: str, batch_size: int, math_attention: bool) -> list[tuple[int, int]]:
    """(forward, training step) FlopCounterMode totals on the model and the two batches of a `--small` bench row.

    math_attention: SDPA decomposed into matmuls, which plain FlopCounterMode sees on the CPU; otherwise the CPU
    fused kernel, counted with torch's formulas of the fused CUDA kernels (forward QK^T and AV; backward with
    the scores recomputed, dQ, dK and dV)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from mdpl.engine.losses import task_loss

    aten = torch.ops.aten
    formulas = {} if math_attention else {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}
    cfg = resolve_config(method, dataset, True, {"per_gpu_batchsize": batch_size})   # the bench's defaults
    torch.manual_seed(0)
    model = build_model(cfg)
    counts = []
    for seed in range(2):
        batch = synthetic_batch(cfg, batch_size, "small", torch.device("cpu"), seed=seed)
        with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            model.eval()
            with FlopCounterMode(display=False, custom_mapping=formulas) as forward, torch.inference_mode():
                model(batch)
            model.train()
            with FlopCounterMode(display=False, custom_mapping=formulas) as train:
                task_loss(dataset, model(batch)["logits"], batch["label"]).backward()
        model.zero_grad(set_to_none=True)
        counts.append((forward.get_total_flops(), train.get_total_flops()))
    return counts


@pytest.mark.parametrize("method", ["none", "map", "memprompt", "dcp", "scp", "mora"])
def test_flops_are_flop_counter_counts_and_mfu_is_as_printed(method, tmp_path):
    batch_size, peak = 4, 0.002
    result, stdout = bench_cli(tmp_path, "--small", "--steps", "1", "--warmup", "0", "--device", "cpu", "--datasets",
                               "mmimdb", "--precisions", "fp32", "--batch-size", str(batch_size), "--methods", method,
                               "--peak-tflops", str(peak), "--no-loader")
    row = result["rows"][0]
    assert row["status"] == "ok" and row["peak_tflops"] == peak
    fused, math = direct_counts(method, "mmimdb", batch_size, False), direct_counts(method, "mmimdb", batch_size, True)
    per_sample = [sum(c[i] for c in fused) / 2 / batch_size / 1e9 for i in (0, 1)]
    assert row["eval_gflops_per_sample"] == pytest.approx(per_sample[0], rel=1e-12)
    assert row["train_gflops_per_sample"] == pytest.approx(per_sample[1], rel=1e-12)
    for (f_fwd, f_train), (m_fwd, m_train) in zip(fused, math):
        assert f_fwd == m_fwd                        # fused attention forward: the same two matmuls as math SDPA
        if method == "none":                         # frozen backbone: no attention backward at all
            assert f_train == m_train
        else:                                        # the fused backward recomputes the scores (and all of dQ/dK/dV)
            assert m_train < f_train < m_train + f_fwd
    for phase in ("train", "eval"):   # the answer needs no more than the batched step executes (padding, rows)
        assert 0 < row[f"{phase}_gflops_needed_per_sample"] <= row[f"{phase}_gflops_per_sample"] * (1 + 1e-9)
        assert row[f"{phase}_cpu_ms"] > 0
    for phase in ("train", "eval"):
        flops = row[f"{phase}_gflops_per_sample"] * 1e9 * batch_size
        seconds = row[f"{phase}_step_ms"] / 1e3
        assert row[f"{phase}_tflops_per_s"] == pytest.approx(flops / seconds / 1e12, rel=1e-9)
        assert row[f"{phase}_mfu"] == pytest.approx(flops / seconds / 1e12 / peak, rel=1e-9)
    line = next(l for l in stdout.splitlines() if l.startswith(method))
    fields = line.split()
    assert fields[-3] == format(row["train_gflops_per_sample"], ".3g")
    assert fields[-2:] == [f"{100 * row['train_mfu']:.1f}%", f"{100 * row['eval_mfu']:.1f}%"]


def test_synthetic_batch_follows_the_contract():
    cfg = resolve_config("map", "mmimdb", True, {"dynamic_text_padding": False})
    batch = synthetic_batch(cfg, 6, "small", torch.device("cpu"))
    assert batch["image"].shape[:2] == (6, 3) and batch["image"].shape[2] > batch["image"].shape[3]  # posters
    assert batch["text_ids"].shape == (6, cfg["max_text_len"]) and batch["text_ids"].dtype == torch.long
    assert set(batch["missing_type"].tolist()) == {0, 1, 2}
    text_missing = batch["missing_type"] == 1
    assert batch["text_masks"][text_missing].sum(dim=1).tolist() == [2] * int(text_missing.sum())
    image_missing = batch["missing_type"] == 2
    h, w = batch["image_sizes"][image_missing][0].tolist()
    assert torch.all(batch["image"][image_missing][0, :, :h, :w] == 1.0)
    assert batch["label"].shape == (6, 23)
    assert batch["image_sizes_host"] == tuple(tuple(s) for s in batch["image_sizes"].tolist())


def test_dynamic_text_padding_cuts_the_batch_to_its_longest_text():
    full = synthetic_batch(resolve_config("map", "mmimdb", True), 6, "small", torch.device("cpu"))
    cfg = resolve_config("map", "mmimdb", True, {"dynamic_text_padding": True})
    cut = synthetic_batch(cfg, 6, "small", torch.device("cpu"))
    longest = int(full["text_masks"].sum(dim=1).max())
    assert longest < cfg["max_text_len"]
    assert cut["text_ids"].shape == (6, longest)
    assert torch.equal(cut["text_ids"], full["text_ids"][:, :longest])
    assert torch.equal(cut["text_masks"], full["text_masks"][:, :longest])


def test_training_memory_counts_the_first_step():
    """The meter starts before the warm-up, so gradients + optimizer state (allocated once) are seen on CPU."""
    row = bench_row("memprompt", "hatememes", "fp32", 4, options(warmup=1, text_padding="dynamic"), torch.device("cpu"))
    assert row["status"] == "ok" and row["dynamic_text_padding"] is True
    assert row["text_len"] < dataset_spec("hatememes").bench_small_text_len
    if row["mem_kind"] == "rss_peak_delta" and row["train_peak_mib"] is not None:
        assert row["train_peak_mib"] > 0


def test_every_backbone_is_benchmarked_with_backbone_option(tmp_path):
    """`--backbone coca` runs every method on CoCa (the default pairs each method with its paper's backbone)."""
    result, _ = bench_cli(tmp_path, "--small", "--steps", "1", "--warmup", "0", "--device", "cpu", "--datasets",
                          "hatememes", "--precisions", "fp32", "--batch-size", "4", "--methods", "map,dcp",
                          "--backbone", "coca", "--no-loader")
    assert [(r["method"], r["backbone"], r["status"]) for r in result["rows"]] == [("map", "coca", "ok"),
                                                                                  ("dcp", "coca", "ok")]


# ------------------------------------------------------------------------------------------------ preparation stage
def test_preparation_only_times_the_builtin_need_on_every_paper_backbone(tmp_path):
    """No selected method declares a need: one built-in row per paper backbone (every layer of every stream +
    k-means), with positive samples/s over collection + k-means, peak memory, and its line in the printed table."""
    methods = [m for m in available_methods() if method_class(m).preparation_needs is PromptMethod.preparation_needs]
    assert len(methods) >= 2
    result, stdout = bench_cli(tmp_path, "--preparation-only", "--small", "--device", "cpu", "--datasets",
                               "hatememes", "--batch-size", "4", "--preparation-batches", "2", "--warmup", "0",
                               "--methods", ",".join(methods))
    assert result["rows"] == [] and result["loader"] == []
    rows = result["preparation"]
    assert [r["backbone"] for r in rows] == list(dict.fromkeys(method_backbone(m) for m in methods))
    assert sorted(m for r in rows for m in r["methods"]) == sorted(methods)
    for r in rows:
        assert (r["method"], r["need"], r["status"], r["dataset"], r["precision"]) == \
            ("built-in", "built-in", "ok", "hatememes", "fp32")
        assert r["batch"] == 4 and r["samples"] == 8 and "peak_mib" in r and r["mem_kind"]
        assert r["samples_per_s"] > 0 and r["collect_samples_per_s"] >= r["samples_per_s"]
        assert r["samples_per_s"] == pytest.approx(r["samples"] / (r["collect_s"] + r["compute_s"]), rel=1e-9)
        info = build_model(resolve_config(r["methods"][0], "hatememes", True)).backbone.info
        assert r["features"] == {f"{s.name}_all_layers": [s.num_layers + 1, s.width] for s in info.streams}
        assert r["kmeans_k"] == {name: 4 for name in r["features"]} and r["neighbours_k"] == {}
        line = next(l for l in stdout.splitlines() if l.startswith("built-in") and f" {r['backbone']} " in l)
        assert line.split()[1:6] == [r["backbone"], "hatememes", "4", "8", format(r["samples_per_s"], ".4g")]


def test_preparation_times_a_declared_need():
    """A method that declares a need gets its own row with that need (the built-in one is not used)."""
    from mdpl.bench.preparation import plan, preparation_rows
    from mdpl.prompts import FeatureRequest, KMeansRequest, NeighbourRequest, PreparationNeed, PromptMethod, registered

    class Prepped(PromptMethod):
        def preparation_needs(self) -> PreparationNeed:
            s = self.info.streams[0]
            return PreparationNeed((FeatureRequest("first", s.name, (0, 1), pooling="first"),),
                                   kmeans=(KMeansRequest("first", 3, iters=5),),
                                   neighbours=(NeighbourRequest("first", 1, k=2),), missing="complete")

    with registered(Prepped, "prepped"):
        assert plan(["none", "prepped"], "paper") == [("prepped", "declared", ["prepped"])]
        logged: list[dict] = []
        args = options(method_list=["none", "prepped"], dataset_list=["food101"], preparation_batches=3,
                       preparation_k=None)
        (row,) = preparation_rows(args, torch.device("cpu"), [2], logged.append)
    assert logged == [row]
    assert (row["method"], row["need"], row["status"], row["samples"]) == ("prepped", "declared", "ok", 6)
    assert row["features"] == {"first": [2, 64]} and row["kmeans_k"] == {"first": 3}
    assert row["neighbours_k"] == {"first": 2} and row["samples_per_s"] > 0
    cfg = resolve_config("map", "food101", True)
    mixed, complete = (synthetic_batch(cfg, 6, "small", torch.device("cpu"), complete=c) for c in (False, True))
    assert set(mixed["missing_type"].tolist()) == {0, 1, 2} and complete["missing_type"].eq(0).all()
    assert torch.equal(mixed["label"], complete["label"])


def test_a_stopped_run_leaves_the_rows_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten after every row, so a run stopped by a time limit (here: at its second row) keeps the
    first one, marked incomplete."""
    import mdpl.bench.suite as suite

    calls = []

    def row(method, dataset, precision, bs, args, device):
        if calls:
            raise KeyboardInterrupt   # the stop, at the point the test chooses
        calls.append(method)
        return {"method": method, "dataset": dataset, "precision": precision, "batch": bs, "status": "skipped"}

    monkeypatch.setattr(suite, "bench_row", row)
    bench = importlib.util.spec_from_file_location("_bench_cli", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(module)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        module.main(["--small", "--device", "cpu", "--methods", "none,map", "--datasets", "hatememes", "--precisions",
                     "fp32", "--no-loader", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] is False
    assert [(r["method"], r["status"]) for r in saved["rows"]] == [("none", "skipped")]


def test_profile_keeps_the_operators_with_the_most_self_time(tmp_path):
    saved, _ = bench_cli(tmp_path, "--small", "--steps", "1", "--warmup", "1", "--device", "cpu", "--methods", "map",
                         "--datasets", "hatememes", "--precisions", "fp32", "--no-loader", "--profile", "4")
    (row,) = saved["rows"]
    top = row["train_top_kernels"]
    assert len(top) == 4 and all(k["name"].startswith("aten::") for k in top)
    times = [k["self_ms_per_step"] for k in top]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    assert 0 < sum(k["share"] for k in top) <= 1 and all(k["calls_per_step"] >= 0.5 for k in top)
    plain, _ = bench_cli(tmp_path, "--small", "--steps", "1", "--warmup", "0", "--device", "cpu", "--methods", "map",
                         "--datasets", "hatememes", "--precisions", "fp32", "--no-loader")
    assert "train_top_kernels" not in plain["rows"][0]
