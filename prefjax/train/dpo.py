"""Direct preference optimisation and its family: one jitted, sharded train step per variant.

What the step does, in order (``config.algorithm.loss`` picks the objective):

1. forward the policy once on chosen and rejected concatenated on the batch axis
   (``[2 * batch, seq]``) and sum the response log-probs (logits at ``t`` predict ``t + 1``);
2. take the reference log-probs: a frozen copy (``reference="copy"``), the LoRA base with adapters
   off (``"lora_base"``), or columns ``ref_chosen_logps`` / ``ref_rejected_logps`` precomputed once
   by :func:`precompute_reference_logps` (``"precomputed"``; no reference in memory);
3. call the loss from ``prefjax.losses`` -- any of ``PAIRWISE_LOSSES`` (sigmoid, robust, ipo,
   hinge, bco_pair, ...), ``listwise`` (Plackett-Luce over K responses), ``kto`` (unpaired
   feedback, KL reference point estimated on mismatched prompt/response pairs of the batch), or
   the reference-free ``orpo`` and ``simpo``;
4. differentiate, accumulate over micro-batches, clip, update (``prefjax.train.common``).

Metrics (means over the batch): ``loss``; ``rewards/chosen``, ``rewards/rejected`` (implicit
rewards ``beta * (log pi - log pi_ref)``), ``rewards/margin``, ``rewards/accuracy`` (fraction of
pairs with chosen reward above rejected, ties -- margins within float32 rounding of zero, see
:func:`tie_tolerance` -- counting one half, so 0.5 at policy == reference; listwise: of ordered
pairs; KTO: of desirable rewards above 0 and undesirable below); ``logps/chosen``,
``logps/rejected`` (summed response log-probs under the policy -- watch both fall together, the
usual DPO failure);
``kl/logratio`` (mean of ``log pi - log pi_ref`` over the batch's responses, a KL proxy on data
responses); ``length/chosen``, ``length/rejected`` (response tokens); plus the norms and
``train/skipped`` added by :func:`prefjax.train.common.make_update`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from prefjax import losses
from prefjax.train import common, loop
from prefjax.train import setup as train_setup
from prefjax.train.common import Batch, Metrics, Setup, get, safe_div
from prefjax.train.errors import ConfigError
from prefjax.train.reference import precompute_reference_logps  # noqa: F401  (public name)

SPECIAL_LOSSES = ("listwise", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
REFERENCES = ("copy", "lora_base", "precomputed", "none")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


# The Algorithm protocol (see prefjax.train): what the loop asks of this module.
NAME = "dpo"
HEAD = "lm"


def batch_kind(config: Any) -> str:
    """Pairs, except rankings for ``listwise`` and unpaired feedback for ``kto``."""
    loss = config.algorithm.loss
    return {"listwise": "listwise", "kto": "unpaired"}.get(loss, "pairwise")


def uses_reference(config: Any) -> bool:
    return config.algorithm.reference != "none"


def loss_names() -> tuple[str, ...]:
    """Every value ``config.algorithm.loss`` accepts for DPO."""
    return (*losses.PAIRWISE_LOSSES, *SPECIAL_LOSSES)


def validate_config(config: Any) -> None:
    """Start-up checks of the DPO fields, each error naming the field."""
    loss = get(config, "algorithm.loss", "sigmoid")
    if loss not in loss_names():
        raise ValueError(f"config.algorithm.loss={loss!r}: expected one of {loss_names()}.")
    reference = get(config, "algorithm.reference", "copy")
    if reference not in REFERENCES:
        raise ValueError(f"config.algorithm.reference={reference!r}: expected one of {REFERENCES}.")
    beta = float(get(config, "algorithm.beta", 0.1))
    if beta <= 0:
        raise ValueError(f"config.algorithm.beta={beta} must be > 0.")
    lora = common.lora_rank(config) > 0
    if loss in REFERENCE_FREE and reference != "none":
        raise ValueError(
            f"config.algorithm.reference={reference!r}: loss {loss!r} is reference-free; "
            "set config.algorithm.reference='none'."
        )
    if loss not in REFERENCE_FREE and reference == "none":
        raise ValueError(
            f"config.algorithm.reference='none': loss {loss!r} needs a reference "
            "('copy', 'lora_base' or 'precomputed')."
        )
    if reference == "lora_base" and not lora:
        raise ValueError(
            "config.algorithm.reference='lora_base' needs LoRA adapters: "
            "set config.model.lora.rank > 0."
        )
    if reference == "copy" and lora:
        raise ValueError(
            "config.algorithm.reference='copy' with LoRA (config.model.lora.rank > 0) would keep "
            "a second copy of the base; use 'lora_base' (the base, adapters off) or 'precomputed'."
        )
    if reference == "precomputed" and loss == "kto":
        raise ValueError(
            "config.algorithm.reference='precomputed' is not supported with loss='kto': the KL "
            "reference point pairs prompts with other examples' responses in each batch, so it "
            "cannot be computed ahead of time. Use 'copy' or 'lora_base'."
        )
    smoothing = float(get(config, "algorithm.label_smoothing", 0.0))
    if not 0.0 <= smoothing < 0.5:
        raise ValueError(f"config.algorithm.label_smoothing={smoothing!r}: must be in [0, 0.5).")
    for field in ("desirable_weight", "undesirable_weight") if loss == "kto" else ():
        if float(config.algorithm[field]) <= 0:
            raise ValueError(f"config.algorithm.{field}={config.algorithm[field]!r}: must be > 0.")
    if loss == "orpo" and float(config.algorithm.sft_weight) < 0:
        raise ValueError(
            f"config.algorithm.sft_weight={config.algorithm.sft_weight!r}: must be >= 0."
        )
    rpo_alpha = get(config, "algorithm.rpo_alpha", 0.0)
    if isinstance(rpo_alpha, bool) or not isinstance(rpo_alpha, (int, float)) or rpo_alpha < 0:
        raise ValueError(f"config.algorithm.rpo_alpha={rpo_alpha!r} must be a number >= 0.")
    if rpo_alpha and loss not in losses.PAIRWISE_LOSSES:
        raise ValueError(
            f"config.algorithm.rpo_alpha={rpo_alpha}: the RPO term applies to the pairwise losses "
            f"{tuple(losses.PAIRWISE_LOSSES)}, not {loss!r}; set config.algorithm.rpo_alpha=0 "
            "(ORPO's NLL weight is config.algorithm.sft_weight)."
        )
    if loss in losses.PAIRWISE_LOSSES or loss == "simpo":
        # Each loss checks its own hyperparameters; run it once on zeros so a bad value fails
        # here, naming the config field, instead of inside the jitted step.
        fn = losses.simpo_loss if loss == "simpo" else losses.PAIRWISE_LOSSES[loss]
        zeros = jnp.zeros((1,))
        args = (zeros, zeros) if loss == "simpo" else (zeros,) * 4
        try:
            fn(*args, **_pairwise_kwargs(config, fn))
        except ValueError as err:
            raise ValueError(
                f"config.algorithm (loss={loss!r}, beta={beta}, label_smoothing={smoothing}): {err}"
            ) from err


def _average_logps(config: Any) -> bool:
    """Length-normalised log-probs: IPO as TRL runs it (override: ``algorithm.average_logps``)."""
    loss = get(config, "algorithm.loss", "sigmoid")
    default = loss == "ipo"
    value = get(config, "algorithm.average_logps", None)
    return default if value is None or value == "" else bool(value)


def _pairwise_kwargs(config: Any, fn: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"beta": float(get(config, "algorithm.beta", 0.1))}
    if "label_smoothing" in params:
        kwargs["label_smoothing"] = float(get(config, "algorithm.label_smoothing", 0.0))
    if "gamma" in params:
        kwargs["gamma"] = float(get(config, "algorithm.gamma", 0.5))
    return kwargs


# ----------------------------------------------------------------------------------------------
# Policy and reference log-probs
# ----------------------------------------------------------------------------------------------


def _forwards(model: Any, config: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``policy(params, frozen, ids, attn, lmask)`` and ``reference(frozen, ids, attn, lmask)``."""
    chunk = common.logps_chunk_size(config)
    lora = common.lora_rank(config) > 0
    reference = get(config, "algorithm.reference", "copy")

    def policy(params, frozen, ids, attn, lmask, key=None):
        if lora:  # ``key`` switches LoRA dropout on (training only)
            return common.response_logps(
                model, frozen, ids, attn, lmask, lora=params, chunk_size=chunk, key=key
            )
        return common.response_logps(model, params, ids, attn, lmask, chunk_size=chunk)

    def ref(frozen, ids, attn, lmask):
        # "copy": frozen is the reference; "lora_base": frozen is the base, adapters off.
        if reference not in ("copy", "lora_base"):
            raise ValueError(f"reference {reference!r} has no live forward pass")
        logps, _ = common.response_logps(
            model, jax.lax.stop_gradient(frozen), ids, attn, lmask, chunk_size=chunk
        )
        return jax.lax.stop_gradient(logps)

    return policy, ref


