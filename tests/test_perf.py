"""Performance options: sync-free step checks and metrics, host-side ViLT patch count, dynamic
text padding, opt-in torch.compile, bf16-mixed default. Each must leave the numbers unchanged."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mdpl.data.collate import Collator
from mdpl.data.missing import apply_missing
from mdpl.engine.metrics import Accuracy, BinaryAUROC
from mdpl.engine.module import MDPLModule
from mdpl.engine.trainer import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_engine import StubClassifier, StubDataModule, make_config  # noqa: E402

from mdpl.bench.batches import synthetic_batch  # noqa: E402


# ----------------------------------------------------------------------------- non-finite loss guard
class _NaNAt(StubClassifier):
    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.bad_call, self.calls = bad_call, 0

    def forward(self, batch):
        out = super().forward(batch)
        self.calls += 1
        scale = float("nan") if self.calls == self.bad_call else 1.0
        return {**out, "logits": out["logits"] * scale}


def test_nonfinite_check_is_deferred_on_accelerators() -> None:
    """On a device where reading a tensor syncs, the flag is read every log_every_n_steps steps, and the error
    names the step where the loss went bad; the metric update comes after the check (not reached by it)."""
    module = MDPLModule(make_config(Path("/tmp")), model=_NaNAt(bad_call=2))
    module.SYNC_FREE_DEVICES = ()  # pretend the CPU is an accelerator
    fake = SimpleNamespace(log_every_n_steps=3, global_step=0, current_epoch=1)
    module._trainer = fake
    module.log = lambda *args, **kwargs: None  # the fake trainer has no logger connector
    batch = next(iter(StubDataModule().train_dataloader()))
    module.training_step(batch, 0)
    fake.global_step = 1
    module.training_step(batch, 1)  # NaN here: recorded, not yet read
    fake.global_step = 2
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at global step 1 \(checked over "
                                                 r"global steps 0-2, epoch 1\)"):
        module.training_step(batch, 2)
    assert int(module.metrics["train_phase"].metrics["f1"].n_samples) == 16  # step 3 reached no metric update


def test_nonfinite_check_forced_at_epoch_end() -> None:
    module = MDPLModule(make_config(Path("/tmp")), model=_NaNAt(bad_call=1))
    module.SYNC_FREE_DEVICES = ()
    module._trainer = SimpleNamespace(log_every_n_steps=50, global_step=4, current_epoch=0)
    module.log = lambda *args, **kwargs: None
    module.training_step(next(iter(StubDataModule().train_dataloader())), 0)
    with pytest.raises(FloatingPointError, match="at global step 4"):
        module._check_nonfinite(force=True)


# ------------------------------------------------------------------------------- metrics, no masks
def test_metrics_ignore_index_without_boolean_indexing() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 2, generator=g)
    target = torch.randint(0, 2, (20,), generator=g)
    target[[1, 5, 11]] = -100
    keep = target != -100
    acc, auroc = Accuracy(), BinaryAUROC()
    for part in (slice(0, 7), slice(7, 20)):
        acc.update(logits[part], target[part])
        auroc.update(logits[part], target[part])
    expected_acc = (logits.argmax(1)[keep] == target[keep]).float().mean()
    assert acc.compute().item() == pytest.approx(expected_acc.item(), abs=0)
    from torchmetrics.functional.classification import binary_auroc
    expected = binary_auroc(torch.softmax(logits, 1)[keep, 1], target[keep], thresholds=None)
    assert auroc.compute().item() == pytest.approx(expected.item(), abs=1e-7)


# -------------------------------------------------------------------------- ViLT host patch count
def _vilt(method: str, dataset: str = "mmimdb", **overrides):
    from mdpl.bench.models import build_model, resolve_config

    cfg = resolve_config(method, dataset, True, {"drop_rate": 0.0, **overrides})
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("max_image_len", [-1, 5])
def test_host_sizes_give_the_same_patch_sequence(max_image_len: int) -> None:
    cfg, model = _vilt("memprompt", max_image_len=max_image_len)
    batch = synthetic_batch(cfg, 6, "small", torch.device("cpu"), seed=2)
    host = tuple((int(h), int(w)) for h, w in batch["image_sizes"].tolist())
    bb = model.backbone
    a, ma = bb.embed_image(batch["image"], batch["image_sizes"])
    b, mb = bb.embed_image(batch["image"], batch["image_sizes"], host)
    assert a.shape == b.shape and torch.equal(a, b) and torch.equal(ma, mb)
    with torch.no_grad():
        ref = model(batch)["logits"]
        out = model({**batch, "image_sizes_host": host})["logits"]
    assert torch.equal(ref, out)


class _WordTokenizer:
    """Whitespace 'tokenizer': [CLS]=101 word ids [SEP]=102, right-padded to max_length like BERT."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def encode(self, texts):
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for i, t in enumerate(texts):  # test helper only
            toks = [101] + [1000 + len(w) for w in t.split()][: self.max_length - 2] + [102]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, (ids != 0).long()


