"""Direct preference optimisation and its family: the objective of every variant.

What the step does, in order (``config.algorithm.loss`` picks the objective):

1. forward the policy once on the batch's ``[batch, 2, seq]`` pairs, flattened response-major to
   ``[2 * batch, seq]`` (chosen rows, then rejected rows), and sum the response log-probs
   (logits at ``t`` predict ``t + 1``) into ``[batch, 2]``;
2. take the reference log-probs: a frozen copy (``reference="copy"``), the LoRA base with adapters
   off (``"lora_base"``), or the ``ref_logps [batch, 2]`` column precomputed once by
   :func:`precompute_reference_logps` (``"precomputed"``; no reference in memory);
3. call the loss from ``prefjax.losses`` with its hyperparameters from ``config.algorithm`` --
   any of ``PAIRWISE_LOSSES`` (sigmoid, robust, ipo, hinge, bco_pair, ...), ``listwise``
   (Plackett-Luce over the ``[batch, K, seq]`` responses), ``kto`` (unpaired feedback, KL
   reference point estimated on mismatched prompt/response pairs of the batch), or the
   reference-free ``orpo`` and ``simpo``;
4. differentiate, accumulate over micro-batches, clip, update (:func:`prefjax.train.common.
   make_update`).

Metrics (means over the batch): ``loss``; ``rewards/chosen``, ``rewards/rejected`` (implicit
rewards ``beta * (log pi - log pi_ref)``), ``rewards/margin``, ``rewards/accuracy`` (fraction of
pairs with chosen reward above rejected, ties -- margins within float32 rounding of zero, see
:func:`tie_tolerance` -- counting one half, so 0.5 at policy == reference; listwise: of ordered
pairs; KTO: of desirable rewards above 0 and undesirable below); ``logps/chosen``,
``logps/rejected`` (summed response log-probs under the policy -- watch both fall together, the
usual DPO failure);
``kl/logratio`` (mean of ``log pi - log pi_ref`` over the batch's responses, a KL proxy on data
responses); ``length/chosen``, ``length/rejected`` (response tokens); ``length_bias/corr`` (the
correlation of the reward margin with the chosen-minus-rejected length); with ``rpo_alpha``,
``loss/preference`` and ``nll/chosen``; plus the norms and ``train/skipped`` added by
:func:`prefjax.train.common.make_update`. Train and eval metrics come from the same
:func:`finalize`. The eval step adds ``entropy/response`` (the policy's next-token entropy per
response token on the batch's responses, nats, from the logits the step already builds -- not
recorded with ``model.logps_chunk_size``, which never builds them); the train step records it
too only with ``algorithm.train_entropy``, since under the gradient it keeps one more float32
``[batch, seq, vocab]`` temporary alive.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import losses
from prefjax.train import common, loop
from prefjax.train.common import Batch, Metrics, Objective, Stats, safe_div
from prefjax.train.errors import ConfigError
from prefjax.train.reference import precompute_reference_logps  # noqa: F401  (public name)
from prefjax.train.setup import REFERENCE_KINDS

SPECIAL_LOSSES = ("listwise", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
REFERENCES = REFERENCE_KINDS  # every kind the set-up knows; DPO's validation picks per loss

# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "dpo"
HEAD = "lm"


# ----------------------------------------------------------------------------------------------
# Config and validation
# ----------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """``config.algorithm`` of a DPO-family run: every field, its default and its unit."""
    algo = ml_collections.ConfigDict()
    # Which train step (set by the config file; not meant to be changed).
    algo.name = NAME
    # A key of prefjax.losses.PAIRWISE_LOSSES ("sigmoid" is DPO), or "listwise" | "kto" | "orpo"
    # | "simpo" (these two need reference="none").
    algo.loss = "sigmoid"
    # KL-regularisation strength beta (nats^-1 scale of the implicit rewards beta * log-ratio).
    algo.beta = 0.1
    # Conservative-DPO / robust-DPO label-flip probability epsilon in [0, 0.5).
    algo.label_smoothing = 0.0
    # SimPO target reward margin gamma (in reward units).
    algo.gamma = 0.5
    # KTO weights of desirable / undesirable examples.
    algo.desirable_weight = 1.0
    algo.undesirable_weight = 1.0
    # Reference policy: "copy" (frozen copy) | "lora_base" (adapters off) | "precomputed" (one pass
    # before training stores reference log-probs beside the data) | "none" (ORPO, SimPO).
    algo.reference = "copy"
    # reference="precomputed": a directory where the reference log-probs are kept between runs,
    # keyed by the reference weights, the tokenised data and the sequence layout ("" = no cache;
    # see prefjax.train.reference).
    algo.reference_cache_dir = ""
    # ORPO: weight of the NLL term on the chosen response.
    algo.sft_weight = 1.0
    # Pairwise losses: + rpo_alpha * (token-averaged NLL of the chosen response), the RPO
    # regulariser (Pang et al., 2024) that keeps the chosen likelihood from falling. 0 = off.
    algo.rpo_alpha = 0.0
    # Pairwise losses on length-normalised (per-token mean) log-probs instead of sums; unset =
    # the loss's own convention (True for "ipo", as TRL runs it; False otherwise).
    algo.average_logps = ml_collections.config_dict.placeholder(bool)
    # Record entropy/response in the train step too (the eval step always does): one more float32
    # [2 * batch, seq, vocab] temporary in the compiled step (tiny preset, V = 32 000, 512 tokens:
    # +61.5 MiB, +22 % of its temporaries; docs/training.md); needs model.logps_chunk_size = 0.
    algo.train_entropy = False
    return algo


def batch_kind(config: Any) -> str:
    """Pairs, except rankings for ``listwise`` and unpaired feedback for ``kto``."""
    loss = config.algorithm.loss
    return {"listwise": "listwise", "kto": "unpaired"}.get(loss, "pairwise")


def reference(config: Any) -> str:
    """``config.algorithm.reference``: ``"copy"``, ``"lora_base"``, ``"precomputed"`` or
    ``"none"``."""
    return config.algorithm.reference


def loss_names() -> tuple[str, ...]:
    """Every value ``config.algorithm.loss`` accepts for DPO."""
    return (*losses.PAIRWISE_LOSSES, *SPECIAL_LOSSES)


def validate_config(config: Any) -> None:
    """Start-up checks of the DPO fields, each error naming the field."""
    algo = config.algorithm
    loss, ref, beta = algo.loss, algo.reference, algo.beta
    if loss not in loss_names():
        raise ValueError(f"config.algorithm.loss={loss!r}: expected one of {loss_names()}.")
    if ref not in REFERENCES:
        raise ValueError(f"config.algorithm.reference={ref!r}: expected one of {REFERENCES}.")
    if not beta > 0:
        raise ValueError(f"config.algorithm.beta={beta} must be > 0.")
    lora = common.uses_lora(config)
    if loss in REFERENCE_FREE and ref != "none":
        raise ValueError(
            f"config.algorithm.reference={ref!r}: loss {loss!r} is reference-free; "
            "set config.algorithm.reference='none'."
        )
    if loss not in REFERENCE_FREE and ref == "none":
        raise ValueError(
            f"config.algorithm.reference='none': loss {loss!r} needs a reference "
            "('copy', 'lora_base' or 'precomputed')."
        )
    if ref == "lora_base" and not lora:
        raise ValueError(
            "config.algorithm.reference='lora_base' needs LoRA adapters: "
            "set config.model.lora.rank > 0."
        )
    if ref == "copy" and lora:
        raise ValueError(
            "config.algorithm.reference='copy' with LoRA (config.model.lora.rank > 0) would keep "
            "a second copy of the base; use 'lora_base' (the base, adapters off) or 'precomputed'."
        )
    if ref == "precomputed" and loss == "kto":
        raise ValueError(
            "config.algorithm.reference='precomputed' is not supported with loss='kto': the KL "
            "reference point pairs prompts with other examples' responses in each batch, so it "
            "cannot be computed ahead of time. Use 'copy' or 'lora_base'."
        )
    if not 0.0 <= algo.label_smoothing < 0.5:
        raise ValueError(
            f"config.algorithm.label_smoothing={algo.label_smoothing!r}: must be in [0, 0.5)."
        )
    for field in ("desirable_weight", "undesirable_weight") if loss == "kto" else ():
        if not algo[field] > 0:
            raise ValueError(f"config.algorithm.{field}={algo[field]!r}: must be > 0.")
    if loss == "orpo" and algo.sft_weight < 0:
        raise ValueError(f"config.algorithm.sft_weight={algo.sft_weight!r}: must be >= 0.")
    rpo_alpha = algo.rpo_alpha
    if isinstance(rpo_alpha, bool) or not isinstance(rpo_alpha, (int, float)) or rpo_alpha < 0:
        raise ValueError(f"config.algorithm.rpo_alpha={rpo_alpha!r} must be a number >= 0.")
    if rpo_alpha and loss not in losses.PAIRWISE_LOSSES:
        raise ValueError(
            f"config.algorithm.rpo_alpha={rpo_alpha}: the RPO term applies to the pairwise losses "
            f"{tuple(losses.PAIRWISE_LOSSES)}, not {loss!r}; set config.algorithm.rpo_alpha=0 "
            "(ORPO's NLL weight is config.algorithm.sft_weight)."
        )
    train_entropy = algo.train_entropy
    if not isinstance(train_entropy, bool):
        raise ValueError(f"config.algorithm.train_entropy={train_entropy!r}: must be True/False.")
    chunk = config.model.logps_chunk_size
    if train_entropy and chunk:
        raise ValueError(
            f"config.algorithm.train_entropy=True needs the full logits, which "
            f"config.model.logps_chunk_size={chunk} never builds; set one of them off."
        )
    if loss in losses.PAIRWISE_LOSSES or loss == "simpo":
        # Each loss checks its own hyperparameters; run it once on zeros so a bad value fails
        # here, naming the config field, instead of inside the jitted step.
        zeros = jnp.zeros((1,))
        try:
            _pairwise_loss(config)(zeros, zeros, zeros, zeros)
        except ValueError as err:
            raise ValueError(
                f"config.algorithm (loss={loss!r}, beta={beta}, "
                f"label_smoothing={algo.label_smoothing}): {err}"
            ) from err


def _average_logps(config: Any) -> bool:
    """Length-normalised log-probs: IPO as TRL runs it, unless ``algorithm.average_logps`` says."""
    value = config.algorithm.average_logps
    return config.algorithm.loss == "ipo" if value is None else bool(value)


class HParams(NamedTuple):
    """The objective's scalar hyperparameters that may be traced arrays, not constants.

    :func:`objective` reads them from ``config.algorithm`` unless given; a sweep
    (:mod:`prefjax.train.sweep`) passes each member's as arrays under ``jax.vmap``, so members
    differing only in these share one compiled step.

    Attributes:
      beta: ``config.algorithm.beta``, scalar.
      label_smoothing: ``config.algorithm.label_smoothing``, scalar.
    """

    beta: jax.typing.ArrayLike
    label_smoothing: jax.typing.ArrayLike


def hparams_from_config(config: Any) -> HParams:
    """``config.algorithm``'s beta and label smoothing as Python floats."""
    algo = config.algorithm
    return HParams(float(algo.beta), float(algo.label_smoothing))


