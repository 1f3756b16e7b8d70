"""Shared pieces of the reference-fixture generators (tests/fixtures/README.md).

The reference implementations (MAP, MemPrompt, DCP, SCP, MoRA, AOEPT) are never copied into this repository: each generator takes a
folder of their git checkouts, checks that every checkout sits at its pinned commit with unedited sources, puts it
on ``sys.path`` and imports it. The references were written for 2021-2023 libraries; the run-time shims below let
them run on today's stack without editing a single reference file:

* transformers 5 removed ``AdamW`` and ``DataCollatorForWholeWordMask`` (imported at module level);
* Lightning 1.5 removed ``pytorch_lightning.metrics`` (the references' metric classes subclass its ``Metric``);
* torchmetrics 0.10 changed the functional ``f1_score`` / ``auroc`` signatures (``task=`` became mandatory);
* timm 1.x ``load_pretrained`` would download ImageNet weights: made a no-op (random init);
* the references' ViT factories hard-code ViT-B/32-384: a tiny factory calls their own builder with the config's
  sizes;
* DCP moves tensors with ``.to(x.get_device())``, which is ``-1`` on CPU: ``get_device`` answers ``"cpu"`` there.

Function names here are used by other generators: keep them stable.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import subprocess
import sys
import types
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


# ------------------------------------------------------------------------------------------- pinned checkouts
@dataclass(frozen=True)
class Reference:
    """One reference implementation: where it lives and the commit the fixtures were made from."""

    key: str           # short name used on the command line and in file names
    repo: str          # GitHub owner/name
    commit: str        # full 40-hex commit
    folder: str        # checkout folder name under REFS_DIR
    package: str       # top-level Python package of the reference (must exist in the checkout)


REFERENCES: dict[str, Reference] = {
    "map": Reference("map", "YiLunLee/missing_aware_prompts", "9aa538159f4623de1936d25daee880ec47c062be",
                     "missing_aware_prompts", "vilt"),
    "memprompt": Reference("memprompt", "zhao-yh20/MemPrompt", "342739e08e3943631e43e60cd0e1f6baea464286",
                           "MemPrompt", "src"),
    "dcp": Reference("dcp", "hulianyuyy/Deep_Correlated_Prompting", "35195347e5b74c473ce9fbca6d7dbd7d9b672e3f",
                     "Deep_Correlated_Prompting", "clip"),
    "scp": Reference("scp", "vittoriopipoli/SCP_WACV2025", "2e91072b3bbc82a335b6bb6449526e0fbf077093",
                     "SCP_WACV2025", "vilt"),
    "mora": Reference("mora", "Tree-Shu-Zhao/MoRA", "5fec9864bcc906bd3d121a1a333aed5524a399b0", "MoRA", "src"),
    "aoept": Reference("aoept", "Jian-Lang/AOEPT", "b3129050b5ddb874fbc047985512e3df2c65acf6", "AOEPT", "core"),
    "ragpt": Reference("ragpt", "Jian-Lang/RAGPT", "6077706b5f72043a9c29ac59391fba19db417539", "RAGPT", "src"),
}


class CheckoutError(SystemExit):
    """A reference checkout is missing, at another commit, or edited (message = what to run)."""


def checkout_commands(refs_dir: Path | str, ref: Reference) -> str:
    """The shell commands that make the checkout ``REFS_DIR/<folder>`` at the pinned commit."""
    path = Path(refs_dir) / ref.folder
    return (f"git clone https://github.com/{ref.repo}.git {path}\n"
            f"git -C {path} checkout {ref.commit}")


def _git(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=False)


def verify_checkout(refs_dir: Path | str, key: str) -> Path:
    """Path of the checkout of reference ``key``; raises CheckoutError with the commands to run when it is
    missing, at another commit, or has edited Python files (the fixtures must come from the pinned code)."""
    ref = REFERENCES[key]
    path = Path(refs_dir).resolve() / ref.folder
    head = _git(path, "rev-parse", "HEAD") if path.is_dir() else None
    if head is None or head.returncode != 0 or not (path / ref.package).is_dir():
        raise CheckoutError(f"error: no checkout of {ref.repo} at {path}; make it with:\n"
                            f"{checkout_commands(refs_dir, ref)}")
    if head.stdout.strip() != ref.commit:
        raise CheckoutError(f"error: {path} is at {head.stdout.strip()}, not at the pinned commit {ref.commit}; run:\n"
                            f"git -C {path} fetch origin && git -C {path} checkout {ref.commit}")
    edited = _git(path, "status", "--porcelain", "--", "*.py").stdout.strip()
    if edited:
        raise CheckoutError(f"error: {path} has edited Python files (the fixtures need the pinned code unchanged):\n"
                            f"{edited}\nrestore them with: git -C {path} checkout -- .")
    return path


def import_path(path: Path) -> None:
    """Put a checkout first on ``sys.path`` (its package names are generic: ``vilt``, ``src``, ``clip``)."""
    text = str(path)
    if text not in sys.path:
        sys.path.insert(0, text)


# ------------------------------------------------------------------------------------------- library shims
def quiet_warnings() -> None:
    """Silence the deprecation noise of the old code on the new stack (it does not change any number)."""
    for category, message in ((FutureWarning, ""), (UserWarning, ".*pkg_resources.*"),
                              (UserWarning, ".*torch.meshgrid.*"), (DeprecationWarning, ""),
                              (UserWarning, ".*self.log.*"), (UserWarning, ".*Overwriting .* in registry.*")):
        warnings.filterwarnings("ignore", category=category, message=message)


def install_library_shims() -> None:
    """transformers' removed ``AdamW`` / ``DataCollatorForWholeWordMask`` and Lightning's removed
    ``pytorch_lightning.metrics``, aliased before any reference module is imported."""
    quiet_warnings()
    import transformers
    import transformers.optimization as topt
    if not hasattr(topt, "AdamW"):
        topt.AdamW = torch.optim.AdamW            # only used by configure_optimizers, never for the fixtures' step
    if not hasattr(transformers, "DataCollatorForWholeWordMask"):
        transformers.DataCollatorForWholeWordMask = functools.partial(
            transformers.DataCollatorForLanguageModeling, whole_word_mask=True)
    import pytorch_lightning as pl
    import torchmetrics
    if "pytorch_lightning.metrics" not in sys.modules:
        module = types.ModuleType("pytorch_lightning.metrics")
        module.Metric = torchmetrics.Metric
        sys.modules["pytorch_lightning.metrics"] = module
    if not hasattr(pl, "metrics"):
        pl.metrics = sys.modules["pytorch_lightning.metrics"]


def _f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    tp, fp, fn = tp.float(), fp.float(), fn.float()
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1e-12), torch.zeros_like(den))


def tm09_f1_score(preds: torch.Tensor, target: torch.Tensor, average: str = "micro", num_classes: int | None = None,
                  threshold: float = 0.5, **_: Any) -> torch.Tensor:
    """torchmetrics 0.9 ``f1_score`` on the multilabel inputs the references feed it (probabilities or 0/1)."""
    preds = (preds >= threshold).long() if preds.is_floating_point() else preds.long()
    target = target.long()
    tp, fp, fn = preds * target, preds * (1 - target), (1 - preds) * target
    if average == "micro":
        return _f1_from_counts(tp.sum(), fp.sum(), fn.sum())
    if average == "samples":
        return _f1_from_counts(tp.sum(1), fp.sum(1), fn.sum(1)).mean()
    tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    score = _f1_from_counts(tp, fp, fn)
    if average == "macro":
        weight = (tp + fp + fn != 0).float()     # 0.9 ignores labels absent from both predictions and targets
    elif average == "weighted":
        weight = (tp + fn).float()
    else:
        return score
    return (score * weight).sum() / weight.sum()


def tm09_auroc(preds: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, **_: Any) -> torch.Tensor:
    """torchmetrics 0.9 ``auroc``: macro one-vs-rest on [N, C] scores, binary otherwise."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc
    if preds.ndim == 2 and preds.shape[-1] > 1:
        return multiclass_auroc(preds, target.long(), num_classes=preds.shape[-1], average="macro")
    return binary_auroc(preds.reshape(-1), target.reshape(-1).long())


