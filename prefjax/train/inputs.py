"""From ``config.model`` / ``config.data`` to a model, a tokenizer and batch iterators.

* :func:`build_model` -- the model (preset with random weights or a local Hugging Face folder) and
  its tokenizer (the built-in byte tokenizer for presets);
* :func:`build_data` -- train and held-out datasets of the batch kind the algorithm reads
  (``sft``, ``pairwise``, ``listwise``, ``unpaired``), from a built-in task (``sequence``,
  ``bandit``) or local files, split by prompt so no prompt is on both sides
  (:func:`prefjax.data.datasets_from_config`, the one function that builds them), plus the
  held-out prompts decoded for the built-in tasks' gold reward;
* :func:`task_metrics` -- the built-in tasks' ground-truth metrics of a policy (gold reward of
  greedy responses on held-out and train prompts, sampled KL to the reference, and for the bandit
  ``KL(pi_theta || pi*)`` to the closed-form optimum).

Built-in tasks are split by prompt: a deterministic ``data.eval_fraction`` of the task's prompts
(from ``data.seed``) is held out, and train/eval examples are drawn only from their side. The
bandit has a single prompt by default, so its held-out pairs are fresh samples for the same prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from prefjax import data as pdata
from prefjax import models
from prefjax.train import common, evaluation
from prefjax.train import config as config_lib


def build_model(config, key: jax.Array, *, head: str = "lm", mesh=None):
    """``(model, tokenizer)`` from ``config.model``; with ``mesh`` the parameters are born
    sharded by ``config.mesh.rules`` (a preset through ``eval_shape`` and a jitted init with
    sharded outputs, a local HF folder placed shard by shard), never whole on one device."""
    model = common.build_model(config, key=key, head=head, mesh=mesh)
    if config.model.path:
        tokenizer = models.load_tokenizer(config.model.path)
    else:
        tokenizer = models.ByteTokenizer()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"config.model: the tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has {model.config.vocab_size} rows"
        )
    return model, tokenizer


def with_params(model, params):
    """The same model with other parameters."""
    return models.Model(model.config, params, head=model.head)


@dataclasses.dataclass
class EvalData:
    """Held-out data: eval batches, plus prompts and ground truth on built-in tasks."""

    dataset: Any  # TokenizedDataset of the algorithm's batch kind
    batch_size: int  # global examples per eval batch
    tokenizer: Any
    buckets: Any = None  # allowed sequence lengths (None: powers of two up to max_len)
    task: Any = None  # RepeatTask | Bandit | None (files)
    prompts: Any = None  # left-padded batch of distinct held-out prompts, then train prompts
    num_eval_prompts: int = 0  # how many of `prompts` are held-out prompts
    num_train_prompts: int = 0  # how many train prompts follow them
    sample_prompts: Any = None  # held-out prompts repeated to eval.num_samples rows (sampling)
    ref_bandit_logprobs: Any = None  # [P, K] the initial policy over the bandit's arms

    def batches(self) -> Iterator[dict]:
        """One pass over the held-out set in order; the last batch is padded (``example_mask``)."""
        it = pdata.BatchIterator(
            self.dataset,
            self.batch_size,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            buckets=self.buckets,
        )
        yield from it


@dataclasses.dataclass
class Data:
    """Train data and its iterator factory, and the held-out :class:`EvalData`."""

    train: Any
    eval: EvalData
    batch_size: int
    seed: int
    description: str
    buckets: Any = None
    packing: bool = False  # packed train batches (data.packing)
    row_multiple: int = 1  # packed rows per process are a multiple of this (its batch devices)
    padding: str = ""  # the padding fraction of the train batches, padded and packed

    def train_iterator(self) -> pdata.BatchIterator:
        """Shuffled (every epoch, from ``data.seed``), endless, resumable train batches (packed
        with ``data.packing``: the same examples per batch)."""
        return pdata.BatchIterator(
            self.train,
            self.batch_size,
            seed=self.seed,
            shuffle=True,
            buckets=self.buckets,
            packing=self.packing,
            row_multiple=self.row_multiple,
        )


def _prompt_batch(prompts: list[str], tokenizer, config):
    """Left-padded prompts (padded with repeats to a multiple of 8 rows for any mesh)."""
    records = [{"prompt": p, "prompt_id": p} for p in prompts]
    ds = pdata.tokenize(
        records,
        tokenizer,
        "prompt",
        max_len=config.data.max_prompt_len,
        max_prompt_len=config.data.max_prompt_len,
        append_eos=False,
    )
    length = pdata.bucket_length(int(ds.lengths().max()), pdata.default_buckets(ds.max_len))
    batch = pdata.collate(ds, np.arange(len(ds)), length, pad_side="left")
    # Pad the number of prompts to a multiple of 8 so any data-parallel mesh can split them.
    ways = 8
    extra = (-len(prompts)) % ways
    if extra:
        batch = {k: np.concatenate([v, np.repeat(v[-1:], extra, 0)]) for k, v in batch.items()}
    return batch


def build_data(config, tokenizer, kind: str, *, generate: bool = True) -> Data:
    """Train and held-out data of ``kind`` from ``config.data``; ``generate``: the policy is a
    language model whose responses can be decoded and scored (``config.eval.generate``)."""
    d = config.data
    splits = pdata.datasets_from_config(d, tokenizer, kind)
    train, held, task, held_out = splits.train, splits.eval, splits.task, splits.held_out
    prompts, num_eval_prompts, num_train_prompts, sample_prompts = None, 0, 0, None
    if task is not None and config.eval.generate and generate:
        n = config.eval.num_prompts
        evp = sorted(held_out)[:n] if held_out else list(task.prompts)[:n]
        trp = sorted(set(task.prompts) - held_out)[:n] if held_out else []
        num_eval_prompts, num_train_prompts = len(evp), len(trp)
        prompts = _prompt_batch(evp + trp, tokenizer, config)
        reps = -(-config.eval.num_samples // len(evp))
        sample_prompts = _prompt_batch((evp * reps)[: config.eval.num_samples], tokenizer, config)
    desc = (
        f"{d.task} ({kind}): {len(train)} train / {len(held)} held-out examples, "
        f"{len(set(train['prompt_id']))} / {len(set(held['prompt_id']))} distinct prompts"
    )
    buckets = (d.max_len,) if d.pad_to_max_len else None
    packing = bool(d.get("packing", False))
    data_shape = config_lib.resolve_mesh_shape(config, jax.device_count())
    row_multiple = max(1, data_shape[0] * data_shape[1] // jax.process_count())
    padding = ""
    if kind in pdata.packing.PACKABLE_KINDS:
        probe = pdata.BatchIterator(
            train,
            d.batch_size,
            seed=d.seed,
            buckets=buckets,
            drop_remainder=False,  # a report, not a batch plan: a set smaller than a batch too
            row_multiple=row_multiple,
            process_index=0,
            process_count=jax.process_count(),
        )
        pad = pdata.padding_fractions(probe)
        padding = (
            f"{pad['padded']:.0%} of the train token slots padded, {pad['packed']:.0%} packed "
            f"(epoch 0; data.packing={packing})"
        )
    return Data(
        train=train,
        eval=EvalData(
            held,
            d.eval_batch_size,
            tokenizer,
            buckets,
            task,
            prompts,
            num_eval_prompts,
            num_train_prompts,
            sample_prompts,
        ),
        batch_size=d.batch_size,
        seed=d.seed,
        description=desc,
        buckets=buckets,
        packing=packing,
        row_multiple=row_multiple,
        padding=padding,
    )


def _policy_and_lora(setup, params):
    """``(base params, lora)`` for generation: LoRA adapters ride on the frozen base."""
    if isinstance(params, models.LoRA):
        return setup.frozen, params
    return params, None


def prepare_task_eval(setup, model, eval_data: EvalData) -> None:
    """Records what task metrics compare against: the initial policy over the bandit's arms
    (for objectives regularised towards a reference, whose optimum is pi_ref * exp(r / beta),
    ``beta`` the objective's ``kl_coefficient``)."""
    if isinstance(eval_data.task, pdata.Bandit) and setup.objective.kl_coefficient is not None:
        eval_data.ref_bandit_logprobs = evaluation.bandit_policy(
            model, model.params, eval_data.task, eval_data.tokenizer
        )


def task_metrics(setup, params, eval_data: EvalData, config, key=None) -> dict:
    """Ground-truth metrics of the built-in tasks for the policy ``params`` (``eval/`` names)."""
    task = eval_data.task
    if task is None or setup.model.head != "lm" or not config.eval.generate:
        return {}
    model, tokenizer = setup.model, eval_data.tokenizer
    base, lora = _policy_and_lora(setup, params)
    out: dict[str, float] = {}
    if isinstance(task, pdata.Bandit):
        if eval_data.ref_bandit_logprobs is None:
            return out
        m = evaluation.bandit_metrics(
            model,
            base,
            task,
            tokenizer,
            setup.objective.kl_coefficient,
            ref_logprobs=eval_data.ref_bandit_logprobs,
            lora=lora,
        )
        return {
            "eval/kl_to_optimal": m["bandit/kl_to_optimum"],
            "eval/bandit/kl_to_reference": m["bandit/kl_to_reference"],
            "eval/gold_reward": m["bandit/expected_reward"],
            "eval/bandit/optimal_reward": m["bandit/optimal_reward"],
            "eval/bandit/objective": m["bandit/objective"],
            "eval/bandit/optimal_objective": m["bandit/optimal_objective"],
        }
    if eval_data.prompts is not None:
        out.update(_gold(model, base, lora, task, tokenizer, eval_data, config))
    key = jax.random.key(config.seed) if key is None else key
    if eval_data.sample_prompts is not None:
        sampled = evaluation.gold_reward_of_generations(
            model,
            base,
            task,
            tokenizer,
            eval_data.sample_prompts,
            max_new_tokens=config.eval.max_new_tokens,
            greedy=False,
            key=key,
            lora=lora,
            prefix="sampled",
        )
        out["eval/gold_reward_sampled"] = sampled["sampled/reward"]
        out["eval/length/sampled"] = sampled["sampled/length/mean"]
    ref = setup.reference  # None when not in memory (precomputed, none)
    if ref is not None and eval_data.sample_prompts is not None:
        kl = evaluation.sampled_kl_to_reference(
            model,
            base,
            ref,
            eval_data.sample_prompts,
            max_new_tokens=config.eval.max_new_tokens,
            eos_id=tokenizer.eos_id,
            key=key,
            lora=lora,
        )
        out["eval/kl"] = kl["kl/sampled"]
    return out


def _gold(model, base, lora, task, tokenizer, eval_data, config) -> dict:
    """Gold reward of greedy responses to held-out (and train) prompts, one decode for both."""
    rewards, tokens, mask = evaluation.score_generations(
        model,
        base,
        task,
        tokenizer,
        eval_data.prompts,
        max_new_tokens=config.eval.max_new_tokens,
        lora=lora,
    )
    n, m = eval_data.num_eval_prompts, eval_data.num_train_prompts
    held = evaluation.summarize_generations(
        rewards[:n], tokens[:n], mask[:n], tokenizer.eos_id, prefix="gold"
    )
    out = {
        "eval/gold_reward": held["gold/reward"],
        "eval/length/generated": held["gold/length/mean"],
        "eval/eos_fraction": held["gold/eos_fraction"],
    }
    if m:
        out["eval/gold_reward_train_prompts"] = float(np.nanmean(rewards[n : n + m]))
    return out