def _example_weights(batch: Batch, size: int) -> jax.Array:
    """``example_mask`` (1 real row, 0 padding row) or ones."""
    if "example_mask" in batch:
        return batch["example_mask"].astype(jnp.float32)
    return jnp.ones((size,), jnp.float32)


def _concat_pair(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    # 2 x [batch, seq] -> [2 * batch, seq]: one forward pass for chosen and rejected.
    cat = lambda name: jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], 0)
    return cat("input_ids"), cat("attention_mask"), cat("loss_mask")


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


def _agreement(margin: jax.Array, tolerance: jax.Array) -> jax.Array:
    """1 where ``margin > tolerance``, 0 where ``margin < -tolerance``, 1/2 for a tie."""
    return jnp.where(margin > tolerance, 1.0, jnp.where(margin < -tolerance, 0.0, 0.5))


# ----------------------------------------------------------------------------------------------
# Loss functions on one micro-batch: (params, batch, frozen, key, denominators) -> (loss, sums)
# ----------------------------------------------------------------------------------------------


def _pair_sums(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    chosen_len: jax.Array,
    rejected_len: jax.Array,
    w: jax.Array,
    tie: jax.Array,
) -> dict[str, jax.Array]:
    f32 = lambda x: x.astype(jnp.float32)
    chosen_rewards, rejected_rewards = f32(chosen_rewards), f32(rejected_rewards)
    margin = chosen_rewards - rejected_rewards
    s = lambda x: jnp.sum(f32(x) * w)
    return {
        "rewards/chosen": s(chosen_rewards),
        "rewards/rejected": s(rejected_rewards),
        "rewards/margin": s(margin),
        # Ties (|margin| <= tie, float32 rounding: policy == reference at step 0) count one
        # half, so accuracy starts at 0.5.
        "rewards/accuracy": s(_agreement(margin, tie)),
        "logps/chosen": s(policy_chosen),
        "logps/rejected": s(policy_rejected),
        "kl/logratio": s(0.5 * ((policy_chosen - ref_chosen) + (policy_rejected - ref_rejected))),
        "length/chosen": s(chosen_len),
        "length/rejected": s(rejected_len),
        # Moments for the length-bias correlation (margin vs. chosen-minus-rejected length).
        "length_bias/x": s(chosen_len - rejected_len),
        "length_bias/y": s(margin),
        "length_bias/xy": s((chosen_len - rejected_len) * margin),
        "length_bias/xx": s((chosen_len - rejected_len) ** 2),
        "length_bias/yy": s(margin**2),
    }


