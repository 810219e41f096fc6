"""Pieces every train step shares: model construction, log-probs of a batch, jitting with shardings.

The per-algorithm files (``sft.py``, ``reward.py``, ``dpo.py``) keep only what differs between
algorithms: their :class:`Objective` (the loss on one micro-batch, its normalisers and its metric
finalisation). This module owns

* :func:`build_model` -- a ``prefjax.models.Model`` from ``config.model`` (preset or HF folder);
* :func:`response_logps` -- summed response log-probs of ``[batch, seq]`` token arrays under the
  shift convention (logits at ``t`` predict token ``t + 1``: ``losses.shift_labels`` then
  ``losses.sequence_logprobs``), optionally vocabulary-chunked; :func:`flatten_responses` and
  :func:`unflatten_responses` move between the data's ``[batch, k, seq]`` and one forward pass;
* :func:`packed_response_logps` and :func:`packed_rewards` -- the same per-sequence values read
  from a packed batch (:class:`PackedTokens`: several sequences per row, segment ids, per-segment
  positions), equal to the padded computation to float32 rounding;
* :func:`make_update` and :func:`make_eval_step` -- gradient accumulation, optimiser update, the
  non-finite guard and the norms every step logs; the held-out step;
* :class:`Setup` and :func:`jit_steps` -- explicit in/out shardings and state donation.

Metrics travel as :data:`Stats`, ``{name: (sum, count)}``: summed over micro-batches in the train
step and over batches (and hosts) in evaluation, then turned into means by the objective's one
``finalize`` (:func:`means` plus the metrics derived from means), so train and eval metrics are
computed the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import einops
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
# Metric name -> (sum over the examples seen, their count); added up exactly across micro-batches,
# batches and hosts before :func:`means` divides.
Stats = dict[str, tuple[jax.Array, jax.Array]]
# The token arrays of a batch: ``[batch, seq]``, or ``[batch, k, seq]`` for pairs (k = 2: chosen,
# rejected) and rankings (best first).
TOKENS = ("input_ids", "attention_mask", "loss_mask")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------


def dtype_from_config(name: str, field: str) -> Any:
    """``"bfloat16"`` -> ``jnp.bfloat16``, with an error naming ``field``."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


def uses_lora(config: Any) -> bool:
    """Whether the policy trains LoRA adapters (``config.model.lora.rank > 0``)."""
    return config.model.lora.rank > 0


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_overrides(config: Any) -> dict[str, Any]:
    """TransformerConfig fields set by ``config.model`` (dtype, param_dtype, remat, attention)."""
    m = config.model
    return {
        "dtype": dtype_from_config(m.dtype, "config.model.dtype"),
        "param_dtype": dtype_from_config(m.param_dtype, "config.model.param_dtype"),
        "remat": m.remat,
        "attention_impl": m.attention_impl or None,
    }


