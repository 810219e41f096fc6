"""The set-up every algorithm shares: sharded train state, frozen pytree, jitted steps.

:func:`build_setup` asks an algorithm (see :mod:`prefjax.train` for the protocol) for its
reference kind and its :class:`~prefjax.train.common.Objective`, and returns the
:class:`~prefjax.train.common.Setup` the loop trains with. :func:`make_train_step` and
:func:`make_eval_step` are the unjitted steps, for tests and custom loops. The config is expected
to have passed :func:`prefjax.train.config.validate` (the loop runs it once at start-up).
"""

from __future__ import annotations

from typing import Any

import jax

from prefjax import sharding as shd
from prefjax.train import common, optim
from prefjax.train.common import Setup

# Reference kinds an algorithm's ``reference(config)`` may return.
REFERENCE_KINDS = ("copy", "lora_base", "precomputed", "none")


def make_train_step(
    algorithm: Any, model: Any, config: Any, *, mesh: Any = None, schedule: Any = None
) -> Any:
    """``train_step(state, batch, frozen, key) -> (state, metrics)`` of ``algorithm``, unjitted.

    ``mesh`` (optional) keeps micro-batches split over ``("data", "fsdp")``; ``schedule`` adds a
    ``learning_rate`` metric.
    """
    return common.make_update(
        algorithm.objective(model, config),
        num_micro=config.optimizer.grad_accum_steps,
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )


def make_eval_step(algorithm: Any, model: Any, config: Any) -> Any:
    """``eval_step(params, batch, frozen) -> {name: (sum, count)}`` of ``algorithm``, unjitted."""
    return common.make_eval_step(algorithm.objective(model, config))


def _copy(tree: Any, sharding: Any) -> Any:
    """A fresh sharded copy (never aliasing ``tree``, which donation would delete)."""
    return jax.device_put(tree, sharding, may_alias=False)


def build_setup(config: Any, model: Any, mesh: Any, key: jax.Array, algorithm: Any) -> Setup:
    """Sharded state, frozen pytree and jitted steps of ``algorithm`` for ``config`` on ``mesh``.

    * no LoRA: trainable = a copy of ``model.params`` (the state is donated to each step);
      frozen = ``model.params`` themselves when the algorithm's reference is ``"copy"``, else
      ``None`` (``"precomputed"``, ``"none"``).
    * LoRA: trainable = adapters from ``model.init_lora``; frozen = the base ``model.params``
      (the reference under ``"lora_base"``, and what the adapters sit on in every case).

    The frozen tree shares ``model.params``' buffers wherever they already have the mesh's
    sharding (resharded otherwise), so the weights are held twice, not three times; do not donate
    ``model.params`` to another computation while this setup is in use.
    """
    reference = algorithm.reference(config)
    if reference not in REFERENCE_KINDS:
        raise ValueError(
            f"{algorithm.NAME}.reference(config)={reference!r}: not in {REFERENCE_KINDS}"
        )
    rules = shd.rules_from_config(config.mesh)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
    lora = config.model.lora
    if common.uses_lora(config):
        trainable = model.init_lora(
            key,
            rank=lora.rank,
            alpha=float(lora.alpha),
            targets=tuple(lora.targets),
            dropout=float(lora.dropout),
        )
        trainable_axes = model.lora_axes(trainable)
        frozen, frozen_axes = model.params, model.param_axes
        policy_params = lambda params, frozen: model.merge_lora(frozen, params)
    else:
        trainable, trainable_axes = model.params, model.param_axes
        keep = reference == "copy"
        frozen, frozen_axes = (model.params, model.param_axes) if keep else (None, None)
        policy_params = lambda params, frozen: params
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
    objective = algorithm.objective(model, config)
    train_step = common.make_update(
        objective,
        num_micro=config.optimizer.grad_accum_steps,
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )
    jit_train, jit_eval, batch_sharding = common.jit_steps(
        mesh, train_step, common.make_eval_step(objective), state_sharding, frozen_sharding
    )
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
        objective=objective,
        reference=frozen if reference in ("copy", "lora_base") else None,
        info={
            "reference": reference,
            "trainable_params": common.count_params(trainable),
            "frozen_params": 0 if frozen is None else common.count_params(frozen),
            "mesh": dict(mesh.shape),
        },
    )
