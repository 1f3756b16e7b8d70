"""`RunConfig`: the typed run config, built once from the flat config (Sacred's, a checkpoint's or a dict).

The flat dict (``config.py``'s keys) stays the user-facing and storage format: ``print_config`` shows it and every
checkpoint stores it in ``hyper_parameters.config``. ``RunConfig.from_flat`` fills what the flat dict leaves out
(the defaults of the sections, the backbone card's sizes and the selected method's config class, and the defaults
that follow from the method, dataset and backbone), and ``to_flat`` gives every key back, so an old checkpoint's
config loads and ``from_flat(f).to_flat() == f`` for a resolved Sacred config.

Below the entry point, code reads typed sections (``run.data.per_gpu_batchsize``, ``run.backbone.num_layers``,
``run.method.prompt_length``), never a string key.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mdpl.data.settings import DataPipeline
from mdpl.config.sections import (SECTIONS, DataConfig, DemoConfig, ExperimentConfig, LoggingConfig, MissingConfig,
                                  ModelConfig, OptimConfig, TrainerConfig)

if TYPE_CHECKING:
    from mdpl.backbones.card import BackboneCard, BackboneSizes
    from mdpl.prompts.base import MethodConfig, PromptMethod


def to_plain(obj: Any) -> Any:
    """Recursive copy of a (Sacred read-only) config into plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def derived_defaults(method: str, dataset: str, backbone: str | None = None) -> dict[str, Any]:
    """The defaults that follow from the method (its paper's backbone, seed, learning rate on `dataset`, missing
    type, whether padding is inert) and from the backbone (its image size)."""
    from mdpl.backbones.registry import available_backbones, backbone_card, method_backbone
    from mdpl.prompts.keys import method_image_transform, padding_is_inert, paper_missing_type, paper_run

    backbone = backbone or method_backbone(method)
    lr = paper_run(method, (OptimConfig.learning_rate, ExperimentConfig.seed), dataset)[0]
    out = {"backbone": backbone, "seed": paper_run(method, (0, ExperimentConfig.seed))[1], "learning_rate": lr,
           "missing_type": dict.fromkeys(("train", "val", "test"), paper_missing_type(method)),
           "dynamic_text_padding": padding_is_inert(method), "image_transform": method_image_transform(method)}
    if backbone in available_backbones():
        out["image_size"] = backbone_card(backbone).sizes().image_size
    return out


def method_keys_of_all() -> set[str]:
    """Every registered method's own config keys."""
    from mdpl.prompts.registry import method_keys
    return {k for keys in method_keys().values() for k in keys}


def inactive_defaults() -> dict[str, Any]:
    """What the keys no run reads unless selected hold by default: every registered backbone's own keys (their
    defaults; the run-wide ``image_size`` excluded) and every method's keys (None)."""
    from mdpl.backbones.card import RUN_KEYS
    from mdpl.backbones.registry import available_backbones, backbone_card

    out: dict[str, Any] = dict.fromkeys(sorted(method_keys_of_all()))
    for name in available_backbones():
        out.update({k: v for k, v in backbone_card(name).sizes.default_values().items() if k not in RUN_KEYS})
    return out


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, (list, tuple)) else value


def method_to_flat(method: "MethodConfig") -> dict[str, Any]:
    """A method config's own keys (tuples as lists, as the flat config holds them)."""
    return {f.name: _listed(getattr(method, f.name)) for f in dataclasses.fields(method)
            if not f.metadata.get("shared_key")}


