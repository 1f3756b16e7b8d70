"""Numerical parity of mdpl's SCP with its reference implementation (tests/fixtures/README.md, "SCP").

Fixtures ``ref_scp_{A,B}.pt`` (written by tools/parity/make_scp.py from ``vittoriopipoli/SCP_WACV2025``) hold, per dataset
head, the reference config, the names / shapes / float64 checksums of its state dict (the values are regenerated from
``tests/vilt_hashinit.py``), one batch with all three missing types, and the reference logits, pooled feature, loss
and the gradient of every trainable tensor, in eval mode. For every (config, head) this file builds
`mdpl.models.build_classifier` from the mapped config, loads the regenerated reference state through the reference
checkpoint importer (`load_reference_checkpoint`: SCP's key renames, the check of its frozen query copies, D-56) and
checks, in float32 on CPU: logits and pooled feature (atol 1e-5), loss (rtol 1e-5), the trainable-parameter set and
every gradient (rtol 1e-4 + atol 1e-6). It also checks that SCP ignores the missing type, and that the importer
refuses a checkpoint whose frozen copies differ from its blocks.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from golden import LOGITS_ATOL, LOSS_RTOL, assert_grad_matches, fixture_loader, state_loader
import torch

sys.path.insert(0, str(Path(__file__).parent))
from vilt_hashinit import hashed_scp_state  # noqa: E402

from mdpl.config import RunConfig  # noqa: E402
from mdpl.backbones.vilt_weights import load_reference_checkpoint, reference_key_to_mdpl  # noqa: E402
from mdpl.engine.losses import task_loss  # noqa: E402
from mdpl.errors import UserInputError  # noqa: E402
from mdpl.models import build_classifier  # noqa: E402
from mdpl.prompts.scp import SemanticallyConditionedPrompts  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = ("A", "B")
HEADS = ("mmimdb", "food101", "hatememes")
CASES = [pytest.param(c, h, id=f"{c}-{h}") for c in CONFIGS for h in HEADS]
SHARED_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_ratio", "patch_size", "image_size", "max_text_len",
               "vocab_size", "max_image_len", "drop_rate", "learning_rate", "weight_decay", "lr_mult")
RENAMED = {"prompt_length": "scp_length", "pool_size": "scp_pool_size", "fixed_prompts": "scp_fixed_prompts",
           "prompt_layers": "scp_layers", "fixed_prompt_layers": "scp_static_layers"}
POOLED_ATOL = LOGITS_ATOL

pytestmark = pytest.mark.usefixtures("one_thread")


fixture = fixture_loader("ref_scp_{}.pt", "python tools/parity/make_scp.py --refs REFS_DIR")
reference_state = state_loader(fixture, lambda rec: hashed_scp_state({k: tuple(rec["shapes"][k]) for k in rec["keys"]},
                                                                     list(rec["config"]["prompt_layers"])))


def mdpl_config(ref: dict[str, Any], head: str) -> dict[str, Any]:
    """mdpl config from the reference's resolved keys (fixture README, "SCP")."""
    assert [name for name, on in ref["loss_names"].items() if on] == [head]
    cfg: dict[str, Any] = {k: ref[k] for k in SHARED_KEYS}
    cfg.update({ours: ref[theirs] for theirs, ours in RENAMED.items()})
    cfg.update(dataset=head, backbone="vilt", load_path="", test_only=False, finetune=False, frozen_eval_mode=False,
               prompt_method="scp", optimizer_impl="legacy_hf")
    return cfg


def build(config: str, head: str, state: dict[str, torch.Tensor] | None = None, **over):
    """mdpl's classifier with the reference weights loaded through the reference checkpoint importer."""
    rec = fixture(config)[head]
    cfg = {**mdpl_config(rec["config"], head), **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_classifier(cfg)
    checkpoint = {"state_dict": state if state is not None else reference_state(config, head),
                  "hyper_parameters": {"config": rec["config"]}}
    run = RunConfig.coerce(cfg)
    load_reference_checkpoint(model, checkpoint, run,
                              adapt=lambda s: SemanticallyConditionedPrompts.complete_reference_state(
                                  SemanticallyConditionedPrompts.upgrade_state_dict(s), model.state_dict(),
                                  run.method_options()))
    return model.eval(), cfg


def mdpl_name(reference_name: str) -> str:
    key = reference_key_to_mdpl(reference_name)
    return next(iter(SemanticallyConditionedPrompts.upgrade_state_dict({key: torch.zeros(())})))


@pytest.mark.parametrize("config,head", CASES)
def test_logits_pooled_loss_match_reference(config, head) -> None:
    rec = fixture(config)[head]
    model, _ = build(config, head)
    with torch.no_grad():
        out = model(rec["batch"])
    torch.testing.assert_close(out["logits"], rec["logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out["pooled"], rec["pooled"], atol=POOLED_ATOL, rtol=0)
    loss = task_loss(head, out["logits"], rec["batch"]["label"])
    torch.testing.assert_close(loss, rec["loss"], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("config,head", CASES)
def test_every_trainable_gradient_matches_reference(config, head) -> None:
    rec = fixture(config)[head]
    model, _ = build(config, head)
    task_loss(head, model(rec["batch"])["logits"], rec["batch"]["label"]).backward()
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {mdpl_name(n) for n in rec["trainable"]}
    assert set(rec["grads"]) == set(rec["trainable"])
    for name, ref in rec["grads"].items():
        assert_grad_matches(params[mdpl_name(name)].grad, ref, name)


@pytest.mark.parametrize("config", CONFIGS)
def test_missing_type_is_never_read(config) -> None:
    """SCP conditions on the read-out token only: any other missing-type vector gives the same logits."""
    rec = fixture(config)["food101"]
    model, _ = build(config, "food101")
    batch = dict(rec["batch"])
    with torch.no_grad():
        ref = model(batch)["logits"]
        other = model({**batch, "missing_type": (batch["missing_type"] + 1) % 3})["logits"]
    assert torch.equal(ref, other)


def test_reference_switches_change_outputs() -> None:
    """The reproduced defects are live switches: the block's own epsilon (D-57: a tiny change, the read-out token's
    variance is far above both epsilons; without the switch the forward is bit-identical) and the chunk scale (D-58)."""
    rec = fixture("A")["food101"]
    with torch.no_grad():
        ref = build("A", "food101")[0](rec["batch"])["logits"]
        eps = build("A", "food101", scp_block_eps=True)[0](rec["batch"])["logits"]
        chunk = build("A", "food101", scp_pool_scale="chunk")[0](rec["batch"])["logits"]
    assert 0 < (eps - ref).abs().max() < 1e-4
    assert (chunk - ref).abs().max() > 1e-3


def test_importer_refuses_copies_that_differ_from_the_blocks() -> None:
    state = dict(reference_state("A", "food101"))
    state["QKV_ps_layers.1.W_Q"] = state["QKV_ps_layers.1.W_Q"] + 1e-3
    with pytest.raises(UserInputError, match="frozen query copies"):
        build("A", "food101", state=state)


def test_importer_refuses_other_layers() -> None:
    with pytest.raises(UserInputError, match="scp_layers"):
        build("A", "food101", scp_layers=[1, 3], scp_static_layers=[0, 2])
