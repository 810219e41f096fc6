r"""Policy-gradient losses: PPO (clipped surrogate, clipped value loss), GRPO, REINFORCE.

Conventions shared by every function here:

* Arrays are per token, ``[batch, seq]``: ``logprobs`` are the current policy's log-probs of the
  sampled tokens (the only argument that carries gradient), ``old_logprobs`` those of the policy
  that sampled them, ``ref_logprobs`` the frozen reference's. ``advantages`` are ``[batch, seq]``
  (GAE) or ``[batch]`` (one advantage per sequence: GRPO, RLOO), broadcast over tokens.
* Losses are returned **per token and unreduced**, 0 where ``mask`` is 0, together with the
  per-token diagnostics practitioners watch (``clipfrac``, ``approx_kl``, ...). Reduce with one of
  the explicit reducers, :func:`sequence_mean` (mean over each sequence's tokens, then over the
  batch: the GRPO paper's Eq. 3), :func:`token_mean` (mean over all tokens of the batch: DAPO,
  TRL's PPO) or :func:`constant_mean` (sum divided by a constant: Dr. GRPO), and the diagnostics
  with :func:`prefjax.losses.masked_mean`.
* ``old_logprobs``, ``ref_logprobs``, ``advantages``, ``old_values`` and ``returns`` are constants
  of the update: ``jax.lax.stop_gradient`` is applied to them, so the same array may be passed as
  ``logprobs`` and ``old_logprobs`` (one update per batch, ratio 1 with the right gradient).
* float32 at least inside (bfloat16 inputs are upcast; float64 kept under x64, by the promotion
  rule shared by :mod:`prefjax.losses`; "float32" in a Returns section means that compute dtype;
  ``clipfrac`` is in the loss's dtype); masked positions are removed with ``jnp.where``
  before any ``exp`` so garbage there cannot produce NaN values or gradients; the log-ratio is
  clamped to ``[-20, 20]`` before ``exp`` (a ratio beyond :math:`e^{20}` is clipped anyway).

Example, one PPO update on a batch of two sequences:

  >>> lp = jnp.array([[-1.0, -2.0], [-0.5, 0.0]])
  >>> adv = jnp.array([[1.0, -1.0], [2.0, 0.0]])
  >>> mask = jnp.array([[1, 1], [1, 0]])
  >>> out = ppo_policy_loss(lp, lp, adv, mask)       # ratio 1: loss = -advantage
  >>> print(out.loss)
  [[-1.  1.]
   [-2.  0.]]
  >>> print(token_mean(out.loss, mask))               # (-1 + 1 - 2) / 3
  -0.6666667
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from prefjax.losses.kl import k3
from prefjax.losses.logprobs import _upcast, masked_mean, masked_sum

__all__ = [
    "PPOPolicyLossOutput",
    "ppo_policy_loss",
    "ValueLossOutput",
    "value_loss",
    "entropy_bonus",
    "GRPOLossOutput",
    "grpo_loss",
    "reinforce_loss",
    "sequence_mean",
    "token_mean",
    "constant_mean",
    "LOSS_REDUCTIONS",
]

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 4.9e8: far outside any clip range, still finite in float32


def _as_bool_mask(mask: ArrayLike) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _token_advantages(advantages: ArrayLike, like: jax.Array) -> jax.Array:
    """``[batch]`` or ``[batch, seq]`` advantages as a constant (upcast) ``[batch, seq]``."""
    advantages = jax.lax.stop_gradient(_upcast(advantages))
    if advantages.ndim == 1:
        chex.assert_equal_shape_prefix([advantages, like], 1)
        advantages = advantages[:, None]  # [batch] -> [batch, 1], broadcast over tokens
    else:
        chex.assert_equal_shape([advantages, like])
    return jnp.broadcast_to(advantages, like.shape)


def _policy_inputs(logprobs, old_logprobs, mask):
    """Upcast, stop gradients, check shapes; returns (logprobs, old_logprobs, bool mask)."""
    logprobs = _upcast(logprobs)
    old_logprobs = jax.lax.stop_gradient(_upcast(old_logprobs))
    mask = _as_bool_mask(mask)
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, old_logprobs, mask])
    return logprobs, old_logprobs, mask


def _clipped_surrogate(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None,
):
    """Per-token clipped surrogate loss, ratio, clip indicator and k3 approx KL (0 where masked)."""
    # First where of the double where: masked garbage never reaches exp (no NaN gradients).
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = jnp.maximum(unclipped, clipped)  # -min(r A, clip(r) A): pessimistic bound
    # The clip is active (zero gradient) where the clipped term is strictly the larger loss.
    clipped_active = clipped > unclipped
    if dual_clip is not None:
        # Dual clip (Ye et al., 2020, Eq. 5): for A < 0 bound the loss by -c A so a huge ratio on a
        # bad action cannot produce an unbounded update.
        dual = -advantages * dual_clip
        loss = jnp.where(advantages < 0, jnp.minimum(loss, dual), loss)
        clipped_active = clipped_active | ((advantages < 0) & (dual < unclipped))
    # k3 estimate of KL(pi_old || pi_theta) from samples of pi_old: (r - 1) - log r.
    approx_kl = jnp.expm1(log_ratio) - log_ratio
    zero = jnp.zeros_like(loss)
    return (
        jnp.where(mask, loss, zero),
        jnp.where(mask, ratio, zero),
        jnp.where(mask, clipped_active.astype(zero.dtype), zero),
        jnp.where(mask, approx_kl, zero),
    )


def _epsilons(clip_eps, epsilon_low, epsilon_high, dual_clip):
    epsilon_low = clip_eps if epsilon_low is None else epsilon_low
    epsilon_high = clip_eps if epsilon_high is None else epsilon_high
    _check_positive("epsilon_low (clip_eps)", epsilon_low)
    _check_positive("epsilon_high (clip_eps)", epsilon_high)
    if isinstance(epsilon_low, numbers.Real) and epsilon_low >= 1.0:
        raise ValueError(f"epsilon_low (clip_eps) must be < 1, got {epsilon_low!r}")
    if isinstance(dual_clip, numbers.Real) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. use 3), got {dual_clip!r}")
    return epsilon_low, epsilon_high


class PPOPolicyLossOutput(NamedTuple):
    """Per-token result of :func:`ppo_policy_loss`; every field ``[batch, seq]`` float32, 0 where
    masked. Reduce ``loss`` with :func:`token_mean` or :func:`sequence_mean` and the diagnostics
    with :func:`prefjax.losses.masked_mean`.

    Attributes:
      loss: the clipped surrogate loss :math:`-\\min(\\rho_t A_t, \\mathrm{clip}(\\rho_t) A_t)`.
      clipfrac: 1.0 where the clip is active (the token gets no gradient), else 0.0; its masked
        mean is the clip fraction.
      approx_kl: per-token k3 estimate of :math:`\\mathrm{KL}(\\pi_{old} \\| \\pi_\\theta)`,
        :math:`(\\rho_t - 1) - \\log\\rho_t`; its masked mean is the usual "approx KL".
      ratio: the importance ratio :math:`\\rho_t = \\pi_\\theta(y_t) / \\pi_{old}(y_t)`.
    """

    loss: jax.Array
    clipfrac: jax.Array
    approx_kl: jax.Array
    ratio: jax.Array


def ppo_policy_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
) -> PPOPolicyLossOutput:
    r"""PPO clipped surrogate policy loss, per token (Schulman et al., 2017, Eq. 7).

    .. math::
        \rho_t = \exp(\log\pi_\theta(y_t) - \log\pi_{old}(y_t)), \qquad
        \ell_t = -\min\big(\rho_t A_t,\;
                 \mathrm{clip}(\rho_t, 1 - \epsilon_{low}, 1 + \epsilon_{high})\,A_t\big)

    The minimum makes the objective a pessimistic bound: the ratio earns nothing for moving past
    :math:`1 \pm \epsilon` in the direction the advantage favours. ``epsilon_low`` /
    ``epsilon_high`` (default ``clip_eps``) allow the asymmetric "clip-higher" range of DAPO (Yu
    et al., 2025, Eq. 10; e.g. 0.2 / 0.28). ``dual_clip`` :math:`c > 1` additionally bounds the
    loss of negative-advantage tokens by :math:`-c A_t` (Ye et al., 2020, Eq. 5), so a huge ratio on
    a bad action cannot dominate the update. At :math:`\rho = 1` the loss is :math:`-A_t` and its
    gradient :math:`-A_t \nabla\log\pi_\theta`, the policy gradient.

    Args:
      logprobs: ``[batch, seq]`` current policy log-probs of the sampled tokens (differentiated).
      old_logprobs: ``[batch, seq]`` log-probs under the sampling policy (constant).
      advantages: ``[batch, seq]`` or ``[batch]`` advantages (constant), e.g. whitened GAE.
      mask: ``[batch, seq]``, 1 on response tokens.
      clip_eps: :math:`\epsilon`, the symmetric clip range (0.2 in the paper).
      dual_clip: optional :math:`c > 1` for dual-clip PPO (3.0 in Ye et al.).
      epsilon_low: optional lower clip range, overriding ``clip_eps``.
      epsilon_high: optional upper clip range, overriding ``clip_eps``.

    Returns:
      :class:`PPOPolicyLossOutput` ``(loss, clipfrac, approx_kl, ratio)``, each ``[batch, seq]``.

    Example:
      >>> old = jnp.log(jnp.array([[0.5, 0.5, 0.5]]))
      >>> new = jnp.log(jnp.array([[0.75, 0.75, 0.25]]))   # ratios 1.5, 1.5, 0.5
      >>> adv = jnp.array([[1.0, -1.0, 1.0]])
      >>> out = ppo_policy_loss(new, old, adv, jnp.ones((1, 3)))
      >>> print(out.loss)        # -min(1.5, 1.2), -min(-1.5, -1.2), -min(0.5, 0.8)
      [[-1.2  1.5 -0.5]]
      >>> print(out.clipfrac)    # only the first token's clip is active
      [[1. 0. 0.]]

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms", 2017, Eq. (7). Ye et al.,
      "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", AAAI 2020,
      Eq. (5). Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025,
      Eq. (10).
    """
    logprobs, old_logprobs, mask = _policy_inputs(logprobs, old_logprobs, mask)
    advantages = _token_advantages(advantages, logprobs)
    epsilon_low, epsilon_high = _epsilons(clip_eps, epsilon_low, epsilon_high, dual_clip)
    loss, ratio, clipfrac, approx_kl = _clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        dual_clip=dual_clip,
    )
    return PPOPolicyLossOutput(loss, clipfrac, approx_kl, ratio)


class ValueLossOutput(NamedTuple):
    """Per-token result of :func:`value_loss`; each ``[batch, seq]`` float32, 0 where masked.

    Attributes:
      loss: :math:`\\tfrac12 \\max\\big((V - R)^2, (V^{clip} - R)^2\\big)`.
      clipfrac: 1.0 where the clipped error is the larger one (the token gets no gradient).
    """

    loss: jax.Array
    clipfrac: jax.Array


def value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps: float | None = 0.2,
) -> ValueLossOutput:
    r"""Clipped value-function loss, per token, as in PPO's LLM implementations.

    .. math::
        V^{clip}_t = V^{old}_t + \mathrm{clip}(V_t - V^{old}_t, -\epsilon, \epsilon), \qquad
        \ell_t = \tfrac12 \max\big((V_t - R_t)^2,\; (V^{clip}_t - R_t)^2\big)

    The PPO paper's :math:`L^{VF} = (V_\theta(s_t) - V^{targ}_t)^2` (Eq. 9) with the value clipping
    of OpenAI baselines' ``ppo2`` used by InstructGPT-style RLHF (TRL, OpenRLHF, verl): the new
    value earns nothing for moving more than :math:`\epsilon` from the old one. The factor 1/2
    follows those implementations (scale the loss with ``vf_coef``). ``clip_eps=None`` gives the
    unclipped :math:`\tfrac12 (V_t - R_t)^2`.

    Args:
      values: ``[batch, seq]`` current value predictions (differentiated).
      old_values: ``[batch, seq]`` values at rollout time (constant).
      returns: ``[batch, seq]`` value targets (constant), e.g. ``gae(...).returns``.
      mask: ``[batch, seq]``, 1 on response tokens.
      clip_eps: :math:`\epsilon` in the units of the value (0.2 is common), or ``None``.

    Returns:
      :class:`ValueLossOutput` ``(loss, clipfrac)``, each ``[batch, seq]`` float32.

    Example:
      >>> v, old, ret = jnp.array([[1.0, 0.5]]), jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 0.5]])
      >>> # 0.5 * max(1^2, (0.2 - 2)^2) and 0.5 * max(0^2, (0.2 - 0.5)^2): both clipped
      >>> print(np.round(value_loss(v, old, ret, jnp.ones((1, 2))).loss, 4))
      [[1.62  0.045]]

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms", 2017, Eq. (9); value clipping as
      in OpenAI baselines ``ppo2`` and Ouyang et al. (InstructGPT), 2022; discussed in Engstrom et
      al., "Implementation Matters in Deep Policy Gradients", ICLR 2020.
    """
    values = _upcast(values)
    old_values = jax.lax.stop_gradient(_upcast(old_values))
    returns = jax.lax.stop_gradient(_upcast(returns))
    mask = _as_bool_mask(mask)
    chex.assert_rank(values, 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    _check_positive("clip_eps", clip_eps, allow_none=True)
    zero = jnp.zeros_like(values)
    # Masked garbage (inf, NaN) is replaced before it enters a square (no NaN gradients).
    values = jnp.where(mask, values, zero)
    old_values = jnp.where(mask, old_values, zero)
    returns = jnp.where(mask, returns, zero)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        loss, clipped_active = unclipped, jnp.zeros_like(mask)
    else:
        values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = jnp.square(values_clipped - returns)
        loss = jnp.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    return ValueLossOutput(
        jnp.where(mask, 0.5 * loss, zero),
        jnp.where(mask, clipped_active.astype(zero.dtype), zero),
    )


def entropy_bonus(token_entropy: ArrayLike, mask: ArrayLike, *, entropy_coef: float) -> jax.Array:
    r"""Per-token entropy bonus as a loss term: :math:`-c_2\,H_t` (PPO paper, Eq. 9).

    Adding it to the loss rewards entropy (exploration). ``token_entropy`` is the per-token
    entropy of the policy's next-token distribution, :func:`prefjax.losses.entropy` of the logits.

    Args:
      token_entropy: ``[batch, seq]`` per-token entropies (differentiated).
      mask: ``[batch, seq]``, 1 on response tokens.
      entropy_coef: :math:`c_2 \ge 0` (0.01 in the PPO paper's Atari runs; often 0 for LLMs).

    Returns:
      ``[batch, seq]`` float32, 0 where masked.

    Example:
      >>> print(entropy_bonus(jnp.array([[2.0, 1.0]]), jnp.array([[1, 0]]), entropy_coef=0.01))
      [[-0.02  0.  ]]

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms", 2017, Eq. (9).
    """
    token_entropy = _upcast(token_entropy)
    mask = _as_bool_mask(mask)
    chex.assert_equal_shape([token_entropy, mask])
    token_entropy = jnp.where(mask, token_entropy, 0.0)
    return -entropy_coef * token_entropy


class GRPOLossOutput(NamedTuple):
    """Per-token result of :func:`grpo_loss`; every field ``[batch, seq]`` float32, 0 where masked.

    Attributes:
      loss: ``policy_loss + beta * kl``, to reduce with :func:`sequence_mean` (GRPO paper) or
        :func:`token_mean` (DAPO).
      policy_loss: the clipped surrogate part.
      kl: the k3 estimate of :math:`\\mathrm{KL}(\\pi_\\theta \\| \\pi_{ref})` per token.
      clipfrac: 1.0 where the clip is active.
      ratio: :math:`\\pi_\\theta(y_t) / \\pi_{old}(y_t)`.
    """

    loss: jax.Array
    policy_loss: jax.Array
    kl: jax.Array
    clipfrac: jax.Array
    ratio: jax.Array


def grpo_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
) -> GRPOLossOutput:
    r"""Group Relative Policy Optimization loss, per token (Shao et al., 2024, Eqs. 3-4).

    .. math::
        \ell_{i,t} = -\min\big(\rho_{i,t} \hat A_{i,t},\;
            \mathrm{clip}(\rho_{i,t}, 1 - \epsilon, 1 + \epsilon)\,\hat A_{i,t}\big)
            + \beta\,\Big(\frac{\pi_{ref}(o_{i,t})}{\pi_\theta(o_{i,t})}
            - \log\frac{\pi_{ref}(o_{i,t})}{\pi_\theta(o_{i,t})} - 1\Big)

    The PPO surrogate with group-relative advantages (:func:`group_advantages`, no critic) and
    the k3 KL to the reference added to the loss rather than the reward. The paper's objective
    (Eq. 3) averages over each sequence's tokens and then over the group:
    ``sequence_mean(out.loss, mask)``; DAPO (Yu et al., 2025, Eq. 8) averages over all tokens of
    the batch: ``token_mean(out.loss, mask)``. ``beta=0`` drops the KL term (DAPO, Dr. GRPO);
    ``epsilon_low``/``epsilon_high`` give DAPO's clip-higher.

    Args:
      logprobs: ``[batch, seq]`` current policy log-probs of the sampled tokens (differentiated).
      old_logprobs: ``[batch, seq]`` log-probs under the sampling policy (constant; pass
        ``logprobs`` itself for one update per batch).
      ref_logprobs: ``[batch, seq]`` reference log-probs (constant).
      advantages: ``[batch]`` sequence advantages (or ``[batch, seq]``), constant.
      mask: ``[batch, seq]``, 1 on response tokens.
      clip_eps: :math:`\epsilon` (0.2).
      beta: KL coefficient :math:`\beta` (0.04 in DeepSeekMath).
      epsilon_low: optional lower clip range, overriding ``clip_eps``.
      epsilon_high: optional upper clip range, overriding ``clip_eps``.

    Returns:
      :class:`GRPOLossOutput` ``(loss, policy_loss, kl, clipfrac, ratio)``, each ``[batch, seq]``.

    Example:
      >>> lp = jnp.array([[-1.0, -1.0], [-2.0, -2.0]])
      >>> adv = jnp.array([0.5, -0.5])              # e.g. group_advantages(..., group_size=2)
      >>> out = grpo_loss(lp, lp, lp, adv, jnp.array([[1, 1], [1, 0]]), beta=0.04)
      >>> print(out.loss)                          # ratio 1, policy = reference: -A per token
      [[-0.5 -0.5]
       [ 0.5  0. ]]
      >>> print(sequence_mean(out.loss, jnp.array([[1, 1], [1, 0]])))   # (-0.5 + 0.5) / 2
      0.0

    References:
      Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
      Models", 2024, Eqs. (3)-(4). Yu et al., "DAPO", 2025, Eqs. (8), (10).
    """
    logprobs, old_logprobs, mask = _policy_inputs(logprobs, old_logprobs, mask)
    ref_logprobs = jax.lax.stop_gradient(_upcast(ref_logprobs))
    chex.assert_equal_shape([logprobs, ref_logprobs])
    advantages = _token_advantages(advantages, logprobs)
    epsilon_low, epsilon_high = _epsilons(clip_eps, epsilon_low, epsilon_high, None)
    policy_loss, ratio, clipfrac, _ = _clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        dual_clip=None,
    )
    kl = k3(logprobs, ref_logprobs, mask)
    return GRPOLossOutput(policy_loss + beta * kl, policy_loss, kl, clipfrac, ratio)


def reinforce_loss(logprobs: ArrayLike, advantages: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""REINFORCE (score-function) loss, per token (Williams, 1992).

    .. math:: \ell_t = -A_t \log\pi_\theta(y_t), \qquad
        \nabla_\theta \textstyle\sum_t \ell_t = -A \,\nabla_\theta \log\pi_\theta(y)

    Summed over a sequence with a per-sequence advantage this is the REINFORCE estimator of the
    policy gradient; with :func:`rloo_advantages` it is RLOO (Ahmadian et al., 2024, Eq. 6), with
    :func:`discounted_returns` minus a baseline the classic per-step form. The value of the loss is
    meaningless; only its gradient is. Reduce with ``masked_sum(..., axis=-1).mean()``
    (sequence-level, as in RLOO) or :func:`token_mean`.

    Args:
      logprobs: ``[batch, seq]`` policy log-probs of the sampled tokens (differentiated).
      advantages: ``[batch]`` or ``[batch, seq]`` advantages or returns (constant).
      mask: ``[batch, seq]``, 1 on response tokens.

    Returns:
      ``[batch, seq]`` float32 per-token loss, 0 where masked.

    Example:
      >>> lp = jnp.array([[-1.0, -2.0], [-0.5, -9.0]])
      >>> print(reinforce_loss(lp, jnp.array([2.0, -1.0]), jnp.array([[1, 1], [1, 0]])))
      [[ 2.   4. ]
       [-0.5  0. ]]

    References:
      Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
      Learning", Machine Learning 8, 1992. Ahmadian et al., "Back to Basics", ACL 2024, Eq. (6).
    """
    logprobs = _upcast(logprobs)
    mask = _as_bool_mask(mask)
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, mask])
    advantages = _token_advantages(advantages, logprobs)
    logprobs = jnp.where(mask, logprobs, 0.0)  # masked -inf/NaN never reach the product
    return jnp.where(mask, -advantages * logprobs, 0.0)


