"""Raw dataset -> Arrow writers (docs/methods.md §1.1-1.2): one module per dataset, shared code in ``common``.

Which writer a dataset uses is its spec's ``writer`` (mdpl/data/registry.py); :func:`writer_datasets` lists
the registered datasets that have one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mdpl.data.registry import available_datasets, dataset_spec
from mdpl.data.writers.common import SkipSample, SplitReport, StrictModeError, default_workers
from mdpl.errors import UserInputError

__all__ = ["SkipSample", "SplitReport", "StrictModeError", "default_workers", "make_arrow", "writer_datasets"]


def writer_datasets() -> list[str]:
    """Registered datasets with a raw-layout writer (the ``make_arrow.py --dataset`` choices)."""
    return [name for name in available_datasets() if dataset_spec(name).writer is not None]


def make_arrow(dataset: str, root: Path, out: Path, **options: Any) -> list[SplitReport]:
    """Write the arrow files of ``dataset`` from the raw folder ``root`` into ``out``.

    ``options``: ``strict``, ``max_side``, ``progress``, ``overwrite``, ``log``, ``workers`` (image-reading
    processes, default 1 here; ``make_arrow.py`` defaults to :func:`default_workers`; the files are the same
    for every value) for every dataset, plus the spec's ``writer_options`` (food101: ``val_fraction``/``seed``;
    hatememes: ``train_file``/``dev_file``/``test_file``).
    """
    writer = dataset_spec(dataset).make_arrow_fn() if dataset in writer_datasets() else None
    if writer is None:
        raise UserInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(writer_datasets())}")
    return writer(Path(root), Path(out), **options)
