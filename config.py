"""Sacred configuration of mdpl: every key the framework reads, grouped, with the named configs.

`python run.py print_config with task_finetune_mmimdb map` shows the resolved values.
A run names a task (the dataset settings of the references) and a method (a preset such as `map`, or
`prompt_method=...`; there is no default method), then any `key=value` overrides.

The named configs set disjoint keys, so their order does not matter: a task sets dataset-level keys, a
method preset only `prompt_method` (its learning rate, seed and backbone follow from it in `base_config`, its own
keys in the hook `method_keys_of_the_selected_method`), `on_<backbone>` only `backbone`. `tiny` and `demo` also change the run size the task
sets, so they go after the task; run.py refuses the other order (`check_named_configs`), two configs of one
kind (e.g. `map memprompt`) and `tiny` with `demo`.

Besides the demo's settings, nothing here names a method, dataset or backbone: the method keys and presets, the
`task_finetune_<dataset>` configs, the `on_<backbone>` switches and the backbones' keys are read from the
registries, which include plugins (run.py imports them first; mdpl/plugins.py).
"""
from __future__ import annotations

from collections.abc import Sequence

from sacred import Experiment

from mdpl.backbones.registry import available_backbones, backbone_card, default_backbone, method_backbone
from mdpl.config import backbone_size_defaults, backbone_tiny_sizes, method_keys_of_all
from mdpl.config.sections import (DataConfig, DemoConfig, ExperimentConfig, LoggingConfig, MissingConfig, ModelConfig,
                                  OptimConfig, TrainerConfig)
from mdpl.data.registry import available_datasets, dataset_spec, demo_dataset
from mdpl.errors import UserInputError
from mdpl.prompts.keys import (method_defaults, method_image_transform, method_presets, padding_is_inert,
                               paper_missing_type, paper_run)

ex = Experiment("mdpl", save_git_info=False)

EXPERIMENT, LOGGING, DATA, MISSING = ExperimentConfig(), LoggingConfig(), DataConfig(), MissingConfig()
MODEL, OPTIM, TRAINER, DEMO = ModelConfig(), OptimConfig(), TrainerConfig(), DemoConfig()

NAMED_CONFIG_KINDS = {
    "task": tuple(f"task_finetune_{name}" for name in available_datasets()),
    "method preset": tuple(method_presets().values()),
    "backbone switch": tuple(f"on_{name}" for name in available_backbones()),
    "size config": ("tiny", "demo"),
}


def check_named_configs(names: Sequence[str]) -> None:
    """Refuse named-config lists whose result would depend on their order (UserInputError, one line).

    At most one config of each kind; `tiny` / `demo` after the task (both set batch_size, max_epoch,
    max_text_len, ...). Every other pair of named configs sets disjoint keys.
    """
    names = list(names)
    for kind, members in NAMED_CONFIG_KINDS.items():
        used = [n for n in names if n in members]
        if len(used) > 1:
            raise UserInputError(f"named configs {' and '.join(used)} are both a {kind}: name one")
    tasks = [i for i, n in enumerate(names) if n in NAMED_CONFIG_KINDS["task"]]
    for i, name in enumerate(names):
        if name in NAMED_CONFIG_KINDS["size config"] and tasks and tasks[0] > i:
            raise UserInputError(f"name `{name}` after `{names[tasks[0]]}` (`with ... {names[tasks[0]]} ... {name}`): "
                                 f"both set the run size and the later one wins")


@ex.config_hook
def seed_is_an_integer(config, command_name, logger):
    """Sacred seeds its RNGs from `seed` before run.py sees the config: a non-integer seed would be a traceback."""
    seed = config.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        from mdpl.errors import exit_with
        exit_with(UserInputError(f"seed={seed!r} must be an integer, e.g. seed=0"))
    return {}


ex.add_config(backbone_size_defaults())
"""Every registered backbone's own keys (hidden_size, clip_*, coca_*, ...) with their defaults: the fields of its card's
sizes dataclass (mdpl/backbones/<name>.py), so a backbone's keys are declared once, in its file."""
ex.add_config(dict.fromkeys(sorted(method_keys_of_all())))
"""Every registered method's own keys (prompt_length, top_k, dcp_*, ...), None here: the fields of its config class
(mdpl/prompts/<name>.py); the selected method's are filled by `method_keys_of_the_selected_method`."""


@ex.config_hook
def method_keys_of_the_selected_method(config, command_name, logger):
    """The selected method's keys that the command line and named configs left None take its defaults
    (``method_sizes``: the paper's or TINY); Sacred lays the user's values over what a hook returns."""
    method, sizes = str(config.get("prompt_method") or ""), str(config.get("method_sizes") or "paper")
    dataset = str(config.get("dataset") or "")   # a method's reference values may differ per dataset (MoRA)
    return {key: value for key, value in method_defaults(method, sizes, dataset).items() if config.get(key) is None}


