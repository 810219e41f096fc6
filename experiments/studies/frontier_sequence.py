r"""The reward-KL frontier study's sequence-task section (no flags: imported by
``experiments.studies.frontier``).

On the built-in sequence task (``data.task="sequence"``: write ``n`` copies of a letter, a graded
gold reward in ``[0, 1]``) there is no closed-form frontier, so each method's point is measured:
per seed, one SFT policy of the task's base policy is trained first and is the initial policy and
the reference of every method of that seed (``model.init_from``); the DPO family (DPO, IPO, RPO)
trains every beta of ``config.sequence.betas`` in one sweep per loss (one compile), PPO, RLOO
and online DPO one run per beta. Every run is evaluated by its own launcher's held-out
evaluation at step 0 (the reference itself) and at its last step:

* ``eval/gold_reward_sampled``: the mean gold reward of ``eval.num_samples`` responses sampled
  at temperature 1 on the held-out prompts;
* ``eval/kl``: ``KL(pi || pi_ref)`` in nats per response, the k1 estimator
  ``mean(log pi(y|x) - log pi_ref(y|x))`` on those samples ``y ~ pi`` (unbiased; a few samples
  can make it slightly negative near the reference).

The step-0 records of every run of a seed are the same measurement of the same reference (same
prompts, same sampling key), which the study checks.
"""

from __future__ import annotations

import functools
import os

from experiments import pipelines
from experiments.configs import dpo as dpo_config
from experiments.configs import grpo as grpo_config
from experiments.configs import online_dpo as online_dpo_config
from experiments.configs import ppo as ppo_config
from experiments.configs import sweep as sweep_config
from experiments.configs.studies import frontier as study_config
from experiments.studies import common
from prefjax.train import grpo, loop, online_dpo, ppo, sft

OFFLINE = ("dpo", "ipo", "rpo")
ONLINE = {
    "ppo": (ppo_config, ppo),
    "rloo": (grpo_config, grpo),
    "online_dpo": (online_dpo_config, online_dpo),
}
# The task's prompts are "<bos>c*n=" (5 tokens): one bucket of 8.
PROMPT_LEN = 8
GOLD, KL = "eval/gold_reward_sampled", "eval/kl"


def _task_fields(c, config, seed: int) -> None:
    """The data, evaluation and logging fields every run of ``seed`` shares, so that every
    run's held-out evaluation samples the same prompts with the same key."""
    s = config.sequence
    c.seed = seed
    c.data.task = "sequence"
    c.data.seed = config.data_seed
    c.data.max_prompt_len = PROMPT_LEN
    c.data.max_len = PROMPT_LEN + s.max_new_tokens
    c.data.num_eval = s.eval.num_pairs
    c.data.eval_batch_size = s.eval.num_pairs
    c.eval.generate = True
    c.eval.num_prompts = s.eval.num_prompts
    c.eval.num_samples = s.eval.num_samples
    c.eval.max_new_tokens = s.max_new_tokens
    c.checkpoint.every = 0
    c.mesh.distributed = bool(config.mesh.distributed)
    c.logging.plot = c.logging.tensorboard = c.logging.progress = bool(config.run_logging)


