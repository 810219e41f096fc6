"""The fields every training config shares: their validation and the values derived from them.

A config is an ``ml_collections.ConfigDict`` (built by ``experiments/configs/<algo>.py``; the shared
fields and their comments are in ``experiments/configs/common.py``). Two rules keep it honest:

* :func:`validate` runs once at the start of every run (``prefjax.train.loop.run``) and names the
  offending field (``config.mesh.fsdp=3: ...``), so a bad combination never reaches jit; the
  algorithm's own fields are checked by its module's ``validate_config``, which :func:`validate`
  calls when given the algorithm;
* values computed from fields (the resolved mesh shape, the micro-batch size, the batch kind an
  algorithm reads, ...) come from :func:`derived` and are never written back into the config, so the
  config saved beside a checkpoint is exactly what the researcher asked for.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from prefjax import sharding
from prefjax.train.errors import ConfigError

MODEL_PRESETS = ("tiny", "gpt2", "llama1b")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS = ("sequence", "bandit", "arithmetic", "files")
OPTIMIZERS = ("adamw", "adam", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE = ("skip", "stop")
LOGICAL_AXES = ("embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")
# Batch kinds that pack (KTO's "unpaired" batches build mismatched pairs from whole rows).
PACKABLE_KINDS = ("sft", "pairwise", "listwise")

# Mesh rules: fully sharded data parallel over `fsdp`, Megatron-style tensor parallel over `tensor`
# (see prefjax.sharding); the batch is always split over data x fsdp.
DEFAULT_RULES = sharding.DEFAULT_RULES


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
    """(data, fsdp, tensor) with -1 resolved (:func:`prefjax.sharding.mesh_shape`); raises
    :class:`ConfigError` naming the mesh field."""
    for axis in MESH_AXES:
        value = config.mesh[axis]
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"mesh.{axis}", value, "must be a positive number of devices or -1 (the rest)")
    try:
        return sharding.mesh_shape(
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices=num_devices
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from a config; see :func:`derived`."""

    mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor) devices, -1 resolved
    batch_shards: int  # devices the batch is split over: data * fsdp
    micro_batch_size: int  # examples per micro-batch (global)
    head: str  # model head: "lm" | "reward"
    batch_kind: str  # "sft" | "pairwise" | "listwise" | "unpaired"
    reference: str  # "none" | "copy" | "lora_base" | "precomputed" (the algorithm's reference)
    uses_reference: bool  # the step needs reference log-probs
    workdir: str  # the run directory when --workdir is not given (absolute)
    export_dir: str  # where the HF export goes ("" when export.hf is off)


def derived(
    config, num_devices: int | None = None, workdir: str | None = None, *, algorithm
) -> Derived:
    """Every value computed from config fields, in one place (never written back)."""
    if num_devices is None:
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
        head=algorithm.HEAD,
        batch_kind=algorithm.batch_kind(config),
        reference=algorithm.reference(config),
        uses_reference=algorithm.reference(config) != "none",
        workdir=workdir,
        export_dir=export_dir,
    )


def validate(config, num_devices: int | None = None, algorithm=None) -> None:
    """Checks every field and combination; raises :class:`ConfigError` naming the field.

    ``algorithm`` (a module such as ``prefjax.train.dpo``) checks its own block,
    ``config.algorithm``, with its ``validate_config`` (loss, reference, hyperparameters), turned
    into ``ConfigError`` too; the fields checked here are the ones every algorithm shares.
    """
    _positive(config, "seed", zero_ok=True)
    if algorithm is None:
        raise TypeError("validate(config, num_devices, algorithm): name the algorithm module")
    if config.algorithm.name != algorithm.NAME:
        _fail(
            "algorithm.name",
            config.algorithm.name,
            f"{algorithm.__name__} trains {algorithm.NAME!r}",
        )

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

    packing = data.get("packing", False)
    if not isinstance(packing, bool):
        _fail("data.packing", packing, "must be True/False")
    if packing and opt.grad_accum_steps > 1:
        _fail(
            "data.packing",
            packing,
            f"packed batches are not split into micro-batches (optimizer.grad_accum_steps="
            f"{opt.grad_accum_steps}); set optimizer.grad_accum_steps=1 or data.packing=False",
        )
    if packing and algorithm.batch_kind(config) not in PACKABLE_KINDS:
        _fail(
            "data.packing",
            packing,
            f"{algorithm.NAME} reads {algorithm.batch_kind(config)!r} batches, which are not "
            f"packed (packable: {', '.join(PACKABLE_KINDS)}; KTO's mismatched pairs need rows)",
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
        d = derived(config, num_devices, algorithm=algorithm)
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
    if hasattr(algorithm, "validate_config"):
        try:
            algorithm.validate_config(config)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err
