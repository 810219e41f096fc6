"""Fields shared by every training config, their validation, and the values derived from them.

Each ``experiments/configs/<algo>.py`` starts from :func:`base_config`, sets its algorithm block and
presets, and returns the ``ConfigDict``. Three rules keep configs honest:

* every field has a comment with its unit (steps, examples, tokens, ...);
* :func:`validate` runs at start-up and names the offending field
  (``config.mesh.fsdp=3: ...``), so a bad combination never reaches jit;
* values computed from fields (the resolved mesh shape, the micro-batch size, the batch kind an
  algorithm reads, ...) come from :func:`derived` and are never written back into the config, so the
  config saved beside a checkpoint is exactly what the researcher asked for.
"""

from __future__ import annotations

import dataclasses
import math
import os

import ml_collections

from prefjax import sharding
from prefjax.train.errors import ConfigError  # noqa: F401  (raised here, caught by launchers)

ALGORITHMS = ("sft", "reward", "dpo")
MODEL_PRESETS = ("tiny", "gpt2", "llama1b")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS = ("sequence", "bandit", "files")
REFERENCES = ("copy", "lora_base", "precomputed", "none")
# DPO losses that are not in prefjax.losses.PAIRWISE_LOSSES (different batch kind or no reference).
DPO_EXTRA_LOSSES = ("listwise", "kto", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
REWARD_LOSSES = ("bradley_terry", "plackett_luce")
OPTIMIZERS = ("adamw", "adam", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("skip", "stop")
LOGICAL_AXES = ("embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")

# Mesh rules: fully sharded data parallel over `fsdp`, Megatron-style tensor parallel over `tensor`
# (see prefjax.sharding); the batch is always split over data x fsdp.
DEFAULT_RULES = sharding.DEFAULT_RULES




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
    # "sequence" (built-in rule-following task with a gold reward) | "bandit" | "files".
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

    config.algorithm = algo = ml_collections.ConfigDict()
    # Which train step: "sft" | "reward" | "dpo" (set by each config file, not meant to be changed).
    algo.name = algorithm
    # Objective; see the config file of each algorithm for the values it accepts.
    algo.loss = {"sft": "sft", "reward": "bradley_terry", "dpo": "sigmoid"}[algorithm]
    # KL-regularisation strength beta of the DPO family (nats^-1 scale of implicit rewards).
    algo.beta = 0.1
    # Conservative-DPO / robust-DPO label-flip probability epsilon in [0, 0.5).
    algo.label_smoothing = 0.0
    # SimPO target reward margin gamma (in reward units).
    algo.gamma = 0.5
    # Reward model: subtract the example's `margin` column inside the Bradley-Terry sigmoid.
    algo.margin = False
    # KTO weights of desirable / undesirable examples.
    algo.desirable_weight = 1.0
    algo.undesirable_weight = 1.0
    # Reference policy: "copy" (frozen copy) | "lora_base" (adapters off) | "precomputed" (one pass
    # before training stores reference log-probs beside the data) | "none" (ORPO, SimPO, SFT, RM).
    algo.reference = "copy" if algorithm == "dpo" else "none"
    # ORPO: weight of the NLL term on the chosen response.
    algo.sft_weight = 1.0
    # DPO-family pairwise losses: + rpo_alpha * (token-averaged NLL of the chosen response), the
    # RPO regulariser (Pang et al., 2024) that keeps the chosen likelihood from falling. 0 = off.
    algo.rpo_alpha = 0.0

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
    ev.generate = algorithm != "reward"
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


def _fail(field: str, value, why: str):
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _choice(config, field: str, choices):
    value = _get(config, field)
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(repr(c) for c in choices)}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _positive(config, field: str, *, zero_ok: bool = False, integer: bool = True):
    value = _get(config, field)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        _fail(field, value, f"must be {'an integer' if integer else 'a number'}")
    if value < 0 or (value == 0 and not zero_ok):
        _fail(field, value, f"must be {'>= 0' if zero_ok else '> 0'}")


def resolve_mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 resolved; raises ConfigError naming the mesh field."""
    sizes = {}
    for axis in MESH_AXES:
        value = config.mesh[axis]
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            _fail(f"mesh.{axis}", value, "must be a positive number of devices or -1 (the rest)")
        sizes[axis] = value
    rest = [a for a in MESH_AXES if sizes[a] == -1]
    if len(rest) > 1:
        _fail(f"mesh.{rest[1]}", -1, f"only one mesh axis may be -1 (also mesh.{rest[0]})")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            bad = max((a for a in MESH_AXES if sizes[a] != -1), key=lambda a: sizes[a])
            _fail(
                f"mesh.{bad}",
                sizes[bad],
                f"the fixed mesh axes multiply to {known}, which does not divide the "
                f"{num_devices} devices",
            )
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        bad = max(MESH_AXES, key=lambda a: sizes[a])
        _fail(
            f"mesh.{bad}",
            sizes[bad],
            f"mesh.data * mesh.fsdp * mesh.tensor = {known} but there are {num_devices} devices "
            "(set one axis to -1 to take the rest)",
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from a config; see :func:`derived`."""

    mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor) devices, -1 resolved
    batch_shards: int  # devices the batch is split over: data * fsdp
    micro_batch_size: int  # examples per micro-batch (global)
    head: str  # model head: "lm" | "reward"
    batch_kind: str  # "sft" | "pairwise" | "listwise" | "unpaired"
    uses_reference: bool  # the step needs reference log-probs
    workdir: str  # the run directory when --workdir is not given (absolute)
    export_dir: str  # where the HF export goes ("" when export.hf is off)


