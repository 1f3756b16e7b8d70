"""Shared machinery of the raw-dataset -> Arrow writers (docs/methods.md §1.1-1.2, defects D-4/D-5/D-6).

Every writer turns each split into a :class:`SplitPlan` (a list of work items plus a function that
turns one item into a row or raises :class:`SkipSample`; the row names its image as an
:class:`ImageFile`, read later). :func:`write_splits` then

* streams the rows of each split as record batches into a temporary Arrow IPC *file* inside the
  output folder (the split is never held in memory as a whole, D-6),
* verifies every image decodes (PIL open + load) and optionally re-encodes it (``max_side``), in this
  process or, with ``workers > 1``, in a pool of worker processes fed chunks of image paths; the parent
  keeps the row order, so the files (rows, bytes, skipped list) are identical for every worker count,
* skips and counts bad samples, naming the offending file (or raises at the first one if ``strict``),
* refuses a split that yields no row at all (:class:`~mdpl.errors.UserInputError`),
* refuses an output folder that already holds arrow files of the dataset unless ``overwrite=True``,
* renames all temporary files to ``<stem>.arrow`` only once every split succeeded, and removes them on
  any error, so a failed run never leaves a partial arrow file behind. With ``overwrite`` the previous
  files are kept as hidden backups during the renames and restored if one of them fails.

Problems the user fixes (raw layout, output folder, ``--strict`` stops) raise ``UserInputError``.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from mdpl.errors import UserInputError

# Skip reasons (the text shown in the per-split summary line).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
MISSING_LABEL = "missing label file"
MALFORMED_JSON = "malformed label json"
BAD_JSONL = "bad jsonl line"
NON_UTF8 = "non-UTF-8 text"
NO_TEXT = "no text"
UNKNOWN_CLASS = "unknown class"

#: Rows per record batch, and a byte budget that flushes earlier when images are large.
BATCH_ROWS = 256
BATCH_BYTES = 64 * 1024 * 1024
#: Skipped files listed per split in the log (all of them go to ``skipped_log`` when given).
MAX_LISTED = 20
#: Images per task sent to a worker process, and tasks in flight per worker (bounds the memory held).
IMAGE_CHUNK = 32
CHUNKS_PER_WORKER = 2
#: Fewest images per worker process worth its start-up: smaller runs use fewer processes (or none).
MIN_IMAGES_PER_WORKER = 256
#: Upper bound of the default worker count (:func:`default_workers`).
MAX_DEFAULT_WORKERS = 8


class SkipSample(Exception):
    """A bad raw sample: ``reason`` is one of the constants above, ``where`` names the file (and line)."""

    def __init__(self, reason: str, where: str | os.PathLike, detail: str = "") -> None:
        self.reason, self.where, self.detail = reason, str(where), detail
        super().__init__(self.message())

    def message(self) -> str:
        return f"{self.reason}: {self.where}" + (f" ({self.detail})" if self.detail else "")

    def __reduce__(self):  # sent back from worker processes as it is
        return SkipSample, (self.reason, self.where, self.detail)


class StrictModeError(UserInputError):
    """Raised by ``strict=True`` at the first bad sample."""


@dataclass(frozen=True)
class ImageFile:
    """The ``image`` value a row maker returns: the file whose (checked, maybe re-encoded) bytes are stored."""

    path: Path


@dataclass
class SplitPlan:
    """Everything needed to write one split: ``make_row(item)`` returns a row dict or raises SkipSample.

    The row's ``image`` is an :class:`ImageFile` (read by :func:`write_splits`, possibly in a worker
    process, after every other check of the row passed) or already the image bytes.
    """

    split: str
    stem: str
    items: Sequence[Any]
    make_row: Callable[[Any], dict]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class SplitReport:
    """Outcome of one split: rows written and ``(reason, where, detail)`` of every skipped sample."""

    split: str
    path: Path
    written: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0  #: wall time spent on the split's items

    def images_per_s(self) -> float:
        """Items (written + skipped, one image each) processed per second of the split's wall time."""
        return (self.written + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(reason for reason, _, _ in self.skipped))

    def summary_line(self) -> str:
        line = f"{self.split}: written {self.written}, skipped {len(self.skipped)}"
        if self.skipped:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in self.skip_counts().items()) + ")"
        return line