def sequence_mean(loss: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Mean over each sequence's tokens, then over the batch: the GRPO paper's reduction.

    .. math:: L = \frac{1}{B} \sum_{i=1}^{B} \frac{1}{|o_i|} \sum_{t=1}^{|o_i|} \ell_{i,t}

    (Shao et al., 2024, Eq. 3). Every sequence weighs the same whatever its length, so a token of
    a short response weighs more than one of a long response (the length bias Dr. GRPO points
    out). A fully masked row contributes 0 but still counts in :math:`B`.

    Args:
      loss: ``[batch, seq]`` per-token loss.
      mask: ``[batch, seq]``, 1 on tokens that count.

    Returns:
      A float32 scalar.

    Example:
      >>> loss = jnp.array([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
      >>> print(sequence_mean(loss, jnp.array([[1, 1, 0], [1, 0, 0]])))   # (2 + 4) / 2
      3.0
    """
    chex.assert_rank(jnp.asarray(loss), 2)
    return jnp.mean(masked_mean(loss, mask, axis=-1))


def token_mean(loss: ArrayLike, mask: ArrayLike) -> jax.Array:
    r"""Mean over all real tokens of the batch (DAPO's token-level reduction, TRL's PPO).

    .. math:: L = \frac{\sum_{i,t} m_{i,t}\,\ell_{i,t}}{\sum_{i,t} m_{i,t}}

    (Yu et al., 2025, Eq. 8). Every token weighs the same; 0 if no token is real. Under gradient
    accumulation, sum ``masked_sum(loss, mask)`` and the token counts across micro-batches instead
    of averaging per-micro-batch means.

    Args:
      loss: ``[batch, seq]`` per-token loss.
      mask: ``[batch, seq]``, 1 on tokens that count.

    Returns:
      A float32 scalar.

    Example:
      >>> loss = jnp.array([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
      >>> print(token_mean(loss, jnp.array([[1, 1, 0], [1, 0, 0]])))      # 8 / 3
      2.6666667
    """
    chex.assert_rank(jnp.asarray(loss), 2)
    return masked_mean(loss, mask)


def constant_mean(
    loss: ArrayLike, mask: ArrayLike, *, normalizer: float | None = None
) -> jax.Array:
    r"""Masked sum divided by a constant (Dr. GRPO's length-unbiased reduction).

    .. math:: L = \frac{1}{B\,T_{max}} \sum_{i,t} m_{i,t}\,\ell_{i,t}

    (Liu et al., 2025, "Understanding R1-Zero-Like Training", Sec. 3.1): dividing by a constant
    rather than each response's length removes the bias toward long wrong answers. The default
    normalizer is ``batch * seq`` (the padded shape); pass the generation budget explicitly to
    keep it fixed across batches.

    Args:
      loss: ``[batch, seq]`` per-token loss.
      mask: ``[batch, seq]``, 1 on tokens that count.
      normalizer: the constant divisor; default ``batch * seq``.

    Returns:
      A float32 scalar.

    Example:
      >>> loss = jnp.array([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
      >>> print(constant_mean(loss, jnp.array([[1, 1, 0], [1, 0, 0]])))   # 8 / 6
      1.3333334
    """
    loss = jnp.asarray(loss)
    chex.assert_rank(loss, 2)
    if normalizer is None:
        normalizer = loss.shape[0] * loss.shape[1]
    _check_positive("normalizer", normalizer)
    return masked_sum(loss, mask) / normalizer


LOSS_REDUCTIONS: dict[str, Callable[[ArrayLike, ArrayLike], jax.Array]] = {
    "sequence_mean": sequence_mean,
    "token_mean": token_mean,
    "constant_mean": constant_mean,
}
"""Per-token loss reducers by name, for configs (e.g. ``config.algorithm.loss_reduction``)."""
