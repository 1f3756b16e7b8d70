"""Raw dataset -> Arrow writers (METHODS.md §1.1-1.2): one module per dataset, shared code in ``common``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mdpl.data.writers import food101, hatememes, mmimdb
from mdpl.data.writers.common import SkipSample, SplitReport, StrictModeError, default_workers
from mdpl.errors import UserInputError

WRITERS = {"mmimdb": mmimdb.make_arrow, "food101": food101.make_arrow, "hatememes": hatememes.make_arrow}
DATASETS = tuple(WRITERS)
#: The Arrow schema each writer produces (what the datasets expect when they open a file).
SCHEMAS = {"mmimdb": mmimdb.SCHEMA, "food101": food101.SCHEMA, "hatememes": hatememes.SCHEMA}

__all__ = ["DATASETS", "SCHEMAS", "WRITERS", "SkipSample", "SplitReport", "StrictModeError", "default_workers",
           "make_arrow"]


def make_arrow(dataset: str, root: Path, out: Path, **options: Any) -> list[SplitReport]:
    """Write the arrow files of ``dataset`` from the raw folder ``root`` into ``out``.

    ``options``: ``strict``, ``max_side``, ``progress``, ``overwrite``, ``log``, ``workers`` (image-reading
    processes, default 1 here; ``make_arrow.py`` defaults to :func:`default_workers`; the files are the same
    for every value) for every dataset, plus ``val_fraction``/``seed`` (food101) and
    ``train_file``/``dev_file``/``test_file`` (hatememes).
    """
    if dataset not in WRITERS:
        raise UserInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return WRITERS[dataset](Path(root), Path(out), **options)
