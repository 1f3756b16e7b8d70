"""mdpl.api (load_model / Predictor) and MDPLModule.load_from_checkpoint on trained tiny runs, CPU.

For MAP on ViLT and DCP on CLIP: a 1-epoch run on synthetic Food-101 whose backbone was read from a pre-training
file in a temporary folder; that file and the data folder are then deleted. `load_model` and
`MDPLModule.load_from_checkpoint` must rebuild the classifier from the checkpoint alone and give the trained
classifier's logits exactly on a validation batch holding all three missing types; `predict` on raw (PIL image,
str) pairs, with None for a missing modality, must give the logits of that batch as the data module builds it.
"""
from __future__ import annotations

from runs import as_run, datamodule_of, typed

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mdpl.api import Predictor, load_model
from mdpl.data.constants import MISSING_COMPLETE, MISSING_IMAGE, MISSING_TEXT, MMIMDB_GENRES
from mdpl.engine.module import MDPLModule
from mdpl.errors import UserInputError
from runs import resolved_config, run_quiet

pytestmark = pytest.mark.usefixtures("one_thread")

HALF_MISSING = {"train": 0.5, "val": 0.5, "test": 0.5}


def write_pretraining_file(cfg: dict, path: Path) -> None:
    """A random tiny backbone in the file layout the run reads: ViLT {'state_dict'} / CLIP OpenAI state dict."""
    torch.manual_seed(123)
    if cfg["backbone"] == "vilt":
        from mdpl.backbones.vilt import ViLTBackbone
        torch.save({"state_dict": ViLTBackbone.from_config(cfg).state_dict()}, path)
    else:
        from mdpl.backbones.clip import build_clip_backbone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(build_clip_backbone(as_run({**cfg, "clip_path": ""}, "clip")).openai_state_dict(), path)


@pytest.fixture(scope="module", params=["map", "dcp"])
def trained(request, tmp_path_factory) -> dict:
    """A finished run of `method` (map: ViLT, dcp: CLIP), its val batch, raw pairs and the trained logits.

    Afterwards the pre-training file and the data folder no longer exist."""
    from mdpl.data.datamodule import MDPLDataModule
    from mdpl.data.synthetic import write_synthetic, write_wordpiece_vocab
    from mdpl.data.writers import make_arrow
    from mdpl.models import build_classifier

    method = request.param
    base = tmp_path_factory.mktemp(f"api_{method}")
    write_synthetic("food101", base / "data" / "raw", 32, 8, 9, seed=0)
    make_arrow("food101", base / "data" / "raw", base / "data" / "arrow", progress=False)
    updates = {"data_root": str(base / "data" / "arrow"), "log_dir": str(base / "result"), "per_gpu_batchsize": 4,
               "batch_size": 4, "max_epoch": 1, "deterministic": True, "missing_ratio": HALF_MISSING}
    pretrain = base / "pretrain" / ("vilt_tiny.ckpt" if method == "map" else "clip_tiny.pt")
    pretrain.parent.mkdir()
    if method == "map":
        vocab = write_wordpiece_vocab(base / "tok" / "vocab.txt")
        updates.update(tokenizer=str(vocab.parent), vocab_size=len(vocab.read_text().split()),
                       load_path=str(pretrain))
    else:
        updates.update(clip_path=str(pretrain))
    cfg = resolved_config(["task_finetune_food101", method, "tiny"], updates)
    write_pretraining_file(cfg, pretrain)

    model = build_classifier(cfg)                      # reads the pre-training file
    out = run_quiet(cfg, model=model)                  # trains `model` in place; the test reloads the best weights
    dm = datamodule_of(cfg)
    dm.setup("validate")
    ds = dm.datasets["val"]
    items = [ds[i] for i in range(len(ds))]
    batch = dm.on_after_batch_transfer(dm.collator(items), 0)
    model.eval()
    with torch.no_grad():
        logits = model(batch)["logits"].clone()
    raw_images = [ds._decode(int(ds.item_rows[i])) for i in range(len(ds))]
    raw_texts = [ds.texts[int(ds.item_text_pos[i])] for i in range(len(ds))]
    shutil.rmtree(base / "data")
    pretrain.unlink()
    return {"method": method, "config": cfg, "ckpt": Path(out["best_model_path"]), "batch": batch,
            "logits": logits, "images": raw_images, "texts": raw_texts, "types": batch["missing_type"].tolist(),
            "pretrain": pretrain, "data": base / "data", "tmp": base}


