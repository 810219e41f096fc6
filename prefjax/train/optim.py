"""Optimisers, schedules and exact gradient accumulation.

* :func:`make_optimizer` builds ``clip_by_global_norm -> AdamW`` (or SGD / Lion) from
  ``config.optimizer`` with a warm-up followed by cosine, linear or constant decay, and weight decay
  masked off norms and biases (:func:`decay_mask`).
* :func:`accumulate_gradients` runs ``grad_accum_steps`` micro-batches through a ``lax.scan`` inside
  the jitted step, carrying *sums*: each micro-batch's loss is already divided by the whole batch's
  denominator (pairs, tokens...), so the accumulated loss and gradient equal those of one large
  batch exactly -- unlike averaging per-micro-batch means (``optax.MultiSteps``), which weights a
  micro-batch with few response tokens as much as one with many.
* Mixed precision: parameters and optimiser state stay in ``param_dtype`` (float32 by default);
  the models compute in ``config.model.dtype`` (bfloat16 on accelerators), so gradients arrive in
  float32 and AdamW's moments are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

_NO_DECAY_NAMES = ("norm", "bias", "scale", "ln_", "layernorm", "rmsnorm")


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        names.append(str(key).lower())
    return names


def decay_mask(params: Any) -> Any:
    """``True`` for parameters that get weight decay: matrices, not norms or biases.

    A leaf is excluded when any component of its path mentions a norm, bias or scale, or when it
    has fewer than two dimensions (per-layer-stacked norm scales are 2-D, hence the name check).

    >>> p = {"mlp": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    >>> p["final_norm"] = {"scale": jnp.ones(3)}
    >>> prefjax.train.optim.decay_mask(p)
    {'final_norm': {'scale': False}, 'mlp': {'bias': False, 'kernel': True}}
    """

    def one(path: tuple[Any, ...], leaf: Any) -> bool:
        names = _path_names(path)
        if any(bad in name for name in names for bad in _NO_DECAY_NAMES):
            return False
        return len(getattr(leaf, "shape", ())) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


def make_schedule(opt_config: Any, num_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warm-up from 0, then cosine / linear decay to 0, or constant.

    Args:
      opt_config: ``config.optimizer`` (``learning_rate``, ``warmup_steps``, ``schedule``).
      num_steps: total optimiser steps (``config.train.num_steps``).
    """
    lr = float(opt_config.learning_rate)
    warmup = int(opt_config.get("warmup_steps", 0))
    kind = str(opt_config.get("schedule", "constant"))
    if lr < 0:
        raise ValueError(f"config.optimizer.learning_rate={lr} must be >= 0.")
    if warmup < 0:
        raise ValueError(f"config.optimizer.warmup_steps={warmup} must be >= 0.")
    decay_steps = max(int(num_steps) - warmup, 1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        raise ValueError(
            f"config.optimizer.schedule={kind!r}: expected 'cosine', 'linear' or 'constant'."
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
    opt_config: Any, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from ``config.optimizer``: global-norm clipping then the optimiser.

    Fields: ``name`` ("adamw" | "adam" | "sgd" | "lion"), ``learning_rate``, ``warmup_steps``,
    ``schedule``, ``weight_decay`` (decoupled, masked by :func:`decay_mask`), ``b1``, ``b2``,
    ``eps``, ``clip_norm`` (0 = off).
    """
    schedule = make_schedule(opt_config, num_steps)
    name = str(opt_config.get("name", "adamw"))
    b1 = float(opt_config.get("b1", 0.9))
    b2 = float(opt_config.get("b2", 0.999))
    eps = float(opt_config.get("eps", 1e-8))
    weight_decay = float(opt_config.get("weight_decay", 0.0))
    clip_norm = float(opt_config.get("clip_norm", 0.0))
    if clip_norm < 0:
        raise ValueError(f"config.optimizer.clip_norm={clip_norm} must be >= 0 (0 = off).")
    if name == "adamw":
        opt = optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
        )
    elif name == "adam":
        opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "lion":
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    elif name == "sgd":
        opt = optax.sgd(schedule, momentum=b1 if b1 > 0 else None)
    else:
        raise ValueError(
            f"config.optimizer.name={name!r}: expected 'adamw', 'adam', 'lion' or 'sgd'."
        )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    return optax.chain(*parts, opt), schedule


def split_micro_batches(batch: Any, num_micro: int) -> Any:
    """``[batch, ...] -> [num_micro, batch // num_micro, ...]`` with a strided assignment.

    Micro-batch ``j`` takes examples ``j, j + num_micro, ...``; when the batch axis is split over
    devices in contiguous blocks, every micro-batch then keeps an equal share on every device.
    """

    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_micro:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by "
                f"config.optimizer.grad_accum_steps={num_micro}."
            )
        # [batch, ...] -> [batch // n, n, ...] -> [n, batch // n, ...]
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]],
    params: Any,
    batch: Any,
    key: jax.Array,
    num_micro: int,
    *,
    constrain: Callable[[Any], Any] | None = None,
) -> tuple[jax.Array, Any, Any]:
    """Sums ``value_and_grad(loss_fn)`` over ``num_micro`` micro-batches in a ``lax.scan``.

    Args:
      loss_fn: ``loss_fn(params, micro_batch, key) -> (loss, aux)`` where ``loss`` is the
        micro-batch's contribution to the full-batch objective (its sum divided by the *full*
        batch's denominator) and ``aux`` a pytree of sums; both are added across micro-batches.
      params: the differentiated pytree.
      batch: the full batch (leading axis = examples).
      key: PRNG key; micro-batch ``i`` uses ``fold_in(key, i)``.
      num_micro: number of micro-batches (1 = a single pass, no scan).
      constrain: optional function applied to each micro-batch (a sharding constraint).

    Returns:
      ``(loss, grads, aux)`` summed over micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        micro = constrain(batch) if constrain is not None else batch
        (loss, aux), grads = grad_fn(params, micro, key)
        return loss, grads, aux
    micro_batches = split_micro_batches(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    _, aux_shape = jax.eval_shape(loss_fn, params, first, key)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (
        jnp.zeros((), jnp.float32),
        zeros(jax.eval_shape(lambda p: p, params)),
        zeros(aux_shape),
    )

    def body(carry, xs):
        index, micro = xs
        if constrain is not None:
            micro = constrain(micro)
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(key, index))
        total_loss, total_grads, total_aux = carry
        carry = (
            total_loss + loss.astype(jnp.float32),
            jax.tree.map(jnp.add, total_grads, grads),
            jax.tree.map(jnp.add, total_aux, aux),
        )
        return carry, None

    (loss, grads, aux), _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro_batches))
    return loss, grads, aux


def all_finite(*trees: Any) -> jax.Array:
    """``True`` iff every leaf of every tree is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(pred, on_true, on_false)`` (keeps the old state on a bad step)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
