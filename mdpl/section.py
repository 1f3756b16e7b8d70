"""The base of every run-config section: a frozen dataclass whose field names are the flat config keys.

Each layer owns the sections it reads (the data layer ``mdpl.data.settings``; the others ``mdpl.config.sections``),
so a layer takes its typed settings without importing the config that assembles them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

SPLITS = ("train", "val", "test")


def per_split(value: Any) -> Any:
    """A field holding ``{'train': value, 'val': value, 'test': value}``."""
    return field(default_factory=lambda: dict.fromkeys(SPLITS, value))


@dataclass(frozen=True)
class Section:
    """Base of the sections: the field names are the flat config keys."""

    TITLE: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "Section":
        """The section from a flat config; absent keys keep their defaults."""
        return cls(**{key: flat[key] for key in cls.keys() if key in flat})

    def to_flat(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.keys()}