# ---------------------------------------------------------------------------------------- raw files
def read_text_file(path: Path, missing_reason: str = MISSING_LABEL) -> str:
    """Read a UTF-8 text file; missing -> ``missing_reason``, undecodable -> ``NON_UTF8`` (SkipSample)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(missing_reason, path) from None
    except OSError as err:
        raise SkipSample(missing_reason, path, err.strerror or str(err)) from None
    return decode_utf8(raw, path)


def decode_utf8(raw: bytes, where: str | os.PathLike) -> str:
    """Strict UTF-8 decoding (a BOM is dropped); failure -> SkipSample(NON_UTF8)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SkipSample(NON_UTF8, where, f"byte {err.start}") from None


def parse_json(text: str, where: str | os.PathLike, reason: str = MALFORMED_JSON) -> Any:
    """``json.loads`` with a SkipSample naming the file on failure."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SkipSample(reason, where, f"line {err.lineno} col {err.colno}: {err.msg}") from None


def load_json_file(path: Path, what: str) -> Any:
    """Load a dataset-level json file (split.json, class_idx.json, ...); errors are fatal and explicit."""
    if not path.is_file():
        raise UserInputError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{what}: {path} is not valid UTF-8 JSON ({err})") from None
    except OSError as err:
        raise UserInputError(f"{what}: {path} cannot be read ({err.strerror or err})") from None


def load_image_bytes(path: Path, max_side: int | None = None) -> bytes:
    """Return the image file's bytes after checking they decode (PIL open + load), D-6.

    With ``max_side`` the image is re-encoded (JPEG stays JPEG at quality 95, anything else becomes
    PNG) so that its longer side is at most ``max_side``; smaller images keep their original bytes.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(MISSING_IMAGE, path) from None
    except OSError as err:
        raise SkipSample(CORRUPT_IMAGE, path, err.strerror or str(err)) from None
    stream = io.BytesIO(data)
    try:
        with Image.open(stream) as img:
            img.load()
            if max_side is not None and max(img.size) > max_side:
                return _shrink(img, max_side)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        detail = f"{type(err).__name__}: {err}".replace(f" {stream!r}", "")  # no memory address: same every run
        raise SkipSample(CORRUPT_IMAGE, path, detail) from None
    return data


def _shrink(img: Image.Image, max_side: int) -> bytes:
    """Resize so the longer side is ``max_side`` (bicubic) and re-encode in the source format."""
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    fmt = "JPEG" if img.format == "JPEG" else "PNG"
    out = img.resize(size, Image.Resampling.BICUBIC)
    if fmt == "JPEG" and out.mode not in ("RGB", "L", "CMYK"):
        out = out.convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ writing