def _pairwise_loss(config: Any, hparams: HParams | None = None) -> Callable[..., Any]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> losses.PreferenceLossOutput``
    with the loss's hyperparameters from ``config.algorithm`` (beta and label smoothing from
    ``hparams`` when given; pairwise losses and SimPO; SimPO reads the policy's length-averaged
    log-probs only)."""
    algo = config.algorithm
    beta, smoothing = hparams or hparams_from_config(config)
    if algo.loss == "simpo":
        gamma = float(algo.gamma)
        return lambda pc, pr, rc, rr: losses.simpo_loss(
            pc, pr, beta=beta, gamma=gamma, label_smoothing=smoothing
        )
    fn = losses.PAIRWISE_LOSSES[algo.loss]
    return lambda pc, pr, rc, rr: fn(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)


# ----------------------------------------------------------------------------------------------
# Policy and reference log-probs
# ----------------------------------------------------------------------------------------------


def _forwards(
    model: Any, config: Any, *, entropy: bool = False
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``policy(params, frozen, tokens, key) -> (logps, counts, entropy)`` and
    ``reference(frozen, batch, tokens) -> logps`` over one ``[batch, k, seq]`` (or ``[batch,
    seq]``) token triple; with ``entropy``, the policy's ``entropy`` is its summed next-token
    entropy over each response's tokens, ``None`` without, or where the full logits are never
    built (``logps_chunk_size``)."""
    chunk = config.model.logps_chunk_size
    lora = common.uses_lora(config)
    kind = config.algorithm.reference
    entropy = entropy and not chunk

    def policy(params, frozen, tokens, key=None):
        if lora:  # ``key`` switches LoRA dropout on (training only)
            return _logps(
                model, frozen, tokens, lora=params, chunk_size=chunk, key=key, entropy=entropy
            )
        return _logps(model, params, tokens, chunk_size=chunk, entropy=entropy)

    def ref(frozen, batch, tokens):
        if kind == "precomputed":
            return batch["ref_logps"].astype(jnp.float32)
        if kind == "none":
            return jnp.zeros(common.sequence_shape(tokens), jnp.float32)
        # "copy": frozen is the reference; "lora_base": frozen is the base, adapters off.
        logps, _, _ = _logps(model, jax.lax.stop_gradient(frozen), tokens, chunk_size=chunk)
        return jax.lax.stop_gradient(logps)

    return policy, ref


