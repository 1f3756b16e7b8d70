"""The opt-in pixel cache (mdpl/data/pixel_cache.py, config ``pixel_cache``): the tensors the model gets from it equal
the per-epoch decode path bit for bit (ViLT and CLIP transforms, every item and every batch, the CPU operations and
the lookup table used on other devices), a second open reads it without decoding,
a cache of another transform setting or of a rewritten arrow file is refused in one line, only complete files
are used (atomic writes, one writer), and the config key is validated."""
from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mdpl.data.pixel_cache as pc
from conftest import _SCHEMAS, make_rows, write_arrow
from mdpl.data.collate import pad_images
from mdpl.data.constants import ARROW_SPLITS
from mdpl.data.dataset import ArrowMultimodalDataset
from mdpl.data.datamodule import MDPLDataModule
from mdpl.data.transforms import build_transform, clip_transform, pixelbert_transform
from mdpl.errors import UserInputError
from mdpl.config.validate import check_files, validate_config
from runs import datamodule_of, typed

#: (mode, width, height) cycled over rows: colour, grey, alpha and palette images (the dataset converts them to RGB),
#: portrait / landscape / very wide (CLIP crops it) and one larger image (vectorised kernels, not just loop tails).
IMAGES = {"food101": [("RGB", 120, 80), ("L", 64, 96), ("CMYK", 50, 50), ("RGB", 200, 60), ("RGB", 410, 333)],
          "hatememes": [("RGB", 70, 110), ("RGBA", 120, 80), ("P", 64, 64), ("LA", 200, 60), ("RGB", 333, 410)]}
BACKBONES = [("vilt", 64), ("clip", 224)]


