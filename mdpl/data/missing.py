"""Deterministic missing-modality tables, per-epoch simulation and device-side dummies (docs/methods.md §1.4).

Differences from the references (docs/methods.md §10.2, D-11..D-15), all deliberate:

* Each split's table depends only on ``(seed, dataset, split, type, ratio, both_ratio)``: the rows are
  drawn with a private ``torch.Generator`` seeded from a SHA-256 of those values, so no global RNG is
  consumed and the construction order / cache state of other splits is irrelevant (D-12).
* Exact counts: ``n_missing = round(N * ratio)`` rows are missing (Python ``round``, half to even);
  for ``'both'``, ``round(n_missing * both_ratio)`` of them miss the image (2), the rest the text (1).
  The references used ``floor`` and the global ``random.sample``; reference tables can be imported
  with :func:`import_reference_table` for exact parity.
* Cached files carry every parameter in a readable name and in their payload, plus a SHA-256 of the
  table; they are written atomically. A table is generated (and saved) only when its file is absent: a
  file that cannot be read, or whose metadata, values, counts or hash do not match, is a
  :class:`~mdpl.errors.UserInputError` naming the file (delete it to regenerate, or fix the config), never
  silently reused nor replaced (D-11, D-13). Files written before the hash existed (no ``sha256`` key)
  are accepted when every other check passes.
* ``simulate_missing`` (train only) is applied on device after the batch transfer, with a stateless
  per-item hash of ``(seed, epoch, item_index)`` (:func:`simulated_types`): deterministic, independent
  of workers, batch composition and global RNGs (D-15 keeps the semantics: complete rows get a type
  drawn uniformly from {0, 1, 2}, redrawn every epoch).
* Evaluation overrides ``test_ratio`` / ``test_type`` are applied to copies (D-14).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mdpl.data.constants import MISSING_COMPLETE, MISSING_IMAGE, MISSING_TEXT
from mdpl.errors import UserInputError

from mdpl.data.settings import MissingConfig

MISSING_TYPES = ("text", "image", "both")
SPLITS = ("train", "val", "test")
#: Bump when the generation algorithm changes: older cached files are then refused (delete them to regenerate).
TABLE_VERSION = 1
#: The valid per-row type codes: complete, text missing, image missing.
TYPE_CODES = (MISSING_COMPLETE, MISSING_TEXT, MISSING_IMAGE)
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class MissingSpec:
    """One missing-modality setting (docs/methods.md §1.4): ``type`` in text|image|both, ``ratio`` of missing rows."""

    type: str
    ratio: float
    both_ratio: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.type not in MISSING_TYPES:
            raise ValueError(f"missing type must be one of {MISSING_TYPES}, got {self.type!r}")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"missing ratio must be in [0, 1], got {self.ratio}")
        if not 0.0 <= float(self.both_ratio) <= 1.0:
            raise ValueError(f"both_ratio must be in [0, 1], got {self.both_ratio}")

    def to_dict(self) -> dict:
        return {"type": self.type, "ratio": float(self.ratio), "both_ratio": float(self.both_ratio),
                "seed": int(self.seed)}

    def file_tag(self) -> str:
        """Readable, unambiguous file-name part, e.g. ``both_r0.70_b0.50_s0``."""
        return f"{self.type}_r{_fmt(self.ratio)}_b{_fmt(self.both_ratio)}_s{int(self.seed)}"


def _fmt(x: float) -> str:
    """Two decimals when exact (0.7 -> '0.70'), else the full repr (0.725 -> '0.725')."""
    x = float(x)
    return f"{x:.2f}" if round(x, 2) == x else repr(x)


# ----------------------------------------------------------------------------------------- generation
def _stable_seed(*parts: object) -> int:
    """63-bit seed from a SHA-256 of the parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("|".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def missing_counts(n_rows: int, spec: MissingSpec) -> tuple[int, int]:
    """``(n_text_missing, n_image_missing)`` of a table of ``n_rows`` rows (docs/methods.md §1.4, exact counts)."""
    n_missing = round(n_rows * float(spec.ratio))
    if spec.type == "text":
        return n_missing, 0
    if spec.type == "image":
        return 0, n_missing
    n_image = round(n_missing * float(spec.both_ratio))
    return n_missing - n_image, n_image


def make_missing_table(n_rows: int, spec: MissingSpec, dataset: str, split: str) -> torch.Tensor:
    """Per-row missing types (LongTensor[n_rows], 0/1/2) drawn with a private generator (docs/methods.md §1.4).

    Depends only on ``(spec.seed, dataset, split, spec.type, spec.ratio, spec.both_ratio)``.
    """
    table = torch.zeros(n_rows, dtype=torch.long)
    n_text, n_image = missing_counts(n_rows, spec)
    if n_text + n_image == 0:
        return table
    gen = torch.Generator().manual_seed(_stable_seed(int(spec.seed), dataset, split, spec.type,
                                                     float(spec.ratio), float(spec.both_ratio)))
    rows = torch.randperm(n_rows, generator=gen)
    table[rows[:n_image]] = MISSING_IMAGE
    table[rows[n_image:n_image + n_text]] = MISSING_TEXT
    return table


# ---------------------------------------------------------------------------------------------- cache
def missing_table_path(root: str | os.PathLike, stem: str, spec: MissingSpec) -> Path:
    """``<root>/<stem>_missing_<type>_r<ratio>_b<both_ratio>_s<seed>.pt``."""
    return Path(root) / f"{stem}_missing_{spec.file_tag()}.pt"


def reference_table_name(stem: str, missing_type: str, ratio: float) -> str:
    """File name the reference repos use (docs/methods.md §1.4 step 3): ``str(ratio)`` without the dot."""
    return f"{stem}_missing_{missing_type}_{str(ratio).replace('.', '')}.pt"


def table_sha256(table: torch.Tensor) -> str:
    """SHA-256 of a table's values as little-endian int64 (independent of the stored dtype)."""
    values = table.detach().to(torch.int64).contiguous().cpu().numpy().astype("<i8")
    return hashlib.sha256(values.tobytes()).hexdigest()


def _metadata_problem(payload: dict, n_rows: int, spec: MissingSpec, dataset: str, split: str) -> str:
    """Why the payload's metadata does not describe this table request ('' if it does)."""
    if payload.get("version") != TABLE_VERSION:
        return f"it was written by another mdpl version (format {payload.get('version')}, expected {TABLE_VERSION})"
    if payload.get("n_rows") != n_rows:
        return f"it is for {payload.get('n_rows')} rows but the arrow split has {n_rows} (arrow file rebuilt?)"
    if payload.get("spec") != spec.to_dict():
        return f"it holds spec {payload.get('spec')} but the config asks for {spec.to_dict()}"
    if (payload.get("dataset"), payload.get("split")) != (dataset, split):
        return f"it is for {payload.get('dataset')}/{payload.get('split')}, not {dataset}/{split}"
    return ""


def _content_problem(table: object, payload: dict, n_rows: int, spec: MissingSpec) -> str:
    """Why the stored table does not match its own metadata ('' if it does)."""
    if not isinstance(table, torch.Tensor) or table.dim() != 1 or len(table) != n_rows:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        return f"its table has shape {shape}, expected ({n_rows},)"
    valid = torch.isin(table, torch.tensor(TYPE_CODES, dtype=table.dtype))
    if not bool(valid.all()):
        bad = table[~valid].unique()[:5].tolist()
        return f"it holds values {bad} outside the type codes 0 (complete), 1 (text missing), 2 (image missing)"
    counts = (int((table == MISSING_TEXT).sum()), int((table == MISSING_IMAGE).sum()))
    if counts != missing_counts(n_rows, spec):
        want = missing_counts(n_rows, spec)
        return (f"it has {counts[0]} text-missing and {counts[1]} image-missing rows, but type {spec.type!r} "
                f"ratio {spec.ratio} both_ratio {spec.both_ratio} of {n_rows} rows means {want[0]} and {want[1]}")
    if "sha256" in payload and payload["sha256"] != table_sha256(table):
        return "its content hash differs from the stored one (the table was modified)"
    return ""


def _payload_problem(payload: object, n_rows: int, spec: MissingSpec, dataset: str, split: str) -> str:
    """Why a cached payload cannot be used ('' if it can): metadata first, then the table's content."""
    if not isinstance(payload, dict) or "table" not in payload:
        return "it is not an mdpl missing-table file"
    return (_metadata_problem(payload, n_rows, spec, dataset, split)
            or _content_problem(payload["table"], payload, n_rows, spec))


def _read_cached(path: Path, n_rows: int, spec: MissingSpec, dataset: str, split: str) -> torch.Tensor:
    """The checked table of an existing cache file; any problem is a UserInputError naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / not a torch file / unreadable
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    else:
        problem = _payload_problem(payload, n_rows, spec, dataset, split)
    if problem:
        raise UserInputError(
            f"missing table {path}: {problem}; delete the file to regenerate it from the config, or fix the config "
            "(missing_ratio, missing_type, both_ratio, seed, missing_table_root) if that table is the one to use")
    return payload["table"].long()


def _is_writer_rank() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def _atomic_save(obj: object, path: Path) -> None:
    """torch.save to a unique temp file in the same folder, then ``os.replace`` (race-free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_create_missing_table(root: str | os.PathLike, stem: str, n_rows: int, spec: MissingSpec,
                                 dataset: str, split: str) -> torch.Tensor:
    """Cached :func:`make_missing_table` (docs/methods.md §1.4; D-11..D-13).

    Ratio 0 -> all zeros, nothing written. An existing file is used only if its version, n_rows, spec,
    dataset and split match the request and its table matches that metadata (type codes, counts, hash);
    otherwise UserInputError (see the module doc): a table is generated only when its file is absent.
    Generation is deterministic, so every DDP rank computes the table in memory; only LOCAL_RANK 0
    writes, atomically.
    """
    if float(spec.ratio) == 0.0:
        return torch.zeros(n_rows, dtype=torch.long)
    path = missing_table_path(root, stem, spec)
    if path.exists():
        return _read_cached(path, n_rows, spec, dataset, split)
    table = make_missing_table(n_rows, spec, dataset, split)
    if _is_writer_rank():
        try:
            _atomic_save({"table": table, "n_rows": n_rows, "spec": spec.to_dict(), "dataset": dataset,
                          "split": split, "version": TABLE_VERSION, "sha256": table_sha256(table)}, path)
        except OSError as err:
            print(f"[mdpl] could not write missing table {path} ({err}); using it in memory only")
    return table


def import_reference_table(path: str | os.PathLike) -> torch.Tensor:
    """Read a reference-repo table (a float tensor of 0/1/2 saved with torch.save) as a LongTensor."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference missing table not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    table = obj["table"] if isinstance(obj, dict) else obj
    if not isinstance(table, torch.Tensor) or table.dim() != 1:
        raise ValueError(f"{path}: expected a 1-D tensor of missing types, got {type(table).__name__}")
    out = table.round().long()
    if not torch.equal(out.to(table.dtype), table) or not bool(((out >= 0) & (out <= 2)).all()):
        raise ValueError(f"{path}: values must be 0, 1 or 2")
    return out


# ----------------------------------------------------------------------------------- config handling
def missing_specs(missing: MissingConfig, seed: int) -> dict[str, MissingSpec]:
    """Per-split specs from the run config, with ``test_ratio`` / ``test_type`` overriding val and test.

    Works on copies (D-14): the config is never mutated; overrides are printed.
    """
    ratios, types = dict(missing.missing_ratio), dict(missing.missing_type)
    if missing.test_ratio is not None:
        print(f"[mdpl] test_ratio={missing.test_ratio} overrides missing_ratio val/test {ratios}")
        ratios["val"] = ratios["test"] = float(missing.test_ratio)
    if missing.test_type is not None:
        print(f"[mdpl] test_type={missing.test_type} overrides missing_type val/test {types}")
        types["val"] = types["test"] = missing.test_type
    return {s: MissingSpec(types[s], float(ratios[s]), float(missing.both_ratio), int(seed))
            for s in SPLITS}


# ------------------------------------------------------------------------------------------ simulation
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer hash on int64 tensors holding values in [0, 2^32) (products stay < 2^59)."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def simulated_types(table_types: torch.Tensor, epoch: int, seed: int, item_index: torch.Tensor) -> torch.Tensor:
    """``simulate_missing`` (docs/methods.md §1.4, D-15): complete items get a type uniform in {0, 1, 2}.

    Stateless hash of ``(seed, epoch, item_index)``: the same item gets the same type within an epoch,
    independently of workers, batch composition, device and every global RNG; redrawn each epoch.
    Rows missing in the table keep their type.
    """
    key = _stable_seed("simulate_missing", int(seed), int(epoch))
    k1, k2 = key & _MASK32, (key >> 32) & _MASK32
    h = _mix32((item_index.long() & _MASK32) ^ k1)
    h = _mix32(h ^ k2)
    draws = h % 3
    table_types = table_types.long()
    return torch.where(table_types == MISSING_COMPLETE, draws, table_types)


# ---------------------------------------------------------------------------------------------- dummies
def apply_missing(batch: Mapping, missing_type: torch.Tensor, dummy_text_ids: torch.Tensor,
                  dummy_text_masks: torch.Tensor, missing_type_host: Sequence[int] | None = None) -> dict:
    """Replace missing modalities by the dummies of docs/methods.md §1.4 (new dict; inputs not mutated).

    type 2 -> ``image`` := 1.0 inside each sample's valid ``image_sizes`` region (padding stays 0);
    type 1 -> ``text_ids`` / ``text_masks`` := the encoding of "" (``dummy_*``, shape [1, L] or [L]).
    Pure tensor ops on the batch's device; sets ``missing_type`` (int64) and ``missing_type_host``, the same types
    as a tuple of ints (`missing_type_host`, or read from `missing_type` when it is on the CPU; otherwise the key is
    removed, so a host copy never outlives the types it describes). With it the model knows which rows keep a
    modality without a device sync.
    """
    out = dict(batch)
    image = batch["image"]
    device = image.device
    if missing_type_host is None and missing_type.device.type == "cpu":
        missing_type_host = missing_type.tolist()
    out.pop("missing_type_host", None)
    if missing_type_host is not None:
        out["missing_type_host"] = tuple(int(t) for t in missing_type_host)
        if len(out["missing_type_host"]) != missing_type.shape[0]:
            raise ValueError(f"missing_type_host has {len(out['missing_type_host'])} types for a batch of "
                             f"{missing_type.shape[0]}")
    mt = missing_type.to(device=device, dtype=torch.long)
    b, _, h, w = image.shape
    if "image_sizes" in batch:
        sizes = batch["image_sizes"].to(device)
        rows = torch.arange(h, device=device)[None, :] < sizes[:, 0:1]          # [B, H]
        cols = torch.arange(w, device=device)[None, :] < sizes[:, 1:2]          # [B, W]
        valid = rows[:, :, None] & cols[:, None, :]                             # [B, H, W]
    else:
        valid = torch.ones(b, h, w, dtype=torch.bool, device=device)
    img_missing = (mt == MISSING_IMAGE)[:, None, None] & valid
    out["image"] = torch.where(img_missing[:, None], torch.ones((), dtype=image.dtype, device=device), image)

    ids, masks = batch["text_ids"], batch["text_masks"]
    d_ids, d_masks = dummy_text_ids.reshape(1, -1), dummy_text_masks.reshape(1, -1)
    if d_ids.shape[1] > ids.shape[1] >= 2:  # dynamic text padding: the dummy ([CLS][SEP] + padding) is cut too
        d_ids, d_masks = d_ids[:, :ids.shape[1]], d_masks[:, :ids.shape[1]]
    d_ids = d_ids.to(device=ids.device, dtype=ids.dtype)
    d_masks = d_masks.to(device=masks.device, dtype=masks.dtype)
    if d_ids.shape[1] != ids.shape[1] or d_masks.shape[1] != masks.shape[1]:
        raise ValueError(f"dummy text length {d_ids.shape[1]} != batch text length {ids.shape[1]}")
    txt_missing = (mt == MISSING_TEXT).to(ids.device)[:, None]
    out["text_ids"] = torch.where(txt_missing, d_ids, ids)
    out["text_masks"] = torch.where(txt_missing, d_masks, masks)
    out["missing_type"] = mt
    return out
