"""What the online algorithms share: prompt batch -> rollout -> score, in the Algorithm protocol.

An online algorithm (GRPO/RLOO, online DPO, PPO) reads ``"prompt"`` batches
(``prompt_input_ids, prompt_attention_mask`` ``[batch, P]``, left-padded). Its ``setup`` returns
a :class:`~prefjax.train.common.Setup` whose ``train_step(state, batch, frozen, key)`` does, for
every prompt batch the loop hands it:

1. **rollout** -- ``config.algorithm.num_samples`` responses per prompt from the *current* policy
   with :func:`prefjax.rollout.sample` (data-parallel on the training mesh, parameters as they are
   sharded for training), the key ``fold_in(fold_in(key, state.step), 0)``: a resumed run draws
   the same rollouts as an uninterrupted one;
2. **score** -- the reward source of ``config.algorithm.reward`` (``"gold"``: the built-in task's
   gold reward; ``"model"``: a trained reward model from an ``experiments/reward_model.py``
   workdir, :func:`reward_model_from_workdir`; ``"prm"``: a process reward model from such a
   workdir trained with ``loss="prm"``, the min or product of its step probabilities,
   :func:`prm_from_workdir`; ``"verifier"``: a user's
   ``"package.module:function"``) through :func:`prefjax.rollout.score` (length penalty, clip,
   whiten);
3. **update** -- the algorithm's jitted ``update(state, rollout_batch, frozen, key)`` on the
   rollout batch (:func:`rollout_batch`), with its objective's full-batch denominators, so
   gradient accumulation and the mesh split do not change the result.

The loop itself (prefjax.train.loop) is unchanged and knows none of this. Rollout metrics
(``rollout/score``, ``rollout/score_raw``, ``rollout/length``, ``rollout/eos_fraction``,
``rollout/stop_fraction``, ``rollout/length_limit_fraction``, ``time/rollout``, ``time/update``)
are added to the update's metrics. The held-out ``eval_step`` samples the eval prompts with a
fixed key and reports the same rollout metrics (plus the sampled KL to the reference when it is in
memory), so ``eval/rollout/score`` is the source's score of held-out samples.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from prefjax import data as pdata
from prefjax import losses, models, rollout
from prefjax import sharding as shd
from prefjax.train import checkpointing, common
from prefjax.train.common import Setup

REWARD_SOURCES = ("gold", "model", "prm", "verifier")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def add_rollout_fields(algo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the sampling and reward fields every online algorithm reads to ``algo``."""
    # Responses sampled per prompt (the group size G of GRPO/RLOO, K of online DPO).
    algo.num_samples = 4
    # Response budget in tokens; a response that reaches it ends with reason "length".
    algo.max_new_tokens = 8
    # Sampling transform (replayed exactly when the trainer scores the samples).
    algo.temperature = 1.0
    algo.top_k = 0  # 0 = off
    algo.top_p = 1.0  # 1 = off
    # Strings that end a response besides EOS (matched on their token ids), e.g. ("\n\n",).
    algo.stop_strings = ()
    algo.reward = reward = ml_collections.ConfigDict()
    # Reward source: "gold" (built-in task) | "model" (reward-model workdir) | "prm" (process
    # reward-model workdir) | "verifier".
    reward.source = "gold"
    # reward.source="model" / "prm": the workdir of an experiments/reward_model.py run.
    reward.model_dir = ""
    # reward.source="prm": "min" | "product" of the step probabilities of a response.
    reward.prm_aggregation = "min"
    # reward.source="verifier": "package.module:function", called as fn(prompts, responses)
    # on the decoded strings and returning one float per response.
    reward.verifier = ""
    # Score of a response the gold reward cannot score (the bandit: not an arm).
    reward.invalid = -1.0
    # Subtracted from the score of a response that hit max_new_tokens (0 = off).
    reward.length_penalty = 0.0
    # Scores clipped to [-clip, clip] (0 = off).
    reward.clip = 0.0
    # Whiten scores over the batch (zero mean, unit variance).
    reward.whiten = False
    return algo


