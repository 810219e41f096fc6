r"""Online DPO: preference pairs sampled from the current policy, ranked by a reward source.

Every step (:mod:`prefjax.train.online`): sample ``K = num_samples`` responses to each prompt from
the current policy, score them with the reward source, and turn each prompt's group into a
preference example -- the highest-scored sample as *chosen* and the lowest as *rejected* (a
``[batch, 2, seq]`` pair), or all ``K`` ordered best first (``loss="listwise"``, ``[batch, K,
seq]``); a group whose scores all tie carries no preference and gets weight 0. With
``labels="bradley_terry"`` the order is drawn instead of read: the scores plus independent
Gumbel(0, 1) noise are ranked, so a pair (``K = 2``) is labelled
:math:`P(a \succ b) = \sigma(r_a - r_b)` (the difference of two Gumbels is logistic) and a ranking
of ``K`` is a Plackett-Luce draw (the Gumbel-max trick) -- the preference model DPO is derived
from, whose population optimum is :math:`\pi^* \propto \pi_{ref}\, e^{r/\beta}` (with
deterministic ranked labels each pair's loss falls forever as its margin grows: no finite
optimum). Then the DPO step itself: :func:`prefjax.train.dpo.objective` (any
``prefjax.losses.PAIRWISE_LOSSES`` entry, or listwise Plackett-Luce), accumulated and applied by
:func:`prefjax.train.common.make_update` (Guo et al., 2024, "Direct Language Model Alignment
from Online AI Feedback").

Metrics: DPO's (``rewards/chosen`` is the implicit reward of the *higher-scored* sample,
``rewards/accuracy``, ``logps/chosen`` ...), ``score/chosen`` and ``score/rejected`` (the
source's scores of the pair, noise-free; ``score/chosen >= score/rejected`` by construction with
ranked labels), ``pairs/kept_fraction``, and the ``rollout/...`` metrics of
:mod:`prefjax.train.online`; DPO's ``entropy/response`` only with ``algorithm.train_entropy``.
The held-out evaluation adds ``rollout/entropy`` (recorded as ``eval/rollout/entropy``: the
policy's next-token entropy per token of its held-out samples) to ``kl/sampled``.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import losses, rollout
from prefjax.train import common, dpo, loop, online
from prefjax.train import setup as train_setup

LOSSES = (*losses.PAIRWISE_LOSSES, "listwise")
REFERENCES = ("copy", "lora_base")
LABELS = ("ranked", "bradley_terry")

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "online_dpo"
HEAD = "lm"


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm``: DPO's fields (loss, beta, ...) and the rollout fields."""
    algo = dpo.default_config()
    algo.name = NAME
    # How a group is ordered: "ranked" (by score: chosen = highest, rejected = lowest) |
    # "bradley_terry" (by score + Gumbel(0, 1) noise: Bradley-Terry pairs, Plackett-Luce rankings).
    algo.labels = "ranked"
    online.add_rollout_fields(algo)
    return algo


def batch_kind(config: Any) -> str:
    """Online: prompts only; the pairs are sampled."""
    return "prompt"


def reference(config: Any) -> str:
    return config.algorithm.reference


def validate_config(config: Any) -> None:
    """DPO's checks, plus: a loss that takes sampled pairs or rankings, a reference in memory
    (the samples are new every step, so nothing can be precomputed), two samples at least."""
    algo = config.algorithm
    if algo.loss not in LOSSES:
        raise ValueError(f"config.algorithm.loss={algo.loss!r}: expected one of {LOSSES}")
    if algo.reference not in REFERENCES:
        raise ValueError(
            f"config.algorithm.reference={algo.reference!r}: online DPO scores new samples every "
            f"step; expected one of {REFERENCES}"
        )
    if algo.num_samples < 2:
        raise ValueError(f"config.algorithm.num_samples={algo.num_samples}: need >= 2 samples")
    if algo.labels not in LABELS:
        raise ValueError(f"config.algorithm.labels={algo.labels!r}: expected one of {LABELS}")
    dpo.validate_config(config)
    online.validate_rollout_fields(config)