def reference_logps(model: Any, config: Any) -> Callable[[Any, Batch], jax.Array]:
    """``ref(frozen, batch) -> [batch, k]``: the reference log-probs the objective uses, alone.

    What the step computes inside :func:`objective` (a frozen copy, the LoRA base, a
    precomputed column, or zeros without a reference); a sweep computes it once per batch for all
    its members and hands it to them as the batch's ``ref_logps``.
    """
    _, ref = _forwards(model, config)
    return lambda frozen, batch: ref(frozen, batch, common.batch_tokens(batch))


def _logps(
    model: Any, params: Any, tokens: tuple, *, entropy: bool = False, **kwargs: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Summed response log-probs, token counts and (``entropy``: full logits only) summed
    next-token entropies, with the tokens' leading shape (``[batch, k]`` for packed tokens);
    the entropy is ``None`` without ``entropy``."""
    if isinstance(tokens, common.PackedTokens):
        out = common.packed_response_logps(model, params, tokens, entropy=entropy, **kwargs)
    elif tokens[0].ndim == 2:
        out = common.response_logps(model, params, *tokens, entropy=entropy, **kwargs)
    else:
        k = tokens[0].shape[1]
        flat = (common.flatten_responses(x) for x in tokens)  # [batch, k, seq] -> [k * batch, seq]
        out = common.response_logps(model, params, *flat, entropy=entropy, **kwargs)
        out = tuple(common.unflatten_responses(x, k) for x in out)  # [k * batch] -> [batch, k]
    return out if entropy else (*out, None)


# The policy and reference passes are one jitted program but not one numeric path: the policy's
# forward sits under ``value_and_grad`` (its activations are kept for the backward pass, and XLA
# fuses and orders it differently), so at policy == reference their log-probs still differ by
# float32 rounding, and the sign of that noise would decide ``rewards/accuracy`` at step 0 (0.53,
# 0.47, 0.56 on three batches of the launcher's default on 8 CPU devices, instead of 0.5). Running
# both through one path exactly would need the reference stacked beside the policy (a third copy
# of the weights), so a margin within rounding of zero counts as a tie instead.
#
# The bound: a summed log-prob is a reduction of same-signed terms (log-probs are <= 0), so its
# float32 error is at most ~log2(T) ulps of its own magnitude under XLA's tree reductions (the
# pairwise-summation bound), and each log-ratio and difference adds one more; k = 8 covers 2^8
# tokens and is ~20x the largest deviation measured at policy == reference (0.41 eps * the sum of
# |log-probs|, over float32 and bfloat16 compute, 8 devices, grad accumulation, chunked log-probs
# and responses of 6-60 tokens). A genuine margin is rarely that small: 8 eps * sum |log-probs|
# is 4e-4 nats of log-ratio for four log-probs of 100 nats, ~3 ulps of each.
_TIE_ULPS = 8.0


def tie_tolerance(beta: float, *logps: jax.Array) -> jax.Array:
    """Largest implicit-reward difference that is float32 rounding of ``beta * logps``.

    Args:
      beta: the implicit rewards' scale (``reward = beta * (log pi - log pi_ref)``).
      *logps: the ``[batch]`` (or ``[batch, k]``) log-probs the compared rewards are made of,
        policy and reference, each side.

    Returns:
      ``_TIE_ULPS * eps_f32 * beta * sum(|logps|)``, broadcast over ``logps``' shape.
    """
    scale = sum(jnp.abs(x.astype(jnp.float32)) for x in logps)
    return _TIE_ULPS * jnp.finfo(jnp.float32).eps * beta * scale


def _denominators(batch: Batch) -> Mapping[str, jax.Array]:
    return {"loss": jnp.maximum(jnp.sum(common.example_weights(batch)), 1.0)}


def _stat(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of x * w, sum of w)``: one metric's :data:`~prefjax.train.common.Stats` entry."""
    return jnp.sum(x.astype(jnp.float32) * w), jnp.sum(w)


def _entropy_stat(entropy: jax.Array | None, counts: jax.Array, w: jax.Array) -> Stats:
    """``entropy/response``: the policy's mean next-token entropy per response token (nats)
    over the ``[batch, k]`` responses of the examples weighted ``w [batch]``; nothing when the
    forward built no full logits."""
    if entropy is None:
        return {}
    w = w[:, None] if entropy.ndim == 2 else w
    return {"entropy/response": (jnp.sum(entropy * w), jnp.sum(counts * w))}


def finalize(stats: Stats) -> Metrics:
    """Means, the length-bias correlation from its moments, and KTO's reward margin."""
    metrics = common.means(stats)
    moments = {k.split("/", 1)[1]: metrics.pop(k) for k in list(metrics) if "length_bias/" in k}
    if moments:
        m = moments
        cov = m["xy"] - m["x"] * m["y"]
        var = (m["xx"] - m["x"] ** 2) * (m["yy"] - m["y"] ** 2)
        ok = var > 1e-12
        metrics["length_bias/corr"] = jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, var, 1.0)), 0.0)
    if "rewards/margin" not in metrics:  # KTO: chosen and rejected are different examples
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


