"""Sacred configuration of mdpl: every key the framework reads, grouped, with the named configs.

`python run.py print_config with task_finetune_mmimdb map` shows the resolved values.
A run names a task (the dataset settings of the references) and a method (a preset such as `map`, or
`prompt_method=...`; there is no default method), then any `key=value` overrides.

The named configs set disjoint keys, so their order does not matter: a task sets dataset-level keys, a
method preset only `prompt_method` (the method's own keys, learning rate, seed and backbone follow from it in
`base_config`), `on_clip` / `on_vilt` only `backbone`. `tiny` and `demo` also change the run size the task
sets, so they go after the task; run.py refuses the other order (`check_named_configs`), two configs of one
kind (e.g. `map memprompt`) and `tiny` with `demo`.
"""
from __future__ import annotations

from collections.abc import Sequence

from sacred import Experiment

from mdpl.backbones.registry import available_backbones, backbone_card
from mdpl.config import backbone_size_defaults, backbone_tiny_sizes
from mdpl.config.sections import (DataConfig, DemoConfig, ExperimentConfig, LoggingConfig, MissingConfig, ModelConfig,
                                  OptimConfig, TrainerConfig)
from mdpl.errors import UserInputError
from mdpl.prompts.keys import (method_default, method_presets, padding_is_inert, paper_backbone, paper_missing_type,
                               paper_run)

ex = Experiment("mdpl", save_git_info=False)

EXPERIMENT, LOGGING, DATA, MISSING = ExperimentConfig(), LoggingConfig(), DataConfig(), MissingConfig()
MODEL, OPTIM, TRAINER, DEMO = ModelConfig(), OptimConfig(), TrainerConfig(), DemoConfig()

