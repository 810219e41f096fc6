"""The fields shared by every training config, with their comments and the presets.

Each ``experiments/configs/<algo>.py`` starts from :func:`base_config`, sets its algorithm block's
values and presets, and returns the ``ConfigDict``. Every field has a comment with its unit; the
``config.algorithm`` block is defined once, by the algorithm (``default_config()`` in
``prefjax/train/<algo>.py``), so an SFT config has no beta. Validation and
derived values live in the library (:mod:`prefjax.train.config`) so that a run started from Python
is checked exactly as one started here; :func:`validate` adds the algorithm's own checks, looked
up by ``config.algorithm.name``.
"""

from __future__ import annotations

import ml_collections

from prefjax.train import config as train_config
from prefjax.train import dpo, grpo, online_dpo, ppo, reward, sft
from prefjax.train.config import (  # noqa: F401  (re-exported: the names launchers and tests use)
    DEFAULT_RULES,
    ConfigError,
    Derived,
    resolve_mesh_shape,
)

# The algorithm module that trains each ``config.algorithm.name`` (the launchers' table; the
# library itself knows no algorithm by name).
ALGORITHM_MODULES = {m.NAME: m for m in (sft, reward, dpo)}
# Online algorithms: prompt batches, responses sampled from the policy during training.
ALGORITHM_MODULES.update({m.NAME: m for m in (grpo, online_dpo)})
ALGORITHM_MODULES[ppo.NAME] = ppo
ALGORITHMS = tuple(ALGORITHM_MODULES)


def algorithm_module(config):
    """The ``prefjax.train`` module of ``config.algorithm.name``."""
    name = config.algorithm.name
    if name not in ALGORITHM_MODULES:
        raise ConfigError(
            f"config.algorithm.name={name!r}: must be one of {', '.join(map(repr, ALGORITHMS))}"
        )
    return ALGORITHM_MODULES[name]


def validate(config, num_devices: int | None = None) -> None:
    """:func:`prefjax.train.config.validate` with the algorithm's own checks."""
    train_config.validate(config, num_devices, algorithm=algorithm_module(config))


def derived(config, num_devices: int | None = None, workdir: str | None = None):
    """:func:`prefjax.train.config.derived` for ``config.algorithm.name``'s module."""
    return train_config.derived(config, num_devices, workdir, algorithm=algorithm_module(config))


def batch_kind(config) -> str:
    """The batch layout ``config.algorithm.name``'s module reads."""
    return algorithm_module(config).batch_kind(config)


