r"""GRPO, RLOO and REINFORCE: critic-free policy gradient on groups of sampled responses.

Every step (:mod:`prefjax.train.online`): sample ``G = num_samples`` responses to each prompt of the
batch from the current policy, score them, then one update on the ``[B * G]`` rollout rows:

1. reference log-probs of the sampled tokens (the frozen copy, or the LoRA base), under the same
   sampling transform as the sampler's;
2. rewards: the scores, minus ``kl_coef`` times the sequence KL estimate to the reference when
   ``kl_in="reward"``;
3. advantages within each prompt's group (:mod:`prefjax.losses.advantages`): ``"group"``
   (:math:`(r - \bar r_g)/\mathrm{std}_g`, GRPO), ``"group_mean"`` (:math:`r - \bar r_g`,
   Dr. GRPO), ``"rloo"`` (leave-one-out baseline, RLOO) or ``"reinforce"`` (no baseline);
   ``drop_tied_groups`` gives a group whose scores all tie weight 0 (it carries no signal);
4. the clipped surrogate per token (:func:`prefjax.losses.grpo_loss` with ``epsilon_low`` /
   ``epsilon_high``: DAPO's clip-higher), the importance ratio per token (``ratio="token"``) or
   per sequence (``"sequence"``, GSPO: :math:`s_i = \exp(\mathrm{mean}_t \log\rho_{i,t})`), plus
   ``kl_coef`` times the per-token ``kl_estimator`` (k3 by default) when ``kl_in="loss"``;
5. the reduction ``config.algorithm.loss``, each normalised over the **full** batch (so gradient
   accumulation and the data-parallel split give the same update):

   ==========  ===========================================================================
   ``grpo``    mean over sequences of each sequence's token mean (Shao et al., 2024, Eq. 3)
   ``dr_grpo`` token sum / (rows x ``max_new_tokens``), a constant (Liu et al., 2025)
   ``dapo``    token sum / the batch's response tokens (Yu et al., 2025, Eq. 8)
   ``bnpo``    as ``dapo``: TRL normalises by the *micro-batch's* tokens, which makes the update
               depend on how the batch is split; here the normaliser is the full batch's
   ==========  ===========================================================================

The ratio's "old" log-probs are the rollout's (computed by the same function the trainer uses),
so the update is on-policy: ratio 1, clip fraction 0, approx-KL 0 up to float rounding.

Metrics: ``loss``; ``policy/clipfrac``, ``policy/ratio``, ``policy/approx_kl``
(:math:`\tfrac12(\log\rho)^2` per token, old vs new), ``kl/ref`` (per-token k3 to the reference),
``kl/sequence`` (summed k1 of the sampled responses), ``advantages/mean``, ``advantages/abs``,
``rewards/mean`` (after the KL in the reward), ``groups/kept_fraction``, ``rollout/entropy``
(the policy's per-token entropy along the rollout, under the sampling transform, as PPO logs
it), the ``rollout/...``
metrics and timings of :mod:`prefjax.train.online`, and the norms of
:func:`prefjax.train.common.make_update`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import losses, rollout
from prefjax.train import common, loop, online
from prefjax.train import setup as train_setup
from prefjax.train.common import Batch, Objective

REDUCTIONS = ("grpo", "dr_grpo", "dapo", "bnpo")
ADVANTAGES = ("group", "group_mean", "rloo", "reinforce")

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "grpo"
HEAD = "lm"


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of a GRPO / RLOO / REINFORCE run."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # Loss reduction: "grpo" | "dr_grpo" | "dapo" | "bnpo" (see the module docstring).
    algo.loss = "grpo"
    # Advantage estimator: "group" (GRPO) | "group_mean" (Dr. GRPO) | "rloo" | "reinforce".
    algo.advantage = "group"
    # KL coefficient beta towards the reference (0 = no KL, no reference in memory).
    algo.kl_coef = 0.04
    # Where the KL goes: "loss" (GRPO, per token) | "reward" (subtracted from the score: the
    # KL-regularised objective whose optimum is pi_ref * exp(r / beta), exact with k1).
    algo.kl_in = "loss"
    # Per-token KL estimator: "k1" | "k2" | "k3".
    algo.kl_estimator = "k3"
    # Clip range of the importance ratio: [1 - epsilon_low, 1 + epsilon_high] (DAPO: 0.2/0.28).
    algo.epsilon_low = 0.2
    algo.epsilon_high = 0.2
    # Importance ratio per "token" (GRPO) or per "sequence" (GSPO).
    algo.ratio = "token"
    # Give groups whose scores all tie weight 0 (no learning signal; DAPO's filter).
    algo.drop_tied_groups = False
    online.add_rollout_fields(algo)
    return algo


def batch_kind(config: Any) -> str:
    """Online: prompts only; responses are sampled."""
    return "prompt"


def reference(config: Any) -> str:
    """The LoRA base under LoRA, a frozen copy when there is a KL term, else none."""
    if common.uses_lora(config):
        return "lora_base"
    return "copy" if config.algorithm.kl_coef > 0 else "none"


def validate_config(config: Any) -> None:
    """Start-up checks of the GRPO fields, each naming the field."""
    algo = config.algorithm
    for field, choices in (
        ("loss", REDUCTIONS),
        ("advantage", ADVANTAGES),
        ("kl_in", ("loss", "reward")),
        ("kl_estimator", tuple(losses.KL_ESTIMATORS)),
        ("ratio", ("token", "sequence")),
    ):
        if algo[field] not in choices:
            raise ValueError(f"config.algorithm.{field}={algo[field]!r}: expected one of {choices}")
    if algo.kl_coef < 0:
        raise ValueError(f"config.algorithm.kl_coef={algo.kl_coef!r}: must be >= 0")
    for field in ("epsilon_low", "epsilon_high"):
        if not algo[field] > 0:
            raise ValueError(f"config.algorithm.{field}={algo[field]!r}: must be > 0")
    if algo.advantage != "reinforce" and algo.num_samples < 2:
        raise ValueError(
            f"config.algorithm.num_samples={algo.num_samples}: advantage={algo.advantage!r} "
            "needs a group of at least 2 samples per prompt"
        )
    online.validate_rollout_fields(config)


def advantages(rewards: jax.Array, group_size: int, kind: str) -> jax.Array:
    """``[R]`` advantages of prompt-major rewards ``[R]`` (groups of ``group_size``)."""
    if kind == "group":
        return losses.group_advantages(rewards, group_size=group_size)
    if kind == "group_mean":
        return losses.group_advantages(rewards, group_size=group_size, normalize_std=False)
    if kind == "rloo":
        return losses.rloo_advantages(rewards, group_size=group_size)
    return rewards


def tied_groups(scores: jax.Array, group_size: int) -> jax.Array:
    """``[R]`` bool: the row's group has all-equal scores."""
    groups = scores.reshape(-1, group_size)  # [R] -> [B, G]
    tied = jnp.all(groups == groups[:, :1], axis=-1)  # [B]
    return jnp.repeat(tied, group_size)