def patch_my_metrics(module: types.ModuleType) -> None:
    """Point a reference's ``gadgets.my_metrics`` at the torchmetrics-0.9 functional semantics."""
    module.f1_score = tm09_f1_score
    module.auroc = tm09_auroc


def offline_load_pretrained(vit_module: types.ModuleType) -> None:
    """Make the reference's ``load_pretrained`` a no-op: random init, no download."""
    def load_pretrained(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        return None
    vit_module.load_pretrained = load_pretrained


TINY_VIT = "vit_tiny_from_config"


def add_tiny_vit_factory(vit_module: types.ModuleType, name: str = TINY_VIT) -> str:
    """Register ``vit_module.<name>``: the reference's own ``_create_vision_transformer`` with the config's
    image/patch size, width, depth, heads and MLP ratio (its ``vit_*`` factories hard-code ViT-B/32-384).
    Select it with the config key ``vit=<name>``; returns the name."""
    def factory(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        c = kwargs["config"]
        return vit_module._create_vision_transformer(
            "vit_base_patch32_384", pretrained=pretrained, img_size=c["image_size"], patch_size=c["patch_size"],
            embed_dim=c["hidden_size"], depth=c["num_layers"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
            **kwargs)
    setattr(vit_module, name, factory)
    return name


@contextlib.contextmanager
def cpu_get_device() -> Iterator[None]:
    """DCP calls ``.to(t.get_device())``; on CPU that is ``-1`` (an invalid device). Answer ``"cpu"`` instead."""
    original = torch.Tensor.get_device

    def get_device(self: torch.Tensor) -> Any:
        return "cpu" if self.device.type == "cpu" else original(self)

    torch.Tensor.get_device = get_device
    try:
        yield
    finally:
        torch.Tensor.get_device = original


# ------------------------------------------------------------------------------------------- configs, models
def sacred_config(ex: Any, task: str, updates: dict[str, Any]) -> dict[str, Any]:
    """The reference's resolved Sacred config for ``task_finetune_<task>`` plus ``updates`` (its own config
    code runs; nothing is re-typed here)."""
    captured: dict[str, Any] = {}

    def main(_config: dict) -> None:
        captured.update(copy.deepcopy(_config))

    ex.main(main)
    ex.run(named_configs=[f"task_finetune_{task}"], config_updates=updates, options={"--loglevel": "ERROR"})
    return captured


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """The reference constructors print their prompt tensors."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def perturb_parameters(model: torch.nn.Module, scale: float = 0.1) -> None:
    """``p += scale * N(0, 1)`` for every parameter (frozen ones too), seeded by ``crc32(name)``: non-trivial
    LayerNorm affines, biases and prompts, independent of construction order."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def legacy_adamw_step(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float,
                      betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.Tensor:
    """One step from zero state of the legacy transformers ``AdamW(correct_bias=True)`` that the references were
    trained with: bias-corrected ``lr·√(1−β2)/(1−β1)·m/(√v+eps)``, then decoupled ``p −= lr·wd·p``."""
    b1, b2 = betas
    m = (1 - b1) * grad
    v = (1 - b2) * grad * grad
    step_size = lr * math.sqrt(1 - b2) / (1 - b1)
    out = param - step_size * m / (v.sqrt() + eps)
    if weight_decay > 0:
        out = out - lr * weight_decay * out
    return out


def reference_optimizer(model: torch.nn.Module, set_schedule: Callable[[Any], Any]) -> torch.optim.Optimizer:
    """The optimizer of the reference's own ``set_schedule`` (its no-decay and head-name groups), called with a
    stand-in trainer (it only reads ``max_steps``); every group at its base lr (the warm-up scheduler it also
    builds has already scaled ``lr`` to 0 and is dropped)."""
    stand_in = types.SimpleNamespace(max_steps=10, max_epochs=1, accumulate_grad_batches=1)
    owner = type(model)
    saved = owner.__dict__.get("trainer")
    owner.trainer = property(lambda self: stand_in)
    try:
        optimizers, _ = set_schedule(model)
    finally:
        if saved is None:
            del owner.trainer
        else:
            owner.trainer = saved
    optimizer = optimizers[0]
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    return optimizer


def reference_param_groups(model: torch.nn.Module, set_schedule: Callable[[Any], Any]) -> dict[str, dict[str, float]]:
    """name -> {lr, weight_decay} of every trainable parameter in the reference's ``set_schedule`` groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {"lr": float(g["lr"]), "weight_decay": float(g["weight_decay"])}
            for g in reference_optimizer(model, set_schedule).param_groups for p in g["params"] if p.requires_grad}


# ------------------------------------------------------------------------------------------- output files
def share_equal_tensors(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``other`` with every tensor equal to ``first``'s under the same key replaced by ``first``'s object, so
    torch.save stores it once."""
    return {k: first[k] if k in first and first[k].shape == v.shape and first[k].dtype == v.dtype
            and torch.equal(first[k], v) else v for k, v in other.items()}


def detached(tree: Any) -> Any:
    """Tensors detached, contiguous and cloned (no autograd history, no views of bigger storages)."""
    if torch.is_tensor(tree):
        return tree.detach().contiguous().clone()
    if isinstance(tree, dict):
        return {k: detached(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(detached(v) for v in tree)
    return tree


def save_deterministic(obj: Any, path: Path | str) -> str:
    """torch.save ``obj`` to ``path`` (bytes depend on the content only: the zip records carry no time) and
    return its sha256."""
    import hashlib
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def repo_root() -> Path:
    """The mdpl repository root (two levels above this file)."""
    return Path(__file__).resolve().parents[2]


def fixtures_dir() -> Path:
    return repo_root() / "tests" / "fixtures"


def prepare_reference(refs_dir: Path | str, key: str) -> Path:
    """Verify the checkout of reference ``key``, install the library shims and put it on ``sys.path``."""
    path = verify_checkout(refs_dir, key)
    install_library_shims()
    import_path(path)
    return path


def refs_argument(description: str, argv: list[str] | None = None) -> Any:
    """Parse ``--refs REFS_DIR`` (the folder holding the reference checkouts) and ``--out DIR``."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--refs", required=True, type=Path,
                        help="folder holding the reference checkouts (" +
                             ", ".join(r.folder for r in REFERENCES.values()) + ")")
    parser.add_argument("--out", type=Path, default=fixtures_dir(), help="output folder (default tests/fixtures)")
    return parser.parse_args(argv)


def lightning2_module(cls: type) -> type:
    """Subclass of a reference LightningModule that Lightning 2 accepts for ``fit``: it refuses modules defining the
    removed ``*_epoch_end(outputs)`` hooks (they only aggregate metrics), so they are hidden."""
    return type(cls.__name__, (cls,), {"training_epoch_end": None, "validation_epoch_end": None,
                                       "test_epoch_end": None, "__module__": cls.__module__})


# ------------------------------------------------------------------------------------------- fixture records
def classification_loss(dataset: str, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The references' task losses: BCE-with-logits on MM-IMDb's multi-hot labels, cross-entropy otherwise (means)."""
    if dataset == "mmimdb":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
    return torch.nn.functional.cross_entropy(logits, label.long())


def sampled_grad(name: str, grad: torch.Tensor, count: int) -> dict:
    """A gradient too large to store: ``count`` flat indices chosen by a generator seeded from ``name``, their
    values, and the float64 norm."""
    flat = grad.reshape(-1)
    g = torch.Generator().manual_seed(sum(name.encode()))
    idx = torch.randperm(flat.numel(), generator=g)[:count].sort().values
    return {"idx": idx, "val": flat[idx].clone(), "norm": flat.double().norm()}


def stored_grad(name: str, grad: torch.Tensor, full_max: int, count: int) -> dict:
    """``{"full": grad}`` up to ``full_max`` values, else :func:`sampled_grad`."""
    return {"full": grad.clone()} if grad.numel() <= full_max else sampled_grad(name, grad, count)


def share_heads(heads: dict[str, dict]) -> dict[str, dict]:
    """Records per dataset head whose tensors equal the first head's (its batch, its top-level tensors) hold the
    first head's tensor objects, so that ``torch.save`` stores each once."""
    first, *rest = heads.values()
    for rec in rest:
        rec["batch"] = share_equal_tensors(first["batch"], rec["batch"])
        top = {k: v for k, v in rec.items() if torch.is_tensor(v)}
        rec.update(share_equal_tensors({k: v for k, v in first.items() if torch.is_tensor(v)}, top))
    return heads


def write_fixtures(prefix: str, configs: Any, make: Callable[[str], Any], out: Path) -> None:
    """``ref_<prefix>_<config>.pt`` in ``out`` for every config (``save_deterministic``), one line each with its
    SHA-256."""
    for name in configs:
        path = Path(out) / f"ref_{prefix}_{name}.pt"
        print(f"{path.name}  sha256 {save_deterministic(make(name), path)}")


DATASET_CLASSES = {"mmimdb": 23, "food101": 101, "hatememes": 2}
"""The three datasets' head widths, in the references' order."""


def prepare_tf4_reference(refs_dir: Path | str, key: str, script: str, defect: str) -> Path:
    """The checkout of reference ``key`` put on ``sys.path``, after checking that this interpreter has transformers
    4.x (one ``error:`` line otherwise: ``defect`` names why the reference needs it) and silencing the old stack."""
    import transformers
    if int(transformers.__version__.split(".")[0]) != 4:
        raise SystemExit(f"error: {script} needs transformers 4.x ({defect}), this interpreter has "
                         f"{transformers.__version__}: run it with a transformers-4.57.1 environment")
    path = verify_checkout(refs_dir, key)
    quiet_warnings()
    import_path(path)
    return path


def generator_main(description: str, prefix: str, configs: Any, load: Callable[[Path], Any],
                   make: Callable[[Any, str], Any], argv: list[str] | None = None) -> int:
    """A generator's command line: ``--refs`` / ``--out``, one thread (one summation order on every machine), the
    reference ``load(refs_dir)``, then ``ref_<prefix>_<config>.pt`` = ``make(reference, config)`` for every config."""
    args = refs_argument(description, argv)
    sys.path.insert(0, str(repo_root() / "tests"))
    torch.set_num_threads(1)
    reference = load(args.refs)
    write_fixtures(prefix, configs, lambda name: make(reference, name), args.out)
    return 0


@contextlib.contextmanager
def ordered_patches(padding: bool = True) -> Iterator[None]:
    """``torch.multinomial`` (the Hugging Face ViLT's random patch order) as the identity order: valid patches
    row-major, padding draws the first padding patches (all equal: the zero patch at a zero position). `padding`
    False: asserts that no padding is drawn (every patch valid)."""
    original = torch.multinomial

    def identity(weights: torch.Tensor, num_samples: int, replacement: bool = False, **_: Any) -> torch.Tensor:
        assert num_samples <= weights.numel() and (padding or not replacement), "unexpected patch draw"
        return torch.arange(num_samples)

    torch.multinomial = identity
    try:
        yield
    finally:
        torch.multinomial = original


PIXEL_LEVELS = 127
"""Fixture pixels are multiples of 1/127 (stored as int8; 1.0, the dummy image, is 127): exact in float32 on both
sides."""
CLS, SEP = 3, 4
"""[CLS] / [SEP] of the tiny WordPiece vocabularies of the RAGPT-ViLT fixtures."""