@ex.config
def base_config():
    # Defaults come from the run config's dataclasses (mdpl/config/sections.py) and, where they follow from the
    # method, from its class (mdpl.prompts.keys); this scope lists the keys and says what they mean.
    # --- experiment -----------------------------------------------------------------------------
    exp_name = EXPERIMENT.exp_name
    prompt_method = EXPERIMENT.prompt_method   # required: 'none' (baseline) | 'map' | 'memprompt' | 'dcp' | 'scp' | 'mora' | 'msps' | a plugin's (or its preset)
    method_sizes = EXPERIMENT.method_sizes     # defaults of the method's own keys: the papers' or 'tiny' (set by tiny, demo)
    backbone = method_backbone(prompt_method)  # the method's paper backbone; on_clip / on_vilt switch it
    seed = paper_run(prompt_method, (0, EXPERIMENT.seed))[1]  # seeds Lightning, the model init and every missing table
    log_dir = LOGGING.log_dir     # run directories go to log_dir/<exp_name>_seed<seed>_from_<ckpt>/

    # --- data -----------------------------------------------------------------------------------
    dataset = DATA.dataset        # a registered dataset (mdpl/data/registry.py); the task_* configs set it
    data_root = DATA.data_root    # folder holding <dataset>_{train,dev|val,test}.arrow (make_arrow.py --out)
    num_workers = DATA.num_workers
    batch_size = DATA.batch_size  # effective batch; accumulation = batch_size // (per_gpu_batchsize * devices)
    per_gpu_batchsize = DATA.per_gpu_batchsize  # micro-batch per device
    image_size = backbone_card(backbone).sizes().image_size   # the backbone's: ViLT 'pixelbert' shorter side 384; CLIP, CoCa 224
    # ViLT: pad each batch to its longest text, not max_text_len (much faster on MM-IMDb/Food-101). On by default where it
    # is exact (the baseline, MAP, DCP mask padded keys: outputs unchanged up to rounding); off for MemPrompt, whose text
    # query max-pools over [PAD] too (as the reference): set True there and it pools over real tokens only, which
    # differs from the reference but does not depend on the batch.
    dynamic_text_padding = padding_is_inert(prompt_method)
    tokenizer = DATA.tokenizer    # ViLT: local folder with vocab.txt (BERT WordPiece) or "" = HF cache of bert-base-uncased
    mmimdb_items = DATA.mmimdb_items  # 'plot': one item per plot (reference parity); 'movie': first plot only
    # Opt-in pixel cache (mdpl/data/pixel_cache.py): each split's resized uint8 images, written on first use and
    # memory-mapped after; the model gets the same tensors, bit for bit. Disk ~ images x H x W x 3 bytes per transform
    # (README "Data"); a cache of another arrow file / image_size / transform is refused.
    pixel_cache = DATA.pixel_cache  # "" = off (decode every epoch) | a folder | True = <data_root>/pixel_cache
    # "" = the backbone's image transform (ViLT 'pixelbert', CLIP/CoCa 'clip') | 'square': both sides to image_size,
    # aspect ratio not kept; default: the method's (RAGPT: 'square', every image gives the full patch grid)
    image_transform = method_image_transform(prompt_method)
    # the split the validation loop reads (logged as val/..., so checkpoint selection and early stopping follow it):
    # 'val' | 'test' (only to reproduce a reference protocol that selects on the test split)
    selection_split = DATA.selection_split

    # --- missing modalities (docs/methods.md §1.4) -------------------------------------------------------
    missing_ratio = MISSING.missing_ratio
    # 'text' | 'image' | 'both'; default: the method's reference setting ('both'; MemPrompt's reference config: 'image')
    missing_type = dict.fromkeys(("train", "val", "test"), paper_missing_type(prompt_method))
    both_ratio = MISSING.both_ratio  # for 'both': share of the missing rows that miss the image
    missing_table_root = MISSING.missing_table_root  # "" = <data_root>/missing_tables
    # per split: a missing table saved by a reference repo (.pt, one 0/1/2 per row) used instead of mdpl's seeded one
    reference_missing_tables = MISSING.reference_missing_tables
    simulate_missing = MISSING.simulate_missing  # train only: complete rows get a random type per epoch
    test_ratio = MISSING.test_ratio  # evaluation override of missing_ratio val/test
    test_type = MISSING.test_type    # evaluation override of missing_type val/test
    test_types = MISSING.test_types  # evaluation sweep: list of types, e.g. [text,image,both] (mdpl/engine/sweep.py)
    test_ratios = MISSING.test_ratios  # evaluation sweep: list of ratios, e.g. [0.1,0.3,0.5,0.7,0.9]; every type x ratio in one pass

    # --- model (`backbone` above; its own keys, e.g. hidden_size, clip_*, coca_*: its card, added above) -----------
    load_path = MODEL.load_path   # ViLT .ckpt / HF ViltModel weights; test_only: a trained mdpl or reference MAP/MemPrompt .ckpt
    finetune = MODEL.finetune     # True: train the backbone too (baseline 'finetune' option)
    frozen_eval_mode = MODEL.frozen_eval_mode  # True: frozen modules in eval mode (no dropout); reference keeps train mode

    # --- method keys: every registered method's config fields (added below by `ex.add_config`) ---------------
    # Each is None unless the selected method reads it: then the user's value, or the method's default (its paper's,
    # or the TINY value with method_sizes='tiny'; `method_keys_of_the_selected_method` fills them). Setting a key
    # of another method is an error naming the method that reads it.
    plugins = EXPERIMENT.plugins  # modules to import first (one-off methods, backbones, datasets; mdpl.plugins)

    # --- optimisation (docs/methods.md §7.3-7.4) -------------------------------------------------------
    optimizer_impl = OPTIM.optimizer_impl  # 'legacy_hf' (reference AdamW update) | 'torch'
    learning_rate = paper_run(prompt_method, (OPTIM.learning_rate, 0), dataset)[0]   # the method's reference value on the dataset
    weight_decay = OPTIM.weight_decay
    lr_mult = OPTIM.lr_mult
    decay_power = OPTIM.decay_power  # polynomial power, or 'cosine'
    end_lr = OPTIM.end_lr
    max_epoch = OPTIM.max_epoch
    max_steps = OPTIM.max_steps
    warmup_steps = OPTIM.warmup_steps  # int = steps, float < 1 = fraction of total steps

    # --- trainer --------------------------------------------------------------------------------
    num_gpus = TRAINER.num_gpus   # devices per node (0 = CPU)
    num_nodes = TRAINER.num_nodes
    num_cpu_processes = TRAINER.num_cpu_processes  # num_gpus=0: CPU processes per node; > 1 = Lightning DDP on CPU (gloo backend)
    precision = TRAINER.precision  # '32-true' | '16-mixed' | 'bf16-mixed' (16 / 32 accepted); the references used fp16 ('16-mixed')
    compile = TRAINER.compile     # True: torch.compile the classifier (opt-in; first steps are slow while it compiles)
    val_check_interval = TRAINER.val_check_interval
    test_only = TRAINER.test_only
    fast_dev_run = TRAINER.fast_dev_run
    deterministic = TRAINER.deterministic  # Lightning `deterministic`: True | 'warn' (deterministic kernels where they exist) | False
    find_unused_parameters = TRAINER.find_unused_parameters  # DDP: True only for methods whose forward skips trainable parameters
    resume_from = TRAINER.resume_from  # a last.ckpt/any .ckpt of a killed run: restores model, optimizer, scheduler, step, RNG
    resume = TRAINER.resume       # True: resume from <latest version of this run's base dir>/checkpoints/last.ckpt
    # 'probabilities' (mdpl: F1 at sigmoid >= 0.5, AUROC of softmax[:, 1]) | 'logits' (torchmetrics 0.9.3 fed raw logits,
    # as some references did: F1 at logit >= 0.5, AUROC = macro over the two raw logit columns)
    metric_inputs = TRAINER.metric_inputs
    primary_metric = TRAINER.primary_metric  # the_metric (selection): "" = the dataset's (F1_Macro, accuracy, AUROC) | e.g. F1_Micro
    checkpoint_every_n_steps = TRAINER.checkpoint_every_n_steps  # > 0: also save last.ckpt every n optimizer steps (mid-epoch resume); 0 = epoch ends only
    # loggers, a name or a list: tensorboard, csv, wandb, mlflow (e.g. logger=csv or logger=[csv,wandb]); wandb / mlflow
    # need their package; wandb runs offline (<run_dir>/wandb, `wandb sync` later) unless WANDB_MODE is set, mlflow
    # writes <run_dir>/mlruns unless MLFLOW_TRACKING_URI is set
    logger = LOGGING.logger

    # --- demo (mdpl/demo.py; `make demo` = `python run.py with demo`) ---------------------------------
    demo = DEMO.demo              # True: run the embedded demo instead of one training run
    demo_dir = DEMO.demo_dir      # synthetic raw + arrow + vocab (reused when present)
    demo_samples = DEMO.demo_samples  # synthetic train / val / test items
    demo_keyword_repeats = DEMO.demo_keyword_repeats  # each synthetic text keyword this many times (a text signal the tiny ViLT learns)
    demo_pretrain_epochs = DEMO.demo_pretrain_epochs  # tiny ViLT trained on complete data, everything trainable
    demo_pretrain_lr = DEMO.demo_pretrain_lr
    demo_epochs = DEMO.demo_epochs  # epochs of each prompt method on the frozen backbone
    demo_methods = DEMO.demo_methods   # []: the baseline, MAP and MemPrompt (the methods whose class sets in_demo)
    demo_test_types = DEMO.demo_test_types   # evaluation scenarios: types x ratios (one pass, sweep)
    demo_test_ratios = DEMO.demo_test_ratios


