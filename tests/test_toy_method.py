"""A fifth prompt method defined in this file alone: registered, trained and evaluated end to end on every backbone
(ViLT, CLIP, CoCa).

It proves the architecture's promise (docs/architecture.md, "How to add a method"): a method is a config dataclass,
a `PromptMethod` subclass and one registration — no file under ``mdpl/`` names it. The toy method puts
``toy_tokens`` learnable per-missing-type tokens in front of every stream before block 0 (an input-level prompt of
depth 1). Each run goes through ``run.run`` (config validation, Lightning fit, test on the best checkpoint), then
``test_only`` on that checkpoint must reproduce the test metrics; the method's tokens must have trained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from runs import resolved_config, run_quiet, synthetic_arrows
from mdpl.prompts import MethodConfig, PromptMethod, registered, splice_tokens
from mdpl.errors import UserInputError
from mdpl.config.validate import validate_config

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """The toy method's one key."""

    toy_tokens: int = 4
    TINY = {"toy_tokens": 2}

    def check(self, info) -> None:
        if not isinstance(self.toy_tokens, int) or self.toy_tokens <= 0:
            raise UserInputError(f"toy_tokens must be a positive int, got {self.toy_tokens!r}")


class ToyPrompt(PromptMethod):
    """``toy_tokens`` tokens per missing type and stream, inserted in front of each stream before block 0."""

    config_class = ToyConfig
    title = "Toy"

    def __init__(self, config: ToyConfig, info) -> None:
        super().__init__(config, info)
        self.tokens = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(3, config.toy_tokens, s.width))
                                        for s in info.streams})

    def before_block(self, stream, index, x, mask, layout, ctx):
        if index != 0:
            return x, mask, layout
        x, mask = splice_tokens(x, mask, 0, [self.tokens[stream.name][ctx.missing_type]])
        return x, mask, layout.prepend([("toy", self.config.toy_tokens)])

    @classmethod
    def added_tokens(cls, config, info):
        return {s.name: config.toy_tokens for s in info.streams}


@pytest.fixture
def toy():
    with registered(ToyPrompt, "toy"):
        yield ToyPrompt


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return synthetic_arrows(tmp_path_factory.mktemp("toy_method"), "food101", 96, 24, 24)


def _config(data: dict, backbone: str, log_dir: Path, **updates) -> dict:
    switch = {"vilt": "on_vilt", "clip": "on_clip", "coca": "on_coca"}[backbone]
    return resolved_config(["task_finetune_food101", switch, "tiny"], {
        "prompt_method": "toy", "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]),
        "vocab_size": data["vocab_size"], "log_dir": str(log_dir), "max_epoch": 2, "per_gpu_batchsize": 16,
        "batch_size": 16, "val_check_interval": 1.0, "load_path": "", "clip_path": "", **updates})


@pytest.mark.parametrize("backbone", ["vilt", "clip", "coca"])
def test_toy_method_trains_and_evaluates_end_to_end(toy, data, tmp_path, backbone) -> None:
    config = _config(data, backbone, tmp_path / "result")
    assert config.get("toy_tokens") == 2   # registered after config.py loaded: its hook still fills the TINY default
    out = run_quiet(config)
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"]
    accuracy = [v for k, v in metrics.items() if "accuracy" in k]
    assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy)

    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    tokens = [k for k in state if k.startswith("model.prompt.tokens.")]
    assert sorted(tokens) == sorted(f"model.prompt.tokens.{s}" for s in
                                    (["joint"] if backbone == "vilt" else ["image", "text"]))
    assert all(state[k].abs().sum() > 0 for k in tokens), "the toy tokens did not train"

    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key


def test_toy_method_keys_are_validated_by_its_config(toy, data, tmp_path) -> None:
    config = {**_config(data, "vilt", tmp_path / "result"), "toy_tokens": 0}   # not a config.py key: in-process
    with pytest.raises(UserInputError, match="toy_tokens must be a positive int"):
        validate_config(config)


def test_unregistered_method_is_refused(data, tmp_path) -> None:
    with registered(ToyPrompt, "toy"):
        config = _config(data, "vilt", tmp_path / "result")
    with pytest.raises(UserInputError, match="unknown prompt_method 'toy'"):
        validate_config(config)
