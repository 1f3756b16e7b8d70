"""The sections of a run config: one frozen dataclass per concern, each field a config key with its default.

``config.py`` (the Sacred entry) takes its defaults from here; the backbone's section is its card's sizes dataclass
(``mdpl.backbones.card``) and the method's its ``MethodConfig``. A default that follows from the method, dataset or
backbone (seed, learning rate, backbone, missing type, ``dynamic_text_padding``, ``image_size``) is filled by
``mdpl.config.run_config.derived_defaults``; the field default here is what holds without a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mdpl.data.settings import DataConfig, MissingConfig
from mdpl.section import Section

PRECISIONS = {"16": "16-mixed", "16-mixed": "16-mixed", "32": "32-true", "32-true": "32-true",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true", "64": "64-true",
              "64-true": "64-true"}
"""The accepted ``precision`` values -> Lightning's names (validated here, applied by the trainer)."""


@dataclass(frozen=True)
class ExperimentConfig(Section):
    """What runs: the method, the backbone, the seed, the run's name."""

    TITLE = "experiment"
    exp_name: str = "mdpl"
    prompt_method: str = ""       # required: a registered method (or the preset of that name)
    method_sizes: str = "paper"   # defaults of the method's own keys: the papers' or 'tiny'
    backbone: str = ""            # a registered backbone; default: the method's paper backbone, else the default one
    seed: int = 0                 # default: the method's paper seed
    plugins: Any = field(default_factory=list)   # modules to import first: methods, backbones, datasets (mdpl.plugins)


@dataclass(frozen=True)
class LoggingConfig(Section):
    """Where runs are written and which loggers write them."""

    TITLE = "logging"
    log_dir: str = "result"
    logger: Any = "tensorboard,csv"


@dataclass(frozen=True)
class ModelConfig(Section):
    """The classifier around the backbone: the file it starts from and what trains."""

    TITLE = "model"
    load_path: str = ""
    finetune: bool = False
    frozen_eval_mode: bool = False


@dataclass(frozen=True)
class OptimConfig(Section):
    """Optimizer and learning-rate schedule (docs/methods.md §7.3-7.4)."""

    TITLE = "optimisation"
    optimizer_impl: str = "legacy_hf"
    learning_rate: float = 1e-4   # default: the method's reference value on the dataset
    weight_decay: float = 0.01
    lr_mult: float = 1
    decay_power: Any = 1
    end_lr: float = 0.0
    max_epoch: int = 100
    max_steps: Any = None
    warmup_steps: Any = 2500


METRIC_INPUTS = ("probabilities", "logits")
"""``metric_inputs``: the model's probabilities (mdpl's metrics) or its raw logits, as the references' torchmetrics 0.9.3
classes received them (mdpl.engine.metrics)."""


@dataclass(frozen=True)
class TrainerConfig(Section):
    """Devices, precision, run length, resumption."""

    TITLE = "trainer"
    num_gpus: int = 1
    num_nodes: int = 1
    num_cpu_processes: int = 1
    precision: Any = "bf16-mixed"
    compile: bool = False
    val_check_interval: Any = 1.0
    test_only: bool = False
    fast_dev_run: Any = False
    deterministic: Any = "warn"
    find_unused_parameters: bool = False
    resume_from: str = ""
    resume: bool = False
    checkpoint_every_n_steps: int = 0
    metric_inputs: str = "probabilities"   # what the metrics threshold / rank (METRIC_INPUTS)
    primary_metric: str = ""      # the logged value used as the_metric; "" = the dataset's


@dataclass(frozen=True)
class DemoConfig(Section):
    """The embedded demo (mdpl/demo.py)."""

    TITLE = "demo"
    demo: bool = False
    demo_dir: str = "datasets/demo"
    demo_samples: list = field(default_factory=lambda: [240, 60, 120])
    demo_keyword_repeats: int = 3
    demo_pretrain_epochs: int = 8
    demo_pretrain_lr: float = 2e-3
    demo_epochs: int = 4
    demo_methods: list = field(default_factory=list)   # []: the methods whose class sets ``in_demo``
    demo_test_types: list = field(default_factory=lambda: ["text", "image", "both"])
    demo_test_ratios: list = field(default_factory=lambda: [0.0, 0.3, 0.7, 1.0])


SECTIONS: dict[str, type[Section]] = {
    "experiment": ExperimentConfig, "logging": LoggingConfig, "data": DataConfig, "missing": MissingConfig,
    "model": ModelConfig, "optim": OptimConfig, "trainer": TrainerConfig, "demo": DemoConfig}
"""RunConfig attribute -> section class."""
