"""Token layout of the joint ViLT sequence (docs/methods.md §3.2, §4.3, §12).

A `TokenLayout` is an immutable, ordered list of named segments, e.g.
``[("map.1", 16), ("map.0", 16), ("text", 40), ("image", 145)]``. Prompt methods never do index
arithmetic themselves: they ask the layout for offsets/spans and build the new layout with
`insert_before` / `insert_after`, then splice the hidden states with `splice_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

TEXT = "text"
IMAGE = "image"


@dataclass(frozen=True)
class Segment:
    """One contiguous run of tokens."""

    name: str
    length: int


class TokenLayout:
    """Ordered, uniquely named segments of the current sequence."""

    def __init__(self, segments: Iterable[tuple[str, int] | Segment]):
        segs = tuple(s if isinstance(s, Segment) else Segment(str(s[0]), int(s[1])) for s in segments)
        names = [s.name for s in segs]
        if len(set(names)) != len(names):
            raise ValueError(f"TokenLayout segment names must be unique, got {names}")
        if any(s.length < 0 for s in segs):
            raise ValueError(f"TokenLayout segment lengths must be >= 0, got {segs}")
        self.segments: tuple[Segment, ...] = segs

    # --- queries -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def total(self) -> int:
        """Sequence length N."""
        return sum(s.length for s in self.segments)

    def _index(self, name: str) -> int:
        for i, s in enumerate(self.segments):
            if s.name == name:
                return i
        raise KeyError(f"no segment {name!r} in layout {self.names}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def length(self, name: str) -> int:
        return self.segments[self._index(name)].length

    def offset(self, name: str) -> int:
        """Index of the first token of segment `name`."""
        i = self._index(name)
        return sum(s.length for s in self.segments[:i])

    def end(self, name: str) -> int:
        """Index one past the last token of segment `name`."""
        return self.offset(name) + self.length(name)

    def span(self, name: str) -> slice:
        return slice(self.offset(name), self.end(name))

    # --- edits (return new layouts) --------------------------------------------------------------
    def insert_at(self, position: int, new: Sequence[tuple[str, int] | Segment]) -> "TokenLayout":
        """Insert segments before segment number `position` (0 = front, len = back)."""
        segs = list(self.segments)
        return TokenLayout(segs[:position] + list(new) + segs[position:])

    def insert_before(self, name: str, new: Sequence[tuple[str, int] | Segment]) -> "TokenLayout":
        return self.insert_at(self._index(name), new)

    def insert_after(self, name: str, new: Sequence[tuple[str, int] | Segment]) -> "TokenLayout":
        return self.insert_at(self._index(name) + 1, new)

    def resized(self, name: str, length: int) -> "TokenLayout":
        """The same layout with segment `name` `length` tokens long."""
        return TokenLayout([Segment(s.name, length) if s.name == name else s for s in self.segments])

    def prepend(self, new: Sequence[tuple[str, int] | Segment]) -> "TokenLayout":
        return self.insert_at(0, new)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenLayout) and self.segments == other.segments

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}:{s.length}" for s in self.segments)
        return f"TokenLayout({inner})"


def splice_tokens(
    x: torch.Tensor, mask: torch.Tensor, position: int, tokens: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert `tokens` ([B, n_i, D] each, in order) at sequence index `position`.

    The key mask gets ones (= attend) for every inserted token (docs/methods.md §3.2, §4.3 step 4).
    """
    if not tokens:
        return x, mask
    new = torch.cat(list(tokens), dim=1).to(x.dtype)
    ones = mask.new_ones(mask.shape[0], new.shape[1])
    x = torch.cat([x[:, :position], new, x[:, position:]], dim=1)
    mask = torch.cat([mask[:, :position], ones, mask[:, position:]], dim=1)
    return x, mask
