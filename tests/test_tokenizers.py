"""BERT WordPiece (ViLT) and CLIP BPE tokenizers (docs/methods.md §1.6)."""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from mdpl.data.synthetic import write_wordpiece_vocab
from mdpl.data.tokenizers import CLIP_EOT, CLIP_SOT, build_tokenizer
from mdpl.errors import UserInputError
from runs import typed

PAD, UNK, CLS, SEP = (VOCAB.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))


@pytest.fixture
def bert(bert_vocab_dir):
    return build_tokenizer(typed({"backbone": "vilt", "tokenizer": str(bert_vocab_dir), "vocab_size": len(VOCAB),
                            "max_text_len": 12}).pipeline)


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
        build_tokenizer(typed({"backbone": "vilt", "tokenizer": str(bert_vocab_dir), "vocab_size": 30522,
                         "max_text_len": 8}).pipeline)


def test_bert_vocab_file_path_and_missing_folder(bert_vocab_dir, tmp_path):
    tok = build_tokenizer(typed({"tokenizer": str(bert_vocab_dir / "vocab.txt"), "vocab_size": len(VOCAB),
                           "max_text_len": 8}).pipeline)
    assert tok.encode(["cake"])[0][0, 1].item() == VOCAB.index("cake")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer(typed({"tokenizer": str(tmp_path), "vocab_size": len(VOCAB), "max_text_len": 8}).pipeline)


def test_bert_default_offline_never_silently_wrong():
    """tokenizer='' uses the HF cache; offline transformers may return a tiny vocabulary: must be caught."""
    try:
        tok = build_tokenizer(typed({"tokenizer": "", "vocab_size": 30522, "max_text_len": 8}).pipeline)
    except (ValueError, FileNotFoundError) as err:
        assert "tokenizer" in str(err)
    else:
        assert tok.vocab_size == 30522 and tok.empty()[0][0, :2].tolist() == [101, 102]


@pytest.fixture(scope="module")
def clip_tok():
    return build_tokenizer(typed({"backbone": "clip", "vocab_size": 30522, "max_text_len": 40}).pipeline)


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


# ------------------------------------------------------------------------------------- bad vocabularies
def _vocab_dir(tmp_path, tokens: list[str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tmp_path


def _bert_config(folder, n_tokens: int, max_text_len: int = 8) -> dict:
    return {"backbone": "vilt", "tokenizer": str(folder), "vocab_size": n_tokens, "max_text_len": max_text_len}


def test_vocabulary_needs_one_common_word(tmp_path):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    with pytest.raises(UserInputError) as err:
        build_tokenizer(typed(_bert_config(_vocab_dir(tmp_path / "specials", specials), len(specials))).pipeline)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "specials") in msg and "the, a, of, and, is all to [UNK]" in msg
    assert "5-token vocabulary" in msg and "tokenizer=" in msg
    # one known common word is enough, and the synthetic test vocabulary passes
    tok = build_tokenizer(typed(_bert_config(_vocab_dir(tmp_path / "is", specials + ["is"]), len(specials) + 1)).pipeline)
    assert tok.encode(["is the"])[0][0, :4].tolist() == [2, 5, 1, 3]
    vocab = write_wordpiece_vocab(tmp_path / "synthetic" / "vocab.txt")
    tok = build_tokenizer(typed(_bert_config(vocab.parent, len(vocab.read_text().split()))).pipeline)
    assert tok.encode(["the"])[0][0, 1].item() != 1


def test_vocabulary_without_unk_token_is_refused(tmp_path):
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "pizza"]   # transformers appends the absent [UNK]: 6 tokens
    with pytest.raises(UserInputError, match=r"cannot encode text .*\[UNK\]"):
        build_tokenizer(typed(_bert_config(_vocab_dir(tmp_path, tokens), len(tokens) + 1)).pipeline)


def test_max_text_len_below_three_is_refused(bert_vocab_dir):
    for max_text_len in (0, 2, -5):
        with pytest.raises(UserInputError) as err:
            build_tokenizer(typed(_bert_config(bert_vocab_dir, len(VOCAB), max_text_len)).pipeline)
        msg = str(err.value)
        assert f"max_text_len={max_text_len} is too short" in msg and ">= 3" in msg and "[CLS]" in msg
    tok = build_tokenizer(typed(_bert_config(bert_vocab_dir, len(VOCAB), 3)).pipeline)   # [CLS] + one token + [SEP]
    assert tok.encode(["pizza cake"])[0].tolist() == [[CLS, VOCAB.index("pizza"), SEP]]


def test_vocab_size_mismatch_is_a_user_error(bert_vocab_dir):
    with pytest.raises(UserInputError, match=f"has {len(VOCAB)} tokens but vocab_size=99"):
        build_tokenizer(typed(_bert_config(bert_vocab_dir, 99)).pipeline)