def _image(mode: str, width: int, height: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    base[: height // 2, : width // 2] = 37   # a flat patch too: resize rounding on plateaus and edges
    img = Image.fromarray(base, "RGBA")
    img = img.convert("RGB").quantize(64) if mode == "P" else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_arrows(root: Path, dataset: str, rows: tuple[int, int, int] = (7, 3, 3)) -> Path:
    fmt = "PNG" if dataset == "hatememes" else "JPEG"
    root.mkdir(parents=True, exist_ok=True)
    for (split, stem), n in zip(ARROW_SPLITS[dataset].items(), rows):
        cols = make_rows(dataset, split, n)
        specs = IMAGES[dataset]
        cols["image"] = [_image(*specs[i % len(specs)], fmt, seed=zlib.crc32(f"{stem}/{i}".encode()))
                         for i in range(n)]
        write_arrow(root / f"{stem}.arrow", _SCHEMAS[dataset], cols)
    return root


@pytest.fixture(scope="module")
def arrows(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("pixel_cache_arrows")
    return {d: _write_arrows(base / d, d) for d in IMAGES}


@pytest.fixture
def fresh_food(tmp_path, arrows) -> Path:
    """A private copy of the food101 arrow files (tests rewrite them)."""
    return Path(shutil.copytree(arrows["food101"], tmp_path / "arrow"))


def _config(data_config, bert_vocab_dir, dataset: str, root: Path, backbone: str = "vilt", image_size: int = 64,
            **overrides) -> dict:
    return data_config(dataset, root, bert_vocab_dir if backbone == "vilt" else None, backbone=backbone,
                       image_size=image_size, **overrides)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.contiguous().view(torch.int32)


def assert_items_equal(a: dict, b: dict, stages: pc.PixelStages | None = None) -> None:
    """Equal items; ``stages``: ``b`` carries cached uint8 pixels, compared after the tensor stage."""
    assert a.keys() == b.keys()
    b_image = b["image"]
    if stages is not None:
        assert b_image.dtype == torch.uint8
        b_image = stages.tensor(b_image.numpy())
    assert a["image"].dtype == b_image.dtype and a["image"].shape == b_image.shape
    assert torch.equal(_bits(a["image"]), _bits(b_image))   # bit for bit (also +0.0 vs -0.0)
    for key in a:
        if key != "image":
            assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key


def _fit_module(cfg: dict) -> MDPLDataModule:
    dm = datamodule_of(cfg)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dataset", ["food101", "hatememes"])
@pytest.mark.parametrize("backbone,image_size", BACKBONES)
def test_cached_items_equal_the_decode_path_bit_for_bit(dataset, backbone, image_size, arrows, tmp_path,
                                                        data_config, bert_vocab_dir):
    cfg = _config(data_config, bert_vocab_dir, dataset, arrows[dataset], backbone, image_size,
                  missing_table_root=str(tmp_path / "tables"))
    decoded = _fit_module(cfg)
    cached = _fit_module({**cfg, "pixel_cache": str(tmp_path / "cache")})
    name = "pixelbert" if backbone == "vilt" else "clip"
    stages = cached.pixel_stages
    for split in ("train", "val"):
        assert decoded.datasets[split].pixel_cache is None
        assert cached.datasets[split].pixel_cache.path == tmp_path / "cache" / f"{ARROW_SPLITS[dataset][split]}.{name}.pixels"
        ref, new = decoded.datasets[split], cached.datasets[split]
        assert len(ref) == len(new) > 0
        for i in range(len(ref)):
            assert_items_equal(ref[i], new[i], stages)
    sizes = {tuple(cached.datasets["train"][i]["image"].shape) for i in range(len(cached.datasets["train"]))}
    assert len(sizes) > 1 if backbone == "vilt" else sizes == {(3, 224, 224)}   # ViLT: variable sizes
    for a, b in zip(decoded.train_dataloader(), cached.train_dataloader(), strict=True):  # collated, then on device
        assert a["image"].dtype == torch.float32 and b["image"].dtype == torch.uint8
        for use_lut in (False, True):   # the CPU's operations, the lookup table of other devices
            assert torch.equal(_bits(stages.batch_to_float(b["image"], b["image_sizes"], use_lut)), _bits(a["image"]))
        a, b = decoded.on_after_batch_transfer(a, 0), cached.on_after_batch_transfer(b, 0)   # + missing dummies
        assert torch.equal(_bits(a["image"]), _bits(b["image"])) and torch.equal(a["image_sizes"], b["image_sizes"])
        assert torch.equal(a["text_ids"], b["text_ids"]) and torch.equal(a["missing_type"], b["missing_type"])


@pytest.mark.parametrize("transform,wh", [(pixelbert_transform(384), (512, 384)), (clip_transform(224), (224, 224)),
                                          (pixelbert_transform(384), (700, 700))], ids=["vilt", "clip", "vilt-700"])
def test_the_cut_at_uint8_is_exact_for_every_pixel_value(transform, wh):
    """The float steps after the cached uint8 stage (ToTensor: /255, Normalize) are per value: an image of the
    output size (the resize keeps it) holding each of the 256 values in every channel, at shuffled positions, goes
    through the cached stages and through the whole transform to the same bits (and a 700x700 one, resized)."""
    rng = np.random.default_rng(3)
    pixels = np.stack([rng.permutation(np.resize(np.arange(256, dtype=np.uint8), wh[0] * wh[1])).reshape(wh[::-1])
                       for _ in range(3)], axis=-1)
    image = Image.fromarray(pixels, "RGB")
    stages = pc.PixelStages(transform, "x", 384)
    chw = stages.uint8(image)
    assert chw.dtype == np.uint8 and chw.flags.c_contiguous
    if wh != (700, 700):
        assert all(len(np.unique(chw[c])) == 256 for c in range(3))
    expected = _bits(transform(image))
    assert torch.equal(_bits(stages.tensor(chw)), expected)
    batch = torch.from_numpy(chw)[None]
    for use_lut in (False, True):
        assert torch.equal(_bits(stages.batch_to_float(batch, None, use_lut)[0]), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_lookup_on_cuda_equals_the_cpu_transform():
    """The lookup table on a CUDA device gives the transform's floats bit for bit; the same lookup on the CPU is
    checked on every machine by the test above (``use_lut=True``)."""
    transform = pixelbert_transform(384)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for h, w in ((500, 380), (380, 700))]
    stages = pc.PixelStages(transform, "pixelbert", 384)
    pixels = [torch.from_numpy(stages.uint8(img)) for img in images]
    batch, sizes = pad_images(pixels)
    expected, _ = pad_images([transform(img) for img in images])
    out = stages.batch_to_float(batch.cuda(), sizes.cuda()).cpu()
    assert torch.equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_pad_images_equals_pad_and_stack(dtype):
    """The collate's one-copy padding gives what F.pad + stack gave (zeros bottom/right), float and uint8 batches."""
    gen = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, h, w, generator=gen) * 255).to(dtype) for h, w in ((4, 6), (7, 3), (7, 6), (2, 2))]
    out, sizes = pad_images(images)
    ref = torch.stack([torch.nn.functional.pad(img, (0, 6 - img.shape[-1], 0, 7 - img.shape[-2])) for img in images])
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(ref)) and sizes.tolist() == [[4, 6], [7, 3], [7, 6], [2, 2]]
    same, _ = pad_images(images[2:3] * 2)
    assert torch.equal(same, torch.stack(images[2:3] * 2))


