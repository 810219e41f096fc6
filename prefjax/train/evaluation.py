"""Evaluation helpers: exact metric averaging, generation, and the built-in tasks' ground truth.

* :func:`finalize_metrics` turns the ``{name: (sum, count)}`` dicts of the eval steps, summed over
  batches (and hosts), into means, and adds ``length_bias/corr`` -- the correlation between the
  implicit-reward margin and the chosen-minus-rejected length (length bias: a DPO run whose margin
  mostly tracks length is learning "longer is better").
* :func:`generate` decodes greedy or sampled responses with :func:`prefjax.models.generate` (the
  jitted KV-cache sampler), :func:`gold_reward_of_generations` scores them with a task's
  programmatic gold reward and reports their length statistics, :func:`sampled_kl_to_reference`
  estimates ``KL(pi_theta || pi_ref)`` on held-out prompts from the policy's own samples (the real
  KL, not the log-ratio on data responses that the eval steps report as ``kl/logratio``).
* :func:`bandit_policy` and :func:`bandit_metrics` read a model's distribution over a
  :class:`prefjax.data.Bandit`'s arms and compare it with the closed-form optimum
  ``pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)`` (``kl_to_optimum`` = ``KL(pi_theta || pi*)``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import data, models
from prefjax.train import common

# ----------------------------------------------------------------------------------------------
# Exact averaging of eval metrics
# ----------------------------------------------------------------------------------------------


def merge_metric_sums(
    total: dict[str, tuple[float, float]] | None, new: Mapping[str, Any]
) -> dict[str, tuple[float, float]]:
    """Adds one eval step's ``{name: (sum, count)}`` into a running total (host floats)."""
    total = {} if total is None else dict(total)
    for name, (num, den) in jax.device_get(dict(new)).items():
        a, b = total.get(name, (0.0, 0.0))
        total[name] = (a + float(num), b + float(den))
    return total


def finalize_metrics(sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``{name: sum / count}`` on the host (0 where the count is 0).

    The loop finalises with the algorithm's own ``objective.finalize`` instead (the means plus
    the metrics derived from them, as in the train step); this is the plain mean.

    >>> finalize_metrics({"loss": (3.0, 4.0), "rewards/accuracy": (6.0, 8.0)})
    {'loss': 0.75, 'rewards/accuracy': 0.75}
    """
    return {
        name: float(num) / float(den) if float(den) else 0.0 for name, (num, den) in sums.items()
    }


def evaluate_batches(
    eval_step: Any, params: Any, batches: Iterable[Any], frozen: Any, *, finalize: Any = None
) -> dict:
    """Runs a (jitted) eval step over ``batches`` and returns exact means.

    ``finalize``: the objective's finalisation (``setup.objective.finalize``, which adds the
    derived metrics such as ``rewards/std``); default :func:`finalize_metrics`.
    """
    total: dict[str, tuple[float, float]] = {}
    for batch in batches:
        total = merge_metric_sums(total, eval_step(params, batch, frozen))
    if finalize is None:
        return finalize_metrics(total)
    return {name: float(value) for name, value in finalize(total).items()}


def response_length_stats(mask: Any, *, prefix: str = "length") -> dict[str, float]:
    """Mean, std, min and max of response lengths (``mask`` ``[batch, seq]`` of 0/1)."""
    lengths = np.asarray(mask).astype(np.float64).sum(-1)
    return {
        f"{prefix}/mean": float(lengths.mean()),
        f"{prefix}/std": float(lengths.std()),
        f"{prefix}/min": float(lengths.min()),
        f"{prefix}/max": float(lengths.max()),
    }


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def generate(
    model: Any,
    params: Any,
    prompt_input_ids: Any,
    prompt_attention_mask: Any,
    *,
    max_new_tokens: int,
    eos_id: int,
    greedy: bool = True,
    temperature: float = 1.0,
    key: jax.Array | None = None,
    lora: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy or sampled responses to prompts as NumPy arrays: :func:`prefjax.models.generate`
    (the jitted KV-cache sampler) with the evaluation's defaults.

    Args:
      model: an LM ``prefjax.models.Model``.
      params: its parameters (the base when ``lora`` is given).
      prompt_input_ids, prompt_attention_mask: ``[batch, prompt]``, left-padded preferably.
      max_new_tokens: tokens decoded per row (rows stop at ``eos_id``).
      eos_id: end-of-sequence token (kept in the response, included in its mask; also written
        after a row has ended).
      greedy: argmax decoding; otherwise sample at ``temperature`` with ``key``.
      key: PRNG key for sampling (default ``jax.random.key(0)``).
      lora: optional adapters.

    Returns:
      ``(tokens [batch, max_new_tokens], response_mask [batch, max_new_tokens])``; the mask is 1
      up to and including the first EOS.
    """
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling.")
    out = models.generate(
        model,
        params,
        prompt_input_ids,
        prompt_attention_mask,
        key=jax.random.key(0) if key is None else key,
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        eos_id=eos_id,
        pad_id=eos_id,
        lora=lora,
    )
    return np.asarray(out.tokens), np.asarray(out.mask)


