r"""KL estimators, per-token KL-shaped rewards and the adaptive KL controller.

RLHF keeps the policy :math:`\pi_\theta` near a reference :math:`\pi_{ref}` by charging
:math:`\mathrm{KL}(\pi_\theta \,\|\, \pi_{ref}) = \mathbb{E}_{y \sim \pi_\theta}
[\log \pi_\theta(y) - \log \pi_{ref}(y)]`. Only the log-probabilities of the *sampled* tokens are
at hand, so the KL is estimated per token from the log-ratio
:math:`\log\rho = \log \pi_\theta(y_t) - \log \pi_{ref}(y_t)` with tokens sampled from
:math:`\pi_\theta` (Schulman, "Approximating KL Divergence", 2020):

================  ======================================================  ========================
estimator         per-token value                                          properties
================  ======================================================  ========================
``k1``            :math:`\log\rho`                                          unbiased, high variance,
                                                                            can be negative
``k2``            :math:`\tfrac12 (\log\rho)^2`                              biased, low variance,
                                                                            :math:`\ge 0`
``k3``            :math:`e^{-\log\rho} - 1 + \log\rho`                       unbiased, low variance,
                                                                            :math:`\ge 0`
================  ======================================================  ========================

Conventions: log-prob arrays are ``[batch, seq]`` (any equal shapes work), computed in float32 at
least (promoted, never demoted, by the rule shared by :mod:`prefjax.losses`: bfloat16 -> float32,
float64 kept under x64; "float32" in a Returns section means that compute dtype); results are per
token, unreduced; ``mask`` (optional) zeroes positions that are not response
tokens, with ``jnp.where`` so garbage there cannot turn into NaN values or gradients.

Example:

  >>> logps = jnp.log(jnp.array([[0.5, 0.25]]))
  >>> ref = jnp.log(jnp.array([[0.25, 0.25]]))
  >>> print(kl_estimate(logps, ref, kind="k3"))      # 0.5 - 1 + log 2, then 0
  [[0.19314718 0.        ]]
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from prefjax.losses.logprobs import _upcast

__all__ = [
    "k1",
    "k2",
    "k3",
    "KL_ESTIMATORS",
    "kl_estimate",
    "ShapedRewards",
    "kl_shaped_rewards",
    "AdaptiveKLState",
    "adaptive_kl_init",
    "adaptive_kl_update",
]


_MAX_LOG_RATIO = 20.0  # k3's exp(-log_ratio) stays finite in float32, with margin


def _log_ratio(
    logprobs: ArrayLike, ref_logprobs: ArrayLike, mask: ArrayLike | None
) -> tuple[jax.Array, jax.Array | None]:
    """Upcast, check shapes, and return ``log pi - log pi_ref`` (0 where masked) and the mask."""
    logprobs = _upcast(logprobs)
    ref_logprobs = _upcast(ref_logprobs)
    chex.assert_equal_shape([logprobs, ref_logprobs])
    log_ratio = logprobs - ref_logprobs
    if mask is None:
        return log_ratio, None
    mask = jnp.asarray(mask)
    chex.assert_equal_shape([logprobs, mask])
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    # First where of the "double where": masked garbage (inf, NaN) never reaches exp or square.
    return jnp.where(mask, log_ratio, 0.0), mask


def _finish(kl: jax.Array, mask: jax.Array | None) -> jax.Array:
    return kl if mask is None else jnp.where(mask, kl, 0.0)


def k1(logprobs: ArrayLike, ref_logprobs: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    r"""The k1 KL estimator: :math:`\log \pi_\theta(y) - \log \pi_{ref}(y)`, :math:`y \sim \pi`.

    Unbiased for :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})`; high variance; negative on tokens
    the reference prefers. This is the per-token penalty of InstructGPT / Ziegler et al. (2019).

    Args:
      logprobs: ``[batch, seq]`` policy log-probs of the sampled tokens.
      ref_logprobs: ``[batch, seq]`` reference log-probs of the same tokens.
      mask: optional ``[batch, seq]``; masked positions give 0.

    Returns:
      ``[batch, seq]`` float32 per-token estimates.

    Example:
      >>> print(k1(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0])))
      [ 1. -1.]

    References:
      J. Schulman, "Approximating KL Divergence", 2020 (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio, mask = _log_ratio(logprobs, ref_logprobs, mask)
    return _finish(log_ratio, mask)


def k2(logprobs: ArrayLike, ref_logprobs: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    r"""The k2 KL estimator: :math:`\tfrac12 (\log \pi_\theta(y) - \log \pi_{ref}(y))^2`.

    Non-negative and low-variance but biased (its expectation is an f-divergence that matches the
    KL to second order when the distributions are close). Its gradient with respect to
    :math:`\theta` equals the gradient of the true KL in expectation (the "k2 loss" of GRPO
    analyses).

    Args:
      logprobs: ``[batch, seq]`` policy log-probs of the sampled tokens.
      ref_logprobs: ``[batch, seq]`` reference log-probs of the same tokens.
      mask: optional ``[batch, seq]``; masked positions give 0.

    Returns:
      ``[batch, seq]`` float32 per-token estimates.

    Example:
      >>> print(k2(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0])))
      [0.5 0.5]

    References:
      J. Schulman, "Approximating KL Divergence", 2020.
    """
    log_ratio, mask = _log_ratio(logprobs, ref_logprobs, mask)
    return _finish(0.5 * jnp.square(log_ratio), mask)


def k3(logprobs: ArrayLike, ref_logprobs: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    r"""The k3 KL estimator: :math:`\rho^{-1} - 1 + \log\rho`, :math:`\rho = \pi_\theta/\pi_{ref}`.

    Unbiased (the control variate :math:`\rho^{-1} - 1` has mean 0 under :math:`\pi_\theta`),
    non-negative (:math:`x - 1 \ge \log x`) and low-variance: the KL term of GRPO (Shao et al.,
    2024, Eq. 4). It grows like :math:`\pi_{ref}/\pi_\theta` on tokens the reference finds far
    likelier than the policy; so that such a token (say a log-prob of -1e4 under the policy) gives a
    large finite penalty instead of ``inf``, the log-ratio is clamped to ``[-20, 20]`` before the
    ``exp`` (as verl's ``low_var_kl``), which changes nothing for ratios within :math:`e^{\pm 20}`.

    Args:
      logprobs: ``[batch, seq]`` policy log-probs of the sampled tokens.
      ref_logprobs: ``[batch, seq]`` reference log-probs of the same tokens.
      mask: optional ``[batch, seq]``; masked positions give 0.

    Returns:
      ``[batch, seq]`` float32 per-token estimates, :math:`\ge 0`.

    Example:
      >>> print(k3(jnp.array([-1.0, -2.0]), jnp.array([-1.0, -1.0])))   # e - 1 - 1
      [0.        0.7182817]

    References:
      J. Schulman, "Approximating KL Divergence", 2020. Shao et al., "DeepSeekMath", 2024, Eq. (4).
    """
    log_ratio, mask = _log_ratio(logprobs, ref_logprobs, mask)
    # Clamp so exp cannot overflow: e^20 ~ 4.9e8 is finite in float32 (and its gradient too).
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # exp(-log_ratio) - 1 is expm1: accurate when the policies are close (the usual case).
    return _finish(jnp.expm1(-log_ratio) + log_ratio, mask)


KL_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {"k1": k1, "k2": k2, "k3": k3}
"""The per-token KL estimators by name, for configs (``kind=`` of :func:`kl_estimate`)."""


def kl_estimate(
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    *,
    kind: str = "k3",
    mask: ArrayLike | None = None,
) -> jax.Array:
    r"""Per-token estimate of :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})` by name: k1, k2 or k3.

    Looks ``kind`` up in :data:`KL_ESTIMATORS` and calls :func:`k1`, :func:`k2` or :func:`k3`
    (see the module docstring for the formulas and properties). The sequence KL is the masked
    sum over tokens; the batch KL its mean.

    Args:
      logprobs: ``[batch, seq]`` policy log-probs of the sampled tokens.
      ref_logprobs: ``[batch, seq]`` reference log-probs.
      kind: ``"k1"``, ``"k2"`` or ``"k3"``.
      mask: optional ``[batch, seq]``; masked positions give 0.

    Returns:
      ``[batch, seq]`` float32 per-token estimates.

    Example:
      >>> lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])
      >>> [float(kl_estimate(lp, ref, kind=k)[0, 0]) for k in ("k1", "k2")]
      [1.0, 0.5]

    References:
      J. Schulman, "Approximating KL Divergence", 2020.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {sorted(KL_ESTIMATORS)}, got {kind!r}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs, mask)