def _logps(model, config, params, frozen, batch, key=None):
    """Trainer log-probs ``[R, N]`` of the rollout tokens (the sampler's function) and the
    policy's entropies ``[R, N]`` there (no gradient)."""
    base, lora = online.policy_of(params, frozen, common.uses_lora(config))
    return rollout.token_logprobs(
        model,
        base,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["tokens"],
        batch["response_mask"],
        lora=lora,
        key=key,
        entropy=True,
        **online.transform_of(config),
    )


def prepare(model: Any, config: Any) -> Any:
    """``prepare(batch, frozen) -> batch`` on the full rollout batch (no gradient): reference
    log-probs, rewards, group advantages and row weights, before the micro-batch split."""
    algo = config.algorithm
    g, coef = int(algo.num_samples), float(algo.kl_coef)

    def fn(batch: dict, frozen: Any) -> dict:
        mask = batch["response_mask"] * batch["weights"][:, None]
        if reference(config) == "none":
            ref = batch["old_logprobs"]  # no KL term: any value (it is multiplied by 0)
        else:
            ref_params = frozen  # the frozen copy, or the LoRA base with adapters off
            ref = rollout.token_logprobs(
                model,
                ref_params,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["tokens"],
                batch["response_mask"],
                **online.transform_of(config),
            )
        ref = jax.lax.stop_gradient(ref)
        seq_kl = online.sequence_kl(batch["old_logprobs"], ref, mask, algo.kl_estimator)
        rewards = batch["scores"]
        if algo.kl_in == "reward":
            rewards = rewards - coef * seq_kl
        adv = advantages(rewards, g, algo.advantage)
        keep = batch["weights"].astype(jnp.float32)
        if algo.drop_tied_groups:
            keep = keep * ~tied_groups(batch["raw_scores"], g)
        return {
            **batch,
            "ref_logprobs": ref,
            "advantages": adv,
            "rewards": rewards,
            "row_weights": keep,
            "sequence_kl": seq_kl,
        }

    return fn


