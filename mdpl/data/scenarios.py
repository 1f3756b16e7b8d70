"""The scenarios of an evaluation sweep (``test_types`` x ``test_ratios``), checked before any work.

    python run.py with task_finetune_food101 map load_path=CKPT test_only=True \
        test_types=[text,image,both] test_ratios=[0.1,0.3,0.5,0.7,0.9]

``mdpl.engine.sweep`` runs them in one pass over the test set; ``mdpl.config.validate`` refuses bad lists here first.
"""
from __future__ import annotations

from mdpl.data.missing import MISSING_TYPES, MissingSpec
from mdpl.data.settings import MissingConfig
from mdpl.errors import UserInputError


def _as_list(value, key: str) -> list:
    """A list from a list/tuple, a scalar, or the CLI string form '[text,image]' / 'text,image'."""
    if isinstance(value, str):
        items = [v.strip().strip("'\"") for v in value.strip().strip("[]()").split(",")]
        items = [v for v in items if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        example = "[text,image,both]" if key == "test_types" else "[0.1,0.5,0.9]"
        raise UserInputError(f"{key} is empty; give e.g. {key}={example}")
    return items


def unique(items: list) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def sweep_specs(missing: MissingConfig, seed: int) -> list[MissingSpec] | None:
    """Scenarios of the sweep (type-major order), or None when neither ``test_types`` nor ``test_ratios`` is set.

    A missing list falls back to the single value: ``test_type`` / ``test_ratio``, else ``missing_type['test']`` /
    ``missing_ratio['test']``. Raises UserInputError (a ValueError) on unknown types or ratios outside [0, 1].
    """
    types_value, ratios_value = missing.test_types, missing.test_ratios
    if types_value is None and ratios_value is None:
        return None
    if types_value is None:
        types_value = missing.test_type or dict(missing.missing_type)["test"]
    if ratios_value is None:
        ratios_value = missing.test_ratio if missing.test_ratio is not None else dict(missing.missing_ratio)["test"]
    types = unique([str(t) for t in _as_list(types_value, "test_types")])
    bad = [t for t in types if t not in MISSING_TYPES]
    if bad:
        raise UserInputError(f"test_types has unknown missing types {bad}; use a list of {list(MISSING_TYPES)}")
    items = _as_list(ratios_value, "test_ratios")
    try:
        if any(isinstance(r, bool) for r in items):
            raise TypeError("a switch is not a ratio")
        ratios = unique([float(r) for r in items])
    except (TypeError, ValueError):
        raise UserInputError(f"test_ratios={ratios_value!r} must be a list of numbers in [0, 1], "
                             "e.g. [0.1,0.5,0.9]") from None
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise UserInputError(f"test_ratios has values outside [0, 1]: {bad}")
    both = float(missing.both_ratio)
    return [MissingSpec(t, r, both, int(seed)) for t in types for r in ratios]
