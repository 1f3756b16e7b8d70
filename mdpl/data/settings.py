"""The data layer's typed settings: the data and missing sections of a run config, and the backbone-side facts the
pipeline needs (``DataPipeline``: the card's image transform and tokenizer at the run's sizes).

``mdpl.config.RunConfig`` assembles them (``run.data``, ``run.missing``, ``run.pipeline``); the data layer reads
nothing else of the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mdpl.section import Section, per_split

SELECTION_SPLITS = ("val", "test")
"""``selection_split``: the split the validation loop evaluates (logged as ``val/...``; checkpoint selection and early
stopping follow it). ``test`` reproduces references that select on the test split (a paper protocol only)."""


@dataclass(frozen=True)
class DataConfig(Section):
    """The dataset, its loaders and the text/image pipeline options."""

    TITLE = "data"
    dataset: str = "mmimdb"
    data_root: str = ""
    num_workers: int = 8
    batch_size: int = 256
    per_gpu_batchsize: int = 4
    dynamic_text_padding: bool = False   # default: on where the method's outputs do not depend on padding
    tokenizer: str = ""
    mmimdb_items: str = "plot"
    pixel_cache: Any = ""
    image_transform: str = ""            # "" = the backbone card's transform; else a name in TRANSFORMS ("square")
    selection_split: str = "val"         # the split the validation loop reads (SELECTION_SPLITS)


@dataclass(frozen=True)
class MissingConfig(Section):
    """Missing modalities (docs/methods.md §1.4) and the evaluation sweep."""

    TITLE = "missing"
    missing_ratio: dict = per_split(0.7)
    missing_type: dict = per_split("both")   # default: the method's reference setting
    both_ratio: float = 0.5
    missing_table_root: str = ""
    reference_missing_tables: dict = per_split("")
    simulate_missing: bool = False
    test_ratio: Any = None
    test_type: Any = None
    test_types: Any = None
    test_ratios: Any = None


@dataclass(frozen=True)
class DataPipeline:
    """How samples become tensors for the run's backbone: its card's ids at the run's sizes."""

    backbone: str                 # the card's name (error messages)
    transform: str                # image transform id: 'pixelbert' | 'clip' (mdpl.data.transforms.TRANSFORMS)
    image_size: int
    tokenizer: str                # 'bert' (WordPiece, checked against text_vocab_size) | 'bpe' (OpenAI BPE)
    tokenizer_source: str         # the WordPiece folder or vocab.txt ('' = the Hugging Face cache)
    text_length: int              # ids per text, padded
    text_vocab_size: int
    dynamic_text_padding: bool    # the run asks for it and the encoder accepts it
