"""LightningDataModule of mdpl (docs/methods.md §1.3-1.7; fixes D-8, D-12, D-14).

* ``setup`` builds only the splits a stage needs (fit: train+val, validate: val, test: test; "val" is the
  ``selection_split``: the validation loop reads the test split with ``selection_split=test``), each with
  its own deterministic missing table (train/val/test specs from the config, ``test_ratio`` /
  ``test_type`` overrides applied to copies) and, with ``pixel_cache`` (opt-in), its pixel cache: the resized
  uint8 images, written on first use and memory-mapped after (mdpl/data/pixel_cache.py). Items and batches then
  carry those uint8 pixels; ``on_after_batch_transfer`` turns them into the decode path's float batch, bit for bit.
* Loaders: ``per_gpu_batchsize``, ``num_workers``, persistent workers when > 0, pinned memory on CUDA;
  train in the order of :class:`mdpl.data.sampler.SeededTrainSampler` (a function of seed and epoch, sharded
  over DDP ranks), val/test in order; under DDP val/test get an unpadded sampler (rank r reads items r, r+W,
  ...: no sample is evaluated twice).
* ``on_before_batch_transfer`` (on the host): the batch's missing types, with the optional per-split override table
  (``set_missing_override``, for evaluation sweeps) and ``simulate_missing`` for training batches (per-item hash of
  (seed, epoch, item_index)); they travel as ``missing_type`` and as the host tuple ``missing_type_host`` (so the
  model can skip rows without a device sync), with ``row_index_host``.
* ``on_after_batch_transfer`` (on device): cached uint8 pixels to the normalised float batch, then the dummies of §1.4
  via :func:`mdpl.data.missing.apply_missing` (a batch that did not pass the host hook gets its types here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mdpl.data.collate import Collator
from mdpl.data.dataset import ArrowMultimodalDataset, arrow_path, count_rows, check_arrow_exists
from mdpl.data.sampler import SeededTrainSampler
from mdpl.data.missing import (SPLITS, MissingSpec, apply_missing, load_or_create_missing_table,
                               missing_specs, simulated_types)
from mdpl.data.pixel_cache import open_pixel_cache, pixel_cache_folder, pixel_stages
from mdpl.data.tokenizers import build_tokenizer
from mdpl.errors import UserInputError
from mdpl.data.settings import DataConfig, DataPipeline, MissingConfig
from mdpl.data.transforms import build_transform

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                 None: SPLITS}
"""Stage -> the splits it builds; ``val`` stands for the configured ``selection_split``."""


def eval_sampler(dataset) -> torch.utils.data.Sampler | None:
    """Under DDP (world size > 1): a sampler that shards ``dataset`` over the ranks without padding, so that
    torchmetrics' cross-rank sync sees every item exactly once (torch's DistributedSampler repeats items to
    even out the ranks, D-46). It subclasses DistributedSampler, so Lightning does not replace it. None otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def read_reference_table(path: str, n_rows: int, split: str) -> torch.Tensor:
    """A reference repo's missing table for `split` (``reference_missing_tables``), checked: one type 0/1/2 per row
    of the arrow file (docs/methods.md D-12: tables of the reference code can be imported for parity)."""
    from mdpl.data.missing import import_reference_table
    try:
        table = import_reference_table(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserInputError(f"reference_missing_tables.{split}: {err}") from None
    except Exception as err:  # noqa: BLE001 - torch raises several types for a file that is not a tensor file
        raise UserInputError(f"reference_missing_tables.{split}={path!r} cannot be read as a tensor file ({err})") from None
    if len(table) != n_rows:
        raise UserInputError(f"reference_missing_tables.{split}={path!r} has {len(table)} entries, the {split} arrow "
                             f"file has {n_rows} rows: it was made for another split or dataset version")
    return table


class MDPLDataModule(pl.LightningDataModule):
    """Datasets, loaders and device-side missing-modality handling for one dataset of the config."""

    def __init__(self, data: DataConfig, missing: MissingConfig, pipeline: DataPipeline, seed: int) -> None:
        """The run config's data and missing sections, its backbone's pipeline (``RunConfig.pipeline``) and seed."""
        super().__init__()
        self.data, self.missing, self.pipeline, self.seed = data, missing, pipeline, int(seed)
        self.dataset_name = data.dataset
        self.data_root = data.data_root
        self.specs: dict[str, MissingSpec] = missing_specs(missing, self.seed)
        self.table_root = missing.missing_table_root or str(Path(self.data_root) / "missing_tables")
        self.transform = build_transform(pipeline)
        self.pixel_cache = pixel_cache_folder(data)   # None: decode every epoch
        self.pixel_stages = pixel_stages(pipeline, self.transform) if self.pixel_cache is not None else None
        self.tokenizer = build_tokenizer(pipeline)
        self.collator = Collator(self.tokenizer, dynamic_text_padding=pipeline.dynamic_text_padding)
        ids, masks = self.tokenizer.empty()
        self._dummy_ids, self._dummy_masks = ids, masks
        self.datasets: dict[str, ArrowMultimodalDataset] = {}
        self._overrides: dict[str, torch.Tensor] = {}
        self._pending_skip_batches = 0

    # --------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            split = self.selection_split if split == "val" and stage in ("fit", "validate") else split
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)

    def build_dataset(self, split: str) -> ArrowMultimodalDataset:
        """One split with its missing table (cached under ``missing_table_root``) and, with ``pixel_cache``, its
        pixel cache (written on first use, mdpl/data/pixel_cache.py)."""
        dataset = ArrowMultimodalDataset(self.data_root, self.dataset_name, split, self.transform,
                                         missing_spec=self.specs[split], missing_table_root=self.table_root,
                                         mmimdb_items=self.data.mmimdb_items)
        reference = str((self.missing.reference_missing_tables or {}).get(split) or "")
        if reference:
            dataset.set_missing_table(read_reference_table(reference, dataset.n_rows, split))
        if self.pixel_cache is not None:
            dataset.use_pixel_cache(open_pixel_cache(self.pixel_cache, dataset, self.pixel_stages,
                                                     workers=int(self.data.num_workers)))
        return dataset

    # ------------------------------------------------------------------------------------- loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Loader of ``split``; train: :class:`SeededTrainSampler`, val/test: in order (unpadded under DDP).

        Every loader has its own generator, so iterating a loader never draws from the global RNG that
        dropout uses: the result does not depend on ``num_workers`` or on how often validation runs.
        """
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        dataset, seed = self.datasets[split], self.seed
        batch_size, workers = int(self.data.per_gpu_batchsize), int(self.data.num_workers)
        if shuffle:
            sampler = SeededTrainSampler(dataset, seed)
            sampler.skip(self._pending_skip_batches * batch_size)
            self._pending_skip_batches = 0
        else:
            sampler = eval_sampler(dataset)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=self.collator, pin_memory=torch.cuda.is_available(),
                          persistent_workers=workers > 0, drop_last=False,
                          generator=torch.Generator().manual_seed(seed))

    def items_loader(self, split: str, items: list[int]) -> DataLoader:
        """The items `items` of ``split`` in that order, in batches of ``per_gpu_batchsize`` (outside the Trainer's
        loops: the preparation stage, ``mdpl.engine.preparation``)."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        workers = int(self.data.num_workers)
        return DataLoader(torch.utils.data.Subset(self.datasets[split], items),
                          batch_size=int(self.data.per_gpu_batchsize), shuffle=False, num_workers=workers,
                          collate_fn=self.collator, pin_memory=torch.cuda.is_available(), drop_last=False)

    def device_batch(self, batch: dict, device: torch.device, split: str, complete: bool = False) -> dict:
        """A batch of ``items_loader`` ready for the model on `device`: the split's table types (no
        ``simulate_missing``) and their dummies, or with `complete` every modality kept (type 0)."""
        from pytorch_lightning.utilities import move_data_to_device
        types = torch.zeros_like(batch["missing_type"]) if complete else self.batch_missing_types(batch, False, 0, split)
        batch = {**batch, "missing_type": types, "missing_type_host": tuple(types.tolist()),
                 "row_index_host": tuple(batch["row_index"].tolist()), "split": split}
        return self.on_after_batch_transfer(move_data_to_device(batch, device), 0)

    def skip_train_batches(self, batches: int) -> None:
        """The next train loader starts after its first ``batches`` batches (a mid-epoch resume)."""
        self._pending_skip_batches = int(batches)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @property
    def selection_split(self) -> str:
        """The split the validation loop reads (``selection_split``: ``val``, or ``test`` for a paper protocol)."""
        return self.data.selection_split

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.selection_split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ----------------------------------------------------------------------------- missing modality
    def dummy_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoding of "" as ([1, L] ids, [1, L] masks): the text-missing dummy (docs/methods.md §1.4)."""
        return self._dummy_ids.clone(), self._dummy_masks.clone()

    def missing_table(self, split: str, spec: MissingSpec | None = None) -> torch.Tensor:
        """Per-row missing table of ``split`` for ``spec`` (default: the split's configured spec), by row_index."""
        if spec is None:
            if split in self.datasets:
                return self.datasets[split].missing_table
            spec = self.specs[split]
        if split in self.datasets:
            n_rows = self.datasets[split].n_rows
        else:
            path = arrow_path(self.data_root, self.dataset_name, split)
            check_arrow_exists(path, self.data_root, self.dataset_name)
            n_rows = count_rows(path)
        return load_or_create_missing_table(self.table_root, arrow_path(self.data_root, self.dataset_name, split).stem,
                                            n_rows, spec, self.dataset_name, split)

    def set_missing_override(self, split: str, spec: MissingSpec | None) -> None:
        """Evaluate ``split`` under another missing spec (evaluation sweeps) without rebuilding loaders/workers:
        the batch types become ``missing_table(split, spec)[row_index]`` on device. ``spec=None`` removes it."""
        if spec is None:
            self._overrides.pop(split, None)
        else:
            self._overrides[split] = self.missing_table(split, spec)

    def batch_missing_types(self, batch: Mapping, training: bool, epoch: int, split: str | None = None) -> torch.Tensor:
        """The batch's missing types: the split's table type (or its override), ``simulate_missing`` when training."""
        types = batch["missing_type"]
        if split in self._overrides:
            rows = batch["row_index"]
            types = self._overrides[split].to(rows.device)[rows]
        if training and self.missing.simulate_missing:
            types = simulated_types(types, epoch, self.seed, batch["item_index"])
        return types

    def _current_split(self) -> str | None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        if getattr(trainer, "training", False):
            return "train"
        if getattr(trainer, "testing", False):
            return "test"
        if getattr(trainer, "validating", False) or getattr(trainer, "sanity_checking", False):
            return self.selection_split
        return None

    def _resolved_types(self, batch: Mapping) -> torch.Tensor:
        split = self._current_split()
        epoch = int(getattr(getattr(self, "trainer", None), "current_epoch", 0) or 0)
        return self.batch_missing_types(batch, split == "train", epoch, split)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Host side of docs/methods.md §1.4: the missing types (override / simulation), kept as a host tuple too."""
        types = self._resolved_types(batch)
        return {**batch, "missing_type": types, "missing_type_host": tuple(types.tolist()),
                "row_index_host": tuple(batch["row_index"].tolist()), "split": self._current_split()}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Device side of docs/methods.md §1.4: the dummies (and, for a batch that skipped the host hook, the missing
        types). A batch of cached uint8 pixels (``pixel_cache``) first becomes the decode path's float batch, bit for
        bit."""
        if batch["image"].dtype == torch.uint8 and self.pixel_stages is not None:
            batch = {**batch, "image": self.pixel_stages.batch_to_float(batch["image"], batch["image_sizes"])}
        if "missing_type_host" in batch:   # resolved on the host by on_before_batch_transfer
            return apply_missing(batch, batch["missing_type"], self._dummy_ids, self._dummy_masks,
                                 batch["missing_type_host"])
        return apply_missing(batch, self._resolved_types(batch), self._dummy_ids, self._dummy_masks)