# ----------------------------------------------------------------------------------------------
# Objectives on one micro-batch: (params, batch, frozen, key, denominators) -> (loss, stats)
# ----------------------------------------------------------------------------------------------


def _pair_stats(
    rewards: jax.Array, logps: jax.Array, refs: jax.Array, counts: jax.Array, w, tie
) -> Stats:
    """Metrics of ``[batch, 2]`` (chosen, rejected) rewards, log-probs and lengths."""
    rewards = rewards.astype(jnp.float32)
    margin = rewards[:, 0] - rewards[:, 1]
    length_diff = counts[:, 0] - counts[:, 1]
    s = lambda x: _stat(x, w)
    return {
        "rewards/chosen": s(rewards[:, 0]),
        "rewards/rejected": s(rewards[:, 1]),
        "rewards/margin": s(margin),
        # Ties (|margin| <= tie, float32 rounding: policy == reference at step 0) count one
        # half, so accuracy starts at 0.5.
        "rewards/accuracy": s(common.agreement(margin, tie)),
        "logps/chosen": s(logps[:, 0]),
        "logps/rejected": s(logps[:, 1]),
        "kl/logratio": s(jnp.mean(logps - refs, axis=1)),
        "length/chosen": s(counts[:, 0]),
        "length/rejected": s(counts[:, 1]),
        # Moments for the length-bias correlation (margin vs. chosen-minus-rejected length).
        "length_bias/x": s(length_diff),
        "length_bias/y": s(margin),
        "length_bias/xy": s(length_diff * margin),
        "length_bias/xx": s(length_diff**2),
        "length_bias/yy": s(margin**2),
    }


