"""The experiment matrix of the paper reproductions: tables of cells, and the ``run.py`` commands of a cell.

A table is a list of cells. A cell is one training run (dataset, method, backbone, training missing setting and
ablation keys) whose final test is the one-pass evaluation sweep over the cell's test scenarios. Every run is
``python run.py with <task> <method preset> [on_<backbone>] [tiny] key=value ...``; nothing here names a method,
backbone or dataset: presets, paper backbones, learning rates and weight files come from the method, backbone and
dataset cards, and the tables from the methods' ``paper_tables`` (``mdpl/experiments/papers/``) and the method
registry (``mdpl/experiments/protocol.py``).

Runs are shared between tables: a training run is identified by its experiment settings (named configs + keys;
:func:`run_key`) and sweeps the union of the test scenarios of every cell that uses it (:func:`scenario_union`).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mdpl.backbones.registry import backbone_card
from mdpl.data.missing import MISSING_TYPES
from mdpl.data.registry import BUILTIN_DATASETS, resolve
from mdpl.backbones.registry import method_backbone
from mdpl.prompts.keys import method_presets
from mdpl.prompts.registry import available_methods, method_class

ALL_METHODS_TABLE = "mdpl.experiments.protocol:all_methods_table"
FIG_RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
"""Missing rates of the robustness figures (x axis)."""
RESOURCE_KEYS = frozenset({"per_gpu_batchsize", "num_gpus", "num_nodes", "num_workers", "num_cpu_processes",
                           "checkpoint_every_n_steps", "logger", "missing_table_root", "pixel_cache"})
"""--set keys that change how a run uses the machine, not what it computes: not part of a run's identity
(pixel_cache: an exact loader cache, the model gets the same tensors); so are the weight checksums
(``<backbone>_sha256``: a check of the weight file), see :func:`is_resource_key`."""


@dataclass(frozen=True)
class WeightsFile:
    """A cell key's value naming a file of the weights folder (``--weights``): a run's identity holds the name only,
    its command the path."""

    name: str

    def path(self, ctx: "Context") -> Path:
        return Path(ctx.weights or "WEIGHTS") / self.name


def is_resource_key(key: str) -> bool:
    """Whether --set `key` leaves a run's identity unchanged (:data:`RESOURCE_KEYS`, weight checksums)."""
    return key in RESOURCE_KEYS or key.endswith("_sha256")


@dataclass(frozen=True)
class Cell:
    """One training run + its evaluation scenarios."""
    label: str                                   # variant, as the table shows it
    dataset: str
    method: str                                  # prompt_method
    train: tuple[str, float]                     # training (and validation) missing type and ratio
    test_types: tuple[str, ...]
    test_ratios: tuple[float, ...]
    backbone: str = ""                           # "" = the method's paper backbone
    keys: tuple[tuple[str, object], ...] = ()    # ablation keys (run.py key=value)
    tiny_keys: tuple[tuple[str, object], ...] = ()   # --tiny only: what the cell needs on the 2-layer models
    paper: str = ""                              # id in paper_results.csv ("" = the paper gives no number)
    needs: str = ""                              # non-empty: not yet expressible, needs this switch
    note: str = ""
    x: float | None = None                       # value of the swept key (sweep tables)

    @property
    def net(self) -> str:
        return self.backbone or method_backbone(self.method)

    @property
    def tag(self) -> str:
        """The method, with '@backbone' when it is not the method's paper backbone."""
        return self.method + ("" if self.net == method_backbone(self.method) else f"@{self.net}")

    @property
    def id(self) -> str:
        parts = [self.dataset, self.tag, f"train={self.train[0]}{self.train[1]:g}"]
        parts += [f"{k}={fmt(v)}" for k, v in self.keys if k not in ("missing_ratio.val", "learning_rate")]
        if self.needs:   # no key expresses the variant yet: the label tells the cells apart
            parts.append(re.sub(r"[^A-Za-z0-9.=]+", "_", self.label).strip("_"))
        return "/".join(parts)

    @property
    def scenarios(self) -> list[tuple[str, float]]:
        return [(t, r) for t in self.test_types for r in self.test_ratios]