NAMED_CONFIG_KINDS = {
    "task": ("task_finetune_mmimdb", "task_finetune_food101", "task_finetune_hatememes"),
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


@ex.config
def base_config():
    # Defaults come from the run config's dataclasses (mdpl/config/sections.py) and, where they follow from the
    # method, from its class (mdpl.prompts.keys); this scope lists the keys and says what they mean.
    # --- experiment -----------------------------------------------------------------------------
    exp_name = EXPERIMENT.exp_name
    prompt_method = EXPERIMENT.prompt_method   # required: 'none' (baseline) | 'map' | 'memprompt' | 'dcp' | 'scp' (or the preset of that name)
    method_sizes = EXPERIMENT.method_sizes     # defaults of the method's own keys: the papers' or 'tiny' (set by tiny, demo)
    backbone = paper_backbone(prompt_method)   # the method's paper backbone; on_clip / on_vilt switch it
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

    # --- method keys (prompt_method above) -------------------------------------------------------
    # Each key is read by the method(s) named in its group and is None unless that method is selected (then its
    # paper's value, or the small one with method_sizes='tiny'; each method's config class, mdpl.prompts). Setting a key of
    # another method is an error naming the method that reads it.
    # MAP
    prompt_type = method_default(prompt_method, method_sizes, "prompt_type")      # 'input' (paper) | 'attention'
    prompt_length = method_default(prompt_method, method_sizes, "prompt_length")  # MAP 16; DCP: total per tower, 36
    prompt_layers = method_default(prompt_method, method_sizes, "prompt_layers")  # paper: [0, ..., 5]
    learnt_p = method_default(prompt_method, method_sizes, "learnt_p")
    multi_layer_prompt = method_default(prompt_method, method_sizes, "multi_layer_prompt")
    # MemPrompt
    gen_prompt_length = method_default(prompt_method, method_sizes, "gen_prompt_length")        # paper: 16
    gen_prompt_layers = method_default(prompt_method, method_sizes, "gen_prompt_layers")        # paper: [0, ..., 5]
    shared_prompt_length = method_default(prompt_method, method_sizes, "shared_prompt_length")  # paper: 16
    shared_prompt_layers = method_default(prompt_method, method_sizes, "shared_prompt_layers")  # paper: [0, ..., 5]
    mem_size = method_default(prompt_method, method_sizes, "mem_size")                          # paper: 16
    top_k = method_default(prompt_method, method_sizes, "top_k")                                # paper: 5
    bottleneck_dim = method_default(prompt_method, method_sizes, "bottleneck_dim")  # paper: 48 (hidden_size // 16)
    # True: retrieval max-pool ignores padding (batch-invariant, D-30)
    memprompt_mask_padding = method_default(prompt_method, method_sizes, "memprompt_mask_padding")
    # DCP (prompt_length above)
    prompt_depth = method_default(prompt_method, method_sizes, "prompt_depth")      # paper: 6 prompted layers
    # off: independent per-layer per-type prompts (our definition)
    dcp_correlated = method_default(prompt_method, method_sizes, "dcp_correlated")
    dcp_dynamic = method_default(prompt_method, method_sizes, "dcp_dynamic")        # off: no dynamic prompts
    dcp_common = method_default(prompt_method, method_sizes, "dcp_common")          # off: no modal-common prompts
    # DCP ablation switches of the paper's Tables 1-3, our readings (docs/methods.md §6.7); defaults = the reference
    # correlated-chain projections F_l: 'mlp' (LN -> bottleneck MLP, r = 16) | 'fc' (LN -> one Linear)
    dcp_projection = method_default(prompt_method, method_sizes, "dcp_projection")
    # 'bi': each side's next prompts from both sides' previous ones | 'uni': from its own side's only
    dcp_correlated_inputs = method_default(prompt_method, method_sizes, "dcp_correlated_inputs")
    dcp_dynamic_depth = method_default(prompt_method, method_sizes, "dcp_dynamic_depth")  # fresh Dyn at blocks 0..d-1
    # 'attention' | 'max' | 'min' | 'avg': pool the block input in n windows, then one Linear
    dcp_dynamic_mode = method_default(prompt_method, method_sizes, "dcp_dynamic_mode")
    dcp_common_depth = method_default(prompt_method, method_sizes, "dcp_common_depth")    # fresh C at blocks 0..d-1
    # modal-common projections G: 'mlp' (bottleneck, text width // dcp_common_reduction) | 'fc' (one Linear)
    dcp_common_projection = method_default(prompt_method, method_sizes, "dcp_common_projection")
    dcp_common_reduction = method_default(prompt_method, method_sizes, "dcp_common_reduction")  # paper: 16
    # channel widths for Table 5's parameter budgets (this key and the next)
    dcp_reduction = method_default(prompt_method, method_sizes, "dcp_reduction")  # correlated MLP hidden = in // r; 16
    # dynamic prompts' attention width; 0 = the stream's width (the reference)
    dcp_dynamic_width = method_default(prompt_method, method_sizes, "dcp_dynamic_width")
    # reference: dynamic queries are frozen (saved as buffers here, D-34)
    dcp_dynamic_trainable = method_default(prompt_method, method_sizes, "dcp_dynamic_trainable")
    # reference: the per-layer projections start as identical copies (D-39)
    dcp_independent_init = method_default(prompt_method, method_sizes, "dcp_independent_init")
    # skip the tower whose feature half is zeroed (exact)
    dcp_skip_missing = method_default(prompt_method, method_sizes, "dcp_skip_missing")
    # a file with the dynamic queries of a reference DCP run (its checkpoints lack them): needed to evaluate one
    dcp_dynamic_queries = method_default(prompt_method, method_sizes, "dcp_dynamic_queries")
    # SCP (docs/methods.md §14): static prompts in the lower blocks, prompts read from a key/value pool by the block's
    # own query of the read-out token (ViLT: text [CLS]) in the upper blocks; every prompted block adds k + F tokens
    scp_length = method_default(prompt_method, method_sizes, "scp_length")              # k, generated tokens: 12
    scp_pool_size = method_default(prompt_method, method_sizes, "scp_pool_size")        # S: 32 (reference config: 1024)
    scp_fixed_prompts = method_default(prompt_method, method_sizes, "scp_fixed_prompts")  # F, learned tokens: 4
    scp_layers = method_default(prompt_method, method_sizes, "scp_layers")              # conditioned: [6, ..., 11]
    scp_static_layers = method_default(prompt_method, method_sizes, "scp_static_layers")  # static: [0, ..., 5]
    scp_pool_dropout = method_default(prompt_method, method_sizes, "scp_pool_dropout")  # on the pool attention: 0.1
    # pool attention scale: 'width' 1/sqrt(width) (the reference, D-58) | 'chunk' 1/sqrt(width / k)
    scp_pool_scale = method_default(prompt_method, method_sizes, "scp_pool_scale")
    # True: the query norm uses the block's own epsilon (its exact query); False: 1e-5 as the reference (D-57)
    scp_block_eps = method_default(prompt_method, method_sizes, "scp_block_eps")
    # MoRA (docs/methods.md §15): per-dataset reference values (Food-101 q,v ranks 4 alpha 0.01; MM-IMDb q,k ranks 4
    # alpha 0.001; Hateful Memes k,v ranks 8 alpha 0.1)
    mora_maps = method_default(prompt_method, method_sizes, "mora_maps", dataset)          # two of q, k, v
    mora_start_layer = method_default(prompt_method, method_sizes, "mora_start_layer", dataset)   # blocks 10, 11
    mora_shared_rank = method_default(prompt_method, method_sizes, "mora_shared_rank", dataset)   # pair shared by towers
    mora_image_rank = method_default(prompt_method, method_sizes, "mora_image_rank", dataset)
    mora_text_rank = method_default(prompt_method, method_sizes, "mora_text_rank", dataset)
    mora_alpha = method_default(prompt_method, method_sizes, "mora_alpha", dataset)
    mora_dropout = method_default(prompt_method, method_sizes, "mora_dropout", dataset)   # on the adapted input

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
    demo_methods = DEMO.demo_methods
    demo_test_types = DEMO.demo_test_types   # evaluation scenarios: types x ratios (one pass, sweep)
    demo_test_ratios = DEMO.demo_test_ratios


@ex.named_config
def task_finetune_mmimdb():
    exp_name = "finetune_mmimdb"
    dataset = "mmimdb"
    batch_size = 256
    max_epoch = 20
    max_steps = None
    warmup_steps = 0.1
    weight_decay = 2e-2
    val_check_interval = 0.2
    max_text_len = 1024
    interpolate_text_positions = True  # the reference interpolates ViLT's 40 text positions to max_text_len


@ex.named_config
def task_finetune_food101():
    exp_name = "finetune_food101"
    dataset = "food101"
    batch_size = 256
    max_epoch = 20
    max_steps = None
    warmup_steps = 0.1
    weight_decay = 2e-2
    val_check_interval = 0.2
    max_text_len = 512
    interpolate_text_positions = True  # the reference interpolates ViLT's 40 text positions to max_text_len


@ex.named_config
def task_finetune_hatememes():
    exp_name = "finetune_hatememes"
    dataset = "hatememes"
    batch_size = 256
    max_epoch = 20
    max_steps = None
    warmup_steps = 0.1
    weight_decay = 2e-2
    val_check_interval = 0.11
    max_text_len = 128
    interpolate_text_positions = True  # the reference interpolates ViLT's 40 text positions to max_text_len


# --- method presets: `map` is short for prompt_method=map, and so on. The method's own keys, its learning
# rate and seed (each method's paper_run) and its paper's backbone follow from prompt_method in base_config, so a preset
# sets nothing else and composes with a task config in either order.


@ex.named_config
def baseline():
    # Frozen ViLT, trainable pooler + head (the reference point of every table, D-25); lr 1e-2, seed 0.
    prompt_method = "none"


@ex.named_config
def map():
    # MAP (CVPR 2023): input-level missing-aware prompts, 16 tokens on layers 0-5, lr 1e-2, seed 0.
    prompt_method = "map"


@ex.named_config
def memprompt():
    # MemPrompt (IJCAI 2025), as its reference config: lr 5e-3 for MM-IMDb/Food-101 and 1e-3 for Hateful Memes,
    # seed 42, missing_type 'image' on every split (D-32; MAP and DCP use 'both': set missing_type to compare them).
    prompt_method = "memprompt"


@ex.named_config
def dcp():
    # DCP (NeurIPS 2024) on CLIP ViT-B/16: 36 prompt tokens per tower on 6 layers, 224 px, lr 1e-2, seed 0.
    prompt_method = "dcp"


@ex.named_config
def scp():
    # SCP (WACV 2025) as its documented command: static prompts (16 tokens) on layers 0-5, conditioned prompts
    # (4 fixed + 12 read from a 32-entry pool) on layers 6-11, lr 1e-2, seed 0 (docs/methods.md §14.5).
    prompt_method = "scp"


@ex.named_config
def mora():
    # MoRA (ICLR 2026) on CLIP ViT-B/16: shared + specific DoRA updates of two attention projections in blocks 10-11
    # of both towers, the reference's per-dataset values, lr 1e-2, seed 42; merged into the weights for testing.
    prompt_method = "mora"


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
    "dataset": "food101",
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
ex.add_named_config("demo", {**backbone_card("vilt").sizes.tiny_values(), **DEMO_RUN})