def with_gaps(trained: dict) -> tuple[list, list]:
    """The raw pairs with None for each sample's missing modality (from the batch's missing types)."""
    images = [None if t == MISSING_IMAGE else img for img, t in zip(trained["images"], trained["types"])]
    texts = [None if t == MISSING_TEXT else txt for txt, t in zip(trained["texts"], trained["types"])]
    return images, texts


def test_the_run_read_a_pretraining_file_that_is_gone(trained) -> None:
    cfg = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
    key = "load_path" if trained["method"] == "map" else "clip_path"
    assert cfg[key] == str(trained["pretrain"]) and not trained["pretrain"].exists()
    assert not trained["data"].exists()
    assert sorted(set(trained["types"])) == [MISSING_COMPLETE, MISSING_TEXT, MISSING_IMAGE]
    with pytest.raises((OSError, ValueError)):          # building from the stored config would read the file
        MDPLModule(cfg)


def test_load_model_gives_the_trained_logits(trained) -> None:
    predictor = load_model(trained["ckpt"])
    out = predictor.predict_batch(trained["batch"])
    assert torch.equal(out.logits, trained["logits"])
    assert torch.allclose(out.probabilities, torch.softmax(trained["logits"], dim=1))
    assert torch.allclose(out.probabilities.sum(dim=1), torch.ones(len(trained["types"])))
    assert out.classes == list(range(101)) and out.missing_type.tolist() == trained["types"]
    best = out.top(2)
    assert len(best) == len(trained["types"]) and [c for c, _ in best[0]] == \
        trained["logits"][0].topk(2).indices.tolist()
    assert best[0][0][1] >= best[0][1][1]


def test_lightning_load_from_checkpoint_gives_the_trained_logits(trained) -> None:
    module = MDPLModule.load_from_checkpoint(trained["ckpt"], map_location="cpu").eval()
    with torch.no_grad():
        logits = module(trained["batch"])["logits"]
    assert torch.equal(logits, trained["logits"])
    key = "load_path" if trained["method"] == "map" else "clip_path"
    assert module.hparams["config"][key] == str(trained["pretrain"])   # the stored config is kept as it was
    assert not module.hparams["config"]["test_only"]


def test_predict_on_raw_pairs_equals_the_collated_batch(trained) -> None:
    predictor = load_model(trained["ckpt"])
    side = int(trained["config"]["image_size"])
    # synthetic images are square, so an image-missing row's dummy (its image's size) is image_size x image_size,
    # the size predict gives the dummy of an absent image
    assert all(predictor.transform(img).shape[-2:] == (side, side) for img in trained["images"])
    images, texts = with_gaps(trained)
    out = predictor.predict(images, texts)
    assert out.missing_type.tolist() == trained["types"]
    assert torch.equal(out.logits, trained["logits"])
    # explicit types with both modalities given: the given modality is replaced by its dummy, as the data module does
    named = {MISSING_COMPLETE: "complete", MISSING_TEXT: "text", MISSING_IMAGE: "image"}
    explicit = predictor.predict(trained["images"], trained["texts"], missing=[named[t] for t in trained["types"]])
    assert torch.equal(explicit.logits, trained["logits"])
    # chunks of 3 samples give the same predictions up to rounding (ViLT pads images per batch)
    chunked = predictor.predict(images, texts, batch_size=3)
    assert torch.allclose(chunked.logits, trained["logits"], atol=1e-5)
    # a complete pair differs from the same pair with its text missing
    i = trained["types"].index(MISSING_COMPLETE)
    pair = predictor.predict([trained["images"][i]] * 2, [trained["texts"][i], None])
    assert torch.allclose(pair.logits[0], trained["logits"][i], atol=1e-5)
    assert pair.missing_type.tolist() == [MISSING_COMPLETE, MISSING_TEXT]
    assert not torch.allclose(pair.logits[0], pair.logits[1])


