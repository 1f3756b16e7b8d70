"""Dataset registry: a dataset is one :class:`DatasetSpec` registered under its name (docs/methods.md §1).

Everything that depends on the dataset -- the number of classes, single- vs multi-label, the arrow file
stems, the text column, the loss and metrics, the raw-layout writer of ``make_arrow.py`` and the synthetic
generator -- is read from the spec, so a new dataset is one :func:`register_dataset` call (as open_clip's
model configs)::

    from mdpl.data.registry import DatasetSpec, register_dataset
    register_dataset(DatasetSpec(name="toyset", num_classes=3))   # arrow files toyset_{train,val,test}.arrow

The built-in specs (``mmimdb``, ``food101``, ``hatememes``) are registered when this module is imported.
References to code that imports heavy modules (writers, synthetic generators, arrow schemas) are
``"module:attribute"`` strings resolved on use (:func:`resolve`), so importing the registry stays cheap and
free of import cycles; a spec may also hold the objects themselves.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mdpl.errors import UserInputError

SPLITS = ("train", "val", "test")
LOSS_KINDS = ("bce_with_logits", "cross_entropy")
#: items rules (docs/methods.md §1.3): one item per text of a row, or selectable by ``mmimdb_items``
#: ('plot' = one per text, 'movie' = the first text of each row).
TEXT_ITEMS = ("per_text", "selectable")


F1_NAMES = ("F1_Micro", "F1_Macro", "F1_Samples", "F1_Weighted")
"""The values metric kind 'f1' logs (mdpl.engine.metrics.MultilabelF1)."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything mdpl needs to know about one dataset.

    * ``name``: the config value ``dataset=<name>`` and the arrow file prefix.
    * ``num_classes``: width of the classifier head (multi-label: number of labels).
    * ``multi_label``: labels are multi-hot lists of ``num_classes`` 0/1 values (else class indices).
    * ``class_names``: display names in label order (None: unknown or too many to list).
    * ``arrow_splits``: split (train/val/test) -> arrow file stem; default ``<name>_<split>``.
    * ``text_column``: the ``list<string>`` column holding the texts of a row.
    * ``text_items``: ``'per_text'`` (one item per text) or ``'selectable'`` (config ``mmimdb_items``:
      'plot' = one item per text, 'movie' = the first text of each row).
    * ``loss``: a kind of :data:`LOSS_KINDS` or a callable ``(logits, label) -> loss`` (mdpl/engine/losses.py);
      default ``bce_with_logits`` for multi-label, ``cross_entropy`` otherwise.
    * ``metrics``: metric kinds of ``mdpl.engine.metrics.METRIC_KINDS`` ('f1', 'accuracy', 'AUROC') or
      callables ``(num_classes) -> Metric`` (logged under their ``__name__`` when the metric returns a
      tensor); default ``('f1',)`` for multi-label, ``('accuracy',)`` otherwise.
    * ``primary_metric``: the computed value used as ``the_metric`` (checkpoint selection, sweeps);
      default ``F1_Macro`` for multi-label, ``accuracy`` otherwise.
    * ``schema``: the arrow schema (``pyarrow.Schema`` or ``"module:attr"``) files are checked against;
      None skips the column check.
    * ``writer``: ``make_arrow(root, out, **options)`` for the raw layout (``"module:attr"`` or callable);
      None: no raw layout, arrow files are written by other means.
    * ``writer_options``: the dataset's own ``make_arrow`` keyword options (besides the common ones).
    * ``synthetic``: ``write(root, counts, rng, image_size, layout)`` writing a tiny raw dataset
      (mdpl/data/synthetic.py); ``synthetic_layouts``: its layouts, the first the default.
    * ``max_text_len``, ``max_epoch``, ``val_check_interval``: the values of the dataset's ``task_finetune_<name>``
      config (None: no default); the experiment matrix's cost estimate reads the last two.
    * ``metric_label``: how tables and plots name the primary metric (default: ``primary_metric``).
    * ``nominal_sizes``: (train, val, test) items of the full dataset, for cost estimates without its arrow files.
    * ``bench_text_fill``: ``{"full": (min, max), "small": (min, max)}`` real text tokens per sample of the
      benchmark's synthetic batches; ``bench_patch_grids``: the same keys -> image sizes in patches (rows, cols)
      cycled over a ViLT batch (the dataset's typical aspects); ``bench_small_text_len``: max_text_len under
      ``--small``. None: the benchmark does not run on the dataset.
    * ``title``: how reports name the dataset (default: ``name``).
    * ``demo``: the dataset the embedded demo (``python run.py with demo``) writes synthetically and runs on; the
      first registered spec with it set is taken.
    """

    name: str
    num_classes: int
    multi_label: bool = False
    class_names: tuple[str, ...] | None = None
    arrow_splits: Mapping[str, str] | None = None
    text_column: str = "text"
    text_items: str = "per_text"
    loss: str | Callable[..., Any] | None = None
    metrics: tuple[str | Callable[[int], Any], ...] | None = None
    primary_metric: str | None = None
    schema: Any = None
    writer: str | Callable[..., Any] | None = None
    writer_options: tuple[str, ...] = ()
    synthetic: str | Callable[..., Any] | None = None
    synthetic_layouts: tuple[str, ...] = ()
    max_text_len: int | None = None
    max_epoch: int | None = None
    val_check_interval: float | None = None
    metric_label: str | None = None
    nominal_sizes: tuple[int, int, int] | None = None
    bench_text_fill: Mapping[str, tuple[int, int]] | None = None
    bench_patch_grids: Mapping[str, tuple[tuple[int, int], ...]] | None = None
    bench_small_text_len: int | None = None
    demo: bool = False
    title: str | None = None

    def logged_metrics(self) -> list[str]:
        """The values the spec's metrics log (what ``primary_metric`` may name): kind 'f1' logs ``F1_NAMES``, the
        others their kind (a factory: its name)."""
        names: list[str] = []
        for kind in self.metrics:
            key = kind if isinstance(kind, str) else kind.__name__
            names.extend(F1_NAMES if key == "f1" else [key])
        return names

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"DatasetSpec.name must be a non-empty string, got {self.name!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"DatasetSpec {self.name!r}: num_classes must be >= 1, got {self.num_classes!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"DatasetSpec {self.name!r}: {len(self.class_names)} class_names for "
                             f"{self.num_classes} classes")
        if self.text_items not in TEXT_ITEMS:
            raise ValueError(f"DatasetSpec {self.name!r}: text_items must be one of {TEXT_ITEMS}")
        if isinstance(self.loss, str) and self.loss not in LOSS_KINDS:
            raise ValueError(f"DatasetSpec {self.name!r}: loss must be one of {LOSS_KINDS} or a callable")
        splits = dict(self.arrow_splits or {s: f"{self.name}_{s}" for s in SPLITS})
        if set(splits) != set(SPLITS):
            raise ValueError(f"DatasetSpec {self.name!r}: arrow_splits must map exactly {SPLITS}")
        self._set(arrow_splits={s: splits[s] for s in SPLITS},
                  loss=self.loss or ("bce_with_logits" if self.multi_label else "cross_entropy"),
                  metrics=tuple(self.metrics or (("f1",) if self.multi_label else ("accuracy",))),
                  primary_metric=self.primary_metric or ("F1_Macro" if self.multi_label else "accuracy"))
        self._set(metric_label=self.metric_label or self.primary_metric, title=self.title or self.name)
        if self.class_names is not None:
            self._set(class_names=tuple(self.class_names))

    def _set(self, **values: Any) -> None:
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __hash__(self) -> int:
        return hash(self.name)

    def arrow_stem(self, split: str) -> str:
        """The arrow file stem of ``split`` (train, val or test)."""
        if split not in self.arrow_splits:
            raise ValueError(f"unknown split {split!r} (expected train, val or test)")
        return self.arrow_splits[split]

    def arrow_file_names(self) -> list[str]:
        """``<stem>.arrow`` of every split, in train/val/test order."""
        return [f"{stem}.arrow" for stem in self.arrow_splits.values()]

    def per_text_items(self, mmimdb_items: str = "plot") -> bool:
        """True: one item per text; False: one item (the first text) per row (docs/methods.md §1.3)."""
        return self.text_items == "per_text" or mmimdb_items == "plot"

    def arrow_schema(self) -> Any:
        """The ``pyarrow.Schema`` the arrow files must have, or None (no column check)."""
        return resolve(self.schema)

    def make_arrow_fn(self) -> Callable[..., Any] | None:
        """The raw-layout writer ``make_arrow(root, out, **options)``, or None."""
        return resolve(self.writer)

    def synthetic_fn(self) -> Callable[..., Any] | None:
        """The synthetic raw-layout generator, or None."""
        return resolve(self.synthetic)


def resolve(ref: Any) -> Any:
    """A ``"package.module:attribute"`` string -> the attribute (imported now); anything else unchanged."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under ``spec.name`` and return it; registering an equal spec again is a no-op.

    A second, different spec under a name already registered raises ValueError (unregister it first).
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    old = _REGISTRY.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"dataset {spec.name!r} is already registered with another spec; "
                         "unregister_dataset it first")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> DatasetSpec | None:
    """Remove ``name`` from the registry and return its spec (None if absent). For tests and plugins."""
    return _REGISTRY.pop(name, None)


