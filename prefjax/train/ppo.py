r"""PPO with GAE for language models: KL-shaped token rewards, a critic, clipped updates.

One PPO iteration turns a batch of rollouts -- prompts, the sampled responses and their scores
-- into ``algorithm.num_epochs x algorithm.num_minibatches`` optimiser steps, all inside one
jitted function (:func:`make_ppo_update`) driven by nested ``jax.lax.scan`` (epochs, then
shuffled minibatches, then ``optimizer.grad_accum_steps`` micro-batches):

1. **Scoring pass** (parameters before the update): the policy's log-probs of the response
   tokens :math:`\log\pi_{old}(y_t)`, the reference's :math:`\log\pi_{ref}(y_t)` and the critic's
   values :math:`V(s_t)`, computed with the very forward the update uses, in micro-batches of the
   update's size -- so the first minibatch's ratio is exactly 1 (clip fraction 0, approx-KL 0).
2. **KL-shaped rewards** (:func:`prefjax.losses.kl_shaped_rewards`): the score on the last real
   response token, :math:`-\beta\,\widehat{KL}_t` (``k1`` / ``k2`` / ``k3``) on every token, 0 on
   padding. :math:`\beta` is fixed, adaptive (:func:`prefjax.losses.adaptive_kl_update`, carried
   in :class:`PPOState`) or bounded by a KL budget: when a rollout exceeds it, either beta is
   raised or the run ends there (:func:`budget_stop`, the loop's ``Setup.should_stop``).
3. **GAE** (:func:`prefjax.losses.gae`), then advantages whitened over the batch's real tokens.
4. **Updates**: clipped surrogate + ``vf_coef`` x clipped value loss + entropy bonus, reduced
   with one of :data:`prefjax.losses.LOSS_REDUCTIONS` whose normaliser is computed on the whole
   minibatch before it is split, so gradient accumulation and data-parallel sharding give the
   same parameters.

Token arrays: a rollout is ``prompt_ids``/``prompt_mask`` ``[batch, prompt_len]`` (left-padded)
and ``tokens``/``response_mask`` ``[batch, N]`` (the N new tokens, padded after the token that
ended the row), ``scores`` ``[batch]``, as :func:`prefjax.train.online.rollout_batch` lays it out.
Every per-token array of this module is ``[batch, N]``, aligned with ``tokens``: the logits at
sequence position ``prompt_len - 1 + t`` score response token ``t``, and ``values[:, t]`` is
:math:`V` of the state in which token ``t`` is emitted. Generation stays outside the update.

The critic is a value head on the policy's trunk (``algorithm.critic="shared"``: one forward
gives logits and values, the value loss also shapes the trunk) or a separate transformer with a
value head (``"separate"``), trained with the policy or frozen (``algorithm.train_critic=False``).
:class:`PPOState` holds the policy (``params``, as every algorithm's state does, so evaluation,
export and LoRA work unchanged), the critic with its own optimiser state, and :math:`\beta`; the
frozen tree is the reference policy (the LoRA base under LoRA).

Metrics (see docs/online.md): ``rollout/*`` (score -- the gold reward with the gold source --,
KL to the reference, entropy, response length, sampler/trainer log-prob gap; the EOS, stop and
length-limit fractions come from :mod:`prefjax.train.online`), ``advantages/*``, ``returns/*``,
``values/*`` (explained variance), ``ppo/*`` (policy/value loss, clip fractions, approx-KL,
entropy, and the same for the first minibatch alone), ``kl/*`` (coefficient, budget), norms.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import losses
from prefjax import rollout as rollout_lib
from prefjax import sharding as shd
from prefjax.train import common, loop, online, optim
from prefjax.train.common import Metrics, Objective, Setup
from prefjax.train.state import TrainState

# The Algorithm protocol (see prefjax.train): what the launchers ask of this module.
NAME = "ppo"
HEAD = "lm"

KL_CONTROLS = ("fixed", "adaptive", "budget")
CRITICS = ("shared", "separate")
BUDGET_ACTIONS = ("stop", "raise")

Rollout = Mapping[str, jax.Array]


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of a PPO run: every field, its default and its unit."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # Clipped surrogate + clipped value loss + entropy bonus; the only value.
    algo.loss = "ppo"
    # Passes over each rollout batch (PPO epochs) and shuffled minibatches per pass.
    algo.num_epochs = 4
    algo.num_minibatches = 2
    # Policy clip range epsilon of the ratio (Schulman et al., 2017, Eq. 7).
    algo.clip_eps = 0.2
    # Value clip range, in reward units (0 = unclipped value loss).
    algo.value_clip_eps = 0.2
    # Weight of the value loss and of the entropy bonus in the total loss.
    algo.vf_coef = 0.1
    algo.entropy_coef = 0.0
    # Discount and GAE lambda over response tokens.
    algo.gamma = 1.0
    algo.gae_lambda = 0.95
    # Whiten advantages over the real tokens of the rollout batch.
    algo.whiten_advantages = True
    # Per-token loss reduction: "token_mean" | "sequence_mean" | "constant_mean".
    algo.loss_reduction = "token_mean"
    # KL penalty in the reward: initial beta, estimator ("k1" | "k2" | "k3").
    algo.kl_coef = 0.05
    algo.kl_estimator = "k1"
    # Beta control: "fixed" | "adaptive" (Ziegler et al.: towards kl_target) | "budget".
    algo.kl_control = "fixed"
    # Adaptive control: target KL (nats per response) and horizon (responses).
    algo.kl_target = 1.0
    algo.kl_horizon = 1000.0
    # Budget control: KL (nats per response) above which the run stops ("stop": the rollout's
    # update is dropped and the run ends at that step, checkpointed, like trl/OpenRLHF's early
    # stop on KL) or beta is multiplied by kl_budget_factor ("raise").
    algo.kl_budget = 5.0
    algo.kl_budget_action = "raise"
    algo.kl_budget_factor = 2.0
    # Critic: "shared" (value head on the policy trunk) | "separate" (its own transformer).
    algo.critic = "shared"
    # Train the critic; False keeps a separate critic frozen (values still used by GAE).
    algo.train_critic = True
    # Sampling (num_samples responses per prompt, temperature / top-k / top-p, replayed by the
    # trainer) and the reward source: the fields every online algorithm shares.
    online.add_rollout_fields(algo)
    algo.num_samples = 1
    return algo


def batch_kind(config: Any) -> str:
    """PPO reads prompts and samples its own responses."""
    return "prompt"


def reference(config: Any) -> str:
    return "lora_base" if common.uses_lora(config) else "copy"


def _hparams_error(field: str, value: Any, want: str) -> ValueError:
    return ValueError(f"config.algorithm.{field}={value!r}: {want}")


def validate_config(config: Any) -> None:
    """Start-up checks of the PPO fields, each error naming the field."""
    a = config.algorithm
    if a.loss != "ppo":
        raise _hparams_error("loss", a.loss, "PPO's loss is 'ppo'.")
    online.validate_rollout_fields(config)
    for field in ("num_epochs", "num_minibatches"):
        if int(a[field]) < 1:
            raise _hparams_error(field, a[field], "must be >= 1.")
    if not 0.0 < a.clip_eps < 1.0:
        raise _hparams_error("clip_eps", a.clip_eps, "must be in (0, 1).")
    for field in ("value_clip_eps", "vf_coef", "entropy_coef", "kl_coef"):
        if a[field] < 0:
            raise _hparams_error(field, a[field], "must be >= 0.")
    for field in ("gamma", "gae_lambda"):
        if not 0.0 <= a[field] <= 1.0:
            raise _hparams_error(field, a[field], "must be in [0, 1].")
    if a.loss_reduction not in losses.LOSS_REDUCTIONS:
        raise _hparams_error(
            "loss_reduction", a.loss_reduction, f"expected one of {sorted(losses.LOSS_REDUCTIONS)}."
        )
    if a.kl_estimator not in losses.KL_ESTIMATORS:
        raise _hparams_error(
            "kl_estimator", a.kl_estimator, f"expected one of {sorted(losses.KL_ESTIMATORS)}."
        )
    if a.kl_control not in KL_CONTROLS:
        raise _hparams_error("kl_control", a.kl_control, f"expected one of {KL_CONTROLS}.")
    if a.kl_control == "adaptive" and not (a.kl_target > 0 and a.kl_horizon > 0):
        raise _hparams_error("kl_target", a.kl_target, "and kl_horizon must be > 0.")
    if a.kl_control == "budget":
        if a.kl_budget <= 0:
            raise _hparams_error("kl_budget", a.kl_budget, "must be > 0.")
        if a.kl_budget_action not in BUDGET_ACTIONS:
            raise _hparams_error(
                "kl_budget_action", a.kl_budget_action, f"expected one of {BUDGET_ACTIONS}."
            )
        if a.kl_budget_action == "raise" and a.kl_budget_factor <= 1:
            raise _hparams_error("kl_budget_factor", a.kl_budget_factor, "must be > 1.")
    if a.critic not in CRITICS:
        raise _hparams_error("critic", a.critic, f"expected one of {CRITICS}.")
    if a.critic == "shared" and not a.train_critic:
        raise _hparams_error(
            "train_critic", a.train_critic, "a shared value head trains with the policy."
        )
    rollouts = config.data.batch_size * a.num_samples
    per_mini, rem = divmod(rollouts, a.num_minibatches)
    if rem:
        raise _hparams_error(
            "num_minibatches",
            a.num_minibatches,
            f"must divide the rollout batch data.batch_size x num_samples = {rollouts}.",
        )
    if per_mini % config.optimizer.grad_accum_steps:
        raise ValueError(
            f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}: must divide "
            f"the PPO minibatch of {per_mini} rollouts."
        )
    if config.data.task == "bandit" and a.max_new_tokens != 1:
        raise _hparams_error("max_new_tokens", a.max_new_tokens, "the bandit's arms are 1 token.")


@dataclasses.dataclass(frozen=True)
class PPOHparams:
    """The static hyperparameters :func:`make_ppo_update` closes over (from ``config``)."""

    num_epochs: int = 4
    num_minibatches: int = 2
    grad_accum: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    loss_reduction: str = "token_mean"
    kl_estimator: str = "k1"
    kl_control: str = "fixed"
    kl_target: float = 1.0
    kl_horizon: float = 1000.0
    kl_budget: float = 5.0
    kl_budget_action: str = "raise"
    kl_budget_factor: float = 2.0
    critic: str = "shared"
    train_critic: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling transform the trainer replays."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    @classmethod
    def from_config(cls, config: Any) -> PPOHparams:
        a = config.algorithm
        names = [f.name for f in dataclasses.fields(cls) if f.name != "grad_accum"]
        kw = {n: a[n] for n in names}
        return cls(grad_accum=int(config.optimizer.grad_accum_steps), **kw)


class PPOState(TrainState):
    """``TrainState`` (``params`` are the policy's: its weights, or LoRA adapters) plus the
    critic and the KL coefficient, all checkpointed together.

    Attributes:
      value_params: the value head on the policy trunk (``critic="shared"``) or the separate
        critic's network.
      value_opt_state: ``value_tx``'s state (empty for a frozen critic).
      value_tx: the critic's optimiser (static); ``optax.set_to_zero()`` freezes it.
      kl_coef: :math:`\beta` (moved by adaptive or budget control).

    ``step`` counts optimiser steps (minibatch updates), one per step of both optimisers.
    """

    value_params: Any = None
    value_opt_state: Any = None
    value_tx: optax.GradientTransformation | None = struct.field(pytree_node=False, default=None)
    kl_coef: jax.Array | None = None

    def apply_ppo_gradients(self, grads: Any, value_grads: Any) -> tuple[PPOState, Any]:
        """One step of both optimisers; returns the new state and the policy's update."""
        new, updates = self.apply_gradients(grads)
        value_updates, value_opt_state = self.value_tx.update(
            value_grads, self.value_opt_state, self.value_params
        )
        value_params = optax.apply_updates(self.value_params, value_updates)
        return new.replace(value_params=value_params, value_opt_state=value_opt_state), updates


def create_ppo_state(
    params: Any,
    tx: optax.GradientTransformation,
    value_params: Any,
    value_tx: optax.GradientTransformation,
    kl_coef: float,
) -> PPOState:
    """A fresh :class:`PPOState` at step 0."""
    return PPOState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        tx=tx,
        value_params=value_params,
        value_opt_state=value_tx.init(value_params),
        value_tx=value_tx,
        kl_coef=losses.adaptive_kl_init(kl_coef).kl_coef,
    )


