"""The one exception class for mistakes in the user's input (config, data, checkpoints, files).

``run.py`` and ``make_arrow.py`` print a :class:`UserInputError` as one ``error: ...`` line on stderr and exit
with status 2; set ``MDPL_DEBUG=1`` to see the traceback instead. Anything else that escapes is a bug in mdpl
and keeps its traceback.

It subclasses :class:`ValueError`, so library callers that catch ``ValueError`` keep working.
"""
from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2
DEBUG_ENV = "MDPL_DEBUG"


class UserInputError(ValueError):
    """A problem the user fixes by changing an input; the message says what to change (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))   # always one line


def debug_enabled() -> bool:
    """True when ``MDPL_DEBUG`` is set to a non-empty value other than 0: show tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_with(err: BaseException, prog: str | None = None) -> None:
    """Print ``[prog: ]error: <message>`` on stderr and exit with status 2 (the CLIs' handler)."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)
