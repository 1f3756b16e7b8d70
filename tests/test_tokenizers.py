"""BERT WordPiece (ViLT) and CLIP BPE tokenizers (METHODS.md §1.6)."""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from mdpl.data.tokenizers import CLIP_EOT, CLIP_SOT, build_tokenizer

PAD, UNK, CLS, SEP = (VOCAB.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))


@pytest.fixture
def bert(bert_vocab_dir):
    return build_tokenizer({"backbone": "vilt", "tokenizer": str(bert_vocab_dir), "vocab_size": len(VOCAB),
                            "max_text_len": 12})


def test_bert_maps_words_to_vocab_ids(bert):
    ids, masks = bert.encode(["The MOVIE", "pizza xyzzy"])
    assert ids.dtype == torch.long and masks.dtype == torch.long and ids.shape == (2, 12) == masks.shape
    assert ids[0, :4].tolist() == [CLS, VOCAB.index("the"), VOCAB.index("movie"), SEP]
    assert ids[1, :4].tolist() == [CLS, VOCAB.index("pizza"), UNK, SEP]
    assert masks[0].tolist() == [1] * 4 + [0] * 8
    assert int(ids[0, 4:].abs().sum()) == 0 and bert.max_length == 12


def test_bert_empty_is_cls_sep_pad(bert):
    ids, masks = bert.empty()
    assert ids.tolist() == [[CLS, SEP] + [PAD] * 10] and masks.tolist() == [[1, 1] + [0] * 10]


def test_bert_truncation(bert):
    ids, masks = bert.encode([" ".join(["love"] * 50)])
    assert ids.shape == (1, 12) and ids[0, -1].item() == SEP and masks.sum().item() == 12


def test_bert_vocab_size_mismatch_raises(bert_vocab_dir):
    with pytest.raises(ValueError, match="vocab_size=30522"):
        build_tokenizer({"backbone": "vilt", "tokenizer": str(bert_vocab_dir), "vocab_size": 30522,
                         "max_text_len": 8})


def test_bert_vocab_file_path_and_missing_folder(bert_vocab_dir, tmp_path):
    tok = build_tokenizer({"tokenizer": str(bert_vocab_dir / "vocab.txt"), "vocab_size": len(VOCAB),
                           "max_text_len": 8})
    assert tok.encode(["cake"])[0][0, 1].item() == VOCAB.index("cake")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer({"tokenizer": str(tmp_path), "vocab_size": len(VOCAB), "max_text_len": 8})


def test_bert_default_offline_never_silently_wrong():
    """tokenizer='' uses the HF cache; offline transformers may return a tiny vocabulary: must be caught."""
    try:
        tok = build_tokenizer({"tokenizer": "", "vocab_size": 30522, "max_text_len": 8})
    except (ValueError, FileNotFoundError) as err:
        assert "tokenizer" in str(err)
    else:
        assert tok.vocab_size == 30522 and tok.empty()[0][0, :2].tolist() == [101, 102]


@pytest.fixture(scope="module")
def clip_tok():
    return build_tokenizer({"backbone": "clip", "vocab_size": 30522, "max_text_len": 40})


def test_clip_empty_and_known_ids(clip_tok):
    ids, masks = clip_tok.empty()
    assert ids.shape == (1, 77) and ids[0, :3].tolist() == [CLIP_SOT, CLIP_EOT, 0] and int(ids[0, 2:].sum()) == 0
    assert masks[0, :3].tolist() == [1, 1, 0] and int(masks.sum()) == 2
    ids, masks = clip_tok.encode(["A photo of a   CAT", "x"])
    assert ids[0, :7].tolist() == [CLIP_SOT, 320, 1125, 539, 320, 2368, CLIP_EOT]
    assert torch.equal(masks, (ids != 0).long()) and clip_tok.max_length == 77


def test_clip_long_text_cut_with_eot(clip_tok):
    ids, masks = clip_tok.encode(["word " * 200])
    assert ids.shape == (1, 77) and ids[0, 0].item() == CLIP_SOT and ids[0, -1].item() == CLIP_EOT
    assert int(masks.sum()) == 77