# ------------------------------------------------------------------------------------------------- reuse
def test_second_open_reads_the_cache_without_decoding(fresh_food, tmp_path, data_config, bert_vocab_dir,
                                                      monkeypatch):
    cfg = _config(data_config, bert_vocab_dir, "food101", fresh_food, pixel_cache=True)
    first = _fit_module(cfg)
    files = sorted(p.name for p in (fresh_food / "pixel_cache").iterdir() if p.suffix == ".pixels")
    assert files == ["food101_train.pixelbert.pixels", "food101_val.pixelbert.pixels"]
    stamp = {p: p.stat().st_mtime_ns for p in (fresh_food / "pixel_cache").glob("*.pixels")}

    def no_decoding(self, row):
        raise AssertionError("decoded although the pixel cache exists")

    monkeypatch.setattr(ArrowMultimodalDataset, "_decode", no_decoding)
    second = _fit_module(cfg)
    for split in ("train", "val"):
        for i in range(len(first.datasets[split])):
            assert_items_equal(first.datasets[split][i], second.datasets[split][i])
    assert len(next(iter(second.train_dataloader()))["image"]) == 4
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp   # read, not rewritten


# ------------------------------------------------------------------------------------------------- refusal
def test_other_transform_settings_are_refused(fresh_food, tmp_path, data_config, bert_vocab_dir):
    folder = str(tmp_path / "cache")
    cfg = _config(data_config, bert_vocab_dir, "food101", fresh_food, pixel_cache=folder)
    _fit_module(cfg)
    with pytest.raises(UserInputError, match=r"food101_train\.pixelbert\.pixels does not match this run: it was "
                                             r"made with image_size=64, this run has image_size=96; delete .*cache "
                                             r"\(or just food101_train\.pixelbert\.pixels\) to rebuild it, or set "
                                             r"pixel_cache to another folder") as info:
        _fit_module({**cfg, "image_size": 96})
    assert "\n" not in str(info.value)
    # the other backbone's transform has its own files beside them
    clip = _fit_module(_config(data_config, bert_vocab_dir, "food101", fresh_food, "clip", 224, pixel_cache=folder))
    assert clip.datasets["train"].pixel_cache.path.name == "food101_train.clip.pixels"