def _pairwise_loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    name = get(config, "algorithm.loss", "sigmoid")
    reference = get(config, "algorithm.reference", "copy")
    beta = float(get(config, "algorithm.beta", 0.1))
    average = _average_logps(config)
    policy, ref = _forwards(model, config)
    sft_weight = float(get(config, "algorithm.sft_weight", 1.0))
    rpo_alpha = float(get(config, "algorithm.rpo_alpha", 0.0))
    if name in losses.PAIRWISE_LOSSES:
        loss_fn = losses.PAIRWISE_LOSSES[name]
        kwargs = _pairwise_kwargs(config, loss_fn)
    elif name == "simpo":
        simpo_kwargs = _pairwise_kwargs(config, losses.simpo_loss)

    def fn(params, batch, frozen, key, denominators):
        num = batch["chosen_input_ids"].shape[0]
        w = _example_weights(batch, num)
        rpo_sums = {}
        ids, attn, lmask = _concat_pair(batch)
        logps, counts = policy(params, frozen, ids, attn, lmask, key)  # [2 * batch]
        # [2 * batch] -> 2 x [batch]
        pc, pr, nc, nr = logps[:num], logps[num:], counts[:num], counts[num:]
        if reference == "precomputed":
            rc = batch["ref_chosen_logps"].astype(jnp.float32)
            rr = batch["ref_rejected_logps"].astype(jnp.float32)
        elif reference == "none":
            rc = rr = jnp.zeros_like(pc)
        else:
            ref_logps = ref(frozen, ids, attn, lmask)
            rc, rr = ref_logps[:num], ref_logps[num:]
        if name == "orpo":
            avg_c, avg_r = safe_div(pc, nc), safe_div(pr, nr)
            out = losses.orpo_loss(avg_c, avg_r, beta=beta)
            # ORPO = NLL of the chosen response (length-normalised) + the odds-ratio term.
            per_example = sft_weight * (-avg_c) + out.loss
            tie = tie_tolerance(beta, avg_c, avg_r)
        elif name == "simpo":
            avg_c, avg_r = safe_div(pc, nc), safe_div(pr, nr)
            out = losses.simpo_loss(avg_c, avg_r, **simpo_kwargs)
            per_example = out.loss
            tie = tie_tolerance(simpo_kwargs["beta"], avg_c, avg_r)
        else:
            if average:
                pc_, pr_ = safe_div(pc, nc), safe_div(pr, nr)
                rc_, rr_ = safe_div(rc, nc), safe_div(rr, nr)
            else:
                pc_, pr_, rc_, rr_ = pc, pr, rc, rr
            out = loss_fn(pc_, pr_, rc_, rr_, **kwargs)
            per_example = out.loss
            tie = tie_tolerance(beta, pc_, pr_, rc_, rr_)
            if rpo_alpha:
                # RPO (Pang et al., 2024, Eq. 2): + alpha * the chosen response's NLL per token.
                nll_chosen = -safe_div(pc, nc)
                per_example = per_example + rpo_alpha * nll_chosen
                # Its two parts: loss = loss/preference + rpo_alpha * nll/chosen.
                rpo_sums = {
                    "loss/preference": jnp.sum(out.loss.astype(jnp.float32) * w),
                    "nll/chosen": jnp.sum(nll_chosen * w),
                }
        loss = jnp.sum(per_example * w) / denominators["pairs"]
        sums = _pair_sums(out.chosen_rewards, out.rejected_rewards, pc, pr, rc, rr, nc, nr, w, tie)
        if reference == "none":
            del sums["kl/logratio"]  # no reference: nothing to compare with
        return loss, {**sums, **rpo_sums}

    return fn


