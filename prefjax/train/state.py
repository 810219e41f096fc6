"""The train state: only what the optimiser touches.

``TrainState`` holds the step counter, the trainable parameters (the full policy, or only the LoRA
adapters) and the optimiser state. Everything frozen -- the reference policy, the LoRA base
weights, a reward model -- is passed to the step as a separate argument and never differentiated
(DESIGN.md, "Parameters"). This mirrors ``flax.training.train_state.TrainState`` without the
``apply_fn`` coupling: the step factories close over the model instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Step, trainable params and optimiser state; ``tx`` (and ``apply_fn``) are static.

    Attributes:
      step: int32 scalar, the number of optimiser steps taken (skipped non-finite steps included,
        so ``step`` always counts consumed batches).
      params: the trainable pytree.
      opt_state: ``tx``'s state for ``params``.
      tx: the optax transformation (static, not a leaf).
      apply_fn: optional model function (static), for code that wants flax's field.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    apply_fn: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        tx: optax.GradientTransformation,
        apply_fn: Callable[..., Any] | None = None,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)``."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            tx=tx,
            apply_fn=apply_fn,
        )

    def apply_gradients(
        self, grads: Any, *, scale: jax.typing.ArrayLike | None = None
    ) -> tuple[TrainState, Any]:
        """One optimiser update; returns the new state and the applied update pytree.

        ``scale`` (optional scalar) multiplies the update: for the optimisers of
        :func:`prefjax.train.optim.make_optimizer`, whose update is linear in the learning rate,
        a ``tx`` built for learning rate ``lr`` then steps as one built for ``scale * lr``.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        if scale is not None:
            updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state), updates
