"""Methods, backbones and datasets defined outside mdpl: entry points of installed packages and the ``plugins`` key.

An installed package registers its code through the entry-point groups of :data:`GROUPS` (in its
``pyproject.toml``: ``[project.entry-points."mdpl.methods"] mymethod = "mypkg.mymethod"``); each registry imports
the modules of its group when it first loads its built-ins, so the plugin's ``register_*`` call runs before any
lookup. For one-off code, the run key ``plugins=[module,...]`` imports modules by name (they must be importable,
e.g. on ``PYTHONPATH``). ``run.py`` imports them before Sacred builds the config keys (:func:`plugins_in_argv`),
and a checkpoint's stored config carries them, so ``test_only`` imports them again.
A module that cannot be imported is one :class:`~mdpl.errors.UserInputError` line.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any

from mdpl.errors import UserInputError

GROUPS = {"methods": "mdpl.methods", "backbones": "mdpl.backbones", "datasets": "mdpl.datasets"}
"""Registry kind -> the entry-point group its plugins register under."""

_LOADED: set[str] = set()


def load_entry_points(kind: str) -> None:
    """Import every module registered under the entry-point group of `kind` (once per process)."""
    group = GROUPS[kind]
    if group in _LOADED:
        return
    _LOADED.add(group)   # before loading: a plugin that looks itself up must not load the group again
    for point in entry_points(group=group):
        try:
            point.load()
        except Exception as err:   # a broken installed plugin names itself, in one line
            raise UserInputError(f"plugin entry point {point.name} = {point.value} (group {group}) failed to load: "
                                 f"{type(err).__name__}: {err}") from None


def plugin_modules(value: Any) -> list[str]:
    """The module names of a ``plugins`` value: a list of names, one name, or a comma-separated string."""
    if value in (None, "", [], ()):
        return []
    # Sacred keeps `plugins=[a.b,c]` (not a Python literal) as the string "[a.b,c]"
    items = value if isinstance(value, (list, tuple)) else str(value).strip().strip("[]").split(",")
    names = [str(item).strip().strip("'\"") for item in items if str(item).strip()]
    bad = [n for n in names if not all(part.isidentifier() for part in n.split("."))]
    if bad:
        raise UserInputError(f"plugins={value!r}: {bad[0]!r} is not a module name; give e.g. plugins=[mypkg.mymethod]")
    return names


def import_plugins(value: Any) -> list[str]:
    """Import the modules of a ``plugins`` value (registering what they define); their names."""
    names = plugin_modules(value)
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise UserInputError(f"plugins: cannot import {name!r} ({err}); put its folder on PYTHONPATH or install "
                                 "it") from None
        except UserInputError:
            raise
        except Exception as err:
            raise UserInputError(f"plugins: importing {name!r} failed: {type(err).__name__}: {err}") from None
    return names


def _value(text: str) -> Any:
    """A command-line value as Sacred reads it (a Python literal, else the plain string)."""
    from sacred.arg_parser import _convert_value
    return _convert_value(text)


def plugins_in_argv(argv: Sequence[str]) -> list[str]:
    """The ``plugins=...`` module names of a ``run.py ... with ...`` command line, and, for ``test_only`` with a
    ``load_path``, those its checkpoint stored (so a plugin run is evaluated again without restating them)."""
    updates = _updates(argv)
    names = plugin_modules(_value(updates["plugins"])) if "plugins" in updates else []
    if str(updates.get("test_only", "")) in ("True", "true", "1") and updates.get("load_path"):
        names += [n for n in stored_plugins(_value(updates["load_path"])) if n not in names]
    return names


def _updates(argv: Sequence[str]) -> dict[str, str]:
    """The ``key=value`` words after ``with`` (unparsed values)."""
    args = list(argv)
    words = args[args.index("with") + 1:] if "with" in args else []
    return dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))


def stored_plugins(path: Any) -> list[str]:
    """The ``plugins`` a checkpoint's config holds ([] when the file is not a readable mdpl checkpoint: the run's own
    checks report that)."""
    try:
        import torch
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
        return plugin_modules(checkpoint["hyper_parameters"]["config"].get("plugins"))
    except UserInputError:
        raise
    except Exception:
        return []


def load_command_line_plugins(argv: Iterable[str]) -> None:
    """run.py's first step: every registry's entry points, then the command line's ``plugins``."""
    for kind in GROUPS:
        load_entry_points(kind)
    import_plugins(plugins_in_argv(list(argv)))


__all__ = ["GROUPS", "load_entry_points", "plugin_modules", "import_plugins", "plugins_in_argv", "stored_plugins",
           "load_command_line_plugins"]