class ShapedRewards(NamedTuple):
    """Result of :func:`kl_shaped_rewards`.

    Attributes:
      rewards: ``[batch, seq]`` float32 per-token rewards, 0 where masked.
      kl: ``[batch, seq]`` float32 per-token KL estimates (0 where masked), for logging: the
        sequence KL is ``kl.sum(-1)``.
    """

    rewards: jax.Array
    kl: jax.Array


def _last_real_one_hot(mask: jax.Array, dtype) -> jax.Array:
    """``[batch, seq]`` one-hot (in ``dtype``) of the last real token of each row (0 if none)."""
    seq = mask.shape[-1]
    last = seq - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # [batch]; meaningless for empty rows
    one_hot = jax.nn.one_hot(last, seq, dtype=dtype)
    return one_hot * jnp.any(mask, axis=-1, keepdims=True)


def kl_shaped_rewards(
    scores: ArrayLike,
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    mask: ArrayLike,
    *,
    kl_coef: float,
    kind: str = "k1",
) -> ShapedRewards:
    r"""Per-token RLHF rewards: a KL penalty on every token, the sequence score on the last.

    .. math:: r_t = -\beta\,\widehat{\mathrm{KL}}_t + [t = T_{last}]\; s

    with :math:`\beta` = ``kl_coef``, :math:`\widehat{\mathrm{KL}}_t` the ``kind`` estimator
    (k1 by default: :math:`\log\pi_\theta(y_t) - \log\pi_{ref}(y_t)`, as in Ziegler et al. and
    InstructGPT) and :math:`s` the reward model's score, placed on the last real token of each
    row. Summed over a response, the rewards equal :math:`s - \beta\,\widehat{\mathrm{KL}}`, the
    KL-regularised objective of Ziegler et al. (2019), Eq. (2). A fully masked row gets all zeros.
    Pass the result to :func:`gae`.

    Args:
      scores: ``[batch]`` sequence-level scores (reward model outputs).
      logprobs: ``[batch, seq]`` log-probs of the sampled response tokens under the policy that
        sampled them.
      ref_logprobs: ``[batch, seq]`` log-probs of the same tokens under the reference.
      mask: ``[batch, seq]``, 1 on response tokens.
      kl_coef: :math:`\beta \ge 0` (fixed, or the value of :class:`AdaptiveKLState`).
      kind: KL estimator name, a key of :data:`KL_ESTIMATORS`.

    Returns:
      :class:`ShapedRewards` ``(rewards, kl)``, each ``[batch, seq]`` float32.

    Example:
      >>> lp = jnp.array([[-1.0, -1.0, -1.0]])
      >>> ref = jnp.array([[-2.0, -1.0, 0.0]])
      >>> out = kl_shaped_rewards(jnp.array([5.0]), lp, ref, jnp.array([[1, 1, 0]]), kl_coef=0.1)
      >>> print(out.rewards)                          # -0.1 * 1, then -0.1 * 0 + 5, padding 0
      [[-0.1  5.   0. ]]

    References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019, Eq. (2).
      Ouyang et al., "Training language models to follow instructions with human feedback", 2022,
      Eq. (2).
    """
    scores = _upcast(scores)
    mask = jnp.asarray(mask)
    mask = mask if mask.dtype == jnp.bool_ else mask != 0
    chex.assert_rank([scores, mask], [1, 2])
    chex.assert_equal_shape_prefix([scores, mask], 1)
    kl = kl_estimate(logprobs, ref_logprobs, kind=kind, mask=mask)
    rewards = -kl_coef * kl + _last_real_one_hot(mask, scores.dtype) * scores[:, None]
    return ShapedRewards(rewards, kl)