def _steps(c, steps: int) -> None:
    c.train.num_steps = steps
    c.train.log_every = max(1, steps // 5)
    c.train.eval_every = steps  # step 0 (the reference) and the last step


def sft_config(config, seed: int):
    """The SFT run of ``seed`` (the DPO launcher's warm-up stage, on the task's base policy):
    the initial policy and reference of every method of the seed."""
    s = config.sequence
    base = dpo_config.get_config("tiny")
    _task_fields(base, config, seed)
    base.sft_warmup.num_steps = s.sft.num_steps
    base.sft_warmup.learning_rate = s.sft.learning_rate
    warm = pipelines.sft_warmup_config(base)
    warm.train.log_every = max(1, s.sft.num_steps // 5)
    return warm


def offline_config(config, method: str, seed: int, sft_dir: str):
    """The sweep of ``method`` (``dpo``, ``ipo``, ``rpo``) over ``config.sequence.betas``."""
    s, off = config.sequence, config.sequence.offline
    c = sweep_config.get_config("tiny")
    _task_fields(c, config, seed)
    c.sft_warmup.num_steps = 0
    c.model.init_from = sft_dir
    c.algorithm.loss = "ipo" if method == "ipo" else "sigmoid"
    c.algorithm.rpo_alpha = float(off.rpo_alpha) if method == "rpo" else 0.0
    c.sweep.beta = tuple(float(b) for b in s.betas)
    c.data.pad_to_max_len = True  # one compiled shape
    c.data.num_train = off.num_train
    c.data.batch_size = off.batch_size
    c.optimizer.learning_rate = off.learning_rate
    c.optimizer.warmup_steps = min(10, off.num_steps // 5)
    _steps(c, off.num_steps)
    return c


def online_config(config, method: str, seed: int, beta: float, *, sft_dir: str):
    """One run of ``method`` (``ppo``, ``rloo``, ``online_dpo``) at ``beta`` against the gold
    reward: PPO's and RLOO's k1 KL coefficient in the reward (the objective ``E[r] - beta KL``),
    online DPO's beta."""
    s, on = config.sequence, config.sequence.online
    module_config, _ = ONLINE[method]
    c = module_config.get_config("tiny")
    _task_fields(c, config, seed)
    c.sft_warmup.num_steps = 0
    c.model.init_from = sft_dir
    algo = c.algorithm
    algo.num_samples = on.num_samples
    algo.max_new_tokens = s.max_new_tokens
    if method == "online_dpo":
        algo.beta = float(beta)
        algo.labels = on.online_dpo_labels
    else:
        algo.kl_coef = float(beta)
        algo.kl_estimator = "k1"
    if method == "rloo":
        algo.advantage = "rloo"
        algo.kl_in = "reward"
    if method == "ppo":
        algo.num_epochs = on.ppo_epochs
        algo.num_minibatches = on.ppo_minibatches
    c.data.batch_size = on.batch_size
    c.optimizer.learning_rate = on.learning_rate
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    _steps(c, on.num_steps)
    return c


def _point(root, method, run, seed, sequences, per_seq) -> dict:
    path, cost = run.path, run.cost
    evals = common.eval_records(path)
    first, last = evals[0], evals[-1]
    if first["step"] != 0:
        raise RuntimeError(f"{path}/metrics.jsonl: no evaluation at step 0 (the reference)")
    return {
        "method": method,
        "beta": run.beta,
        "seed": int(seed),
        "gold": float(last[GOLD]),
        "kl": float(last[KL]),
        "length": float(last["eval/length/sampled"]),
        "gain": float(last[GOLD]) - float(first[GOLD]),
        "ref_gold": float(first[GOLD]),
        "ref_kl": float(first[KL]),
        "steps": int(last["step"]),
        "wall_s": cost["wall_s"] / run.share,
        "run_wall_s": cost["wall_s"],
        "sequences": int(sequences),
        "tokens": int(sequences * per_seq),
        "peak_rss_mib": cost["peak_rss_mib"],
        "peak_device_mib": cost.get("peak_device_mib"),
        "run": os.path.relpath(path, root),  # the run's directory in the study's
    }


def run_points(config, wd) -> tuple[list[dict], dict]:
    """Trains the SFT reference and every method x beta of every seed; returns the points and
    each seed's reference record (``gold``: the SFT run's own final held-out gold reward)."""
    s, points, refs = config.sequence, [], {}
    for seed in config.seeds:
        base = os.path.join(wd.path, "sequence", f"seed={seed}")
        sft_dir = os.path.join(base, "sft")
        sft_run = sft_config(config, seed)
        _, cost = common.timed_run(
            wd,
            f"sequence.seed={seed}.sft",
            f"sequence sft seed={seed}",
            functools.partial(loop.run, sft_run, sft_dir, sft),
        )
        refs[seed] = {
            "seed": int(seed),
            "gold": float(common.final_eval(sft_dir)[GOLD]),
            "sft_steps": int(s.sft.num_steps),
            "wall_s": cost["wall_s"],
        }
        for method in s.methods:
            if method in OFFLINE:
                how = dict(sweep_config=offline_config(config, method, seed, sft_dir))
            else:
                config_of = functools.partial(online_config, config, method, seed, sft_dir=sft_dir)
                how = dict(online=(ONLINE[method][1], config_of))
            key = f"sequence.seed={seed}.{method}"
            for r in common.beta_runs(wd, key, os.path.join(base, method), s.betas, **how):
                seqs = common.sequences_read(r)
                points.append(_point(wd.path, method, r, seed, seqs, r.config.data.max_len))
    check_shared_reference(points)
    return points, refs


def check_shared_reference(points: list[dict], tol: float = 1e-4) -> None:
    """Every run of a seed measured the same reference at step 0: the same gold reward (the same
    samples of the same policy) and a KL of 0."""
    for seed in sorted({p["seed"] for p in points}):
        group = [p for p in points if p["seed"] == seed]
        golds = [p["ref_gold"] for p in group]
        if max(golds) - min(golds) > tol or max(abs(p["ref_kl"]) for p in group) > tol:
            raise RuntimeError(
                f"sequence task, seed {seed}: the runs' step-0 evaluations differ (gold "
                f"{min(golds):.6f}..{max(golds):.6f}, |KL| up to "
                f"{max(abs(p['ref_kl']) for p in group):.2g}): they do not share one reference"
            )


# ----------------------------------------------------------------------------------------------
# Table, figure panel, summary
# ----------------------------------------------------------------------------------------------


def aggregate(points: list[dict]) -> list[dict]:
    """One row per (method, beta): seed means and standard errors (``gain`` is paired with each
    seed's own reference, so free of the references' spread)."""
    names = ("gold", "gain", "kl", "length")
    return common.aggregate_points(points, names, study_config.METHODS.index)


def plot_panel(ax, rows: list[dict], refs: dict, markers: dict) -> None:
    """Seed-mean (KL, gold) of each method's betas, joined in KL order, with standard errors;
    the reference (KL 0) as a star."""
    ref, ref_se = common.mean_stderr([r["gold"] for r in refs.values()])
    ax.errorbar([0.0], [ref], yerr=[ref_se], fmt="k*", ms=10, label="reference (SFT)")
    for method in dict.fromkeys(r["method"] for r in rows):
        group = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        ax.errorbar(
            [r["kl"] for r in group],
            [r["gold"] for r in group],
            xerr=[r["kl_se"] for r in group],
            yerr=[r["gold_se"] for r in group],
            marker=markers[method],
            ms=5,
            capsize=2,
            lw=1,
            label=method,
        )
        for r in group:  # which beta each point is
            ax.annotate(f"{r['beta']:g}", (r["kl"], r["gold"]), fontsize=6, alpha=0.7)
    ax.set_xlabel("KL(pi || pi_ref), sampled k1, nats per response")
    ax.set_ylabel("gold reward of sampled responses (held out)")
    seeds = len(refs)
    ax.set_title(f"sequence task: final policies, mean ± stderr over {seeds} seed(s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def summary_section(config, rows: list[dict], refs: dict) -> tuple[str, str]:
    s = config.sequence
    measured = [
        ("gold", "gold", 3),
        ("gain over reference", "gain", 3),
        ("KL", "kl", 3),
        ("length", "length", 2),
    ]
    table = [common.point_cells(r, measured) for r in rows]
    ref, ref_se = common.mean_stderr([r["gold"] for r in refs.values()])
    text = " ".join(
        [
            f"Sequence task (data seed {config.data_seed}); per seed one SFT reference",
            f"({s.sft.num_steps} steps on the base policy; held-out gold reward",
            f"{common.fmt_over_seeds(ref, ref_se, len(refs))}) is the initial policy and",
            f"reference of every method. DPO/IPO/RPO: {s.offline.num_steps} steps of",
            f"{s.offline.batch_size} pairs, every beta in one sweep per loss; PPO/RLOO/online",
            f"DPO: {s.online.num_steps} iterations of {s.online.batch_size} prompts x",
            f"{s.online.num_samples} samples against the gold reward. `gold`: mean gold reward",
            f"of {s.eval.num_samples} responses sampled at temperature 1 on the held-out prompts;",
            "`gain over reference`: gold minus the same measurement of the seed's reference",
            "(step 0 of the run); `KL`: the k1 estimate mean(log pi - log pi_ref) on those",
            "samples, nats per response; mean ± standard error over seeds",
            f"{tuple(config.seeds)}. `wall s` of a DPO-family point is its sweep's over its",
            "members; `tokens` are the token positions (prompt + response slots) of the",
            "sequences each run read or sampled; peak memory is the process's high-water mark",
            "after the run (RSS; device memory where the backend reports it).",
        ]
    )
    body = text + "\n\n" + common.markdown_table(table, list(table[0]) if table else [])
    return "Sequence task (no closed form: measured points)", body
