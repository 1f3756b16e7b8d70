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

from mdpl.errors import UserInputError
from mdpl.prompts.keys import (method_default, method_presets, padding_is_inert, paper_backbone, paper_missing_type,
                               paper_run)

ex = Experiment("mdpl", save_git_info=False)

NAMED_CONFIG_KINDS = {
    "task": ("task_finetune_mmimdb", "task_finetune_food101", "task_finetune_hatememes"),
    "method preset": tuple(method_presets().values()),
    "backbone switch": ("on_clip", "on_vilt", "on_coca"),
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


@ex.config
def base_config():
    # --- experiment -----------------------------------------------------------------------------
    exp_name = "mdpl"
    prompt_method = ""            # required: 'none' (baseline) | 'map' | 'memprompt' | 'dcp' (or the preset of that name)
    method_sizes = "paper"        # defaults of the method's own keys: the papers' or 'tiny' (set by tiny, demo)
    backbone = paper_backbone(prompt_method)   # the method's paper backbone; on_clip / on_vilt switch it
    seed = paper_run(prompt_method, (0, 0))[1]  # seeds Lightning, the model init and every missing table
    log_dir = "result"            # run directories go to log_dir/<exp_name>_seed<seed>_from_<ckpt>/

    # --- data -----------------------------------------------------------------------------------
    dataset = "mmimdb"            # a registered dataset (mdpl/data/registry.py); the task_* configs set it
    data_root = ""                # folder holding <dataset>_{train,dev|val,test}.arrow (make_arrow.py --out)
    num_workers = 8
    batch_size = 256              # effective batch; accumulation = batch_size // (per_gpu_batchsize * devices)
    per_gpu_batchsize = 4         # micro-batch per device
    image_size = 224 if backbone in ("clip", "coca") else 384   # ViLT 'pixelbert' shorter side 384; CLIP, CoCa 224
    max_image_len = -1            # ViLT: cap on image patches per sample (-1 = no cap)
    max_text_len = 40             # ViLT text length (BERT tokens, padded); CLIP always uses 77
    interpolate_text_positions = False  # ViLT: interpolate the checkpoint's 40 text positions to a longer max_text_len
    # ViLT: pad each batch to its longest text, not max_text_len (much faster on MM-IMDb/Food-101). On by default where it
    # is exact (the baseline, MAP, DCP mask padded keys: outputs unchanged up to rounding); off for MemPrompt, whose text
    # query max-pools over [PAD] too (as the reference): set True there and it pools over real tokens only, which
    # differs from the reference but does not depend on the batch.
    dynamic_text_padding = padding_is_inert(prompt_method)
    tokenizer = ""                # ViLT: local folder with vocab.txt (BERT WordPiece) or "" = HF cache of bert-base-uncased
    vocab_size = 30522            # checked against the tokenizer; a mismatch is an error
    mmimdb_items = "plot"         # 'plot': one item per plot (reference parity); 'movie': first plot only
    # Opt-in pixel cache (mdpl/data/pixel_cache.py): each split's resized uint8 images, written on first use and
    # memory-mapped after; the model gets the same tensors, bit for bit. Disk ~ images x H x W x 3 bytes per transform
    # (README "Data"); a cache of another arrow file / image_size / transform is refused.
    pixel_cache = ""              # "" = off (decode every epoch) | a folder | True = <data_root>/pixel_cache

    # --- missing modalities (docs/methods.md §1.4) -------------------------------------------------------
    missing_ratio = {"train": 0.7, "val": 0.7, "test": 0.7}
    # 'text' | 'image' | 'both'; default: the method's reference setting ('both'; MemPrompt's reference config: 'image')
    missing_type = dict.fromkeys(("train", "val", "test"), paper_missing_type(prompt_method))
    both_ratio = 0.5              # for 'both': share of the missing rows that miss the image
    missing_table_root = ""       # "" = <data_root>/missing_tables
    # per split: a missing table saved by a reference repo (.pt, one 0/1/2 per row) used instead of mdpl's seeded one
    reference_missing_tables = {"train": "", "val": "", "test": ""}
    simulate_missing = False      # train only: complete rows get a random type per epoch
    test_ratio = None             # evaluation override of missing_ratio val/test
    test_type = None              # evaluation override of missing_type val/test
    test_types = None             # evaluation sweep: list of types, e.g. [text,image,both] (mdpl/engine/sweep.py)
    test_ratios = None            # evaluation sweep: list of ratios, e.g. [0.1,0.3,0.5,0.7,0.9]; every type x ratio in one pass

    # --- backbone (`backbone` above: 'vilt' = ViT-B/32 + BERT embeddings, single stream; 'clip' = ViT-B/16, two towers)
    load_path = ""                # ViLT .ckpt / HF ViltModel weights; test_only: a trained mdpl or reference MAP/MemPrompt .ckpt
    hidden_size = 768
    num_layers = 12
    num_heads = 12
    mlp_ratio = 4
    patch_size = 32
    drop_rate = 0.1
    # CLIP (docs/methods.md §5); tower sizes default to OpenAI ViT-B/16, only tests change them
    clip_path = ""                # local ViT-B-16.pt (TorchScript archive) or OpenAI-layout state dict; "" = random init
    clip_sha256 = ""              # optional SHA-256 check of clip_path
    clip_embed_dim = 512
    clip_patch_size = 16
    clip_vision_width = 768
    clip_vision_layers = 12
    clip_vision_head_width = 64
    clip_context_length = 77
    clip_vocab_size = 49408
    clip_text_width = 512
    clip_text_heads = 8
    clip_text_layers = 12
    # CoCa (docs/methods.md §5b): open_clip coca_ViT-B-32, its image tower and unimodal text tower; sizes as CLIP's
    coca_path = ""                # local open_clip CoCa state dict (.bin, .pt, .safetensors); "" = random init
    coca_sha256 = ""              # optional SHA-256 check of coca_path
    coca_embed_dim = 512
    coca_patch_size = 32
    coca_vision_width = 768
    coca_vision_layers = 12
    coca_vision_head_width = 64
    coca_attn_pooler_heads = 8
    coca_context_length = 76      # text ids; CoCa appends its CLS token as position 77
    coca_vocab_size = 49408
    coca_text_width = 512
    coca_text_heads = 8
    coca_text_layers = 12
    coca_pool_prompts = False     # True: the attentional pooler (image feature) also attends over the prompt tokens
    finetune = False              # True: train the backbone too (baseline 'finetune' option)
    frozen_eval_mode = False      # True: frozen modules in eval mode (no dropout); reference keeps train mode

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

    # --- optimisation (docs/methods.md §7.3-7.4) -------------------------------------------------------
    optimizer_impl = "legacy_hf"  # 'legacy_hf' (reference AdamW update) | 'torch'
    learning_rate = paper_run(prompt_method, (1e-4, 0), dataset)[0]   # the method's reference value on the dataset
    weight_decay = 0.01
    lr_mult = 1
    decay_power = 1               # polynomial power, or 'cosine'
    end_lr = 0.0
    max_epoch = 100
    max_steps = None
    warmup_steps = 2500           # int = steps, float < 1 = fraction of total steps

    # --- trainer --------------------------------------------------------------------------------
    num_gpus = 1                  # devices per node (0 = CPU)
    num_nodes = 1
    num_cpu_processes = 1         # num_gpus=0: CPU processes per node; > 1 = Lightning DDP on CPU (gloo backend)
    precision = "bf16-mixed"      # '32-true' | '16-mixed' | 'bf16-mixed' (16 / 32 accepted); the references used fp16 ('16-mixed')
    compile = False               # True: torch.compile the classifier (opt-in; first steps are slow while it compiles)
    val_check_interval = 1.0
    test_only = False
    fast_dev_run = False
    deterministic = "warn"        # Lightning `deterministic`: True | 'warn' (deterministic kernels where they exist) | False
    find_unused_parameters = False  # DDP: True only for methods whose forward skips trainable parameters
    resume_from = ""              # a last.ckpt/any .ckpt of a killed run: restores model, optimizer, scheduler, step, RNG
    resume = False                # True: resume from <latest version of this run's base dir>/checkpoints/last.ckpt
    checkpoint_every_n_steps = 0  # > 0: also save last.ckpt every n optimizer steps (mid-epoch resume); 0 = epoch ends only
    # loggers, a name or a list: tensorboard, csv, wandb, mlflow (e.g. logger=csv or logger=[csv,wandb]); wandb / mlflow
    # need their package; wandb runs offline (<run_dir>/wandb, `wandb sync` later) unless WANDB_MODE is set, mlflow
    # writes <run_dir>/mlruns unless MLFLOW_TRACKING_URI is set
    logger = "tensorboard,csv"

    # --- demo (mdpl/demo.py; `make demo` = `python run.py with demo`) ---------------------------------
    demo = False                  # True: run the embedded demo instead of one training run
    demo_dir = "datasets/demo"    # synthetic raw + arrow + vocab (reused when present)
    demo_samples = [240, 60, 120]  # synthetic train / val / test items
    demo_pretrain_epochs = 6      # tiny ViLT trained on complete data, everything trainable
    demo_pretrain_lr = 2e-3
    demo_epochs = 4               # epochs of each prompt method on the frozen backbone
    demo_methods = ["none", "map", "memprompt"]
    demo_test_types = ["text", "image", "both"]   # evaluation scenarios: types x ratios (one pass, sweep)
    demo_test_ratios = [0.0, 0.3, 0.7, 1.0]


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


# --- backbone switches: run a method on the other backbone (`python run.py with task_finetune_food101 map
# on_clip`, `... dcp on_vilt`). Only the backbone changes (its transform size follows: 224 px CLIP,
# 384 px ViLT); the method's hyper-parameters stay those of its paper.


@ex.named_config
def on_clip():
    # CLIP ViT-B/16 two towers: 224 px CLIP transform, text always 77 BPE tokens.
    backbone = "clip"


@ex.named_config
def on_coca():
    # CoCa ViT-B/32 two towers (DCP appendix Table 6): 224 px CLIP transform, text 76 BPE tokens + CoCa's CLS.
    backbone = "coca"


@ex.named_config
def on_vilt():
    # ViLT ViT-B/32 single stream: 384 px 'pixelbert' shorter side.
    backbone = "vilt"


# --- tiny sizes: tests and the demo (random-initialised backbones, CPU); name them after the task config ------


@ex.named_config
def tiny():
    # A 2-layer, 64-wide ViLT / CLIP / CoCa and short prompts, for CPU tests on synthetic data.
    hidden_size = 64
    num_layers = 2
    num_heads = 2
    mlp_ratio = 2
    patch_size = 16
    image_size = 64
    max_text_len = 24
    method_sizes = "tiny"         # the selected method's keys take small values (the TINY values of its config class)
    clip_embed_dim = 32
    clip_vision_width = 64
    clip_vision_layers = 2
    clip_vision_head_width = 32
    clip_text_width = 64
    clip_text_heads = 2
    clip_text_layers = 2
    coca_embed_dim = 32
    coca_vision_width = 64
    coca_vision_layers = 2
    coca_vision_head_width = 32
    coca_text_width = 64
    coca_text_heads = 2
    coca_text_layers = 2
    num_gpus = 0
    num_workers = 0
    precision = "32-true"
    per_gpu_batchsize = 8
    batch_size = 8
    max_epoch = 3
    max_steps = None
    warmup_steps = 0.1
    learning_rate = 1e-3
    val_check_interval = 1.0


@ex.named_config
def demo():
    # The embedded demo (mdpl/demo.py): synthetic Food-101 under demo_dir, a tiny ViLT pre-trained on complete
    # data, then baseline / MAP / MemPrompt trained with 70 % 'both' missing, swept over missing scenarios.
    demo = True
    exp_name = "demo"
    dataset = "food101"
    missing_ratio = {"train": 0.7, "val": 0.7, "test": 0.7}
    missing_type = {"train": "both", "val": "both", "test": "both"}
    hidden_size = 64
    num_layers = 2
    num_heads = 2
    mlp_ratio = 2
    patch_size = 16
    image_size = 64
    max_text_len = 24
    method_sizes = "tiny"         # each demo method's keys take small values (the TINY values of its config class)
    num_gpus = 0
    num_workers = 0
    precision = "32-true"
    per_gpu_batchsize = 16
    batch_size = 16
    warmup_steps = 0.1
    learning_rate = 5e-3
    val_check_interval = 1.0
