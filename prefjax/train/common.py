"""Pieces every train step shares: model construction, log-probs of a batch, jitting with shardings.

The per-algorithm files (``sft.py``, ``reward.py``, ``dpo.py``) keep only what differs between
algorithms: the loss on one micro-batch and its metrics. This module owns

* :func:`build_model` -- a ``prefjax.models.Model`` from ``config.model`` (preset or HF folder);
* :func:`response_logps` -- summed response log-probs of ``[batch, seq]`` token arrays under the
  shift convention (logits at ``t`` predict token ``t + 1``), optionally vocabulary-chunked;
* :func:`make_update` -- gradient accumulation, optimiser update, the non-finite guard and the
  norms every step logs;
* :class:`Setup` and :func:`jit_steps` -- explicit in/out shardings and state donation.

Train metrics are means over the whole (accumulated) batch. Eval metrics travel as
``(sum, count)`` pairs so that they average exactly over batches and hosts; see
:func:`prefjax.train.evaluation.finalize_metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import losses, models
from prefjax import sharding as shd
from prefjax.train import optim
from prefjax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------


def get(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b`` with a default when a field is missing (configs may predate a field)."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping) or hasattr(node, "get"):
            try:
                node = node.get(part, None)
            except (AttributeError, KeyError):
                node = None
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def dtype_from_config(name: str, field: str) -> Any:
    """``"bfloat16"`` -> ``jnp.bfloat16``, with an error naming ``field``."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


def lora_rank(config: Any) -> int:
    """``config.model.lora.rank`` (0 = no LoRA)."""
    return int(get(config, "model.lora.rank", 0) or 0)


def logps_chunk_size(config: Any) -> int:
    """``config.model.logps_chunk_size``: 0 = full logits, else tokens per vocabulary chunk."""
    size = int(get(config, "model.logps_chunk_size", 0) or 0)
    if size < 0:
        raise ValueError(f"config.model.logps_chunk_size={size} must be >= 0 (0 = off).")
    return size


def grad_accum_steps(config: Any) -> int:
    steps = int(get(config, "optimizer.grad_accum_steps", 1) or 1)
    if steps < 1:
        raise ValueError(f"config.optimizer.grad_accum_steps={steps} must be >= 1.")
    return steps


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_overrides(config: Any) -> dict[str, Any]:
    """TransformerConfig fields set by ``config.model`` (dtype, param_dtype, remat, attention)."""
    overrides: dict[str, Any] = {}
    dtype = get(config, "model.dtype", None)
    if dtype:
        overrides["dtype"] = dtype_from_config(dtype, "config.model.dtype")
    param_dtype = get(config, "model.param_dtype", None)
    if param_dtype:
        overrides["param_dtype"] = dtype_from_config(param_dtype, "config.model.param_dtype")
    remat = get(config, "model.remat", None)
    if remat:
        overrides["remat"] = remat
    impl = get(config, "model.attention_impl", None)
    if impl is not None:
        overrides["attention_impl"] = impl or None
    return overrides