def _pairwise_objective(
    model: Any, config: Any, hparams: HParams, entropy: bool
) -> Callable[..., tuple[jax.Array, Stats]]:
    algo = config.algorithm
    name, beta = algo.loss, hparams.beta
    average = _average_logps(config)
    policy, ref = _forwards(model, config, entropy=entropy)
    sft_weight, rpo_alpha = float(algo.sft_weight), float(algo.rpo_alpha)
    pair_loss = None if name == "orpo" else _pairwise_loss(config, hparams)

    def fn(params, batch, frozen, key, denominators):
        w = common.example_weights(batch)
        tokens = common.batch_tokens(batch)  # [batch, 2, seq], or packed rows
        logps, counts, entropy = policy(params, frozen, tokens, key)  # [batch, 2]
        refs = ref(frozen, batch, tokens)  # [batch, 2]
        avg = safe_div(logps, counts)  # per-token log-probs
        extra: Stats = {}
        if name in REFERENCE_FREE:
            pc, pr, rc, rr = avg[:, 0], avg[:, 1], None, None
            tie = tie_tolerance(beta, pc, pr)
            if name == "orpo":
                out = losses.orpo_loss(pc, pr, beta=beta)
                # ORPO = NLL of the chosen response (length-normalised) + the odds-ratio term.
                per_example = sft_weight * (-pc) + out.loss
            else:
                out = pair_loss(pc, pr, rc, rr)
                per_example = out.loss
        else:
            used, used_ref = (avg, safe_div(refs, counts)) if average else (logps, refs)
            pc, pr, rc, rr = used[:, 0], used[:, 1], used_ref[:, 0], used_ref[:, 1]
            out = pair_loss(pc, pr, rc, rr)
            per_example = out.loss
            tie = tie_tolerance(beta, pc, pr, rc, rr)
            if rpo_alpha:
                # RPO (Pang et al., 2024, Eq. 2): + alpha * the chosen response's NLL per token.
                # Its two parts: loss = loss/preference + rpo_alpha * nll/chosen.
                per_example = per_example + rpo_alpha * (-avg[:, 0])
                extra = {"loss/preference": _stat(out.loss, w), "nll/chosen": _stat(-avg[:, 0], w)}
        loss = jnp.sum(per_example * w) / denominators["loss"]
        rewards = jnp.stack([out.chosen_rewards, out.rejected_rewards], axis=1)
        stats = _pair_stats(rewards, logps, refs, counts, w, tie)
        if name in REFERENCE_FREE:
            del stats["kl/logratio"]  # no reference: nothing to compare with
        return loss, {**stats, **extra, **_entropy_stat(entropy, counts, w)}

    return fn


