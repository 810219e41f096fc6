"""Supervised fine-tuning: maximise the likelihood of reference responses.

The loss is the token-level mean negative log-likelihood of the response tokens
(``loss_mask``) over the whole batch -- the sum over every micro-batch divided by the batch's
total response-token count, so gradient accumulation is exact. SFT batches
(``input_ids, attention_mask, loss_mask`` ``[batch, seq]``) are used as they are; pairwise batches
(``[batch, 2, seq]``) train on the chosen responses.

Metrics: ``loss`` (NLL per response token), ``perplexity`` (``exp(loss)``), ``tokens`` (response
tokens in the batch), ``logps/sequence`` (mean summed log-prob of a response),
``length/response`` (mean response tokens), plus norms and ``train/skipped``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax.train import common, loop
from prefjax.train.common import Batch, Metrics, Objective, Stats

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "sft"
HEAD = "lm"


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of an SFT run (SFT has no hyperparameters of its own)."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # Next-token cross-entropy on response tokens (prompt tokens are masked); the only value.
    algo.loss = "sft"
    return algo


def batch_kind(config: Any) -> str:
    """SFT reads ``prompt, completion`` batches."""
    return "sft"


def reference(config: Any) -> str:
    return "none"


def validate_config(config: Any) -> None:
    """Start-up checks of the SFT fields, each error naming the field."""
    if config.algorithm.loss != "sft":
        raise ValueError(f"config.algorithm.loss={config.algorithm.loss!r}: SFT's loss is 'sft'.")
    if config.data.task == "bandit":
        raise ValueError(
            "config.data.task='bandit': the bandit has no responses to imitate; use 'sequence'."
        )


def _tokens(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[batch, seq]`` token arrays: the batch's own, or a pair batch's chosen side."""
    tokens = tuple(batch[n] for n in ("input_ids", "attention_mask", "loss_mask"))
    return tokens if tokens[0].ndim == 2 else tuple(x[:, 0] for x in tokens)


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    w = common.example_weights(batch)
    if common.is_packed(batch):  # the first (chosen) sequence of every example
        tokens = jnp.sum(common.packed_token_counts(common.batch_tokens(batch))[:, 0] * w)
        return {"loss": jnp.maximum(tokens, 1.0)}
    _, _, lmask = _tokens(batch)
    tokens = jnp.sum(lmask[:, 1:].astype(jnp.float32) * w[:, None])
    return {"loss": jnp.maximum(tokens, 1.0)}


def finalize(stats: Stats) -> Metrics:
    """Means, and ``perplexity = exp(loss)``."""
    metrics = common.means(stats)
    metrics["perplexity"] = jnp.exp(metrics["loss"])
    return metrics


def objective(model: Any, config: Any) -> Objective:
    """Token-mean NLL of the response tokens over the whole batch."""
    chunk = config.model.logps_chunk_size
    lora = common.uses_lora(config)

    def logps_and_counts(params, batch, frozen, key, w):
        base, adapters = (frozen, params) if lora else (params, None)
        if common.is_packed(batch):  # [batch, k] -> the first (chosen) sequence, weighted
            logps, counts = common.packed_response_logps(
                model, base, common.batch_tokens(batch), lora=adapters, chunk_size=chunk, key=key
            )
            return logps[:, 0] * w, counts[:, 0] * w
        ids, attn, lmask = _tokens(batch)
        lmask = lmask * w[:, None].astype(lmask.dtype)
        return common.response_logps(
            model, base, ids, attn, lmask, lora=adapters, chunk_size=chunk, key=key
        )

    def fn(params, batch, frozen, key, denominators):
        w = common.example_weights(batch)
        logps, counts = logps_and_counts(params, batch, frozen, key, w)
        loss = -jnp.sum(logps) / denominators["loss"]
        examples = jnp.sum(w)
        stats = {
            # Response tokens per batch (a count, not a mean over examples).
            "tokens": (jnp.sum(counts), jnp.ones((), jnp.float32)),
            "logps/sequence": (jnp.sum(logps * w), examples),
            "length/response": (jnp.sum(counts * w), examples),
        }
        return loss, stats

    return Objective(fn, _denominators, finalize)


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop)."""
    return loop.run(config, workdir, sys.modules[__name__])
