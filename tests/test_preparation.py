"""The preparation stage (mdpl/engine/preparation.py): a method that reads the training split with the frozen backbone
before it trains gets its artefact computed once, stored beside the data, reused, refused or rebuilt when its inputs
change, resumed after a kill, and the same under 2-process DDP (gloo, CPU) as in one process.

The toy method below declares a need (pooled block inputs of every stream, k-means per layer) and puts the centres of
the first layer in front of each stream. The kill and DDP runs are subprocesses of this file (``python
tests/test_preparation.py prepare <config.json> ...``); the kill is a SIGKILL the process sends itself after the chunk
the test names (a hook of ``run_preparation``), so the test knows exactly which chunks survive.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from mdpl.prompts import (FeatureRequest, KMeansRequest, MethodConfig, NeighbourRequest, PreparationNeed,  # noqa: E402
                          PromptMethod, registered, splice_tokens)

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, BATCH = 22, 4           # 6 batches: 5 full, one of 2


# ------------------------------------------------------------------------------------------------ the toy method
@dataclass(frozen=True)
class CentresConfig(MethodConfig):
    """The toy method's keys."""

    centre_count: int = 3
    TINY = {"centre_count": 3}


class CentrePrompt(PromptMethod):
    """k-means centres of each stream's pooled inputs of block 0 and of the last block's output; the block-0 centres,
    times a learned scale, go in front of the stream before block 0."""

    config_class = CentresConfig

    def __init__(self, config: CentresConfig, info) -> None:
        super().__init__(config, info)
        for s in info.streams:
            self.register_buffer(f"centres_{s.name}", torch.zeros(2, config.centre_count, s.width))
        self.scale = nn.Parameter(torch.ones(()))

    def preparation_needs(self) -> PreparationNeed:
        streams = self.info.streams
        return PreparationNeed(
            features=tuple(FeatureRequest(s.name, s.name, (0, s.num_layers)) for s in streams),
            kmeans=tuple(KMeansRequest(s.name, self.config.centre_count, iters=20, seed=3) for s in streams),
            neighbours=(NeighbourRequest(streams[0].name, 0, k=2),), keep_features=True, version="toy-1")

    def load_prepared(self, artifact) -> None:
        for s in self.info.streams:
            centres = artifact.centres[s.name]
            getattr(self, f"centres_{s.name}")[:, :centres.shape[1]].copy_(centres)

    def before_block(self, stream, index, x, mask, layout, ctx):
        if index != 0:
            return x, mask, layout
        tokens = (self.scale * getattr(self, f"centres_{stream.name}")[0]).expand(x.shape[0], -1, -1)
        x, mask = splice_tokens(x, mask, 0, [tokens])
        return x, mask, layout.prepend([("centres", tokens.shape[1])])