def _listwise_objective(
    model: Any, config: Any, hparams: HParams, entropy: bool
) -> Callable[..., tuple[jax.Array, Stats]]:
    beta = hparams.beta
    policy, ref = _forwards(model, config, entropy=entropy)

    def fn(params, batch, frozen, key, denominators):
        w = common.example_weights(batch)
        tokens = common.batch_tokens(batch)  # [batch, k, seq], or packed rows
        logps, counts, entropy = policy(params, frozen, tokens, key)  # [batch, k]
        refs = ref(frozen, batch, tokens)
        mask = batch["response_mask"].astype(jnp.float32)
        out = losses.listwise_dpo_loss(logps, refs, beta=beta, mask=mask)
        loss = jnp.sum(out.loss * w) / denominators["loss"]
        rewards = beta * (logps - refs)  # [batch, k]
        # Best = first response; worst = last valid response of each row.
        ends = lambda x: jnp.stack([x[:, 0], common.last_valid(x, mask)], axis=1)
        size = jnp.abs(logps) + jnp.abs(refs)  # [batch, k]
        last_tie = tie_tolerance(beta, *(ends(x)[:, i] for x in (logps, refs) for i in (0, 1)))
        stats = _pair_stats(ends(rewards), ends(logps), ends(refs), ends(counts), w, last_tie)
        # Fraction of ordered pairs (i before j, both valid) with reward_i > reward_j, ties (within
        # float32 rounding, as at policy == reference) counting one half, as for pairs.
        tie = tie_tolerance(beta, size[:, :, None], size[:, None, :])  # [batch, k, k]
        stats["rewards/accuracy"] = _stat(common.ranking_accuracy(rewards, mask, tie), w)
        valid = None if entropy is None else entropy * mask  # the row's real responses only
        return loss, {**stats, **_entropy_stat(valid, counts * mask, w)}

    return fn