def preference_batch(
    batch: dict, num_samples: int, *, listwise: bool, noise: jax.Array | None = None
) -> dict:
    """Rollout rows ``[B * K]`` -> DPO's preference batch (chosen = highest score).

    ``noise`` ``[B * K]`` (Gumbel draws for Bradley-Terry labels) is added to the scores before
    ranking. A group whose scores all tie is dropped either way: under Bradley-Terry its label is
    a fair coin, which only adds variance (the optimum is still pinned down by the untied pairs).

    Returns ``input_ids, attention_mask, loss_mask`` ``[B, 2, L]`` (``[B, K, L]`` best first when
    ``listwise``, with ``response_mask`` ``[B, K]``), ``example_mask`` ``[B]`` (0 for a group whose
    scores all tie, or a padding prompt), and ``score_chosen`` /
    ``score_rejected`` ``[B]`` (the noise-free scores of the first and last of the order).
    """
    k = num_samples
    ids, attn, lmask = rollout.sequences(
        (batch["prompt_ids"], batch["prompt_mask"]), batch["tokens"], batch["response_mask"]
    )  # [B * K, L]
    scores = batch["scores"].reshape(-1, k)  # [B * K] -> [B, K]
    ranked = scores if noise is None else scores + noise.reshape(-1, k)
    if listwise:
        order = jnp.argsort(-ranked, axis=-1, stable=True)  # [B, K] best first
    else:
        order = jnp.stack([jnp.argmax(ranked, -1), jnp.argmin(ranked, -1)], axis=-1)  # [B, 2]
    rows = jnp.arange(scores.shape[0])[:, None] * k + order  # [B, 2 | K] rows of the rollout
    real = batch["weights"].reshape(-1, k)[:, 0] > 0
    keep = (jnp.max(scores, -1) > jnp.min(scores, -1)) & real
    picked = jnp.take_along_axis(scores, order, axis=-1)  # [B, 2 | K]
    out = {
        "input_ids": ids[rows],  # [B, 2 | K, L]
        "attention_mask": attn[rows],
        "loss_mask": lmask[rows],
        "example_mask": keep.astype(jnp.int32),
        "score_chosen": picked[:, 0],
        "score_rejected": picked[:, -1],
    }
    if listwise:
        out["response_mask"] = jnp.ones(order.shape, jnp.int32)
    return out


def objective(model: Any, config: Any) -> common.Objective:
    """DPO's objective on the sampled preference batch."""
    return dpo.objective(model, config)


def make_update(model: Any, config: Any, *, mesh: Any = None, schedule: Any = None) -> Any:
    """``update(state, rollout_batch, frozen, key)``: :func:`preference_batch`, then DPO's step."""
    inner = train_setup.make_train_step(
        sys.modules[__name__], model, config, mesh=mesh, schedule=schedule
    )
    k, listwise = int(config.algorithm.num_samples), config.algorithm.loss == "listwise"
    bradley_terry = config.algorithm.labels == "bradley_terry"

    def update(state, batch, frozen, key):
        noise = None
        if bradley_terry:  # the rollout's key is fold_in(fold_in(key, step), 0)
            label_key = jax.random.fold_in(jax.random.fold_in(key, state.step), 1)
            noise = jax.random.gumbel(label_key, batch["scores"].shape, jnp.float32)
        pairs = preference_batch(batch, k, listwise=listwise, noise=noise)
        w = pairs["example_mask"].astype(jnp.float32)
        state, metrics = inner(state, pairs, frozen, key)
        kept = jnp.sum(w)
        metrics["score/chosen"] = common.safe_div(jnp.sum(pairs["score_chosen"] * w), kept)
        metrics["score/rejected"] = common.safe_div(jnp.sum(pairs["score_rejected"] * w), kept)
        metrics["pairs/kept_fraction"] = kept / w.shape[0]
        return state, metrics

    return update


def setup(config: Any, model: Any, mesh: Any, key: jax.Array) -> common.Setup:
    """The shared set-up with the rollout -> rank -> DPO step (see :mod:`prefjax.train.online`)."""
    base = train_setup.build_setup(config, model, mesh, key, sys.modules[__name__])
    update = make_update(model, config, mesh=mesh, schedule=base.schedule)
    return online.online_setup(
        base,
        online.make_pipeline(config, model, mesh),
        online.jit_update(base, update),
        # The held-out samples' entropy (eval/rollout/entropy, what the release gate reads):
        # the train step records entropy/response only with algorithm.train_entropy.
        eval_stats=online.eval_kl_stats(model, config, reference(config) != "none", entropy=True),
        finalize=common.means,
        seed=int(config.seed),
    )


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
