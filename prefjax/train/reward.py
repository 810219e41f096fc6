"""Reward models: Bradley-Terry on pairs (with an optional margin) and Plackett-Luce on rankings.

The model is the transformer with a scalar reward head (``head="reward"``), read at the last
real token. Pairwise: chosen and rejected go through one forward pass concatenated on the batch
axis (``[2 * batch, seq]``) and the loss is ``-log sigmoid(r_w - r_l - margin)`` (Llama 2's margin
from the batch's ``margin`` column when ``config.algorithm.margin`` is set). Listwise: the
``[batch, k, seq]`` responses are flattened to ``[batch * k, seq]`` and scored with the
Plackett-Luce likelihood of the given best-first order.

Metrics: ``loss``; ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (mean scores and
their difference); ``rewards/accuracy`` (fraction of pairs -- for rankings, of ordered pairs --
scored in the labelled order); ``rewards/gold_accuracy`` on built-in tasks (agreement with the
gold reward's order, whose ceiling is 1, not the label accuracy); ``rewards/std`` (score spread);
plus norms and ``train/skipped``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from prefjax import losses
from prefjax.train import common, loop
from prefjax.train import setup as train_setup
from prefjax.train.common import Batch, Metrics, Setup, get, safe_div

REWARD_LOSSES = ("bradley_terry", "plackett_luce")


# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "reward"
HEAD = "reward"


def batch_kind(config: Any) -> str:
    """Pairs for Bradley-Terry, rankings for Plackett-Luce."""
    return "listwise" if config.algorithm.loss == "plackett_luce" else "pairwise"


def uses_reference(config: Any) -> bool:
    return False


def validate_config(config: Any) -> None:
    """Start-up checks of the reward-model fields."""
    if config.export.hf:
        raise ValueError(
            "config.export.hf=True: only policies (sft, dpo) export to a Hugging Face LM folder."
        )
    loss = get(config, "algorithm.loss", "bradley_terry")
    if loss not in REWARD_LOSSES:
        raise ValueError(f"config.algorithm.loss={loss!r}: expected one of {REWARD_LOSSES}.")
    reference = get(config, "algorithm.reference", "none")
    if reference not in ("none", ""):
        raise ValueError(
            f"config.algorithm.reference={reference!r}: reward models use no reference ('none')."
        )
    if common.lora_rank(config) > 0:
        raise ValueError(
            "config.model.lora.rank > 0: reward models train the full network and its reward "
            "head; set config.model.lora.rank=0."
        )
    if loss == "plackett_luce" and get(config, "algorithm.margin", False):
        raise ValueError("config.algorithm.margin=True applies to loss='bradley_terry' only.")


def _weights(batch: Batch, size: int) -> jax.Array:
    if "example_mask" in batch:
        return batch["example_mask"].astype(jnp.float32)
    return jnp.ones((size,), jnp.float32)


def _bt_loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    use_margin = bool(get(config, "algorithm.margin", False))
    smoothing = float(get(config, "algorithm.label_smoothing", 0.0))

    def fn(params, batch, frozen, key, denominators):
        del frozen, key
        num = batch["chosen_input_ids"].shape[0]
        w = _weights(batch, num)
        # 2 x [batch, seq] -> [2 * batch, seq]
        cat = lambda n: jnp.concatenate([batch[f"chosen_{n}"], batch[f"rejected_{n}"]], 0)
        scores = model.apply(params, cat("input_ids"), cat("attention_mask"))
        scores = scores.astype(jnp.float32)
        chosen, rejected = scores[:num], scores[num:]  # [2 * batch] -> 2 x [batch]
        if use_margin:
            if "margin" not in batch:
                raise KeyError("config.algorithm.margin=True but the batch has no 'margin' column.")
            margin = batch["margin"].astype(jnp.float32)
        else:
            margin = None
        per_example = losses.bradley_terry_loss(
            chosen, rejected, margin=margin, label_smoothing=smoothing
        )
        per_example = getattr(per_example, "loss", per_example)
        loss = jnp.sum(per_example * w) / denominators["pairs"]
        sums = _pair_sums(chosen, rejected, w, batch)
        return loss, sums

    return fn


def _pair_sums(chosen: jax.Array, rejected: jax.Array, w: jax.Array, batch: Batch) -> dict:
    s = lambda x: jnp.sum(x.astype(jnp.float32) * w)
    sums = {
        "rewards/chosen": s(chosen),
        "rewards/rejected": s(rejected),
        "rewards/margin": s(chosen - rejected),
        "rewards/accuracy": s(chosen > rejected),
        "rewards/sq": s(0.5 * (chosen**2 + rejected**2)),
        "rewards/mean": s(0.5 * (chosen + rejected)),
    }
    if "chosen_gold_reward" in batch:
        gold = batch["chosen_gold_reward"] - batch["rejected_gold_reward"]
        sums["rewards/gold_accuracy"] = s((chosen - rejected) * gold > 0)
    return sums


def _pl_loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    del config

    def fn(params, batch, frozen, key, denominators):
        del frozen, key
        num, k, seq = batch["input_ids"].shape
        w = _weights(batch, num)
        # [batch, k, seq] -> [batch * k, seq]
        flat = lambda n: batch[n].reshape(num * k, seq)
        scores = model.apply(params, flat("input_ids"), flat("attention_mask"))
        scores = scores.astype(jnp.float32).reshape(num, k)  # [batch * k] -> [batch, k]
        mask = batch["response_mask"].astype(jnp.float32)
        per_example = losses.plackett_luce_loss(scores, mask=mask)
        per_example = getattr(per_example, "loss", per_example)
        loss = jnp.sum(per_example * w) / denominators["pairs"]
        last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
        worst = jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]
        upper = jnp.triu(jnp.ones((k, k)), 1)
        pair_mask = mask[:, :, None] * mask[:, None, :] * upper
        correct = (scores[:, :, None] > scores[:, None, :]) * pair_mask
        accuracy = safe_div(jnp.sum(correct, (1, 2)), jnp.sum(pair_mask, (1, 2)))
        sums = _pair_sums(scores[:, 0], worst, w, {})
        sums["rewards/accuracy"] = jnp.sum(accuracy * w)
        top1 = jnp.argmax(jnp.where(mask > 0, scores, -jnp.inf), axis=1) == 0
        sums["rewards/top1_accuracy"] = jnp.sum(top1 * w)
        return loss, sums

    return fn


def loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    """``(params, batch, frozen, key, denominators) -> (loss, sums)`` for ``algorithm.loss``."""
    validate_config(config)
    if get(config, "algorithm.loss", "bradley_terry") == "plackett_luce":
        return _pl_loss_fn(model, config)
    return _bt_loss_fn(model, config)


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    key = "chosen_input_ids" if "chosen_input_ids" in batch else "input_ids"
    w = _weights(batch, batch[key].shape[0])
    return {"pairs": jnp.maximum(jnp.sum(w), 1.0)}


def _finalize(sums: Mapping[str, jax.Array], den: Mapping[str, jax.Array]) -> Metrics:
    out = {k: safe_div(v, den["pairs"]) for k, v in sums.items()}
    mean, sq = out.pop("rewards/mean"), out.pop("rewards/sq")
    out["rewards/std"] = jnp.sqrt(jnp.maximum(sq - mean**2, 0.0))
    return out


def make_train_step(
    model: Any, config: Any, *, mesh: Any = None, schedule: Any = None
) -> Callable[..., tuple[Any, Metrics]]:
    """``train_step(state, batch, frozen, key) -> (state, metrics)``; ``frozen`` is unused."""
    return common.make_update(
        loss_fn(model, config),
        _denominators,
        _finalize,
        num_micro=common.grad_accum_steps(config),
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )


def make_eval_step(model: Any, config: Any) -> Callable[[Any, Batch, Any], Metrics]:
    """``eval_step(params, batch, frozen) -> {name: (sum, count)}`` on held-out pairs."""
    fn = loss_fn(model, config)

    def eval_step(params, batch, frozen):
        den = _denominators(batch)
        loss_sum, sums = fn(params, batch, frozen, None, {"pairs": 1.0})
        out = {"loss": (loss_sum, den["pairs"])}
        out.update({name: (value, den["pairs"]) for name, value in sums.items()})
        return out

    return eval_step


def setup(config: Any, model: Any, mesh: Any, key: jax.Array) -> Setup:
    """Sharded state for a reward model (``head="reward"``) and its jitted steps."""
    return train_setup.build_setup(
        config, model, mesh, key, make_train_step, make_eval_step, needs_frozen_copy=False
    )


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
