"""scripts/bench.py (issue 6): the smallest run produces a full table, and the analytic FLOPs match
torch's FlopCounterMode (math SDPA, so attention matmuls are visible) for every method."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("mdpl_bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mdpl_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_small_run_writes_a_row_per_method_and_precision(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--small", "--steps", "1", "--warmup", "0", "--device", "cpu", "--datasets", "hatememes",
                         "--precisions", "fp32,bf16-mixed", "--json", str(out), "--loader-workers", "0",
                         "--loader-batches", "2", "--loader-rows", "12", "--loader-batch-size", "4"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {(r["method"], r["precision"]): r for r in saved["rows"]}
    assert set(rows) == {(m, p) for m in bench.METHODS for p in ("fp32", "bf16-mixed")}
    for (method, _), r in rows.items():
        assert r["status"] == "ok" and r["batch"] == 8 and r["dataset"] == "hatememes"
        assert r["backbone"] == ("clip" if method == "dcp" else "vilt")
        assert r["train_samples_per_s"] > 0 and r["eval_samples_per_s"] > 0
        assert r["train_gflops_per_sample"] > r["eval_gflops_per_sample"] > 0
        assert r["train_mfu"] is None  # no peak FLOP/s known on CPU without --peak-tflops
        assert 0 < r["params_trainable"] < r["params_total"]
    # input prompts lengthen the ViLT sequence (tiny: MAP 2 x 6 tokens, MemPrompt 2 x (2x4 + 2x4))
    seq = {m: rows[(m, "fp32")]["seq_len"] for m in ("none", "map", "memprompt")}
    assert seq["none"] < seq["map"] < seq["memprompt"]
    assert [(r["dataset"], r["backbone"]) for r in saved["loader"]] == [("hatememes", "vilt"), ("hatememes", "clip")]
    assert all(r["images_per_s"] > 0 and r["batches_timed"] == 2 for r in saved["loader"])


def test_fp16_is_skipped_on_cpu():
    args = bench.parse_args(["--small", "--steps", "1", "--warmup", "0"])
    row = bench.bench_row("none", "hatememes", "fp16-mixed", 2, args, torch.device("cpu"))
    assert row["status"].startswith("skipped")


@pytest.mark.parametrize("method,overrides", [("none", {}), ("map", {}), ("map", {"prompt_type": "attention"}),
                                              ("memprompt", {}), ("dcp", {})])
def test_analytic_flops_match_flop_counter(method, overrides):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mdpl.engine.losses import task_loss

    cfg = bench.resolve_config(method, "mmimdb", True, overrides)
    torch.manual_seed(0)
    model = bench.build_model(cfg).train()
    batch = bench.synthetic_batch(cfg, 6, "small", torch.device("cpu"), seed=1)
    flops = bench.batch_flops(cfg, batch, model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(batch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train:
        task_loss("mmimdb", model(batch)["logits"], batch["label"]).backward()
    assert flops.forward == pytest.approx(fwd.get_total_flops(), rel=0.01)
    assert flops.train == pytest.approx(train.get_total_flops(), rel=0.01)
    assert flops.train > 1.5 * flops.forward if method != "none" else flops.train < 1.1 * flops.forward


def test_synthetic_batch_follows_the_contract():
    cfg = bench.resolve_config("map", "mmimdb", True)
    batch = bench.synthetic_batch(cfg, 6, "small", torch.device("cpu"))
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
    full = bench.synthetic_batch(bench.resolve_config("map", "mmimdb", True), 6, "small", torch.device("cpu"))
    cfg = bench.resolve_config("map", "mmimdb", True, {"dynamic_text_padding": True})
    cut = bench.synthetic_batch(cfg, 6, "small", torch.device("cpu"))
    longest = int(full["text_masks"].sum(dim=1).max())
    assert longest < cfg["max_text_len"]
    assert cut["text_ids"].shape == (6, longest)
    assert torch.equal(cut["text_ids"], full["text_ids"][:, :longest])
    assert torch.equal(cut["text_masks"], full["text_masks"][:, :longest])


def test_training_memory_counts_the_first_step():
    """The meter starts before the warm-up, so gradients + optimizer state (allocated once) are seen on CPU."""
    args = bench.parse_args(["--small", "--steps", "1", "--warmup", "1", "--dynamic-text-padding"])
    row = bench.bench_row("memprompt", "hatememes", "fp32", 4, args, torch.device("cpu"))
    assert row["status"] == "ok" and row["dynamic_text_padding"] is True
    assert row["text_len"] < bench.SMALL_TEXT_LEN["hatememes"]
    if row["mem_kind"] == "rss_peak_delta" and row["train_peak_mib"] is not None:
        assert row["train_peak_mib"] > 0
