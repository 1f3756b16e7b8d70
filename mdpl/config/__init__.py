"""The run config: typed sections (`RunConfig`), built and validated once from the flat config at the entry point.

    from mdpl.config import RunConfig
    run = RunConfig.from_flat({"prompt_method": "map", "dataset": "food101"})   # every other key: its default
    run.optim.learning_rate, run.backbone.num_layers, run.method.prompt_length
    run.to_flat()                                                               # every key, as checkpoints store it

``config.py`` (Sacred) is the command-line entry over the same keys and defaults.
"""
from mdpl.config.checkpoint import checkpoint_mismatches, size_differences, stored_run_config
from mdpl.config.run_config import RunConfig, derived_defaults, inactive_defaults, method_keys_of_all, to_plain
from mdpl.config.sections import (SECTIONS, DataConfig, DemoConfig, ExperimentConfig, LoggingConfig, MissingConfig,
                                  ModelConfig, OptimConfig, TrainerConfig)

__all__ = ["RunConfig", "derived_defaults", "to_plain", "SECTIONS", "DataConfig", "DemoConfig", "ExperimentConfig",
           "LoggingConfig", "MissingConfig", "ModelConfig", "OptimConfig", "TrainerConfig", "checkpoint_mismatches",
           "stored_run_config", "size_differences", "build_run_config", "flat_defaults", "backbone_size_defaults", "backbone_tiny_sizes"]


def build_run_config(flat, check_data: bool = True) -> RunConfig:
    """Validate the flat config (one UserInputError line for the first mistake), then type it: the entry point's
    one call."""
    from mdpl.config.validate import validate_config
    from mdpl.plugins import import_plugins
    import_plugins(flat.get("plugins"))   # their methods, backbones and datasets are what the checks look up
    validate_config(flat, check_data=check_data)
    return RunConfig.from_flat(flat)


def flat_defaults() -> dict:
    """Every key's default without a method (what ``config.py`` resolves to before a task or method is named)."""
    return RunConfig.from_flat({}).to_flat()


def backbone_size_defaults() -> dict:
    """Every registered backbone's own keys with their defaults (the run-wide ``image_size`` excluded: it follows
    the selected backbone)."""
    return {k: v for k, v in inactive_defaults().items() if k not in method_keys_of_all()}


def backbone_tiny_sizes() -> dict:
    """Every registered backbone's small sizes of the `tiny` named config."""
    from mdpl.backbones.registry import available_backbones, backbone_card
    out = {}
    for name in available_backbones():
        out.update(backbone_card(name).sizes.tiny_values())
    return out
