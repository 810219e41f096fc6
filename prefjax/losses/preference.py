r"""Preference objectives: reward models, the DPO family, listwise, unpaired, reference-free.

Shared conventions:

* Inputs are per-example sequence log-probabilities ``[batch]`` (see
  :func:`prefjax.losses.sequence_logprobs`): **summed** over response tokens for DPO and its
  pairwise variants, **length-averaged** (``average=True``) for IPO as TRL runs it, ORPO and
  SimPO. Names spell out role and side: ``policy_chosen_logps``, ``ref_rejected_logps``.
* Hyperparameters are keyword-only with the papers' (or TRL's) defaults.
* Everything is computed in float32 at least (bfloat16 inputs are upcast; float64 kept under
  x64, through the promotion rule shared by :mod:`prefjax.losses`; "float32" in a Returns section
  means that compute dtype), with ``jax.nn.log_sigmoid`` / ``logsumexp`` so extreme log-probs
  (``-1e4``) stay finite.
* Nothing is reduced: pairwise losses return :class:`PreferenceLossOutput` with the per-example
  ``loss`` ``[batch]`` and the implicit rewards :math:`\beta(\log\pi - \log\pi^{ref})` (under
  ``stop_gradient``: they are diagnostics, as in TRL). The caller takes ``.loss.mean()``.
* Every pairwise variant has the same signature as :func:`dpo_loss`, so
  ``PAIRWISE_LOSSES[name](pc, pr, rc, rr, beta=..., label_smoothing=...)`` works for any name;
  a variant without a label-smoothing form raises if given a non-zero ``label_smoothing``.

Notation: :math:`h = (\log\pi_w - \log\pi^{ref}_w) - (\log\pi_l - \log\pi^{ref}_l)` is the
log-ratio margin, :math:`w` the chosen and :math:`l` the rejected response.

Example (policy = reference gives :math:`\log 2` for DPO):

  >>> z = jnp.zeros(3)
  >>> print(dpo_loss(z, z, z, z).loss)
  [0.6931472 0.6931472 0.6931472]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from prefjax.losses.logprobs import _upcast, masked_mean, masked_sum

__all__ = [
    "PAIRWISE_LOSSES",
    "PreferenceLossOutput",
    "ListwiseLossOutput",
    "KTOLossOutput",
    "bradley_terry_loss",
    "plackett_luce_loss",
    "process_reward_loss",
    "dpo_loss",
    "robust_dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "nca_pair_loss",
    "exo_pair_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "listwise_dpo_loss",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "orpo_log_odds_ratio",
    "simpo_loss",
    "cpo_loss",
    "sft_loss",
]


class PreferenceLossOutput(NamedTuple):
    """Per-example pairwise loss and implicit rewards, each ``[batch]`` float32."""

    loss: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array


class ListwiseLossOutput(NamedTuple):
    """Per-example listwise loss ``[batch]`` and implicit rewards ``[batch, k]``."""

    loss: jax.Array
    rewards: jax.Array


class KTOLossOutput(NamedTuple):
    """Per-example KTO loss ``[batch]`` and implicit rewards ``[batch]`` (desirable or not)."""

    loss: jax.Array
    rewards: jax.Array


# ------------------------------------------------------------------------------------ helpers


def _upcast_all(*xs: ArrayLike) -> list[jax.Array]:
    """Each argument through the shared :func:`prefjax.losses.logprobs._upcast` (>= float32)."""
    return [_upcast(x) for x in xs]


def _pair_inputs(pc, pr, rc, rr) -> list[jax.Array]:
    """Upcast the four ``[batch]`` log-prob arrays and check they share one shape."""
    pc, pr, rc, rr = _upcast_all(pc, pr, rc, rr)
    chex.assert_equal_shape((pc, pr, rc, rr))
    return [pc, pr, rc, rr]


def _rewards(beta, policy_logps, ref_logps) -> jax.Array:
    """Implicit reward beta * (log pi - log pi_ref), a diagnostic (no gradient)."""
    return jax.lax.stop_gradient(beta * (policy_logps - ref_logps))


def _check_beta(beta) -> None:
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _no_label_smoothing(name: str, label_smoothing) -> None:
    """Variants without a label-smoothing form: refuse a non-zero value instead of ignoring it."""
    if isinstance(label_smoothing, (int, float)) and label_smoothing != 0:
        raise ValueError(
            f"{name} has no label-smoothing form; got label_smoothing={label_smoothing} "
            "(use dpo_loss, robust_dpo_loss or exo_pair_loss for noisy labels)"
        )


def _check_probability(name: str, value, *, low_open: bool = False, high: float = 1.0) -> None:
    if isinstance(value, (int, float)):
        ok = (value > 0 if low_open else value >= 0) and value < high
        if not ok:
            lo = "(0" if low_open else "[0"
            raise ValueError(f"{name} must lie in {lo}, {high}), got {value}")


# ----------------------------------------------------------------------------- reward models


def bradley_terry_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    r"""Bradley-Terry reward-model loss, with the Llama 2 margin and label smoothing.

    .. math:: \ell = -(1-\epsilon)\log\sigma(r_w - r_l - m) - \epsilon\log\sigma(-(r_w - r_l - m))

    :math:`P(y_w \succ y_l) = \sigma(r_w - r_l)` is the Bradley-Terry preference probability;
    the loss is its negative log-likelihood. ``margin`` :math:`m` (Touvron et al., 2023, Llama 2,
    Eq. 2) asks for a larger gap on pairs rated as clearly better; ``label_smoothing``
    :math:`\epsilon` treats a fraction of labels as flipped.

    Args:
      chosen_rewards: ``[batch]`` scalar rewards of the preferred responses.
      rejected_rewards: ``[batch]`` rewards of the dispreferred responses.
      margin: optional ``[batch]`` (or scalar) margin :math:`m \ge 0`.
      label_smoothing: :math:`\epsilon \in [0, 0.5)`.

    Returns:
      ``[batch]`` float32 loss.

    Example:
      >>> loss = bradley_terry_loss(jnp.array([2.0]), jnp.array([0.5]))
      >>> print(f"P = {float(jnp.exp(-loss[0])):.3f}, loss = {float(loss[0]):.3f}")
      P = 0.818, loss = 0.201

    References:
      Bradley & Terry (1952); Ouyang et al. (2022), InstructGPT, Eq. 1; Touvron et al. (2023),
      Llama 2, Eq. 2 (margin).
    """
    _check_probability("label_smoothing", label_smoothing, high=0.5)
    chosen_rewards, rejected_rewards = _upcast_all(chosen_rewards, rejected_rewards)
    chex.assert_equal_shape((chosen_rewards, rejected_rewards))
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        margin = _upcast(margin)
        logits = logits - margin
    # log_sigmoid(x) = -softplus(-x): finite for any |x|, unlike log(sigmoid(x)).
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        logits
    ) - label_smoothing * jax.nn.log_sigmoid(-logits)


def process_reward_loss(
    step_logits: ArrayLike, step_labels: ArrayLike, step_mask: ArrayLike
) -> jax.Array:
    r"""Process reward model loss: binary cross-entropy of each labelled step, summed per example.

    .. math:: \ell = -\sum_{t} m_t \big[ y_t \log\sigma(z_t) + (1 - y_t)\log\sigma(-z_t) \big]

    :math:`z_t` is the model's logit at token :math:`t`, :math:`\sigma(z_t)` its probability that
    the solution is still correct after the step ending there; :math:`m_t` marks the tokens where
    a labelled step ends (its separator) and :math:`y_t \in \{0, 1\}` is the step's label
    (Lightman et al., 2023, PRM800K; Wang et al., 2024, Math-Shepherd, Eq. 1). The sum over steps
    is per example so the caller chooses the normaliser (mean over steps: divide by
    ``step_mask.sum()``).

    Args:
      step_logits: ``[batch, seq]`` logits at every token (only the masked ones count).
      step_labels: ``[batch, seq]`` 0/1 labels (bool, int or float; read where ``step_mask``).
      step_mask: ``[batch, seq]`` 1/True at each labelled step's last token.

    Returns:
      ``[batch]`` float32 summed step losses (0 for a row without labelled steps).

    Example:
      >>> z = jnp.array([[2.0, 0.0, -1.0]])
      >>> loss = process_reward_loss(z, jnp.array([[1, 0, 0]]), jnp.array([[1, 0, 1]]))
      >>> print(f"{float(loss[0]):.4f}")  # -log sigma(2) - log sigma(1)
      0.4402

    References:
      Lightman et al. (2023), "Let's Verify Step by Step"; Wang et al. (2024), Math-Shepherd.
    """
    step_logits, step_labels = _upcast(step_logits), jnp.asarray(step_labels)
    chex.assert_equal_shape((step_logits, step_labels, jnp.asarray(step_mask)))
    y = step_labels.astype(step_logits.dtype)
    # log_sigmoid(x) and log_sigmoid(-x): finite for any |x|, unlike log(sigmoid(x)).
    per_token = -(y * jax.nn.log_sigmoid(step_logits) + (1 - y) * jax.nn.log_sigmoid(-step_logits))
    return masked_sum(per_token, step_mask, axis=-1)


def plackett_luce_loss(scores: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    r"""Plackett-Luce negative log-likelihood of a ranking, best first; ragged K via ``mask``.

    .. math:: \ell = -\sum_{k=1}^{K} \Big( s_k - \log \sum_{j \ge k} e^{s_j} \Big)

    Each response in turn is "chosen" from those not yet placed. With ``K = 2`` this is the
    Bradley-Terry loss :math:`-\log\sigma(s_1 - s_2)`. Masked-out entries are removed from every
    choice set (they may sit anywhere, e.g. padding slots at the end of a ragged list); a row with
    fewer than two valid entries has loss 0.

    Args:
      scores: ``[batch, k]`` scores (rewards) listed best-first.
      mask: optional ``[batch, k]``, 1 for real responses, 0 for padding slots.

    Returns:
      ``[batch]`` float32 loss.

    Example:
      >>> s = jnp.array([[2.0, 0.5, -9.0]])
      >>> m = jnp.array([[1, 1, 0]])                       # two real responses
      >>> print(f"{float(plackett_luce_loss(s, mask=m)[0]):.3f}")   # = Bradley-Terry
      0.201

    References:
      Plackett (1975); Luce (1959); Rafailov et al. (2023), DPO, Appendix A.3, Eq. 20.
    """
    scores = _upcast(scores)
    chex.assert_rank(scores, 2)
    if mask is None:
        mask = jnp.ones(scores.shape, dtype=bool)
    mask = jnp.asarray(mask)
    chex.assert_equal_shape((scores, mask))
    valid = mask != 0
    k = scores.shape[-1]
    # Masked scores may be garbage (NaN, -inf padding): replace them before any arithmetic.
    safe = jnp.where(valid, scores, 0.0)
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]  # [k, k]: j > i
    # Term i is log(e^{s_i} / sum_{j >= i} e^{s_j}) = -softplus(log sum_{j > i} e^{s_j - s_i}):
    # softplus (log1p inside) keeps precision when response i dominates, where s_i - logsumexp
    # would cancel catastrophically.
    in_set = later[None] & valid[:, None, :]  # [batch, k, k]: valid j after i
    nonempty = jnp.any(in_set, axis=-1)  # [batch, k]; the last valid response has no term
    # Empty sets get a dummy member (j = i) so logsumexp never sees an empty set (no -inf, no NaN
    # gradient); their terms are zeroed below.
    safe_set = in_set | (jnp.eye(k, dtype=bool)[None] & ~nonempty[..., None])
    diffs = safe[:, None, :] - safe[:, :, None]  # [batch, i, j] = s_j - s_i
    diffs = jnp.where(safe_set, diffs, -jnp.inf)  # exp(-inf) = 0: outside the choice set
    log_rest = jax.nn.logsumexp(diffs, axis=-1)  # [batch, k]
    terms = jnp.where(valid & nonempty, -jax.nn.softplus(log_rest), 0.0)
    return -jnp.sum(terms, axis=-1)


# ------------------------------------------------------------------------- pairwise DPO family


def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Direct Preference Optimization loss (Rafailov et al., 2023, Eq. 7); cDPO with smoothing.

    .. math:: \ell = -(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h),\quad
        h = (\log\pi_w - \log\pi^{ref}_w) - (\log\pi_l - \log\pi^{ref}_l)

    :math:`\epsilon` = ``label_smoothing`` gives conservative DPO (cDPO, Mitchell 2023): the
    labels are assumed flipped with probability :math:`\epsilon`. At initialisation (policy =
    reference) the loss is exactly :math:`\log 2` with gradient :math:`-\beta/2` per unit of
    :math:`h`. Matches TRL ``DPOTrainer.dpo_loss`` with ``loss_type="sigmoid"``.

    Args:
      policy_chosen_logps: ``[batch]`` summed response log-probs of the chosen responses under
        the policy (see :func:`prefjax.losses.sequence_logprobs`).
      policy_rejected_logps: ``[batch]`` same for the rejected responses.
      ref_chosen_logps: ``[batch]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[batch]`` rejected log-probs under the reference.
      beta: :math:`\beta > 0`, the KL-regularisation strength (0.1 in the paper's experiments).
      label_smoothing: :math:`\epsilon \in [0, 0.5)`.

    Returns:
      :class:`PreferenceLossOutput`: ``loss`` ``[batch]``; ``chosen_rewards`` /
      ``rejected_rewards`` ``[batch]`` = :math:`\beta(\log\pi - \log\pi^{ref})`.

    Example:
      >>> out = dpo_loss(jnp.array([-8.2]), jnp.array([-9.5]), jnp.array([-8.5]),
      ...                jnp.array([-9.1]), beta=0.1)
      >>> print(f"{float(out.loss[0]):.3f}")            # -log sigmoid(0.1 * 0.7)
      0.659

    References:
      Rafailov et al. (2023), "Direct Preference Optimization", Eq. 7; Mitchell (2023), "A note on
      DPO with noisy preferences" (cDPO).
    """
    _check_beta(beta)
    _check_probability("label_smoothing", label_smoothing, high=0.5)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = (pc - rc) - (pr - rr)
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        beta * logits
    ) - label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def robust_dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Robust (unbiased) DPO under label-flip rate :math:`\epsilon` (Chowdhury et al., 2024).

    .. math:: \ell = \frac{-(1-\epsilon)\log\sigma(\beta h) + \epsilon\log\sigma(-\beta h)}
        {1 - 2\epsilon}

    Unlike cDPO, this is an unbiased estimate of the clean-label DPO loss when each label is
    flipped with probability :math:`\epsilon < 1/2` (Eq. 12 of the paper). Equals
    :func:`dpo_loss` at :math:`\epsilon = 0`. Matches TRL ``loss_type="robust"``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs, as :func:`dpo_loss`.
      beta: :math:`\beta > 0`.
      label_smoothing: flip rate :math:`\epsilon \in [0, 0.5)`.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(f"{float(robust_dpo_loss(z, z, z, z, label_smoothing=0.2).loss[0]):.4f}")
      0.6931

    References:
      Chowdhury, Kini & Natarajan (2024), "Provably Robust DPO", Eq. 12.
    """
    _check_beta(beta)
    _check_probability("label_smoothing", label_smoothing, high=0.5)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = (pc - rc) - (pr - rr)
    loss = (
        -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
        + label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    ) / (1.0 - 2.0 * label_smoothing)
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def ipo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Identity Preference Optimization: squared regression of the margin to :math:`1/(2\beta)`.

    .. math:: \ell = \Big(h - \frac{1}{2\beta}\Big)^2

    :math:`\beta` is the paper's :math:`\tau`. The bounded target keeps the margin from growing
    without limit on deterministic preferences (IPO's fix for DPO over-fitting).

    **Pass length-averaged log-probs** (``sequence_logprobs(..., average=True)``) to match TRL:
    TRL divides IPO's sequence log-probs by the number of completion tokens (older versions in
    ``concatenated_forward``, newer ones inside the loss), a choice its authors confirmed with the
    IPO authors. With summed log-probs the squared loss scales with length and :math:`\beta` must
    be retuned. The rewards returned are :math:`\beta(\log\pi - \log\pi^{ref})` of the inputs
    given.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` log-probs (length-averaged, see above).
      beta: :math:`\tau > 0`.
      label_smoothing: must be 0 (IPO has no smoothed form).

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(float(ipo_loss(z, z, z, z, beta=0.1).loss[0]))   # (0 - 5)^2
      25.0

    References:
      Azar et al. (2023), "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", Eq. 17.
    """
    _check_beta(beta)
    _no_label_smoothing("ipo_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = (pc - rc) - (pr - rr)
    loss = jnp.square(logits - 1.0 / (2.0 * beta))
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def hinge_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Hinge (SLiC / RSO) loss on the normalised likelihood margin.

    .. math:: \ell = \max(0,\ 1 - \beta h)

    SLiC's calibration loss :math:`\max(0, \delta - \log\pi_w + \log\pi_l)` with margin
    :math:`\delta = 1/\beta`, scaled by :math:`\beta`, and with reference-normalised log-probs
    as in RSO. Matches TRL ``loss_type="hinge"``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0` (inverse margin).
      label_smoothing: must be 0.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(float(hinge_loss(z, z, z, z).loss[0]))
      1.0

    References:
      Zhao et al. (2023), "SLiC-HF", Eq. 1; Liu et al. (2023), "Statistical Rejection Sampling
      Improves Preference Optimization" (RSO), Eq. 13.
    """
    _check_beta(beta)
    _no_label_smoothing("hinge_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = (pc - rc) - (pr - rr)
    loss = jax.nn.relu(1.0 - beta * logits)
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def bco_pair_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    delta: ArrayLike = 0.0,
) -> PreferenceLossOutput:
    r"""Binary Classifier Optimization on pairs: chosen classified as good, rejected as bad.

    .. math:: \ell = -\log\sigma(r_w - \delta) - \log\sigma(-(r_l - \delta)),\quad
        r = \beta(\log\pi - \log\pi^{ref})

    :math:`\delta` is BCO's reward shift: a running mean of the rewards (Jung et al., 2024, Eq. 8).
    The default ``delta=0`` matches current TRL (``loss_type="bco_pair"``, which dropped the
    shift); older TRL versions kept ``RunningMoments`` of the batch-mean reward and passed its
    mean: supply that value (a scalar, no gradient is taken through it) to reproduce them.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0`.
      label_smoothing: must be 0.
      delta: reward shift :math:`\delta` (scalar or ``[batch]``), treated as a constant.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(f"{float(bco_pair_loss(z, z, z, z).loss[0]):.4f}")   # 2 log 2
      1.3863

    References:
      Jung et al. (2024), "Binary Classifier Optimization for Large Language Model Alignment",
      Eqs. 6-8.
    """
    _check_beta(beta)
    _no_label_smoothing("bco_pair_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta = _upcast(delta)
    delta = jax.lax.stop_gradient(delta)
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    loss = -jax.nn.log_sigmoid(chosen - delta) - jax.nn.log_sigmoid(-(rejected - delta))
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def sppo_hard_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Self-Play Preference Optimization with hard (0/1) win probabilities.

    .. math:: \ell = \Big(\log\tfrac{\pi_w}{\pi^{ref}_w} - \tfrac{1}{2\beta}\Big)^2
        + \Big(\log\tfrac{\pi_l}{\pi^{ref}_l} + \tfrac{1}{2\beta}\Big)^2

    SPPO (Wu et al., 2024, Eq. 4.7 in Algorithm 1) regresses each log-ratio to
    :math:`\eta(P(y \succ \pi) - 1/2)`; with the winner's probability set to 1 and the loser's to
    0, and :math:`\eta = 1/\beta`, this is TRL's ``loss_type="sppo_hard"``. The soft version needs
    a preference model's probabilities and is not a pairwise loss.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0` (:math:`1/\eta`).
      label_smoothing: must be 0.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(float(sppo_hard_loss(z, z, z, z, beta=0.5).loss[0]))   # 1 + 1
      2.0

    References:
      Wu et al. (2024), "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7.
    """
    _check_beta(beta)
    _no_label_smoothing("sppo_hard_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = jnp.square((pc - rc) - 0.5 / beta) + jnp.square((pr - rr) + 0.5 / beta)
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def nca_pair_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Noise Contrastive Alignment, pairwise form (NCA).

    .. math:: \ell = -\log\sigma(r_w) - \tfrac12\log\sigma(-r_w) - \tfrac12\log\sigma(-r_l),
        \quad r = \beta(\log\pi - \log\pi^{ref})

    NCA optimises absolute (not relative) likelihoods, so unlike DPO it does not let the chosen
    log-prob fall as long as the rejected one falls faster. Matches TRL ``loss_type="nca_pair"``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0`.
      label_smoothing: must be 0.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(f"{float(nca_pair_loss(z, z, z, z).loss[0]):.4f}")   # 2 log 2
      1.3863

    References:
      Chen et al. (2024), "Noise Contrastive Alignment of Language Models with Explicit Rewards",
      Eq. 12 (K = 2).
    """
    _check_beta(beta)
    _no_label_smoothing("nca_pair_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    loss = (
        -jax.nn.log_sigmoid(chosen)
        - 0.5 * jax.nn.log_sigmoid(-chosen)
        - 0.5 * jax.nn.log_sigmoid(-rejected)
    )
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def exo_pair_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> PreferenceLossOutput:
    r"""Efficient Exact Optimization (EXO), pairwise: reverse KL to the smoothed preference label.

    .. math:: \ell = \sigma(\beta h)\big(\log\sigma(\beta h) - \log(1-\epsilon)\big)
        + \sigma(-\beta h)\big(\log\sigma(-\beta h) - \log\epsilon\big)

    :math:`\mathrm{KL}(p_\theta \,\|\, p_{label})` between the model's pairwise preference
    :math:`p_\theta = (\sigma(\beta h), \sigma(-\beta h))` and the label
    :math:`(1-\epsilon, \epsilon)`; it is mode-seeking where DPO (forward KL) is mean-seeking.
    :math:`\epsilon` must be in :math:`(0, 1)`; as in TRL's ``loss_type="exo_pair"`` (which
    replaced 0 by the EXO paper's :math:`10^{-3}` in older versions), ``label_smoothing=0`` is
    read as :math:`10^{-3}`, which is also the default, so a config whose label smoothing is 0
    works unchanged.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0`.
      label_smoothing: :math:`\epsilon \in (0, 1)`; 0 means :math:`10^{-3}`.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> out = exo_pair_loss(z, z, z, z, label_smoothing=0.5)   # p_theta = label: KL = 0
      >>> print(f"{abs(float(out.loss[0])):.4f}")
      0.0000

    References:
      Ji et al. (2024), "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16.
    """
    _check_beta(beta)
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
        label_smoothing = 1e-3
    _check_probability("label_smoothing", label_smoothing, low_open=True)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * ((pc - rc) - (pr - rr))
    log_q_w = jax.nn.log_sigmoid(logits)
    log_q_l = jax.nn.log_sigmoid(-logits)
    loss = jnp.exp(log_q_w) * (log_q_w - math.log1p(-label_smoothing)) + jnp.exp(log_q_l) * (
        log_q_l - math.log(label_smoothing)
    )
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def apo_zero_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Anchored Preference Optimization, APO-zero: raise the chosen, lower the rejected.

    .. math:: \ell = \big(1 - \sigma(r_w)\big) + \sigma(r_l),\quad
        r = \beta(\log\pi - \log\pi^{ref})

    For data whose chosen answers are better than the model's own outputs. Matches TRL
    ``loss_type="apo_zero"``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0`.
      label_smoothing: must be 0.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(float(apo_zero_loss(z, z, z, z).loss[0]))
      1.0

    References:
      D'Oosterlinck et al. (2024), "Anchored Preference Optimization and Contrastive Revisions",
      Eq. 7.
    """
    _check_beta(beta)
    _no_label_smoothing("apo_zero_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = (1.0 - jax.nn.sigmoid(beta * (pc - rc))) + jax.nn.sigmoid(beta * (pr - rr))
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


def apo_down_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Anchored Preference Optimization, APO-down: lower both, the rejected more.

    .. math:: \ell = \sigma(r_w) + \big(1 - \sigma(\beta h)\big),\quad r_w = \beta(\log\pi_w -
        \log\pi^{ref}_w)

    For data whose chosen answers are worse than the model's own outputs. Matches TRL
    ``loss_type="apo_down"``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        ``[batch]`` summed log-probs.
      beta: :math:`\beta > 0`.
      label_smoothing: must be 0.

    Returns:
      :class:`PreferenceLossOutput`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(float(apo_down_loss(z, z, z, z).loss[0]))
      1.0

    References:
      D'Oosterlinck et al. (2024), "Anchored Preference Optimization and Contrastive Revisions",
      Eq. 8.
    """
    _check_beta(beta)
    _no_label_smoothing("apo_down_loss", label_smoothing)
    pc, pr, rc, rr = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = (pc - rc) - (pr - rr)
    loss = jax.nn.sigmoid(beta * (pc - rc)) + (1.0 - jax.nn.sigmoid(beta * logits))
    return PreferenceLossOutput(loss, _rewards(beta, pc, rc), _rewards(beta, pr, rr))


# ----------------------------------------------------------------------------------- listwise


def listwise_dpo_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    *,
    beta: float = 0.1,
    mask: ArrayLike | None = None,
) -> ListwiseLossOutput:
    r"""Plackett-Luce DPO for K ranked responses (Rafailov et al., 2023, Appendix A.3, Eq. 20).

    .. math:: \ell = -\sum_{k=1}^{K}\log\frac{\exp r_k}{\sum_{j \ge k}\exp r_j},\quad
        r_k = \beta(\log\pi(y_k) - \log\pi^{ref}(y_k))

    :func:`plackett_luce_loss` applied to the implicit rewards. At ``K = 2`` it equals
    :func:`dpo_loss`. Ragged lists (fewer than K responses for some prompts) use ``mask``.

    Args:
      policy_logps: ``[batch, k]`` summed log-probs under the policy, best response first.
      ref_logps: ``[batch, k]`` same under the reference.
      beta: :math:`\beta > 0`.
      mask: optional ``[batch, k]``, 1 for real responses.

    Returns:
      :class:`ListwiseLossOutput`: ``loss`` ``[batch]``; ``rewards`` ``[batch, k]``, 0 where
      masked.

    Example:
      >>> z = jnp.zeros((1, 3))
      >>> print(f"{float(listwise_dpo_loss(z, z).loss[0]):.4f}")   # log 3! = log 6
      1.7918
    """
    _check_beta(beta)
    policy_logps, ref_logps = _upcast_all(policy_logps, ref_logps)
    chex.assert_rank(policy_logps, 2)
    chex.assert_equal_shape((policy_logps, ref_logps))
    rewards = beta * (policy_logps - ref_logps)
    loss = plackett_luce_loss(rewards, mask=mask)
    if mask is not None:
        rewards = jnp.where(jnp.asarray(mask) != 0, rewards, 0.0)
    return ListwiseLossOutput(loss, jax.lax.stop_gradient(rewards))


# ------------------------------------------------------------------------- unpaired feedback


def kto_reference_point(
    policy_mismatched_logps: ArrayLike, ref_mismatched_logps: ArrayLike, *, mask=None
) -> jax.Array:
    r"""KTO's reference point :math:`z_0`: a clamped, gradient-free estimate of the policy's KL.

    .. math:: z_0 = \max\Big(0,\ \frac1m\sum_i \log\pi(y'_i \mid x_i) - \log\pi^{ref}(y'_i \mid
        x_i)\Big)

    computed on **mismatched** pairs (each prompt with another example's completion), as TRL's
    ``KTOTrainer`` does. For multi-device batches, average across devices before the clamp (TRL
    gathers, then clamps).

    Args:
      policy_mismatched_logps: ``[batch]`` summed log-probs of mismatched completions (policy).
      ref_mismatched_logps: ``[batch]`` same under the reference.
      mask: optional ``[batch]``, 1 for examples that count.

    Returns:
      Scalar float32 :math:`z_0 \ge 0`, under ``stop_gradient``.

    Example:
      >>> print(kto_reference_point(jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.5])))
      0.25
    """
    policy_mismatched_logps, ref_mismatched_logps = _upcast_all(
        policy_mismatched_logps, ref_mismatched_logps
    )
    chex.assert_equal_shape((policy_mismatched_logps, ref_mismatched_logps))
    diff = policy_mismatched_logps - ref_mismatched_logps
    if mask is None:
        mask = jnp.ones(diff.shape, jnp.bool_)  # bool: a mask never sets the compute dtype
    return jax.lax.stop_gradient(jnp.maximum(masked_mean(diff, mask), 0.0))


def kto_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    desirable: ArrayLike,
    kl_estimate: ArrayLike,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    r"""Kahneman-Tversky Optimization for unpaired binary feedback (Ethayarajh et al., 2024, Eq. 8).

    .. math::
        \ell = \begin{cases} \lambda_D\,\big(1 - \sigma(\beta(r - z_0))\big) & \text{desirable}\\
        \lambda_U\,\big(1 - \sigma(\beta(z_0 - r))\big) & \text{undesirable}\end{cases},
        \quad r = \log\pi(y \mid x) - \log\pi^{ref}(y \mid x)

    :math:`z_0` (``kl_estimate``) is the reference point; it is clamped at 0 and no gradient
    flows through it (see :func:`kto_reference_point`). The paper's :math:`\lambda_D, \lambda_U`
    (``desirable_weight``, ``undesirable_weight``) rebalance unequal numbers of desirable and
    undesirable examples: it recommends
    :math:`\lambda_D n_D / (\lambda_U n_U) \in [1, 4/3]`. Matches TRL ``KTOTrainer.kto_loss``
    (``loss_type="kto"``) per example; TRL then averages over the batch.

    Args:
      policy_logps: ``[batch]`` summed response log-probs under the policy.
      ref_logps: ``[batch]`` same under the reference.
      desirable: ``[batch]`` bool or 0/1, 1 for desirable (thumbs-up) examples.
      kl_estimate: scalar (or ``[batch]``) reference point :math:`z_0`.
      beta: :math:`\beta > 0`.
      desirable_weight: :math:`\lambda_D`.
      undesirable_weight: :math:`\lambda_U`.

    Returns:
      :class:`KTOLossOutput`: ``loss`` ``[batch]``, ``rewards`` ``[batch]`` =
      :math:`\beta(\log\pi - \log\pi^{ref})`.

    Example:
      >>> z = jnp.zeros(2)
      >>> out = kto_loss(z, z, jnp.array([1, 0]), 0.0)
      >>> print(out.loss)                                # 1 - sigmoid(0)
      [0.5 0.5]

    References:
      Ethayarajh et al. (2024), "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8.
    """
    _check_beta(beta)
    policy_logps, ref_logps, kl_estimate = _upcast_all(policy_logps, ref_logps, kl_estimate)
    desirable = jnp.asarray(desirable)
    chex.assert_equal_shape((policy_logps, ref_logps, desirable))
    z0 = jax.lax.stop_gradient(jnp.maximum(kl_estimate, 0.0))
    logratios = policy_logps - ref_logps
    # 1 - sigmoid(x) = sigmoid(-x): one sigmoid, no cancellation for large x.
    desirable_loss = desirable_weight * jax.nn.sigmoid(-beta * (logratios - z0))
    undesirable_loss = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - logratios))
    loss = jnp.where(desirable != 0, desirable_loss, undesirable_loss)
    return KTOLossOutput(loss, jax.lax.stop_gradient(beta * logratios))


# ---------------------------------------------------------------------- reference-free losses


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    # Near 0, 1 - exp(x) cancels: use expm1. Far below, exp(x) is tiny: use log1p.
    near_zero = x > -math.log(2.0)
    safe_near = jnp.where(near_zero, x, -1.0)
    safe_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(safe_near)), jnp.log1p(-jnp.exp(safe_far)))


_ORPO_MAX_LOGP = -1e-6  # average log-prob ceiling: the odds p / (1 - p) are infinite at p = 1


def orpo_log_odds_ratio(chosen_avg_logps: ArrayLike, rejected_avg_logps: ArrayLike) -> jax.Array:
    r"""ORPO's log odds ratio, ``[batch]``: log(odds(chosen) / odds(rejected)).

    .. math:: \log\frac{p_w/(1-p_w)}{p_l/(1-p_l)} = (\log p_w - \log p_l)
        - \big(\log(1 - p_w) - \log(1 - p_l)\big)

    with :math:`\log(1-p)` computed stably from :math:`\log p`. The average log-probs are
    clamped to at most :math:`-10^{-6}` (the odds are infinite at :math:`p = 1`). TRL logs the
    batch mean of this as ``log_odds_chosen``.

    Example:
      >>> p = jnp.log(jnp.array([0.5])); q = jnp.log(jnp.array([0.2]))
      >>> print(orpo_log_odds_ratio(p, q))                 # log(1 / 0.25)
      [1.3862944]
    """
    chosen_avg_logps, rejected_avg_logps = _upcast_all(chosen_avg_logps, rejected_avg_logps)
    chex.assert_equal_shape((chosen_avg_logps, rejected_avg_logps))
    c = jnp.minimum(chosen_avg_logps, _ORPO_MAX_LOGP)
    r = jnp.minimum(rejected_avg_logps, _ORPO_MAX_LOGP)
    return (c - r) - (_log1mexp(c) - _log1mexp(r))


def orpo_loss(
    chosen_avg_logps: ArrayLike, rejected_avg_logps: ArrayLike, *, beta: float = 0.1
) -> PreferenceLossOutput:
    r"""Odds Ratio Preference Optimization: the odds-ratio term (Hong et al., 2024, Eqs. 6-7).

    .. math:: \ell_{OR} = -\beta \log\sigma\Big(\log\frac{\mathrm{odds}_\theta(y_w \mid x)}
        {\mathrm{odds}_\theta(y_l \mid x)}\Big),\quad \mathrm{odds}(y) = \frac{p(y)}{1 - p(y)}

    The full ORPO objective adds the SFT term on the chosen response:
    ``sft_loss(chosen_token_logps, chosen_mask) + orpo_loss(...).loss`` (the paper's
    :math:`\lambda` is ``beta`` here, as in TRL). Reference-free; ``p`` is the length-averaged
    probability, so pass ``sequence_logprobs(..., average=True)``. Matches TRL
    ``ORPOTrainer.odds_ratio_loss`` (which returns :math:`\beta\log\sigma(\cdot)`, subtracted
    from the NLL) up to sign.

    Args:
      chosen_avg_logps: ``[batch]`` mean token log-prob of the chosen responses.
      rejected_avg_logps: ``[batch]`` mean token log-prob of the rejected responses.
      beta: :math:`\lambda` (0.1 in the paper).

    Returns:
      :class:`PreferenceLossOutput` with ``chosen_rewards = beta * chosen_avg_logps`` and
      ``rejected_rewards = beta * rejected_avg_logps`` (TRL's definition).

    Example:
      >>> c = jnp.log(jnp.array([0.5])); r = jnp.log(jnp.array([0.5]))
      >>> print(f"{float(orpo_loss(c, r, beta=1.0).loss[0]):.4f}")   # equal odds: log 2
      0.6931

    References:
      Hong, Lee & Thorne (2024), "ORPO: Monolithic Preference Optimization without Reference
      Model", Eqs. 6-7.
    """
    _check_beta(beta)
    chosen_avg_logps, rejected_avg_logps = _upcast_all(chosen_avg_logps, rejected_avg_logps)
    log_odds = orpo_log_odds_ratio(chosen_avg_logps, rejected_avg_logps)
    loss = -beta * jax.nn.log_sigmoid(log_odds)
    return PreferenceLossOutput(
        loss,
        jax.lax.stop_gradient(beta * chosen_avg_logps),
        jax.lax.stop_gradient(beta * rejected_avg_logps),
    )


def simpo_loss(
    chosen_avg_logps: ArrayLike,
    rejected_avg_logps: ArrayLike,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Simple Preference Optimization: reference-free, length-normalised, with a target margin.

    .. math:: \ell = -(1-\epsilon)\log\sigma(\beta(\bar{\ell}_w - \bar{\ell}_l) - \gamma)
        - \epsilon\log\sigma(-(\beta(\bar{\ell}_w - \bar{\ell}_l) - \gamma))

    with :math:`\bar{\ell} = \frac{1}{|y|}\log\pi(y \mid x)` the average token log-prob (pass
    ``sequence_logprobs(..., average=True)``). Defaults follow the paper's recipe
    (:math:`\beta = 2`, :math:`\gamma/\beta = 0.5`). Matches TRL ``CPOTrainer.cpo_loss`` with
    ``loss_type="simpo"`` and ``simpo_gamma = gamma`` (TRL computes
    :math:`\beta\,(\Delta - \gamma/\beta)`, the same number).

    Args:
      chosen_avg_logps: ``[batch]`` mean token log-prob of the chosen responses.
      rejected_avg_logps: ``[batch]`` mean token log-prob of the rejected responses.
      beta: :math:`\beta > 0` reward scale.
      gamma: target reward margin :math:`\gamma \ge 0`.
      label_smoothing: :math:`\epsilon \in [0, 0.5)` (TRL's CPO-style smoothing).

    Returns:
      :class:`PreferenceLossOutput` with ``chosen_rewards = beta * chosen_avg_logps`` (and
      likewise rejected), the SimPO implicit reward.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(f"{float(simpo_loss(z, z, beta=2.0, gamma=0.0).loss[0]):.4f}")
      0.6931

    References:
      Meng, Xia & Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free
      Reward", Eq. 6.
    """
    _check_beta(beta)
    _check_probability("label_smoothing", label_smoothing, high=0.5)
    chosen_avg_logps, rejected_avg_logps = _upcast_all(chosen_avg_logps, rejected_avg_logps)
    chex.assert_equal_shape((chosen_avg_logps, rejected_avg_logps))
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        logits
    ) - label_smoothing * jax.nn.log_sigmoid(-logits)
    return PreferenceLossOutput(
        loss,
        jax.lax.stop_gradient(beta * chosen_avg_logps),
        jax.lax.stop_gradient(beta * rejected_avg_logps),
    )


def cpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    r"""Contrastive Preference Optimization preference term (Xu et al., 2024, Eq. 3).

    .. math:: \ell = -(1-\epsilon)\log\sigma(\beta(\log\pi_w - \log\pi_l))
        - \epsilon\log\sigma(-\beta(\log\pi_w - \log\pi_l))

    DPO with a uniform reference (reference-free). The full CPO objective adds the NLL of the
    chosen response, ``sft_loss`` times TRL's ``cpo_alpha``. Matches TRL ``CPOTrainer.cpo_loss``
    with ``loss_type="sigmoid"``.

    Args:
      policy_chosen_logps: ``[batch]`` summed log-probs of the chosen responses.
      policy_rejected_logps: ``[batch]`` summed log-probs of the rejected responses.
      beta: :math:`\beta > 0`.
      label_smoothing: :math:`\epsilon \in [0, 0.5)`.

    Returns:
      :class:`PreferenceLossOutput` with rewards :math:`\beta\log\pi`.

    Example:
      >>> z = jnp.zeros(1)
      >>> print(f"{float(cpo_loss(z, z).loss[0]):.4f}")
      0.6931

    References:
      Xu et al. (2024), "Contrastive Preference Optimization: Pushing the Boundaries of LLM
      Performance in Machine Translation", Eq. 3.
    """
    _check_beta(beta)
    _check_probability("label_smoothing", label_smoothing, high=0.5)
    pc, pr = _upcast_all(policy_chosen_logps, policy_rejected_logps)
    chex.assert_equal_shape((pc, pr))
    logits = beta * (pc - pr)
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        logits
    ) - label_smoothing * jax.nn.log_sigmoid(-logits)
    return PreferenceLossOutput(
        loss, jax.lax.stop_gradient(beta * pc), jax.lax.stop_gradient(beta * pr)
    )


# ------------------------------------------------------------------------------- supervised


def sft_loss(token_logps: ArrayLike, mask: ArrayLike, *, average: bool = True) -> jax.Array:
    r"""Negative log-likelihood of the response tokens, per sequence.

    .. math:: \ell = -\frac{1}{\sum_t m_t}\sum_t m_t \log p_t
        \quad\text{(average=True)}\qquad\text{or}\qquad -\sum_t m_t \log p_t

    Takes token log-probs so it composes with both :func:`prefjax.losses.token_logprobs` and
    :func:`prefjax.losses.chunked_token_logprobs`. ``.mean()`` of the averaged form weights every
    sequence equally; for the token-weighted batch mean (what ``torch`` cross-entropy and TRL's
    SFT report) use ``-masked_mean(token_logps, mask)`` instead. A row with no response tokens
    gives 0.

    Args:
      token_logps: ``[batch, seq]`` log-probs of the target tokens (already shifted).
      mask: ``[batch, seq]`` 1 on response tokens that are trained on.
      average: per-token mean (True) or sum (False) over each sequence.

    Returns:
      ``[batch]`` float32 loss.

    Example:
      >>> lp = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
      >>> print(sft_loss(lp, jnp.array([[1, 1, 0]])) / jnp.log(2.0))   # (1 + 2) / 2 bits
      [1.5]
    """
    token_logps = _upcast(token_logps)
    chex.assert_rank(token_logps, 2)
    chex.assert_equal_shape((token_logps, jnp.asarray(mask)))
    if average:
        return -masked_mean(token_logps, mask, axis=-1)
    return -masked_sum(token_logps, mask, axis=-1)


# Configs pick a pairwise variant by name (``config.algorithm.loss``); the keys are TRL's
# ``DPOConfig.loss_type`` names and every value has dpo_loss's signature. Re-exported as
# ``prefjax.losses.PAIRWISE_LOSSES``.
PAIRWISE_LOSSES = {
    "sigmoid": dpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "exo_pair": exo_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}
