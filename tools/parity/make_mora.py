"""Regenerate tests/fixtures/ref_mora_{A,B}.pt from the MoRA reference code (tests/fixtures/README.md, "MoRA").

    python tools/parity/make_mora.py --refs REFS_DIR [--out DIR]

Needs transformers 4.x (the reference's vendored Hugging Face CLIP fails on 5.x, MoRA-D16 in docs/methods.md): run it
with an interpreter that has transformers 4.57.1 and this project's other packages (``make_all.py --tf4-python``).
REFS_DIR holds the checkout ``MoRA`` at the pinned commit (tools/parity/common.py); the command prints the
``git clone`` / ``git checkout`` lines when it is missing or elsewhere. The reference files are imported, never
edited; run-time shims only: ``loguru`` (the reference logs with it) is a silent stand-in when it is not installed,
and ``CLIPModel.from_pretrained`` builds the reference's own vendored CLIP at the tiny sizes below instead of
downloading ViT-B/16.

Weights: the backbone is ``tests/dcp_hashinit.py``'s pure function of (OpenAI key, shape), loaded into the reference
through the OpenAI -> Hugging Face key map below (the fused in-projection split into q / k / v, the projections
transposed); the fixture keeps float64 checksums, not the values. The reference then builds its adapters on it; every
trainable tensor is then set from generators seeded by ``crc32(name)`` (``modality_B`` non-zero, so the specific path
matters; magnitudes off the column norms) and stored. The batch has every missing type (dummy text ``[SOT, EOT]``, a
white dummy image) and fp16-representable pixels, so the reference's forced ``.half()`` input cast (MoRA-D5) changes
nothing; its setter keeps the pixels float32 on CPU.

Stored, in eval mode on CPU in float32 (one thread): logits, features, loss and the gradient of every trainable
tensor (unmerged), then the merged effective weights of every adapted projection and the logits after the
reference's ``merge_weights``. A second run writes the same bytes.
"""
from __future__ import annotations

import re
import sys
import types
import zlib
from pathlib import Path
from typing import Any

import torch

from common import (REFERENCES, classification_loss, detached, generator_main, prepare_tf4_reference, repo_root)

sys.path.insert(0, str(repo_root() / "tests"))
from dcp_hashinit import checksum, hashed_tensor  # noqa: E402

SOT, EOT = 998, 999           # the largest ids: the reference and mdpl both pool at argmax(ids)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIGS: dict[str, dict[str, Any]] = {
    # backbone sizes (mdpl's flat clip_* keys), then the method (mdpl's mora_* keys), then the batch
    "A": dict(sizes=dict(clip_embed_dim=32, image_size=32, clip_patch_size=16, clip_vision_width=48,
                         clip_vision_layers=3, clip_vision_head_width=24, clip_vocab_size=1000, clip_text_width=32,
                         clip_text_heads=2, clip_text_layers=3),
              method=dict(mora_maps=["q", "v"], mora_start_layer=1, mora_shared_rank=2, mora_image_rank=2,
                          mora_text_rank=3, mora_alpha=0.05, mora_dropout=0.1),
              dataset="food101", num_classes=101, rows=[(0, 12), (1, 0), (2, 30), (0, 75), (1, 0), (2, 4)]),
    "B": dict(sizes=dict(clip_embed_dim=24, image_size=40, clip_patch_size=8, clip_vision_width=24,
                         clip_vision_layers=3, clip_vision_head_width=8, clip_vocab_size=1000, clip_text_width=40,
                         clip_text_heads=4, clip_text_layers=4),
              method=dict(mora_maps=["q", "k", "v"], mora_start_layer=0, mora_shared_rank=3, mora_image_rank=4,
                          mora_text_rank=2, mora_alpha=0.1, mora_dropout=0.1),
              dataset="mmimdb", num_classes=23, rows=[(2, 20), (0, 5), (1, 0), (0, 75), (2, 1)]),
}
"""(missing type, real tokens between SOT and EOT) per row; 75 fills all 77 positions. Config B has a text tower
deeper than the image tower (its last text block has no partner: not adapted) and adapts every block below."""
CONTEXT = 77


# ------------------------------------------------------------------------------------------- reference
def loguru_stand_in() -> None:
    """A silent ``loguru.logger`` when loguru is not installed (the reference only logs with it)."""
    try:
        import loguru  # noqa: F401
    except ImportError:
        module = types.ModuleType("loguru")
        module.logger = types.SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None,
                                              debug=lambda *a, **k: None, error=lambda *a, **k: None)
        sys.modules["loguru"] = module