def mismatched_pairs(
    input_ids: jax.Array, attention_mask: jax.Array, loss_mask: jax.Array, *, shift: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prompt of example ``i`` followed by the response of example ``(i + shift) % batch``.

    KTO's reference point ``z_ref = KL(pi || pi_ref)`` is estimated on such mismatched pairs
    (Ethayarajh et al., 2024, Sec. 4; TRL's ``KL`` completions). Works for any padding side: the
    prompt tokens (attended, not in the loss mask) and response tokens (loss mask) are compacted
    with a stable argsort; the result is right-padded with the row's pad id (token 0 of padding
    is never attended) and truncated to ``seq`` tokens.

    Args:
      input_ids, attention_mask, loss_mask: ``[batch, seq]``.
      shift: which other example's response to take.

    Returns:
      ``(input_ids, attention_mask, loss_mask)`` of the mismatched sequences, ``[batch, seq]``.
    """
    num, seq = input_ids.shape
    prompt_mask = (attention_mask > 0) & (loss_mask == 0)
    response_mask = loss_mask > 0
    # Stable argsort of "not in mask" lists the mask's positions first, in order.
    prompt_order = jnp.argsort(~prompt_mask, axis=1, stable=True)  # [batch, seq]
    response_order = jnp.argsort(~response_mask, axis=1, stable=True)
    prompt_len = jnp.sum(prompt_mask, axis=1)  # [batch]
    other = (jnp.arange(num) + shift) % num
    response_len = jnp.sum(response_mask, axis=1)[other]
    t = jnp.arange(seq)[None, :]  # [1, seq]
    in_prompt = t < prompt_len[:, None]
    in_response = (~in_prompt) & (t - prompt_len[:, None] < response_len[:, None])
    prompt_tokens = jnp.take_along_axis(input_ids, prompt_order, axis=1)
    response_src = jnp.take_along_axis(
        response_order[other], jnp.clip(t - prompt_len[:, None], 0, seq - 1), axis=1
    )
    response_tokens = jnp.take_along_axis(input_ids[other], response_src, axis=1)
    ids = jnp.where(in_prompt, prompt_tokens, jnp.where(in_response, response_tokens, 0))
    attn = (in_prompt | in_response).astype(attention_mask.dtype)
    lmask = in_response.astype(loss_mask.dtype)
    return ids.astype(input_ids.dtype), attn, lmask


def _kto_objective(
    model: Any, config: Any, entropy: bool
) -> Callable[..., tuple[jax.Array, Stats]]:
    algo = config.algorithm
    beta = float(algo.beta)
    weights = dict(
        desirable_weight=float(algo.desirable_weight),
        undesirable_weight=float(algo.undesirable_weight),
    )
    policy, ref = _forwards(model, config, entropy=entropy)

    def fn(params, batch, frozen, key, denominators):
        num = batch["input_ids"].shape[0]
        w = common.example_weights(batch)
        tokens = tuple(batch[n] for n in common.TOKENS)  # [batch, seq]
        # Matched and mismatched in one forward pass: 2 x [batch, seq] -> [2 * batch, seq].
        both = tuple(
            jnp.concatenate([x, y], 0)
            for x, y in zip(tokens, mismatched_pairs(*tokens), strict=True)
        )
        logps, counts, entropy = policy(params, frozen, both, key)
        ref_logps = ref(frozen, batch, both)
        pol, pol_kl = logps[:num], logps[num:]
        rl, rl_kl = ref_logps[:num], ref_logps[num:]
        # z_ref: batch mean of the mismatched log-ratio, clamped at 0, never differentiated.
        kl = losses.kto_reference_point(pol_kl, rl_kl, mask=w)
        desirable = batch["label"].astype(jnp.float32)
        out = losses.kto_loss(pol, rl, desirable, kl, beta=beta, **weights)
        loss = jnp.sum(out.loss * w) / denominators["loss"]
        rewards = beta * (pol - rl)
        agree = common.agreement(rewards, tie_tolerance(beta, pol, rl))  # 1: reward > 0
        good, bad = desirable * w, (1.0 - desirable) * w
        stats = {
            "rewards/chosen": _stat(rewards, good),
            "rewards/rejected": _stat(rewards, bad),
            # Desirable responses should get reward > 0, undesirable ones < 0; a reward within
            # float32 rounding of 0 (policy == reference) counts one half.
            "rewards/accuracy": _stat(agree * desirable + (1.0 - agree) * (1.0 - desirable), w),
            "logps/chosen": _stat(pol, good),
            "logps/rejected": _stat(pol, bad),
            "kl/reference_point": (kl * jnp.sum(w), jnp.sum(w)),
            "kl/logratio": _stat(pol - rl, w),
            "length/chosen": _stat(counts[:num], good),
            "length/rejected": _stat(counts[:num], bad),
            # On the examples' own responses (the first half), not the mismatched ones.
            **_entropy_stat(None if entropy is None else entropy[:num], counts[:num], w),
        }
        return loss, stats

    return fn


def objective(model: Any, config: Any, *, hparams: HParams | None = None) -> Objective:
    """The :class:`~prefjax.train.common.Objective` of ``config.algorithm.loss``.

    ``hparams`` (beta, label smoothing; default ``config.algorithm``'s) may be traced arrays, so
    one compiled step serves every value (:mod:`prefjax.train.sweep`); KTO reads the config's.
    The eval step's loss records ``entropy/response``; the train step's only with
    ``config.algorithm.train_entropy``.
    """
    loss = config.algorithm.loss
    hparams = hparams or hparams_from_config(config)

    def build(entropy: bool) -> Callable[..., tuple[jax.Array, Stats]]:
        if loss == "listwise":
            return _listwise_objective(model, config, hparams, entropy)
        if loss == "kto":
            return _kto_objective(model, config, entropy)
        return _pairwise_objective(model, config, hparams, entropy)

    train_entropy = bool(config.algorithm.train_entropy)
    fn = build(train_entropy)
    eval_fn = fn if train_entropy else build(True)
    beta = hparams.beta if reference(config) != "none" else None
    return Objective(fn, _denominators, finalize, kl_coefficient=beta, eval_loss=eval_fn)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------


def run(config: Any, workdir: str) -> Any:
    """Trains with ``config`` and writes checkpoints/metrics to ``workdir`` (the generic loop).

    The SFT warm-up is a stage of a pipeline (``experiments.pipelines.sft_then_dpo``, what
    ``python -m experiments.dpo`` runs), not of this algorithm: a config asking for one is refused
    here rather than trained without it.
    """
    if "sft_warmup" in config and config.sft_warmup.num_steps:
        raise ConfigError(
            f"config.sft_warmup.num_steps={config.sft_warmup.num_steps}: the SFT warm-up is a "
            "pipeline stage; run experiments.pipelines.sft_then_dpo(config, workdir) (what "
            "`python -m experiments.dpo` does), or set it to 0"
        )
    return loop.run(config, workdir, sys.modules[__name__])
