r"""Study 4, diversity and length: ``python -m experiments.studies.diversity [--config=...:tiny]``.

Does preference optimisation collapse the diversity of a policy's samples, and does it buy gold
reward by changing their length? Per seed, one SFT policy is trained on the sequence task's base
policy and is the reference of every method; each method of ``config.methods`` (DPO, PPO, GRPO,
online DPO) is trained from it at each KL strength of ``config.betas``. The SFT policy and every
final policy then sample responses to the same held-out prompts (the same sampling key), and
:func:`prefjax.train.evaluation.diversity_metrics` measures them: per-token entropy of the policy
along its samples, distinct-1/2 and self-BLEU among the responses to each prompt, length, gold
reward, ``KL(pi || pi_sft)`` (k1 on the samples), and the gold reward reweighted to the SFT
policy's length distribution (``gold_length_matched``, :func:`~prefjax.train.evaluation.
length_matched_mean`): a policy that gained gold reward only by getting longer keeps the SFT
value there.

Writes into the workdir: ``diversity.jsonl`` / ``diversity.csv`` (one row per seed, method and
beta; the SFT rows have ``beta`` empty and KL 0), ``diversity.png`` (each metric against the KL,
means and standard errors over seeds) and ``summary.md``; the runs are ``seed=<s>/sft`` and
``seed=<s>/<method>/beta=<b>`` (each an ordinary prefjax run: running the study again resumes or
reuses them). The workdir is claimed like a run's (``run.json``): another study's or run's
directory, or this study's with another config, is refused. See
``experiments/configs/studies/diversity.py`` and docs/studies.md, section 4.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from absl import app

from experiments import launch, pipelines
from experiments.configs import dpo as dpo_config
from experiments.configs import grpo as grpo_config
from experiments.configs import online_dpo as online_dpo_config
from experiments.configs import ppo as ppo_config
from experiments.configs import sweep as sweep_config
from experiments.configs.common import algorithm_module
from experiments.configs.studies import diversity as study_config
from experiments.studies import common
from prefjax.train import evaluation, inputs, loop, online, sft, sweep
from prefjax.train import workdir as run_dir
from prefjax.train.errors import ConfigError

NAME = "study_diversity"
# Each method's launcher config and the field its KL strength sets.
METHOD_CONFIGS = {
    "dpo": dpo_config,
    "ppo": ppo_config,
    "grpo": grpo_config,
    "online_dpo": online_dpo_config,
}
BETA_FIELDS = {"dpo": "beta", "online_dpo": "beta", "ppo": "kl_coef", "grpo": "kl_coef"}
# The measured quantities (diversity_metrics plus the length-matched gold), in table order.
METRICS = (
    "kl",
    "entropy/token",
    "entropy/nll",
    "distinct_1",
    "distinct_2",
    "self_bleu",
    "length",
    "gold",
    "gold_length_matched",
)


class StudyResult(NamedTuple):
    rows: list[dict]
    status: str  # "finished" | "preempted"
    workdir: str


def validate(config) -> None:
    """Start-up checks, naming the field."""
    unknown = sorted(set(config.methods) - set(study_config.METHODS))
    if unknown:
        raise ConfigError(
            f"config.methods={tuple(config.methods)}: {unknown} not among {study_config.METHODS}"
        )
    if not config.seeds:
        raise ConfigError("config.seeds=(): give at least one seed")
    for method in config.methods:
        if not config.betas[method]:
            raise ConfigError(f"config.betas.{method}=(): give at least one value")
        if config.num_steps[method] < 1:
            raise ConfigError(f"config.num_steps.{method}={config.num_steps[method]}: must be >= 1")
    if config.sample.num_samples < 2:
        raise ConfigError(
            f"config.sample.num_samples={config.sample.num_samples}: must be >= 2 (distinct-n "
            "and self-BLEU compare the responses to one prompt)"
        )
    if config.sample.num_prompts < 1:
        raise ConfigError(f"config.sample.num_prompts={config.sample.num_prompts}: must be >= 1")
    if config.sft.num_steps < 1:
        raise ConfigError(f"config.sft.num_steps={config.sft.num_steps}: must be >= 1")


def sft_run_config(config, seed: int):
    """The SFT run of ``seed``: the DPO launcher's warm-up stage (base-policy responses)."""
    base = dpo_config.get_config("tiny")
    base.seed = seed
    base.sft_warmup.num_steps = config.sft.num_steps
    base.sft_warmup.learning_rate = config.sft.learning_rate
    warm = pipelines.sft_warmup_config(base)
    _quiet(warm)
    return warm


