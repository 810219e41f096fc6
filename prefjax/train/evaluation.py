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
* :func:`release_gate` reads a finished run's metric records and flags over-optimisation (proxy
  reward rising while the held-out gold reward falls), length growth, KL beyond a budget and
  entropy collapse, each with the step where it began (``python -m experiments.studies.gate``).
* :func:`distinct_n`, :func:`self_bleu` and :func:`length_matched_mean` (NumPy, on token lists)
  measure the diversity and length of samples; :func:`sample_responses` draws and scores them
  (gold reward, log-probs under the policy and the reference, per-token entropy) and
  :func:`diversity_metrics` summarises them (``python -m experiments.studies.diversity``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import data, losses, models
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
        logprobs=False,  # only the tokens are read
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


# ----------------------------------------------------------------------------------------------
# Release gate: warning signs in a finished run's metric records
# ----------------------------------------------------------------------------------------------

# Where each quantity the gate watches is recorded, per algorithm; the first name a run recorded
# (with at least one finite value) is the one read.
GATE_KEYS: dict[str, tuple[str, ...]] = {
    # The reward the policy is optimised for: the reward source's raw score of held-out samples
    # (PPO, GRPO/RLOO, online DPO: a reward model's score under reward.source="model"; the gold
    # reward itself under "gold"), of the train rollouts, or DPO's implicit reward margin
    # ``beta * (log-ratio chosen - log-ratio rejected)`` on held-out pairs.
    "proxy": (
        "eval/rollout/score_raw",
        "eval/rollout/score",
        "rollout/score_raw",
        "rollout/score",
        "eval/rewards/margin",
    ),
    # The built-in task's gold reward of responses to held-out prompts (sampled at temperature
    # 1, else greedy; the bandit's exact expected reward).
    "gold": ("eval/gold_reward_sampled", "eval/gold_reward"),
    # KL(pi_theta || pi_ref) in nats per response: sampled on held-out prompts (loop, online eval
    # step), the bandit's exact KL, PPO's / GRPO's rollout KL, DPO's log-ratio on held-out pairs.
    "kl": (
        "eval/kl",
        "eval/kl/sampled",
        "eval/bandit/kl_to_reference",
        "rollout/kl",
        "kl/sequence",
        "eval/kl/logratio",
    ),
    # Mean per-token entropy of the policy: on its own samples (online DPO's held-out samples,
    # PPO's and GRPO's rollouts), else on the responses of held-out pairs (the DPO family's eval
    # step), else on the train batch's responses (train records, algorithm.train_entropy).
    "entropy": (
        "eval/rollout/entropy",
        "rollout/entropy",
        "ppo/entropy",
        "eval/entropy/response",
        "entropy/response",
    ),
    # Mean response length in tokens: sampled and greedy held-out responses, rollouts.
    "length": (
        "eval/length/sampled",
        "eval/length/generated",
        "eval/rollout/length",
        "rollout/length",
    ),
}

GATE_CHECKS = ("overoptimisation", "length", "kl", "entropy")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Thresholds of :func:`release_gate` (and the metric names it reads).

    Attributes:
      gold_drop: over-optimisation: held-out gold reward this far (absolute, the gold reward's
        units; the built-in tasks' lie in [0, 1]) below its running maximum while the proxy is
        above its value at that maximum.
      max_length_ratio: length growth: mean response length over its first recorded value.
      kl_budget: KL(pi_theta || pi_ref) in nats per response.
      min_entropy_fraction: entropy collapse: entropy below this fraction of its first value.
      patience: consecutive records a condition must hold to raise a flag (1: one record).
      keys: per quantity (``proxy``, ``gold``, ``kl``, ``entropy``, ``length``), the metric names
        to look for, in order (default :data:`GATE_KEYS`).
    """

    gold_drop: float = 0.05
    max_length_ratio: float = 1.5
    kl_budget: float = 10.0
    min_entropy_fraction: float = 0.5
    patience: int = 1
    keys: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(GATE_KEYS))

    def __post_init__(self):
        for name in ("gold_drop", "kl_budget", "min_entropy_fraction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"gate {name}={getattr(self, name)!r}: must be >= 0")
        if not self.max_length_ratio > 0:
            raise ValueError(f"gate max_length_ratio={self.max_length_ratio!r}: must be > 0")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ValueError(f"gate patience={self.patience!r}: must be an integer >= 1")
        if self.patience < 1:
            raise ValueError(f"gate patience={self.patience!r}: must be an integer >= 1")
        unknown = set(self.keys) - set(GATE_KEYS)
        if unknown:
            raise ValueError(f"gate keys {sorted(unknown)}: expected some of {sorted(GATE_KEYS)}")


class GateCheck(NamedTuple):
    """One check of :func:`release_gate`.

    Attributes:
      name: ``"overoptimisation"``, ``"length"``, ``"kl"`` or ``"entropy"``.
      status: ``"flag"`` (raised), ``"pass"``, or ``"n/a"`` (a metric it needs was not recorded).
      began: step where the flagged behaviour began (over-optimisation: the step of the gold
        reward's peak it fell from; the others: the first record over the threshold).
      detected: first step where the condition had held for ``patience`` records.
      keys: the metric names read.
      detail: the values behind the verdict, in words.
    """

    name: str
    status: str
    began: int | None
    detected: int | None
    keys: tuple[str, ...]
    detail: str


class GateReport(NamedTuple):
    """All checks of :func:`release_gate`; ``flagged`` is true when any raised a flag."""

    checks: tuple[GateCheck, ...]

    @property
    def flagged(self) -> bool:
        return any(c.status == "flag" for c in self.checks)

    def check(self, name: str) -> GateCheck:
        return next(c for c in self.checks if c.name == name)


def _gate_series(records, names) -> tuple[str | None, np.ndarray, np.ndarray]:
    """``(name, steps, values)`` of the first of ``names`` with a finite value (sorted by
    step, non-finite values dropped); ``(None, [], [])`` when none was recorded."""
    for name in names:
        pts = sorted(
            (int(r["step"]), float(r[name]))
            for r in records
            if name in r and r[name] is not None and math.isfinite(float(r[name]))
        )
        if pts:
            steps, values = zip(*pts, strict=True)
            return name, np.asarray(steps), np.asarray(values, np.float64)
    return None, np.zeros(0, np.int64), np.zeros(0)


def _first_run(condition: np.ndarray, patience: int) -> int | None:
    """Index where ``condition`` first begins to hold for ``patience`` consecutive entries."""
    count = 0
    for i, c in enumerate(condition):
        count = count + 1 if c else 0
        if count == patience:
            return i - patience + 1
    return None


def _missing(name: str, what: str, names) -> GateCheck:
    return GateCheck(
        name, "n/a", None, None, (), f"no {what} recorded (looked for {', '.join(names)})"
    )


def _threshold_check(
    records,
    names,
    name: str,
    what: str,
    threshold: float,
    *,
    above: bool,
    relative: bool,
    patience: int,
) -> GateCheck:
    """Flags the first ``patience`` records of a metric over (``above``) or under its limit:
    ``threshold``, or ``threshold`` times the first recorded value when ``relative``."""
    key, steps, x = _gate_series(records, names)
    if key is None:
        return _missing(name, what, names)
    limit = threshold * x[0] if relative else threshold
    start = _first_run(x > limit if above else x < limit, patience)
    e = int(np.argmax(x) if above else np.argmin(x))
    detail = (
        f"{what} {x[0]:.4g} (step {steps[0]}) -> {x[-1]:.4g} (step {steps[-1]}), "
        f"{'max' if above else 'min'} {x[e]:.4g} (step {steps[e]}); flag when "
        f"{'>' if above else '<'} {limit:.4g}" + (f" ({threshold:g} x first)" if relative else "")
    )
    if start is None:
        return GateCheck(name, "pass", None, None, (key,), detail)
    detected = int(steps[start + patience - 1])
    return GateCheck(name, "flag", int(steps[start]), detected, (key,), detail)


def _overoptimisation(records, keys: Mapping[str, tuple[str, ...]], config: GateConfig):
    name = "overoptimisation"
    gkey, gsteps, gold = _gate_series(records, keys["gold"])
    if gkey is None:
        return _missing(name, "held-out gold reward", keys["gold"])
    pkey, psteps, proxy = _gate_series(records, keys["proxy"])
    if pkey is None:
        return _missing(name, "proxy reward", keys["proxy"])
    # The proxy's value at each gold step: its last record at or before that step.
    idx = np.searchsorted(psteps, gsteps, side="right") - 1
    keep = idx >= 0
    gsteps, gold, proxy_at = gsteps[keep], gold[keep], proxy[idx[keep]]
    if gsteps.size == 0:
        return _missing(name, "proxy reward at or before a gold-reward record", keys["proxy"])
    peak = np.array([int(np.argmax(gold[: i + 1])) for i in range(gold.size)])  # running argmax
    condition = (gold < gold[peak] - config.gold_drop) & (proxy_at > proxy_at[peak])
    start = _first_run(condition, config.patience)
    used = (pkey, gkey)
    if start is None:
        i = int(np.argmax(gold))
        detail = (
            f"gold {gold[0]:.4g} (step {gsteps[0]}) -> {gold[-1]:.4g} (step {gsteps[-1]}), "
            f"max {gold[i]:.4g} (step {gsteps[i]}); proxy {proxy_at[0]:.4g} -> {proxy_at[-1]:.4g}"
        )
        return GateCheck(name, "pass", None, None, used, detail)
    p = int(peak[start])
    j = start + config.patience - 1
    detail = (
        f"gold fell from {gold[p]:.4g} (step {gsteps[p]}) to {gold[j]:.4g} (step {gsteps[j]}) "
        f"while the proxy rose from {proxy_at[p]:.4g} to {proxy_at[j]:.4g}"
    )
    return GateCheck(name, "flag", int(gsteps[p]), int(gsteps[j]), used, detail)


def release_gate(
    records: Iterable[Mapping[str, Any]], config: GateConfig | None = None
) -> GateReport:
    r"""Warning signs in a run's metric records (``metrics.jsonl``, :func:`logging.read_records`).

    Four checks, each over the records that hold its metrics (:data:`GATE_KEYS`; a check whose
    metric was never recorded is ``"n/a"``, not a pass), with :class:`GateConfig`'s thresholds.
    At a record step ``t`` (``patience`` consecutive records must satisfy the condition):

    * **over-optimisation** (Gao et al., 2022): with ``G_t`` the held-out gold reward,
      ``s(t) = argmax_{s <= t} G_s`` its running peak and ``P_t`` the proxy reward (the last
      proxy record at or before ``t``): ``G_t < G_{s(t)} - gold_drop`` and ``P_t > P_{s(t)}``
      -- the proxy still above its value at the gold peak while the gold has fallen from it.
      ``began`` is the peak step ``s(t)``.
    * **length growth**: ``L_t / L_{t_0} > max_length_ratio`` (``t_0`` the first record).
    * **KL budget**: ``KL_t > kl_budget``.
    * **entropy collapse**: ``H_t < min_entropy_fraction * H_{t_0}``.

    Args:
      records: dicts with ``step`` and metric names (train and eval records together).
      config: thresholds (default :class:`GateConfig`).

    Returns:
      A :class:`GateReport`, one :class:`GateCheck` per name of :data:`GATE_CHECKS`.

    Example:
      >>> records = [{"step": s, "eval/gold_reward": g, "eval/rewards/margin": m}
      ...            for s, g, m in ((0, 0.5, 0.0), (50, 0.7, 1.0), (100, 0.6, 2.0))]
      >>> c = release_gate(records).check("overoptimisation")
      >>> c.status, c.began, c.detected
      ('flag', 50, 100)
    """
    config = GateConfig() if config is None else config
    records = list(records)
    keys = {k: tuple(config.keys.get(k, GATE_KEYS[k])) for k in GATE_KEYS}
    opts = dict(patience=config.patience)
    return GateReport(
        (
            _overoptimisation(records, keys, config),
            _threshold_check(
                records,
                keys["length"],
                "length",
                "response length",
                config.max_length_ratio,
                above=True,
                relative=True,
                **opts,
            ),
            _threshold_check(
                records,
                keys["kl"],
                "kl",
                "KL to the reference",
                config.kl_budget,
                above=True,
                relative=False,
                **opts,
            ),
            _threshold_check(
                records,
                keys["entropy"],
                "entropy",
                "policy entropy",
                config.min_entropy_fraction,
                above=False,
                relative=True,
                **opts,
            ),
        )
    )


# ----------------------------------------------------------------------------------------------
# Diversity and length of samples
# ----------------------------------------------------------------------------------------------


def ngram_counts(tokens: Sequence[int], n: int) -> collections.Counter:
    """Counts of the ``n``-grams (tuples of ``n`` consecutive tokens) of one sequence.

    >>> sorted(ngram_counts([1, 2, 1, 2], 2).items())
    [((1, 2), 2), ((2, 1), 1)]
    """
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    r"""Distinct-n of a set of samples (Li et al., 2016): distinct n-grams over all n-grams.

    .. math:: \mathrm{distinct}_n = \frac{|\bigcup_i G_n(y_i)|}{\sum_i \max(0, |y_i| - n + 1)}

    with :math:`G_n(y)` the set of n-grams of :math:`y`; the denominator counts n-grams with
    multiplicity. 1 when no n-gram repeats anywhere; ``k`` identical samples give
    ``1 / k`` of one sample's value. ``nan`` when no sample has ``n`` tokens.

    >>> distinct_n([[1, 2, 3], [1, 2, 4], [5]], 1)   # 5 distinct of 7 unigrams
    0.7142857142857143
    """
    counts = [ngram_counts(list(s), n) for s in samples]
    total = sum(sum(c.values()) for c in counts)
    if total == 0:
        return float("nan")
    return len(set().union(*counts)) / total


def self_bleu(samples: Sequence[Sequence[int]], *, max_n: int = 4) -> float:
    r"""Self-BLEU-style overlap of a set of samples: each sample's n-gram precision against the
    others, averaged (Zhu et al., 2018, without BLEU's brevity penalty and geometric mean).

    For sample :math:`i` and order :math:`n`, the clipped precision (BLEU's modified precision
    with the other samples as references) is

    .. math:: p_n(i) = \frac{\sum_{g} \min\big(c_i(g),\ \max_{j \ne i} c_j(g)\big)}
        {\sum_g c_i(g)}

    (:math:`c_i(g)` the count of n-gram :math:`g` in sample :math:`i`); the sample's overlap is
    the arithmetic mean of :math:`p_n(i)` over the orders :math:`n \le` ``max_n`` it has n-grams
    of, and the result the mean over the samples that have at least one token. 1 for identical
    samples, 0 when no sample shares a token with another; higher means less diverse. The
    arithmetic mean (BLEU takes the geometric) keeps short responses, which share no 4-gram,
    from scoring 0.

    Args:
      samples: token sequences (``>= 2``), typically responses to one prompt.
      max_n: the largest n-gram order.

    Returns:
      The mean overlap in ``[0, 1]``; ``nan`` when no sample has a token.

    >>> self_bleu([[1, 2, 3], [1, 2, 4], [5]], max_n=2)   # (7/12 + 7/12 + 0) / 3
    0.3888888888888889
    """
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    if max_n < 1:
        raise ValueError(f"self_bleu max_n={max_n}: must be >= 1")
    counts = [[ngram_counts(list(s), n) for n in range(1, max_n + 1)] for s in samples]
    scores = []
    for i, own in enumerate(counts):
        precisions = []
        for order, c in enumerate(own):
            total = sum(c.values())
            if not total:
                continue  # the sample is shorter than this order
            others = [counts[j][order] for j in range(len(samples)) if j != i]
            hits = sum(min(k, max(o[g] for o in others)) for g, k in c.items())
            precisions.append(hits / total)
        if precisions:
            scores.append(sum(precisions) / len(precisions))
    return float(np.mean(scores)) if scores else float("nan")


def length_matched_mean(
    lengths: Any, values: Any, reference_lengths: Any, *, bin_width: int = 1
) -> tuple[float, float]:
    r"""Mean of ``values`` reweighted to the length distribution of a reference (direct
    standardisation over length bins).

    With bins :math:`b` of ``bin_width`` tokens, :math:`\bar v_b` the mean value of the samples
    in bin :math:`b` and :math:`w_b` the fraction of ``reference_lengths`` in it,

    .. math:: \bar v^{\mathrm{matched}} = \frac{\sum_{b \in B} w_b \bar v_b}{\sum_{b \in B} w_b}

    over the bins :math:`B` that hold samples of both: the mean value the samples would have if
    their lengths were distributed like the reference's. A policy whose gold reward rose only by
    getting longer (or shorter) keeps the reference's value here.

    Args:
      lengths, values: ``[n]`` per-sample lengths (tokens) and values (e.g. gold rewards).
      reference_lengths: ``[m]`` the reference policy's sample lengths.
      bin_width: tokens per bin.

    Returns:
      ``(matched mean, coverage)``: coverage is the reference mass in the shared bins (1 when
      every reference length is matched); ``(nan, 0)`` when no bin is shared.

    >>> length_matched_mean([1, 1, 3], [0.0, 1.0, 4.0], [1, 3, 3, 3])  # 0.25 * 0.5 + 0.75 * 4
    (3.125, 1.0)
    """
    lengths = np.asarray(lengths, np.int64) // bin_width
    values = np.asarray(values, np.float64)
    ref = np.asarray(reference_lengths, np.int64) // bin_width
    shared = np.intersect1d(np.unique(lengths), np.unique(ref))
    if shared.size == 0:
        return float("nan"), 0.0
    weights = np.array([(ref == b).mean() for b in shared])
    means = np.array([values[lengths == b].mean() for b in shared])
    return float((weights * means).sum() / weights.sum()), float(weights.sum())


class Samples(NamedTuple):
    """Responses sampled for a batch of prompts, with what the diversity metrics read.

    Attributes (``R = prompts x num_samples`` rows, prompt-major):
      prompt_index: ``[R]`` int, the row of the prompt in the prompt batch.
      tokens: ``R`` response token lists (EOS included when the response ended).
      lengths: ``[R]`` response lengths in tokens.
      gold: ``[R]`` gold rewards (``nan`` where the task cannot score the response).
      logps: ``[R]`` ``log pi(y|x)``, summed over the response.
      ref_logps: ``[R]`` ``log pi_ref(y|x)`` (``nan`` without a reference).
      entropy: ``[R]`` per-token entropy of ``pi`` along the response, summed over its tokens:
        ``sum_t H(pi(. | x, y_<t))`` in nats.
    """

    prompt_index: np.ndarray
    tokens: list[list[int]]
    lengths: np.ndarray
    gold: np.ndarray
    logps: np.ndarray
    ref_logps: np.ndarray
    entropy: np.ndarray


def sample_responses(
    model: Any,
    params: Any,
    task: Any,
    tokenizer: Any,
    prompt_batch: Mapping[str, Any],
    *,
    num_samples: int,
    max_new_tokens: int,
    key: jax.Array,
    ref_params: Any = None,
    lora: Any = None,
    temperature: float = 1.0,
) -> Samples:
    """``num_samples`` responses per prompt at ``temperature``, scored (:class:`Samples`).

    Args:
      model, params, lora: the policy (:func:`generate`).
      task, tokenizer: as :func:`gold_reward_of_generations`.
      prompt_batch: ``prompt_input_ids`` / ``prompt_attention_mask`` ``[P, prompt]``,
        left-padded.
      num_samples: responses per prompt.
      max_new_tokens: response budget.
      key: PRNG key of the sampling.
      ref_params: the reference policy's params for ``ref_logps`` (``None``: ``nan``).
      temperature: sampling temperature (the entropy and log-probs are of ``pi`` itself).
    """
    ids = np.repeat(np.asarray(prompt_batch["prompt_input_ids"]), num_samples, 0)  # [P*K, L]
    mask = np.repeat(np.asarray(prompt_batch["prompt_attention_mask"]), num_samples, 0)
    gold, tokens, response_mask = score_generations(
        model,
        params,
        task,
        tokenizer,
        {"prompt_input_ids": ids, "prompt_attention_mask": mask},
        max_new_tokens=max_new_tokens,
        greedy=False,
        temperature=temperature,
        key=key,
        lora=lora,
    )
    full_ids = np.concatenate([ids, tokens], axis=1)  # [R, prompt + new]
    full_attn = np.concatenate([mask, response_mask], axis=1)
    loss_mask = np.concatenate([np.zeros_like(mask), response_mask], axis=1)
    logps, entropy = _logps_entropy_fn(model)(params, lora, full_ids, full_attn, loss_mask)
    if ref_params is None:
        ref = np.full(len(ids), np.nan)
    else:
        # The same program as the policy's: equal params give a KL of exactly 0.
        ref = _logps_entropy_fn(model)(ref_params, None, full_ids, full_attn, loss_mask)[0]
    return Samples(
        prompt_index=np.repeat(np.arange(len(prompt_batch["prompt_input_ids"])), num_samples),
        tokens=unpad(tokens, response_mask),
        lengths=response_mask.sum(-1).astype(np.int64),
        gold=np.asarray(gold, np.float64),
        logps=np.asarray(logps, np.float64),
        ref_logps=np.asarray(ref, np.float64),
        entropy=np.asarray(entropy, np.float64),
    )


@functools.lru_cache(maxsize=32)
def _logps_entropy_fn(model: Any):
    def fn(params, lora, ids, attn, loss_mask):
        logits = model.apply(params, ids, attn, lora=lora)
        logits, labels, mask = losses.shift_labels(logits, ids, loss_mask)  # [R, T - 1, V]
        logps = losses.sequence_logprobs(logits, labels, mask)
        return logps, losses.masked_sum(losses.entropy(logits), mask, axis=-1)

    return jax.jit(fn)


def diversity_metrics(samples: Samples, *, max_n: int = 4) -> dict[str, float]:
    """Diversity, length, reward and KL of :class:`Samples`.

    Distinct-n and self-BLEU are computed among the responses to each prompt (the responses to
    different prompts differ because the prompts do) and averaged over the prompts; the
    rest are means over all responses.

    Returns:
      ``entropy/token`` (summed entropy over summed tokens, nats), ``entropy/nll`` (mean
      ``-log pi(y|x)``: the sequence entropy's unbiased estimate, nats per response),
      ``distinct_1``, ``distinct_2``, ``self_bleu`` (orders up to ``max_n``), ``length`` (mean
      tokens), ``gold`` (mean over scorable responses), ``kl`` (mean ``log pi - log pi_ref``,
      the k1 estimate of ``KL(pi || pi_ref)`` per response; ``nan`` without a reference).
    """
    groups = [
        [samples.tokens[i] for i in np.flatnonzero(samples.prompt_index == p)]
        for p in np.unique(samples.prompt_index)
    ]

    def over_prompts(fn):
        values = [fn(g) for g in groups]
        values = [v for v in values if math.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    gold = samples.gold[np.isfinite(samples.gold)]
    return {
        "entropy/token": float(samples.entropy.sum() / max(samples.lengths.sum(), 1)),
        "entropy/nll": float(-samples.logps.mean()),
        "distinct_1": over_prompts(lambda g: distinct_n(g, 1)),
        "distinct_2": over_prompts(lambda g: distinct_n(g, 2)),
        "self_bleu": over_prompts(lambda g: self_bleu(g, max_n=max_n)),
        "length": float(samples.lengths.mean()),
        "gold": float(gold.mean()) if gold.size else float("nan"),
        "kl": float((samples.logps - samples.ref_logps).mean()),
    }