@dataclass
class Table:
    name: str
    title: str
    kind: str                 # 'table' (one number per cell and scenario), 'figure' (curves), 'sweep' (a key's values)
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    sweep_key: str = ""       # kind 'sweep': the key on the x axis

    @property
    def runnable(self) -> list[Cell]:
        return [c for c in self.cells if not c.needs]


def make_cell(label, dataset, method, train, tests=None, **kw) -> Cell:
    """A cell tested at its training setting unless `tests` = (types, ratios); the learning rate of the method's
    reference on the dataset when it differs from the method's default (``paper_learning_rates``)."""
    types, ratios = tests if tests is not None else ((train[0],), (train[1],))
    keys = tuple(kw.pop("keys", ()))
    lr = method_class(method).paper_learning_rates.get(dataset)
    if lr is not None and not any(k == "learning_rate" for k, _ in keys):
        keys += (("learning_rate", lr),)
    return Cell(label, dataset, method, train, tuple(types), tuple(float(r) for r in ratios), keys=keys, **kw)


def scenario_cells(variants: Sequence[tuple[str, str, Mapping | Callable[[str, str], Mapping]]],
                   ratio: float = 0.7) -> list[Cell]:
    """The cells of a paper's main table: every ``(label, method, keywords)`` variant on each of the papers' three
    datasets x missing text / image / both at ``ratio``, trained and tested at that setting, in dataset, type, variant
    order. ``keywords``: ``make_cell``'s, or a function ``(dataset, missing type) -> keywords``."""
    return [make_cell(label, ds, method, (t, ratio), **(kw(ds, t) if callable(kw) else kw))
            for ds in BUILTIN_DATASETS for t in MISSING_TYPES for label, method, kw in variants]


@functools.cache
def tables() -> dict[str, Table]:
    """Every registered method's paper tables (``paper_tables`` of its class), by name; methods by name; then the
    table of every registered method under one protocol, resolved by name as the paper tables are (its module builds
    on this one)."""
    out: dict[str, Table] = {}
    for method in sorted(available_methods()):
        ref = method_class(method).paper_tables
        out.update({t.name: t for t in (resolve(ref)() if ref else [])})
    table = resolve(ALL_METHODS_TABLE)()
    out[table.name] = table
    return out


@dataclass
class Context:
    out: Path
    data_root: str = ""
    weights: str = ""
    tokenizer: str = ""
    tiny: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    sets: tuple[tuple[str, str], ...] = ()

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def tiny_data(self) -> Path:
        return self.out / "tiny_data"


def fmt(value) -> str:
    """A value as run.py's Sacred CLI reads it back (lists without spaces, floats in shortest form)."""
    if isinstance(value, WeightsFile):
        return f"WEIGHTS/{value.name}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)


def named_configs(cell: Cell, tiny: bool) -> list[str]:
    named = [f"task_finetune_{cell.dataset}", method_presets()[cell.method]]
    if cell.net != method_backbone(cell.method):
        named.append(f"on_{cell.net}")
    return named + (["tiny"] if tiny else [])   # `tiny` goes after the task config


def experiment_keys(cell: Cell, ctx: Context) -> list[tuple[str, object]]:
    """The keys that define what the run computes (its identity), in command order."""
    t, r = cell.train
    keys: dict[str, object] = {}
    for split in ("train", "val", "test"):
        keys[f"missing_type.{split}"] = t
    for split in ("train", "val", "test"):
        keys[f"missing_ratio.{split}"] = float(r)
    keys.update(cell.keys)
    if ctx.tiny:
        keys.update(cell.tiny_keys)
    keys.update(ctx.sets)
    return list(keys.items())


def run_key(cell: Cell, ctx: Context) -> str:
    """Folder name of the run: readable settings + a hash of everything that defines the run (seed excluded)."""
    identity = named_configs(cell, ctx.tiny) + [f"{k}={fmt(v)}" for k, v in experiment_keys(cell, ctx)
                                                if not is_resource_key(k)]
    digest = hashlib.sha1("\n".join(identity).encode()).hexdigest()[:8]
    extra = "-".join(f"{k}={fmt(v)}" for k, v in cell.keys if k != "learning_rate")
    slug = "-".join(p for p in (cell.dataset, cell.tag, f"{cell.train[0]}{cell.train[1]:g}", extra) if p)
    slug = re.sub(r"[^A-Za-z0-9._@=-]+", "_", slug)[:90]
    return f"{slug}-{digest}"