def validate_rollout_fields(config: Any) -> None:
    """Start-up checks of the fields of :func:`add_rollout_fields`, naming the field."""
    algo = config.algorithm
    for field in ("num_samples", "max_new_tokens"):
        if isinstance(algo[field], bool) or not isinstance(algo[field], int) or algo[field] < 1:
            raise ValueError(f"config.algorithm.{field}={algo[field]!r}: must be an integer >= 1")
    if not algo.temperature > 0:
        raise ValueError(f"config.algorithm.temperature={algo.temperature!r}: must be > 0")
    if not 0 < algo.top_p <= 1:
        raise ValueError(f"config.algorithm.top_p={algo.top_p!r}: must be in (0, 1]")
    if algo.top_k < 0:
        raise ValueError(f"config.algorithm.top_k={algo.top_k!r}: must be >= 0")
    if config.data.max_prompt_len + algo.max_new_tokens > config.data.max_len:
        raise ValueError(
            f"config.algorithm.max_new_tokens={algo.max_new_tokens}: with "
            f"data.max_prompt_len={config.data.max_prompt_len} it exceeds "
            f"data.max_len={config.data.max_len}"
        )
    r = algo.reward
    if r.source not in REWARD_SOURCES:
        raise ValueError(
            f"config.algorithm.reward.source={r.source!r}: expected one of {REWARD_SOURCES}"
        )
    if r.source == "gold" and config.data.task == "files":
        raise ValueError(
            "config.algorithm.reward.source='gold': data.task='files' has no gold reward; use "
            "'model' (reward.model_dir) or 'verifier'"
        )
    if r.source == "prm" and r.prm_aggregation not in rollout.AGGREGATIONS:
        raise ValueError(
            f"config.algorithm.reward.prm_aggregation={r.prm_aggregation!r}: expected one of "
            f"{rollout.AGGREGATIONS}"
        )
    if r.source in ("model", "prm") and not os.path.isfile(os.path.join(r.model_dir, "run.json")):
        raise ValueError(
            f"config.algorithm.reward.model_dir={r.model_dir!r}: not a reward-model run "
            "directory (no run.json)"
        )
    if r.source == "verifier" and ":" not in r.verifier:
        raise ValueError(
            f"config.algorithm.reward.verifier={r.verifier!r}: expected 'package.module:function'"
        )
    if r.clip < 0:
        raise ValueError(f"config.algorithm.reward.clip={r.clip!r}: must be >= 0 (0 = off)")


def tokenizer_of(config: Any) -> Any:
    """The tokenizer of ``config.model`` (the byte tokenizer for presets)."""
    return models.load_tokenizer(config.model.path) if config.model.path else models.ByteTokenizer()


def sampling_config(config: Any, tokenizer: Any) -> rollout.SamplingConfig:
    """The :class:`prefjax.rollout.SamplingConfig` of ``config.algorithm``."""
    algo = config.algorithm
    return rollout.SamplingConfig(
        max_new_tokens=int(algo.max_new_tokens),
        num_samples=int(algo.num_samples),
        temperature=float(algo.temperature),
        top_k=int(algo.top_k),
        top_p=float(algo.top_p),
        eos_ids=(int(tokenizer.eos_id),),
        stop_sequences=rollout.stop_sequences_from_strings(tokenizer, tuple(algo.stop_strings)),
        pad_id=int(tokenizer.pad_id),
    )


def reward_transform(config: Any) -> rollout.RewardTransform:
    r = config.algorithm.reward
    return rollout.RewardTransform(
        length_penalty=float(r.length_penalty), clip=float(r.clip), whiten=bool(r.whiten)
    )


# ----------------------------------------------------------------------------------------------
# Reward sources from the config
# ----------------------------------------------------------------------------------------------


def reward_model_from_workdir(run_dir: str, *, mesh: Any = None) -> rollout.RewardModel:
    """The trained reward model of an ``experiments/reward_model.py`` run directory.

    Its ``run.json`` gives the model config (preset or HF folder, dtypes); its newest complete
    checkpoint gives the params (frozen; placed on ``mesh`` by the run's rules when given).
    """
    with open(os.path.join(run_dir, "run.json")) as f:
        record = json.load(f)
    if record.get("algorithm") != "reward":
        raise ValueError(
            f"config.algorithm.reward.model_dir={run_dir!r}: a {record.get('algorithm')!r} run, "
            "not a reward-model run"
        )
    cfg = ml_collections.ConfigDict(record["config"])
    overrides = common.model_overrides(cfg)
    if cfg.model.path:
        model_config = models.config_from_hf(cfg.model.path).replace(**overrides)
    else:
        model_config = models.preset(cfg.model.preset, **overrides)
    params = checkpointing.restore_params(run_dir)
    model = models.Model(model_config, params, head="reward")
    if mesh is not None:
        rules = shd.rules_from_config(cfg.mesh)
        params = shd.shard_params(mesh, params, model.param_axes, rules)
        model = models.Model(model_config, params, head="reward")
    return rollout.RewardModel(model, model.params)