class AdaptiveKLState(NamedTuple):
    """State of the adaptive KL controller: the current coefficient :math:`\\beta_t`, a scalar."""

    kl_coef: jax.Array


def adaptive_kl_init(init_kl_coef: float) -> AdaptiveKLState:
    """Initial :class:`AdaptiveKLState` with :math:`\\beta_0` = ``init_kl_coef`` (float32 scalar).

    A Python number gives float32; a float64 array (under x64) stays float64.

    Example:
      >>> print(adaptive_kl_init(0.2).kl_coef)
      0.2
    """
    if isinstance(init_kl_coef, numbers.Real) and init_kl_coef < 0:
        raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
    return AdaptiveKLState(_upcast(init_kl_coef))


def adaptive_kl_update(
    state: AdaptiveKLState,
    current_kl: ArrayLike,
    *,
    target: float,
    horizon: float = 10000.0,
    n_steps: int | ArrayLike = 1,
    max_error: float = 0.2,
) -> AdaptiveKLState:
    r"""One step of the adaptive KL controller of Ziegler et al. (2019), Sec. 2.2.

    .. math::
        e_t = \mathrm{clip}\Big(\frac{\mathrm{KL}_t - \mathrm{KL}_{target}}{\mathrm{KL}_{target}},
              -0.2, 0.2\Big), \qquad
        \beta_{t+1} = \beta_t\,\big(1 + K_\beta\, e_t\big), \quad K_\beta = n_{steps} / H

    A proportional controller in log-space: when the measured KL exceeds the target the
    coefficient grows, at most by 20 % of :math:`K_\beta` per update. ``n_steps`` is the number of
    samples (episodes) the KL was measured over and ``horizon`` :math:`H` the controller's time
    constant, as in ``lm-human-preferences`` and TRL's ``AdaptiveKLController``; the paper's
    :math:`K_\beta = 0.1` is ``n_steps / horizon = 0.1``. Pure: returns a new state, jit-safe.

    Args:
      state: the current :class:`AdaptiveKLState`.
      current_kl: scalar, the measured KL (e.g. the batch mean of the summed per-token KL).
      target: the target KL (:math:`\mathrm{KL}_{target} > 0`; Ziegler et al. use 6 nats per
        sequence for their stylistic tasks).
      horizon: :math:`H`, in samples.
      n_steps: samples since the last update (usually the batch size).
      max_error: the clip on the proportional error (0.2 in the paper).

    Returns:
      The updated :class:`AdaptiveKLState`.

    Example:
      >>> s = adaptive_kl_init(0.1)
      >>> s = adaptive_kl_update(s, 12.0, target=6.0, horizon=10.0, n_steps=1)   # error clipped
      >>> print(f"{float(s.kl_coef):.4f}")          # 0.1 * (1 + 0.2 * 1 / 10)
      0.1020

    References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019, Sec. 2.2.
    """
    if isinstance(target, numbers.Real) and target <= 0:
        raise ValueError(f"target must be > 0, got {target!r}")
    if isinstance(horizon, numbers.Real) and horizon <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon!r}")
    current_kl = _upcast(current_kl)
    chex.assert_rank(current_kl, 0)
    error = jnp.clip(current_kl / target - 1.0, -max_error, max_error)
    multiplier = 1.0 + error * _upcast(n_steps) / horizon
    return AdaptiveKLState(state.kl_coef * multiplier)