def method_run_config(config, method: str, seed: int, sft_dir: str, beta: float | None = None):
    """``method``'s launcher config from the SFT policy of ``sft_dir`` at KL strength ``beta``;
    for DPO, the sweep over ``config.betas.dpo`` (:mod:`prefjax.train.sweep`: one compiled step
    for every beta)."""
    if method == "dpo":
        run = sweep_config.get_config("tiny")
        run.sweep.beta = tuple(float(b) for b in config.betas.dpo)
    else:
        run = METHOD_CONFIGS[method].get_config(config.method_preset)
        run.algorithm[BETA_FIELDS[method]] = float(beta)
    run.seed = seed
    run.sft_warmup.num_steps = 0
    run.model.init_from = sft_dir  # the initial policy and (a copy) the reference
    run.update_from_flattened_dict(run_dir.flatten(config.overrides[method].to_dict()))
    steps = int(config.num_steps[method])
    run.train.num_steps = steps
    run.train.log_every = min(run.train.log_every, steps)
    run.train.eval_every = 0  # one held-out evaluation, at the end
    run.optimizer.warmup_steps = min(run.optimizer.warmup_steps, steps)
    run.checkpoint.every = 0  # the final checkpoint only
    _quiet(run)
    return run


def _quiet(run) -> None:
    run.eval.generate = False  # the study samples and scores the final policies itself
    run.logging.tensorboard = False
    run.logging.plot = False
    run.logging.progress = False


def held_out_prompts(run_config, tokenizer, num_prompts: int) -> tuple[dict, object]:
    """The first ``num_prompts`` held-out prompts of the task (left-padded) and the task."""
    run_config = run_config.copy_and_resolve_references()
    run_config.eval.generate = True  # the held-out prompts are built for decoding
    data = inputs.build_data(run_config, tokenizer, "sft")
    n = min(num_prompts, data.eval.num_eval_prompts)
    return {k: v[:n] for k, v in data.eval.prompts.items()}, data.eval.task


def _row(seed, method, beta, steps, samples, reference, config) -> dict:
    metrics = evaluation.diversity_metrics(samples, max_n=config.max_n)
    matched, coverage = evaluation.length_matched_mean(
        samples.lengths[np.isfinite(samples.gold)],
        samples.gold[np.isfinite(samples.gold)],
        reference.lengths,
        bin_width=config.length_bin,
    )
    return {
        "seed": seed,
        "method": method,
        "beta": beta,
        "steps": steps,
        **metrics,
        "gold_length_matched": matched,
        "length_coverage": coverage,
    }


def run(config, workdir: str) -> StudyResult:
    """Trains and measures every policy; writes the tables, the figure and the summary."""
    validate(config)
    is_main = jax.process_index() == 0
    root = run_dir.Workdir(
        workdir, NAME, json.loads(config.to_json_best_effort()), is_main=is_main
    ).open()
    try:
        rows = []
        for seed in config.seeds:
            status = _run_seed(config, root, seed, rows)
            if status is not None:
                return StudyResult(rows, status, root.path)
        if is_main:
            write_outputs(root.path, rows)
        return StudyResult(rows, "finished", root.path)
    except BaseException:
        root.discard()  # nothing trained under it yet: a directory this invocation made goes
        raise
    finally:
        root.release()


def _run_seed(config, root, seed: int, rows: list) -> str | None:
    """The SFT run and every method's runs of one seed, measured into ``rows``; ``"preempted"``
    when a run did not finish, else ``None``."""
    seed_dir = os.path.join(root.path, f"seed={seed}")
    sft_config = sft_run_config(config, seed)
    sft_dir = os.path.join(seed_dir, "sft")
    result = loop.run(sft_config, sft_dir, sft)
    if result.status != "finished":
        return result.status
    root.mark_step()  # trained runs lie below: a later failure must not remove the directory
    model = result.setup.model
    reference = result.setup.policy_params(result.state.params, result.setup.frozen)
    tokenizer = online.tokenizer_of(sft_config)
    prompts, task = held_out_prompts(sft_config, tokenizer, config.sample.num_prompts)
    s = config.sample

    def measure(params):
        return evaluation.sample_responses(
            model,
            params,
            task,
            tokenizer,
            prompts,
            num_samples=s.num_samples,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            key=jax.random.key(seed),  # the same draws for every policy of this seed
            ref_params=reference,
        )

    ref_samples = measure(reference)
    rows.append(
        _row(seed, "sft", None, sft_config.train.num_steps, ref_samples, ref_samples, config)
    )
    for method in config.methods:
        steps = int(config.num_steps[method])
        for beta, params in _train(config, method, seed, sft_dir, os.path.join(seed_dir, method)):
            if params is None:  # preempted: the run resumes when the study is run again
                return "preempted"
            rows.append(_row(seed, method, beta, steps, measure(params), ref_samples, config))
    return None