def batch_kind(config) -> str:
    """The batch layout the algorithm reads: ``sft``, ``pairwise``, ``listwise`` or ``unpaired``."""
    name, loss = config.algorithm.name, config.algorithm.loss
    if name == "sft":
        return "sft"
    if loss in ("listwise", "plackett_luce"):
        return "listwise"
    if loss == "kto":
        return "unpaired"
    return "pairwise"


def derived(config, num_devices: int | None = None, workdir: str | None = None) -> Derived:
    """Every value computed from config fields, in one place (never written back)."""
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    shape = resolve_mesh_shape(config, num_devices)
    workdir = os.path.abspath(workdir or config.workdir_default)
    export_dir = ""
    if config.export.hf:
        export_dir = os.path.abspath(config.export.dir or os.path.join(workdir, "hf_model"))
    return Derived(
        mesh_shape=shape,
        batch_shards=shape[0] * shape[1],
        micro_batch_size=config.data.batch_size // config.optimizer.grad_accum_steps,
        head="reward" if config.algorithm.name == "reward" else "lm",
        batch_kind=batch_kind(config),
        uses_reference=config.algorithm.reference != "none",
        workdir=workdir,
        export_dir=export_dir,
    )


def _pairwise_losses() -> tuple[str, ...]:
    try:
        from prefjax.losses import PAIRWISE_LOSSES
    except ImportError:  # losses not built yet: accept the documented names
        return ("sigmoid", "robust", "ipo", "hinge", "bco_pair")
    return tuple(PAIRWISE_LOSSES)


