"""RAGPT's reference-protocol switches (docs/methods.md §17.6): the retrieval memory and self-exclusion (RAGPT-D2,
``ragpt_memory`` / ``ragpt_self_exclusion``) against a plain transcription of the reference's list filter, and the
reference's retriever text features (RAGPT-D6, ``ragpt_retriever_text``) against open_clip's own blocks."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mdpl.engine.retrieval import excluded_rows
from mdpl.engine.topk import exact_topk
from mdpl.errors import UserInputError
from mdpl.prompts.layout import IMAGE, TEXT
from runs import as_run, resolved_config, run_quiet, synthetic_arrows
from test_ragpt import ragpt_model, retriever_file

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"train": 7, "val": 3, "test": 4}
K = 4


def reference_lists(queries: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's filter, transcribed: the top k + 1 memory rows by cosine similarity, the row at the query's
    own position (if the memory has one) dropped wherever it appears, the first k kept."""
    sims = torch.nn.functional.cosine_similarity(queries.unsqueeze(1), memory.unsqueeze(0), dim=-1)
    top = sims.topk(k + 1, dim=1).indices
    out = []
    for p, row in enumerate(top.tolist()):
        own = p if p < memory.shape[0] else None
        out.append([i for i in row if i != own][:k])
    return torch.tensor(out)


def features(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(n, 6, generator=g) for s, n in SIZES.items()}


@pytest.mark.parametrize("memory", [("train",), ("train", "val")])
def test_position_exclusion_is_the_reference_filter(memory) -> None:
    feats = features()
    bank = torch.cat([feats[s] for s in memory])
    for split in SIZES:
        exclude = excluded_rows(split, SIZES[split], SIZES, memory, "position")
        ours = exact_topk(feats[split], bank, K, exclude=exclude)[0]
        assert torch.equal(ours, reference_lists(feats[split], bank, K)), split


def test_validation_queries_find_themselves_only_by_position() -> None:
    """Memory = train + val: by position a validation item's first neighbour is itself (memory row 7 + q) and it
    loses memory row q; by index it never returns itself, and test queries keep every row."""
    feats, memory = features(), ("train", "val")
    bank = torch.cat([feats[s] for s in memory])
    own = SIZES["train"] + torch.arange(SIZES["val"])
    by_position = exact_topk(feats["val"], bank, K, exclude=excluded_rows("val", 3, SIZES, memory, "position"))[0]
    assert torch.equal(by_position[:, 0], own)
    assert not (by_position == torch.arange(3).unsqueeze(1)).any()
    by_index = exact_topk(feats["val"], bank, K, exclude=excluded_rows("val", 3, SIZES, memory, "index"))[0]
    assert not (by_index == own.unsqueeze(1)).any()
    assert excluded_rows("test", 4, SIZES, memory, "index") is None
    assert excluded_rows("train", 7, SIZES, ("train",), "index").tolist() == list(range(7))
    assert excluded_rows("test", 12, SIZES, ("train",), "position").tolist() == list(range(7)) + [-1] * 5


TINY_CLIP = {"clip_embed_dim": 16, "image_size": 32, "clip_patch_size": 16, "clip_vision_width": 32,
             "clip_vision_layers": 1, "clip_vision_head_width": 16, "clip_text_width": 32, "clip_text_heads": 2,
             "clip_text_layers": 2}


def tiny_clip():
    from mdpl.backbones.clip import build_clip_backbone
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_clip_backbone(as_run({**TINY_CLIP, "clip_path": "", "dataset": "hatememes"}, "clip")).eval()