def build_model(
    config: Any, *, key: jax.Array | None = None, head: str = "lm", mesh: Mesh | None = None
) -> Any:
    """A ``prefjax.models.Model`` from ``config.model`` (local HF folder or named preset).

    With ``mesh``, a preset's parameters are born sharded under ``config.mesh.rules``
    (:func:`prefjax.sharding.sharded_init`: no device ever holds the whole unsharded model), and a
    loaded checkpoint is placed with the same shardings.
    """
    key = jax.random.key(config.seed) if key is None else key
    overrides = model_overrides(config)
    path = config.model.path
    rules = shd.rules_from_config(config.mesh)
    if path:
        model = models.from_pretrained(path, head=head, **overrides)
        if mesh is not None:
            model.params = shd.shard_params(mesh, model.params, model.param_axes, rules)
        return model
    preset = config.model.preset
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
    entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """Summed log-probs of the response tokens and their counts (and, with ``entropy``, the
    policy's summed next-token entropy over them).

    Logits at position ``t`` predict token ``t + 1`` (:func:`prefjax.losses.shift_labels`);
    ``loss_mask`` selects the response tokens (EOS included) and acts as a weight
    (:func:`prefjax.losses.masked_sum`). With ``chunk_size > 0`` the ``[batch, seq, vocab]``
    logits are never built: ``losses.chunked_token_logprobs`` projects ``model.hidden_states``
    through ``model.unembedding`` a chunk of tokens at a time.

    Args:
      model: a ``prefjax.models.Model`` with an LM head.
      params: its parameters (the base parameters when ``lora`` is given).
      input_ids, attention_mask, loss_mask: ``[batch, seq]``.
      lora: LoRA adapters, or ``None`` for the plain model (the reference under ``lora_base``).
      chunk_size: 0 for full logits, else tokens per chunk.
      key: PRNG key for LoRA dropout (training); ``None`` turns dropout off.
      entropy: also return ``sum_t H(pi(. | x, y_<t))`` over the response tokens, from the
        logits the log-probs already use (no gradient; full logits only, ``chunk_size=0``).

    Returns:
      ``(logps [batch] float32, num_tokens [batch] float32)``, plus ``entropy [batch]`` float32
      (nats, summed over the masked tokens) with ``entropy=True``.
    """
    if entropy and chunk_size:
        raise ValueError("response_logps(entropy=True) needs the full logits (chunk_size=0)")
    if chunk_size:
        hidden = model.hidden_states(params, input_ids, attention_mask, lora=lora, key=key)
        hidden, labels, mask = losses.shift_labels(hidden, input_ids, loss_mask)
        token_logps = losses.chunked_token_logprobs(
            hidden, model.unembedding(params), labels, chunk_size=chunk_size
        )
        logps = losses.masked_sum(token_logps, mask, axis=-1)
    else:
        logits = model.apply(params, input_ids, attention_mask, lora=lora, key=key)
        logits, labels, mask = losses.shift_labels(logits, input_ids, loss_mask)
        logps = losses.sequence_logprobs(logits, labels, mask)
    counts = jnp.sum(mask.astype(jnp.float32), axis=-1)
    if entropy:
        # A reduction over the logits already built, outside the gradient; XLA:CPU still keeps
        # one more [batch, seq, vocab] float32 temporary for it (docs/training.md, Metrics).
        ent = losses.entropy(jax.lax.stop_gradient(logits))  # [batch, seq - 1]
        return logps, counts, losses.masked_sum(ent, mask, axis=-1)
    return logps, counts


