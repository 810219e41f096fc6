"""Reward models: Bradley-Terry on pairs (with an optional margin), Plackett-Luce on rankings, and
process reward models (PRM) on step-labelled solutions.

The model is the transformer with a scalar reward head (``head="reward"``), read at the last
real token. The ``[batch, 2, seq]`` pairs (``[batch, k, seq]`` rankings) go through one forward
pass flattened response-major to ``[2 * batch, seq]`` (``[k * batch, seq]``). Pairwise: the loss
is ``-log sigmoid(r_w - r_l - margin)`` (Llama 2's margin from the batch's ``margin`` column when
``config.algorithm.margin`` is set); listwise: the Plackett-Luce likelihood of the given
best-first order; ``prm``: the reward head read at every token
(:func:`prefjax.rollout.prm.step_logits`) and trained with the binary cross-entropy of each
labelled step at its separator token (:func:`prefjax.losses.process_reward_loss`), averaged over
the batch's labelled steps (``step`` batches: ``step_labels``, ``step_mask`` ``[batch, seq]``).

Metrics: ``loss``; ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (mean scores and
their difference); ``rewards/accuracy`` (fraction of pairs -- for rankings, of ordered pairs --
scored in the labelled order, an exact tie counting one half); ``rewards/gold_accuracy`` on
built-in tasks (agreement with the gold reward's order, whose ceiling is 1, not the label
accuracy); ``rewards/std`` (score spread); plus norms and ``train/skipped``. PRM: ``loss`` (mean
BCE per step); ``steps/accuracy`` (steps whose probability is on the side of their label, 0.5
counting one half); ``steps/auc`` (ROC AUC of the step probabilities against the labels, from
a histogram of :data:`AUC_BINS` equal-width probability bins, pairs in one bin counting one
half, so it sums exactly over micro-batches and eval batches); ``steps/positive_rate`` (labels)
and ``steps/score`` (mean probability); ``steps/outcome_accuracy`` (per solution: the min over
its steps, predicted > 0.5, against "every step correct"). Train and eval metrics come from the
same finalisation.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import losses
from prefjax.rollout import prm
from prefjax.train import common, loop
from prefjax.train.common import Batch, Metrics, Objective, Stats

REWARD_LOSSES = ("bradley_terry", "plackett_luce", "prm")
# Equal-width bins of step probabilities in [0, 1] for the PRM's exact-sum AUC.
AUC_BINS = 32
# Built-in tasks whose examples carry per-step labels.
STEP_TASKS = ("arithmetic", "files")

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "reward"
HEAD = "reward"


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of a reward-model run: every field, its default and its unit."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # "bradley_terry" (pairs) | "plackett_luce" (rankings, best first) | "prm" (a process reward
    # model: step-labelled solutions, per-step binary cross-entropy at the step separators).
    algo.loss = "bradley_terry"
    # Bradley-Terry: subtract the example's `margin` column inside the sigmoid (Llama 2).
    algo.margin = False
    # Bradley-Terry: label-flip probability epsilon in [0, 0.5) (conservative targets).
    algo.label_smoothing = 0.0
    return algo


def batch_kind(config: Any) -> str:
    """Pairs for Bradley-Terry, rankings for Plackett-Luce, step-labelled solutions for PRM."""
    return {"plackett_luce": "listwise", "prm": "step"}.get(config.algorithm.loss, "pairwise")


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
    if algo.loss != "bradley_terry" and algo.margin:
        raise ValueError("config.algorithm.margin=True applies to loss='bradley_terry' only.")
    if algo.loss == "prm":
        if algo.label_smoothing:
            raise ValueError(
                "config.algorithm.label_smoothing applies to loss='bradley_terry' only."
            )
        if config.data.task not in STEP_TASKS:
            raise ValueError(
                f"config.data.task={config.data.task!r}: loss='prm' trains on step-labelled "
                f"solutions; set config.data.task to one of {STEP_TASKS} (the built-in "
                "'arithmetic' task has per-step gold labels)."
            )
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


def _auc_histogram(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> Stats:
    """Counts of positive and negative steps per probability bin (``steps/auc`` from them)."""
    bins = jnp.clip((probs * AUC_BINS).astype(jnp.int32), 0, AUC_BINS - 1)
    onehot = jax.nn.one_hot(bins, AUC_BINS, dtype=jnp.float32) * mask[..., None]  # [b, t, bins]
    pos = jnp.sum(onehot * labels[..., None], axis=(0, 1))  # [bins]
    neg = jnp.sum(onehot * (1.0 - labels[..., None]), axis=(0, 1))
    one = jnp.ones((), jnp.float32)
    stats = {f"auc/pos/{i:02d}": (pos[i], one) for i in range(AUC_BINS)}
    stats.update({f"auc/neg/{i:02d}": (neg[i], one) for i in range(AUC_BINS)})
    return stats


def _prm(model: Any, config: Any):
    def fn(params, batch, frozen, key, denominators):
        del frozen, key
        w = common.example_weights(batch)
        mask = batch["step_mask"].astype(jnp.float32) * w[:, None]  # [batch, seq]
        labels = batch["step_labels"].astype(jnp.float32)
        logits = prm.step_logits(model, params, batch["input_ids"], batch["attention_mask"])
        per_example = losses.process_reward_loss(logits, labels, mask)  # [batch], summed steps
        loss = jnp.sum(per_example) / denominators["loss"]
        probs = jax.nn.sigmoid(logits)
        num_steps = jnp.sum(mask)
        s = lambda x: (jnp.sum(x * mask), num_steps)
        # Per solution: the min over its steps (predicted) against "every step correct" (gold).
        has_steps = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
        predicted = prm.aggregate_step_scores(probs, mask, aggregation="min") > 0.5
        gold = jnp.min(jnp.where(mask > 0, labels, 1.0), axis=1) > 0.5
        stats = {
            "steps/accuracy": s(common.agreement((probs - 0.5) * (2.0 * labels - 1.0))),
            "steps/positive_rate": s(labels),
            "steps/score": s(probs),
            "steps/outcome_accuracy": (
                jnp.sum((predicted == gold) * has_steps),
                jnp.sum(has_steps),
            ),
            **_auc_histogram(probs, labels, mask),
        }
        return loss, stats

    return fn


def _step_denominators(batch: Batch) -> Mapping[str, jax.Array]:
    w = common.example_weights(batch)
    steps = jnp.sum(batch["step_mask"].astype(jnp.float32) * w[:, None])
    return {"loss": jnp.maximum(steps, 1.0)}


def binned_auc(pos, neg) -> jax.Array:
    """ROC AUC from per-bin counts of positives and negatives (bins in increasing score order):
    ``P(score_pos > score_neg)`` with pairs in one bin counting one half; 0.5 without both."""
    pos, neg = jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32)
    below = jnp.cumsum(neg) - neg  # negatives in strictly lower bins
    pairs = jnp.sum(pos) * jnp.sum(neg)
    wins = jnp.sum(pos * (below + 0.5 * neg))
    return jnp.where(pairs > 0, wins / jnp.maximum(pairs, 1.0), 0.5)


def finalize_prm(stats: Stats) -> Metrics:
    """Means, and ``steps/auc`` from the probability histogram."""
    stats = dict(stats)
    pos = [stats.pop(f"auc/pos/{i:02d}")[0] for i in range(AUC_BINS)]
    neg = [stats.pop(f"auc/neg/{i:02d}")[0] for i in range(AUC_BINS)]
    metrics = common.means(stats)
    metrics["steps/auc"] = binned_auc(jnp.stack(pos), jnp.stack(neg))
    return metrics


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    return {"loss": jnp.maximum(jnp.sum(common.example_weights(batch)), 1.0)}


def finalize(stats: Stats) -> Metrics:
    """Means, and ``rewards/std`` (the scores' spread) from their moments."""
    metrics = common.means(stats)
    mean, sq = metrics.pop("rewards/mean"), metrics.pop("rewards/sq")
    metrics["rewards/std"] = jnp.sqrt(jnp.maximum(sq - mean**2, 0.0))
    return metrics


def objective(model: Any, config: Any) -> Objective:
    """Bradley-Terry (pairs), Plackett-Luce (rankings) or the PRM's per-step cross-entropy."""
    if config.algorithm.loss == "prm":
        return Objective(_prm(model, config), _step_denominators, finalize_prm)
    if config.algorithm.loss == "plackett_luce":
        return Objective(_plackett_luce(model, config), _denominators, finalize)
    return Objective(_bradley_terry(model, config), _denominators, finalize)


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
