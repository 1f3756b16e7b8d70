"""The typed run config (mdpl/config): flat <-> typed round trips for every named-config combination of config.py,
the backbone cards behind the size keys, an unknown backbone as one error line, and old checkpoints' flat configs."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from sacred.initialize import create_run

from config import NAMED_CONFIG_KINDS, ex
from mdpl.backbones.registry import available_backbones, backbone_card
from mdpl.config import RunConfig, backbone_size_defaults, backbone_tiny_sizes, flat_defaults, stored_run_config
from mdpl.config.validate import validate_config
from mdpl.errors import UserInputError
from mdpl.prompts.registry import method_keys


def resolved(named: list[str], updates: dict | None = None) -> dict:
    """config.py's flat config with the named configs and updates applied (without running a command)."""
    from mdpl.config import to_plain
    return to_plain(create_run(ex, "print_config", config_updates=updates or {}, named_configs=named).config)


COMBINATIONS = [
    [n for n in names if n]
    for names in itertools.product(("",) + NAMED_CONFIG_KINDS["task"], ("",) + NAMED_CONFIG_KINDS["method preset"],
                                   ("",) + NAMED_CONFIG_KINDS["backbone switch"], ("",) + NAMED_CONFIG_KINDS["size config"])
]


def test_every_named_config_combination_round_trips() -> None:
    assert len(COMBINATIONS) == 4 * (len(NAMED_CONFIG_KINDS["method preset"]) + 1) * 4 * 3
    for names in COMBINATIONS:
        flat = resolved(names)
        run = RunConfig.from_flat(flat)
        assert run.to_flat() == flat, names
        assert run.experiment.backbone == flat["backbone"] and run.card.name == flat["backbone"]
        assert run.backbone.image_size == flat["image_size"]
        if flat["prompt_method"]:
            assert run.method is not None and type(run.method) is run.method_class.config_class


def test_typed_sections_hold_the_flat_values() -> None:
    flat = resolved(["task_finetune_hatememes", "memprompt", "tiny"])
    run = RunConfig.from_flat(flat)
    assert run.data.dataset == "hatememes" and run.data.per_gpu_batchsize == 8
    assert run.optim.learning_rate == flat["learning_rate"] and run.optim.warmup_steps == 0.1
    assert run.trainer.num_gpus == 0 and run.trainer.precision == "32-true"
    assert run.missing.missing_type == {"train": "image", "val": "image", "test": "image"}
    assert run.backbone.num_layers == 2 and run.backbone.max_text_len == 24
    assert run.method.mem_size == flat["mem_size"] and run.method.gen_prompt_layers == tuple(flat["gen_prompt_layers"])


def test_config_py_keys_and_defaults_come_from_the_dataclasses() -> None:
    """Without named configs config.py resolves to the dataclasses' defaults, key for key; the size keys are the
    cards' (the run-wide image_size follows the selected backbone)."""
    assert resolved([]) == flat_defaults()
    sizes = backbone_size_defaults()
    for name in available_backbones():
        card = backbone_card(name)
        own = {k for k in card.sizes.flat_keys().values() if k != "image_size"}
        assert own <= set(sizes)
    tiny = resolved(["tiny"])
    assert all(tiny[k] == v for k, v in backbone_tiny_sizes().items())
    assert {k for keys in method_keys().values() for k in keys} <= set(resolved([]))


def test_partial_flat_configs_take_the_derived_defaults() -> None:
    run = RunConfig.from_flat({"prompt_method": "dcp", "dataset": "food101"})
    assert run.experiment.backbone == "clip" and run.backbone.image_size == 224
    assert run.method.prompt_length == 36 and run.trainer.precision == "bf16-mixed"
    flat = resolved(["task_finetune_food101", "dcp"])
    assert run.optim.learning_rate == flat["learning_rate"] and run.experiment.seed == flat["seed"]
    assert run.data.num_workers == flat["num_workers"] == 8


def test_replace_switches_method_keys() -> None:
    run = RunConfig.from_flat(resolved(["task_finetune_food101", "map", "tiny"]))
    swapped = run.replace(prompt_method="memprompt")
    assert swapped.method_class.name == "memprompt"
    tiny = swapped.method_class.config_class.TINY
    assert all(getattr(swapped.method, k) == (tuple(v) if isinstance(v, list) else v) for k, v in tiny.items())
    assert swapped.to_flat()["prompt_length"] is None     # the previous method's keys are unset again


@pytest.mark.parametrize("build", [
    lambda: RunConfig.from_flat({"backbone": "nope", "prompt_method": "none"}),
    lambda: validate_config({"backbone": "nope", "prompt_method": "none", "dataset": "food101"}, check_data=False),
    lambda: backbone_card("nope"),
])
def test_unknown_backbone_is_one_error_line(build) -> None:
    with pytest.raises(UserInputError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and "unknown backbone 'nope'" in message and "vilt" in message


def test_backbone_cards_check_their_sizes() -> None:
    with pytest.raises(UserInputError, match="clip_vision_width=100 is not a multiple of clip_vision_head_width=64"):
        validate_config({**resolved(["task_finetune_food101", "dcp"]), "clip_vision_width": 100}, check_data=False)
    with pytest.raises(UserInputError, match="hidden_size=65 is not divisible by num_heads=2"):
        validate_config({**resolved(["task_finetune_food101", "map", "tiny"]), "hidden_size": 65}, check_data=False)


def test_an_old_checkpoints_flat_config_loads(tmp_path) -> None:
    """A checkpoint written before some keys existed: its flat config is typed with their defaults, the classifier is
    rebuilt from it and every weight loads (the test_only path)."""
    from mdpl.engine.module import MDPLModule, load_for_test

    flat = resolved(["task_finetune_food101", "map", "tiny"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MDPLModule(flat)
    newer = [k for k in flat if k.startswith(("coca_", "dcp_", "demo")) or k in ("pixel_cache", "logger", "compile")]
    old = {k: v for k, v in flat.items() if k not in newer}
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {"config": old}}
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    loaded = torch.load(path, weights_only=False)
    run = stored_run_config(loaded)
    assert run.to_flat() == {**flat_defaults(), **old}        # the keys it lacks take today's defaults
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = MDPLModule(loaded["hyper_parameters"]["config"], weights_from_checkpoint=True)
    assert load_for_test(again, loaded) == "mdpl"
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in again.state_dict().items())