def test_a_rewritten_arrow_file_is_refused(fresh_food, tmp_path, data_config, bert_vocab_dir):
    cfg = _config(data_config, bert_vocab_dir, "food101", fresh_food, pixel_cache=str(tmp_path / "cache"),
                  missing_table_root=str(tmp_path / "tables"))
    _fit_module(cfg)
    train = fresh_food / "food101_train.arrow"
    data = train.read_bytes()
    train.write_bytes(data)                       # same bytes, written again (make_arrow --overwrite)
    os.utime(train, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(UserInputError, match=r"food101_train\.arrow was rewritten after the cache was made \(size "
                                             r"\d+ -> \d+ bytes, modification time \d+ -> \d+ ns\); delete"):
        _fit_module(cfg)
    cols = make_rows("food101", "train", 5)
    cols["image"] = [_image("RGB", 40 + i, 50, "JPEG", i) for i in range(5)]
    write_arrow(train, _SCHEMAS["food101"], cols)  # another row count
    shutil.rmtree(tmp_path / "tables")             # (its missing table would be refused first)
    with pytest.raises(UserInputError, match=r"it was made from 7 rows of food101_train\.arrow, which now has 5"):
        _fit_module(cfg)


def test_a_damaged_cache_file_is_refused(fresh_food, tmp_path, data_config, bert_vocab_dir):
    cfg = _config(data_config, bert_vocab_dir, "food101", fresh_food, pixel_cache=str(tmp_path / "cache"))
    _fit_module(cfg)
    path = tmp_path / "cache" / "food101_val.pixelbert.pixels"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(UserInputError, match=r"food101_val\.pixelbert\.pixels has \d+ bytes, its header says \d+ "
                                             r"\(cut short or damaged\); delete"):
        _fit_module(cfg)
    path.write_bytes(b"not a cache")
    with pytest.raises(UserInputError, match=r"is not a readable mdpl pixel cache"):
        _fit_module(cfg)


# ------------------------------------------------------------------------------------------------- atomicity
def test_a_folder_with_only_a_temp_file_is_not_used(arrows, tmp_path, data_config, bert_vocab_dir):
    cfg = _config(data_config, bert_vocab_dir, "hatememes", arrows["hatememes"], pixel_cache=str(tmp_path / "c"),
                  missing_table_root=str(tmp_path / "tables"))
    (tmp_path / "c").mkdir()
    stale = tmp_path / "c" / "hatememes_train.pixelbert.pixels.k3x9q.tmp"   # a writer that died midway
    stale.write_bytes(b"\0" * 5000)
    cached = _fit_module(cfg)
    assert not stale.exists() and (tmp_path / "c" / "hatememes_train.pixelbert.pixels").is_file()
    decoded = _fit_module({**cfg, "pixel_cache": ""})
    for i in range(len(decoded.datasets["train"])):
        assert_items_equal(decoded.datasets["train"][i], cached.datasets["train"][i], cached.pixel_stages)


def test_an_interrupted_write_leaves_no_file(arrows, tmp_path, data_config, bert_vocab_dir, monkeypatch):
    cfg = _config(data_config, bert_vocab_dir, "hatememes", arrows["hatememes"], pixel_cache=str(tmp_path / "c"),
                  missing_table_root=str(tmp_path / "tables"))
    real, calls = pc.PixelStages.uint8, []

    def dies_at_row_3(self, image):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(pc.PixelStages, "uint8", dies_at_row_3)
    with pytest.raises(KeyboardInterrupt):
        _fit_module(cfg)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["hatememes_train.pixelbert.pixels.lock"]
    monkeypatch.setattr(pc.PixelStages, "uint8", real)
    assert _fit_module(cfg).datasets["train"].pixel_cache is not None


def test_written_by_worker_processes_as_in_process(arrows, tmp_path):
    ds = ArrowMultimodalDataset(arrows["hatememes"], "hatememes", "train", build_transform(typed({"image_size": 64}).pipeline))
    stages = pc.pixel_stages(typed({"backbone": "vilt", "image_size": 64}).pipeline, ds.transform)
    expected = pc.expected_record(ds, stages)
    caches = []
    for workers in (0, 2):
        path = tmp_path / f"w{workers}" / "hatememes_train.pixelbert.pixels"
        path.parent.mkdir()
        pc.write_cache(path, ds, stages, workers=workers, progress=False)
        caches.append(pc.PixelCache(path, stages, expected))
    assert caches[0].path.read_bytes() == caches[1].path.read_bytes()
    assert all(np.array_equal(caches[0].pixels(r), stages.uint8(ds._decode(r))) for r in range(ds.n_rows))


def _open_in_child(folder: str, dataset, stages, queue) -> None:
    cache = pc.open_pixel_cache(folder, dataset, stages, progress=False)
    queue.put([zlib.crc32(cache.pixels(r).tobytes()) for r in range(len(cache))])


def test_concurrent_openers_write_once(arrows, tmp_path, monkeypatch):
    """Two processes (e.g. DDP ranks) open a missing cache at once: one writes, the other waits and reads it."""
    ds = ArrowMultimodalDataset(arrows["food101"], "food101", "val", build_transform(typed({"image_size": 64}).pipeline))
    stages = pc.pixel_stages(typed({"backbone": "vilt", "image_size": 64}).pipeline, ds.transform)
    log, real = tmp_path / "writers.log", pc.write_cache

    def slow_write(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(pc, "write_cache", slow_write)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(str(tmp_path / "c"), ds, stages, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1 and results[0] == results[1]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["food101_val.pixelbert.pixels"]   # lock removed
    assert results[0] == [zlib.crc32(stages.uint8(ds._decode(r)).tobytes()) for r in range(ds.n_rows)]


# ------------------------------------------------------------------------------------------------- config
def test_config_key(fresh_food, tmp_path):
    from runs import resolved_config

    base = resolved_config(["task_finetune_food101", "map", "tiny"], {})
    assert base["pixel_cache"] == ""                                             # off by default
    for value in (True, str(tmp_path / "new" / "cache"), ""):
        validate_config({**base, "data_root": str(fresh_food), "pixel_cache": value})
    assert pc.pixel_cache_folder(typed({"pixel_cache": True, "data_root": "/d"}).data) == Path("/d/pixel_cache")
    assert pc.pixel_cache_folder(typed({"pixel_cache": False}).data) is None and pc.pixel_cache_folder(typed({}).data) is None
    with pytest.raises(UserInputError, match=r"^pixel_cache=3 must be '' \(off: decode every epoch\), a folder path, "
                                             r"or True \(<data_root>/pixel_cache\)$"):
        check_files({"pixel_cache": 3})
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserInputError, match=r"^pixel_cache='.*file\.txt' \(.*file\.txt\) is a file, not a folder; "):
        check_files({"pixel_cache": str(a_file)})
    with pytest.raises(UserInputError, match=r"^pixel_cache='.*file\.txt/cache' \(.*\) cannot be created: .* is a "
                                             r"file"):
        check_files({"pixel_cache": str(a_file / "cache")})
    check_files({"pixel_cache": str(a_file / "cache")}, data=False)   # an injected DataModule: not read