# ----------------------------------------------------------------------------------------------
# The forward: response log-probs, entropies and values
# ----------------------------------------------------------------------------------------------


def value_head_init(model: Any, key: jax.Array) -> Any:
    """Fresh value-head parameters (``kernel [D, 1]``, ``bias [1]``) for ``model``'s trunk."""
    return model.with_head("value", key=key).params["value_head"]


def _value_of(hidden: jax.Array, head: Any) -> jax.Array:
    """``[B, N, D] -> [B, N]`` float32 values of the hidden states through the value head."""
    kernel = head["kernel"].astype(jnp.float32)[:, 0]  # [D, 1] -> [D]
    return jnp.einsum("bnd,d->bn", hidden.astype(jnp.float32), kernel) + head["bias"][0]


def sequences(rollout: Rollout) -> tuple[jax.Array, jax.Array]:
    """``(input_ids, attention_mask)`` ``[batch, prompt_len + N]``: prompt then response."""
    ids = jnp.concatenate([rollout["prompt_ids"], rollout["tokens"]], axis=1)
    attn = jnp.concatenate([rollout["prompt_mask"], rollout["response_mask"]], axis=1)
    return ids.astype(jnp.int32), attn.astype(jnp.int32)


def response_outputs(
    model: Any,
    params: Any,
    rollout: Rollout,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lora: Any = None,
    value_head: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Log-probs ``[B, N]`` of the response tokens under the sampling distribution
    (:func:`prefjax.rollout.transform_logits`: temperature, top-k, top-p), the entropies
    ``[B, N]`` of those distributions and, with ``value_head``, the values ``[B, N]`` read from
    the same trunk pass."""
    ids, attn = sequences(rollout)
    p, n = rollout["prompt_ids"].shape[1], rollout["tokens"].shape[1]
    hidden = model.hidden_states(params, ids, attn, lora=lora)  # [B, P + N, D]
    # Positions P - 1 .. P + N - 2 predict the response tokens: [B, P + N, D] -> [B, N, D].
    hidden = hidden[:, p - 1 : p - 1 + n]
    logits = jnp.einsum(
        "bnd,dv->bnv", hidden, model.unembedding(params), preferred_element_type=jnp.float32
    )
    tokens = rollout["tokens"].astype(jnp.int32)
    # The sampling transform, replayed (the sampled token is never dropped).
    logits = rollout_lib.transform_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, keep=tokens
    )
    logps = losses.token_logprobs(logits, tokens)
    values = None if value_head is None else _value_of(hidden, value_head)
    return logps, losses.entropy(logits), values


def _critic_values(critic: Any, critic_params: Any, rollout: Rollout) -> jax.Array:
    """``[B, N]`` values of a separate value-head transformer at the response states."""
    ids, attn = sequences(rollout)
    p, n = rollout["prompt_ids"].shape[1], rollout["tokens"].shape[1]
    return critic.apply(critic_params, ids, attn)[:, p - 1 : p - 1 + n]  # [B, P + N] -> [B, N]


def _unsplit(x: jax.Array) -> jax.Array:
    """Inverse of :func:`prefjax.train.optim.split_micro_batches`: ``[n, b, ...] -> [n b, ...]``."""
    # [n, b, ...] -> [b, n, ...] -> [b * n, ...]: row k * n + j was micro-batch j's k-th row.
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# ----------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------


def _loss_weights(mask: jax.Array, rows: jax.Array, reduction: str) -> jax.Array:
    """``[B, N]`` per-token weights whose weighted sum is ``reduction`` of a per-token loss over
    the (whole) minibatch's real rows (``rows`` ``[B]`` 1/0): computed before the minibatch is
    split, so accumulation and sharding are exact."""
    mask = mask.astype(jnp.float32)
    num_rows = jnp.maximum(jnp.sum(rows), 1.0)
    if reduction == "token_mean":
        return mask / jnp.maximum(jnp.sum(mask), 1.0)
    if reduction == "sequence_mean":
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)  # [B, 1]
        return mask / (lengths * num_rows)
    return mask / (num_rows * mask.shape[1])  # constant_mean: sum / (B * N)


def _masked_moments(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = losses.masked_mean(x, mask)
    return mean, jnp.sqrt(jnp.maximum(losses.masked_mean(jnp.square(x - mean), mask), 0.0))


def _next_kl_coef(hp: PPOHparams, kl_coef: jax.Array, kl: jax.Array, n: int) -> jax.Array:
    """:math:`\\beta` after a rollout whose mean KL per response is ``kl``."""
    if hp.kl_control == "adaptive":
        state = losses.adaptive_kl_update(
            losses.AdaptiveKLState(kl_coef),
            kl,
            target=hp.kl_target,
            horizon=hp.kl_horizon,
            n_steps=n,
        )
        return state.kl_coef
    if hp.kl_control == "budget" and hp.kl_budget_action == "raise":
        return jnp.where(kl > hp.kl_budget, kl_coef * hp.kl_budget_factor, kl_coef)
    return kl_coef


def budget_stop(hp: PPOHparams) -> Callable[[Mapping[str, float]], str | None] | None:
    """The run's stop condition (``Setup.should_stop``) under ``kl_control="budget"`` with
    ``kl_budget_action="stop"``: the first rollout whose mean KL per response exceeded
    ``kl_budget`` (``kl/over_budget`` = 1; the update dropped that rollout) ends the run at that
    step. ``None`` (never stop early) for every other KL control."""
    if hp.kl_control != "budget" or hp.kl_budget_action != "stop":
        return None

    def should_stop(metrics: Mapping[str, float]) -> str | None:
        if not metrics.get("kl/over_budget", 0.0):
            return None
        return (
            f"rollout KL {metrics['rollout/kl']:.4g} nats per response exceeded "
            f"algorithm.kl_budget={hp.kl_budget:g} (kl_budget_action='stop'; that rollout's "
            "update was dropped, so the checkpoint holds the last policy within the budget)"
        )

    return should_stop


class Targets(NamedTuple):
    """What :func:`ppo_targets` computes from a scored rollout; every field ``[batch, N]``."""

    shaped: losses.ShapedRewards  # per-token rewards and KL estimates
    raw_advantages: jax.Array  # GAE advantages before whitening
    advantages: jax.Array  # the advantages the policy loss uses (whitened if asked)
    returns: jax.Array  # the value targets, raw advantages + values


def ppo_targets(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    kl_coef: jax.Array | float,
    hp: PPOHparams,
) -> Targets:
    r"""KL-shaped rewards, GAE advantages and returns of a rollout.

    .. math::
        r_t = -\beta\,\widehat{KL}_t + [t = T_{last}]\,s, \qquad
        \hat A = \mathrm{GAE}_{\gamma,\lambda}(r, V), \qquad R_t = \hat A_t + V_t

    then :math:`\hat A` whitened over the real tokens when ``hp.whiten_advantages``; padding
    (``mask`` 0) gets 0 everywhere.

    Args:
      scores: ``[batch]`` sequence scores.
      logprobs, ref_logprobs: ``[batch, N]`` log-probs of the sampled tokens under the policy
        that sampled them and under the reference.
      values: ``[batch, N]`` critic values at rollout time.
      mask: ``[batch, N]``, 1 on response tokens.
      kl_coef: :math:`\beta`.
      hp: the estimator, ``gamma``, ``gae_lambda`` and whitening.
    """
    shaped = losses.kl_shaped_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, kind=hp.kl_estimator
    )
    advantages, returns = losses.gae(
        shaped.rewards, values, mask, gamma=hp.gamma, lam=hp.gae_lambda
    )
    used = losses.masked_whiten(advantages, mask) if hp.whiten_advantages else advantages
    return Targets(shaped, advantages, used, returns)


def make_ppo_update(
    model: Any,
    hp: PPOHparams,
    *,
    critic: Any = None,
    lora: bool = False,
    schedule: optax.Schedule | None = None,
    constrain: Callable[[Any], Any] | None = None,
) -> Callable[[PPOState, Rollout, Any, jax.Array], tuple[PPOState, Metrics]]:
    """Builds ``update(state, rollout, frozen, key) -> (state, metrics)``, unjitted.

    Args:
      model: the policy (LM head).
      hp: :class:`PPOHparams`.
      critic: the separate critic ``Model`` (value head) when ``hp.critic == "separate"``.
      lora: ``state.params`` are LoRA adapters on ``frozen`` (the base, which with adapters
        off is the reference).
      schedule: the learning-rate schedule, for the ``learning_rate`` metric.
      constrain: sharding constraint applied to each micro-batch (keeps it split over
        ``data x fsdp``).

    The rollout (:func:`prefjax.train.online.rollout_batch`'s layout): ``prompt_ids``,
    ``prompt_mask`` ``[B, P]``; ``tokens``, ``response_mask`` ``[B, N]``; ``scores`` ``[B]``;
    optional ``weights`` ``[B]`` (0 for a padding row: it counts nowhere) and the sampler's
    ``old_logprobs`` ``[B, N]`` (only compared with the scoring pass). ``frozen`` is the
    reference policy's parameters (the LoRA base under ``lora``).
    """
    shared = hp.critic == "shared"

    def forward(params, value_params, frozen, batch):
        """Policy log-probs, entropies and values of a (micro-)batch."""
        if not hp.train_critic:
            value_params = jax.lax.stop_gradient(value_params)
        policy, adapters = (frozen, params) if lora else (params, None)
        logps, ent, values = response_outputs(
            model,
            policy,
            batch,
            **hp.sampling,
            lora=adapters,
            value_head=value_params if shared else None,
        )
        if not shared:
            values = _critic_values(critic, value_params, batch)
        return logps, ent, values

    def score_pass(state, frozen, rollout, micro_size):
        """Old log-probs, reference log-probs, values, entropies ``[B, N]``, computed in
        micro-batches of the update's shape (so the update's first ratios are exactly 1)."""
        n_chunks = rollout["tokens"].shape[0] // micro_size
        chunks = optim.split_micro_batches(rollout, n_chunks)

        def one(chunk):
            chunk = constrain(chunk) if constrain is not None else chunk
            logps, ent, values = forward(state.params, state.value_params, frozen, chunk)
            ref, _, _ = response_outputs(model, frozen, chunk, **hp.sampling)
            return logps, ref, values, ent

        return jax.tree.map(_unsplit, jax.lax.map(one, chunks))

    def micro_loss(trainable, micro, frozen):
        logps, ent, values = forward(*trainable, frozen, micro)
        mask, w = micro["response_mask"], micro["loss_weights"]
        pol = losses.ppo_policy_loss(
            logps, micro["old_logprobs"], micro["advantages"], mask, clip_eps=hp.clip_eps
        )
        vl = losses.value_loss(
            values,
            micro["old_values"],
            micro["returns"],
            mask,
            clip_eps=hp.value_clip_eps or None,
        )
        bonus = losses.entropy_bonus(ent, mask, entropy_coef=hp.entropy_coef)
        loss = jnp.sum((pol.loss + hp.vf_coef * vl.loss + bonus) * w)
        tokens = jnp.sum(mask)
        tok = lambda x: (losses.masked_sum(x, mask), tokens)
        stats = {
            "ppo/policy_loss": tok(pol.loss),
            "ppo/value_loss": tok(vl.loss),
            "ppo/clipfrac": tok(pol.clipfrac),
            "ppo/value_clipfrac": tok(vl.clipfrac),
            "ppo/approx_kl": tok(pol.approx_kl),
            "ppo/entropy": tok(ent),
            "ppo/ratio": tok(pol.ratio),
            # max |ratio - 1| of the micro-batch (summed over micro-batches: an upper bound).
            "ppo/ratio_max_dev": (
                jnp.max(jnp.where(mask > 0, jnp.abs(pol.ratio - 1.0), 0.0)),
                jnp.ones((), jnp.float32),
            ),
        }
        return loss, stats

    def minibatch_step(data, frozen, key, st, idx):
        batch = jax.tree.map(lambda x: x[idx], data)  # [mini, ...]
        batch["loss_weights"] = _loss_weights(
            batch["response_mask"], batch["row_weights"], hp.loss_reduction
        )
        loss, (grads, value_grads), stats = optim.accumulate_gradients(
            lambda p, b, k: micro_loss(p, b, frozen),
            (st.params, st.value_params),
            batch,
            key,
            hp.grad_accum,
            constrain=constrain,
        )
        grad_norm = common.tree_norm(grads)
        value_grad_norm = common.tree_norm(value_grads)
        # A non-finite loss or gradient never reaches the weights (the step still counts).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(value_grad_norm)
        new, update_norm = common.apply_if_finite(
            ok, st, lambda s: s.apply_ppo_gradients(grads, value_grads)
        )
        out = {
            "stats": {**stats, "ppo/loss": (loss, jnp.ones((), jnp.float32))},
            "grad_norm": grad_norm,
            "value_grad_norm": value_grad_norm,
            "update_norm": update_norm,
            "skipped": (~ok).astype(jnp.float32),
        }
        return new, out

    def update(
        state: PPOState, rollout: Rollout, frozen: Any, key: jax.Array
    ) -> tuple[PPOState, Metrics]:
        key = jax.random.fold_in(key, state.step)
        size = rollout["tokens"].shape[0]
        mini = size // hp.num_minibatches
        micro = mini // hp.grad_accum
        rows = rollout.get("weights", jnp.ones((size,), jnp.float32)).astype(jnp.float32)
        mask = rollout["response_mask"].astype(jnp.float32) * rows[:, None]
        scores = rollout["scores"].astype(jnp.float32)
        inputs = {k: rollout[k] for k in ("prompt_ids", "prompt_mask", "tokens")}
        inputs["response_mask"] = mask

        # 1. The scoring pass with the parameters before the update.
        old_logps, ref_logps, old_values, old_ent = score_pass(state, frozen, inputs, micro)
        # 2-3. KL-shaped rewards, GAE, whitening.
        targets = ppo_targets(scores, old_logps, ref_logps, old_values, mask, state.kl_coef, hp)
        data = {
            **inputs,
            "row_weights": rows,
            "old_logprobs": old_logps,
            "old_values": old_values,
            "advantages": targets.advantages,
            "returns": targets.returns,
        }

        # 4. Epochs x shuffled minibatches (x micro-batches inside accumulate_gradients).
        def epoch_step(st, epoch_key):
            perm = jax.random.permutation(epoch_key, size)
            step = lambda s, idx: minibatch_step(data, frozen, epoch_key, s, idx)
            return jax.lax.scan(step, st, perm.reshape(hp.num_minibatches, mini))

        new_state, per_step = jax.lax.scan(
            epoch_step, state, jax.random.split(key, hp.num_epochs)
        )  # every leaf of per_step: [num_epochs, num_minibatches, ...]

        # 5. The KL coefficient for the next rollout.
        seq_kl = jnp.sum(targets.shaped.kl, axis=1)  # [B] nats per response
        kl_mean = common.safe_div(jnp.sum(seq_kl * rows), jnp.sum(rows))
        new_state = new_state.replace(
            kl_coef=_next_kl_coef(hp, state.kl_coef, kl_mean, jnp.sum(rows))
        )
        if hp.kl_control == "budget" and hp.kl_budget_action == "stop":
            # Over the budget the update is dropped: the policy and critic stay as they are.
            over = kl_mean > hp.kl_budget
            new_state = optim.select_tree(over, state.replace(step=new_state.step), new_state)
        metrics = _update_metrics(per_step)
        metrics.update(_rollout_metrics(state, rollout, targets, mask, rows, old_values, old_ent))
        metrics["rollout/kl"] = kl_mean
        if "old_logprobs" in rollout:
            gap = jnp.abs(rollout["old_logprobs"] - old_logps)
            metrics["rollout/sampler_logprob_gap"] = jnp.max(jnp.where(mask > 0, gap, 0.0))
        if hp.kl_control == "budget":
            metrics["kl/over_budget"] = (kl_mean > hp.kl_budget).astype(jnp.float32)
        metrics["param_norm"] = common.tree_norm(new_state.params)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    return update


def _update_metrics(per_step: Mapping[str, Any]) -> Metrics:
    """Means over every minibatch step, and the first minibatch's alone (``ppo/first/*``)."""
    stats = dict(per_step["stats"])
    max_dev = stats.pop("ppo/ratio_max_dev")[0]  # [num_epochs, num_minibatches]
    metrics = common.means({n: (jnp.sum(s), jnp.sum(c)) for n, (s, c) in stats.items()})
    for name in ("clipfrac", "approx_kl", "ratio"):
        s, c = stats[f"ppo/{name}"]
        metrics[f"ppo/first/{name}"] = common.safe_div(s[0, 0], c[0, 0])
    metrics["ppo/first/ratio_max_dev"] = max_dev[0, 0]
    metrics["ppo/ratio_max_dev"] = jnp.max(max_dev)
    for name in ("grad_norm", "value_grad_norm", "update_norm"):
        metrics[name] = jnp.mean(per_step[name])
    metrics["train/skipped"] = jnp.sum(per_step["skipped"])
    return metrics


def _rollout_metrics(state, rollout, targets, mask, rows, old_values, old_ent) -> Metrics:
    """What practitioners watch about the batch: score, KL, entropy, advantages, returns."""
    n = jnp.sum(rows)
    mean_rows = lambda x: common.safe_div(jnp.sum(x * rows), n)
    seq_kl = jnp.sum(targets.shaped.kl, axis=1)
    adv_mean, adv_std = _masked_moments(targets.raw_advantages, mask)
    ret_mean, ret_std = _masked_moments(targets.returns, mask)
    _, resid_std = _masked_moments(targets.returns - old_values, mask)
    return {
        "rollout/score": mean_rows(rollout["scores"].astype(jnp.float32)),
        "rollout/kl_per_token": losses.masked_mean(targets.shaped.kl, mask),
        "rollout/non_score_reward": mean_rows(-state.kl_coef * seq_kl),
        "rollout/entropy": losses.masked_mean(old_ent, mask),
        "rollout/length": mean_rows(jnp.sum(mask, axis=1)),
        "advantages/mean": adv_mean,
        "advantages/std": adv_std,
        "returns/mean": ret_mean,
        "returns/std": ret_std,
        "values/mean": losses.masked_mean(old_values, mask),
        "values/explained_variance": 1.0 - common.safe_div(resid_std**2, ret_std**2),
        "kl/coef": state.kl_coef,
    }


# ----------------------------------------------------------------------------------------------
# Shardings and jitting
# ----------------------------------------------------------------------------------------------


def value_axes(model: Any, hp: PPOHparams, *, critic: Any = None) -> Any:
    """Logical axis names of ``PPOState.value_params``."""
    if hp.critic == "shared":
        return model.with_head("value").param_axes["value_head"]
    return critic.param_axes


def state_sharding(
    mesh: Mesh,
    tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
    params: Any,
    params_sharding: Any,
    value_params: Any,
    value_sharding: Any,
) -> PPOState:
    """:class:`PPOState` of shardings: moments follow their params, counters replicate."""
    policy = common.state_sharding(mesh, tx, params, params_sharding)
    value = common.state_sharding(mesh, value_tx, value_params, value_sharding)
    return PPOState(
        step=policy.step,
        params=policy.params,
        opt_state=policy.opt_state,
        tx=tx,
        value_params=value.params,
        value_opt_state=value.opt_state,
        value_tx=value_tx,
        kl_coef=shd.replicated(mesh),
    )


def create_sharded_state(
    mesh: Mesh,
    tx: optax.GradientTransformation,
    value_tx: optax.GradientTransformation,
    params: Any,
    params_sharding: Any,
    value_params: Any,
    value_sharding: Any,
    kl_coef: float,
) -> tuple[PPOState, PPOState]:
    """A sharded :class:`PPOState` (optimiser states born sharded) and its sharding pytree."""
    sharding = state_sharding(
        mesh, tx, value_tx, params, params_sharding, value_params, value_sharding
    )
    params = jax.device_put(params, params_sharding)
    value_params = jax.device_put(value_params, value_sharding)
    create = jax.jit(
        lambda p, v: create_ppo_state(p, tx, v, value_tx, kl_coef),
        in_shardings=(params_sharding, value_sharding),
        out_shardings=sharding,
    )
    return create(params, value_params), sharding


def jit_update(
    update: Callable[..., Any], mesh: Mesh, state_shard: PPOState, frozen_shard: Any
) -> Callable[..., Any]:
    """``jax.jit`` of :func:`make_ppo_update`'s function: rollouts split over ``data x fsdp``,
    explicit state/frozen shardings, the state donated."""
    rollout_shard = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))
    repl = shd.replicated(mesh)
    return jax.jit(
        shd.with_activation_sharding(mesh, update),
        in_shardings=(state_shard, rollout_shard, frozen_shard, repl),
        out_shardings=(state_shard, repl),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------------------------
# The set-up the loop trains with: rollout -> score -> update
# ----------------------------------------------------------------------------------------------


def _needs_rollouts(*args: Any) -> Any:
    raise TypeError("PPO's objective is computed on rollouts: use ppo.setup's train_step")


def objective(model: Any, config: Any) -> Objective:
    """The objective's KL coefficient (for the bandit's closed-form optimum): PPO's loss is on
    rollouts, inside :func:`setup`'s train step."""
    return Objective(
        _needs_rollouts, _needs_rollouts, common.means, float(config.algorithm.kl_coef)
    )


def setup(config: Any, model: Any, mesh: Mesh, key: jax.Array) -> Setup:
    """Sharded :class:`PPOState` (policy, critic, beta), the frozen reference, and the online
    train step: sample and score a prompt batch (:mod:`prefjax.train.online`), then one jitted
    :func:`make_ppo_update`. The critic starts from the policy's trunk (``"separate"``: a copy
    of the trunk with a fresh value head; ``"shared"``: a value head on the policy itself)."""
    hp = PPOHparams.from_config(config)
    rules = shd.rules_from_config(config.mesh)
    steps = config.train.num_steps * hp.num_epochs * hp.num_minibatches
    tx, schedule = optim.make_optimizer(config.optimizer, steps)
    value_tx = tx if hp.train_critic else optax.set_to_zero()
    policy_key, value_key = jax.random.split(key)
    lora = common.uses_lora(config)
    if lora:
        lc = config.model.lora
        trainable = model.init_lora(
            policy_key,
            rank=lc.rank,
            alpha=float(lc.alpha),
            targets=tuple(lc.targets),
            dropout=float(lc.dropout),
        )
        trainable_axes = model.lora_axes(trainable)
        policy_params = lambda params, frozen: model.merge_lora(frozen, params)
    else:
        trainable, trainable_axes = model.params, model.param_axes
        policy_params = lambda params, frozen: params
    critic = None if hp.critic == "shared" else model.with_head("value", key=value_key)
    if critic is None:
        value = value_head_init(model, value_key)
    else:
        value = critic.params
    params_sharding = shd.param_shardings(mesh, trainable_axes, trainable, rules)
    value_sharding = shd.param_shardings(mesh, value_axes(model, hp, critic=critic), value, rules)
    # Fresh copies: the state is donated to every update, the reference keeps model.params.
    trainable = jax.device_put(trainable, params_sharding, may_alias=False)
    value = jax.device_put(value, value_sharding, may_alias=False)
    state, state_shard = create_sharded_state(
        mesh,
        tx,
        value_tx,
        trainable,
        params_sharding,
        value,
        value_sharding,
        float(config.algorithm.kl_coef),
    )
    frozen_sharding = shd.param_shardings(mesh, model.param_axes, model.params, rules)
    frozen = jax.device_put(model.params, frozen_sharding, may_alias=True)
    update = make_ppo_update(
        model,
        hp,
        critic=critic,
        lora=lora,
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )
    base = Setup(
        state=state,
        frozen=frozen,
        train_step=None,
        eval_step=None,
        mesh=mesh,
        state_sharding=state_shard,
        frozen_sharding=frozen_sharding,
        batch_sharding=NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES)),
        schedule=schedule,
        model=model,
        policy_params=policy_params,
        objective=objective(model, config),
        reference=frozen,
        should_stop=budget_stop(hp),
        info={
            "reference": reference(config),
            "critic": hp.critic,
            "trainable_params": common.count_params(trainable),
            "critic_params": common.count_params(value),
            "frozen_params": common.count_params(frozen),
            "mesh": dict(mesh.shape),
        },
    )
    return online.online_setup(
        base,
        online.make_pipeline(config, model, mesh),
        jit_update(update, mesh, state_shard, frozen_sharding),
        eval_stats=online.eval_kl_stats(model, config, True),
        finalize=common.means,
        seed=int(config.seed),
    )


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