class PackedTokens(NamedTuple):
    """The token arrays of a packed batch (layout in :mod:`prefjax.data.packing`).

    ``input_ids, attention_mask (segment ids, 0 = padding), loss_mask, positions`` are
    ``[rows, row_length]``; ``sequence_mask`` ``[batch, k]`` marks the sequences that exist
    (segment ``e * k + i + 1`` is response ``i`` of example ``e``).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array
    positions: jax.Array
    sequence_mask: jax.Array


def is_packed(batch: Batch) -> bool:
    """Whether ``batch`` is packed (several sequences per row, with ``sequence_mask``)."""
    return "sequence_mask" in batch


def batch_tokens(batch: Batch) -> tuple[jax.Array, ...]:
    """The token arrays the forward passes read: ``TOKENS`` (``[batch, (k,) seq]``) of a padded
    batch, or :class:`PackedTokens` of a packed one."""
    if is_packed(batch):
        return PackedTokens(*(batch[n] for n in PackedTokens._fields))
    return tuple(batch[n] for n in TOKENS)


def sequence_shape(tokens: tuple[jax.Array, ...]) -> tuple[int, ...]:
    """Shape of the per-sequence values of ``tokens``: ``[batch, k]`` (or ``[batch]``)."""
    if isinstance(tokens, PackedTokens):
        return tokens.sequence_mask.shape
    return tokens[0].shape[:-1]


def segment_totals(x: jax.Array, segments: jax.Array, num: int) -> jax.Array:
    """``[num]``: the sum of ``x`` over each segment id ``1 .. num`` (id 0, padding, dropped).

    ``x`` and ``segments`` share their shape (``[rows, row_length]``).
    """
    ids = jnp.where(segments > 0, segments - 1, num).reshape(-1)  # padding -> an extra bucket
    return jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num + 1)[:num]


def _packed_shifted_mask(tokens: PackedTokens) -> jax.Array:
    """``[rows, row_length - 1]`` float32: the loss mask of each next token whose predicting
    token (one to its left) is in the same segment, so no prediction crosses a boundary."""
    seg = tokens.attention_mask
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return tokens.loss_mask[:, 1:].astype(jnp.float32) * same


def packed_token_counts(tokens: PackedTokens) -> jax.Array:
    """``[batch, k]`` float32: response tokens scored in each sequence (the padded layout's
    ``sum(loss_mask[:, 1:])``)."""
    b, k = tokens.sequence_mask.shape
    totals = segment_totals(_packed_shifted_mask(tokens), tokens.attention_mask[:, 1:], b * k)
    return totals.reshape(b, k)  # [batch * k] -> [batch, k], example-major


def packed_response_logps(
    model: Any,
    params: Any,
    tokens: PackedTokens,
    *,
    lora: Any = None,
    chunk_size: int = 0,
    key: jax.Array | None = None,
    entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """:func:`response_logps` of a packed batch: ``(logps [batch, k], counts [batch, k])``, and
    with ``entropy`` the summed next-token entropies ``[batch, k]`` (full logits only).

    One forward over the ``[rows, row_length]`` rows (attention within segments, per-segment
    positions); token log-probs under the shift convention, kept where the predicting token is
    in the label's segment, summed per segment (``segment_sum``) and laid out ``[batch, k]``.
    """
    if entropy and chunk_size:
        raise ValueError("packed_response_logps(entropy=True) needs the full logits (chunk_size=0)")
    ids, seg = tokens.input_ids, tokens.attention_mask
    b, k = tokens.sequence_mask.shape
    pos = tokens.positions
    if chunk_size:
        hidden = model.hidden_states(params, ids, seg, positions=pos, lora=lora, key=key)
        token_logps = losses.chunked_token_logprobs(
            hidden[:, :-1], model.unembedding(params), ids[:, 1:], chunk_size=chunk_size
        )
    else:
        logits = model.apply(params, ids, seg, positions=pos, lora=lora, key=key)
        token_logps = losses.token_logprobs(logits[:, :-1], ids[:, 1:])  # [rows, row_length - 1]
    mask = _packed_shifted_mask(tokens)
    per_segment = (
        lambda x: segment_totals(  # noqa: E731
            jnp.where(mask > 0, x * mask, 0.0), seg[:, 1:], b * k
        ).reshape(b, k)
    )
    logps = per_segment(token_logps)
    if entropy:  # a reduction over the logits already built, outside the gradient
        ent = losses.entropy(jax.lax.stop_gradient(logits[:, :-1]))  # [rows, row_length - 1]
        return logps, packed_token_counts(tokens), per_segment(ent)
    return logps, packed_token_counts(tokens)


def packed_rewards(model: Any, params: Any, tokens: PackedTokens) -> jax.Array:
    """``[batch, k]`` float32: a reward model's score of each packed sequence, read at the
    segment's last token (what ``model.apply`` reads at a padded row's last real token)."""
    ids, seg = tokens.input_ids, tokens.attention_mask
    b, k = tokens.sequence_mask.shape
    rows, length = ids.shape
    hidden = model.hidden_states(params, ids, seg, positions=tokens.positions)  # [rows, L, D]
    following = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))  # the next token's segment (0 past the end)
    is_last = (seg > 0) & (seg != following)
    flat = jnp.arange(rows * length, dtype=jnp.int32).reshape(rows, length)
    last = segment_totals(jnp.where(is_last, flat, 0), seg, b * k)  # [batch * k] token index
    picked = hidden.reshape(rows * length, -1)[last]  # [batch * k, D]
    return model.reward_of_hidden(params, picked).reshape(b, k)


def flatten_responses(x: jax.Array) -> jax.Array:
    """``[batch, k, ...] -> [k * batch, ...]``: the k responses of every example in one pass.

    Response-major: all first responses (a pair's chosen side), then all second ones, so a pair
    batch becomes chosen rows then rejected rows. :func:`unflatten_responses` inverts it.
    """
    return einops.rearrange(x, "b k ... -> (k b) ...")


def unflatten_responses(x: jax.Array, k: int) -> jax.Array:
    """``[k * batch, ...] -> [batch, k, ...]``, the inverse of :func:`flatten_responses`."""
    return einops.rearrange(x, "(k b) ... -> b k ...", k=k)


def example_weights(batch: Batch) -> jax.Array:
    """``[batch]`` float32: ``example_mask`` (1 real row, 0 padding row) or ones."""
    if "example_mask" in batch:
        return batch["example_mask"].astype(jnp.float32)
    return jnp.ones((batch["input_ids"].shape[0],), jnp.float32)


def agreement(margin: jax.Array, tolerance: jax.Array | float = 0.0) -> jax.Array:
    """1 where ``margin > tolerance``, 0 where ``margin < -tolerance``, 1/2 for a tie."""
    return jnp.where(margin > tolerance, 1.0, jnp.where(margin < -tolerance, 0.0, 0.5))


def ranking_accuracy(
    scores: jax.Array, mask: jax.Array, tolerance: jax.Array | float = 0.0
) -> jax.Array:
    """Per example, the fraction of ordered pairs of a best-first ranking scored in order.

    Args:
      scores: ``[batch, k]``, the labelled order best first.
      mask: ``[batch, k]`` 1 for the responses the example has.
      tolerance: score differences within it count as ties (one half); scalar or
        ``[batch, k, k]``.

    Returns:
      ``[batch]``: over pairs ``i < j`` both present, the mean of :func:`agreement` of
      ``scores_i - scores_j`` (0 for an example with fewer than two responses).
    """
    k = scores.shape[1]
    pair_mask = mask[:, :, None] * mask[:, None, :] * jnp.triu(jnp.ones((k, k)), 1)
    correct = agreement(scores[:, :, None] - scores[:, None, :], tolerance) * pair_mask
    return safe_div(jnp.sum(correct, (1, 2)), jnp.sum(pair_mask, (1, 2)))


def last_valid(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``[batch, k] -> [batch]``: each row's entry at its last position with ``mask`` set."""
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(x, last[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------------
# Objectives and their metrics
# ----------------------------------------------------------------------------------------------


def means(stats: Mapping[str, tuple[Any, Any]]) -> Metrics:
    """``{name: sum / count}`` (0 where the count is 0)."""
    return {name: safe_div(jnp.asarray(s), jnp.asarray(c)) for name, (s, c) in stats.items()}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What an algorithm computes on a batch; :func:`make_update` and :func:`make_eval_step`
    turn it into the train and held-out steps.

    Attributes:
      loss: ``loss(params, batch, frozen, key, denominators) -> (loss, stats)`` on one
        micro-batch. ``loss`` is the micro-batch's share of the whole batch's objective (its sum
        divided by ``denominators["loss"]``, computed on the *full* batch, so accumulation is
        exact); ``stats`` is :data:`Stats`, ``{name: (sum, count)}`` over the micro-batch.
        ``key`` is ``None`` in evaluation (no dropout).
      denominators: ``batch -> {"loss": ..., ...}``, the full batch's normalisers.
      finalize: ``stats -> metrics``: the means (``loss`` included) and the metrics derived from
        them, the same function for train and eval (default :func:`means`).
      kl_coefficient: the beta of the KL-regularised objective the algorithm optimises (whose
        optimum is ``pi_ref * exp(r / beta)``), for the built-in tasks' ground-truth metrics;
        ``None`` when it has none.
      eval_loss: the ``loss`` of the held-out step when it records more than the train step
        (the same loss, plus metrics too costly to keep under the gradient, such as DPO's
        ``entropy/response``); ``None``: ``loss``.
    """

    loss: Callable[..., tuple[jax.Array, Stats]]
    denominators: Callable[[Batch], Mapping[str, jax.Array]]
    finalize: Callable[[Stats], Metrics] = means
    kl_coefficient: float | None = None
    eval_loss: Callable[..., tuple[jax.Array, Stats]] | None = None


# ----------------------------------------------------------------------------------------------
# The shared update: accumulate, guard, apply, measure
# ----------------------------------------------------------------------------------------------


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm of a pytree, in float32."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def apply_if_finite(
    ok: jax.Array, state: Any, apply: Callable[[Any], tuple[Any, Any]]
) -> tuple[Any, jax.Array]:
    """``(new_state, update_norm)``: ``apply(state) -> (new_state, updates)`` when ``ok``, else
    ``state`` with only its ``step`` advanced (the batch was consumed) and an update norm of 0.

    The non-finite guard of every train step: a non-finite loss or gradient never reaches the
    weights or the optimiser state. A ``lax.cond`` rather than a select of the new state against
    the old, so a good step makes no extra pass over parameters and moments (under ``vmap`` it
    becomes that select again)."""

    def update(st: Any) -> tuple[Any, jax.Array]:
        new, updates = apply(st)
        return new, tree_norm(updates).astype(jnp.float32)

    def skip(st: Any) -> tuple[Any, jax.Array]:
        return st.replace(step=st.step + 1), jnp.zeros((), jnp.float32)

    return jax.lax.cond(ok, update, skip, state)


def make_update(
    objective: Objective,
    *,
    num_micro: int,
    schedule: optax.Schedule | None,
    constrain: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Batch, Any, jax.Array], tuple[TrainState, Metrics]]:
    """Builds ``train_step(state, batch, frozen, key, update_scale=None) -> (state, metrics)``.

    ``update_scale`` (a scalar, possibly traced) multiplies the optimiser's update and the
    ``learning_rate`` metric: the step of a learning rate ``update_scale`` times the schedule's
    (:meth:`~prefjax.train.state.TrainState.apply_gradients`; a sweep's per-member rates).

    Args:
      objective: the algorithm's :class:`Objective`; its denominators are computed on the full
        batch before the micro-batch scan, its stats summed over micro-batches, then finalised.
      num_micro: micro-batches per step (``config.optimizer.grad_accum_steps``).
      schedule: the learning-rate schedule, for the ``learning_rate`` metric.
      constrain: optional sharding constraint applied to each micro-batch.
    """

    def train_step(
        state: TrainState,
        batch: Batch,
        frozen: Any,
        key: jax.Array,
        update_scale: jax.Array | None = None,
    ) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(key, state.step)
        denominators = objective.denominators(batch)
        loss, grads, stats = optim.accumulate_gradients(
            lambda p, b, k: objective.loss(p, b, frozen, k, denominators),
            state.params,
            batch,
            key,
            num_micro,
            constrain=constrain,
        )
        grad_norm = tree_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state, update_norm = apply_if_finite(
            ok, state, lambda st: st.apply_gradients(grads, scale=update_scale)
        )
        metrics = objective.finalize({**stats, "loss": (loss, jnp.ones((), jnp.float32))})
        metrics["grad_norm"] = grad_norm
        metrics["param_norm"] = tree_norm(new_state.params)
        metrics["update_norm"] = update_norm
        metrics["train/skipped"] = (~ok).astype(jnp.float32)
        if schedule is not None:
            rate = jnp.asarray(schedule(state.step), jnp.float32)
            metrics["learning_rate"] = rate if update_scale is None else rate * update_scale
        return new_state, metrics

    return train_step


def make_eval_step(objective: Objective) -> Callable[[Any, Batch, Any], Stats]:
    """``eval_step(params, batch, frozen) -> stats`` (:data:`Stats`, ``loss`` included) of
    ``objective.eval_loss`` (``objective.loss`` when it has none).

    The loop sums the stats over held-out batches (and hosts) and finalises them with
    ``objective.finalize``, exactly as the train step does within a batch.
    """

    loss = objective.eval_loss or objective.loss

    def eval_step(params: Any, batch: Batch, frozen: Any) -> Stats:
        den = objective.denominators(batch)
        ones = {name: jnp.ones_like(value) for name, value in den.items()}
        loss_sum, stats = loss(params, batch, frozen, None, ones)  # no dropout
        return {**stats, "loss": (loss_sum, den["loss"])}

    return eval_step


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
      objective: the algorithm's :class:`Objective` (its ``finalize`` turns summed eval stats
        into metrics).
      reference: the reference policy's params when they are in memory (the frozen copy, or the
        LoRA base with adapters off), else ``None``.
      info: free-form description (reference kind, parameter counts) for logs.
      should_stop: optional ``host_metrics -> reason | None``, asked after every train step
        with that step's metrics as host floats (the loop then fetches them every step); a
        reason ends the run at that step: checkpoint, final evaluation, status ``"stopped"``
        (e.g. PPO's KL budget with ``kl_budget_action="stop"``). ``None``: the run never stops
        early on its metrics.
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
    objective: Objective
    reference: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    should_stop: Callable[[Mapping[str, float]], str | None] | None = None

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
        shd.with_activation_sharding(mesh, train_step),
        in_shardings=(state_shard, batch_shard, frozen_shard, repl),
        out_shardings=(state_shard, repl),
        donate_argnums=0,
    )
    jit_eval = jax.jit(
        shd.with_activation_sharding(mesh, eval_step),
        in_shardings=(state_shard.params, batch_shard, frozen_shard),
        out_shardings=repl,
    )
    return jit_train, jit_eval, batch_shard


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