@contextmanager
def registered(spec: DatasetSpec) -> Iterator[DatasetSpec]:
    """Register ``spec`` for the ``with`` block only (for tests and plugins), as :func:`register_dataset`
    (an equal spec already registered stays registered afterwards)."""
    added = spec.name not in _REGISTRY
    register_dataset(spec)
    try:
        yield spec
    finally:
        if added:
            unregister_dataset(spec.name)


def _load_plugins() -> None:
    """The datasets of installed plugins (entry-point group ``mdpl.datasets``, mdpl.plugins); the built-ins are
    registered when this module is imported."""
    from mdpl.plugins import load_entry_points
    load_entry_points("datasets")


def available_datasets() -> list[str]:
    """Names of the registered datasets, built-ins first, in registration order."""
    _load_plugins()
    return list(_REGISTRY)


def is_registered(name: Any) -> bool:
    """True when ``name`` is a registered dataset name."""
    _load_plugins()
    return isinstance(name, str) and name in _REGISTRY


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name``; UserInputError (one line, naming the choices) if none."""
    _load_plugins()
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UserInputError(f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())} "
                             "(or register it with mdpl.data.registry.register_dataset)")
    return spec


def demo_dataset() -> str:
    """The dataset of the embedded demo: the first registered spec with ``demo`` set."""
    names = [name for name in available_datasets() if _REGISTRY[name].demo]
    if not names:
        raise UserInputError("no registered dataset is marked for the demo (DatasetSpec.demo)")
    return names[0]


# ------------------------------------------------------------------------------------------ built-ins
#: docs/methods.md §1.1: fixed genre order of the MM-IMDb multi-hot label (index = position).
MMIMDB_GENRES = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)

MMIMDB = register_dataset(DatasetSpec(
    name="mmimdb", title="MM-IMDb", num_classes=23, multi_label=True, class_names=MMIMDB_GENRES,
    arrow_splits={"train": "mmimdb_train", "val": "mmimdb_dev", "test": "mmimdb_test"},
    text_column="plots", text_items="selectable",
    loss="bce_with_logits", metrics=("f1",), primary_metric="F1_Macro",
    schema="mdpl.data.writers.mmimdb:SCHEMA", writer="mdpl.data.writers.mmimdb:make_arrow",
    synthetic="mdpl.data.synthetic:_write_mmimdb", synthetic_layouts=("split", "archive"),
    max_text_len=1024, max_epoch=20, val_check_interval=0.2, metric_label="F1-Macro",
    nominal_sizes=(15552, 2608, 7799),   # movies; per-plot items are more
    bench_text_fill={"full": (60, 700), "small": (8, 48)}, bench_small_text_len=48,
    bench_patch_grids={"full": ((18, 12), (17, 12), (18, 12), (16, 12)), "small": ((6, 4), (5, 4))},   # posters
))
FOOD101 = register_dataset(DatasetSpec(
    name="food101", title="Food-101", num_classes=101,
    arrow_splits={"train": "food101_train", "val": "food101_val", "test": "food101_test"},
    loss="cross_entropy", metrics=("accuracy",), primary_metric="accuracy",
    schema="mdpl.data.writers.food101:SCHEMA", writer="mdpl.data.writers.food101:make_arrow",
    writer_options=("val_fraction", "seed"),
    synthetic="mdpl.data.synthetic:_write_food101", synthetic_layouts=("both", "json", "csv"),
    max_text_len=512, max_epoch=20, val_check_interval=0.2, nominal_sizes=(61142, 6846, 22716),
    bench_text_fill={"full": (80, 512), "small": (6, 32)}, bench_small_text_len=32,
    bench_patch_grids={"full": ((12, 16), (12, 12), (12, 16), (12, 15)), "small": ((4, 5), (4, 4))},   # photos
    demo=True,
))
HATEMEMES = register_dataset(DatasetSpec(
    name="hatememes", title="Hateful Memes", num_classes=2, class_names=("not hateful", "hateful"),
    arrow_splits={"train": "hatememes_train", "val": "hatememes_dev", "test": "hatememes_test"},
    loss="cross_entropy", metrics=("AUROC", "accuracy"), primary_metric="AUROC",
    schema="mdpl.data.writers.hatememes:SCHEMA", writer="mdpl.data.writers.hatememes:make_arrow",
    writer_options=("train_file", "dev_file", "test_file"),
    synthetic="mdpl.data.synthetic:_write_hatememes", synthetic_layouts=("data", "flat"),
    max_text_len=128, max_epoch=20, val_check_interval=0.11, nominal_sizes=(8500, 500, 1000),
    bench_text_fill={"full": (8, 48), "small": (3, 12)}, bench_small_text_len=16,
    bench_patch_grids={"full": ((12, 12), (12, 16), (15, 12), (12, 14)), "small": ((4, 4), (4, 5), (5, 4))},
))
BUILTIN_DATASETS = ("mmimdb", "food101", "hatememes")
