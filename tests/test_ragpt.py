"""RAGPT (docs/methods.md §17) beyond the reference parity of test_parity_ragpt.py: the spectral generator's real-pair
storage, the prompter's pooling bins, the neighbour lists by missing type, the label token and the inserted tokens,
config errors (CLIP, CoCa: one error line), and training + ``test_only`` through run.py on tiny synthetic data with
the preparation stage (a tiny random CLIP as the retriever, the ViLT memory bank in float16)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mdpl.errors import UserInputError
from mdpl.prompts import PromptContext
from mdpl.prompts.layout import IMAGE, TEXT
from mdpl.prompts.ragpt import ContextPrompter, SpectralGenerator
from runs import as_run, resolved_config, run_quiet, synthetic_arrows
from tiny_models import TYPES, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SQUARE = dict(image_size=64, patch_size=32, max_text_len=12)
"""ViLT at 12 text tokens and 64² images: 1 + 2² = 5 image tokens, fixed (tiny_batch's images are square)."""


def ragpt_model(**over):
    return tiny_model("ragpt", "vilt", **{**SQUARE, "dynamic_text_padding": False, **over})


def neighbours(model, b: int = 6, k: int = 2, seed: int = 4) -> dict:
    """Batch keys that carry the neighbours directly: text [B, k, 12, D], image [B, k, 5, D], labels [B, 3, C]."""
    g = torch.Generator().manual_seed(seed)
    width, classes = model.prompt.width, model.prompt.label_embedding.shape[0]
    labels = torch.nn.functional.one_hot(torch.randint(0, classes, (b, 3), generator=g), classes).float()
    return {"ragpt_text": torch.randn(b, k, 12, width, generator=g),
            "ragpt_image": torch.randn(b, k, 5, width, generator=g), "ragpt_labels": labels}


def test_generator_is_the_complex_filter_stored_as_real_pairs() -> None:
    """Re(IFFT(W ⊙ FFT(mean))) with W = weight[..., 0] + i weight[..., 1]; a real parameter (DDP, checkpoints)."""
    torch.manual_seed(0)
    gen = SpectralGenerator(7, 4, 0.0).eval()
    assert gen.weight.shape == (7, 4, 2) and not gen.weight.is_complex()
    x = torch.randn(3, 2, 7, 4)
    mean = x.mean(1)
    w = torch.complex(gen.weight[..., 0], gen.weight[..., 1])
    filtered = torch.fft.ifft(w * torch.fft.fft(mean, dim=1), dim=1).real
    want = gen.linear(gen.layer_norm(mean + filtered))
    torch.testing.assert_close(gen(x), want, atol=1e-6, rtol=1e-6)
    gen(x).sum().backward()
    assert gen.weight.grad.shape == (7, 4, 2) and gen.weight.grad.abs().sum() > 0


def test_prompter_pools_overlapping_bins() -> None:
    """L=128 -> P=6 rows: bins [0,22), [21,43), [42,64), [64,86), [85,107), [106,128) (AdaptiveAvgPool)."""
    torch.manual_seed(0)
    cap = ContextPrompter(8, 6)
    q, kv = torch.randn(1, 128, 8), torch.randn(1, 2, 5, 8)
    out = cap(q, kv)
    attn = (cap.q_proj(q) @ cap.k_proj(kv.flatten(1, 2)).transpose(1, 2) / 8 ** 0.5).softmax(-1)
    rows = attn @ cap.v_proj(kv.flatten(1, 2))
    bins = [(0, 22), (21, 43), (42, 64), (64, 86), (85, 107), (106, 128)]
    want = torch.stack([rows[0, a:b].mean(0) for a, b in bins])
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=1e-6)


def test_neighbour_lists_follow_the_missing_type() -> None:
    """Text missing: image-to-image for all; image missing: text-to-text for all; complete: text-to-text (text),
    image-to-image (image and labels)."""
    model = ragpt_model()
    i2i, t2t = torch.arange(12).view(6, 2), 100 + torch.arange(12).view(6, 2)
    model.prompt.bank = {"val/image": i2i, "val/text": t2t}
    items = torch.tensor([5, 0, 3, 2, 1, 4])
    text, image, labels = model.prompt.neighbour_lists(TYPES, "val", items)
    for row, (t, item) in enumerate(zip(TYPES.tolist(), items.tolist())):
        assert torch.equal(text[row], i2i[item] if t == 1 else t2t[item])
        assert torch.equal(image[row], t2t[item] if t == 2 else i2i[item])
        assert torch.equal(labels[row], image[row])