class _SplitSink:
    """Streams rows of one split into a temporary Arrow IPC file inside ``out_dir``."""

    def __init__(self, out_dir: Path, stem: str, schema: pa.Schema) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".arrow.tmp", dir=out_dir)
        os.close(fd)
        self.tmp = Path(tmp)
        self.schema = schema
        self._writer = pa.ipc.new_file(str(self.tmp), schema)
        self._cols: dict[str, list] = {name: [] for name in schema.names}
        self._bytes = 0

    def add(self, row: dict) -> None:
        for name, col in self._cols.items():
            col.append(row[name])
        self._bytes += len(row.get("image", b""))
        if len(self._cols[self.schema.names[0]]) >= BATCH_ROWS or self._bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._cols[self.schema.names[0]]:
            return
        arrays = [pa.array(self._cols[f.name], type=f.type) for f in self.schema]
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self._cols = {name: [] for name in self.schema.names}
        self._bytes = 0

    def close(self) -> Path:
        self.flush()
        self._writer.close()
        return self.tmp

    def discard(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- image reading
def default_workers() -> int:
    """``make_arrow.py --workers`` default: the CPU cores this process may run on, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is handled by the parent alone (it removes the temp files, stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load_image_chunk(paths: list[Path], max_side: int | None) -> list["bytes | SkipSample"]:
    """Worker task: :func:`load_image_bytes` of each path; a bad image comes back as its SkipSample."""
    out: list[bytes | SkipSample] = []
    for path in paths:
        try:
            out.append(load_image_bytes(path, max_side))
        except SkipSample as bad:
            out.append(bad)
    return out


def _describe(plan: SplitPlan, item: Any) -> "dict | SkipSample":
    try:
        return plan.make_row(item)
    except SkipSample as bad:
        return bad


def _pending_image(row: "dict | SkipSample") -> bool:
    return isinstance(row, dict) and isinstance(row.get("image"), ImageFile)


@dataclass
class ImageReader:
    """Turns a plan's items into finished rows (image bytes in place) or SkipSamples, in item order.

    Without a pool the images are read right after their row is made. With one, the parent makes the
    rows of a chunk of ``IMAGE_CHUNK`` items (labels, texts: cheap), sends the chunk's image paths to a
    worker, keeps ``in_flight`` chunks queued, and yields the results chunk by chunk in submission order.
    """

    max_side: int | None = None
    pool: ProcessPoolExecutor | None = None
    workers: int = 1
    in_flight: int = 1

    def rows(self, plan: SplitPlan) -> Iterator["dict | SkipSample"]:
        if self.pool is None:
            for item in plan.items:
                row = _describe(plan, item)
                if _pending_image(row):
                    try:
                        row["image"] = load_image_bytes(row["image"].path, self.max_side)
                    except SkipSample as bad:
                        row = bad
                yield row
            return
        pending: deque[tuple[list, Future | None]] = deque()
        items = plan.items
        for start in range(0, len(items), IMAGE_CHUNK):
            rows = [_describe(plan, item) for item in items[start:start + IMAGE_CHUNK]]
            paths = [row["image"].path for row in rows if _pending_image(row)]
            pending.append((rows, self.pool.submit(_load_image_chunk, paths, self.max_side) if paths else None))
            if len(pending) > self.in_flight:
                yield from _merge(*pending.popleft())
        while pending:
            yield from _merge(*pending.popleft())


def _merge(rows: list, future: Future | None) -> Iterator["dict | SkipSample"]:
    """The rows of one chunk with the worker's image bytes (or SkipSample) put in, in order."""
    images = iter(future.result() if future is not None else ())
    for row in rows:
        if _pending_image(row):
            image = next(images)
            if isinstance(image, SkipSample):
                yield image
                continue
            row["image"] = image
        yield row


@contextmanager
def image_reader(max_side: int | None, workers: int, n_items: int) -> Iterator[ImageReader]:
    """An :class:`ImageReader` with up to ``workers`` processes, one per ``MIN_IMAGES_PER_WORKER`` images
    (no pool at all when that makes one: small datasets are read in this process).

    Workers are started with ``forkserver`` (``spawn`` where that does not exist), never by forking the
    caller, so like every such pool they import the caller's main module (guard scripts with
    ``if __name__ == "__main__"``). They ignore Ctrl-C; on leaving, queued chunks are cancelled and the
    pool is shut down.
    """
    n = min(workers, n_items // MIN_IMAGES_PER_WORKER)
    if n <= 1:
        yield ImageReader(max_side)
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # workers start with PIL/pyarrow imported, not the caller's script
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_ignore_sigint)
    try:
        yield ImageReader(max_side, pool, n, CHUNKS_PER_WORKER * n)
    except BrokenProcessPool as err:
        raise UserInputError(f"an image worker process died ({err}), e.g. killed for lack of memory; nothing "
                             "was written and earlier files are unchanged; retry with fewer --workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ writing
def _write_one(plan: SplitPlan, out_dir: Path, schema: pa.Schema, dataset: str, strict: bool,
               progress: bool, reader: ImageReader) -> tuple[SplitReport, Path]:
    meta = {"mdpl.dataset": dataset, "mdpl.split": plan.split, **plan.metadata}
    sink = _SplitSink(out_dir, plan.stem, schema.with_metadata(meta))
    report = SplitReport(plan.split, out_dir / f"{plan.stem}.arrow")
    start = time.perf_counter()
    try:
        with tqdm(total=len(plan.items), desc=plan.stem, unit="img", disable=not progress, file=sys.stderr) as bar:
            for row in reader.rows(plan):
                bar.update()
                if isinstance(row, SkipSample):
                    if strict:
                        raise StrictModeError(f"--strict: {plan.split}: {row.message()}")
                    report.skipped.append((row.reason, row.where, row.detail))
                    continue
                sink.add(row)
                report.written += 1
        if report.written == 0:
            raise UserInputError(_empty_split_message(plan, report, dataset))
        tmp = sink.close()
        report.seconds = time.perf_counter() - start
        return report, tmp
    except BaseException:
        sink.discard()
        raise


def speed_line(reports: Sequence[SplitReport], workers: int) -> str:
    """The closing ``images/s`` line: per split, images (written + skipped) per second of wall time."""
    parts = [f"{r.split} {r.images_per_s():.0f} ({r.written + len(r.skipped)} images in {r.seconds:.1f} s)"
             for r in reports]
    return f"images/s with {workers} worker{'s' if workers > 1 else ''}: " + ", ".join(parts)


def _empty_split_message(plan: SplitPlan, report: SplitReport, dataset: str) -> str:
    """Why a split produced no row: nothing listed, or every listed item skipped (with the reasons)."""
    if not plan.items:
        found = "the raw folder lists no item for it"
    else:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.skip_counts().items())
        first = report.skipped[0]
        found = f"all {len(plan.items)} listed items were skipped ({reasons}; first: {first[0]}: {first[1]})"
    return (f"{dataset} split {plan.split!r} yields 0 rows: {found}; check --root against the raw layout in "
            "DATA.md (nothing was written)")


def format_skipped(report: SplitReport, limit: int | None = MAX_LISTED) -> list[str]:
    """Lines naming the skipped files of one split (at most ``limit``, then a count)."""
    shown = report.skipped if limit is None else report.skipped[:limit]
    lines = [f"  skipped [{r}] {w}" + (f" ({d})" if d else "") for r, w, d in shown]
    if len(report.skipped) > len(shown):
        lines.append(f"  ... and {len(report.skipped) - len(shown)} more")
    return lines


def write_splits(plans: list[SplitPlan], out_dir: Path, schema: pa.Schema, dataset: str, *,
                 strict: bool = False, progress: bool = True, overwrite: bool = False,
                 log: Callable[[str], None] = print, max_side: int | None = None,
                 workers: int = 1) -> list[SplitReport]:
    """Write every plan to ``out_dir/<stem>.arrow`` atomically (all splits or none), see module doc.

    ``max_side`` re-encodes larger images (:func:`load_image_bytes`); ``workers`` > 1 reads the images in
    that many processes (the files are the same for every value).
    """
    out_dir = Path(out_dir)
    if workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {workers}")
    for plan in plans:
        if not plan.items:
            raise UserInputError(_empty_split_message(plan, SplitReport(plan.split, out_dir), dataset))
    prepare_output_dir(out_dir, [plan.stem for plan in plans], dataset, overwrite)
    done: list[tuple[Path, Path]] = []
    reports: list[SplitReport] = []
    with image_reader(max_side, workers, sum(len(plan.items) for plan in plans)) as reader:
        try:
            for plan in plans:
                report, tmp = _write_one(plan, out_dir, schema, dataset, strict, progress, reader)
                done.append((tmp, report.path))
                reports.append(report)
                log(report.summary_line())
                for line in format_skipped(report):
                    log(line)
            commit_files(done)
        except OSError as err:
            raise UserInputError(f"cannot write the arrow files into {out_dir} ({err}); nothing was written "
                                 "and earlier files are unchanged") from err
        finally:
            for tmp, _ in done:
                tmp.unlink(missing_ok=True)
    log(speed_line(reports, reader.workers))
    return reports


def prepare_output_dir(out_dir: Path, stems: Sequence[str], dataset: str, overwrite: bool) -> None:
    """Create ``out_dir``; refuse an unwritable folder and, unless ``overwrite``, earlier arrow files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"--out {out_dir}: cannot create the output folder ({err.strerror or err})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserInputError(f"--out {out_dir}: the output folder is not writable; choose another --out")
    existing = [f"{stem}.arrow" for stem in stems if (out_dir / f"{stem}.arrow").exists()]
    if existing and not overwrite:
        raise UserInputError(f"--out {out_dir} already holds {', '.join(existing)} of {dataset}; pass "
                             "--overwrite to replace them (the new files replace the old ones only once "
                             "every split is written) or choose another --out")


def commit_files(done: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``(tmp, final)`` pair; all or nothing: on failure earlier renames are rolled back."""
    mode = _default_file_mode()
    for tmp, _ in done:
        os.chmod(tmp, mode)  # mkstemp creates 0600; give the usual umask-based permissions
    backups: list[tuple[Path | None, Path]] = []
    try:
        for tmp, final in done:
            backups.append((_backup(final), final))
            os.replace(tmp, final)
    except BaseException:
        for backup, final in reversed(backups):
            if backup is None:
                final.unlink(missing_ok=True)
                continue
            os.replace(backup, final)
            backup.unlink(missing_ok=True)  # rename is a no-op when both names link the same (untouched) file
        raise
    for backup, _ in backups:
        if backup is not None:
            backup.unlink(missing_ok=True)


def _backup(final: Path) -> Path | None:
    """A hidden copy of an existing ``final`` (hard link, or a copy where links are not supported)."""
    if not final.exists():
        return None
    backup = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.bak")
    try:
        os.link(final, backup)
    except OSError:
        shutil.copy2(final, backup)
    return backup


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def require_dir(path: Path, what: str) -> Path:
    """Fail with one clear line when a raw folder is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{what}: folder {path} not found (see DATA.md for the raw layout)")
    return path
