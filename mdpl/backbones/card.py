"""A backbone's card: everything the rest of mdpl knows about a backbone, declared once in the backbone's file.

`BackboneSizes` is the backbone's section of the run config (``RunConfig.backbone``): its fields are config keys
(``PREFIX`` + field name, except the run-wide ``image_size``), their defaults the pre-trained model's, ``TINY`` the
small values of the `tiny` named config, and ``check()`` validates them (one UserInputError line per mistake).
`BackboneCard` adds the encoder builder, the tokenizer and image transform the data pipeline uses for it, its
pre-trained weights file and the keys a checkpoint must agree on. Validation, data, API, checkpoints and
``config.py`` ask the card; none of them names a backbone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from mdpl.errors import UserInputError

RUN_KEYS = ("image_size",)
"""Size fields whose config key has no prefix: the one image size of a run (the transform's and the encoder's)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BackboneSizes:
    """A backbone's config section. Subclasses declare fields with the pre-trained model's values as defaults."""

    PREFIX: ClassVar[str] = ""
    TINY: ClassVar[Mapping[str, Any]] = {}
    """Field -> the small value of the `tiny` named config (random-initialised CPU tests)."""
    described_as: ClassVar[str] = "the backbone"
    """How messages name the backbone and its depth keys, e.g. "the CLIP backbone (clip_vision_layers, ...)"."""

    @classmethod
    def flat_key(cls, name: str) -> str:
        """The config key of field `name`."""
        return name if name in RUN_KEYS else f"{cls.PREFIX}{name}"

    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """Field name -> config key, in declaration order."""
        return {f.name: cls.flat_key(f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def default_values(cls) -> dict[str, Any]:
        """Config key -> default (a fresh copy)."""
        return cls().to_flat()

    @classmethod
    def tiny_values(cls) -> dict[str, Any]:
        """Config key -> value under the `tiny` named config (the ``TINY`` fields only)."""
        return {cls.flat_key(name): value for name, value in cls.TINY.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "BackboneSizes":
        """The section from a flat config: keys absent or None keep their defaults."""
        return cls(**{name: flat[key] for name, key in cls.flat_keys().items() if flat.get(key) is not None})

    def to_flat(self) -> dict[str, Any]:
        """Config key -> value."""
        return {key: getattr(self, name) for name, key in self.flat_keys().items()}

    @classmethod
    def bool_keys(cls) -> tuple[str, ...]:
        """The config keys of the on/off fields."""
        return tuple(cls.flat_key(f.name) for f in dataclasses.fields(cls) if isinstance(f.default, bool))

    def check(self) -> None:
        """Integer fields are integers >= their ``metadata["minimum"]`` (default 1); subclasses add how sizes fit."""
        for f in dataclasses.fields(self):
            if f.type not in ("int", int):
                continue
            value, minimum = getattr(self, f.name), f.metadata.get("minimum", 1)
            if not (_is_int(value) and value >= minimum):
                what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                raise UserInputError(f"{self.flat_key(f.name)}={value!r} must be {what}{f.metadata.get('hint', '')}")

    def require_multiple(self, name: str, divisor: str, example: str) -> None:
        """Field `name` must be a multiple of field `divisor` (UserInputError naming both keys and `example`)."""
        value, by = getattr(self, name), getattr(self, divisor)
        if value % by:
            raise UserInputError(f"{self.flat_key(name)}={value} is not a multiple of {self.flat_key(divisor)}={by}; "
                                 f"choose sizes that divide ({example})")

    @property
    def depth(self) -> int:
        """Blocks in every stream (what prompt layers index)."""
        raise NotImplementedError

    @property
    def stream_widths(self) -> dict[str, int]:
        """Stream name -> token width: 'joint' for a single-stream encoder, 'image' and 'text' for two towers."""
        raise NotImplementedError

    @property
    def text_length(self) -> int:
        """Text ids per sample the tokenizer gives (padded)."""
        raise NotImplementedError

    @property
    def text_vocab_size(self) -> int:
        """Token ids of the tokenizer's vocabulary."""
        raise NotImplementedError



@dataclass(frozen=True)
class WeightsSpec:
    """The pre-trained weights file of a backbone: the config key naming it (and its optional SHA-256 key), how
    messages describe it, and its reader ``(path, sha256) -> state dict`` (None: the builder reads it itself)."""

    key: str
    sha_key: str = ""
    placeholder: str = "<file>"
    example: str = ""
    what: str = "the pre-trained weights file"
    read: Callable[[str, str], Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class BackboneCard:
    """A registered backbone (``mdpl.backbones.registry.register_backbone``)."""

    name: str
    build: Callable[[Any], Any]
    """run config (``mdpl.config.RunConfig``) -> the encoder, with its pre-trained weights unless ``test_only``."""
    sizes: type[BackboneSizes]
    tokenizer: str
    """'bert' (WordPiece, ``tokenizer`` folder, checked against the vocabulary size) | 'bpe' (OpenAI BPE)."""
    transform: str
    """'pixelbert' (ViLT's min-max resize) | 'clip' (OpenAI CLIP's preprocessing); also the pixel cache's id."""
    weights: WeightsSpec
    model_keys: tuple[str, ...] = ()
    """The config keys a checkpoint evaluated with ``test_only`` must agree on."""
    dynamic_text_padding: bool = False
    """The encoder accepts texts padded to the batch's longest (``dynamic_text_padding`` applies)."""
    reference_reader: Callable[..., Any] | None = None
    """Reads a checkpoint of the reference code (trained prompts on this backbone), if there is such a format."""
    weights_file: str = ""
    """File name of the paper's pre-trained weights in a weights folder (``scripts/reproduce.py --weights``)."""
    tokenizer_dir: str = ""
    """Folder of its WordPiece vocabulary in a weights folder ('': the backbone reads OpenAI BPE texts)."""

    @property
    def weights_key(self) -> str:
        """The config key naming the pre-trained weights file."""
        return self.weights.key