def _train(config, method: str, seed: int, sft_dir: str, method_dir: str):
    """Yields ``(beta, final policy params)`` of ``method``'s runs (``params`` ``None`` for a
    run that was preempted, and nothing after it): ``method_dir/beta=<b>``."""
    if method == "dpo":  # every beta in one sweep
        result = sweep.run(method_run_config(config, method, seed, sft_dir), method_dir)
        if result.status != "finished":
            yield None, None
            return
        for i, member in enumerate(result.group):
            yield member.beta, sweep.unstack(result.states, i).params
        return
    for beta in config.betas[method]:
        run_config = method_run_config(config, method, seed, sft_dir, beta)
        path = os.path.join(method_dir, f"beta={beta:g}")
        result = loop.run(run_config, path, algorithm_module(run_config))
        if result.status != "finished":
            yield None, None
            return
        yield float(beta), result.setup.policy_params(result.state.params, result.setup.frozen)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Means and standard errors over seeds per (method, beta): ``<metric>`` and
    ``<metric>_se``, plus ``seeds`` (how many)."""
    keys: list[tuple] = []
    for r in rows:
        if (r["method"], r["beta"]) not in keys:
            keys.append((r["method"], r["beta"]))
    out = []
    for method, beta in keys:
        group = [r for r in rows if r["method"] == method and r["beta"] == beta]
        entry = {"method": method, "beta": beta, "seeds": len(group)}
        for name in METRICS:
            values = [r[name] for r in group if r[name] is not None and math.isfinite(r[name])]
            mean, se = common.mean_stderr(values) if values else (math.nan, math.nan)
            entry[name], entry[f"{name}_se"] = mean, se
        out.append(entry)
    return out


def summary_rows(agg: Sequence[dict]) -> list[dict]:
    """The summary table: one row per (method, beta), ``mean ± stderr`` cells."""
    out = []
    for a in agg:
        row = {"method": a["method"], "beta": "" if a["beta"] is None else f"{a['beta']:g}"}
        for name in METRICS:
            row[name] = common.fmt(a[name], a[f"{name}_se"])
        row["seeds"] = a["seeds"]
        out.append(row)
    return out


def headline(agg: Sequence[dict]) -> str:
    """Per method, its most and least KL-regularised policies against the SFT policy."""
    sft_row = next(a for a in agg if a["method"] == "sft")
    lines = []
    for method in dict.fromkeys(a["method"] for a in agg if a["method"] != "sft"):
        group = sorted((a for a in agg if a["method"] == method), key=lambda a: a["beta"])
        lo = group[0]
        lines.append(
            f"- **{method}** at beta={lo['beta']:g} (KL {lo['kl']:.2f}): entropy/token "
            f"{sft_row['entropy/token']:.3f} -> {lo['entropy/token']:.3f}, distinct-2 "
            f"{sft_row['distinct_2']:.3f} -> {lo['distinct_2']:.3f}, self-BLEU "
            f"{sft_row['self_bleu']:.3f} -> {lo['self_bleu']:.3f}, length "
            f"{sft_row['length']:.2f} -> {lo['length']:.2f}, gold {sft_row['gold']:.3f} -> "
            f"{lo['gold']:.3f} (length-matched {lo['gold_length_matched']:.3f})"
        )
    return "\n".join(lines)


PANELS = (
    ("entropy/token", "entropy per token (nats)"),
    ("distinct_2", "distinct-2 (per prompt)"),
    ("self_bleu", "self-BLEU (per prompt)"),
    ("length", "response length (tokens)"),
    ("gold", "gold reward"),
    ("gold_length_matched", "gold reward, length-matched to SFT"),
)


def plot(agg: Sequence[dict], path: str) -> str:
    """``diversity.png``: each panel of :data:`PANELS` against the KL to the SFT policy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), squeeze=False)
    sft_row = next(a for a in agg if a["method"] == "sft")
    methods = list(dict.fromkeys(a["method"] for a in agg if a["method"] != "sft"))
    for ax, (name, title) in zip(axes.flat, PANELS, strict=True):
        ax.errorbar(
            [0.0], [sft_row[name]], yerr=[sft_row[f"{name}_se"]], fmt="k*", ms=10, label="sft"
        )
        for method in methods:
            group = sorted((a for a in agg if a["method"] == method), key=lambda a: a["kl"])
            ax.errorbar(
                [a["kl"] for a in group],
                [a[name] for a in group],
                xerr=[a["kl_se"] for a in group],
                yerr=[a[f"{name}_se"] for a in group],
                fmt="o-",
                ms=4,
                capsize=2,
                label=method,
            )
            for a in group:  # which beta each point is
                ax.annotate(f"{a['beta']:g}", (a["kl"], a[name]), fontsize=6, alpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KL(pi || pi_sft), nats / response")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(workdir: str, rows: Sequence[dict]) -> None:
    common.write_table(workdir, "diversity", rows)
    agg = aggregate(rows)
    plot(agg, os.path.join(workdir, "diversity.png"))
    columns = ["method", "beta", *METRICS, "seeds"]
    common.write_summary(
        workdir,
        "Diversity and length",
        [
            ("Against the SFT policy", headline(agg)),
            (
                "All policies (mean ± stderr over seeds)",
                common.markdown_table(summary_rows(agg), columns),
            ),
        ],
    )


launch.define_config_flag("studies/diversity")  # --config, --config.*, --workdir


main = launch.absl_main(run)


if __name__ == "__main__":
    app.run(main)