def test_replacement_insertion_and_label_readout() -> None:
    """Missing segments replaced by the generators (only those rows), the text mask of text-missing rows all ones,
    [label ; P text ; P image] in front from block ragpt_prompt_pos on, the label token pooled."""
    model = ragpt_model().eval()
    batch = {**tiny_batch("vilt"), **neighbours(model)}
    prepared = model.prompt.prepare_batch(TYPES, batch)
    labels = batch["ragpt_labels"]
    torch.testing.assert_close(prepared["label"], (labels @ model.prompt.label_embedding).mean(1))
    stream = model.backbone.info.stream("joint")
    x, mask, layout = model.backbone.embed_joint(batch["text_ids"], batch["text_masks"], batch["image"])
    ctx = PromptContext(TYPES, prepared)
    x0, mask0, layout0 = model.prompt.before_block(stream, 0, x, mask, layout, ctx)
    assert layout0 == layout            # ragpt_prompt_pos = 1: nothing inserted before block 0
    text, image = layout.span(TEXT), layout.span(IMAGE)
    gen_t = model.prompt.generators[TEXT](batch["ragpt_text"])
    torch.testing.assert_close(x0[TYPES == 1][:, text], gen_t[TYPES == 1])
    torch.testing.assert_close(x0[TYPES != 1][:, text], x[TYPES != 1][:, text])
    torch.testing.assert_close(x0[TYPES != 2][:, image], x[TYPES != 2][:, image])
    assert bool(mask0[TYPES == 1][:, text].all()) and not bool(mask[TYPES == 1][:, text].all())
    x1, mask1, layout1 = model.prompt.before_block(stream, 1, x0, mask0, layout0, ctx)
    assert layout1.offset("ragpt.label") == 0 and x1.shape[1] == x0.shape[1] + 1 + 2 * 2
    torch.testing.assert_close(x1[:, 0], prepared["label"])
    assert bool(mask1[:, :5].all())
    with torch.no_grad():
        logits = model(batch)["logits"]
    assert logits.shape == (6, 101) and torch.isfinite(logits).all()


def test_config_errors_are_one_line() -> None:
    for backbone in ("clip", "coca"):
        with pytest.raises(UserInputError, match="joint text-image stream") as err:
            tiny_model("ragpt", backbone)
        assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="ragpt_prompt_pos"):
        ragpt_model(ragpt_prompt_pos=5)
    with pytest.raises(UserInputError, match="ragpt_generators"):
        ragpt_model(ragpt_generators=["audio"])
    model = ragpt_model(dynamic_text_padding=True)
    with pytest.raises(UserInputError, match="neighbour lists"):
        model(tiny_batch("vilt"))
    need = model.prompt.preparation_needs()
    assert need.missing == "complete" and need.retrieval[0].weights == "" and need.retrieval[0].k == 3


def retriever_file(path: Path, sizes: dict) -> Path:
    """A random tiny CLIP in the OpenAI state-dict layout (the retriever's local weight file)."""
    from mdpl.backbones.clip import build_clip_backbone
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(build_clip_backbone(as_run({**sizes, "clip_path": "", "dataset": "hatememes"}, "clip"))
                   .openai_state_dict(), path)
    return path


def test_trains_with_preparation_and_test_only_reproduces(tmp_path) -> None:
    data = synthetic_arrows(tmp_path, "hatememes", 24, 8, 8)
    clip = {"clip_embed_dim": 16, "image_size": 32, "clip_patch_size": 16, "clip_vision_width": 32,
            "clip_vision_layers": 1, "clip_vision_head_width": 16, "clip_text_width": 32, "clip_text_heads": 2,
            "clip_text_layers": 1}
    weights = retriever_file(tmp_path / "clip.pt", clip)
    config = resolved_config(["task_finetune_hatememes", "ragpt", "tiny"], {
        "data_root": str(data["arrow"]), "tokenizer": str(data["tok"]), "vocab_size": data["vocab_size"],
        "log_dir": str(tmp_path / "result"), "max_epoch": 1, "logger": "csv", "per_gpu_batchsize": 8, "batch_size": 8,
        "val_check_interval": 1.0, "vilt_variant": "hf", "drop_rate": 0.0,
        **{k: v for k, v in clip.items() if k != "image_size"}, "ragpt_retriever_path": str(weights)})
    assert config["dynamic_text_padding"] is False and config["image_transform"] == "square"
    assert config["ragpt_label_neighbours"] == 3      # tiny (the reference: 5 on Hateful Memes, 19 elsewhere)
    out = run_quiet(config)
    metrics = json.loads((Path(out["run_dir"]) / "test_metrics.json").read_text())["metrics"]
    assert metrics == out["test"] and "hatememes/test/AUROC" in metrics
    artefacts = sorted((Path(data["arrow"]) / "prepared").glob("hatememes-*.pt"))
    assert len(artefacts) == 1
    stored = torch.load(artefacts[0], map_location="cpu", weights_only=True)
    bank = stored["features"]["ragpt_memory_text"]
    assert bank.dtype == torch.float16 and bank.shape[:2] == (24, 1)
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for modality in (IMAGE, TEXT):
            indices = stored["retrieved"]["ragpt_retrieval"][split][modality]["indices"]
            assert indices.shape == (n, 3) and int(indices.max()) < 24
    train = stored["retrieved"]["ragpt_retrieval"]["train"][IMAGE]["indices"]
    assert not bool((train == torch.arange(24).unsqueeze(1)).any())      # no training item is its own neighbour
    state = torch.load(out["best_model_path"], map_location="cpu", weights_only=False)["state_dict"]
    assert "model.prompt.generators.text.weight" in state and "model.prompt.label_embedding" in state
    assert not any("bank" in k for k in state)
    again = run_quiet({**config, "test_only": True, "load_path": out["best_model_path"],
                       "log_dir": str(tmp_path / "test_only")})
    for key, value in metrics.items():
        assert abs(again["test"][key] - value) <= 1e-6, key
