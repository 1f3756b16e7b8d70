"""Sacred configuration of mdpl: every key the framework reads, grouped, with the named configs.

`python run.py print_config with task_finetune_mmimdb map` shows the resolved values.
Named configs compose left to right: a task (dataset settings of the references, METHODS.md §7.2),
then a method preset (the hyper-parameters each paper used), then any `key=value` overrides.
"""
from __future__ import annotations

from sacred import Experiment

ex = Experiment("mdpl", save_git_info=False)

DATASETS = ("mmimdb", "food101", "hatememes")
MISSING_TYPES = ("text", "image", "both")


@ex.config
def base_config():
    # --- experiment -----------------------------------------------------------------------------
    exp_name = "mdpl"
    seed = 0                      # seeds Lightning, the model init and every missing table
    log_dir = "result"            # run directories go to log_dir/<exp_name>_seed<seed>_from_<ckpt>/

    # --- data -----------------------------------------------------------------------------------
    dataset = "mmimdb"            # one of mmimdb, food101, hatememes (set by the task_* configs)
    data_root = ""                # folder holding <dataset>_{train,dev|val,test}.arrow (make_arrow.py --out)
    num_workers = 8
    batch_size = 256              # effective batch; accumulation = batch_size // (per_gpu_batchsize * devices)
    per_gpu_batchsize = 4         # micro-batch per device
    image_size = 384              # ViLT 'pixelbert' shorter side (CLIP uses 224)
    max_image_len = -1            # ViLT: cap on image patches per sample (-1 = no cap)
    max_text_len = 40             # ViLT text length (BERT tokens, padded); CLIP always uses 77
    dynamic_text_padding = False  # ViLT: pad each batch to its longest text, not max_text_len (faster on MM-IMDb/Food-101).
                                  # MemPrompt then max-pools its text query over real tokens only (the reference pools over
                                  # [PAD] too): results differ from the reference but do not depend on the batch. MAP, DCP and
                                  # the baseline mask padded keys, so their outputs are unchanged (up to rounding).
    tokenizer = ""                # ViLT: local folder with vocab.txt (BERT WordPiece) or "" = HF cache of bert-base-uncased
    vocab_size = 30522            # checked against the tokenizer; a mismatch is an error
    mmimdb_items = "plot"         # 'plot': one item per plot (reference parity); 'movie': first plot only

    # --- missing modalities (METHODS.md §1.4) -------------------------------------------------------
    missing_ratio = {"train": 0.7, "val": 0.7, "test": 0.7}
    missing_type = {"train": "both", "val": "both", "test": "both"}   # 'text' | 'image' | 'both'
    both_ratio = 0.5              # for 'both': share of the missing rows that miss the image
    missing_table_root = ""       # "" = <data_root>/missing_tables
    simulate_missing = False      # train only: complete rows get a random type per epoch
    test_ratio = None             # evaluation override of missing_ratio val/test
    test_type = None              # evaluation override of missing_type val/test
    test_types = None             # evaluation sweep: list of types, e.g. [text,image,both] (mdpl/engine/sweep.py)
    test_ratios = None            # evaluation sweep: list of ratios, e.g. [0.1,0.3,0.5,0.7,0.9]; every type x ratio in one pass

    # --- backbone -------------------------------------------------------------------------------
    backbone = "vilt"             # 'vilt' (ViT-B/32 + BERT embeddings, single stream) | 'clip' (ViT-B/16, two towers)
    load_path = ""                # ViLT .ckpt / HF ViltModel weights, or an mdpl checkpoint with test_only
    hidden_size = 768
    num_layers = 12
    num_heads = 12
    mlp_ratio = 4
    patch_size = 32
    drop_rate = 0.1
    # CLIP (METHODS.md §5); tower sizes default to OpenAI ViT-B/16, only tests change them
    clip_path = ""                # local ViT-B-16.pt (TorchScript archive) or OpenAI-layout state dict; "" = random init
    clip_sha256 = ""              # optional SHA-256 check of clip_path
    clip_embed_dim = 512
    clip_image_size = 224
    clip_patch_size = 16
    clip_vision_width = 768
    clip_vision_layers = 12
    clip_vision_head_width = 64
    clip_context_length = 77
    clip_vocab_size = 49408
    clip_text_width = 512
    clip_text_heads = 8
    clip_text_layers = 12
    finetune = False              # True: train the backbone too (baseline 'finetune' option)
    frozen_eval_mode = False      # True: frozen modules in eval mode (no dropout); reference keeps train mode

    # --- prompt method --------------------------------------------------------------------------
    prompt_method = "none"        # 'none' | 'map' | 'memprompt' | 'dcp', any backbone (on_vilt / on_clip)
    # MAP (METHODS.md §3)
    prompt_type = "input"         # 'input' | 'attention'
    prompt_length = 16
    prompt_layers = [0, 1, 2, 3, 4, 5]
    learnt_p = True
    multi_layer_prompt = True
    # MemPrompt (METHODS.md §4)
    gen_prompt_length = 16
    gen_prompt_layers = [0, 1, 2, 3, 4, 5]
    shared_prompt_length = 16
    shared_prompt_layers = [0, 1, 2, 3, 4, 5]
    mem_size = 16
    top_k = 5
    bottleneck_dim = 48           # shared-prompt bottleneck width (reference: hidden_size // 16)
    memprompt_mask_padding = False  # True: retrieval max-pool ignores padding (batch-invariant, D-30)

    # DCP (METHODS.md §6); prompt_length above is the total per tower (36 for DCP)
    prompt_depth = 6              # layers receiving correlated prompts
    dcp_correlated = True         # off: independent per-layer per-type prompts (our definition, §6.7)
    dcp_dynamic = True            # off: no dynamic prompts
    dcp_common = True             # off: no modal-common prompts
    dcp_dynamic_trainable = False # reference: dynamic queries are frozen (saved as buffers here, D-34)
    dcp_independent_init = False  # reference: the per-layer projections start as identical copies (D-39)
    dcp_skip_missing = True       # skip the tower whose feature half is zeroed (exact)

    # --- optimisation (METHODS.md §7.3-7.4) -------------------------------------------------------
    optim_type = "adamw"
    optimizer_impl = "legacy_hf"  # 'legacy_hf' (reference AdamW update) | 'torch'
    learning_rate = 1e-4
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
    learning_rate = 1e-2
    weight_decay = 2e-2
    val_check_interval = 0.2
    max_text_len = 1024