def _listwise_loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    reference = get(config, "algorithm.reference", "copy")
    beta = float(get(config, "algorithm.beta", 0.1))
    policy, ref = _forwards(model, config)

    def fn(params, batch, frozen, key, denominators):
        num, k, seq = batch["input_ids"].shape
        w = _example_weights(batch, num)
        # [batch, k, seq] -> [batch * k, seq]
        flat = lambda x: x.reshape(num * k, seq)
        ids, attn, lmask = (flat(batch[n]) for n in ("input_ids", "attention_mask", "loss_mask"))
        logps, counts = policy(params, frozen, ids, attn, lmask, key)
        logps, counts = logps.reshape(num, k), counts.reshape(num, k)  # [batch * k] -> [batch, k]
        if reference == "precomputed":
            ref_logps = batch["ref_logps"].astype(jnp.float32)
        else:
            ref_logps = ref(frozen, ids, attn, lmask).reshape(num, k)
        mask = batch["response_mask"].astype(jnp.float32)
        out = losses.listwise_dpo_loss(logps, ref_logps, beta=beta, mask=mask)
        loss = jnp.sum(out.loss * w) / denominators["pairs"]
        rewards = beta * (logps - ref_logps)  # [batch, k]
        # Best = first response; worst = last valid response of each row.
        last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
        take = lambda x: jnp.take_along_axis(x, last[:, None], axis=1)[:, 0]
        # Fraction of ordered pairs (i before j, both valid) with reward_i > reward_j, ties (within
        # float32 rounding, as at policy == reference) counting one half, as for pairs.
        upper = jnp.triu(jnp.ones((k, k)), 1)
        pair_mask = mask[:, :, None] * mask[:, None, :] * upper
        size = jnp.abs(logps) + jnp.abs(ref_logps)  # [batch, k]
        tie = tie_tolerance(beta, size[:, :, None], size[:, None, :])  # [batch, k, k]
        correct = _agreement(rewards[:, :, None] - rewards[:, None, :], tie) * pair_mask
        accuracy = safe_div(jnp.sum(correct, (1, 2)), jnp.sum(pair_mask, (1, 2)))
        last_tie = tie_tolerance(beta, logps[:, 0], take(logps), ref_logps[:, 0], take(ref_logps))
        sums = _pair_sums(
            rewards[:, 0],
            take(rewards),
            logps[:, 0],
            take(logps),
            ref_logps[:, 0],
            take(ref_logps),
            counts[:, 0],
            take(counts),
            w,
            last_tie,
        )
        sums["rewards/accuracy"] = jnp.sum(accuracy * w)
        return loss, sums

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