def unpad(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Rows of ``ids`` without their masked (padding) positions, as lists of ints."""
    rows = zip(ids, mask, strict=True)
    return [[int(t) for t, m in zip(row, mrow, strict=True) if m] for row, mrow in rows]


def score_generations(
    model: Any,
    params: Any,
    task: Any,
    tokenizer: Any,
    prompt_batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    key: jax.Array | None = None,
    lora: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes a response to every prompt and scores it with the task's gold reward.

    Args:
      task, tokenizer, prompt_batch: as :func:`gold_reward_of_generations`.
      max_new_tokens, greedy, temperature, key, lora: decoding (:func:`generate`).

    Returns:
      ``(rewards [batch] float64, tokens [batch, new], response_mask [batch, new])``; a reward is
      ``nan`` where the task cannot score the response (the bandit: not an arm).
    """
    ids = np.asarray(prompt_batch["prompt_input_ids"])
    mask = np.asarray(prompt_batch["prompt_attention_mask"])
    tokens, response_mask = generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        greedy=greedy,
        temperature=temperature,
        key=key,
        lora=lora,
    )
    rewards = task.gold_rewards_from_tokens(
        tokenizer, unpad(ids, mask), unpad(tokens, response_mask)
    ).astype(np.float64)
    return rewards, tokens, response_mask


def gold_reward_of_generations(
    model: Any,
    params: Any,
    task: Any,
    tokenizer: Any,
    prompt_batch: Mapping[str, Any],
    *,
    prefix: str = "gold",
    **decode: Any,
) -> dict[str, float]:
    """Mean gold reward (and length statistics) of responses decoded for a prompt batch.

    Args:
      task: a built-in task with ``gold_rewards_from_tokens`` (``RepeatTask``, ``Bandit``).
      tokenizer: the tokenizer the prompts were encoded with (``eos_id``, ``decode``).
      prompt_batch: ``prompt_input_ids`` / ``prompt_attention_mask`` ``[batch, prompt]``,
        left-padded (``BatchIterator(..., pad_side="left")`` or ``collate(..., pad_side="left")``).
      prefix: the metric names' prefix.
      **decode: :func:`score_generations`' decoding arguments (``max_new_tokens``, ``greedy``,
        ``temperature``, ``key``, ``lora``).

    Returns:
      ``{prefix/reward, prefix/reward_std, prefix/eos_fraction, prefix/length/mean, ...}``; the
      bandit's gold reward is ``nan`` for a response that is not an arm, so those are averaged
      over arm responses only and ``prefix/valid_fraction`` reports how many were.
    """
    rewards, tokens, response_mask = score_generations(
        model, params, task, tokenizer, prompt_batch, **decode
    )
    return summarize_generations(rewards, tokens, response_mask, tokenizer.eos_id, prefix=prefix)


def summarize_generations(
    rewards: np.ndarray, tokens: np.ndarray, response_mask: np.ndarray, eos_id: int, *, prefix: str
) -> dict[str, float]:
    """Mean/std gold reward over the scorable responses, EOS fraction and length statistics."""
    valid = np.isfinite(rewards)
    eos = ((tokens == eos_id) & (response_mask > 0)).any(-1)
    out = {
        f"{prefix}/reward": float(rewards[valid].mean()) if valid.any() else float("nan"),
        f"{prefix}/reward_std": float(rewards[valid].std()) if valid.any() else float("nan"),
        f"{prefix}/valid_fraction": float(valid.mean()),
        f"{prefix}/eos_fraction": float(eos.mean()),
    }
    out.update(response_length_stats(response_mask, prefix=f"{prefix}/length"))
    return out


def sampled_kl_to_reference(
    model: Any,
    params: Any,
    ref_params: Any,
    prompt_batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    eos_id: int,
    key: jax.Array | None = None,
    lora: Any = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """``KL(pi_theta || pi_ref)`` per sequence, estimated on the policy's own samples.

    Samples ``y ~ pi_theta(.|x)`` at ``temperature`` 1 for each held-out prompt and averages
    ``log pi_theta(y|x) - log pi_ref(y|x)`` (the unbiased k1 estimator of the sequence-level KL
    for ``temperature=1``). Under LoRA pass the base as both ``params`` and ``ref_params`` with the
    adapters as ``lora``.

    Returns:
      ``{"kl/sampled": mean, "kl/sampled_per_token": mean / mean length,
      "kl/sampled_length": mean response length}``.
    """
    ids = np.asarray(prompt_batch["prompt_input_ids"])
    mask = np.asarray(prompt_batch["prompt_attention_mask"])
    tokens, response_mask = generate(
        model,
        params,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        greedy=False,
        temperature=temperature,
        key=key,
        lora=lora,
    )
    full_ids = jnp.concatenate([ids, tokens], axis=1)  # [batch, prompt + new]
    full_attn = jnp.concatenate([mask, response_mask], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(mask), response_mask], axis=1)
    policy = _logps_fn(model)(params, lora, full_ids, full_attn, loss_mask)
    ref = _logps_fn(model)(ref_params, None, full_ids, full_attn, loss_mask)
    kl = np.asarray(policy - ref, np.float64)
    lengths = response_mask.sum(-1)
    return {
        "kl/sampled": float(kl.mean()),
        "kl/sampled_per_token": float(kl.sum() / max(lengths.sum(), 1)),
        "kl/sampled_length": float(lengths.mean()),
    }


