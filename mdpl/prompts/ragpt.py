"""RAGPT — retrieval-augmented dynamic prompt tuning (Lang et al., AAAI 2025; docs/methods.md §17).

Reference: ``Jian-Lang/RAGPT`` (``src/model/ragpt.py``, ``src/model/modules.py``) on its own copy of the Hugging Face
``ViltModel`` (mdpl: ``vilt_variant=hf``, ``drop_rate=0``). Per sample, the k nearest *training* items of the same
modality (retrieved with a frozen retriever, the preparation stage; the reference's memory of training and
validation items, its self-exclusion by list position and its retriever text features are ``ragpt_memory``,
``ragpt_self_exclusion`` and ``ragpt_retriever_text``, RAGPT-D2, D6) give:

* **Missing-modality generator** (MMG, §17.2): the neighbours' ViLT embeddings (the memory bank, [k, n, D]) averaged
  over the neighbours, filtered along the token axis by a learned complex spectrum
  ``F~ = Re(IFFT(W ⊙ FFT(F̄)))``, then ``Linear(LN(F̄ + Dropout(F~)))``; the result *replaces* the embeddings of the
  missing modality (whole segment, tensor indexing by missing type). ``W`` is complex [n, D]; it is stored as real
  pairs [n, D, 2] (``torch.view_as_complex``), so optimizers, DDP's all-reduce and checkpoints see a real tensor.
* **Context-aware prompter** (CAP): single-head attention of the (replaced) text / image embeddings over all
  k·n neighbour tokens of that modality, adaptive-average-pooled over the query axis to ``ragpt_prompt_len`` rows:
  a text and an image prompt [B, P, D].
* **Label token**: the mean over ``ragpt_label_neighbours`` neighbours of their label vectors times the label
  embedding E [C, D] (one-hot for single-label datasets).
* Before block ``ragpt_prompt_pos``: ``[label ; text prompt ; image prompt]`` in front of the sequence, kept to the
  end. The pooler reads the **label token** (RAGPT-D5) and the head is the reference's label-prototype head:
  ``logits = MLP([h ; label]) · Eᵀ``.

Neighbours come from ``prepare_batch``: the batch's ``item_index`` and ``split`` select rows of the preparation's
neighbour lists (image-to-image and text-to-text) and the memory bank; which list feeds which input depends on the
missing type (§17.1). A batch may also carry the neighbours directly (``ragpt_text`` [B, k, Lt, D], ``ragpt_image``
[B, k, Li, D], ``ragpt_labels`` [B, n, C]): the parity tests and any external retrieval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mdpl.errors import UserInputError
from mdpl.prompts.base import (MISSING_IMAGE, MISSING_TEXT, BackboneInfo, MethodConfig,
                               PromptContext, PromptMethod, StreamInfo, check_positive)
from mdpl.prompts.layout import IMAGE, TEXT, TokenLayout, splice_tokens
from mdpl.prompts.preparation import FeatureRequest, PreparationNeed, PreparedArtifact, RetrievalRequest
from mdpl.prompts.registry import register_method

LABEL, TEXT_PROMPT, IMAGE_PROMPT = "ragpt.label", "ragpt.text", "ragpt.image"
GENERATORS = (TEXT, IMAGE)
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY = "ragpt_memory"
"""Name of the memory-bank feature (layer 0 = the embedding output, every token of the text and image segments)."""
RETRIEVAL = "ragpt_retrieval"
SPLITS = ("train", "val", "test")
MEMORIES = {"train": ("train",), "train_val": ("train", "val")}
"""``ragpt_memory`` -> the splits whose items form the memory (bank rows and retrieval candidates, in turn)."""
SELF_EXCLUSIONS = ("index", "position")
RETRIEVER_TEXTS = {"clip": "", "reference": "unordered"}
"""``ragpt_retriever_text`` -> the retriever's text feature (``RetrievalRequest.text_features``)."""
BATCH_KEYS = ("ragpt_text", "ragpt_image", "ragpt_labels")
"""Batch keys that carry the neighbours directly (tests, external retrieval)."""