def test_unordered_text_feature_is_the_reference_encoding() -> None:
    """Position embedding 1 for every token, no causal mask, the real tokens only: open_clip's own blocks on the
    unpadded sequence give the same vector; order of the inner tokens and padding do not matter."""
    clip = tiny_clip()
    tower = clip.text_encoder
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :6] = torch.tensor([49406, 320, 1125, 539, 4558, 49407])
    ids[1, :6] = torch.tensor([49406, 539, 320, 4558, 1125, 49407])     # the inner tokens permuted
    with torch.no_grad():
        ours = clip.text_feature({"text_ids": ids}, "unordered")
        x = tower.token_embedding(ids[:1, :6]) + tower.positional_embedding[1]
        for block in tower.transformer.resblocks:      # open_clip's block: no mask = every token attends to all
            x = block(x.transpose(0, 1)).transpose(0, 1) if not tower.transformer.batch_first else block(x)
        expected = tower.ln_final(x[:, -1]) @ tower.text_projection
        standard = tower(ids)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], ours[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(standard[0], standard[1], atol=1e-3)
    assert not torch.allclose(ours[0], standard[0], atol=1e-3)


def test_switch_values_are_checked() -> None:
    for key in ("ragpt_memory", "ragpt_self_exclusion", "ragpt_retriever_text"):
        with pytest.raises(UserInputError, match=key) as err:
            ragpt_model(**{key: "val"})
        assert "\n" not in str(err.value)
    need = ragpt_model(ragpt_memory="train_val", ragpt_self_exclusion="position",
                       ragpt_retriever_text="reference").prompt.preparation_needs()
    req = need.retrieval[0]
    assert need.splits == req.memory == ("train", "val")
    assert (req.self_exclusion, req.text_features) == ("position", "unordered")
    default = ragpt_model().prompt.preparation_needs()
    assert "splits" not in default.as_dict() and "memory" not in default.as_dict()["retrieval"][0]


def test_reference_memory_through_the_preparation_stage(tmp_path) -> None:
    """``ragpt_memory=train_val ragpt_self_exclusion=position``: the bank holds the 12 training then the 4
    validation items (their labels too), validation items retrieve themselves (row 12 + q) with the image retriever,
    and the default memory's artefact is another file of 12 rows."""
    from mdpl.config import RunConfig
    from mdpl.engine.preparation import run_preparation
    from mdpl.engine.session import build_datamodule
    from mdpl.models import build_classifier

    data = synthetic_arrows(tmp_path, "hatememes", 12, 4, 4)
    weights = retriever_file(tmp_path / "clip.pt", {**TINY_CLIP, "clip_text_layers": 1})
    base = resolved_config(["task_finetune_hatememes", "ragpt", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "log_dir": str(tmp_path / "result"), "vilt_variant": "hf", "drop_rate": 0.0,
        **{k: v for k, v in TINY_CLIP.items() if k != "image_size"}, "clip_text_layers": 1,
        "ragpt_retriever_path": str(weights)})
    stored = {}
    for memory, exclusion in (("train_val", "position"), ("train", "index")):
        run = RunConfig.coerce({**base, "ragpt_memory": memory, "ragpt_self_exclusion": exclusion})
        torch.manual_seed(0)
        model = build_classifier(run)
        artifact = run_preparation(run, model, build_datamodule(run), progress=False)
        stored[memory] = (artifact, model.prompt.bank)
    artifact, bank = stored["train_val"]
    assert bank[TEXT].shape[0] == bank[IMAGE].shape[0] == bank["labels"].shape[0] == 16
    own = artifact.retrieved["ragpt_retrieval"]["val"][IMAGE][0]
    assert torch.equal(own[:, 0], 12 + torch.arange(4))
    train = artifact.retrieved["ragpt_retrieval"]["train"][IMAGE][0]
    assert not (train == torch.arange(12).unsqueeze(1)).any()
    default, default_bank = stored["train"]
    assert default.key != artifact.key and default_bank[TEXT].shape[0] == 12
    torch.testing.assert_close(bank[TEXT][:12].float(), default_bank[TEXT].float())
    assert int(default.retrieved["ragpt_retrieval"]["val"][IMAGE][0].max()) < 12


def test_a_random_retriever_on_a_pretrained_backbone_is_refused(tmp_path) -> None:
    """An empty ``ragpt_retriever_path`` is a random retriever: allowed on a random backbone (tests), refused in one
    line as soon as the backbone has pre-trained weights (the neighbours would be random, the numbers wrong)."""
    from mdpl.config import RunConfig
    from mdpl.engine.retrieval import retriever_run
    from mdpl.errors import UserInputError
    from mdpl.prompts.preparation import RetrievalRequest

    request = RetrievalRequest("r", backbone="clip", weights="", image_size=32, k=2, weights_key="ragpt_retriever_path")
    base = resolved_config(["task_finetune_hatememes", "ragpt", "tiny"], {})
    assert retriever_run(RunConfig.coerce(base), request).backbone is not None
    with pytest.raises(UserInputError) as err:
        retriever_run(RunConfig.coerce({**base, "load_path": str(tmp_path / "vilt.ckpt")}), request)
    assert str(err.value).startswith("ragpt_retriever_path is empty: the clip retriever would be random")
    assert "\n" not in str(err.value)
