"""Supervised fine-tuning: maximise the likelihood of reference responses.

The loss is the token-level mean negative log-likelihood of the response tokens
(``loss_mask``) over the whole batch -- the sum over every micro-batch divided by the batch's
total response-token count, so gradient accumulation is exact. SFT batches
(``input_ids, attention_mask, loss_mask``) are used as they are; pairwise batches train on the
chosen responses.

Metrics: ``loss`` (NLL per response token), ``perplexity`` (``exp(loss)``), ``tokens`` (response
tokens in the batch), ``logps/sequence`` (mean summed log-prob of a response),
``length/response`` (mean response tokens), plus norms and ``train/skipped``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from prefjax.train import common, loop
from prefjax.train import setup as train_setup
from prefjax.train.common import Batch, Metrics, Setup, safe_div

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "sft"
HEAD = "lm"


def batch_kind(config: Any) -> str:
    """SFT reads ``prompt, completion`` batches."""
    return "sft"


def uses_reference(config: Any) -> bool:
    return False


def validate_config(config: Any) -> None:
    """Start-up checks of the SFT fields, each error naming the field."""
    if config.algorithm.loss != "sft":
        raise ValueError(f"config.algorithm.loss={config.algorithm.loss!r}: SFT's loss is 'sft'.")
    if config.algorithm.reference not in ("none", ""):
        raise ValueError(
            f"config.algorithm.reference={config.algorithm.reference!r}: SFT uses no reference "
            "('none')."
        )
    if config.data.task == "bandit":
        raise ValueError(
            "config.data.task='bandit': the bandit has no responses to imitate; use 'sequence'."
        )


def _fields(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    if "input_ids" in batch:
        return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    return batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]


def _weights(batch: Batch, size: int) -> jax.Array:
    if "example_mask" in batch:
        return batch["example_mask"].astype(jnp.float32)
    return jnp.ones((size,), jnp.float32)


def loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    """``(params, batch, frozen, key, denominators) -> (loss, sums)``: token-mean NLL."""
    chunk = common.logps_chunk_size(config)
    lora = common.lora_rank(config) > 0

    def fn(params, batch, frozen, key, denominators):
        ids, attn, lmask = _fields(batch)
        w = _weights(batch, ids.shape[0])
        lmask = lmask * w[:, None].astype(lmask.dtype)
        if lora:
            logps, counts = common.response_logps(
                model, frozen, ids, attn, lmask, lora=params, chunk_size=chunk, key=key
            )
        else:
            logps, counts = common.response_logps(model, params, ids, attn, lmask, chunk_size=chunk)
        loss = -jnp.sum(logps) / denominators["tokens"]
        sums = {
            "tokens": jnp.sum(counts),
            "logps/sequence": jnp.sum(logps * w),
            "length/response": jnp.sum(counts * w),
        }
        return loss, sums

    return fn


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    ids, _, lmask = _fields(batch)
    w = _weights(batch, ids.shape[0])
    tokens = jnp.sum(lmask[:, 1:].astype(jnp.float32) * w[:, None])
    return {"tokens": jnp.maximum(tokens, 1.0), "examples": jnp.maximum(jnp.sum(w), 1.0)}


def _finalize(sums: Mapping[str, jax.Array], den: Mapping[str, jax.Array]) -> Metrics:
    return {
        "tokens": sums["tokens"],
        "logps/sequence": safe_div(sums["logps/sequence"], den["examples"]),
        "length/response": safe_div(sums["length/response"], den["examples"]),
    }


def make_train_step(
    model: Any, config: Any, *, mesh: Any = None, schedule: Any = None
) -> Callable[..., tuple[Any, Metrics]]:
    """``train_step(state, batch, frozen, key) -> (state, metrics)``; frozen: LoRA base or None."""
    update = common.make_update(
        loss_fn(model, config),
        _denominators,
        _finalize,
        num_micro=common.grad_accum_steps(config),
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )

    def train_step(state, batch, frozen, key):
        state, metrics = update(state, batch, frozen, key)
        metrics["perplexity"] = jnp.exp(metrics["loss"])
        return state, metrics

    return train_step


def make_eval_step(model: Any, config: Any) -> Callable[[Any, Batch, Any], Metrics]:
    """``eval_step(params, batch, frozen) -> {name: (sum, count)}``: held-out NLL per token."""
    fn = loss_fn(model, config)

    def eval_step(params, batch, frozen):
        den = _denominators(batch)
        loss_sum, sums = fn(params, batch, frozen, None, {"tokens": 1.0})  # no dropout
        return {
            "loss": (loss_sum, den["tokens"]),
            "logps/sequence": (sums["logps/sequence"], den["examples"]),
            "length/response": (sums["length/response"], den["examples"]),
        }

    return eval_step


def setup(config: Any, model: Any, mesh: Any, key: jax.Array) -> Setup:
    """Sharded state (full params, or LoRA adapters over a frozen base) and jitted steps."""
    return train_setup.build_setup(
        config, model, mesh, key, make_train_step, make_eval_step, needs_frozen_copy=False
    )


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