def base_config(algorithm: str) -> ml_collections.ConfigDict:
    """The fields every launcher reads, with CPU-sized defaults (the tiny preset)."""
    config = ml_collections.ConfigDict()
    # PRNG seed of parameter initialisation, dropout and the train step keys.
    config.seed = 0
    # Run directory used when --workdir is not given (relative to the current directory).
    config.workdir_default = f"runs/{algorithm}_tiny"

    config.model = model = ml_collections.ConfigDict()
    # Architecture preset with random weights: "tiny" | "gpt2" | "llama1b" (ignored if path is set).
    model.preset = "tiny"
    # "" or a local Hugging Face folder (config.json, model.safetensors, tokenizer.json).
    model.path = ""
    # "" or the workdir of an earlier prefjax run (e.g. an SFT run) whose latest checkpoint's params
    # initialise the policy (and the reference, which is a copy of the initial policy).
    model.init_from = ""
    # Compute dtype of activations: "float32" | "bfloat16".
    model.dtype = "float32"
    # Storage dtype of parameters (the optimiser's master weights): "float32" | "bfloat16".
    model.param_dtype = "float32"
    # Activation rematerialisation: "none" | "full" (recompute each block) | "dots" (save matmuls).
    model.remat = "none"
    # Attention kernel: "xla" | "cudnn" (flash attention on recent NVIDIA GPUs) | "" (JAX chooses).
    model.attention_impl = ""
    # Log-probs without the full [batch, seq, vocab] float32 log-softmax: tokens per chunk of
    # losses.chunked_token_logprobs (0 = compute full logits; use e.g. 128 for large vocabularies).
    model.logps_chunk_size = 0
    model.lora = lora = ml_collections.ConfigDict()
    # LoRA rank (0 = full fine-tuning, no adapters).
    lora.rank = 0
    # LoRA scale numerator: the update is (alpha / rank) * B @ A.
    lora.alpha = 16.0
    # Projections that get adapters.
    lora.targets = ("q_proj", "v_proj")
    # Dropout probability on the adapter input.
    lora.dropout = 0.0

    config.data = data = ml_collections.ConfigDict()
    # "sequence" (built-in rule-following task with a gold reward) | "bandit" | "arithmetic"
    # (multi-step task with per-step gold labels, for process reward models) | "files".
    data.task = "sequence"
    # Comma-separated local JSONL/JSON/Parquet files (task="files"); "" otherwise.
    data.train_files = ""
    # Held-out files; "" = split train_files by prompt with eval_fraction.
    data.eval_files = ""
    # Fraction of prompts held out for evaluation when eval_files is "" (grouped by prompt).
    data.eval_fraction = 0.2
    # Maximum tokens per sequence (prompt + response), including EOS.
    data.max_len = 32
    # Maximum prompt tokens; longer prompts keep their end.
    data.max_prompt_len = 16
    # Pad every batch to max_len (one compiled shape) instead of the smallest power-of-two bucket
    # that fits (a few compiled shapes, less padding: better for long, varied sequences).
    data.pad_to_max_len = True
    # Packed (padding-free) train batches: each batch's sequences side by side in rows of
    # data.max_len tokens, attention confined to each sequence (segment ids, per-segment
    # positions); the same examples per step and the same objective as padded batches, less
    # compute on padding. SFT, reward models and the DPO family but KTO; grad_accum_steps=1.
    data.packing = False
    # Global batch size per optimiser step, in examples (pairs for preference data).
    data.batch_size = 16
    # Global batch size of evaluation, in examples.
    data.eval_batch_size = 64
    # Examples (pairs) generated for the built-in tasks' train split.
    data.num_train = 2048
    # Examples (pairs) generated for the built-in tasks' held-out split (disjoint prompts).
    data.num_eval = 256
    # Sequence task: letters that prompts ask for, and the largest requested count ("c*n=" asks
    # for n copies of c); len(letters) * max_count distinct prompts.
    data.sequence_letters = "abcdefgh"
    data.sequence_max_count = 8
    # Built-in tasks: probability-scale of label noise (0 = labels always follow the gold reward).
    data.label_noise = 0.0
    # Built-in tasks, SFT data: "chosen" (the preferred side of the task's labelled pairs) or
    # "base" (samples of the task's base policy, the distribution the pairs are drawn from).
    data.sft_responses = "chosen"
    # Seed of task generation and of the shuffling order of batches.
    data.seed = 0
    # Step-level data (process reward models): the one-token text placed after every step; the
    # PRM's step scores are read at it.
    data.step_separator = "\n"

    # The algorithm's own block (name, loss and its hyperparameters), defined with the algorithm:
    # see default_config() in prefjax/train/<algorithm>.py for each field's comment.
    config.algorithm = ALGORITHM_MODULES[algorithm].default_config()

    config.optimizer = opt = ml_collections.ConfigDict()
    # "adamw" | "adam" | "lion" | "sgd".
    opt.name = "adamw"
    # Peak learning rate (per step, after warm-up).
    opt.learning_rate = 1e-3
    # Linear warm-up from 0 to learning_rate, in optimiser steps.
    opt.warmup_steps = 10
    # Decay after warm-up: "cosine" | "linear" (both to 0 at train.num_steps) | "constant".
    opt.schedule = "cosine"
    # Decoupled weight decay (AdamW), per step, multiplied by the learning rate.
    opt.weight_decay = 0.0
    # Adam first / second moment decay rates and epsilon.
    opt.b1 = 0.9
    opt.b2 = 0.95
    opt.eps = 1e-8
    # Global gradient-norm clip (0 = off).
    opt.clip_norm = 1.0
    # Micro-batches accumulated per optimiser step; data.batch_size must be divisible by it.
    opt.grad_accum_steps = 1

    config.mesh = mesh = ml_collections.ConfigDict()
    # Mesh axis sizes in devices; their product is the device count; -1 = the rest (at most one).
    mesh.data = -1
    mesh.fsdp = 1
    mesh.tensor = 1
    # (logical axis, mesh axis | tuple of mesh axes | None) pairs; see DEFAULT_RULES.
    mesh.rules = DEFAULT_RULES
    # Call jax.distributed.initialize() at start-up (multi-host TPU pods and GPU clusters).
    mesh.distributed = False

    config.train = train = ml_collections.ConfigDict()
    # Optimiser steps of the run.
    train.num_steps = 200
    # Console / metrics.jsonl / TensorBoard cadence, in steps.
    train.log_every = 20
    # Held-out evaluation cadence, in steps (0 = only at the end).
    train.eval_every = 50
    # Non-finite loss or gradient: "skip" (keep the old weights, count it) | "stop" (checkpoint the
    # last good state and stop with the step and the offending metric).
    train.nonfinite = "skip"
    # Resume a run directory although the config (or the data) differs from the recorded run in
    # fields that change the result; the changes are recorded in run.json and summary.txt.
    # Without it such a resumption is refused, naming each field (see docs/training.md).
    train.resume_with_changes = False

    config.eval = ev = ml_collections.ConfigDict()
    # Held-out batches per evaluation (0 = the whole eval split).
    ev.num_batches = 0
    # Built-in tasks: decode greedy responses to held-out prompts and score them (gold reward).
    ev.generate = ALGORITHM_MODULES[algorithm].HEAD == "lm"
    # Prompts decoded per evaluation.
    ev.num_prompts = 64
    # Responses sampled (temperature 1) over the held-out prompts per evaluation: their mean gold
    # reward is what the KL-regularised objective maximises; the sampled KL uses the same samples.
    ev.num_samples = 256
    # Maximum new tokens per decoded response.
    ev.max_new_tokens = 16

    config.checkpoint = ckpt = ml_collections.ConfigDict()
    # Write orbax checkpoints (train state, data position, config) under <workdir>/checkpoints.
    ckpt.enabled = True
    # Periodic checkpoint cadence in steps (0 = only the final one and on SIGTERM / stop).
    ckpt.every = 100
    # Checkpoints kept (the newest N).
    ckpt.keep = 2

    config.export = export = ml_collections.ConfigDict()
    # At the end, save the trained policy (LoRA merged) as a Hugging Face folder.
    export.hf = False
    # Export folder; "" = <workdir>/hf_model.
    export.dir = ""

    config.logging = log = ml_collections.ConfigDict()
    # Write TensorBoard event files to <workdir>/tensorboard.
    log.tensorboard = True
    # Save <workdir>/curves.png at the end.
    log.plot = True
    # Show a progress bar with steps/s and ETA.
    log.progress = True
    return config


