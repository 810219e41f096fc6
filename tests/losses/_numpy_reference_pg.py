"""Slow, loop-based NumPy references for GAE and the PPO losses.

Written from the papers' per-step formulas with explicit Python loops over rows and tokens, sharing
no code with ``prefjax.losses``: a masked token is simply not part of the row's episode, so each row
is reduced to the list of its real token indices and walked backwards.
"""

from __future__ import annotations

import math

import numpy as np


def gae_reference(rewards, values, mask, *, gamma, lam, bootstrap_value=None, dones=None):
    """GAE (Schulman et al. 2016, Eq. 16) by a backward loop over each row's real tokens."""
    rewards, values, mask = (np.asarray(a, np.float64) for a in (rewards, values, mask))
    batch, seq = rewards.shape
    advantages = np.zeros((batch, seq))
    returns = np.zeros((batch, seq))
    for b in range(batch):
        real = [t for t in range(seq) if mask[b, t] != 0]
        next_value = 0.0 if bootstrap_value is None else float(bootstrap_value[b])
        next_advantage = 0.0
        for t in reversed(real):
            terminal = dones is not None and dones[b, t] != 0
            if terminal:
                next_value, next_advantage = 0.0, 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = advantage
            returns[b, t] = advantage + values[b, t]
            next_value, next_advantage = values[b, t], advantage
    return advantages, returns


def ppo_policy_reference(
    logprobs, old_logprobs, advantages, mask, *, eps_low, eps_high, dual_clip=None
):
    """Per-token PPO loss, clip indicator and k3 approx KL, one scalar at a time."""
    batch, seq = np.shape(logprobs)
    loss = np.zeros((batch, seq))
    clipped = np.zeros((batch, seq))
    approx_kl = np.zeros((batch, seq))
    for b in range(batch):
        for t in range(seq):
            if mask[b, t] == 0:
                continue
            a = float(advantages[b, t])
            log_ratio = float(logprobs[b, t]) - float(old_logprobs[b, t])
            ratio = math.exp(log_ratio)
            surrogate = ratio * a
            surrogate_clipped = min(max(ratio, 1 - eps_low), 1 + eps_high) * a
            objective = min(surrogate, surrogate_clipped)
            is_clipped = surrogate_clipped < surrogate
            if dual_clip is not None and a < 0:
                if dual_clip * a > objective:
                    objective = dual_clip * a
                    is_clipped = True
            loss[b, t] = -objective
            clipped[b, t] = float(is_clipped)
            approx_kl[b, t] = (ratio - 1.0) - log_ratio
    return loss, clipped, approx_kl


def value_loss_reference(values, old_values, returns, mask, *, clip_eps):
    """Per-token clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), one scalar at a time."""
    batch, seq = np.shape(values)
    loss = np.zeros((batch, seq))
    for b in range(batch):
        for t in range(seq):
            if mask[b, t] == 0:
                continue
            v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clipped = v_old + min(max(v - v_old, -clip_eps), clip_eps)
            loss[b, t] = 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
    return loss
