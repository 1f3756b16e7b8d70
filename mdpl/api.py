"""Python API (notebooks, scripts): load a trained mdpl checkpoint and classify image + text pairs.

    from PIL import Image
    from mdpl.api import load_model

    predictor = load_model("result/<run>/checkpoints/last.ckpt", tokenizer="<folder with vocab.txt>")
    out = predictor.predict([Image.open("poster.jpg"), None], ["A young man finds ...", None])
    out.top(3)            # per sample: the 3 most probable (class, probability) pairs

`load_model` rebuilds the classifier from the config stored in the checkpoint and loads every weight from the
checkpoint: the pre-training files of that config (``load_path``, ``clip_path``) and the data folder are never
read. ViLT needs the BERT vocabulary of the run (the stored ``tokenizer`` folder, or ``tokenizer=``); CLIP uses
open_clip's bundled BPE vocabulary.

Missing modalities: ``None`` in place of an image or a text gives the sample the dummy of that modality and its
missing type (1 = text missing, 2 = image missing), as in training (an all-ones image, the encoding of ""). A
missing image has no size of its own: its dummy is ``image_size`` x ``image_size`` pixels. ``missing=`` sets the
types explicitly (the given modality is then replaced by its dummy, as the data module does for a missing row).
The model runs in float32, in eval mode.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mdpl.config.run_config import RunConfig
from mdpl.data.constants import MISSING_COMPLETE, MISSING_IMAGE, MISSING_TEXT
from mdpl.data.registry import dataset_spec
from mdpl.errors import UserInputError

#: Accepted spellings of the missing types in ``Predictor.predict(missing=...)``.
MISSING_NAMES = {"complete": MISSING_COMPLETE, "none": MISSING_COMPLETE, "text": MISSING_TEXT,
                 "image": MISSING_IMAGE}


@dataclass
class Predictions:
    """Outputs for B samples over C classes (float32, on the CPU).

    ``probabilities``: sigmoid per class for MM-IMDb (multi-label), softmax over the classes otherwise.
    ``classes``: the C class names, or the class indices where the names are not known (Food-101).
    """

    logits: Tensor
    probabilities: Tensor
    classes: list
    missing_type: Tensor
    multi_label: bool

    def top(self, k: int = 1) -> list[list[tuple[Any, float]]]:
        """Per sample, the ``k`` most probable classes as (class, probability), most probable first."""
        k = min(int(k), self.probabilities.shape[1])
        values, indices = self.probabilities.topk(k, dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs.tolist(), idx.tolist())]
                for vs, idx in zip(values, indices)]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The mdpl checkpoint at `path` (a .ckpt of a training run), or UserInputError (one line)."""
    from mdpl.engine.module import is_mdpl_checkpoint

    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"checkpoint {str(path)!r} {what}; pass the .ckpt written by a training run "
                             f"(<run_dir>/checkpoints/best-*.ckpt or last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint the user gives
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise UserInputError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from None
    if not is_mdpl_checkpoint(checkpoint):
        raise UserInputError(f"checkpoint {str(path)!r} was not written by an mdpl training run (no state_dict with "
                             f"hyper_parameters.config); load_model needs the .ckpt of an mdpl run")
    return checkpoint


def build_text_tokenizer(config: RunConfig | Mapping):
    """The run's text tokenizer (its backbone card's: BERT WordPiece from the ``tokenizer`` folder, or open_clip's BPE).

    A BERT vocabulary that cannot be found is a UserInputError naming ``tokenizer=``.
    """
    from mdpl.data.tokenizers import build_tokenizer

    run = RunConfig.coerce(config)
    try:
        return build_tokenizer(run.pipeline)
    except FileNotFoundError as err:
        source = str(run.data.tokenizer or "")
        where = f"the tokenizer folder {source!r} stored in the checkpoint has no vocab.txt" if source else \
            "the checkpoint names no tokenizer folder and bert-base-uncased is not in the local HuggingFace cache"
        raise UserInputError(f"{where}; pass load_model(..., tokenizer=<folder with the run's BERT vocab.txt>) "
                             f"({err})") from None


