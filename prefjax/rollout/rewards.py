r"""Reward sources behind one call, their post-processing, and best-of-N sampling.

A *source* maps a :class:`~prefjax.rollout.sampler.Rollout` to one raw score per response,
``[R]`` float32:

* :class:`RewardModel` -- a trained reward model (transformer with a ``"reward"`` head, frozen
  params; ``prefjax.train.online.reward_model_from_workdir`` loads one from an
  ``experiments/reward_model.py`` run), read at each response's **last real token**: the
  prompt is left-padded and the response right-padded, so the last 1 of the attention mask is
  the response's last real token (its EOS when it has one), never a pad or a prompt token;
* :class:`GoldReward` -- a built-in task's programmatic gold reward (``prefjax.data.RepeatTask``,
  ``prefjax.data.Bandit``), computed on the host from the decoded text (EOS searched in the
  response only: the prompt is cut off by its own mask first);
* :class:`ProcessRewardModel` -- a process reward model (a reward model trained with
  ``loss="prm"``) read at every step separator of the response, its step probabilities
  aggregated by ``min`` or ``product`` (:mod:`prefjax.rollout.prm`);
* :class:`Verifier` -- a user's function: on strings (``fn(prompts, responses) -> floats``,
  given a tokenizer) or on arrays (``fn(rollout) -> [R]``, a JAX function).

:func:`score` is the one call: raw scores, then :class:`RewardTransform` -- a penalty for rows
that hit the length limit, clipping, whitening (in that order) -- and :func:`on_last_token` puts
a sequence score on the last real response token of a ``[R, N]`` array (zeros elsewhere, padding
included) for per-token methods. :func:`best_of_n` keeps each prompt's highest-scored sample.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import losses
from prefjax.rollout import prm
from prefjax.rollout.sampler import FINISH_LENGTH, Rollout, sequences


class RewardSource(Protocol):
    """Anything that scores a rollout: ``source(rollout) -> [R]`` raw scores."""

    name: str

    def __call__(self, rollout: Rollout) -> Any: ...


def _unpad(ids: Any, mask: Any) -> list[list[int]]:
    """Rows of ``ids`` without their masked positions (host lists of ints)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    return [[int(t) for t in row[m > 0]] for row, m in zip(ids, mask, strict=True)]


@functools.lru_cache(maxsize=16)
def _reward_fn(model: Any) -> Callable:
    def fn(params, ids, attn):
        return model.apply(params, ids, attn).astype(jnp.float32)  # [R] at the last real token

    return jax.jit(fn)


@dataclasses.dataclass(frozen=True, eq=False)
class RewardModel:
    """A trained reward model as a source: ``r(x, y)`` at the response's last real token.

    Attributes:
      model: a ``prefjax.models.Model`` with ``head="reward"``.
      params: its frozen parameters (never trained here; may be sharded like the policy).
    """

    model: Any
    params: Any
    name: str = "reward_model"

    def __post_init__(self):
        if self.model.head != "reward":
            raise ValueError(f"RewardModel needs a 'reward' head model, got {self.model.head!r}")

    def __call__(self, rollout: Rollout) -> jax.Array:
        ids, attn, _ = sequences(rollout)
        return _reward_fn(self.model)(self.params, ids, attn)


@functools.lru_cache(maxsize=16)
def _prm_fn(model: Any, separator_id: int, aggregation: str, empty: float) -> Callable:
    def fn(params, ids, attn, response_mask):
        return prm.prm_rewards(
            model,
            params,
            ids,
            attn,
            response_mask,
            separator_id=separator_id,
            aggregation=aggregation,
            empty=empty,
        )

    return jax.jit(fn)


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessRewardModel:
    """A process reward model as a source: its step probabilities at the separator tokens of
    each response (never the prompt's), aggregated to ``min`` or ``product`` over the steps.

    Attributes:
      model: a ``prefjax.models.Model`` with ``head="reward"`` trained with ``loss="prm"``.
      params: its frozen parameters.
      separator_id: the step separator's token id (``prefjax.data.step_separator_id``).
      aggregation: ``"min"`` or ``"product"``.
      empty: the score of a response without a complete step.
    """

    model: Any
    params: Any
    separator_id: int
    aggregation: str = "min"
    empty: float = 0.0
    name: str = "prm"

    def __post_init__(self):
        if self.model.head != "reward":
            raise ValueError(
                f"ProcessRewardModel needs a 'reward' head model, got {self.model.head!r}"
            )
        if self.aggregation not in prm.AGGREGATIONS:
            raise ValueError(
                f"aggregation={self.aggregation!r}: expected one of {prm.AGGREGATIONS}"
            )

    def __call__(self, rollout: Rollout) -> jax.Array:
        ids, attn, response_mask = sequences(rollout)
        fn = _prm_fn(self.model, int(self.separator_id), self.aggregation, float(self.empty))
        return fn(self.params, ids, attn, response_mask)