def test_predict_refuses_bad_samples_in_one_line(trained) -> None:
    predictor = load_model(trained["ckpt"])
    image, text = trained["images"][0], trained["texts"][0]
    cases = [(([None], [None]), "sample 0 has neither an image nor a text"),
             (([None], [text], [MISSING_TEXT]), "sample 0 has no image but missing=1"),
             (([image], [text], ["audio"]), "missing type 'audio' is not one of"),
             (([image, image], [text]), "as many images as texts"),
             ((image, text), "a list of images and a list of texts"),
             (([42], [text]), "image must be a PIL image, a file path or None, got int")]
    for args, message in cases:
        with pytest.raises(UserInputError) as err:
            predictor.predict(*args)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_vilt_tokenizer_folder_missing_is_a_one_line_error(trained, tmp_path) -> None:
    """ViLT: a missing vocabulary folder is one line naming tokenizer=. CLIP (the dcp run) uses open_clip's bundled
    BPE vocabulary: the folder is not read, so the same argument changes nothing."""
    if trained["method"] != "map":
        out = load_model(trained["ckpt"], tokenizer=tmp_path / "nope").predict(*with_gaps(trained))
        assert torch.equal(out.logits, trained["logits"])
        return
    with pytest.raises(UserInputError, match=r"tokenizer folder '.*nope' .*has no vocab\.txt.*tokenizer=") as err:
        load_model(trained["ckpt"], tokenizer=tmp_path / "nope")
    assert "\n" not in str(err.value)
    # a checkpoint whose stored vocabulary folder is gone: the error names tokenizer=; the argument fixes it
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    stored = ckpt["hyper_parameters"]["config"]["tokenizer"]
    ckpt["hyper_parameters"]["config"]["tokenizer"] = str(tmp_path / "moved")
    moved = tmp_path / "moved.ckpt"
    torch.save(ckpt, moved)
    with pytest.raises(UserInputError, match=r"moved' stored in the checkpoint has no vocab\.txt; pass load_model"):
        load_model(moved)
    out = load_model(moved, tokenizer=stored).predict(*with_gaps(trained))
    assert torch.equal(out.logits, trained["logits"])


def test_load_model_refuses_other_files_in_one_line(tmp_path) -> None:
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, state)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for path, message in [(tmp_path / "absent.ckpt", "does not exist"), (tmp_path, "is a folder"),
                          (tmp_path / "junk.ckpt", "cannot read checkpoint"),
                          (state, "was not written by an mdpl training run")]:
        with pytest.raises(UserInputError, match=message) as err:
            load_model(path)
        assert "\n" not in str(err.value)


def test_mmimdb_predictions_name_the_genres_and_use_sigmoid(bert_vocab_dir) -> None:
    from mdpl.data.tokenizers import build_tokenizer
    from mdpl.models import build_classifier

    cfg = resolved_config(["task_finetune_mmimdb", "map", "tiny"],
                          {"tokenizer": str(bert_vocab_dir), "vocab_size": len((bert_vocab_dir / "vocab.txt")
                                                                               .read_text().split())})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # randomly initialised backbone
        model = build_classifier(cfg)
    predictor = Predictor(model, cfg, build_tokenizer(typed(cfg).pipeline))
    image = Image.new("RGB", (80, 64), (200, 30, 30))
    out = predictor.predict([image, None], ["a love story", "the war"])
    assert out.classes == MMIMDB_GENRES and out.multi_label
    assert out.logits.shape == (2, 23) and torch.allclose(out.probabilities, torch.sigmoid(out.logits))
    assert out.missing_type.tolist() == [MISSING_COMPLETE, MISSING_IMAGE]
    assert out.top(1)[0][0][0] == MMIMDB_GENRES[int(out.logits[0].argmax())]
    with pytest.raises(UserInputError, match="class_names has 2 names but mmimdb has 23 classes"):
        Predictor(model, cfg, build_tokenizer(typed(cfg).pipeline), class_names=["a", "b"])