TASK_RUN = {"batch_size": 256, "max_steps": None, "warmup_steps": 0.1, "weight_decay": 2e-2,
            "interpolate_text_positions": True}   # the reference interpolates ViLT's 40 text positions to max_text_len
"""What every `task_finetune_<dataset>` config sets besides its dataset card's values (the references' fine-tuning)."""


def task_config(name: str) -> dict:
    """`task_finetune_<name>`: the dataset, the common fine-tuning settings and the card's max_text_len, max_epoch,
    val_check_interval (those it states)."""
    spec = dataset_spec(name)
    card = {"max_text_len": spec.max_text_len, "max_epoch": spec.max_epoch,
            "val_check_interval": spec.val_check_interval}
    return {"exp_name": f"finetune_{name}", "dataset": name, **TASK_RUN,
            **{k: v for k, v in card.items() if v is not None}}


for _name in available_datasets():
    ex.add_named_config(f"task_finetune_{_name}", task_config(_name))


# --- method presets: `map` is short for prompt_method=map, and so on (each method class's `preset`). The method's own
# keys, its learning rate and seed (its paper_run) and its paper's backbone follow from prompt_method, so a preset sets
# nothing else and composes with a task config in either order.

for _method, _preset in method_presets().items():
    ex.add_named_config(_preset, {"prompt_method": _method})


