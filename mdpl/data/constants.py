"""Dataset constants (the layouts in DATA.md).

The per-dataset facts live in the registry (mdpl/data/registry.py, one :class:`DatasetSpec` per dataset);
``NUM_CLASSES``, ``ARROW_SPLITS`` and ``TEXT_COLUMN`` are read-only views of the *built-in* specs kept
for backward compatibility -- new code reads ``dataset_spec(name)`` (which also knows registered datasets).
"""
from __future__ import annotations

from mdpl.data.registry import BUILTIN_DATASETS, MMIMDB_GENRES as _GENRES, dataset_spec

NUM_CLASSES = {name: dataset_spec(name).num_classes for name in BUILTIN_DATASETS}

# docs/methods.md §1.1: fixed genre order of the MM-IMDb multi-hot label (index = position).
MMIMDB_GENRES = list(_GENRES)

# docs/methods.md §1.2: split -> arrow file stem (<stem>.arrow).
ARROW_SPLITS = {name: dict(dataset_spec(name).arrow_splits) for name in BUILTIN_DATASETS}

TEXT_COLUMN = {name: dataset_spec(name).text_column for name in BUILTIN_DATASETS}

# docs/methods.md §0: per-sample missing type.
MISSING_COMPLETE, MISSING_TEXT, MISSING_IMAGE = 0, 1, 2