def validate(config, num_devices: int | None = None) -> None:
    """Checks every field and combination; raises :class:`ConfigError` naming the field."""
    _positive(config, "seed", zero_ok=True)
    _choice(config, "algorithm.name", ALGORITHMS)
    name = config.algorithm.name

    # Model.
    if config.model.path:
        if not os.path.isdir(config.model.path):
            _fail("model.path", config.model.path, "is not a local directory")
    else:
        _choice(config, "model.preset", MODEL_PRESETS)
    if config.model.init_from and not os.path.isdir(config.model.init_from):
        _fail("model.init_from", config.model.init_from, "is not a run directory")
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.param_dtype", DTYPES)
    _choice(config, "model.remat", REMAT_POLICIES)
    _choice(config, "model.attention_impl", ATTENTION_IMPLS)
    _positive(config, "model.logps_chunk_size", zero_ok=True)
    _positive(config, "model.lora.rank", zero_ok=True)
    if config.model.lora.rank:
        _positive(config, "model.lora.alpha", integer=False)
        targets = tuple(config.model.lora.targets)
        if not targets:
            _fail("model.lora.targets", targets, "needs at least one projection")
        for t in targets:
            if t not in LORA_TARGETS:
                _fail("model.lora.targets", targets, f"{t!r} is not one of {LORA_TARGETS}")
        if not 0.0 <= config.model.lora.dropout < 1.0:
            _fail("model.lora.dropout", config.model.lora.dropout, "must be in [0, 1)")

    # Data.
    data = config.data
    _choice(config, "data.task", TASKS)
    if data.task == "files":
        if not data.train_files:
            _fail("data.train_files", data.train_files, 'is required when data.task="files"')
        for field in ("train_files", "eval_files"):
            for path in filter(None, (p.strip() for p in data[field].split(","))):
                if not os.path.exists(path):
                    _fail(f"data.{field}", data[field], f"file {path!r} does not exist")
    else:
        for field in ("train_files", "eval_files"):
            if data[field]:
                _fail(f"data.{field}", data[field], 'is only read when data.task="files"')
        _positive(config, "data.num_train")
        _positive(config, "data.num_eval")
        if not 0.0 <= data.label_noise <= 1.0:
            _fail("data.label_noise", data.label_noise, "must be in [0, 1]")
    if data.task == "bandit" and name == "sft":
        _fail("data.task", data.task, "the bandit has no responses to imitate; use 'sequence'")
    _choice(config, "data.sft_responses", ("chosen", "base"))
    if not 0.0 < data.eval_fraction < 1.0:
        _fail("data.eval_fraction", data.eval_fraction, "must be in (0, 1)")
    _positive(config, "data.max_len")
    _positive(config, "data.max_prompt_len")
    if data.max_prompt_len >= data.max_len:
        _fail("data.max_prompt_len", data.max_prompt_len, f"must be < data.max_len={data.max_len}")
    _positive(config, "data.batch_size")
    _positive(config, "data.eval_batch_size")
    _positive(config, "data.seed", zero_ok=True)

    # Algorithm.
    algo = config.algorithm
    if name == "sft":
        _choice(config, "algorithm.loss", ("sft",))
    elif name == "reward":
        _choice(config, "algorithm.loss", REWARD_LOSSES)
    else:
        _choice(config, "algorithm.loss", _pairwise_losses() + DPO_EXTRA_LOSSES)
    _choice(config, "algorithm.reference", REFERENCES)
    if name in ("sft", "reward") or algo.loss in REFERENCE_FREE_LOSSES:
        if algo.reference != "none":
            _fail("algorithm.reference", algo.reference, f"{algo.loss!r} uses no reference: 'none'")
    elif algo.reference == "none":
        _fail("algorithm.reference", "none", f"loss {algo.loss!r} needs a reference policy")
    if algo.reference == "lora_base" and not config.model.lora.rank:
        _fail("algorithm.reference", "lora_base", "needs LoRA adapters (model.lora.rank > 0)")
    if name == "dpo":
        _positive(config, "algorithm.beta", integer=False)
        if not 0.0 <= algo.label_smoothing < 0.5:
            _fail("algorithm.label_smoothing", algo.label_smoothing, "must be in [0, 0.5)")
        # The step's own start-up checks (rpo_alpha, and combinations such as it with KTO), run here
        # so that they fail before an SFT warm-up or a data pass, not after.
        from prefjax.train import dpo

        try:
            dpo.validate_config(config)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if algo.loss == "kto":
        _positive(config, "algorithm.desirable_weight", integer=False)
        _positive(config, "algorithm.undesirable_weight", integer=False)
    if algo.loss == "orpo":
        _positive(config, "algorithm.sft_weight", zero_ok=True, integer=False)

    # Optimiser.
    opt = config.optimizer
    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _positive(config, "optimizer.learning_rate", integer=False)
    _positive(config, "optimizer.warmup_steps", zero_ok=True)
    if opt.warmup_steps > config.train.num_steps:
        _fail(
            "optimizer.warmup_steps",
            opt.warmup_steps,
            f"exceeds train.num_steps={config.train.num_steps}",
        )
    _positive(config, "optimizer.weight_decay", zero_ok=True, integer=False)
    for f in ("b1", "b2"):
        if not 0.0 <= opt[f] < 1.0:
            _fail(f"optimizer.{f}", opt[f], "must be in [0, 1)")
    _positive(config, "optimizer.eps", integer=False)
    _positive(config, "optimizer.clip_norm", zero_ok=True, integer=False)
    _positive(config, "optimizer.grad_accum_steps")
    if data.batch_size % opt.grad_accum_steps:
        _fail(
            "optimizer.grad_accum_steps",
            opt.grad_accum_steps,
            f"must divide data.batch_size={data.batch_size}",
        )

    # Mesh.
    rules = tuple(config.mesh.rules)
    for rule in rules:
        if len(rule) != 2 or rule[0] not in LOGICAL_AXES:
            _fail("mesh.rules", rule, f"each rule is (logical axis in {LOGICAL_AXES}, mesh axes)")
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                _fail("mesh.rules", rule, f"{t!r} is not a mesh axis {MESH_AXES}")
    if num_devices is not None or not config.mesh.distributed:
        d = derived(config, num_devices)
        micro = d.micro_batch_size
        if micro % d.batch_shards:
            _fail(
                "data.batch_size",
                data.batch_size,
                f"the micro-batch of {micro} examples (data.batch_size / "
                f"optimizer.grad_accum_steps) must divide over the {d.batch_shards} devices of "
                "mesh.data * mesh.fsdp",
            )
        if data.eval_batch_size % d.batch_shards:
            _fail(
                "data.eval_batch_size",
                data.eval_batch_size,
                f"must divide over the {d.batch_shards} devices of mesh.data * mesh.fsdp",
            )

    # Loop.
    _positive(config, "train.num_steps")
    _positive(config, "train.log_every")
    _positive(config, "train.eval_every", zero_ok=True)
    _choice(config, "train.nonfinite", NONFINITE)
    if not isinstance(config.train.resume_with_changes, bool):
        _fail("train.resume_with_changes", config.train.resume_with_changes, "must be True/False")
    _positive(config, "eval.num_batches", zero_ok=True)
    _positive(config, "eval.num_prompts")
    _positive(config, "eval.max_new_tokens")
    _positive(config, "eval.num_samples")
    _positive(config, "checkpoint.every", zero_ok=True)
    _positive(config, "checkpoint.keep")
    if name == "reward" and config.model.lora.rank:
        _fail("model.lora.rank", config.model.lora.rank, "reward models train the full network")
    if config.export.hf and name == "reward":
        _fail("export.hf", True, "only policies (sft, dpo) export to a Hugging Face LM folder")
    if "sft_warmup" in config:
        _positive(config, "sft_warmup.num_steps", zero_ok=True)
        if config.sft_warmup.num_steps:
            _positive(config, "sft_warmup.learning_rate", integer=False)
            if config.model.init_from:
                _fail("sft_warmup.num_steps", config.sft_warmup.num_steps, "set 0 with init_from")
            if config.data.task == "bandit":
                _fail(
                    "sft_warmup.num_steps",
                    config.sft_warmup.num_steps,
                    "the bandit has no responses to imitate; set 0 (the bandit's reference is "
                    "the initial policy)",
                )


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