def parse_arg(arg: str | None, presets) -> str:
    """The preset name from ``--config=file.py:<arg>`` (default ``tiny``)."""
    name = arg or "tiny"
    if name not in presets:
        raise ConfigError(f"config preset {name!r}: choose one of {', '.join(presets)}")
    return name


def apply_model_preset(config, preset: str) -> None:
    """Sets the model, mesh, data and optimiser fields of the gpt2 / llama1b presets."""
    config.model.preset = preset
    config.workdir_default = config.workdir_default.replace("_tiny", f"_{preset}")
    if preset == "tiny":
        return
    if preset == "gpt2":
        config.data.max_len = 512
        config.data.max_prompt_len = 256
        config.data.batch_size = 32
        config.data.eval_batch_size = 64
        config.optimizer.learning_rate = 5e-6 if config.algorithm.name == "dpo" else 2e-5
        config.mesh.data, config.mesh.fsdp = 1, -1
    else:  # llama1b
        config.model.dtype = "bfloat16"
        config.model.remat = "full"
        config.data.max_len = 1024
        config.data.max_prompt_len = 512
        config.data.batch_size = 64
        config.data.eval_batch_size = 64
        config.optimizer.learning_rate = 5e-7 if config.algorithm.name == "dpo" else 1e-5
        config.optimizer.grad_accum_steps = 4
        config.mesh.data, config.mesh.fsdp = 1, -1
    config.data.task = "files"
    config.data.pad_to_max_len = False
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 2000
    config.train.log_every = 10
    config.train.eval_every = 200
    config.eval.generate = False
    config.checkpoint.every = 500