def _denominators(config: Any):
    loss, budget = config.algorithm.loss, int(config.algorithm.max_new_tokens)

    def fn(batch: Batch) -> Mapping[str, jax.Array]:
        keep = batch["row_weights"]
        if loss == "grpo":
            den = jnp.sum(keep)
        elif loss == "dr_grpo":
            den = jnp.sum(batch["weights"].astype(jnp.float32)) * budget
        else:  # dapo, bnpo: the full batch's response tokens
            den = jnp.sum(batch["response_mask"] * keep[:, None])
        return {"loss": jnp.maximum(den, 1.0)}

    return fn


def objective(model: Any, config: Any) -> Objective:
    """The clipped surrogate (+ KL) on prepared rollout rows, reduced as ``algorithm.loss``."""
    algo = config.algorithm
    coef = float(algo.kl_coef) if algo.kl_in == "loss" else 0.0
    eps_low, eps_high = float(algo.epsilon_low), float(algo.epsilon_high)

    def fn(params, batch, frozen, key, denominators):
        logps, entropy = _logps(model, config, params, frozen, batch, key)  # [r, N] each
        keep = batch["row_weights"]
        m = (batch["response_mask"] > 0) & (keep[:, None] > 0)
        old = batch["old_logprobs"]
        if algo.ratio == "sequence":
            # GSPO: one ratio per sequence, exp of the mean token log-ratio, on every token.
            seq = losses.masked_mean(logps - old, m, axis=-1)  # [r]
            new_eff = jnp.broadcast_to(seq[:, None], logps.shape)
            old_eff = jnp.zeros_like(logps)
        else:
            new_eff, old_eff = logps, old
        out = losses.grpo_loss(
            new_eff,
            old_eff,
            old_eff,
            batch["advantages"],
            m,
            beta=0.0,
            epsilon_low=eps_low,
            epsilon_high=eps_high,
        )
        kl = losses.kl_estimate(logps, batch["ref_logprobs"], kind=algo.kl_estimator, mask=m)
        per_token = out.policy_loss + coef * kl
        if algo.loss == "grpo":
            total = jnp.sum(losses.masked_mean(per_token, m, axis=-1))
        else:
            total = losses.masked_sum(per_token, m)
        tokens = jnp.sum(m.astype(jnp.float32))
        rows = jnp.sum(keep)
        log_ratio = jnp.where(m, logps - old, 0.0)
        stats = {
            "policy/clipfrac": (losses.masked_sum(out.clipfrac, m), tokens),
            "policy/ratio": (losses.masked_sum(out.ratio, m), tokens),
            "policy/approx_kl": (jnp.sum(0.5 * jnp.square(log_ratio)), tokens),
            "kl/ref": (losses.masked_sum(losses.k3(logps, batch["ref_logprobs"], m), m), tokens),
            "kl/sequence": (jnp.sum(batch["sequence_kl"] * keep), rows),
            "advantages/mean": (jnp.sum(batch["advantages"] * keep), rows),
            "advantages/abs": (jnp.sum(jnp.abs(batch["advantages"]) * keep), rows),
            "rewards/mean": (jnp.sum(batch["rewards"] * keep), rows),
            "groups/kept_fraction": (rows, jnp.sum(batch["weights"].astype(jnp.float32))),
            # The policy's next-token entropy along its own samples, per token (PPO's name).
            "rollout/entropy": (losses.masked_sum(entropy, m), tokens),
        }
        return total / denominators["loss"], stats

    beta = float(algo.kl_coef) if algo.kl_coef > 0 else None
    return Objective(fn, _denominators(config), kl_coefficient=beta)


def make_update(model: Any, config: Any, *, mesh: Any = None, schedule: Any = None) -> Any:
    """``update(state, rollout_batch, frozen, key) -> (state, metrics)``, unjitted: :func:`prepare`
    on the full batch, then :func:`prefjax.train.common.make_update` of :func:`objective`."""
    inner = train_setup.make_train_step(
        sys.modules[__name__], model, config, mesh=mesh, schedule=schedule
    )
    prep = prepare(model, config)

    def update(state, batch, frozen, key):
        return inner(state, prep(batch, frozen), frozen, key)

    return update


def setup(config: Any, model: Any, mesh: Any, key: jax.Array) -> common.Setup:
    """The shared set-up (state, frozen tree, shardings) with the rollout-score-update step."""
    algorithm = sys.modules[__name__]
    base = train_setup.build_setup(config, model, mesh, key, algorithm)
    update = make_update(model, config, mesh=mesh, schedule=base.schedule)
    return online.online_setup(
        base,
        online.make_pipeline(config, model, mesh),
        online.jit_update(base, update),
        eval_stats=online.eval_kl_stats(model, config, reference(config) != "none"),
        finalize=common.means,
        seed=int(config.seed),
    )


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