class Predictor:
    """A trained classifier with its tokenizer, image transform and missing-modality dummies (see the module doc).

    ``model`` is the classifier (``MDPLModule.model``), ``config`` the run's config, ``tokenizer`` as from
    :func:`build_text_tokenizer`; ``class_names`` (C names) replaces the known names / indices.
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig | Mapping, tokenizer,
                 device: str | torch.device = "cpu", class_names: Sequence[str] | None = None) -> None:
        from mdpl.data.collate import Collator
        from mdpl.data.transforms import build_transform

        self.config = RunConfig.coerce(config)
        self.dataset = self.config.data.dataset
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.transform = build_transform(self.config.pipeline)
        self.collator = Collator(tokenizer, dynamic_text_padding=self.config.pipeline.dynamic_text_padding)
        self.dummy_ids, self.dummy_masks = tokenizer.empty()
        self.spec = dataset_spec(self.dataset)
        self.classes = self._class_names(class_names)
        self.multi_label = self.spec.multi_label

    def _class_names(self, class_names: Sequence[str] | None) -> list:
        """``class_names``, else the spec's names (docs/methods.md §1.1), else the class indices (Food-101, whose
        names depend on the raw data's class_idx: pass ``class_names=``)."""
        n_classes = self.spec.num_classes
        names = class_names if class_names is not None else (self.spec.class_names or range(n_classes))
        if len(names) != n_classes:
            raise UserInputError(f"class_names has {len(names)} names but {self.dataset} has {n_classes} classes")
        return list(names)

    # ------------------------------------------------------------------------------------------ batches
    @torch.inference_mode()
    def predict_batch(self, batch: Mapping) -> Predictions:
        """Predictions for a collated batch as the data module gives it to the model (dummies applied)."""
        on_device = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        logits = self.model(on_device)["logits"].float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        missing = on_device.get("missing_type")
        missing = torch.zeros(logits.shape[0], dtype=torch.long) if missing is None else missing.long()
        return Predictions(logits.cpu(), probs.cpu(), list(self.classes), missing.cpu(), self.multi_label)

    def collate(self, images: Sequence, texts: Sequence, missing: Sequence | None = None) -> dict:
        """The batch `predict` feeds to the model: transformed, tokenised, collated, dummies applied."""
        from mdpl.data.missing import apply_missing

        types = self._missing_types(images, texts, missing)
        side = int(self.config.backbone.image_size)
        label = torch.zeros(self.spec.num_classes) if self.multi_label else 0
        items = [{"image": self.transform(self._image(img, i) if img is not None else Image.new("RGB", (side, side))),
                  "text": "" if text is None else text, "label": label, "missing_type": t,
                  "row_index": i, "item_index": i}
                 for i, (img, text, t) in enumerate(zip(images, texts, types))]
        batch = self.collator(items)
        return apply_missing(batch, batch["missing_type"], self.dummy_ids, self.dummy_masks)

    def predict(self, images: Sequence, texts: Sequence, missing: Sequence | None = None,
                batch_size: int = 32) -> Predictions:
        """Predictions for raw pairs: ``images`` (PIL images or image file paths, None = missing) and ``texts``
        (str, None = missing), one of each per sample; ``missing`` optionally gives each sample's type
        (0 / 'complete', 1 / 'text', 2 / 'image'). Runs in chunks of ``batch_size`` samples."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not isinstance(images, Sequence):
            raise UserInputError("predict takes a list of images and a list of texts, one per sample (None for a "
                                 "missing modality), e.g. predict([image], ['a text'])")
        if len(images) != len(texts) or len(images) == 0:
            raise UserInputError(f"predict needs as many images as texts (at least one): got {len(images)} images "
                                 f"and {len(texts)} texts")
        if missing is not None and len(missing) != len(images):
            raise UserInputError(f"missing has {len(missing)} entries for {len(images)} samples")
        parts = []
        for start in range(0, len(images), max(1, int(batch_size))):
            stop = start + max(1, int(batch_size))
            chunk_missing = None if missing is None else list(missing)[start:stop]
            parts.append(self.predict_batch(self.collate(list(images)[start:stop], list(texts)[start:stop],
                                                         chunk_missing)))
        return Predictions(torch.cat([p.logits for p in parts]), torch.cat([p.probabilities for p in parts]),
                           list(self.classes), torch.cat([p.missing_type for p in parts]), self.multi_label)

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _image(image, index: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as img:
                    return img.convert("RGB")
            except OSError as err:
                raise UserInputError(f"sample {index}: cannot read image {str(image)!r} ({err})") from None
        raise UserInputError(f"sample {index}: image must be a PIL image, a file path or None, got "
                             f"{type(image).__name__}")

    @staticmethod
    def _missing_types(images: Sequence, texts: Sequence, missing: Sequence | None) -> list[int]:
        types = []
        for i, (image, text) in enumerate(zip(images, texts)):
            if text is not None and not isinstance(text, str):
                raise UserInputError(f"sample {i}: text must be a str or None, got {type(text).__name__}")
            if image is None and text is None:
                raise UserInputError(f"sample {i} has neither an image nor a text")
            inferred = MISSING_IMAGE if image is None else MISSING_TEXT if text is None else MISSING_COMPLETE
            given = inferred if missing is None or missing[i] is None else missing[i]
            code = MISSING_NAMES.get(given) if isinstance(given, str) else given
            if code not in (MISSING_COMPLETE, MISSING_TEXT, MISSING_IMAGE) or isinstance(code, bool):
                raise UserInputError(f"sample {i}: missing type {given!r} is not one of 0 / 'complete', 1 / 'text', "
                                     f"2 / 'image'")
            if inferred != MISSING_COMPLETE and code != inferred:
                absent = "image" if image is None else "text"
                raise UserInputError(f"sample {i} has no {absent} but missing={given!r}; give the {absent} or "
                                     f"leave its missing type unset")
            types.append(int(code))
        return types


def load_model(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu",
               tokenizer: str | os.PathLike | None = None, class_names: Sequence[str] | None = None) -> Predictor:
    """A :class:`Predictor` for the mdpl checkpoint at `checkpoint_path` (see the module doc).

    The classifier is rebuilt from the checkpoint's stored config and every weight is loaded from the checkpoint
    (strictly); ``load_path`` / ``clip_path`` of that config are not opened. ``tokenizer`` replaces the stored
    BERT vocabulary folder (ViLT). Mistakes raise :class:`~mdpl.errors.UserInputError` (one line).
    """
    from mdpl.config import stored_run_config
    from mdpl.engine.module import MDPLModule, load_for_test

    checkpoint = read_checkpoint(checkpoint_path)
    config = stored_run_config(checkpoint)   # the flat config of any mdpl version, typed
    if tokenizer is not None:
        config = config.replace(tokenizer=str(tokenizer))
    text_tokenizer = build_text_tokenizer(config)   # before the model: a missing vocabulary fails fast
    module = MDPLModule(config, weights_from_checkpoint=True)
    load_for_test(module, checkpoint)
    module.model.merge_adapters()   # a method's weight adapters folded into the weights: the plain block loop
    return Predictor(module.model, config, text_tokenizer, device=device, class_names=class_names)


def export_merged(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the mdpl checkpoint at `checkpoint_path` with its method's weight adapters merged into the frozen
    weights (``PromptedClassifier.merge_adapters``) to `out_path`, for evaluation (``test_only``, ``load_model``):
    it loads without any adapter code. Config and training counters are kept; optimizer and scheduler states are
    not (it cannot resume training). A checkpoint without adapters is written unchanged in its weights."""
    from mdpl.engine.module import MDPLModule, load_for_test, to_plain

    checkpoint = read_checkpoint(checkpoint_path)
    module = MDPLModule(to_plain(checkpoint["hyper_parameters"]["config"]), weights_from_checkpoint=True)
    load_for_test(module, checkpoint)
    module.model.merge_adapters()
    kept = {k: v for k, v in checkpoint.items()
            if k in ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name")}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**kept, "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}, out)
    return out