def import_reference(refs: Path) -> types.ModuleType:
    """The reference's ``src.models.clip_mora`` (transformers 4.x checked first: one clear line otherwise)."""
    prepare_tf4_reference(refs, "mora", "make_mora.py", "MoRA-D16")
    loguru_stand_in()
    import src.models.clip_mora as clip_mora
    return clip_mora


def hf_config(sizes: dict[str, int]) -> Any:
    """The reference's CLIPConfig at mdpl's tiny sizes (quick-GELU, LN eps 1e-5, no dropout: its defaults)."""
    from transformers.models.clip.configuration_clip import CLIPConfig
    text = dict(vocab_size=sizes["clip_vocab_size"], hidden_size=sizes["clip_text_width"],
                intermediate_size=4 * sizes["clip_text_width"], num_hidden_layers=sizes["clip_text_layers"],
                num_attention_heads=sizes["clip_text_heads"], max_position_embeddings=CONTEXT)
    width = sizes["clip_vision_width"]
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=sizes["clip_vision_layers"],
                  num_attention_heads=width // sizes["clip_vision_head_width"], image_size=sizes["image_size"],
                  patch_size=sizes["clip_patch_size"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes["clip_embed_dim"])


def openai_shapes(sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the OpenAI-layout CLIP state dict at these sizes (what mdpl's backbone loads)."""
    e, tw, vw = sizes["clip_embed_dim"], sizes["clip_text_width"], sizes["clip_vision_width"]
    grid = sizes["image_size"] // sizes["clip_patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (), "positional_embedding": (CONTEXT, tw), "text_projection": (tw, e),
        "token_embedding.weight": (sizes["clip_vocab_size"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,),
        "visual.class_embedding": (vw,), "visual.positional_embedding": (grid * grid + 1, vw),
        "visual.proj": (vw, e), "visual.conv1.weight": (vw, 3, sizes["clip_patch_size"], sizes["clip_patch_size"]),
        "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,),
        "visual.ln_post.bias": (vw,)}
    for prefix, width, layers in (("", tw, sizes["clip_text_layers"]), ("visual.", vw, sizes["clip_vision_layers"])):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes.update({b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                           b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                           b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                           b + "ln_2.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                           b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width),
                           b + "mlp.c_proj.bias": (width,)})
    return shapes


BLOCK_RENAMES = {"attn.out_proj.": "self_attn.out_proj.", "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.",
                 "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
TOP_RENAMES = {
    "logit_scale": "logit_scale", "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias"}


def hf_state(openai: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI-layout CLIP weights -> the Hugging Face CLIP layout of the reference: fused in-projections split into
    q / k / v rows, ``text_projection`` / ``visual.proj`` ([in, out]) transposed into ``nn.Linear`` weights."""
    out: dict[str, torch.Tensor] = {"text_projection.weight": openai["text_projection"].T.contiguous(),
                                    "visual_projection.weight": openai["visual.proj"].T.contiguous()}
    for key, value in openai.items():
        if key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = value
            continue
        match = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if match is None:
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        block, rest = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
        if rest.startswith("attn.in_proj_"):
            leaf = rest.rsplit("_", 1)[-1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{block}self_attn.{name}_proj.{leaf}"] = part.contiguous()
            continue
        prefix = next(p for p in BLOCK_RENAMES if rest.startswith(p))
        out[block + BLOCK_RENAMES[prefix] + rest[len(prefix):]] = value
    return out


def build_reference(clip_mora: types.ModuleType, spec: dict[str, Any],
                    openai: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference ``ClipMoRA`` on its vendored CLIP with the hashed weights (loaded before the adapters are built,
    so their magnitudes start at the column norms of these weights, as after ``from_pretrained``)."""
    from omegaconf import OmegaConf
    m = spec["method"]
    cfg = OmegaConf.create({
        "NAME": "ClipMoRA", "BACKBONE_NAME": "tiny", "NUM_CLASSES": spec["num_classes"],
        "lora": {"TARGET_MODULES": [f"clip.{tower}_model.encoder.layers.{{i}}.self_attn.{p}_proj"
                                    for tower in ("vision", "text") for p in m["mora_maps"]],
                 "START_LAYER_INDEX": m["mora_start_layer"], "SHARED_RANK": m["mora_shared_rank"],
                 "VISION_RANK": m["mora_image_rank"], "TEXT_RANK": m["mora_text_rank"], "ALPHA": m["mora_alpha"],
                 "DROPOUT": m["mora_dropout"]}})

    def from_pretrained(name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
        model = clip_mora.CLIPModel(hf_config(spec["sizes"]))
        missing, unexpected = model.load_state_dict(hf_state(openai), strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
        return model

    clip_mora.CLIPModel.from_pretrained = from_pretrained
    torch.manual_seed(0)
    return clip_mora.ClipMoRA(cfg).eval()


def set_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor from a generator seeded by crc32(name): ``modality_B`` N(0, 0.5²) (zero at init),
    magnitudes scaled by 1 + N(0, 0.1²), the head N(0, 0.3²) / N(0, 0.1²) (logits and gradients well above rounding),
    the rest kept (the reference's own init)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("modality_B"):
                p.copy_(0.5 * noise)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * noise)
            elif name == "cls_head.weight":
                p.copy_(0.3 * noise)
            elif name == "cls_head.bias":
                p.copy_(0.1 * noise)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------- batch
class Inputs:
    """The reference's processor output: ``input_ids``, ``attention_mask`` and ``pixel_values`` attributes. Its
    forward assigns ``pixel_values.half()`` (MoRA-D5); on CPU the setter keeps float32 (the stored pixels are
    fp16-representable, so nothing changes)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> None:
        self.input_ids, self.attention_mask, self._pixels = input_ids, attention_mask, pixel_values

    @property
    def pixel_values(self) -> torch.Tensor:
        return self._pixels

    @pixel_values.setter
    def pixel_values(self, value: torch.Tensor) -> None:
        self._pixels = value.float()


def make_batch(name: str, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """mdpl's batch: ``text_ids`` [B, 77] (SOT, tokens, EOT, zeros), ``image`` (stored as float16: the values the
    reference's cast gives; the model sees them as float32), ``missing_type``
    and ``label``. Missing text is ``[SOT, EOT]``, a missing image the white image after CLIP normalisation
    (the reference's dummies, MoRA-D7)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rows, size, c = spec["rows"], spec["sizes"]["image_size"], spec["num_classes"]
    ids = torch.zeros(len(rows), CONTEXT, dtype=torch.long)
    image = torch.empty(len(rows), 3, size, size).uniform_(-2, 2, generator=g)
    white = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None]
    for i, (missing, real) in enumerate(rows):
        ids[i, 0], ids[i, 1:real + 1], ids[i, real + 1] = SOT, torch.randint(1, SOT, (real,), generator=g), EOT
        if missing == 2:
            image[i] = white
    if spec["dataset"] == "mmimdb":
        label = (torch.rand(len(rows), c, generator=g) < 0.3).float()
    else:
        label = torch.randint(0, c, (len(rows),), generator=g)
    return {"text_ids": ids, "image": image.half(), "missing_type": torch.tensor([m for m, _ in rows]),
            "label": label}




# ------------------------------------------------------------------------------------------- fixture
def adapted_modules(model: torch.nn.Module, clip_mora: types.ModuleType) -> dict[str, torch.nn.Module]:
    """Reference module name -> its MoRA layer (text and vision)."""
    kinds = (clip_mora.TextMoRALayer, clip_mora.VisionMoRALayer)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def make_fixture(clip_mora: types.ModuleType, name: str) -> dict[str, Any]:
    spec = CONFIGS[name]
    shapes = openai_shapes(spec["sizes"])
    keys = sorted(shapes)
    openai = {k: hashed_tensor(k, shapes[k]) for k in keys}
    model = build_reference(clip_mora, spec, openai)
    initial = set_trainable(model)
    batch = make_batch(name, spec)
    ids = batch["text_ids"]
    pixels = batch["image"].float()
    inputs = Inputs(ids, (ids != 0).long(), pixels)
    out = model({"inputs": inputs})
    loss = classification_loss(spec["dataset"], out["logits"], batch["label"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        features = {"image": model.model.get_image_features(pixels),
                    "text": model.model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())}
        layers = adapted_modules(model, clip_mora)
        for layer in layers.values():
            layer.merge_weights()
        merged_weights = {n: layer.linear.weight.clone() for n, layer in layers.items()}
        merged_logits = model({"inputs": Inputs(ids, (ids != 0).long(), pixels)})["logits"]
    import transformers
    return detached({
        "meta": {"repository": REFERENCES["mora"].repo, "commit": REFERENCES["mora"].commit, "class": "ClipMoRA",
                 "stack": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)}},
        "config": {"dataset": spec["dataset"], "backbone": "clip", **spec["sizes"], **spec["method"]},
        "keys": keys, "shapes": {k: list(shapes[k]) for k in keys},
        "checksums": torch.stack([checksum(openai[k]) for k in keys]),
        "batch": batch, "trainable": initial, "logits": out["logits"], "features": features, "loss": loss,
        "grads": grads, "merged_weights": merged_weights, "merged_logits": merged_logits})


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.splitlines()[0], "mora", CONFIGS, import_reference, make_fixture, argv)


if __name__ == "__main__":
    sys.exit(main())
