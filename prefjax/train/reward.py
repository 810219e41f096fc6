"""Reward models: Bradley-Terry on pairs (with an optional margin) and Plackett-Luce on rankings.

The model is the transformer with a scalar reward head (``head="reward"``), read at the last
real token. The ``[batch, 2, seq]`` pairs (``[batch, k, seq]`` rankings) go through one forward
pass flattened response-major to ``[2 * batch, seq]`` (``[k * batch, seq]``). Pairwise: the loss
is ``-log sigmoid(r_w - r_l - margin)`` (Llama 2's margin from the batch's ``margin`` column when
``config.algorithm.margin`` is set); listwise: the Plackett-Luce likelihood of the given
best-first order.

Metrics: ``loss``; ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (mean scores and
their difference); ``rewards/accuracy`` (fraction of pairs -- for rankings, of ordered pairs --
scored in the labelled order, an exact tie counting one half); ``rewards/gold_accuracy`` on
built-in tasks (agreement with the gold reward's order, whose ceiling is 1, not the label
accuracy); ``rewards/std`` (score spread); plus norms and ``train/skipped``. Train and eval
metrics come from the same :func:`finalize`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import losses
from prefjax.train import common, loop
from prefjax.train.common import Batch, Metrics, Objective, Stats

REWARD_LOSSES = ("bradley_terry", "plackett_luce")

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "reward"
HEAD = "reward"


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of a reward-model run: every field, its default and its unit."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # "bradley_terry" (pairs) | "plackett_luce" (rankings, best first).
    algo.loss = "bradley_terry"
    # Bradley-Terry: subtract the example's `margin` column inside the sigmoid (Llama 2).
    algo.margin = False
    # Bradley-Terry: label-flip probability epsilon in [0, 0.5) (conservative targets).
    algo.label_smoothing = 0.0
    return algo


def batch_kind(config: Any) -> str:
    """Pairs for Bradley-Terry, rankings for Plackett-Luce."""
    return "listwise" if config.algorithm.loss == "plackett_luce" else "pairwise"


def reference(config: Any) -> str:
    return "none"


def validate_config(config: Any) -> None:
    """Start-up checks of the reward-model fields."""
    algo = config.algorithm
    if config.export.hf:
        raise ValueError(
            "config.export.hf=True: only policies (sft, dpo) export to a Hugging Face LM folder."
        )
    if algo.loss not in REWARD_LOSSES:
        raise ValueError(f"config.algorithm.loss={algo.loss!r}: expected one of {REWARD_LOSSES}.")
    if common.uses_lora(config):
        raise ValueError(
            "config.model.lora.rank > 0: reward models train the full network and its reward "
            "head; set config.model.lora.rank=0."
        )
    if algo.loss == "plackett_luce" and algo.margin:
        raise ValueError("config.algorithm.margin=True applies to loss='bradley_terry' only.")
    if not 0.0 <= algo.label_smoothing < 0.5:
        raise ValueError(
            f"config.algorithm.label_smoothing={algo.label_smoothing!r}: must be in [0, 0.5)."
        )


def _scores(model: Any, params: Any, batch: Batch) -> jax.Array:
    """``[batch, k]`` float32 rewards of the batch's ``[batch, k, seq]`` responses (or of its
    packed sequences, read at each segment's last token)."""
    if common.is_packed(batch):
        return common.packed_rewards(model, params, common.batch_tokens(batch))
    k = batch["input_ids"].shape[1]
    ids, attn = (common.flatten_responses(batch[n]) for n in ("input_ids", "attention_mask"))
    scores = model.apply(params, ids, attn).astype(jnp.float32)  # [k * batch]
    return common.unflatten_responses(scores, k)


def _pair_stats(chosen: jax.Array, rejected: jax.Array, w: jax.Array, batch: Batch) -> Stats:
    n = jnp.sum(w)
    s = lambda x: (jnp.sum(x.astype(jnp.float32) * w), n)
    stats = {
        "rewards/chosen": s(chosen),
        "rewards/rejected": s(rejected),
        "rewards/margin": s(chosen - rejected),
        "rewards/accuracy": s(common.agreement(chosen - rejected)),
        # Moments of the scores, for rewards/std.
        "rewards/sq": s(0.5 * (chosen**2 + rejected**2)),
        "rewards/mean": s(0.5 * (chosen + rejected)),
    }
    if "chosen_gold_reward" in batch:
        gold = batch["chosen_gold_reward"] - batch["rejected_gold_reward"]
        stats["rewards/gold_accuracy"] = s((chosen - rejected) * gold > 0)
    return stats


def _bradley_terry(model: Any, config: Any):
    use_margin, smoothing = bool(config.algorithm.margin), float(config.algorithm.label_smoothing)

    def fn(params, batch, frozen, key, denominators):
        del frozen, key
        w = common.example_weights(batch)
        scores = _scores(model, params, batch)  # [batch, 2]
        chosen, rejected = scores[:, 0], scores[:, 1]
        if use_margin:
            if "margin" not in batch:
                raise KeyError("config.algorithm.margin=True but the batch has no 'margin' column.")
            margin = batch["margin"].astype(jnp.float32)
        else:
            margin = None
        per_example = losses.bradley_terry_loss(
            chosen, rejected, margin=margin, label_smoothing=smoothing
        )
        loss = jnp.sum(per_example * w) / denominators["loss"]
        return loss, _pair_stats(chosen, rejected, w, batch)

    return fn


def _plackett_luce(model: Any, config: Any):
    def fn(params, batch, frozen, key, denominators):
        del frozen, key
        w = common.example_weights(batch)
        scores = _scores(model, params, batch)  # [batch, k]
        mask = batch["response_mask"].astype(jnp.float32)
        per_example = losses.plackett_luce_loss(scores, mask=mask)
        loss = jnp.sum(per_example * w) / denominators["loss"]
        stats = _pair_stats(scores[:, 0], common.last_valid(scores, mask), w, {})
        stats["rewards/accuracy"] = (jnp.sum(common.ranking_accuracy(scores, mask) * w), jnp.sum(w))
        top1 = jnp.argmax(jnp.where(mask > 0, scores, -jnp.inf), axis=1) == 0
        stats["rewards/top1_accuracy"] = (jnp.sum(top1 * w), jnp.sum(w))
        return loss, stats

    return fn


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    return {"loss": jnp.maximum(jnp.sum(common.example_weights(batch)), 1.0)}


def finalize(stats: Stats) -> Metrics:
    """Means, and ``rewards/std`` (the scores' spread) from their moments."""
    metrics = common.means(stats)
    mean, sq = metrics.pop("rewards/mean"), metrics.pop("rewards/sq")
    metrics["rewards/std"] = jnp.sqrt(jnp.maximum(sq - mean**2, 0.0))
    return metrics


def objective(model: Any, config: Any) -> Objective:
    """Bradley-Terry (pairs) or Plackett-Luce (rankings) on the reward head's scores."""
    if config.algorithm.loss == "plackett_luce":
        return Objective(_plackett_luce(model, config), _denominators, finalize)
    return Objective(_bradley_terry(model, config), _denominators, finalize)


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