@dataclass(frozen=True)
class RunConfig:
    """One run's settings, by section; ``backbone`` is the backbone card's sizes dataclass, ``method`` the
    selected method's config (None when no method is selected). ``inactive`` keeps the flat keys this run does not
    read (other backbones' sizes, other methods' keys), so that ``to_flat`` gives back every key."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    missing: MissingConfig = field(default_factory=MissingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    backbone: "BackboneSizes | None" = None
    method: "MethodConfig | None" = None
    inactive: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """The typed config of a flat one (absent keys take their defaults; the selected method's keys are completed
        with its defaults for ``method_sizes``). An unknown backbone or method is one UserInputError line."""
        from mdpl.backbones.registry import backbone_card
        from mdpl.prompts.keys import complete_method_keys
        from mdpl.prompts.registry import method_class

        given = to_plain(dict(flat))
        from mdpl.plugins import import_plugins
        import_plugins(given.get("plugins"))   # a plugin run's method / backbone / dataset, before they are looked up
        method_name = str(given.get("prompt_method") or "")
        dataset = str(given.get("dataset") or DataConfig.dataset)
        full = {**derived_defaults(method_name, dataset, given.get("backbone")), **given}
        card = backbone_card(str(full["backbone"]))
        sections = {name: section.from_flat(full) for name, section in SECTIONS.items()}
        sizes = card.sizes.from_flat(full)
        method = None
        if method_name:
            options = method_class(method_name).config_class
            method = options.from_config(complete_method_keys(full))
        used = {k for section in SECTIONS.values() for k in section.keys()} | set(card.sizes.flat_keys().values())
        used |= set(method_to_flat(method)) if method is not None else set()
        inactive = {k: v for k, v in given.items() if k not in used}
        return cls(**sections, backbone=sizes, method=method, inactive=inactive)

    @classmethod
    def coerce(cls, config: "RunConfig | Mapping[str, Any]") -> "RunConfig":
        """`config` itself, or the typed config of a flat one (tests and old callers hand flat dicts)."""
        return config if isinstance(config, RunConfig) else cls.from_flat(config)

    def to_flat(self) -> dict[str, Any]:
        """Every key as the flat config holds it (what ``print_config`` shows, checkpoints store): the sections, the
        backbone's and the method's keys, and every other backbone's and method's keys (kept values, else defaults)."""
        out: dict[str, Any] = inactive_defaults()
        for name in SECTIONS:
            out.update(getattr(self, name).to_flat())
        out.update(self.backbone.to_flat())
        if self.method is not None:
            out.update(method_to_flat(self.method))
        out.update(self.inactive)
        return to_plain(out)

    def replace(self, **updates: Any) -> "RunConfig":
        """A copy with flat keys changed. A new ``prompt_method`` drops the previous method's keys, so the new
        method's take their defaults."""
        flat = self.to_flat()
        if "prompt_method" in updates and updates["prompt_method"] != self.experiment.prompt_method:
            for key in method_to_flat(self.method) if self.method is not None else ():
                flat[key] = None
        flat.update(updates)
        return RunConfig.from_flat(flat)

    # ------------------------------------------------------------------------------------------- lookups
    @property
    def card(self) -> "BackboneCard":
        """The selected backbone's card."""
        from mdpl.backbones.registry import backbone_card
        return backbone_card(self.experiment.backbone)

    @property
    def pipeline(self) -> DataPipeline:
        """What the data layer needs of the backbone: the card's transform and tokenizer at this run's sizes."""
        card, sizes = self.card, self.backbone
        return DataPipeline(backbone=card.name, transform=str(self.data.image_transform or card.transform), image_size=int(sizes.image_size),
                            tokenizer=card.tokenizer, tokenizer_source=str(self.data.tokenizer or ""),
                            text_length=int(sizes.text_length), text_vocab_size=int(sizes.text_vocab_size),
                            dynamic_text_padding=bool(self.data.dynamic_text_padding) and card.dynamic_text_padding)

    @property
    def method_class(self) -> "type[PromptMethod]":
        """The selected method's class (the `none` baseline when no method is selected)."""
        from mdpl.prompts.registry import baseline_method, method_class
        return method_class(self.experiment.prompt_method or baseline_method())

    def method_options(self) -> "MethodConfig":
        """The selected method's config (the baseline's when no method is selected)."""
        return self.method if self.method is not None else self.method_class.config_class()

    def model_keys(self) -> tuple[str, ...]:
        """The keys a checkpoint evaluated with ``test_only`` must agree on: dataset, backbone, method, the backbone
        card's ``model_keys`` and the method's structural keys."""
        return (("dataset", "backbone", "prompt_method") + tuple(self.card.model_keys)
                + tuple(self.method_class.config_class.structural_keys() if self.method is not None else ()))
