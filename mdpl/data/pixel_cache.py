"""Opt-in pixel cache: the transform's resized uint8 images, written once per split, memory-mapped afterwards.

The image transforms (mdpl/data/transforms.py, docs/methods.md §1.5) are deterministic: decode, convert to RGB,
resize (ViLT: min-max bicubic; CLIP: bicubic shorter side + centre crop) give the same uint8 image every epoch;
only then does ``ToTensor`` turn it into floats (``/255``) and ``Normalize`` shift and scale them. With
``pixel_cache`` set (config.py) the DataModule cuts each transform at ``ToTensor`` (:class:`PixelStages`):

* the first time a split is used, every row of its arrow file is decoded and put through the PIL stage
  (``num_workers`` processes, a progress bar on stderr) and the uint8 RGB pixels are written, planar (C, H, W),
  into one file per split and transform, ``<pixel_cache>/<arrow stem>.<transform>.pixels``;
* afterwards items carry their uint8 pixels, read from that file (memory-mapped; no decoding, no float work in
  the loader), batches are zero-padded in uint8 (a quarter of the bytes to the device), and the DataModule's
  ``on_after_batch_transfer`` applies the tensor stage on the device (:meth:`PixelStages.batch_to_float`): on the
  CPU the transform's own ToTensor/Normalize operations, elsewhere a lookup in a per-channel table of the 256
  values those operations give on the CPU; the padding becomes 0.0. So every tensor the model sees is, bit for bit,
  the one the decode path gives (tests/test_pixel_cache.py compares every item and batch of ViLT and CLIP splits).

File format (version :data:`FORMAT_VERSION`): a 4096-byte header (magic, JSON length, JSON), the pixels of
row 0, 1, ... back to back (row r is ``3 * H_r * W_r`` bytes), then the index: int64 offsets [N + 1] (relative
to the first pixel byte) and int32 (H, W) [N, 2]. The JSON records what the file was made from: the arrow file
(name, rows, size in bytes, modification time in ns), the transform settings (name, image_size, max side,
interpolation, crop, every PIL step's repr, the Pillow version, whose resize the pixels come from) and the format
version. Opening a file whose record differs from the run raises a one-line
:class:`~mdpl.errors.UserInputError` naming the difference: a stale cache is never used silently, and never
replaced silently either (delete it, or point ``pixel_cache`` at another folder).

Writing is atomic: a temporary file ``<name>.<random>.tmp`` in the same folder, renamed to the final name once
complete (a folder holding only a temporary file has no cache: it is rebuilt). One writer: processes (DDP ranks,
several runs) take an exclusive ``flock`` on ``<name>.lock`` before writing; the others wait on it and then open
the finished file (the lock file is removed after a successful write). Where the file system has no locks,
LOCAL_RANK 0 writes and the other ranks wait for the final file to appear.

Disk: about N_rows x 3 x H x W bytes per split and transform (README "Data", DATA.md "Pixel cache").
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mdpl.data.transforms import MinMaxResize
from mdpl.errors import UserInputError

from mdpl.data.settings import DataConfig, DataPipeline

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: LOCAL_RANK 0 writes, the others wait
    fcntl = None

FORMAT_VERSION = 1
MAGIC = b"MDPLPIX\x01"
HEADER_BYTES = 4096
SUFFIX = ".pixels"
DEFAULT_FOLDER = "pixel_cache"
def pixel_cache_folder(data: DataConfig) -> Path | None:
    """The folder of config ``pixel_cache``: None when off ('' / False / None), ``<data_root>/pixel_cache`` for
    True, else the given path."""
    value = data.pixel_cache
    if value is True:
        return Path(data.data_root) / DEFAULT_FOLDER
    if value is None or value is False or value == "":
        return None
    return Path(str(value))


# ----------------------------------------------------------------------------------------------- stages
class PixelStages:
    """A transform cut at ``ToTensor``: ``geometry`` (the PIL steps, ending in the uint8 RGB image that is cached)
    and the tensor steps after it (the transform's own ``ToTensor`` and ``Normalize`` objects).

    ``transform`` must be a ``torchvision.transforms.Compose`` with one ``ToTensor`` followed only by
    ``Normalize`` steps (both backbones' transforms are). ``tensor(uint8(image)) == transform(image)`` bit for bit.
    """

    def __init__(self, transform: Callable, name: str, image_size: int) -> None:
        steps = list(getattr(transform, "transforms", []))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
        if not isinstance(transform, T.Compose) or cut is None or not all(
                isinstance(step, T.Normalize) for step in steps[cut + 1:]):
            raise ValueError(f"transform {transform!r} cannot be cached: expected a Compose of PIL steps, ToTensor, "
                             "then Normalize steps")
        self.name, self.image_size = name, int(image_size)
        self.geometry = T.Compose(steps[:cut])
        self.to_tensor: T.ToTensor = steps[cut]
        self.normalize: list[T.Normalize] = steps[cut + 1:]
        self.settings = self._settings()

    def _settings(self) -> dict:
        settings: dict[str, Any] = {"transform": self.name, "image_size": self.image_size}
        for step in self.geometry.transforms:
            if isinstance(step, MinMaxResize):
                settings.update(max_side=step.longer, multiple=step.multiple, interpolation="bicubic")
            elif isinstance(step, T.Resize):
                settings.update(max_side=step.max_size, interpolation=step.interpolation.value,
                                antialias=step.antialias)
            elif isinstance(step, T.CenterCrop):
                settings["crop"] = list(step.size)
        settings["steps"] = [repr(step) for step in self.geometry.transforms]
        settings["pillow"] = PIL.__version__
        settings["layout"] = "uint8 RGB (C, H, W)"
        return settings

    def uint8(self, image: Image.Image) -> np.ndarray:
        """The PIL stage of the transform as a contiguous uint8 array [3, H, W] (what the cache stores)."""
        out = self.geometry(image)
        if not isinstance(out, Image.Image) or out.mode != "RGB":
            raise ValueError(f"the PIL steps of the {self.name} transform gave {type(out).__name__} "
                             f"{getattr(out, 'mode', '')}, expected an RGB PIL image")
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))

    def tensor(self, chw: np.ndarray) -> torch.Tensor:
        """The tensor stage on one image's cached pixels: the transform's ToTensor (on an (H, W, C) view: /255 in
        float) and Normalize (in place on the fresh tensor: the same kernel as the decode path's out-of-place call)."""
        image = self.to_tensor(chw.transpose(1, 2, 0))
        for step in self.normalize:
            image = TF.normalize(image, step.mean, step.std, inplace=True)
        return image

    def lut(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float [3, 256]: the tensor stage's output for each uint8 value of each channel, computed by
        :meth:`tensor` itself (its steps are per value: ToTensor divides, Normalize shifts and scales per channel)."""
        device = torch.device(device)
        luts = self.__dict__.setdefault("_luts", {})
        if device not in luts:
            values = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 3, axis=0)[:, None, :]   # [3, 1, 256]
            luts[device] = self.tensor(values)[:, 0, :].contiguous().to(device)
        return luts[device]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_luts"}   # no device tensors into workers

    def batch_to_float(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None,
                       use_lut: bool | None = None) -> torch.Tensor:
        """A collated uint8 batch [B, 3, H, W] (zero-padded bottom/right) -> exactly the float batch the decode path
        collates: each image through the tensor stage, the padding 0.0 (``image_sizes`` [B, 2]: each valid (h, w)).

        On the CPU the tensor stage's own operations run on the batch (per value, so the same bits); on other devices
        (whose scalar division may round differently) each pixel is looked up in :meth:`lut`, computed on the CPU
        (``use_lut`` forces either way).
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if not (images.device.type != "cpu" if use_lut is None else use_lut):
            out = torch.empty(images.shape, dtype=torch.get_default_dtype(), device=images.device)
            sizes = image_sizes.tolist() if image_sizes is not None else [images.shape[-2:]] * len(images)
            for i, (h, w) in enumerate(sizes):   # image by image (stays in the CPU caches), in place
                torch.div(images[i].to(dtype=out.dtype), 255, out=out[i])   # torchvision ToTensor's operations
                for step in self.normalize:
                    TF.normalize(out[i], step.mean, step.std, inplace=True)
                out[i, :, h:, :] = 0
                out[i, :, :h, w:] = 0
            return out
        offsets = torch.arange(0, 3 * 256, 256, device=images.device).view(1, 3, 1, 1)
        out = torch.take(self.lut(images.device), images.long() + offsets)
        if image_sizes is not None:
            h, w = out.shape[-2:]
            sizes = image_sizes.to(out.device).view(-1, 2, 1, 1)
            valid = ((torch.arange(h, device=out.device).view(1, h, 1) < sizes[:, 0]) &
                     (torch.arange(w, device=out.device).view(1, 1, w) < sizes[:, 1]))       # [B, H, W]
            out = torch.where(valid[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out


def pixel_stages(pipeline: DataPipeline, transform: Callable) -> PixelStages:
    """:class:`PixelStages` of the run's transform (``build_transform(pipeline)``), named by the backbone card's
    transform id (part of the cache's file name)."""
    return PixelStages(transform, pipeline.transform, int(pipeline.image_size))


# ----------------------------------------------------------------------------------------------- record
def arrow_identity(path: str | os.PathLike, n_rows: int) -> dict:
    """What a cache records of its arrow file: name, rows, size and modification time (a rewrite changes them)."""
    stat = Path(path).stat()
    return {"file": Path(path).name, "rows": int(n_rows), "bytes": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def cache_path(folder: str | os.PathLike, stem: str, stages: PixelStages) -> Path:
    """``<folder>/<arrow stem>.<transform name>.pixels``."""
    return Path(folder) / f"{stem}.{stages.name}{SUFFIX}"


def expected_record(dataset, stages: PixelStages) -> dict:
    """The record a cache of ``dataset`` (an ArrowMultimodalDataset) under ``stages`` must carry."""
    return {"format_version": FORMAT_VERSION, "arrow": arrow_identity(dataset.path, dataset.n_rows),
            "transform": stages.settings}


def _fix(path: Path) -> str:
    return (f"delete {path.parent} (or just {path.name}) to rebuild it, or set pixel_cache to another folder "
            "(or '' to decode every epoch)")


def _mismatch(found: Mapping, expected: Mapping) -> str:
    """'' when ``found`` (a cache's record) matches ``expected``, else the first difference, in words."""
    if found.get("format_version") != expected["format_version"]:
        return f"it has format version {found.get('format_version')!r}, this mdpl reads {expected['format_version']}"
    f_tf, e_tf = found.get("transform") or {}, expected["transform"]
    for key in list(e_tf) + [k for k in f_tf if k not in e_tf]:
        if f_tf.get(key) != e_tf.get(key):
            return f"it was made with {key}={f_tf.get(key)!r}, this run has {key}={e_tf.get(key)!r}"
    f_ar, e_ar = found.get("arrow") or {}, expected["arrow"]
    if f_ar.get("file") != e_ar["file"]:
        return f"it was made from {f_ar.get('file')!r}, this run reads {e_ar['file']!r}"
    if f_ar.get("rows") != e_ar["rows"]:
        return f"it was made from {f_ar.get('rows')} rows of {e_ar['file']}, which now has {e_ar['rows']}"
    if (f_ar.get("bytes"), f_ar.get("mtime_ns")) != (e_ar["bytes"], e_ar["mtime_ns"]):
        return (f"{e_ar['file']} was rewritten after the cache was made (size {f_ar.get('bytes')} -> "
                f"{e_ar['bytes']} bytes, modification time {f_ar.get('mtime_ns')} -> {e_ar['mtime_ns']} ns)")
    return ""


def read_record(path: Path) -> dict:
    """The JSON header of a cache file (UserInputError when the file is not a complete mdpl pixel cache)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        size = path.stat().st_size
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise ValueError("no pixel-cache header")
        length = int.from_bytes(head[8:16], "little")
        record = json.loads(head[16:16 + length].decode("utf-8"))
        end = int(record["index_offset"]) + (int(record["arrow"]["rows"]) + 1) * 8 + int(record["arrow"]["rows"]) * 8
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"pixel cache {path} is not a readable mdpl pixel cache ({err}); {_fix(path)}") from None
    if size != end:
        raise UserInputError(f"pixel cache {path} has {size} bytes, its header says {end} (cut short or damaged); "
                             f"{_fix(path)}")
    return record


# ----------------------------------------------------------------------------------------------- reading
class PixelCache:
    """A finished cache file of one split: ``image(row)`` = the transform's uint8 stage of arrow row ``row``
    (``stages.tensor`` / ``stages.batch_to_float`` of it = the transform's output, bit for bit).

    Opening checks the record against ``expected`` (:func:`expected_record`; UserInputError on any difference);
    the file is memory-mapped lazily in each process (DataLoader workers map it again, nothing is pickled).
    """

    def __init__(self, path: str | os.PathLike, stages: PixelStages, expected: Mapping) -> None:
        self.path, self.stages = Path(path), stages
        self.record = read_record(self.path)
        problem = _mismatch(self.record, expected)
        if problem:
            raise UserInputError(f"pixel cache {self.path} does not match this run: {problem}; {_fix(self.path)}")
        self.n_rows = int(self.record["arrow"]["rows"])
        self.data_offset = int(self.record["data_offset"])
        index = int(self.record["index_offset"])
        self.offsets = np.fromfile(self.path, dtype="<i8", count=self.n_rows + 1, offset=index).astype(np.int64)
        self.shapes = np.fromfile(self.path, dtype="<i4", count=2 * self.n_rows,
                                  offset=index + 8 * (self.n_rows + 1)).reshape(self.n_rows, 2).astype(np.int64)
        if self.offsets[-1] != int(self.record["pixel_bytes"]) or not np.array_equal(
                np.diff(self.offsets), 3 * self.shapes[:, 0] * self.shapes[:, 1]):
            raise UserInputError(f"pixel cache {self.path} has an inconsistent index (damaged); {_fix(self.path)}")
        self._map: np.memmap | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.n_rows

    def _mapped(self) -> np.memmap:
        if self._map is None or self._pid != os.getpid():
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._pid = os.getpid()
        return self._map

    def pixels(self, row: int) -> np.ndarray:
        """The cached uint8 pixels [3, H, W] of arrow row ``row`` (a private copy)."""
        start = self.data_offset + int(self.offsets[row])
        h, w = (int(v) for v in self.shapes[row])
        return np.array(self._mapped()[start:start + 3 * h * w]).reshape(3, h, w)

    def image(self, row: int) -> torch.Tensor:
        """The cached uint8 image [3, H, W] of row ``row``: ``stages.tensor(...)`` of it is what the transform gives;
        batches of them are converted on the device (:meth:`PixelStages.batch_to_float`)."""
        return torch.from_numpy(self.pixels(row))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None, "_pid": -1}


# ----------------------------------------------------------------------------------------------- writing
class _Rows(torch.utils.data.Dataset):
    """Arrow row -> cached pixels (decode as the dataset does, then the PIL stage); for the writer's workers."""

    def __init__(self, dataset, stages: PixelStages) -> None:
        self.dataset, self.stages = dataset, stages

    def __len__(self) -> int:
        return self.dataset.n_rows

    def __getitem__(self, row: int) -> torch.Tensor:
        return torch.from_numpy(self.stages.uint8(self.dataset._decode(row)))


def _uint8_rows(dataset, stages: PixelStages, workers: int) -> Iterator[np.ndarray]:
    rows = _Rows(dataset, stages)
    if workers <= 0 or len(rows) < 2 * workers:
        for row in range(len(rows)):
            yield rows[row].numpy()
        return
    loader = torch.utils.data.DataLoader(rows, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4)
    for pixels in loader:
        yield pixels.numpy()


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with Lightning
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=2.0, disable=not enabled)


def write_cache(path: Path, dataset, stages: PixelStages, workers: int = 0, progress: bool = True) -> None:
    """Write the cache of ``dataset`` to ``path`` atomically (a temporary file in the same folder, renamed when
    complete; removed on any error)."""
    record = expected_record(dataset, stages)
    n_rows = dataset.n_rows
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    started = time.perf_counter()
    try:
        offsets = np.zeros(n_rows + 1, dtype="<i8")
        shapes = np.zeros((n_rows, 2), dtype="<i4")
        with os.fdopen(fd, "wb") as fh, _progress(n_rows, f"[mdpl] pixel cache {path.name}", progress) as bar:
            fh.write(b"\0" * HEADER_BYTES)
            pos = 0
            for row, pixels in enumerate(_uint8_rows(dataset, stages, workers)):
                fh.write(memoryview(np.ascontiguousarray(pixels)).cast("B"))
                shapes[row] = pixels.shape[1:]
                pos += pixels.nbytes
                offsets[row + 1] = pos
                if bar is not None:
                    bar.update(1)
            pad = -(HEADER_BYTES + pos) % 8
            fh.write(b"\0" * pad)
            record.update(data_offset=HEADER_BYTES, pixel_bytes=pos, index_offset=HEADER_BYTES + pos + pad)
            fh.write(offsets.tobytes())
            fh.write(shapes.tobytes())
            blob = json.dumps(record, sort_keys=True).encode("utf-8")
            if 16 + len(blob) > HEADER_BYTES:
                raise ValueError(f"pixel cache header of {len(blob)} bytes does not fit in {HEADER_BYTES}")
            fh.seek(0)
            fh.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserInputError(f"cannot write the pixel cache {path} ({err.strerror or err}); it needs about "
                             f"{_estimate(dataset, stages) / 1e9:.1f} GB there: free space or set pixel_cache to "
                             "another folder (or '' to decode every epoch)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if progress:
        print(f"[mdpl] pixel cache {path}: {n_rows} images, {pos / 1e6:,.1f} MB, written in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)


def _estimate(dataset, stages: PixelStages) -> float:
    """Rough bytes of a cache: N x 3 x (ViLT: the shorter side and 4:3; CLIP: the crop)."""
    crop = stages.settings.get("crop")
    h, w = crop if crop else (stages.image_size, stages.image_size * 4 // 3)
    return float(dataset.n_rows) * 3 * h * w


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[bool]:
    """Exclusive flock on ``<path>.lock`` (waits while another process holds it); yields whether it is locked
    (False where the file system has no locks)."""
    lock = path.with_name(path.name + ".lock")
    try:
        fh = open(lock, "a+b")
    except OSError as err:
        raise UserInputError(f"pixel_cache folder {path.parent} is not writable ({err.strerror or err}) and has no "
                             f"{path.name}; set pixel_cache to a writable folder (or '' to decode every epoch)") from None
    with fh:
        if fcntl is None:
            yield False
            return
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[mdpl] waiting for another process to finish the pixel cache {path}", file=sys.stderr)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _wait_for(path: Path, poll_s: float = 2.0) -> None:
    started = last = time.monotonic()
    while not path.is_file():
        if time.monotonic() - last > 300:
            last = time.monotonic()
            print(f"[mdpl] still waiting for LOCAL_RANK 0 to write the pixel cache {path} "
                  f"({last - started:.0f} s)", file=sys.stderr)
        time.sleep(poll_s)


def open_pixel_cache(folder: str | os.PathLike, dataset, stages: PixelStages, workers: int = 0,
                     progress: bool = True) -> PixelCache:
    """The pixel cache of ``dataset`` (an :class:`~mdpl.data.dataset.ArrowMultimodalDataset`) in ``folder``:
    opened (and checked) when its file exists, else written first by one process while the others wait."""
    path = cache_path(folder, dataset.stem, stages)
    expected = expected_record(dataset, stages)
    if path.is_file():
        return PixelCache(path, stages, expected)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"pixel_cache folder {path.parent} cannot be created ({err.strerror or err}); set "
                             "pixel_cache to a writable folder (or '' to decode every epoch)") from None
    with _writer_lock(path) as locked:
        if not path.is_file():   # else another process wrote it while this one waited
            if locked:
                for stale in path.parent.glob(path.name + ".*.tmp"):   # left by a writer that died
                    stale.unlink(missing_ok=True)
            if locked or int(os.environ.get("LOCAL_RANK", 0)) == 0:
                write_cache(path, dataset, stages, workers=workers, progress=progress)
                if locked:   # safe: whoever still waits on it finds the file and writes nothing
                    path.with_name(path.name + ".lock").unlink(missing_ok=True)
            else:
                _wait_for(path)
    return PixelCache(path, stages, expected)