def prm_from_workdir(
    run_dir: str, *, aggregation: str = "min", mesh: Any = None
) -> rollout.ProcessRewardModel:
    """The process reward model of an ``experiments/reward_model.py`` run trained with
    ``loss="prm"``, as a source: its step separator is the run's ``data.step_separator`` under
    the run's tokenizer."""
    with open(os.path.join(run_dir, "run.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["config"])
    if cfg.algorithm.get("loss") != "prm":
        raise ValueError(
            f"config.algorithm.reward.model_dir={run_dir!r}: a reward model trained with "
            f"loss={cfg.algorithm.get('loss')!r}; reward.source='prm' needs loss='prm' "
            "(use reward.source='model' for it)"
        )
    separator = pdata.step_separator_id(tokenizer_of(cfg), cfg.data.get("step_separator", "\n"))
    rm = reward_model_from_workdir(run_dir, mesh=mesh)
    return rollout.ProcessRewardModel(rm.model, rm.params, separator, aggregation=aggregation)


def _verifier(spec: str, tokenizer: Any) -> rollout.Verifier:
    module, _, name = spec.partition(":")
    try:
        fn = vars(importlib.import_module(module))[name]
    except (ImportError, KeyError) as err:
        raise ValueError(f"config.algorithm.reward.verifier={spec!r}: cannot load ({err})") from err
    return rollout.Verifier(fn, tokenizer, name=spec)


def reward_source(config: Any, tokenizer: Any, *, mesh: Any = None) -> rollout.RewardSource:
    """The reward source ``config.algorithm.reward`` names."""
    r = config.algorithm.reward
    if r.source == "gold":
        task = pdata.task_from_config(config.data)
        return rollout.GoldReward(task, tokenizer, invalid_reward=float(r.invalid))
    if r.source == "model":
        return reward_model_from_workdir(r.model_dir, mesh=mesh)
    if r.source == "prm":
        return prm_from_workdir(r.model_dir, aggregation=r.prm_aggregation, mesh=mesh)
    return _verifier(r.verifier, tokenizer)


# ----------------------------------------------------------------------------------------------
# The rollout batch and its metrics
# ----------------------------------------------------------------------------------------------


def rollout_batch(r: rollout.Rollout, scores: rollout.Scores, weights: jax.Array) -> dict:
    """The arrays an update reads, ``R`` rows: the rollout, its scores, row weights."""
    return {
        "prompt_ids": r.prompt_ids,
        "prompt_mask": r.prompt_mask,
        "tokens": r.tokens,
        "response_mask": r.response_mask,
        "old_logprobs": r.logprobs,
        "finish_reason": r.finish_reason,
        "scores": scores.scores,
        "raw_scores": scores.raw,
        "weights": weights,  # 1 for a real prompt's row, 0 for a padding row
    }


def _mean(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(x.astype(jnp.float32) * w), jnp.sum(w)


@jax.jit
def rollout_stats(batch: dict) -> common.Stats:
    """``{name: (sum, count)}`` over a rollout batch's real rows (weights)."""
    w = batch["weights"].astype(jnp.float32)
    reason = batch["finish_reason"]
    return {
        "rollout/score": _mean(batch["scores"], w),
        "rollout/score_raw": _mean(batch["raw_scores"], w),
        "rollout/length": _mean(batch["response_mask"].sum(-1), w),
        "rollout/eos_fraction": _mean(reason == rollout.FINISH_EOS, w),
        "rollout/stop_fraction": _mean(reason == rollout.FINISH_STOP, w),
        "rollout/length_limit_fraction": _mean(reason == rollout.FINISH_LENGTH, w),
    }


# ----------------------------------------------------------------------------------------------
# The set-up
# ----------------------------------------------------------------------------------------------


def policy_of(params: Any, frozen: Any, lora: bool) -> tuple[Any, Any]:
    """``(base params, adapters or None)`` the sampler runs: adapters ride on the frozen base."""
    return (frozen, params) if lora else (params, None)


@dataclasses.dataclass
class Pipeline:
    """The rollout -> score half of an online step (host-side; the sampler is jitted).

    Attributes:
      sampler: jitted ``(params, prompt_ids, prompt_mask, key, *, lora) -> Rollout``.
      source: the reward source.
      transform: the score post-processing.
      num_samples: responses per prompt.
      lora: whether the trainable params are LoRA adapters on the frozen base.
    """

    sampler: Callable[..., rollout.Rollout]
    source: Any
    transform: rollout.RewardTransform
    num_samples: int
    lora: bool

    def __call__(self, params: Any, frozen: Any, batch: dict, key: jax.Array) -> dict:
        """Samples and scores a prompt batch: the :func:`rollout_batch` of it."""
        base, adapters = policy_of(params, frozen, self.lora)
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        r = self.sampler(base, ids, mask, key, lora=adapters)
        weights = common.example_weights({"input_ids": ids, **batch})
        weights = jnp.repeat(weights, self.num_samples)  # [B] -> [B * n], prompt-major
        scores = rollout.score(self.source, r, self.transform, weights)
        return rollout_batch(r, scores, weights)


def make_pipeline(config: Any, model: Any, mesh: Any) -> Pipeline:
    """The :class:`Pipeline` of ``config.algorithm`` on ``mesh``."""
    tokenizer = tokenizer_of(config)
    sampling = sampling_config(config, tokenizer)
    return Pipeline(
        sampler=rollout.make_sampler(model, sampling, mesh=mesh),
        source=reward_source(config, tokenizer, mesh=mesh),
        transform=reward_transform(config),
        num_samples=sampling.num_samples,
        lora=common.uses_lora(config),
    )


def _rollout_key(key: jax.Array, step: Any) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, step), 0)


def online_setup(
    base: Setup,
    pipeline: Pipeline,
    update: Callable[..., Any],
    *,
    eval_stats: Callable[[Any, dict, Any], common.Stats],
    finalize: Callable[[common.Stats], common.Metrics],
    seed: int,
) -> Setup:
    """``base`` (state, frozen tree, shardings from :func:`prefjax.train.setup.build_setup`) with
    the online train and eval steps.

    Args:
      base: the set-up whose state, frozen tree and shardings are kept.
      pipeline: rollout -> score.
      update: jitted ``(state, rollout_batch, frozen, key) -> (state, metrics)``.
      eval_stats: jitted ``(params, rollout_batch, frozen) -> stats`` of held-out samples.
      finalize: stats -> metrics (eval).
      seed: the fixed key of held-out sampling.
    """

    def train_step(state, batch, frozen, key):
        t0 = time.perf_counter()
        rb = pipeline(state.params, frozen, batch, _rollout_key(key, state.step))
        jax.block_until_ready(rb["scores"])
        t1 = time.perf_counter()
        stats = rollout_stats(rb)
        state, metrics = update(state, rb, frozen, key)
        jax.block_until_ready(metrics)
        metrics = {**metrics, **common.means(stats)}
        metrics["time/rollout"] = jnp.asarray(t1 - t0, jnp.float32)
        metrics["time/update"] = jnp.asarray(time.perf_counter() - t1, jnp.float32)
        return state, metrics

    eval_key = jax.random.key(seed + 1)

    def eval_step(params, batch, frozen):
        rb = pipeline(params, frozen, batch, eval_key)
        return {**rollout_stats(rb), **eval_stats(params, rb, frozen)}

    objective = dataclasses.replace(base.objective, finalize=finalize)
    return dataclasses.replace(
        base, train_step=train_step, eval_step=eval_step, objective=objective
    )


def jit_update(base: Setup, update: Callable[..., Any]) -> Callable[..., Any]:
    """``update`` jitted like the loop's steps: state donated, rollout rows over data x fsdp."""
    repl = shd.replicated(base.mesh)
    return jax.jit(
        shd.with_activation_sharding(base.mesh, update),
        in_shardings=(base.state_sharding, base.batch_sharding, base.frozen_sharding, repl),
        out_shardings=(base.state_sharding, repl),
        donate_argnums=0,
    )


def transform_of(config: Any) -> dict:
    """The sampling transform of ``config.algorithm`` (``temperature, top_k, top_p``)."""
    a = config.algorithm
    return dict(temperature=float(a.temperature), top_k=int(a.top_k), top_p=float(a.top_p))


def eval_kl_stats(
    model: Any, config: Any, has_reference: bool, *, entropy: bool = False
) -> Callable[..., Any]:
    """Jitted ``(params, rollout_batch, frozen) -> stats``: ``kl/sampled``, the summed k1
    estimate of ``KL(pi_theta || pi_ref)`` on held-out samples (nothing without a reference),
    and with ``entropy`` ``rollout/entropy``, the policy's next-token entropy per response token
    of those samples (under the sampling transform, from the same forward pass)."""
    lora = common.uses_lora(config)

    def fn(params, batch, frozen):
        if not (has_reference or entropy):
            return {}
        tokens = (batch["prompt_ids"], batch["prompt_mask"], batch["tokens"])
        base, adapters = policy_of(params, frozen, lora)
        mask, w = batch["response_mask"], batch["weights"]
        out = rollout.token_logprobs(
            model, base, *tokens, mask, lora=adapters, entropy=entropy, **transform_of(config)
        )
        logps, ent = out if entropy else (out, None)  # [R, N] each
        stats = {}
        if entropy:
            m = mask * w[:, None]
            stats["rollout/entropy"] = (losses.masked_sum(ent, m), jnp.sum(m))
        if has_reference:
            ref = rollout.token_logprobs(model, frozen, *tokens, mask, **transform_of(config))
            kl = sequence_kl(logps, ref, mask * w[:, None], "k1")
            stats["kl/sampled"] = (jnp.sum(kl * w), jnp.sum(w))
        return stats

    return jax.jit(fn)


def sequence_kl(
    logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, kind: str = "k1"
) -> jax.Array:
    """``[R]`` sequence KL estimate: the per-token ``kind`` estimator summed over the response."""
    per_token = losses.kl_estimate(logprobs, ref_logprobs, kind=kind, mask=mask)
    return losses.masked_sum(per_token, mask, axis=-1)
