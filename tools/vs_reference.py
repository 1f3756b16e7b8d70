"""A/B timing of mdpl against the reference implementations: README "Measured against the reference code".

    python tools/vs_reference.py --refs REFS_DIR [--device cpu|cuda] [--size full|small] [--repeats 3]
                                 [--methods map,memprompt,dcp] [--datasets mmimdb,food101,hatememes]

REFS_DIR holds the reference checkouts at their pinned commits (tools/parity/common.py; a missing one is reported
with the ``git clone`` / ``git checkout`` lines). Every measurement runs in a fresh process, mdpl and the reference
alternating (which goes first alternates too); each figure is the median over ``--repeats`` processes per side.

Both sides get the *same* batch: ``mdpl.bench``'s ``synthetic_batch`` (seed 0, real patch counts and text
lengths, the missing types in the stated mix: complete / text missing / image missing = 0.3 / 0.35 / 0.35, i.e.
``missing_ratio=0.7`` 'both', by largest remainder; DCP at ``--dcp-batch-size``). The references get it padded to
``max_text_len`` as their collate does (DCP: mdpl's CLIP token ids in place of ``clip.tokenize``'s, through a
look-up); mdpl pads as its config says (``dynamic_text_padding`` default). Random weights on both sides, fp32,
``--threads`` threads, denormals flushed to zero. A training step is forward + loss + backward + optimizer step
(the reference: its ``training_step`` loss, its ``set_schedule`` optimizer); evaluation is a forward without
gradients. CPU: process CPU time of ``--steps`` steps after ``--warmup`` steps; peak memory = peak RSS minus RSS
before the first step (activations, gradients, optimizer state). CUDA: wall time with synchronisation; peak
memory = ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tools" / "parity")]

from common import (REFERENCES, CheckoutError, add_tiny_vit_factory, cpu_get_device,  # noqa: E402
                    offline_load_pretrained, patch_my_metrics, prepare_reference, reference_optimizer,
                    sacred_config, silenced_stdout, verify_checkout)

METHODS = ("map", "memprompt", "dcp")
DATASETS = ("mmimdb", "food101", "hatememes")
NAMES = {"map": "MAP", "memprompt": "MemPrompt", "dcp": "DCP", "mmimdb": "MM-IMDb", "food101": "Food-101",
         "hatememes": "Hateful Memes"}
# mdpl config keys that the ViLT references share (same name and meaning).
VILT_SHARED = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "max_text_len", "vocab_size",
               "image_size", "drop_rate", "max_image_len", "learning_rate", "weight_decay")
METHOD_KEYS = {"map": ("prompt_type", "prompt_length", "prompt_layers", "learnt_p", "multi_layer_prompt"),
               "memprompt": ("gen_prompt_length", "gen_prompt_layers", "shared_prompt_length",
                             "shared_prompt_layers", "mem_size", "top_k"),
               "dcp": ("prompt_length", "prompt_depth", "learning_rate", "weight_decay")}
# --size small: mdpl's `tiny` sizes for ViLT; DCP keeps the reference's hard-coded widths (768/512, 49,408 tokens)
# with 3 layers per tower at 64 px.
DCP_SMALL = {"clip_embed_dim": 512, "clip_vision_width": 768, "clip_vision_layers": 3, "clip_vision_head_width": 64,
             "clip_text_width": 512, "clip_text_heads": 8, "clip_text_layers": 3, "image_size": 64,
             "prompt_length": 6, "prompt_depth": 2}


# ------------------------------------------------------------------------------------------- shared set-up
def mdpl_bench() -> Any:
    """The pieces of mdpl's benchmark (``mdpl.bench``) both sides are measured with."""
    from types import SimpleNamespace

    from mdpl.bench import batches, memory, models, steps
    return SimpleNamespace(resolve_config=models.resolve_config, synthetic_batch=batches.synthetic_batch,
                           build_model=models.build_model, make_train_step=steps.make_train_step,
                           MemoryMeter=memory.MemoryMeter, time_loop=steps.time_loop)


