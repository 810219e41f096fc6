"""Independent NumPy references for the log-prob and preference losses (float64).

The ``trl_*`` functions transcribe Hugging Face TRL's PyTorch formulas line by line into NumPy
(``torch.nn.functional.logsigmoid`` -> ``_logsigmoid``, ``sigmoid`` -> ``_sigmoid``), so that
prefjax's losses can be compared with TRL's numbers without installing TRL or torch-side
trainers. Each says which TRL file and function it transcribes. They keep TRL's own
(sometimes naive) arithmetic, e.g. ``log1p(-exp(x))`` in ORPO, on purpose.
"""

from __future__ import annotations

import math

import numpy as np


def _logsigmoid(x):
    # torch.nn.functional.logsigmoid: -softplus(-x)
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return np.exp(_logsigmoid(x))


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def token_logprobs(logits, labels):
    lp = log_softmax(logits)
    return np.take_along_axis(lp, np.asarray(labels)[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------- TRL


def trl_dpo_loss(
    loss_type,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing=0.0,
    bco_delta=0.0,
):
    """``trl/trainer/dpo_trainer.py``, ``DPOTrainer.dpo_loss`` (reference model, reverse KL).

    Returns ``(losses, chosen_rewards, rejected_rewards)``. ``bco_delta`` is ``self.running.mean``
    of older TRL releases (current TRL drops it, i.e. 0). ``exo_pair`` follows the older release
    that replaces ``label_smoothing == 0`` by ``1e-3``.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios

    if loss_type == "sigmoid":
        losses = (
            -_logsigmoid(beta * logits) * (1 - label_smoothing)
            - _logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "robust":
        losses = (
            -_logsigmoid(beta * logits) * (1 - label_smoothing)
            + _logsigmoid(-beta * logits) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        if label_smoothing == 0:
            label_smoothing = 1e-3
        losses = _sigmoid(beta * logits) * (
            _logsigmoid(beta * logits) - math.log(1 - label_smoothing)
        ) + _sigmoid(-beta * logits) * (_logsigmoid(-beta * logits) - math.log(label_smoothing))
    elif loss_type == "hinge":
        losses = np.maximum(1 - beta * logits, 0.0)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        delta = bco_delta
        losses = -_logsigmoid(chosen_rewards - delta) - _logsigmoid(-(rejected_rewards - delta))
    elif loss_type == "sppo_hard":
        a = chosen_logps - ref_chosen_logps
        b = rejected_logps - ref_rejected_logps
        losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        chosen_rewards = (chosen_logps - ref_chosen_logps) * beta
        rejected_rewards = (rejected_logps - ref_rejected_logps) * beta
        losses = (
            -_logsigmoid(chosen_rewards)
            - 0.5 * _logsigmoid(-chosen_rewards)
            - 0.5 * _logsigmoid(-rejected_rewards)
        )
    elif loss_type == "apo_zero":
        losses_chosen = 1 - _sigmoid(beta * chosen_logratios)
        losses_rejected = _sigmoid(beta * rejected_logratios)
        losses = losses_chosen + losses_rejected
    elif loss_type == "apo_down":
        losses_chosen = _sigmoid(beta * chosen_logratios)
        losses_rejected = 1 - _sigmoid(beta * (chosen_logratios - rejected_logratios))
        losses = losses_chosen + losses_rejected
    else:
        raise ValueError(loss_type)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def trl_bco_running_mean_first_step(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta):
    """Older TRL ``bco_pair``: ``RunningMoments`` updated with the detached batch-mean reward of
    ``torch.cat((chosen_rewards, rejected_rewards))``; after one update its mean is that value."""
    rewards = np.concatenate(
        [beta * (chosen_logps - ref_chosen), beta * (rejected_logps - ref_rejected)]
    )
    return rewards.mean()


def trl_kto_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    kl,
    *,
    beta,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    """``trl/trainer/kto_trainer.py``, ``KTOTrainer.kto_loss`` (``loss_type="kto"``), with the
    batch split into its chosen (desirable) and rejected (undesirable) parts as TRL does; ``kl``
    is the already gathered, clamped, detached ``KL`` tensor."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    chosen_losses = 1 - _sigmoid(beta * (chosen_logratios - kl))
    chosen_rewards = beta * chosen_logratios
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    rejected_losses = 1 - _sigmoid(beta * (kl - rejected_logratios))
    rejected_rewards = beta * rejected_logratios
    losses = np.concatenate(
        (desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0
    )
    return losses, chosen_rewards, rejected_rewards


def trl_kto_kl(policy_kl_logps, reference_kl_logps):
    """``KTOTrainer.get_batch_loss_metrics``: ``kl = (policy_KL_logps - reference_KL_logps)
    .mean().clamp(min=0)`` (single process)."""
    return max((policy_kl_logps - reference_kl_logps).mean(), 0.0)


def trl_odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, *, beta):
    """``trl/trainer/orpo_trainer.py``, ``ORPOTrainer.odds_ratio_loss``. Returns ``(losses,
    chosen_rewards, rejected_rewards, mean ratio, mean log_odds)``; the trainer's loss is
    ``policy_nll_loss - losses.mean()``, so the per-example OR term is ``-losses``."""
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        np.log1p(-np.exp(policy_chosen_logps)) - np.log1p(-np.exp(policy_rejected_logps))
    )
    ratio = _logsigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    return losses, chosen_rewards, rejected_rewards, ratio.mean(), log_odds.mean()


def trl_cpo_loss(
    loss_type,
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta,
    label_smoothing=0.0,
    simpo_gamma=0.5,
):
    """``trl/trainer/cpo_trainer.py``, ``CPOTrainer.cpo_loss`` for ``loss_type`` ``"sigmoid"``
    (CPO) and ``"simpo"`` (SimPO; TRL feeds it length-averaged log-probs)."""
    logits = policy_chosen_logps - policy_rejected_logps
    if loss_type == "simpo":
        gamma_logratios = simpo_gamma / beta
        logits = logits - gamma_logratios
    losses = (
        -_logsigmoid(beta * logits) * (1 - label_smoothing)
        - _logsigmoid(-beta * logits) * label_smoothing
    )
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    return losses, chosen_rewards, rejected_rewards


def trl_masked_whiten(values, mask, shift_mean=True):
    """``trl/core.py`` (later ``trl/trainer/utils.py``) ``masked_whiten`` with ``masked_mean``
    and the unbiased ``masked_var`` (Bessel correction)."""
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    var = (centered**2 * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# ----------------------------------------------------------------------------- loop references


def plackett_luce_loop(scores, mask=None):
    """-log P(ranking) by an explicit loop: drop masked entries, then choose best-first."""
    scores = np.asarray(scores, dtype=np.float64)
    if mask is None:
        mask = np.ones(scores.shape, dtype=bool)
    out = np.zeros(scores.shape[0])
    for b in range(scores.shape[0]):
        s = scores[b][np.asarray(mask[b]) != 0]
        total = 0.0
        for k in range(len(s)):
            rest = s[k:]
            total += s[k] - (rest.max() + np.log(np.exp(rest - rest.max()).sum()))
        out[b] = -total
    return out