def test_collator_dynamic_padding_and_host_sizes() -> None:
    items = [{"image": torch.ones(3, 32, 48), "text": "a bb ccc", "label": 1, "missing_type": 0, "row_index": 0,
              "item_index": 0},
             {"image": torch.ones(3, 64, 16), "text": "", "label": 0, "missing_type": 1, "row_index": 1,
              "item_index": 1}]
    fixed = Collator(_WordTokenizer(12))(items)
    dyn = Collator(_WordTokenizer(12), dynamic_text_padding=True)(items)
    assert fixed["text_ids"].shape == (2, 12) and dyn["text_ids"].shape == (2, 5)
    assert torch.equal(dyn["text_ids"], fixed["text_ids"][:, :5]) and dyn["text_masks"].sum() == fixed["text_masks"].sum()
    assert fixed["image_sizes_host"] == ((32, 48), (64, 16)) == tuple(map(tuple, fixed["image_sizes"].tolist()))
    dummy_ids, dummy_masks = _WordTokenizer(12).encode([""])
    out = apply_missing(dyn, dyn["missing_type"], dummy_ids, dummy_masks)  # the dummy is cut to the batch length
    assert out["text_ids"][1].tolist() == [101, 102, 0, 0, 0] and out["text_masks"][1].sum() == 2


# ---------------------------------------------------------------------------------- dynamic padding
def _trim(batch: dict) -> dict:
    length = int(batch["text_masks"].sum(1).max())
    return {**batch, "text_ids": batch["text_ids"][:, :length], "text_masks": batch["text_masks"][:, :length]}


@pytest.mark.parametrize("method,overrides,exact", [
    ("none", {}, True), ("map", {}, True), ("map", {"prompt_type": "attention"}, True),
    ("memprompt", {"memprompt_mask_padding": True}, True), ("memprompt", {"dynamic_text_padding": True}, True),
    ("memprompt", {}, False)])
def test_dynamic_text_padding_is_padding_invariant(method: str, overrides: dict, exact: bool) -> None:
    """Masked methods give the same logits when the batch is cut to its longest text; MemPrompt's reference
    text max-pool over [PAD] does not (why dynamic_text_padding turns on text-side masking)."""
    cfg, model = _vilt(method, **overrides)
    batch = synthetic_batch(cfg, 6, "small", torch.device("cpu"), seed=3)
    short = _trim(batch)
    assert short["text_ids"].shape[1] < batch["text_ids"].shape[1]
    with torch.no_grad():
        full, cut = model(batch)["logits"], model(short)["logits"]
    if exact:
        torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
    else:
        assert (cut - full).abs().max() > 1e-4


@pytest.mark.parametrize("preset,method,dynamic", [
    ("baseline", "none", True), ("map", "map", True), ("dcp", "dcp", True), ("memprompt", "memprompt", False)])
def test_dynamic_text_padding_is_on_by_default_exactly_where_it_is_exact(preset, method, dynamic) -> None:
    """The default follows the method's `padding_is_inert` (the exactness shown above); the user's value wins."""
    from runs import resolved_config
    from mdpl.prompts.registry import method_class

    assert resolved_config(["task_finetune_mmimdb", preset], {})["dynamic_text_padding"] is dynamic
    assert method_class(method).padding_is_inert is dynamic
    assert resolved_config(["task_finetune_mmimdb", preset], {"dynamic_text_padding": not dynamic}
                           )["dynamic_text_padding"] is (not dynamic)


# ------------------------------------------------------------------------------- compile, precision
def test_compile_option_keeps_checkpoint_keys() -> None:
    cfg, _ = _vilt("map", dataset="hatememes")
    assert set(MDPLModule({**cfg, "compile": True}).state_dict()) == set(MDPLModule(cfg).state_dict())


def test_compile_option_gives_the_eager_training_step(monkeypatch) -> None:
    """``compile=True`` (torch.compile with inductor, here on the CPU) gives the eager loss and gradients of a training
    step. A tiny ViLT (one layer, prompts on it) keeps the compilation short (~30 s of CPU on 2 cores); a compile
    error fails the test."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)   # no worker pool to start for a few kernels
    cfg, _ = _vilt("map", dataset="hatememes", num_layers=1, prompt_layers=[0])
    torch.manual_seed(0)
    compiled = MDPLModule({**cfg, "compile": True})
    eager = MDPLModule(cfg)
    eager.model.load_state_dict(compiled.model.state_dict())
    batch = synthetic_batch(cfg, 4, "small", torch.device("cpu"), seed=0)
    losses = []
    for module in (compiled, eager):
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in eager.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, param in compiled.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_mixed_is_the_default_and_works_on_cpu() -> None:
    from config import ex

    scopes = [scope() for scope in ex.configurations]
    assert [c["precision"] for c in scopes if "precision" in c] == ["bf16-mixed"]
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"  # fp16 AMP stays available