def mdpl_config(method: str, dataset: str, size: str, batch_size: int) -> dict[str, Any]:
    bench = mdpl_bench()
    small = size == "small"
    overrides = {"per_gpu_batchsize": batch_size, **(DCP_SMALL if method == "dcp" and small else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.resolve_config(method, dataset, small, overrides)


def the_batch(cfg: dict[str, Any], batch_size: int, size: str, device: torch.device, full_padding: bool) -> dict:
    """bench.synthetic_batch (seed 0); ``full_padding``: padded to max_text_len as the references' collate does."""
    bench = mdpl_bench()
    cfg = {**cfg, "dynamic_text_padding": False} if full_padding else cfg
    return bench.synthetic_batch(cfg, batch_size, "small" if size == "small" else "full", device, seed=0)


def clip_state_file(cfg: dict[str, Any], folder: Path) -> Path:
    """A random CLIP state dict in OpenAI's layout with the config's sizes: what the DCP reference loads."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=cfg["clip_embed_dim"], quick_gelu=True,
        vision_cfg=dict(image_size=cfg["image_size"], patch_size=cfg["clip_patch_size"],
                        width=cfg["clip_vision_width"], layers=cfg["clip_vision_layers"],
                        head_width=cfg["clip_vision_head_width"]),
        text_cfg=dict(context_length=cfg["clip_context_length"], vocab_size=cfg["clip_vocab_size"],
                      width=cfg["clip_text_width"], heads=cfg["clip_text_heads"], layers=cfg["clip_text_layers"]))
    path = folder / f"clip_{cfg['clip_vision_layers']}_{cfg['image_size']}.pt"
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------- one side
class Side:
    """A model with a training step, an evaluation step and the text length it runs."""

    train_step: Callable[[], Any]
    eval_step: Callable[[], Any]
    text: int


def mdpl_side(cfg: dict[str, Any], args: argparse.Namespace, device: torch.device) -> Side:
    bench = mdpl_bench()
    torch.manual_seed(0)
    model = bench.build_model(cfg).to(device)
    batch = the_batch(cfg, args.batch_size, args.size, device, full_padding=False)
    step, _ = bench.make_train_step(model, cfg, device, "fp32")
    side = Side()

    def train() -> Any:
        model.train()
        if hasattr(model, "set_frozen_modes"):
            model.set_frozen_modes()
        return step(batch)

    def evaluate() -> Any:
        model.eval()
        with torch.no_grad():
            return model(batch)["logits"]

    side.train_step, side.eval_step = train, evaluate
    two_tower = cfg["backbone"] != "vilt"
    side.text = int(batch["text_masks"].sum(1).max()) if two_tower else int(batch["text_ids"].shape[1])
    return side


def vilt_reference(method: str, cfg: dict[str, Any], args: argparse.Namespace, device: torch.device) -> Side:
    prepare_reference(args.refs, method)
    package = REFERENCES[method].package
    modules = __import__(f"{package}.modules", fromlist=["x"])
    patch_my_metrics(__import__(f"{package}.gadgets.my_metrics", fromlist=["x"]))
    vit = __import__(f"{package}.modules.vision_transformer_prompts", fromlist=["x"])
    offline_load_pretrained(vit)
    factory = add_tiny_vit_factory(vit)
    ex = __import__(f"{package}.config", fromlist=["x"]).ex
    updates = {k: cfg[k] for k in VILT_SHARED + METHOD_KEYS[method]}
    ref_cfg = sacred_config(ex, cfg["dataset"], {**updates, "load_path": "", "vit": factory, "precision": 32,
                                                 "num_workers": 0})
    torch.manual_seed(0)
    cls = modules.ViLTransformerSS if method == "map" else modules.MemPromptTransformer
    with silenced_stdout():
        model = cls(ref_cfg).to(device)
    b = the_batch(cfg, args.batch_size, args.size, device, full_padding=True)
    batch = {"text_ids": b["text_ids"], "text_labels": torch.full_like(b["text_ids"], -100),
             "text_masks": b["text_masks"], "image": [b["image"]],
             "missing_type": b["missing_type"].tolist(), "label": b["label"].tolist()}
    side = reference_steps(model, modules.vilt_utils, batch)
    side.text = int(b["text_ids"].shape[1])
    return side


def dcp_reference(cfg: dict[str, Any], args: argparse.Namespace, device: torch.device) -> Side:
    prepare_reference(args.refs, "dcp")
    import clip.modules.clip as dclip
    from clip.config import ex
    from clip.modules import CLIPransformerSS, clip_utils
    patch_my_metrics(__import__("clip.gadgets.my_metrics", fromlist=["x"]))
    dclip._download = lambda url, root=None: args.clip_state
    b = the_batch(cfg, args.batch_size, args.size, device, full_padding=True)
    ids = b["text_ids"].to(torch.int32)
    dclip.tokenize = lambda text, context_length=77, truncate=False: ids[int(text)][None]   # mdpl's ids, by row
    updates = {k: cfg[k] for k in METHOD_KEYS["dcp"]}
    ref_cfg = sacred_config(ex, cfg["dataset"], {**updates, "image_size": cfg["image_size"], "load_path": "",
                                                 "precision": 32, "num_workers": 0})
    torch.manual_seed(0)
    with silenced_stdout():
        model = CLIPransformerSS(ref_cfg).to(device)
    batch = {"text": ([str(i) for i in range(ids.shape[0])],), "image": [b["image"]],
             "missing_type": b["missing_type"].tolist(), "label": b["label"].tolist()}
    side = reference_steps(model, clip_utils, batch)
    side.text = int(ids.shape[1])
    return side


def reference_steps(model: torch.nn.Module, utils: Any, batch: dict[str, Any]) -> Side:
    """The reference's training step (its ``training_step`` loss, its ``set_schedule`` optimizer) and forward."""
    optimizer = reference_optimizer(model, utils.set_schedule)
    side = Side()

    def train() -> Any:
        model.train()
        utils.set_task(model)
        out = model(batch)
        loss = sum(v for k, v in out.items() if "loss" in k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def evaluate() -> Any:
        model.eval()
        utils.set_task(model)
        with torch.no_grad():
            return model(batch)

    side.train_step, side.eval_step = train, evaluate
    return side


def measure(step: Callable[[], Any], args: argparse.Namespace, device: torch.device, memory: bool) -> dict:
    bench = mdpl_bench()
    meter = bench.MemoryMeter(device)
    wall, cpu, peak = bench.time_loop(lambda _: step(), [None], args.warmup, args.steps, device, meter)
    return {"seconds": wall if device.type == "cuda" else cpu, "peak_mib": peak if memory else None}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One side, one (method, dataset), in this process: JSON on stdout."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    cfg = mdpl_config(args.method, args.dataset, args.size, args.batch_size)
    if args.side == "mdpl":
        side = mdpl_side(cfg, args, device)
    elif args.method == "dcp":
        side = dcp_reference(cfg, args, device)
    else:
        side = vilt_reference(args.method, cfg, args, device)
    context = cpu_get_device() if args.side == "reference" and args.method == "dcp" else _null()
    with context:
        train = measure(side.train_step, args, device, memory=True)
        evaluate = measure(side.eval_step, args, device, memory=False)
    return {"train_s": train["seconds"], "eval_s": evaluate["seconds"], "peak_mib": train["peak_mib"],
            "text": side.text}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ------------------------------------------------------------------------------------------- driver
def run_worker(args: argparse.Namespace, side: str, method: str, dataset: str, batch_size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--method", method, "--dataset", dataset,
           "--refs", str(args.refs), "--device", args.device, "--size", args.size, "--batch-size", str(batch_size),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--clip-state", args.clip_state or ""]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {side} {method} {dataset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(args: argparse.Namespace, method: str, dataset: str) -> dict[str, Any]:
    batch_size = args.dcp_batch_size if method == "dcp" else args.batch_size
    runs: dict[str, list[dict]] = {"mdpl": [], "reference": []}
    for r in range(args.repeats):
        order = ("mdpl", "reference") if r % 2 == 0 else ("reference", "mdpl")
        for side in order:
            runs[side].append(run_worker(args, side, method, dataset, batch_size))
    med = {side: {k: statistics.median(x[k] for x in rs) for k in ("train_s", "eval_s", "peak_mib")}
           for side, rs in runs.items()}
    return {"method": method, "dataset": dataset, "batch": batch_size, "runs": runs,
            "text": (runs["mdpl"][0]["text"], runs["reference"][0]["text"]),
            "train_sps": (batch_size / med["mdpl"]["train_s"], batch_size / med["reference"]["train_s"]),
            "speedup": med["reference"]["train_s"] / med["mdpl"]["train_s"],
            "eval_speedup": med["reference"]["eval_s"] / med["mdpl"]["eval_s"],
            "peak": (med["mdpl"]["peak_mib"], med["reference"]["peak_mib"])}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | dataset | text mdpl / ref | train samples/s mdpl / ref | speed-up | eval speed-up | "
             "peak memory MiB mdpl / ref | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        (pm, pr) = r["peak"]
        ratio = f"{pm / pr:.2f}" if pm is not None and pr else "–"
        mem = f"{pm:.0f} / {pr:.0f}" if pm is not None and pr is not None else "–"
        lines.append(f"| {NAMES[r['method']]} | {NAMES[r['dataset']]} | {r['text'][0]} / {r['text'][1]} | "
                     f"{r['train_sps'][0]:.3f} / {r['train_sps'][1]:.3f} | {r['speedup']:.2f}× | "
                     f"{r['eval_speedup']:.2f}× | {mem} | {ratio} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {os.cpu_count()} cores"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", required=True, type=Path, help="folder holding the reference checkouts")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="full", choices=("full", "small"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per side (median)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dcp-batch-size", type=int, default=20, help="DCP: a batch carrying the 0.7 'both' mix exactly")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("mdpl", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--clip-state", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    methods, datasets = args.methods.split(","), args.datasets.split(",")
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(datasets) - set(DATASETS))
    if unknown or args.repeats < 1:
        print(f"error: unknown method/dataset {unknown} or --repeats < 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        for key in methods:
            verify_checkout(args.refs, key)
    except CheckoutError as err:
        print(err, file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            if method == "dcp":
                cfg = mdpl_config("dcp", datasets[0], args.size, args.dcp_batch_size)
                args.clip_state = str(clip_state_file(cfg, Path(tmp)))
            for dataset in datasets:
                rows.append(row(args, method, dataset))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)   # progress: the row so far
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print(f"{args.size} size, {args.device} ({machine(args.device)}), fp32, {args.threads} thread(s), batch "
          f"{args.batch_size} (DCP {args.dcp_batch_size}), median of {args.repeats} fresh processes per side, "
          f"{args.warmup} warm-up + {args.steps} timed step(s)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
