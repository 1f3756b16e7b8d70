"""Map-style dataset over one memory-mapped Arrow split (docs/methods.md §1.2-1.4).

Items follow §1.3: Food-101 / Hateful Memes one item per row; MM-IMDb one item per plot by default
(``mmimdb_items='plot'``, reference parity, D-7) or the first plot of each movie (``'movie'``).
The missing table is per row (movie), so all plots of a movie share its missing type.

``__getitem__`` returns a dict: ``image`` (transformed float tensor [3, H, W]; with the opt-in pixel cache,
mdpl/data/pixel_cache.py, the transform's uint8 stage read from it instead, normalised on the device to the same
bits), ``text`` (str),
``label`` (int, or float multi-hot tensor [23] for MM-IMDb), ``row_index``, ``item_index`` and
``missing_type`` (the table's type for the row; simulation and dummies are applied on device, see
mdpl/data/missing.py). Tokenisation happens batched in the collate function (mdpl/data/collate.py).

Every Arrow file is checked when it is opened (:func:`check_arrow_file`): a truncated or non-Arrow file,
a missing column or a column of another type than the writer's schema (the spec's ``schema``), no
rows, or labels outside the dataset's classes raise :class:`~mdpl.errors.UserInputError` naming the file,
what was expected and found, and the ``make_arrow.py`` command that rebuilds it. Extra columns are ignored.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset

from mdpl.data.missing import MissingSpec, load_or_create_missing_table, make_missing_table
from mdpl.data.registry import DatasetSpec, available_datasets, dataset_spec, is_registered
from mdpl.errors import UserInputError

MMIMDB_ITEMS = ("plot", "movie")


def arrow_path(data_root: str | os.PathLike, dataset: str, split: str) -> Path:
    """``<data_root>/<stem>.arrow`` for a split (docs/methods.md §1.2 file names)."""
    return Path(data_root) / f"{dataset_spec(dataset).arrow_stem(split)}.arrow"


class ArrowFileNotFoundError(UserInputError, FileNotFoundError):
    """An arrow file of the run does not exist (a user error that is also a FileNotFoundError)."""


def rebuild_command(dataset: str, data_root: str | os.PathLike) -> str:
    """The make_arrow.py command that (re)creates the arrow files of ``dataset`` in ``data_root``."""
    return f"python make_arrow.py --dataset {dataset} --root <raw {dataset} folder> --out {data_root}"


def check_arrow_exists(path: Path, data_root: str | os.PathLike, dataset: str) -> None:
    if path.is_file():
        return
    expected = ", ".join(dataset_spec(dataset).arrow_file_names())
    raise ArrowFileNotFoundError(f"arrow file not found: {path}. data_root={str(data_root)!r} must hold {expected}; "
                                 f"create them with `{rebuild_command(dataset, data_root)}`")


def dataset_of(path: str | os.PathLike) -> str | None:
    """The dataset whose split file name ``path`` has (``food101_val.arrow`` -> 'food101'), else None."""
    stem = Path(path).stem
    return next((d for d in available_datasets() if stem in dataset_spec(d).arrow_splits.values()), None)


def _schema_of(dataset: str | None) -> pa.Schema | None:
    """The writer schema of a registered ``dataset`` (None: unknown dataset or no schema in its spec)."""
    return dataset_spec(dataset).arrow_schema() if is_registered(dataset) else None


def _format_schema(fields: list[pa.Field]) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in fields) or "no columns"


def schema_problems(found: pa.Schema, expected: pa.Schema) -> list[str]:
    """Missing columns and columns of another type (extra columns are allowed)."""
    problems = []
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            problems.append(f"column {field.name!r} ({field.type}) is missing")
        elif found.field(index).type != field.type:
            problems.append(f"column {field.name!r} is {found.field(index).type}, expected {field.type}")
    return problems


def _bad_file(path: Path, dataset: str, problem: str) -> UserInputError:
    return UserInputError(f"arrow file {path}: {problem}; rebuild it with "
                          f"`{rebuild_command(dataset, path.parent)}`")


def _open_reader(path: Path, dataset: str) -> pa.ipc.RecordBatchFileReader:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, dataset, f"expected an Arrow IPC file, found an unreadable one (truncated or "
                                       f"not arrow: {err})") from None


def check_arrow_file(path: str | os.PathLike, dataset: str | None = None) -> int:
    """Open ``path`` (metadata only), check it against the writer schema of ``dataset``; return its rows.

    ``dataset`` defaults to the one named by the file name; unknown names (and specs without a schema)
    skip the column check.
    Raises UserInputError naming the file, the expected vs found columns and the rebuild command.
    """
    path = Path(path)
    dataset = dataset or dataset_of(path)
    reader = _open_reader(path, dataset or "<dataset>")
    schema = _schema_of(dataset)
    if schema is not None:
        problems = schema_problems(reader.schema, schema)
        if problems:
            raise _bad_file(path, dataset, f"{'; '.join(problems)} (expected columns "
                                           f"{_format_schema(list(schema))}; found "
                                           f"{_format_schema(list(reader.schema))})")
    try:
        n_rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, dataset or "<dataset>", f"its record batches cannot be read ({err})") from None
    if n_rows == 0 and is_registered(dataset):
        raise _bad_file(path, dataset, "expected rows, found none")
    return n_rows


def open_arrow_table(path: str | os.PathLike, dataset: str | None = None) -> pa.Table:
    """Check (:func:`check_arrow_file`), memory-map and read an Arrow IPC file as a (zero-copy) table."""
    path = Path(path)
    check_arrow_file(path, dataset)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        table.validate()
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, dataset or dataset_of(path) or "<dataset>",
                        f"its data cannot be read ({err})") from None
    return table


def count_rows(path: str | os.PathLike) -> int:
    """Number of rows of an Arrow IPC file (reads only metadata; the schema is checked, see above)."""
    return check_arrow_file(path)


class ArrowMultimodalDataset(Dataset):
    """One split of MM-IMDb / Food-101 / Hateful Memes read from ``<data_root>/<stem>.arrow``.

    ``missing_spec`` (None = all complete) gives the split's per-row missing table, cached under
    ``missing_table_root`` when given (mdpl/data/missing.py), else computed in memory.
    """

    def __init__(self, data_root: str | os.PathLike, dataset: str, split: str,
                 transform: Callable[[Image.Image], torch.Tensor], missing_spec: MissingSpec | None = None,
                 missing_table_root: str | os.PathLike | None = None, mmimdb_items: str = "plot") -> None:
        if mmimdb_items not in MMIMDB_ITEMS:
            raise ValueError(f"mmimdb_items must be one of {MMIMDB_ITEMS}, got {mmimdb_items!r}")
        self.dataset, self.split, self.transform = dataset, split, transform
        self.spec: DatasetSpec = dataset_spec(dataset)
        self.path = arrow_path(data_root, dataset, split)
        check_arrow_exists(self.path, data_root, dataset)
        self.stem = self.path.stem
        table = open_arrow_table(self.path, dataset)
        self.n_rows = table.num_rows
        self._build_index(table, per_text=self.spec.per_text_items(mmimdb_items))
        self._load_labels(table)
        self._table: pa.Table | None = None  # opened lazily per process (workers re-map the file)
        self._pid = -1
        self.missing_table = self._make_missing(missing_spec, missing_table_root)
        self.pixel_cache = None   # a mdpl.data.pixel_cache.PixelCache: images read from it, not decoded

    def use_pixel_cache(self, cache) -> None:
        """Read images from ``cache`` (mdpl/data/pixel_cache.py) instead of decoding them: items then carry the
        transform's uint8 stage ([3, H, W]; ``cache.stages`` turns it into the transform's output, bit for bit).
        None goes back to decoding."""
        if cache is not None and len(cache) != self.n_rows:
            raise ValueError(f"pixel cache {cache.path} has {len(cache)} rows, {self.path} has {self.n_rows}")
        self.pixel_cache = cache

    # ------------------------------------------------------------------------------------ building
    def _build_index(self, table: pa.Table, per_text: bool) -> None:
        """Item -> (row, text) index (docs/methods.md §1.3): one item per text, or the first text per row."""
        col = table.column(self.spec.text_column).combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if per_text:
            rows = np.repeat(np.arange(self.n_rows, dtype=np.int64), lengths)
            text_pos = np.arange(int(lengths.sum()), dtype=np.int64)
        else:
            rows = np.flatnonzero(lengths > 0).astype(np.int64)
            text_pos = starts[rows]
        self.texts: list[str] = pc.list_flatten(col).to_pylist()
        self.item_rows = torch.from_numpy(rows)
        self.item_text_pos = text_pos

    def _load_labels(self, table: pa.Table) -> None:
        labels = table.column("label").combine_chunks()
        if self.spec.multi_label:
            self._check_multi_hot(labels)
            flat = pc.list_flatten(labels).to_numpy().astype(np.float32)
            self.labels = torch.from_numpy(flat.reshape(self.n_rows, self.spec.num_classes))
        else:
            self.labels = torch.from_numpy(self._checked_classes(labels))
        ids = "image_id" if "image_id" in table.column_names else None
        self.image_ids = table.column(ids).to_pylist() if ids else None

    def _label_error(self, problem: str) -> UserInputError:
        return _bad_file(self.path, self.dataset, f"column 'label': {problem}")

    def _check_multi_hot(self, labels: pa.Array) -> None:
        """Multi-label (MM-IMDb): every row a ``num_classes``-long 0/1 list."""
        n_labels = self.spec.num_classes
        lengths = pc.fill_null(pc.list_value_length(labels), 0).to_numpy()
        bad = np.flatnonzero(lengths != n_labels)
        if len(bad):
            kind = "multi-hot genres" if self.spec.class_names is not None else "multi-hot labels"
            raise self._label_error(f"row {int(bad[0])} has {int(lengths[bad[0]])} values, expected "
                                    f"{n_labels} ({kind})")
        flat = pc.list_flatten(labels)
        if flat.null_count or not pc.all(pc.is_in(flat, pa.array([0, 1], flat.type))).as_py():
            raise self._label_error("expected 0/1 multi-hot values, found others")

    def _checked_classes(self, labels: pa.Array) -> np.ndarray:
        """Single-label (Food-101 / Hateful Memes): class indices in 0..C-1, no nulls."""
        n_classes = self.spec.num_classes
        if labels.null_count:
            raise self._label_error(f"{labels.null_count} rows have no label")
        values = labels.to_numpy().astype(np.int64)
        bad = np.flatnonzero((values < 0) | (values >= n_classes))
        if len(bad):
            raise self._label_error(f"row {int(bad[0])} has class {int(values[bad[0]])}, expected 0..{n_classes - 1}")
        return values

    def _make_missing(self, spec: MissingSpec | None, root: str | os.PathLike | None) -> torch.Tensor:
        if spec is None:
            return torch.zeros(self.n_rows, dtype=torch.long)
        if root:
            return load_or_create_missing_table(root, self.stem, self.n_rows, spec, self.dataset, self.split)
        return make_missing_table(self.n_rows, spec, self.dataset, self.split)

    def set_missing_table(self, table: torch.Tensor) -> None:
        """Replace the per-row missing table (e.g. an imported reference table)."""
        if table.dim() != 1 or len(table) != self.n_rows:
            raise ValueError(f"missing table has shape {tuple(table.shape)}, expected ({self.n_rows},) for {self.path}")
        self.missing_table = table.long()

    # ------------------------------------------------------------------------------------- reading
    def _images(self) -> pa.ChunkedArray:
        if self._table is None or self._pid != os.getpid():
            self._table = open_arrow_table(self.path, self.dataset)
            self._pid = os.getpid()
            self._image_col = self._table.column("image")
            self._chunk_starts = np.cumsum([0] + [len(c) for c in self._image_col.chunks])
        return self._image_col

    def _image_bytes(self, row: int) -> bytes:
        col = self._images()
        chunk = int(np.searchsorted(self._chunk_starts, row, side="right") - 1)
        return col.chunks[chunk][row - int(self._chunk_starts[chunk])].as_py()

    def _decode(self, row: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self._image_bytes(row))) as img:
                return img.convert("RGB")
        except Exception as err:
            name = f" (image_id {self.image_ids[row]!r})" if self.image_ids else ""
            raise ValueError(f"{self.path}: row {row}{name}: image cannot be decoded ({type(err).__name__}: "
                             f"{err}); rebuild the arrow file with make_arrow.py") from err

    def __len__(self) -> int:
        return len(self.item_rows)

    def __getitem__(self, index: int) -> dict:
        row = int(self.item_rows[index])
        return {
            "image": self.transform(self._decode(row)) if self.pixel_cache is None else self.pixel_cache.image(row),
            "text": self.texts[int(self.item_text_pos[index])],
            "label": self.labels[row] if self.spec.multi_label else int(self.labels[row]),
            "row_index": row,
            "item_index": int(index),
            "missing_type": int(self.missing_table[row]),
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_table=None, _pid=-1)  # never pickle the memory-mapped table (spawned workers re-map)
        state.pop("_image_col", None)
        state.pop("_chunk_starts", None)
        return state
