"""From ``config.model`` / ``config.data`` to a model, a tokenizer and batch iterators.

* :func:`build_model` -- the model (preset with random weights or a local Hugging Face folder) and
  its tokenizer (the built-in byte tokenizer for presets);
* :func:`build_data` -- train and held-out datasets of the batch kind the algorithm reads
  (``sft``, ``pairwise``, ``listwise``, ``unpaired``), from a built-in task (``sequence``,
  ``bandit``) or local files, split by prompt so no prompt is on both sides;
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
from prefjax.data import readers
from prefjax.data.splits import group_key
from prefjax.train import common, evaluation

# Extra examples generated per requested one before the grouped split keeps each side's share.
_OVERSAMPLE = 1.3


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

    def train_iterator(self) -> pdata.BatchIterator:
        """Shuffled (every epoch, from ``data.seed``), endless, resumable train batches."""
        return pdata.BatchIterator(
            self.train, self.batch_size, seed=self.seed, shuffle=True, buckets=self.buckets
        )


def _split_prompts(prompts: list[str], fraction: float, seed: int) -> set[str]:
    """A deterministic ``fraction`` (at least one) of ``prompts`` held out."""
    prompts = sorted(set(prompts))
    if len(prompts) < 2:
        return set()
    rng = np.random.default_rng([seed, 7919])
    count = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    return set(np.asarray(prompts, dtype=object)[rng.permutation(len(prompts))[:count]])


def _as_sft(row, kind: str):
    """The SFT example a normalised ``kind`` row prefers, or ``None``: a pair's chosen response,
    a ranking's best response, an unpaired example's completion if it is desirable.

    ``prompt_id`` is optional in every schema, so it is carried only when the row has one
    (otherwise splits group by prompt text); a file's row keeps its file and line for errors.
    """
    if kind == "pairwise":
        completion = row["chosen"]
    elif kind == "listwise":
        completion = row["responses"][row["ranking"][0]]
    elif row["label"] == 1:  # unpaired
        completion = row["completion"]
    else:
        return None  # an undesirable response is not imitated
    out = {"prompt": row["prompt"], "completion": completion}
    if row.get("prompt_id") is not None:
        out["prompt_id"] = row["prompt_id"]
    if isinstance(row, pdata.Row):
        return pdata.Row(out, row.source, row.index, row.index_kind)
    return out


def _records(task, kind: str, num: int, seed: int, sft_responses: str = "chosen") -> list[dict]:
    if kind == "pairwise":
        return task.pairwise_records(num, seed=seed)
    if kind == "listwise":
        return task.listwise_records(num, seed=seed)
    if kind == "unpaired":
        return task.unpaired_records(num, seed=seed)
    if kind == "sft" and sft_responses == "base":
        return task.sft_records(num, seed=seed)
    if kind == "sft":
        # SFT imitates the preferred responses: the chosen side of the task's labelled pairs.
        return [_as_sft(r, "pairwise") for r in task.pairwise_records(num, seed=seed)]
    raise ValueError(f"unknown batch kind {kind!r}")


def _make_task(config):
    noise = float(config.data.label_noise)
    if config.data.task == "bandit":
        return pdata.Bandit.make(seed=config.data.seed, flip_prob=noise)
    return pdata.RepeatTask(
        letters=config.data.sequence_letters,
        max_count=config.data.sequence_max_count,
        flip_prob=noise,
    )


def _task_split(config, task, kind: str):
    """Train and held-out records of a built-in task, grouped by prompt."""
    d = config.data
    prompts = list(task.prompts)
    held_out = _split_prompts(prompts, d.eval_fraction, d.seed)
    if not held_out:  # one prompt (the default bandit): fresh samples for the same prompt
        return (
            _records(task, kind, d.num_train, d.seed, d.sft_responses),
            _records(task, kind, d.num_eval, d.seed + 1_000_003, d.sft_responses),
            held_out,
        )
    frac = len(held_out) / len(prompts)
    train, evals, seed = [], [], d.seed
    while len(train) < d.num_train or len(evals) < d.num_eval:
        need = max((d.num_train - len(train)) / (1 - frac), (d.num_eval - len(evals)) / frac)
        for r in _records(task, kind, int(need * _OVERSAMPLE) + 8, seed, d.sft_responses):
            (evals if r["prompt"] in held_out else train).append(r)
        seed += 1_000_003
    return train[: d.num_train], evals[: d.num_eval], held_out


def _read_files(paths: str, kind: str, config, tokenizer, field: str):
    files = [p.strip() for p in paths.split(",") if p.strip()]
    records = []
    for path in files:
        file_kind = kind
        if kind == "sft":
            # The file's kind is its rows' majority, so one odd first row does not decide it.
            file_kind = pdata.detect_kind_of_rows(readers.read_records(path))
        if file_kind in ("pairwise", "listwise", "unpaired") and kind == "sft":
            # SFT (or the SFT warm-up before DPO) on a feedback file imitates what it prefers.
            rows = (_as_sft(r, file_kind) for r in readers.read_records(path, file_kind))
            records.extend(r for r in rows if r is not None)
        else:
            records.extend(readers.read_records(path, kind))
    if not records:
        raise ValueError(f"config.data.{field}={paths!r}: no examples")
    return records


def _tokenize(records, tokenizer, kind, config, *, append_eos=True):
    return pdata.tokenize(
        records,
        tokenizer,
        kind,
        max_len=config.data.max_len,
        max_prompt_len=config.data.max_prompt_len,
        append_eos=append_eos,
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
    task, prompts, num_eval_prompts, num_train_prompts = None, None, 0, 0
    sample_prompts = None
    if d.task == "files":
        train_records = _read_files(d.train_files, kind, config, tokenizer, "train_files")
        if d.eval_files:
            eval_records = _read_files(d.eval_files, kind, config, tokenizer, "eval_files")
            leakage = pdata.check_leakage(train_records, eval_records)
            if leakage.leaks:
                raise ValueError(
                    f"config.data.eval_files={d.eval_files!r} shares prompts with "
                    f"config.data.train_files={d.train_files!r}:\n{leakage.summary()}"
                )
        else:
            if len({group_key(r) for r in train_records}) < 2:
                raise ValueError(
                    f"config.data.train_files={d.train_files!r}: one distinct prompt cannot be "
                    "split into train and eval; give config.data.eval_files"
                )
            train_records, eval_records = pdata.grouped_split(
                train_records, eval_fraction=d.eval_fraction, seed=d.seed
            )
        append_eos = True
    else:
        task = _make_task(config)
        train_records, eval_records, held_out = _task_split(config, task, kind)
        append_eos = not isinstance(task, pdata.Bandit)
        if config.eval.generate and generate:
            n = config.eval.num_prompts
            evp = sorted(held_out)[:n] if held_out else list(task.prompts)[:n]
            trp = sorted(set(task.prompts) - held_out)[:n] if held_out else []
            num_eval_prompts, num_train_prompts = len(evp), len(trp)
            prompts = _prompt_batch(evp + trp, tokenizer, config)
            reps = -(-config.eval.num_samples // len(evp))
            sample_prompts = _prompt_batch(
                (evp * reps)[: config.eval.num_samples], tokenizer, config
            )
    train = _tokenize(train_records, tokenizer, kind, config, append_eos=append_eos)
    held = _tokenize(eval_records, tokenizer, kind, config, append_eos=append_eos)
    leak = set(train["prompt_id"]) & set(held["prompt_id"])
    if leak and (d.task == "files" or len(getattr(task, "prompts", ())) > 1):
        raise ValueError(f"config.data: {len(leak)} prompts are in both train and eval splits")
    desc = (
        f"{d.task} ({kind}): {len(train)} train / {len(held)} held-out examples, "
        f"{len(set(train['prompt_id']))} / {len(set(held['prompt_id']))} distinct prompts"
    )
    buckets = (d.max_len,) if d.pad_to_max_len else None
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
