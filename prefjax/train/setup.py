"""The set-up every algorithm shares: sharded train state, frozen pytree, jitted steps.

:func:`build_setup` is what an algorithm's ``setup(config, model, mesh, key)`` calls with its own
step factories (``make_train_step``, ``make_eval_step``); see :mod:`prefjax.train` for the
protocol an algorithm fills.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from prefjax import sharding as shd
from prefjax.train import common, optim
from prefjax.train.common import Setup, get


def _copy(tree: Any, sharding: Any) -> Any:
    """A fresh sharded copy (never aliasing ``tree``, which donation would delete)."""
    return jax.device_put(tree, sharding, may_alias=False)


def build_setup(
    config: Any,
    model: Any,
    mesh: Any,
    key: jax.Array,
    make_train: Callable[..., Any],
    make_eval: Callable[..., Any],
    *,
    needs_frozen_copy: bool,
) -> Setup:
    """Sharded state and jitted steps from an algorithm's step factories.

    ``needs_frozen_copy``: the algorithm reads a frozen reference (``algorithm.reference="copy"``
    keeps ``model.params`` as the frozen tree). Under LoRA the frozen tree is always the base.
    """
    rules = shd.rules_from_config(get(config, "mesh", {}) or {})
    num_steps = int(get(config, "train.num_steps", 1000))
    tx, schedule = optim.make_optimizer(get(config, "optimizer"), num_steps)
    reference = get(config, "algorithm.reference", "none")
    batch_size = get(config, "data.batch_size", None)
    if batch_size:
        shd.check_batch_size(int(batch_size), mesh)
        accum = common.grad_accum_steps(config)
        if int(batch_size) % accum:
            raise ValueError(
                f"config.data.batch_size={batch_size} is not divisible by "
                f"config.optimizer.grad_accum_steps={accum}."
            )
        shd.check_batch_size(
            int(batch_size) // accum,
            mesh,
            field=f"config.data.batch_size / config.optimizer.grad_accum_steps = "
            f"{batch_size} / {accum} (the micro-batch)",
        )
    if common.lora_rank(config) > 0:
        trainable = model.init_lora(
            key,
            rank=common.lora_rank(config),
            alpha=float(get(config, "model.lora.alpha", 16.0)),
            targets=tuple(get(config, "model.lora.targets", ("q_proj", "v_proj"))),
            dropout=float(get(config, "model.lora.dropout", 0.0)),
        )
        trainable_axes = model.lora_axes(trainable)
        frozen, frozen_axes = model.params, model.param_axes
    else:
        trainable, trainable_axes = model.params, model.param_axes
        keep = needs_frozen_copy and reference in ("copy",)
        frozen, frozen_axes = (model.params, model.param_axes) if keep else (None, None)
    params_sharding = shd.param_shardings(mesh, trainable_axes, trainable, rules)
    trainable = _copy(trainable, params_sharding)
    state, state_sharding = common.create_state(mesh, tx, trainable, params_sharding)
    if frozen is not None:
        frozen_sharding = shd.param_shardings(mesh, frozen_axes, frozen, rules)
        # No step donates or updates the frozen tree, so it may share the buffers of
        # ``model.params`` (already laid out this way after a sharded init): one copy of the
        # weights fewer than copying it.
        frozen = jax.device_put(frozen, frozen_sharding, may_alias=True)
    else:
        frozen_sharding = None
    train_step = make_train(model, config, mesh=mesh, schedule=schedule)
    eval_step = make_eval(model, config)
    jit_train, jit_eval, batch_sharding = common.jit_steps(
        mesh, train_step, eval_step, state_sharding, frozen_sharding
    )

    if common.lora_rank(config) > 0:
        policy_params = lambda params, frozen: model.merge_lora(frozen, params)
    else:
        policy_params = lambda params, frozen: params

    return Setup(
        state=state,
        frozen=frozen,
        train_step=jit_train,
        eval_step=jit_eval,
        mesh=mesh,
        state_sharding=state_sharding,
        frozen_sharding=frozen_sharding,
        batch_sharding=batch_sharding,
        schedule=schedule,
        model=model,
        policy_params=policy_params,
        info={
            "reference": reference,
            "trainable_params": common.count_params(trainable),
            "frozen_params": 0 if frozen is None else common.count_params(frozen),
            "mesh": dict(mesh.shape),
        },
    )