@dataclasses.dataclass(frozen=True, eq=False)
class GoldReward:
    """A built-in task's gold reward (``task.gold_rewards_from_tokens``), on the host.

    Attributes:
      task: ``prefjax.data.RepeatTask`` or ``prefjax.data.Bandit``.
      tokenizer: the tokenizer the prompts were encoded with.
      invalid_reward: the score of a response the task cannot score (the bandit: not an arm).
    """

    task: Any
    tokenizer: Any
    invalid_reward: float = -1.0
    name: str = "gold"

    def __call__(self, rollout: Rollout) -> np.ndarray:
        host = jax.device_get(rollout)
        prompts = _unpad(host.prompt_ids, host.prompt_mask)
        responses = _unpad(host.tokens, host.response_mask)
        r = self.task.gold_rewards_from_tokens(self.tokenizer, prompts, responses)
        return np.where(np.isfinite(r), r, self.invalid_reward).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Verifier:
    """A user's verifier as a source.

    With ``tokenizer``: ``fn(prompts: list[str], responses: list[str]) -> sequence of floats``
    on the decoded text (special tokens such as EOS removed). Without: ``fn(rollout) -> [R]``, a
    JAX function of the rollout's arrays.
    """

    fn: Callable[..., Any]
    tokenizer: Any = None
    name: str = "verifier"

    def __call__(self, rollout: Rollout) -> Any:
        if self.tokenizer is None:
            return jnp.asarray(self.fn(rollout), jnp.float32)
        host = jax.device_get(rollout)
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        prompts = [decode(p) for p in _unpad(host.prompt_ids, host.prompt_mask)]
        responses = [decode(r) for r in _unpad(host.tokens, host.response_mask)]
        scores = np.asarray(self.fn(prompts, responses), np.float32)
        if scores.shape != (len(responses),):
            raise ValueError(
                f"verifier {getattr(self.fn, '__name__', self.fn)!r} returned shape "
                f"{scores.shape}, expected ({len(responses)},): one score per response"
            )
        return scores


@dataclasses.dataclass(frozen=True)
class RewardTransform:
    """Post-processing of raw scores, applied in this order.

    Attributes:
      length_penalty: subtracted from the score of a row that hit ``max_new_tokens`` (finish
        reason ``"length"``); 0 = off.
      clip: scores clipped to ``[-clip, clip]``; 0 = off.
      whiten: normalise to zero mean, unit variance over the batch's real rows.
    """

    length_penalty: float = 0.0
    clip: float = 0.0
    whiten: bool = False

    def __post_init__(self):
        if self.clip < 0:
            raise ValueError(f"clip={self.clip}: must be >= 0 (0 = off)")


class Scores(NamedTuple):
    """Result of :func:`score`: ``scores`` ``[R]`` after the transform, ``raw`` ``[R]`` before."""

    scores: jax.Array
    raw: jax.Array


def transform_scores(
    raw: jax.Array,
    finish_reason: jax.Array,
    transform: RewardTransform,
    weights: jax.Array | None = None,
) -> jax.Array:
    """``raw`` ``[R]`` -> penalised, clipped, whitened ``[R]`` (``weights``: 1 real row, 0 pad)."""
    s = jnp.asarray(raw, jnp.float32)
    if transform.length_penalty:
        s = s - transform.length_penalty * (finish_reason == FINISH_LENGTH)
    if transform.clip:
        s = jnp.clip(s, -transform.clip, transform.clip)
    if transform.whiten:
        w = jnp.ones_like(s) if weights is None else jnp.asarray(weights, jnp.float32)
        s = losses.masked_whiten(s, w)
    return s


def score(
    source: RewardSource,
    rollout: Rollout,
    transform: RewardTransform = RewardTransform(),
    weights: jax.Array | None = None,
) -> Scores:
    """The one call: ``source``'s raw scores of ``rollout`` and the transformed scores."""
    raw = jnp.asarray(source(rollout), jnp.float32)
    if raw.shape != rollout.finish_reason.shape:
        raise ValueError(
            f"reward source {source.name!r} returned shape {raw.shape}, expected "
            f"{rollout.finish_reason.shape}"
        )
    return Scores(transform_scores(raw, rollout.finish_reason, transform, weights), raw)


def on_last_token(scores: jax.Array, response_mask: jax.Array) -> jax.Array:
    """``[R]`` scores -> ``[R, N]``: each score at its row's last real response token, else 0.

    Example:
      >>> print(on_last_token(jnp.array([2.0, 3.0]), jnp.array([[1, 1, 0], [1, 1, 1]])))
      [[0. 2. 0.]
       [0. 0. 3.]]
    """
    mask = jnp.asarray(response_mask) > 0
    n = mask.shape[-1]
    last = n - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # [R]
    one_hot = jax.nn.one_hot(last, n, dtype=jnp.float32) * jnp.any(mask, -1, keepdims=True)
    return one_hot * jnp.asarray(scores, jnp.float32)[:, None]


class BestOfN(NamedTuple):
    """Result of :func:`best_of_n`: the best sample of each prompt.

    Attributes:
      rollout: a :class:`Rollout` of ``B`` rows, one per prompt.
      scores: ``[B]`` their scores.
      index: ``[B]`` their row in the full rollout.
    """

    rollout: Rollout
    scores: jax.Array
    index: jax.Array


def best_of_n(rollout: Rollout, scores: jax.Array, num_samples: int) -> BestOfN:
    """Keeps the highest-scored of each prompt's ``num_samples`` rows (the first on ties)."""
    scores = jnp.asarray(scores, jnp.float32)
    groups = scores.reshape(-1, num_samples)  # [R] -> [B, n]
    best = jnp.argmax(groups, axis=-1)  # [B]
    index = jnp.arange(groups.shape[0]) * num_samples + best
    picked = Rollout(*(jnp.take(x, index, axis=0) for x in rollout))
    return BestOfN(picked, jnp.take(scores, index), index)


def sample_best_of_n(
    sampler: Callable[..., Rollout],
    source: RewardSource,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    num_samples: int,
    *,
    lora: Any = None,
) -> BestOfN:
    """Best-of-N with any source: ``sampler`` (from ``make_sampler`` with ``num_samples``
    samples per prompt) draws, ``source`` scores (raw), :func:`best_of_n` picks."""
    rollout = sampler(params, prompt_ids, prompt_mask, key, lora=lora)
    return best_of_n(rollout, score(source, rollout).raw, num_samples)
