r"""Process reward models (PRM): step scores of token arrays and their aggregation to one reward.

A PRM is a reward model (``head="reward"``: the same parameters, the same checkpoints) read at
every token instead of only the last one: its logit :math:`z_t` at the token ending a step is
the log-odds that the solution is still correct after that step. Steps end at the
``step_separator`` token the data placed after each step (:mod:`prefjax.data.tokenize`), so the
same reading works on training batches (``step_mask`` from the labels) and on generated
responses (:func:`separator_mask`: the separator tokens inside the response).

A response's reward aggregates its step probabilities :math:`p_k = \sigma(z_k)`:

* ``"min"``: :math:`\min_k p_k`, the weakest step (Lightman et al., 2023);
* ``"product"``: :math:`\prod_k p_k`, the probability that every step is right if the step
  judgements were independent (computed as :math:`\exp \sum_k \log\sigma(z_k)`).

A response without a complete step scores ``empty`` (default 0: nothing was shown correct).

Example:
  >>> import numpy as np
  >>> p = np.array([[0.9, 0.0, 0.5, 0.8]])
  >>> mask = np.array([[1, 0, 1, 1]])
  >>> print(f"{float(aggregate_step_scores(p, mask, aggregation='min')[0]):.2f}")
  0.50
  >>> print(f"{float(aggregate_step_scores(p, mask, aggregation='product')[0]):.2f}")
  0.36
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

AGGREGATIONS = ("min", "product")


class StepScores(NamedTuple):
    """Step scores of a batch: ``logits`` and ``probs`` ``[batch, seq]`` (``probs`` 0 where
    ``step_mask`` is not set), and the ``[batch]`` aggregated ``reward``."""

    logits: jax.Array
    probs: jax.Array
    reward: jax.Array


def step_logits(
    model: Any, params: Any, input_ids: ArrayLike, attention_mask: ArrayLike
) -> jax.Array:
    """``[batch, seq]`` float32 reward-head logits at every token.

    The reward head applied to every final hidden state: at the last real token this is
    exactly ``model.apply`` of a reward model (a PRM checkpoint is a reward-model checkpoint).

    Args:
      model: a ``prefjax.models.Model`` with ``head="reward"``.
      params: its parameters (with ``reward_head``).
      input_ids, attention_mask: ``[batch, seq]``.
    """
    if "reward_head" not in params:
        raise ValueError("step_logits needs a reward model's params (no 'reward_head')")
    hidden = model.hidden_states(params, input_ids, attention_mask)  # [batch, seq, embed]
    kernel = params["reward_head"]["kernel"].astype(jnp.float32)  # [embed, 1]
    return jnp.einsum("btd,do->bto", hidden.astype(jnp.float32), kernel)[..., 0]


def separator_mask(input_ids: ArrayLike, response_mask: ArrayLike, separator_id: int) -> jax.Array:
    """``[batch, seq]`` bool: the response tokens that are the step separator (step ends).

    Args:
      input_ids: ``[batch, seq]`` prompt + response tokens.
      response_mask: ``[batch, seq]`` 1 on response tokens (never the prompt, which may contain
        the separator too, nor padding).
      separator_id: the separator's token id (:func:`prefjax.data.tokenize.step_separator_id`).
    """
    input_ids, response_mask = jnp.asarray(input_ids), jnp.asarray(response_mask)
    chex.assert_equal_shape((input_ids, response_mask))
    return (input_ids == separator_id) & (response_mask > 0)


def aggregate_step_scores(
    step_probs: ArrayLike,
    step_mask: ArrayLike,
    *,
    aggregation: str = "min",
    empty: float = 0.0,
) -> jax.Array:
    r"""``[batch]`` reward of each row's step probabilities: their ``min`` or ``product``.

    Args:
      step_probs: ``[batch, seq]`` probabilities (read where ``step_mask`` is set).
      step_mask: ``[batch, seq]`` 1/True at step ends.
      aggregation: ``"min"`` or ``"product"``.
      empty: the reward of a row without any step.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    p = jnp.asarray(step_probs, jnp.result_type(step_probs, jnp.float32))
    mask = jnp.asarray(step_mask) > 0
    chex.assert_equal_shape((p, mask))
    if aggregation == "min":
        out = jnp.min(jnp.where(mask, p, 1.0), axis=-1)
    else:
        # A product of probabilities in log space (no underflow to 0 over many steps); the
        # double where keeps log(0) of masked entries out of the value and the gradient.
        logs = jnp.where(mask, jnp.log(jnp.where(mask, p, 1.0)), 0.0)
        out = jnp.exp(jnp.sum(logs, axis=-1))
    return jnp.where(jnp.any(mask, axis=-1), out, jnp.asarray(empty, out.dtype))


def step_scores(
    model: Any,
    params: Any,
    input_ids: ArrayLike,
    attention_mask: ArrayLike,
    step_mask: ArrayLike,
    *,
    aggregation: str = "min",
    empty: float = 0.0,
) -> StepScores:
    """The PRM's step logits, step probabilities and aggregated reward of given token arrays.

    Args:
      model, params: a reward model (see :func:`step_logits`).
      input_ids, attention_mask: ``[batch, seq]`` prompt + response tokens (any padding side).
      step_mask: ``[batch, seq]`` step ends (``batch["step_mask"]``, or :func:`separator_mask`
        of generated responses).
      aggregation, empty: as :func:`aggregate_step_scores`.
    """
    logits = step_logits(model, params, input_ids, attention_mask)
    mask = jnp.asarray(step_mask) > 0
    probs = jnp.where(mask, jax.nn.sigmoid(logits), 0.0)
    reward = aggregate_step_scores(probs, mask, aggregation=aggregation, empty=empty)
    return StepScores(logits, probs, reward)


def prm_rewards(
    model: Any,
    params: Any,
    input_ids: ArrayLike,
    attention_mask: ArrayLike,
    response_mask: ArrayLike,
    *,
    separator_id: int,
    aggregation: str = "min",
    empty: float = 0.0,
) -> jax.Array:
    """``[batch]`` PRM rewards of sampled responses: the step ends are the separator tokens of
    the response (``response_mask``), then :func:`step_scores`."""
    mask = separator_mask(input_ids, response_mask, separator_id)
    return step_scores(
        model, params, input_ids, attention_mask, mask, aggregation=aggregation, empty=empty
    ).reward