@dataclass(frozen=True)
class RagptConfig(MethodConfig):
    """RAGPT's keys with the reference's values (``ragpt_config.yaml`` at the pinned commit, §17.4)."""

    ragpt_k: int = 5                              # neighbours whose embeddings feed the generator and the prompter
    ragpt_label_neighbours: int = 19              # neighbours whose labels form the label token (RAGPT-D4)
    ragpt_prompt_pos: int = 1                     # block before which [label ; prompts] are inserted
    ragpt_prompt_len: int = 6                     # P rows of the text prompt and of the image prompt
    ragpt_mmg_dropout: float = 0.2                # dropout on the filtered signal of the generators
    ragpt_generators: tuple[str, ...] = GENERATORS  # modalities with a generator (reference: per training setting)
    ragpt_text_dummy_mask: bool = True            # text-missing rows attend to every text position (RAGPT-D10)
    ragpt_bank_dtype: str = field(default="float16", metadata={"structural": False})  # memory-bank storage
    ragpt_retriever: str = field(default="clip", metadata={"structural": False})      # registered two-tower backbone
    ragpt_retriever_path: str = field(default="", metadata={"structural": False})     # its local weight file ("": random)
    ragpt_retriever_image_size: int = field(default=336, metadata={"structural": False})  # its image size
    # the memory: 'train' (mdpl) | 'train_val' (the reference: training and validation items, RAGPT-D2)
    ragpt_memory: str = field(default="train", metadata={"structural": False})
    # which memory row a query may not return: 'index' (mdpl: its own item) | 'position' (the reference: row p for the
    # p-th query of every split, RAGPT-D2)
    ragpt_self_exclusion: str = field(default="index", metadata={"structural": False})
    # retriever text feature: 'clip' (CLIP's) | 'reference' (every token at position 1, no causal mask, RAGPT-D6)
    ragpt_retriever_text: str = field(default="clip", metadata={"structural": False})
    max_text_len: int = field(default=40, metadata={"shared_key": True})
    image_size: int = field(default=384, metadata={"shared_key": True})
    patch_size: int = field(default=32, metadata={"shared_key": True})

    TINY = {"ragpt_k": 2, "ragpt_label_neighbours": 3, "ragpt_prompt_len": 2, "ragpt_retriever_image_size": 32}
    DATASETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {"hatememes": {"ragpt_label_neighbours": 5}}
    """Hateful Memes: the labels of the first k neighbours; Food-101, MM-IMDb: all 19 (RAGPT-D4)."""

    @property
    def text_tokens(self) -> int:
        return int(self.max_text_len)

    @property
    def image_tokens(self) -> int:
        """Image CLS + a full square grid of patches (RAGPT-D7: every image is resized to image_size²)."""
        return 1 + (int(self.image_size) // int(self.patch_size)) ** 2

    @property
    def retrieved(self) -> int:
        """Neighbours kept per item and modality by the preparation."""
        return max(int(self.ragpt_k), int(self.ragpt_label_neighbours))

    def check(self, info: BackboneInfo) -> None:
        if not info.single_stream or set(info.streams[0].modalities) != {TEXT, IMAGE}:
            raise UserInputError(f"ragpt replaces embeddings and prompts one joint text-image stream; {info.what} has "
                                 f"the streams {[s.name for s in info.streams]} (use backbone=vilt)")
        for key in ("ragpt_k", "ragpt_label_neighbours", "ragpt_prompt_len", "ragpt_retriever_image_size"):
            check_positive(key, getattr(self, key))
        pos = self.ragpt_prompt_pos
        if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < info.num_layers:
            raise UserInputError(f"ragpt_prompt_pos={pos!r} must be a block in 0..{info.num_layers - 1} ({info.what}; "
                                 "RAGPT-D17)")
        rate = self.ragpt_mmg_dropout
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise UserInputError(f"ragpt_mmg_dropout must be in [0, 1), got {rate!r}")
        gens = list(self.ragpt_generators)
        if any(g not in GENERATORS for g in gens) or len(set(gens)) != len(gens):
            raise UserInputError(f"ragpt_generators={gens} must name distinct modalities among text, image")
        if self.ragpt_bank_dtype not in BANK_DTYPES:
            raise UserInputError(f"ragpt_bank_dtype={self.ragpt_bank_dtype!r}; choose one of {sorted(BANK_DTYPES)}")
        for key, choices in (("ragpt_memory", MEMORIES), ("ragpt_self_exclusion", SELF_EXCLUSIONS),
                             ("ragpt_retriever_text", RETRIEVER_TEXTS)):
            if getattr(self, key) not in choices:
                raise UserInputError(f"{key}={getattr(self, key)!r}; choose one of {', '.join(choices)}")


# ------------------------------------------------------------------------------------------------ modules
class SpectralGenerator(nn.Module):
    """The reference's MMG: ``Linear(LN(F̄ + Dropout(Re(IFFT_n(W ⊙ FFT_n(F̄))))))`` with F̄ the neighbour mean.

    ``weight`` [n, D, 2] holds the real and imaginary parts of the complex W (init: both N(0, 1/2), as
    ``torch.randn(..., dtype=cfloat)``); the FFT runs along the token axis with torch's default norm."""

    def __init__(self, length: int, width: int, dropout: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(length, width, 2) * math.sqrt(0.5))
        self.layer_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(width, width)

    def forward(self, neighbours: torch.Tensor) -> torch.Tensor:
        """neighbours [B, k, n, D] -> the generated embeddings [B, n, D]."""
        mean = neighbours.float().mean(1)
        spectrum = torch.fft.fft(mean, dim=1)
        filtered = torch.fft.ifft(torch.view_as_complex(self.weight) * spectrum, dim=1).real
        return self.linear(self.layer_norm(mean + self.dropout(filtered)))


class ContextPrompter(nn.Module):
    """The reference's CAP: unmasked single-head attention over the neighbours' tokens, pooled to P rows."""

    def __init__(self, width: int, length: int) -> None:
        super().__init__()
        self.length = length
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """query [B, L, D], neighbours [B, k, s, D] -> [B, P, D]: softmax(q kᵀ / √D) v over all k·s neighbour
        tokens (padding included, RAGPT-D9), then adaptive average pooling of the L query rows to P (overlapping
        bins, as ``AdaptiveAvgPool2d((P, D))``)."""
        kv = neighbours.flatten(1, 2).to(query.dtype)
        scores = self.q_proj(query) @ self.k_proj(kv).transpose(1, 2) / math.sqrt(query.shape[-1])
        out = scores.softmax(-1) @ self.v_proj(kv)
        return F.adaptive_avg_pool1d(out.transpose(1, 2), self.length).transpose(1, 2)


class LabelPrototypeHead(nn.Module):
    """``Linear(2D, 2D) - LayerNorm - GELU - Linear(2D, D)`` of [pooled label token ; label embedding]; weights
    N(0, 0.02), biases 0 (the reference's ``init_weights``). The logits are its output times Eᵀ (the method's)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


# ------------------------------------------------------------------------------------------------ method
@register_method("ragpt")
class Ragpt(PromptMethod):
    """RAGPT (§17) on a joint text-image stream."""

    title = "RAGPT"
    preset = "ragpt"
    paper_run = (1e-3, 2024)
    paper_missing_type = "text"
    paper_backbone = "vilt"
    paper_cell = "mdpl.experiments.papers.ragpt:paper_cell"
    padding_is_inert = False            # the prompter pools every text position, [PAD] included (RAGPT-D9)
    image_transform = "square"          # every image resized to image_size² (RAGPT-D7)
    fixed_segment_lengths = True        # the generators have max_text_len and 1 + grid² rows
    paper_tables = "mdpl.experiments.papers.ragpt:tables"
    config_class = RagptConfig

    def __init__(self, config: RagptConfig, info: BackboneInfo):
        super().__init__(config, info)
        width = info.streams[0].width
        self.width = width
        lengths = {TEXT: config.text_tokens, IMAGE: config.image_tokens}
        self.generators = nn.ModuleDict({m: SpectralGenerator(lengths[m], width, float(config.ragpt_mmg_dropout))
                                         for m in GENERATORS if m in config.ragpt_generators})
        self.prompter = ContextPrompter(width, int(config.ragpt_prompt_len))
        self.label_embedding: nn.Parameter | None = None
        self.bank: dict[str, torch.Tensor] = {}
        """Memory bank (preparation): ``text`` [N_mem, Lt, D], ``image`` [N_mem, Li, D] (``ragpt_bank_dtype``),
        ``labels`` float [N_mem, C]; ``<split>/<modality>`` long [N_split, K] neighbour lists (rows of the bank)."""

    # --- head -----------------------------------------------------------------------------------------
    def build_head(self, num_classes: int) -> nn.Module:
        """The label-prototype head; E [C, D] ~ N(0, 1) is the method's (it also forms the label token)."""
        self.label_embedding = nn.Parameter(torch.randn(num_classes, self.width))
        return LabelPrototypeHead(self.width)

    def head_logits(self, head: nn.Module, pooled: torch.Tensor, prepared: Any) -> torch.Tensor:
        """``MLP([h ; label]) · Eᵀ`` (prototype dot product, no bias)."""
        return head(torch.cat([pooled, prepared["label"].to(pooled.dtype)], dim=1)) @ self.label_embedding.T

    def readout_segment(self, stream: StreamInfo) -> str:
        return LABEL

    # --- neighbours -----------------------------------------------------------------------------------
    def prepare_batch(self, missing_type: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The rows' neighbour embeddings and the label token [B, D] (§17.1)."""
        if all(k in batch for k in BATCH_KEYS):
            text, image, labels = (batch[k] for k in BATCH_KEYS)
        else:
            text, image, labels = self.gather(missing_type, batch)
        dtype = self.label_embedding.dtype
        label = (labels.to(dtype) @ self.label_embedding).mean(1)
        return {"text": text, "image": image, "label": label}

    def synthetic_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Random neighbours of the right shapes (the benchmark; the bank gather itself is not timed)."""
        b, device = batch["text_ids"].shape[0], batch["text_ids"].device
        k, n, classes = int(self.config.ragpt_k), int(self.config.ragpt_label_neighbours), self.label_embedding.shape[0]
        g = torch.Generator().manual_seed(0)
        labels = F.one_hot(torch.randint(0, classes, (b, n), generator=g), classes).float()
        return {"ragpt_text": torch.randn(b, k, self.config.text_tokens, self.width, generator=g).to(device),
                "ragpt_image": torch.randn(b, k, self.config.image_tokens, self.width, generator=g).to(device),
                "ragpt_labels": labels.to(device)}

    def neighbour_lists(self, missing_type: torch.Tensor, split: str,
                        items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text, image, label) neighbour indices into the bank, each long [B, K], by missing type: text missing ->
        image-to-image for all three; image missing -> text-to-text for all three; complete -> text-to-text for the
        text, image-to-image for the image and the labels (the reference's datasets)."""
        i2i, t2t = (self.bank[f"{split}/{m}"].to(items.device)[items] for m in (IMAGE, TEXT))
        per_text = torch.stack([t2t, i2i, t2t])         # index = missing type (0 complete, 1 text, 2 image missing)
        per_image = torch.stack([i2i, i2i, t2t])
        rows = torch.arange(items.shape[0], device=items.device)
        t = missing_type.to(items.device)
        return per_text[t, rows], per_image[t, rows], per_image[t, rows]

    def gather(self, missing_type: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Neighbour embeddings [B, k, n, D] (float32) and labels [B, n_l, C] of the batch's items from the bank."""
        split = batch.get("split")
        if not self.bank or f"{split}/{TEXT}" not in self.bank:
            raise UserInputError(f"ragpt needs the neighbour lists of the batch's dataset split (got split={split!r}): "
                                 "they come from the preparation stage of a training or test run on an arrow "
                                 "dataset, or pass ragpt_text, ragpt_image and ragpt_labels in the batch")
        device = missing_type.device
        t_idx, i_idx, l_idx = self.neighbour_lists(missing_type, str(split), batch["item_index"].to(device))
        k, n = int(self.config.ragpt_k), int(self.config.ragpt_label_neighbours)
        text = self.bank[TEXT].to(device)[t_idx[:, :k]].float()
        image = self.bank[IMAGE].to(device)[i_idx[:, :k]].float()
        labels = self.bank["labels"].to(device)[l_idx[:, :n]]
        return text, image, labels

    # --- hooks ----------------------------------------------------------------------------------------
    def replace_missing(self, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, ctx: PromptContext,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding-level reconstruction: the missing modality's segment replaced by its generator's output
        (whole segment); text-missing rows attend to every text position (``ragpt_text_dummy_mask``, RAGPT-D10)."""
        prepared, types = ctx.prepared, ctx.missing_type.to(x.device)
        x = x.clone()
        for modality, missing in ((TEXT, MISSING_TEXT), (IMAGE, MISSING_IMAGE)):
            span = layout.span(modality)
            expected = self.config.text_tokens if modality == TEXT else self.config.image_tokens
            if span.stop - span.start != expected:
                raise UserInputError(
                    f"ragpt needs {expected} {modality} tokens per sample (the generators' length), got "
                    f"{span.stop - span.start}: use dynamic_text_padding=False, image_transform=square and "
                    "max_image_len=-1 (the ragpt preset; RAGPT-D7)")
            if modality not in self.generators:
                continue
            generated = self.generators[modality](prepared[modality]).to(x.dtype)
            rows = (types == missing).view(-1, 1, 1)
            x[:, span] = torch.where(rows, generated, x[:, span])
        if self.config.ragpt_text_dummy_mask:
            mask = mask.clone()
            mask[:, layout.span(TEXT)] |= (types == MISSING_TEXT).unsqueeze(1)
        return x, mask

    def before_block(self, stream: StreamInfo, index: int, x: torch.Tensor, mask: torch.Tensor,
                     layout: TokenLayout, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
        """Block 0: replacement and the prompts from the replaced embeddings; block ``ragpt_prompt_pos``:
        ``[label ; text prompt ; image prompt]`` in front, with ones in the key mask."""
        prepared = ctx.prepared
        if index == 0:
            x, mask = self.replace_missing(x, mask, layout, ctx)
            prepared["prompts"] = (self.prompter(x[:, layout.span(TEXT)], prepared[TEXT]),
                                   self.prompter(x[:, layout.span(IMAGE)], prepared[IMAGE]))
        if index == self.config.ragpt_prompt_pos:
            text_prompt, image_prompt = prepared["prompts"]
            x, mask = splice_tokens(x, mask, 0, [prepared["label"].unsqueeze(1), text_prompt, image_prompt])
            p = text_prompt.shape[1]
            layout = layout.prepend([(LABEL, 1), (TEXT_PROMPT, p), (IMAGE_PROMPT, p)])
        return x, mask, layout

    # --- preparation ----------------------------------------------------------------------------------
    def preparation_needs(self) -> PreparationNeed:
        """The memory bank (the ViLT embeddings of every memory item, both segments, complete: the training items,
        with ``ragpt_memory=train_val`` the validation items after them) and, for every split, each item's nearest
        memory items by the retriever's image and text features (an empty ``ragpt_retriever_path``: a randomly
        initialised retriever, with the backbone's warning, on a randomly initialised backbone only: tests)."""
        cfg = self.config
        memory = MEMORIES[cfg.ragpt_memory]
        features = tuple(FeatureRequest(f"{MEMORY}_{m}", stream=self.info.streams[0].name, layers=(0,), segment=m,
                                        pooling="tokens", dtype=cfg.ragpt_bank_dtype) for m in (TEXT, IMAGE))
        retrieval = RetrievalRequest(RETRIEVAL, backbone=cfg.ragpt_retriever, weights=cfg.ragpt_retriever_path,
                                     weights_key="ragpt_retriever_path",
                                     image_size=int(cfg.ragpt_retriever_image_size), k=cfg.retrieved, splits=SPLITS,
                                     memory=memory, self_exclusion=cfg.ragpt_self_exclusion,
                                     text_features=RETRIEVER_TEXTS[cfg.ragpt_retriever_text])
        return PreparationNeed(features=features, retrieval=(retrieval,), missing="complete", keep_features=True,
                               keep_labels=True, version="1", splits=memory)

    def load_prepared(self, artifact: PreparedArtifact) -> None:
        """The bank and the neighbour lists, kept outside the state dict (large; a function of data and weights)."""
        classes = self.label_embedding.shape[0]
        labels = artifact.labels
        if labels.dim() == 1:
            labels = F.one_hot(labels.long(), classes)
        self.bank = {TEXT: artifact.features[f"{MEMORY}_{TEXT}"][:, 0],
                     IMAGE: artifact.features[f"{MEMORY}_{IMAGE}"][:, 0],
                     "labels": labels.float()}
        for split, lists in artifact.retrieved[RETRIEVAL].items():
            for modality, (indices, _) in lists.items():
                self.bank[f"{split}/{modality}"] = indices

    @classmethod
    def added_tokens(cls, config: RagptConfig, info: BackboneInfo) -> dict[str, int]:
        return {s.name: 1 + 2 * int(config.ragpt_prompt_len) for s in info.streams}