@functools.lru_cache(maxsize=32)
def _logps_fn(model: Any):
    def fn(params, lora, ids, attn, loss_mask):
        return common.response_logps(model, params, ids, attn, loss_mask, lora=lora)[0]

    return jax.jit(fn)


# ----------------------------------------------------------------------------------------------
# Bandit: the closed-form optimum
# ----------------------------------------------------------------------------------------------


def _bandit_prompts(bandit: Any, tokenizer: Any) -> dict[str, np.ndarray]:
    records = [{"prompt": p, "prompt_id": f"bandit-{i}"} for i, p in enumerate(bandit.prompts)]
    max_len = max(len(tokenizer.encode(p)) for p in bandit.prompts) + 2
    ds = data.tokenize(
        records, tokenizer, "prompt", max_len=max_len, max_prompt_len=max_len, append_eos=False
    )
    return data.collate(ds, np.arange(len(ds)), max_len, pad_side="left")


def bandit_policy(
    model: Any, params: Any, bandit: Any, tokenizer: Any, *, lora: Any = None
) -> np.ndarray:
    """``[P, K]`` log-probabilities of the model's next token over the bandit's arms.

    The prompts are tokenised exactly as the bandit's datasets tokenise them (BOS, no EOS), the
    next-token logits after each prompt are restricted to the arm tokens and renormalised
    (``Bandit.arm_logprobs``).
    """
    batch = _bandit_prompts(bandit, tokenizer)
    logits = _last_logits_fn(model)(
        params, lora, batch["prompt_input_ids"], batch["prompt_attention_mask"]
    )
    return bandit.arm_logprobs(np.asarray(logits), tokenizer)


@functools.lru_cache(maxsize=32)
def _last_logits_fn(model: Any):
    def fn(params, lora, ids, attn):
        return model.apply(params, ids, attn, lora=lora)[:, -1].astype(jnp.float32)

    return jax.jit(fn)


def kl_divergence(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """``KL(p || q)`` over the last axis from log-probabilities."""
    p_log = np.asarray(p_log, np.float64)
    return (np.exp(p_log) * (p_log - np.asarray(q_log, np.float64))).sum(-1)


def bandit_metrics(
    model: Any,
    params: Any,
    bandit: Any,
    tokenizer: Any,
    beta: float,
    *,
    ref_logprobs: np.ndarray | None = None,
    lora: Any = None,
) -> dict[str, float]:
    """The trained policy against the bandit's closed-form KL-regularised optimum.

    Args:
      ref_logprobs: ``[P, K]`` reference log-probs over the arms -- for a model-based reference,
        ``bandit_policy(model, ref_params, ...)``; default the bandit's own table.

    Returns:
      ``bandit/kl_to_optimum`` (mean over prompts of ``KL(pi_theta || pi*)``),
      ``bandit/kl_to_reference``, ``bandit/expected_reward``, ``bandit/optimal_reward``,
      ``bandit/objective`` and ``bandit/optimal_objective`` (``E[r] - beta KL``).
    """
    logp = bandit_policy(model, params, bandit, tokenizer, lora=lora)
    ref = bandit.ref_logprobs if ref_logprobs is None else np.asarray(ref_logprobs)
    optimum = bandit.optimal_policy(beta, ref_logprobs=ref)
    probs = np.exp(logp)
    return {
        "bandit/kl_to_optimum": float(kl_divergence(logp, np.log(optimum)).mean()),
        "bandit/kl_to_reference": float(bandit.kl_to_reference(probs, ref).mean()),
        "bandit/expected_reward": float(bandit.expected_reward(probs).mean()),
        "bandit/optimal_reward": float(bandit.expected_reward(optimum).mean()),
        "bandit/objective": float(bandit.objective(probs, beta, ref).mean()),
        "bandit/optimal_objective": float(bandit.objective(optimum, beta, ref).mean()),
    }


def bt_accuracy_ceiling(
    chosen_gold: np.ndarray,
    rejected_gold: np.ndarray,
    *,
    temperature: float,
    flip_prob: float = 0.0,
) -> float:
    """Expected accuracy of the Bayes-optimal classifier on Bradley-Terry-labelled pairs.

    A pair whose gold rewards differ by ``d`` carries the label "the higher one wins" with
    probability ``p = (1 - eps) sigma(|d| / tau) + eps sigma(-|d| / tau)`` (ties: 1/2); predicting
    the higher gold reward is right with that probability, which no reward model can beat on
    average: the ceiling is ``mean(max(p, 1 - p))``.
    """
    d = np.abs(np.asarray(chosen_gold, np.float64) - np.asarray(rejected_gold, np.float64))
    if temperature == 0:
        p = np.where(d > 0, 1.0, 0.5)
    else:
        p = 1.0 / (1.0 + np.exp(-d / temperature))
    p = (1 - flip_prob) * p + flip_prob * (1 - p)
    return float(np.maximum(p, 1 - p).mean())
