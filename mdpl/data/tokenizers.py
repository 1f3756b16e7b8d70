"""Text tokenizers of the backbones (docs/methods.md §1.6), with a common batched interface.

``encode(texts) -> (ids, masks)`` (LongTensor[B, L] each, masks 1 = real token), ``empty()`` (the
encoding of "" as [1, L] tensors: the text-missing dummy of §1.4), ``max_length`` (= L).

* ViLT: BERT WordPiece (bert-base-uncased, lower case), padded to ``max_text_len`` with truncation.
  The vocabulary is read from the ``tokenizer`` key (a folder with vocab.txt, or the vocab.txt
  itself) or, if empty, from the local HuggingFace cache of bert-base-uncased (offline). Its size is
  always checked against ``vocab_size``: transformers 5 offline can silently return a
  5-token tokenizer, and ``BertTokenizerFast(vocab_file=...)`` ignores the file. The vocabulary must
  also know ordinary words: if "the", "a", "of", "and" and "is" all become [UNK] it is refused.
  ``max_text_len`` must leave room for [CLS] + one token + [SEP] (>= 3).
* CLIP: OpenAI byte-level BPE bundled with open_clip (offline): [SOT] + BPE + [EOT], zero-padded to
  77; longer texts cut to 77 with the last id forced to EOT; masks = ids != 0.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch

from mdpl.errors import UserInputError

from mdpl.data.settings import DataPipeline

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers are used in forked DataLoader workers

CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_SOT, CLIP_EOT = 49406, 49407
#: Very common English words: a usable (lower-case) vocabulary knows at least one of them.
COMMON_WORDS = ("the", "a", "of", "and", "is")
#: [CLS] + one token + [SEP].
MIN_TEXT_LEN = 3


class BertTextTokenizer:
    """BERT WordPiece for ViLT (docs/methods.md §1.6): ``padding='max_length'``, truncation, lower case."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.vocab_size = len(tokenizer)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode([""])


class ClipTextTokenizer:
    """OpenAI CLIP BPE via open_clip's bundled vocabulary (docs/methods.md §1.6); context 77."""

    def __init__(self, context_length: int = CLIP_CONTEXT_LENGTH) -> None:
        from open_clip.tokenizer import SimpleTokenizer  # heavy import, only when CLIP is used

        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.max_length = int(context_length)
        self.vocab_size = len(self.tokenizer.encoder)
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(f"open_clip BPE vocabulary has {self.vocab_size} tokens, expected {CLIP_VOCAB_SIZE}")

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.max_length).long()
        return ids, (ids != 0).long()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode([""])


def read_wordpiece_vocab(path: str | os.PathLike) -> dict[str, int]:
    """vocab.txt (one token per line, id = line number) -> {token: id}; UserInputError for a file that is not
    UTF-8 text (a damaged or binary file in the tokenizer folder)."""
    try:
        tokens = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserInputError(f"tokenizer vocabulary {path} is not UTF-8 text (byte {err.start}: {err.reason}); it is "
                             "damaged or not a vocab.txt: point tokenizer= at the folder of bert-base-uncased's "
                             "vocab.txt") from None
    vocab = {}
    for idx, tok in enumerate(tokens):
        vocab.setdefault(tok, idx)
    return vocab


def _load_bert(source: str):
    from transformers import BertTokenizerFast

    if source:
        path = Path(source)
        vocab_file = path / "vocab.txt" if path.is_dir() else path
        if not vocab_file.is_file():
            raise FileNotFoundError(f"tokenizer: no vocab.txt at {vocab_file}; set tokenizer=<folder with "
                                    "bert-base-uncased vocab.txt>")
        # vocab= (not vocab_file=, which transformers 5 ignores) builds the WordPiece model from the file.
        return BertTokenizerFast(vocab=read_wordpiece_vocab(vocab_file), do_lower_case=True)
    try:
        return BertTokenizerFast.from_pretrained("bert-base-uncased", local_files_only=True, do_lower_case=True)
    except Exception as err:
        raise FileNotFoundError("tokenizer='' but bert-base-uncased is not in the local HuggingFace cache; "
                                "set tokenizer=<folder with vocab.txt>") from err


def check_max_text_len(value: object) -> int:
    """``max_text_len`` as an int >= MIN_TEXT_LEN, else UserInputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_TEXT_LEN:
        raise UserInputError(f"max_text_len={value!r} is too short: a text needs [CLS] + at least one token + [SEP], "
                             f"so max_text_len must be an integer >= {MIN_TEXT_LEN} (e.g. max_text_len=40)")
    return int(value)


def check_vocabulary(tok, source: str) -> None:
    """Refuse a vocabulary that maps every one of ``COMMON_WORDS`` to [UNK] (or cannot encode at all)."""
    try:
        encoded = tok(list(COMMON_WORDS), add_special_tokens=False)["input_ids"]
    except Exception as err:  # e.g. the tokenizers library: "Missing [UNK] token from the vocabulary"
        raise UserInputError(f"tokenizer {source} cannot encode text ({err}); point tokenizer= at the folder of "
                             "bert-base-uncased's vocab.txt") from None
    unk = tok.unk_token_id
    if not any(ids and any(i != unk for i in ids) for ids in encoded):
        raise UserInputError(f"tokenizer {source} maps the common words {', '.join(COMMON_WORDS)} all to [UNK]: "
                             f"its {len(tok)}-token vocabulary has no ordinary words; point tokenizer= at the "
                             "folder of bert-base-uncased's vocab.txt")


def build_tokenizer(pipeline: DataPipeline) -> BertTextTokenizer | ClipTextTokenizer:
    """The tokenizer the run's backbone card names: 'bert' -> BERT WordPiece (the ``tokenizer`` folder) with the
    backbone's text length, checked against its vocabulary size; 'bpe' -> OpenAI BPE with its text length."""
    kind = pipeline.tokenizer
    if kind == "bpe":
        return ClipTextTokenizer(int(pipeline.text_length))
    if kind != "bert":
        raise ValueError(f"backbone {pipeline.backbone!r} names an unknown tokenizer {kind!r} (bert | bpe)")
    max_text_len = check_max_text_len(pipeline.text_length)
    source = pipeline.tokenizer_source
    tok = _load_bert(source)
    name = source or "bert-base-uncased (HF cache)"
    expected = int(pipeline.text_vocab_size)
    if len(tok) != expected:
        raise UserInputError(f"tokenizer {name} has {len(tok)} tokens but vocab_size={expected}; point tokenizer= "
                             "at the right vocab.txt folder (an offline transformers may silently load an empty "
                             "vocabulary)")
    check_vocabulary(tok, name)
    return BertTextTokenizer(tok, max_text_len)