@pytest.fixture(scope="module")
def toy():
    with registered(CentrePrompt, "centres"):
        yield CentrePrompt


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy) -> dict:
    from runs import resolved_config, synthetic_arrows
    data = synthetic_arrows(tmp_path_factory.mktemp("prep"), "food101", N_TRAIN, 8, 8)
    data["config"] = resolved_config(["task_finetune_food101", "tiny"], {
        "prompt_method": "centres", "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]),
        "vocab_size": data["vocab_size"], "max_epoch": 1, "per_gpu_batchsize": BATCH, "batch_size": BATCH,
        "val_check_interval": 1.0, "load_path": "", "num_workers": 0})
    return data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The artefact of one uninterrupted single-process preparation (chunks of one batch)."""
    return prepare(copy_root(data, tmp_path_factory.mktemp("reference")))[1]


def copy_root(data: dict, tmp_path: Path) -> dict:
    """The config with its own copy of the arrow files (same names, sizes and times: the same inputs)."""
    root = tmp_path / "arrow"
    shutil.copytree(data["arrow"], root, ignore=shutil.ignore_patterns("prepared", "missing_tables"))
    return {**data["config"], "data_root": str(root)}


# ------------------------------------------------------------------------------------------------ running it
def prepare(flat: dict, on_chunk=None, chunk_batches: int = 1):
    """The classifier of `flat` (weights from seed 0) with its preparation run; returns (model, artefact)."""
    from mdpl.config import RunConfig
    from mdpl.engine.preparation import run_preparation
    from mdpl.engine.session import build_datamodule
    from mdpl.models import build_classifier

    run = RunConfig.coerce(flat)
    torch.manual_seed(0)
    model = build_classifier(run)
    artifact = run_preparation(run, model, build_datamodule(run), progress=False, on_chunk=on_chunk,
                               chunk_batches=chunk_batches)
    return model, artifact


def subprocess_prepare(flat: dict, tmp_path: Path, *extra: str) -> subprocess.Popen:
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.json')))}.json"
    path.write_text(json.dumps(flat, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, __file__, "prepare", str(path), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def artefact_files(flat: dict) -> list[Path]:
    return sorted((Path(flat["data_root"]) / "prepared").glob("*.pt"))


def same_artifact(a, b, atol: float = 0.0) -> None:
    assert a.centres.keys() == b.centres.keys() and a.features.keys() == b.features.keys()
    for name in a.features:
        torch.testing.assert_close(a.features[name], b.features[name], rtol=0, atol=atol)
        torch.testing.assert_close(a.centres[name], b.centres[name], rtol=0, atol=max(atol, 0) * 10)
    for name in a.neighbours:
        assert torch.equal(a.neighbours[name][0], b.neighbours[name][0])


# ------------------------------------------------------------------------------------------------ k-means, top-k
def reference_kmeans(x: np.ndarray, k: int, u: np.ndarray, iters: int, tol: float) -> np.ndarray:
    """Plain k-means (loops, float64) of one problem x [n, D] with the seeding draws u [k] of mdpl.engine.kmeans."""
    n = len(x)
    centres = [x[min(int(u[0] * n), n - 1)]]
    for j in range(1, k):
        d2 = np.array([min(((p - c) ** 2).sum() for c in centres) for p in x])
        cumulative = np.cumsum(d2)
        centres.append(x[min(int(np.searchsorted(cumulative, u[j] * cumulative[-1], side="right")), n - 1)])
    centres = np.array(centres)
    threshold = tol * x.var(axis=0).mean()
    for _ in range(iters):
        labels = np.array([np.argmin([((p - c) ** 2).sum() for c in centres]) for p in x])
        new = np.array([x[labels == j].mean(0) for j in range(k)])
        shift = ((new - centres) ** 2).sum()
        centres = new
        if shift <= threshold:
            break
    return centres


def test_kmeans_matches_a_plain_reference() -> None:
    from mdpl.engine.kmeans import kmeans
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[0.0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4]])
    x = torch.stack([(means[torch.arange(80) % 4] * (b + 1) + 0.3 * torch.randn(80, 3, generator=g)) for b in range(3)])
    result = kmeans(x.double(), 4, iters=50, seed=7, tol=1e-6)
    u = torch.rand(4, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    for b in range(3):
        expected = reference_kmeans(x[b].double().numpy(), 4, u[:, b], 50, 1e-6)
        np.testing.assert_allclose(result.centres[b].numpy(), expected, atol=1e-10)
    # the planted clusters are found (values, not only agreement with the reference)
    nearest = torch.cdist(means.double(), result.centres[0]).min(dim=1).values
    assert (nearest < 0.2).all(), nearest
    labels = result.labels[0].view(20, 4)                      # item i belongs to planted cluster i % 4
    assert (labels == labels[0]).all() and len(set(labels[0].tolist())) == 4


def test_kmeans_restarts_keep_the_lowest_inertia_and_empty_clusters_move() -> None:
    from mdpl.engine.kmeans import kmeans, update
    x = torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(0))
    one, five = kmeans(x, 6, seed=0, n_init=1), kmeans(x, 6, seed=0, n_init=5)
    assert (five.inertia <= one.inertia + 1e-6).all()
    points = torch.tensor([[[0.0], [1.0], [10.0]]])
    centres = update(points, torch.tensor([[0, 0, 0]]), torch.tensor([[1.0, 0.0, 81.0]]), torch.zeros(1, 2, 1))
    assert centres.flatten().tolist() == pytest.approx([11 / 3, 10.0])   # the empty cluster takes the farthest point


def test_exact_topk_matches_a_full_sort() -> None:
    from mdpl.engine.topk import exact_topk, scores
    x = torch.randn(11, 6, generator=torch.Generator().manual_seed(2))
    for metric in ("cosine", "l2"):
        idx, val = exact_topk(x, x, 3, metric, exclude=torch.arange(11), chunk=4)
        full = scores(x, x, metric).fill_diagonal_(float("-inf"))
        assert torch.equal(idx, full.argsort(dim=1, descending=True)[:, :3])
        assert torch.allclose(val, full.sort(dim=1, descending=True).values[:, :3])
        assert not (idx == torch.arange(11)[:, None]).any()


# ------------------------------------------------------------------------------------------------ the stage
def test_artifact_is_computed_stored_and_reused(data, tmp_path, monkeypatch) -> None:
    import mdpl.engine.preparation as prep
    flat = copy_root(data, tmp_path)
    model, artifact = prepare(flat)
    [path] = artefact_files(flat)
    assert not prep.partial_folder(path).exists()            # chunk files removed once the artefact exists
    joint = artifact.features["joint"]
    assert joint.shape == (N_TRAIN, 2, model.backbone.info.streams[0].width)
    assert artifact.centres["joint"].shape == (2, 3, joint.shape[2])
    assert torch.equal(model.prompt.centres_joint, artifact.centres["joint"])   # handed to load_prepared
    # each layer's centres lie among that layer's features (their means), the neighbour lists exclude the item
    for layer in range(2):
        lo, hi = joint[:, layer].min(0).values, joint[:, layer].max(0).values
        assert ((artifact.centres["joint"][layer] >= lo - 1e-5) & (artifact.centres["joint"][layer] <= hi + 1e-5)).all()
    idx, _ = artifact.neighbours["joint"]
    assert idx.shape == (N_TRAIN, 2) and not (idx == torch.arange(N_TRAIN)[:, None]).any()

    calls = []
    monkeypatch.setattr(prep, "_collect", lambda *a, **k: calls.append(1))
    again_model, again = prepare(flat)                       # the stored file, nothing collected
    assert calls == [] and artefact_files(flat) == [path]
    same_artifact(artifact, again)
    assert torch.equal(again_model.prompt.centres_joint, artifact.centres["joint"])


def test_changed_arrow_file_is_never_reused(data, tmp_path) -> None:
    from mdpl.errors import UserInputError
    flat = copy_root(data, tmp_path)
    _, first = prepare(flat)
    [old] = artefact_files(flat)
    arrow = Path(flat["data_root"]) / "food101_train.arrow"
    stat = arrow.stat()
    os.utime(arrow, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # the file changed (its time says so)
    _, second = prepare(flat)                                # another key: rebuilt under another name
    assert second.key != first.key and len(artefact_files(flat)) == 2
    assert second.dependencies["arrow"] != first.dependencies["arrow"]
    # a file under the new key recorded for the old inputs (copied by hand) is refused, not used
    new = next(p for p in artefact_files(flat) if p != old)
    shutil.copyfile(old, new)
    with pytest.raises(UserInputError, match=r"computed from other inputs \(differing: arrow\)"):
        prepare(flat)


def test_killed_preparation_resumes_to_the_same_artifact(data, reference, tmp_path, monkeypatch) -> None:
    import mdpl.engine.preparation as prep
    flat = copy_root(data, tmp_path / "two")
    proc = subprocess_prepare(flat, tmp_path, "--kill-after", "2")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    partial = sorted((Path(flat["data_root"]) / "prepared").glob("*.partial/rank0of1/chunk*.pt"))
    assert [p.name for p in partial] == ["chunk00000.pt", "chunk00001.pt", "chunk00002.pt"] and not artefact_files(flat)

    computed = []
    collect = prep._collect
    monkeypatch.setattr(prep, "_collect", lambda *a, **k: computed.append(1) or collect(*a, **k))
    _, resumed = prepare(flat)
    assert len(computed) == 3                                 # chunks 3, 4, 5 only
    assert resumed.key == reference.key
    same_artifact(reference, resumed)                          # bit for bit


def test_two_process_gloo_equals_one_process(data, reference, tmp_path) -> None:
    one = reference
    flat = copy_root(data, tmp_path / "two")
    init = f"file://{tmp_path / 'pg'}"
    procs = [subprocess_prepare(flat, tmp_path, "--rank", str(r), "--world", "2", "--init", init) for r in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outputs]
    assert [r["key"] for r in results] == [one.key, one.key]       # both ranks loaded it
    assert [r["chunks"] for r in results] == [3, 3]                # each rank collected its 11 items (6 chunks in 1)
    [path] = artefact_files(flat)
    from mdpl.engine.preparation import read_artifact
    two = read_artifact(path, one.dependencies, one.key)
    same_artifact(one, two, atol=1e-5)   # other batches (every second item): equal up to float rounding


def test_two_process_retrieval_equals_one_process(tmp_path) -> None:
    """A retrieval (RAGPT's: bank + retriever neighbour lists of every split) under 2-process gloo: each rank embeds
    every second item with the retriever, rank 0 gathers; the same neighbour ids and bank as one process."""
    from runs import resolved_config, synthetic_arrows
    from test_ragpt import retriever_file
    from test_ragpt_protocol import TINY_CLIP

    data = synthetic_arrows(tmp_path / "data", "hatememes", 13, 5, 6)      # odd sizes: unequal shares
    flat = resolved_config(["task_finetune_hatememes", "ragpt", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "vilt_variant": "hf", "drop_rate": 0.0, "num_workers": 0, "per_gpu_batchsize": BATCH,
        **{k: v for k, v in TINY_CLIP.items() if k != "image_size"},
        "ragpt_retriever_path": str(retriever_file(tmp_path / "clip.pt", TINY_CLIP))})
    one = prepare(copy_root({"arrow": data["arrow"], "config": flat}, tmp_path / "one"))[1]
    two_flat = copy_root({"arrow": data["arrow"], "config": flat}, tmp_path / "two")
    init = f"file://{tmp_path / 'pg'}"
    procs = [subprocess_prepare(two_flat, tmp_path, "--rank", str(r), "--world", "2", "--init", init) for r in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert [json.loads(out)["key"] for out, _ in outputs] == [one.key, one.key]
    from mdpl.engine.preparation import read_artifact
    [path] = artefact_files(two_flat)
    two = read_artifact(path, one.dependencies, one.key)
    for split, lists in one.retrieved["ragpt_retrieval"].items():
        assert lists.keys() == two.retrieved["ragpt_retrieval"][split].keys()
        for modality, (indices, scores) in lists.items():
            other = two.retrieved["ragpt_retrieval"][split][modality]
            assert torch.equal(indices, other[0]), (split, modality)
            torch.testing.assert_close(scores, other[1], atol=1e-5, rtol=0)
    for name, bank in one.features.items():
        torch.testing.assert_close(bank.float(), two.features[name].float(), atol=1e-3, rtol=0)

    from mdpl.config import RunConfig
    from mdpl.engine.retrieval import embed_shard
    from mdpl.models import build_classifier
    run = RunConfig.coerce(flat)
    [request] = build_classifier(run).prompt.preparation_needs().retrieval
    full, share = (embed_shard(run, request, torch.device("cpu"), rank, world) for rank, world in ((0, 1), (1, 2)))
    for split, (items, features) in share.items():            # rank 1 of 2 embeds items 1, 3, 5, ... only
        assert items == list(range(1, len(full[split][0]), 2))
        for modality, f in features.items():
            torch.testing.assert_close(f, full[split][1][modality][1::2], atol=1e-5, rtol=0)


def test_run_py_prepares_before_fit_and_test_only(data, tmp_path) -> None:
    from runs import run_quiet
    flat = {**copy_root(data, tmp_path), "log_dir": str(tmp_path / "logs")}
    out = run_quiet(flat)
    [path] = artefact_files(flat)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    assert stored["centres"]["joint"].abs().sum() > 0
    assert torch.equal(state["model.prompt.centres_joint"], stored["centres"]["joint"])
    mtime = path.stat().st_mtime_ns
    again = run_quiet({**flat, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    assert artefact_files(flat) == [path] and path.stat().st_mtime_ns == mtime   # reused
    for key, value in out["test"].items():
        assert abs(again["test"][key] - value) <= 1e-6, key


def test_stage_loads_the_artifact_but_a_loaded_checkpoint_wins(data, tmp_path) -> None:
    from types import SimpleNamespace
    from mdpl.config import RunConfig
    from mdpl.engine.preparation import PreparationStage
    from mdpl.engine.session import build_datamodule
    flat = copy_root(data, tmp_path)
    model, artifact = prepare(flat)
    run = RunConfig.coerce(flat)
    for stage, expected in (("fit", artifact.centres["joint"]), ("test", torch.full_like(artifact.centres["joint"], 7))):
        model.prompt.centres_joint.fill_(7)                  # e.g. the values a test_only checkpoint loaded
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), is_global_zero=True,
                                  datamodule=build_datamodule(run))
        PreparationStage(run, progress=False).setup(trainer, SimpleNamespace(model=model, to=lambda d: None), stage)
        assert torch.equal(model.prompt.centres_joint, expected), stage


# ------------------------------------------------------------------------------------------------ subprocess entry
def _main(argv: list[str]) -> None:
    """``prepare <config.json> [--kill-after N] [--rank R --world W --init URL]``: prints the artefact's key."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prepare"])
    parser.add_argument("config")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--init", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.world > 1:
        torch.distributed.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)

    chunks = []

    def on_chunk(index: int) -> None:
        chunks.append(index)
        if args.kill_after is not None and index >= args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    with registered(CentrePrompt, "centres"):
        _, artifact = prepare(json.loads(Path(args.config).read_text()), on_chunk=on_chunk)
    print(json.dumps({"key": artifact.key, "chunks": len(chunks)}))
    if args.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