def _kto_loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    beta = float(get(config, "algorithm.beta", 0.1))
    desirable_weight = float(get(config, "algorithm.desirable_weight", 1.0))
    undesirable_weight = float(get(config, "algorithm.undesirable_weight", 1.0))
    policy, ref = _forwards(model, config)

    def fn(params, batch, frozen, key, denominators):
        num = batch["input_ids"].shape[0]
        w = _example_weights(batch, num)
        ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        kl_ids, kl_attn, kl_lmask = mismatched_pairs(ids, attn, lmask)
        # 2 x [batch, seq] -> [2 * batch, seq]: matched and mismatched in one forward pass.
        all_ids = jnp.concatenate([ids, kl_ids], 0)
        all_attn = jnp.concatenate([attn, kl_attn], 0)
        all_lmask = jnp.concatenate([lmask, kl_lmask], 0)
        logps, counts = policy(params, frozen, all_ids, all_attn, all_lmask, key)
        ref_logps = ref(frozen, all_ids, all_attn, all_lmask)
        pol, pol_kl = logps[:num], logps[num:]
        rl, rl_kl = ref_logps[:num], ref_logps[num:]
        # z_ref: batch mean of the mismatched log-ratio, clamped at 0, never differentiated.
        kl = losses.kto_reference_point(pol_kl, rl_kl, mask=w)
        desirable = batch["label"].astype(jnp.float32)
        out = losses.kto_loss(
            pol,
            rl,
            desirable,
            kl,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
        loss = jnp.sum(out.loss * w) / denominators["pairs"]
        rewards = beta * (pol - rl)
        agree = _agreement(rewards, tie_tolerance(beta, pol, rl))  # 1: reward > 0
        good, bad = desirable * w, (1.0 - desirable) * w
        s = lambda x, m: jnp.sum(x.astype(jnp.float32) * m)
        sums = {
            "rewards/chosen": s(rewards, good),
            "rewards/rejected": s(rewards, bad),
            # Desirable responses should get reward > 0, undesirable ones < 0; a reward within
            # float32 rounding of 0 (policy == reference) counts one half.
            "rewards/accuracy": s(agree, good) + s(1.0 - agree, bad),
            "logps/chosen": s(pol, good),
            "logps/rejected": s(pol, bad),
            "kl/reference_point": kl * jnp.sum(w),
            "kl/logratio": s(pol - rl, w),
            "length/chosen": s(counts[:num], good),
            "length/rejected": s(counts[:num], bad),
        }
        return loss, sums

    return fn


def _denominators(config: Any) -> Callable[[Batch], Mapping[str, jax.Array]]:
    loss = get(config, "algorithm.loss", "sigmoid")

    def fn(batch: Batch) -> Mapping[str, jax.Array]:
        key = "input_ids" if loss in ("listwise", "kto") else "chosen_input_ids"
        w = _example_weights(batch, batch[key].shape[0])
        out = {"pairs": jnp.maximum(jnp.sum(w), 1.0)}
        if loss == "kto":
            desirable = batch["label"].astype(jnp.float32) * w
            out["desirable"] = jnp.sum(desirable)
            out["undesirable"] = jnp.sum(w) - out["desirable"]
        return out

    return fn


_BY_DESIRABILITY = {
    "rewards/chosen": "desirable",
    "rewards/rejected": "undesirable",
    "logps/chosen": "desirable",
    "logps/rejected": "undesirable",
    "length/chosen": "desirable",
    "length/rejected": "undesirable",
}


def _finalize(config: Any) -> Callable[[Any, Mapping[str, jax.Array]], Metrics]:
    loss = get(config, "algorithm.loss", "sigmoid")

    def fn(sums: Mapping[str, jax.Array], denominators: Mapping[str, jax.Array]) -> Metrics:
        out = {}
        for name, value in sums.items():
            if name.startswith("length_bias/"):
                continue
            den = denominators["pairs"]
            if loss == "kto" and name in _BY_DESIRABILITY:
                den = denominators[_BY_DESIRABILITY[name]]
            out[name] = safe_div(value, den)
        if loss == "kto":
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    return fn


def loss_fn(model: Any, config: Any) -> Callable[..., tuple[jax.Array, Any]]:
    """``(params, batch, frozen, key, denominators) -> (loss, sums)`` for ``algorithm.loss``."""
    loss = get(config, "algorithm.loss", "sigmoid")
    if loss == "listwise":
        return _listwise_loss_fn(model, config)
    if loss == "kto":
        return _kto_loss_fn(model, config)
    return _pairwise_loss_fn(model, config)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def make_train_step(
    model: Any, config: Any, *, mesh: Any = None, schedule: Any = None
) -> Callable[..., tuple[Any, Metrics]]:
    """``train_step(state, batch, frozen, key) -> (state, metrics)``, pure and unjitted.

    ``mesh`` (optional) keeps micro-batches split over ``("data", "fsdp")``; ``schedule`` adds a
    ``learning_rate`` metric.
    """
    return common.make_update(
        loss_fn(model, config),
        _denominators(config),
        _finalize(config),
        num_micro=common.grad_accum_steps(config),
        schedule=schedule,
        constrain=common.micro_batch_constraint(mesh),
    )


def make_eval_step(model: Any, config: Any) -> Callable[[Any, Batch, Any], Metrics]:
    """``eval_step(params, batch, frozen) -> {name: (sum, count)}`` on held-out pairs.

    Sums and counts let :func:`prefjax.train.evaluation.finalize_metrics` average exactly over
    batches and hosts (and compute ``length_bias/corr``, the correlation of the implicit-reward
    margin with the chosen-minus-rejected length).
    """
    fn = loss_fn(model, config)
    denominators_fn = _denominators(config)
    loss = get(config, "algorithm.loss", "sigmoid")

    def eval_step(params: Any, batch: Batch, frozen: Any) -> Metrics:
        den = denominators_fn(batch)
        ones = {k: jnp.ones_like(v) for k, v in den.items()}
        loss_sum, sums = fn(params, batch, frozen, None, ones)  # key None: no dropout
        out = {"loss": (loss_sum, den["pairs"])}
        for name, value in sums.items():
            count = den["pairs"]
            if loss == "kto" and name in _BY_DESIRABILITY:
                count = den[_BY_DESIRABILITY[name]]
            out[name] = (value, count)
        return out

    return eval_step


# ----------------------------------------------------------------------------------------------
# Setup: sharded state, frozen pytree and jitted steps
# ----------------------------------------------------------------------------------------------


def setup(config: Any, model: Any, mesh: Any, key: jax.Array) -> Setup:
    """Sharded train state, frozen pytree and jitted steps for ``config`` on ``mesh``.

    * no LoRA: trainable = a copy of ``model.params`` (the state is donated to each step);
      frozen = ``model.params`` themselves (``reference="copy"``) or ``None``
      (``"precomputed"``, ``"none"``).
    * LoRA: trainable = adapters from ``model.init_lora``; frozen = the base ``model.params``
      (the reference under ``"lora_base"``, and what the adapters sit on in every case).

    The frozen tree shares ``model.params``' buffers wherever they already have the mesh's
    sharding (resharded otherwise), so the weights are held twice, not three times; do not donate
    ``model.params`` to another computation while this setup is in use.
    """
    validate_config(config)
    return train_setup.build_setup(
        config, model, mesh, key, make_train_step, make_eval_step, needs_frozen_copy=True
    )


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