def path_keys(cell: Cell, ctx: Context) -> list[tuple[str, object]]:
    """data_root and the pre-trained weights (real data) or the synthetic data (--tiny)."""
    entry = backbone_card(cell.net)
    if ctx.tiny:
        keys: list[tuple[str, object]] = [("data_root", ctx.tiny_data / cell.dataset / "arrow")]
        if entry.tokenizer_dir:
            keys += [("tokenizer", ctx.tiny_data / "tok"), ("vocab_size", tiny_vocab_size())]
        return keys
    data = Path(ctx.data_root or "DATA_ROOT")
    weights = Path(ctx.weights or "WEIGHTS")
    keys = [("data_root", data / cell.dataset), (entry.weights_key, weights / entry.weights_file)]
    if entry.tokenizer_dir:
        keys.append(("tokenizer", ctx.tokenizer or weights / entry.tokenizer_dir))
    return keys


def tiny_vocab_size() -> int:
    """Size of the synthetic WordPiece vocabulary (special tokens + the synthetic words)."""
    from mdpl.data.synthetic import SPECIAL_TOKENS, SYNTHETIC_WORDS
    return len(SPECIAL_TOKENS) + len(SYNTHETIC_WORDS)


def scenario_union(ctx: Context) -> dict[str, tuple[list[str], list[float]]]:
    """run key -> (test types, test ratios) swept by its run: the union over every runnable cell of every table."""
    union: dict[str, tuple[set, set]] = {}
    for table in tables().values():
        for cell in table.runnable:
            types, ratios = union.setdefault(run_key(cell, ctx), (set(), set()))
            types.update(cell.test_types)
            ratios.update(cell.test_ratios)
    return {k: ([t for t in MISSING_TYPES if t in ts], sorted(rs)) for k, (ts, rs) in union.items()}


def seed_dir(cell: Cell, ctx: Context, seed: int) -> Path:
    return ctx.runs / run_key(cell, ctx) / f"seed{seed}"


def command_keys(cell: Cell, ctx: Context) -> list[tuple[str, object]]:
    """The experiment keys with their weight files resolved in ``--weights``, then the data and weight paths."""
    keys = [(k, v.path(ctx) if isinstance(v, WeightsFile) else v) for k, v in experiment_keys(cell, ctx)]
    return keys + path_keys(cell, ctx)


def train_command(cell: Cell, ctx: Context, seed: int, sweep: tuple[list[str], list[float]],
                  resume: bool = False) -> list[str]:
    keys = command_keys(cell, ctx)
    keys += [("seed", seed), ("log_dir", seed_dir(cell, ctx, seed)), ("test_types", sweep[0]),
             ("test_ratios", sweep[1])]
    if resume:
        keys.append(("resume", True))
    return ["python", "run.py", "with", *named_configs(cell, ctx.tiny), *(f"{k}={fmt(v)}" for k, v in keys)]


def eval_command(cell: Cell, ctx: Context, seed: int, sweep: tuple[list[str], list[float]], checkpoint: str) -> list[str]:
    keys = command_keys(cell, ctx)
    keys = [(k, checkpoint if k == "load_path" else v) for k, v in keys]
    if not any(k == "load_path" for k, _ in keys):
        keys.append(("load_path", checkpoint))
    keys += [("seed", seed), ("test_only", True), ("log_dir", seed_dir(cell, ctx, seed) / "eval"),
             ("test_types", sweep[0]), ("test_ratios", sweep[1])]
    return ["python", "run.py", "with", *named_configs(cell, ctx.tiny), *(f"{k}={fmt(v)}" for k, v in keys)]


def select_cells(table: Table, shard: tuple[int, int] | None) -> list[Cell]:
    """The runnable cells of shard i of n (round robin over the table's runnable cells, 1-based)."""
    cells = table.runnable
    if shard is None:
        return cells
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i - 1]