def build_model(
    config: Any, *, key: jax.Array | None = None, head: str = "lm", mesh: Mesh | None = None
) -> Any:
    """A ``prefjax.models.Model`` from ``config.model`` (local HF folder or named preset).

    With ``mesh``, a preset's parameters are born sharded under ``config.mesh.rules``
    (:func:`prefjax.sharding.sharded_init`: no device ever holds the whole unsharded model), and a
    loaded checkpoint is placed with the same shardings.
    """
    key = jax.random.key(int(get(config, "seed", 0))) if key is None else key
    overrides = model_overrides(config)
    path = get(config, "model.path", "")
    rules = shd.rules_from_config(get(config, "mesh", {}) or {})
    if path:
        model = models.from_pretrained(path, head=head, **overrides)
        if mesh is not None:
            model.params = shd.shard_params(mesh, model.params, model.param_axes, rules)
        return model
    preset = get(config, "model.preset", "tiny")
    if mesh is None:
        return models.from_preset(preset, key=key, head=head, **overrides)
    model_config = models.preset(preset, **overrides)
    axes = models.Model(model_config, None, head=head).param_axes
    params = shd.sharded_init(
        lambda k: models.Model.init(model_config, k, head=head).params, mesh, axes, rules, key
    )
    return models.Model(model_config, params, head=head)


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def response_logps(
    model: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    *,
    lora: Any = None,
    chunk_size: int = 0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs of the response tokens and their counts.

    Logits at position ``t`` predict token ``t + 1``; ``loss_mask[:, 1:]`` selects the response
    tokens (EOS included). With ``chunk_size > 0`` the ``[batch, seq, vocab]`` logits are never
    built: ``losses.chunked_token_logprobs`` projects ``model.hidden_states`` through
    ``model.unembedding`` a chunk of tokens at a time.

    Args:
      model: a ``prefjax.models.Model`` with an LM head.
      params: its parameters (the base parameters when ``lora`` is given).
      input_ids, attention_mask, loss_mask: ``[batch, seq]``.
      lora: LoRA adapters, or ``None`` for the plain model (the reference under ``lora_base``).
      chunk_size: 0 for full logits, else tokens per chunk.
      key: PRNG key for LoRA dropout (training); ``None`` turns dropout off.

    Returns:
      ``(logps [batch] float32, num_tokens [batch] float32)``.
    """
    labels = input_ids[:, 1:]  # [batch, seq - 1]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    if chunk_size:
        hidden = model.hidden_states(params, input_ids, attention_mask, lora=lora, key=key)
        token_logps = losses.chunked_token_logprobs(
            hidden[:, :-1], model.unembedding(params), labels, chunk_size=chunk_size
        )
    else:
        logits = model.apply(params, input_ids, attention_mask, lora=lora, key=key)
        token_logps = losses.token_logprobs(logits[:, :-1], labels)
    return jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1)


# ----------------------------------------------------------------------------------------------
# The shared update: accumulate, guard, apply, measure
# ----------------------------------------------------------------------------------------------


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree, in float32."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def make_update(
    loss_fn: Callable[[Any, Batch, Any, jax.Array, Mapping[str, jax.Array]], tuple[Any, Any]],
    denominators_fn: Callable[[Batch], Mapping[str, jax.Array]],
    finalize_fn: Callable[[Any, Mapping[str, jax.Array]], Metrics],
    *,
    num_micro: int,
    schedule: optax.Schedule | None,
    constrain: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Batch, Any, jax.Array], tuple[TrainState, Metrics]]:
    """Builds ``train_step(state, batch, frozen, key) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, micro_batch, frozen, key, denominators) -> (loss, sums)``; the
        loss is the micro-batch's share of the whole-batch objective (divided by the
        ``denominators`` of the *full* batch), ``sums`` a dict of metric sums.
      denominators_fn: the full batch's normalisers (``{"pairs": B, "tokens": ...}``), computed
        before the micro-batch scan so accumulation is exact.
      finalize_fn: ``(sums, denominators) -> metrics`` turning sums into means.
      num_micro: micro-batches per step (``config.optimizer.grad_accum_steps``).
      schedule: the learning-rate schedule, for the ``learning_rate`` metric.
      constrain: optional sharding constraint applied to each micro-batch.
    """

    def train_step(
        state: TrainState, batch: Batch, frozen: Any, key: jax.Array
    ) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(key, state.step)
        denominators = denominators_fn(batch)
        loss, grads, sums = optim.accumulate_gradients(
            lambda p, b, k: loss_fn(p, b, frozen, k, denominators),
            state.params,
            batch,
            key,
            num_micro,
            constrain=constrain,
        )
        grad_norm = tree_norm(grads)
        new_state, updates = state.apply_gradients(grads)
        # A non-finite loss or gradient never reaches the weights: keep the old params and
        # optimiser state (the step counter still advances: the batch was consumed).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = new_state.replace(
            params=optim.select_tree(ok, new_state.params, state.params),
            opt_state=optim.select_tree(ok, new_state.opt_state, state.opt_state),
        )
        metrics = finalize_fn(sums, denominators)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["param_norm"] = tree_norm(new_state.params)
        metrics["update_norm"] = jnp.where(ok, tree_norm(updates), 0.0)
        metrics["train/skipped"] = (~ok).astype(jnp.float32)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return train_step


def micro_batch_constraint(mesh: Mesh | None) -> Callable[[Any], Any] | None:
    """Keeps every micro-batch's batch axis split over ``("data", "fsdp")``."""
    if mesh is None or mesh.size == 1:
        return None
    sharding = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` with 0 where ``den == 0``."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Setup: shardings, sharded state creation, jitted steps
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built by ``<algo>.setup(config, model, mesh, key)``.

    Attributes:
      state: the sharded ``TrainState``.
      frozen: the sharded frozen pytree (reference params, LoRA base, ...) or ``None``.
      train_step: jitted ``(state, batch, frozen, key) -> (state, metrics)``, state donated.
      eval_step: jitted ``(params, batch, frozen) -> {name: (sum, count)}``.
      mesh: the device mesh.
      state_sharding: ``TrainState`` of ``NamedSharding`` (for checkpoint restore).
      frozen_sharding: shardings of ``frozen``.
      batch_sharding: the sharding every batch array gets (leading axis over data x fsdp).
      schedule: the learning-rate schedule.
      model: the model the steps close over.
      policy_params: ``params -> full policy params`` for export (merges LoRA when used).
      info: free-form description (reference kind, parameter counts) for logs.
    """

    state: TrainState
    frozen: Any
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    mesh: Mesh
    state_sharding: Any
    frozen_sharding: Any
    batch_sharding: NamedSharding
    schedule: optax.Schedule
    model: Any
    policy_params: Callable[[Any, Any], Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Places a host batch (per-process shard on multi-host runs) on the mesh."""
        return shd.make_global_batch(self.mesh, batch)


def state_sharding(
    mesh: Mesh, tx: optax.GradientTransformation, params: Any, params_sharding: Any
) -> TrainState:
    """``TrainState`` of shardings: optimiser moments follow their params, counters replicate."""
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sharding = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        opt_shapes,
        params_sharding,
        transform_non_params=lambda _: shd.replicated(mesh),
    )
    return TrainState(
        step=shd.replicated(mesh), params=params_sharding, opt_state=opt_sharding, tx=tx
    )


def create_state(
    mesh: Mesh, tx: optax.GradientTransformation, params: Any, params_sharding: Any
) -> tuple[TrainState, TrainState]:
    """A sharded ``TrainState`` (optimiser state born sharded) and its sharding pytree."""
    sharding = state_sharding(mesh, tx, params, params_sharding)
    params = jax.device_put(params, params_sharding)
    create = jax.jit(
        lambda p: TrainState.create(params=p, tx=tx),
        in_shardings=(params_sharding,),
        out_shardings=sharding,
    )
    return create(params), sharding


def jit_steps(
    mesh: Mesh,
    train_step: Callable[..., Any],
    eval_step: Callable[..., Any],
    state_shard: TrainState,
    frozen_shard: Any,
) -> tuple[Callable[..., Any], Callable[..., Any], NamedSharding]:
    """``jax.jit`` with explicit in/out shardings; the train state is donated."""
    batch_shard = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))
    repl = shd.replicated(mesh)
    jit_train = jax.jit(
        train_step,
        in_shardings=(state_shard, batch_shard, frozen_shard, repl),
        out_shardings=(state_shard, repl),
        donate_argnums=0,
    )
    jit_eval = jax.jit(
        eval_step,
        in_shardings=(state_shard.params, batch_shard, frozen_shard),
        out_shardings=repl,
    )
    return jit_train, jit_eval, batch_shard


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