@ex.named_config
def task_finetune_food101():
    exp_name = "finetune_food101"
    dataset = "food101"
    batch_size = 256
    max_epoch = 20
    max_steps = None
    warmup_steps = 0.1
    learning_rate = 1e-2
    weight_decay = 2e-2
    val_check_interval = 0.2
    max_text_len = 512


@ex.named_config
def task_finetune_hatememes():
    exp_name = "finetune_hatememes"
    dataset = "hatememes"
    batch_size = 256
    max_epoch = 20
    max_steps = None
    warmup_steps = 0.1
    learning_rate = 1e-2
    weight_decay = 2e-2
    val_check_interval = 0.11
    max_text_len = 128


# --- method presets: the hyper-parameters each paper used (METHODS.md §7.1-7.2) ------------------
# Compose after a task config: `python run.py with task_finetune_mmimdb memprompt load_path=...`.


@ex.named_config
def baseline():
    # Frozen ViLT, trainable pooler + head (the reference point of every table, D-25).
    backbone = "vilt"
    prompt_method = "none"


@ex.named_config
def map():
    # MAP (CVPR 2023): input-level missing-aware prompts, 16 tokens on layers 0-5, seed 0.
    backbone = "vilt"
    prompt_method = "map"
    prompt_type = "input"
    prompt_length = 16
    prompt_layers = [0, 1, 2, 3, 4, 5]
    seed = 0


@ex.named_config
def memprompt():
    # MemPrompt (IJCAI 2025): lr 5e-3 for MM-IMDb/Food-101 (use learning_rate=1e-3 for Hateful
    # Memes, as the reference config does), seed 42. The reference trains with missing_type 'image' on
    # every split (D-32); the task configs keep 'both', so pass missing_type explicitly to match it.
    backbone = "vilt"
    prompt_method = "memprompt"
    gen_prompt_length = 16
    gen_prompt_layers = [0, 1, 2, 3, 4, 5]
    shared_prompt_length = 16
    shared_prompt_layers = [0, 1, 2, 3, 4, 5]
    mem_size = 16
    top_k = 5
    bottleneck_dim = 48
    learning_rate = 5e-3
    seed = 42


@ex.named_config
def dcp():
    # DCP (NeurIPS 2024) on CLIP ViT-B/16: 36 prompt tokens per tower on 6 layers, 224 px, lr 1e-2.
    backbone = "clip"
    prompt_method = "dcp"
    prompt_length = 36
    prompt_depth = 6
    image_size = 224
    learning_rate = 1e-2
    seed = 0


# --- backbone switches: after a method preset, run it on the other backbone (issue 8) -------------
# `python run.py with task_finetune_food101 map on_clip` / `... dcp on_vilt`. Only the backbone and its
# transform size change; the method's hyper-parameters stay those of its preset. Put `tiny` after them.


@ex.named_config
def on_clip():
    # CLIP ViT-B/16 two towers (METHODS.md §5): 224 px CLIP transform, text always 77 BPE tokens.
    backbone = "clip"
    image_size = 224


@ex.named_config
def on_vilt():
    # ViLT ViT-B/32 single stream (METHODS.md §2): 384 px 'pixelbert' shorter side.
    backbone = "vilt"
    image_size = 384


# --- tiny sizes: tests and the demo (random-initialised backbones, CPU) --------------------------


@ex.named_config
def tiny():
    # A 2-layer, 64-wide ViLT / CLIP and short prompts, for CPU tests on synthetic data.
    hidden_size = 64
    num_layers = 2
    num_heads = 2
    mlp_ratio = 2
    patch_size = 16
    image_size = 64
    max_text_len = 24
    prompt_length = 6             # a multiple of 3, so that `dcp tiny` works too (DCP: 2 layer + 2 common + 2 dynamic)
    prompt_layers = [0, 1]
    gen_prompt_length = 4
    gen_prompt_layers = [0, 1]
    shared_prompt_length = 4
    shared_prompt_layers = [0, 1]
    mem_size = 4
    top_k = 2
    bottleneck_dim = 8
    prompt_depth = 2
    clip_embed_dim = 32
    clip_image_size = 64
    clip_vision_width = 64
    clip_vision_layers = 2
    clip_vision_head_width = 32
    clip_text_width = 64
    clip_text_heads = 2
    clip_text_layers = 2
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
    prompt_length = 6
    prompt_layers = [0, 1]
    gen_prompt_length = 4
    gen_prompt_layers = [0, 1]
    shared_prompt_length = 4
    shared_prompt_layers = [0, 1]
    mem_size = 4
    top_k = 2
    bottleneck_dim = 8
    num_gpus = 0
    num_workers = 0
    precision = "32-true"
    per_gpu_batchsize = 16
    batch_size = 16
    warmup_steps = 0.1
    learning_rate = 5e-3
    val_check_interval = 1.0