# --- backbone switches: run a method on the other backbone (`python run.py with task_finetune_food101 map
# on_clip`, `... dcp on_vilt`). Only the backbone changes (its transform size follows: 224 px CLIP,
# 384 px ViLT); the method's hyper-parameters stay those of its paper.


def _backbone_switch(name: str) -> dict:
    return {"backbone": name}


for _name in available_backbones():
    ex.add_named_config(f"on_{_name}", _backbone_switch(_name))


# --- tiny sizes: tests and the demo (random-initialised backbones, CPU); name them after the task config ------


TINY_RUN = {
    "image_size": 64,
    "max_text_len": 24,
    "method_sizes": "tiny",        # the selected method's keys take small values (the TINY values of its config class)
    "num_gpus": 0,
    "num_workers": 0,
    "precision": "32-true",
    "per_gpu_batchsize": 8,
    "batch_size": 8,
    "max_epoch": 3,
    "max_steps": None,
    "warmup_steps": 0.1,
    "learning_rate": 1e-3,
    "val_check_interval": 1.0,
}
"""`tiny` besides the backbones' small sizes (their cards' TINY values): a 2-layer, 64-wide ViLT / CLIP / CoCa and
short prompts, for CPU tests on synthetic data (random-initialised backbones); name it after the task config."""
ex.add_named_config("tiny", {**backbone_tiny_sizes(), **TINY_RUN})


DEMO_RUN = {
    "demo": True,
    "exp_name": "demo",
    "dataset": demo_dataset(),
    "missing_ratio": {"train": 0.7, "val": 0.7, "test": 0.7},
    "missing_type": {"train": "both", "val": "both", "test": "both"},
    "image_size": 64,
    "max_text_len": 24,
    "method_sizes": "tiny",        # each demo method's keys take small values (the TINY values of its config class)
    "num_gpus": 0,
    "num_workers": 0,
    "precision": "32-true",
    "per_gpu_batchsize": 16,
    "batch_size": 16,
    "warmup_steps": 0.1,
    "learning_rate": 5e-3,
    "val_check_interval": 1.0,
}
"""The embedded demo (mdpl/demo.py): synthetic Food-101 under demo_dir, a tiny ViLT (its card's TINY sizes)
pre-trained on complete data, then baseline / MAP / MemPrompt trained with 70 % 'both' missing, swept over missing
scenarios."""
ex.add_named_config("demo", {**backbone_card(default_backbone()).sizes.tiny_values(), **DEMO_RUN})
