r"""Study 1, reward-KL frontiers: ``python -m experiments.studies.frontier [--config=...:full]``.

Two sections, both run by default (``config.tasks``):

**Bandit** (``config.methods``, ``config.betas``, ``config.offline``, ``config.online``). On the
KL-regularised bandit the best expected gold reward any policy reaches at KL ``k`` to the
reference is known in closed form (:func:`frontier_reward_at`): the constrained problem
:math:`\max_\pi E_\pi[r]` s.t. :math:`KL(\pi\|\pi_{ref}) \le k` is solved by the Gibbs policy
:math:`\pi^*_\beta \propto \pi_{ref} e^{r/\beta}` whose KL is ``k`` (its Lagrangian), so the exact
frontier is the curve :math:`\beta \mapsto (KL(\pi^*_\beta\|\pi_{ref}), E_{\pi^*_\beta}[r])`,
monotone in KL. Every trained policy's point lies on or below it; how far below, at the KL it
spent, is the method's gap (``gap = frontier reward at its KL - its gold reward``). Each method
is trained at each ``config.betas`` value and seed, in its own run directory under
``<workdir>/runs/seed=<s>/<method>/`` (the DPO family's betas as one sweep); the final held-out
bandit metrics (``eval/gold_reward``: the expected gold reward of the policy over the arms;
``eval/bandit/kl_to_reference``: its KL over the arms to the initial policy, which is the
reference) give ``points`` and ``frontier`` (tables).

**Sequence task** (``config.sequence``; :mod:`experiments.studies.frontier_sequence`): no closed
form; per seed one SFT reference shared by every method, each method's betas traced from it (the
DPO family by one sweep per loss), and each final policy's held-out gold reward against its
sampled KL to the reference, from the runs' own evaluation: ``sequence_points`` and
``sequence_references`` (tables).

Both write into ``frontier.png`` (a panel per section) and ``summary.md``. Running the study
again resumes every run (finished ones are only re-evaluated).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app

from experiments import launch
from experiments.configs import grpo as grpo_config
from experiments.configs import online_dpo as online_dpo_config
from experiments.configs import ppo as ppo_config
from experiments.configs import sweep as sweep_config
from experiments.configs.studies import frontier as study_config
from experiments.studies import common, frontier_sequence
from experiments.studies.bandit_frontier import frontier_curve, frontier_reward_at
from prefjax import data as pdata
from prefjax import sharding
from prefjax.train import evaluation, grpo, inputs, online_dpo, ppo
from prefjax.train import workdir as run_dir
from prefjax.train.errors import ConfigError

launch.define_config_flag("studies/frontier")  # --config, --config.*, --workdir

OFFLINE = ("dpo", "ipo", "rpo")
ONLINE = {
    "ppo": (ppo_config, ppo),
    "rloo": (grpo_config, grpo),
    "online_dpo": (online_dpo_config, online_dpo),
}
NAME = "study_frontier"


# ----------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------


def _bandit_data(c, config, seed: int) -> None:
    """The bandit fields every run shares (a one-token arm after a 16-token prompt)."""
    c.seed = seed
    c.data.task = "bandit"
    c.data.seed = config.data_seed
    c.data.max_prompt_len = 16
    c.data.max_len = 24
    c.sft_warmup.num_steps = 0  # the bandit's reference is the initial policy
    c.train.eval_every = 0  # the final policy only
    c.checkpoint.every = 0
    c.logging.plot = c.logging.tensorboard = c.logging.progress = bool(config.run_logging)


def offline_config(config, method: str, seed: int) -> ml_collections.ConfigDict:
    """The DPO-family sweep of ``method`` over ``config.betas`` for one seed."""
    off = config.offline
    c = sweep_config.get_config("tiny")
    _bandit_data(c, config, seed)
    c.algorithm.loss = "ipo" if method == "ipo" else "sigmoid"
    c.algorithm.rpo_alpha = float(off.rpo_alpha) if method == "rpo" else 0.0
    c.sweep.beta = tuple(float(b) for b in config.betas)
    c.data.pad_to_max_len = True  # one compiled shape
    c.data.num_train = off.num_train
    c.data.num_eval = 64
    c.data.batch_size = off.batch_size
    c.data.eval_batch_size = 64
    c.optimizer.learning_rate = off.learning_rate
    c.optimizer.warmup_steps = min(10, off.num_steps // 5)
    c.train.num_steps = off.num_steps
    c.train.log_every = max(1, off.num_steps // 5)
    return c


def online_config(config, method: str, seed: int, beta: float) -> ml_collections.ConfigDict:
    """One online run of ``method`` at ``beta`` (the KL-regularised objective's coefficient)."""
    on = config.online
    module_config, _ = ONLINE[method]
    c = module_config.get_config("tiny" if method == "online_dpo" else "bandit")
    _bandit_data(c, config, seed)
    algo = c.algorithm
    algo.num_samples = on.num_samples
    algo.max_new_tokens = 1
    algo.reward.invalid = -2.0  # a response that is not an arm
    if method == "online_dpo":
        algo.beta = float(beta)
        algo.labels = on.online_dpo_labels
    else:
        algo.kl_coef = float(beta)
        algo.kl_estimator = "k1"  # exact in expectation: the objective E[r] - beta KL
    if method == "ppo":
        algo.num_epochs = on.ppo_epochs
        algo.num_minibatches = on.ppo_minibatches
    c.data.batch_size = on.batch_size
    c.data.num_eval = 16
    c.data.eval_batch_size = 16
    c.eval.max_new_tokens = 1
    c.optimizer.learning_rate = on.learning_rate
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.train.num_steps = on.num_steps
    c.train.log_every = max(1, on.num_steps // 5)
    return c


def validate(config) -> None:
    """The study's own fields (each run's config is validated by its run)."""
    common.check_subset("config.tasks", config.tasks, study_config.TASKS)
    common.check_seeds("config.seeds", config.seeds)
    common.check_subset("config.methods", config.methods, study_config.METHODS)
    _check_betas("config.betas", config.betas)
    if config.frontier_points < 2:
        raise ConfigError(f"config.frontier_points={config.frontier_points}: need at least 2")
    s = config.sequence
    common.check_subset("config.sequence.methods", s.methods, study_config.METHODS)
    _check_betas("config.sequence.betas", s.betas)
    counts = {
        "sft.num_steps": s.sft.num_steps,
        "offline.num_steps": s.offline.num_steps,
        "online.num_steps": s.online.num_steps,
        "max_new_tokens": s.max_new_tokens,
        "eval.num_samples": s.eval.num_samples,
    }
    for field, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.sequence.{field}={value!r}: expected an integer >= 1")


def _check_betas(field: str, betas) -> None:
    if not betas or any(not float(b) > 0 for b in betas) or len(set(betas)) != len(betas):
        raise ConfigError(f"{field}={tuple(betas)}: expected distinct positive values")


def tokens_per_sequence(bandit, tokenizer) -> int:
    """BOS + prompt + the one arm token of a bandit sequence."""
    return len(tokenizer.encode(bandit.prompts[0])) + 2


def reference_policy(c, bandit) -> tuple[np.ndarray, object]:
    """``([P, K] log-probs, tokenizer)``: the initial policy over the arms of a run of ``c``
    (its reference), the model of ``c.seed`` initialised exactly as the loop initialises it."""
    model_key = jax.random.split(jax.random.key(c.seed), 3)[0]
    # Born on the run's mesh, as the loop builds it: the same compiled initialiser and arm
    # read-out (hits of the persistent compilation cache), the same parameters.
    model, tokenizer = inputs.build_model(c, model_key, head="lm", mesh=sharding.make_mesh(c.mesh))
    return evaluation.bandit_policy(model, model.params, bandit, tokenizer), tokenizer


def _point(method, beta, seed, metrics, cost, sequences, per_seq, bandit, ref, share=1):
    gold, kl = float(metrics["eval/gold_reward"]), float(metrics["eval/bandit/kl_to_reference"])
    optimum = bandit.optimal_policy(beta, ref)
    expected = float(bandit.expected_reward(optimum).mean())
    if abs(expected - float(metrics["eval/bandit/optimal_reward"])) > 1e-6:
        raise RuntimeError(
            f"{method} beta={beta} seed={seed}: the run's optimum has reward "
            f"{metrics['eval/bandit/optimal_reward']:.6f}, the study's {expected:.6f}: "
            "they compare against different references"
        )
    front = frontier_reward_at(bandit, ref, kl)
    return {
        "method": method,
        "beta": float(beta),
        "seed": int(seed),
        "gold": gold,
        "kl": kl,
        "frontier_gold": front,
        "gap": front - gold,
        "kl_to_optimum": float(metrics["eval/kl_to_optimal"]),
        "optimum_gold": expected,
        "optimum_kl": float(bandit.kl_to_reference(optimum, ref).mean()),
        "wall_s": cost["wall_s"] / share,
        "run_wall_s": cost["wall_s"],
        "sequences": int(sequences),
        "tokens": int(sequences * per_seq),
        "peak_rss_mib": cost["peak_rss_mib"],
    }


def run_points(config, wd: run_dir.Workdir, bandit) -> tuple[list[dict], dict]:
    """Trains every method x beta x seed; returns the points and each seed's reference."""
    workdir, points, refs = wd.path, [], {}
    for seed in config.seeds:
        base = os.path.join(workdir, "runs", f"seed={seed}")
        refs[seed], tokenizer = reference_policy(offline_config(config, "dpo", seed), bandit)
        per_seq = tokens_per_sequence(bandit, tokenizer)
        for method in config.methods:
            if method in OFFLINE:
                how = dict(sweep_config=offline_config(config, method, seed))
            else:
                config_of = functools.partial(online_config, config, method, seed)
                how = dict(online=(ONLINE[method][1], config_of))
            key = f"seed={seed}.{method}"
            for r in common.beta_runs(wd, key, os.path.join(base, method), config.betas, **how):
                seqs = common.sequences_read(r)
                metrics = common.final_eval(r.path)
                points.append(
                    _point(
                        method,
                        r.beta,
                        seed,
                        metrics,
                        r.cost,
                        seqs,
                        per_seq,
                        bandit,
                        refs[seed],
                        share=r.share,
                    )
                )
    return points, refs


# ----------------------------------------------------------------------------------------------
# Tables, figure, summary
# ----------------------------------------------------------------------------------------------


def frontier_rows(config, bandit, refs) -> list[dict]:
    """The exact curve of each seed's reference over a dense log-spaced beta grid."""
    betas = np.geomspace(1e-3, 1e3, config.frontier_points)
    rows = []
    for seed, ref in refs.items():
        kls, rewards = frontier_curve(bandit, ref, betas)
        rows += [
            {"seed": int(seed), "beta": float(b), "kl": float(k), "gold": float(r)}
            for b, k, r in zip(betas, kls, rewards, strict=True)
        ]
    return rows


def aggregate(points: list[dict]) -> list[dict]:
    """One row per (method, beta): seed means and standard errors."""
    return common.aggregate_points(points, ("gold", "kl", "gap"), _order)


def _order(method: str) -> int:
    return study_config.METHODS.index(method)


MARKERS = dict(zip(study_config.METHODS, "os^vDP", strict=True))


def plot(path: str, bandit=None, sequence=None) -> str:
    """``frontier.png``: a panel per section, ``bandit=(points, curve)`` (every point against
    the exact frontier) and ``sequence=(rows, refs)`` (the measured seed means)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [p for p in (bandit, sequence) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    axes = list(axes.flat)
    if bandit is not None:
        plot_bandit(axes.pop(0), *bandit)
    if sequence is not None:
        frontier_sequence.plot_panel(axes.pop(0), *sequence, MARKERS)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_bandit(ax, points: list[dict], curve: list[dict]) -> None:
    """The bandit panel: every point against the exact frontier (one curve per seed)."""
    for i, seed in enumerate(sorted({r["seed"] for r in curve})):
        rows = [r for r in curve if r["seed"] == seed]
        label = "exact frontier (pi*_beta)" if i == 0 else None
        ax.plot([r["kl"] for r in rows], [r["gold"] for r in rows], "k-", lw=1, label=label)
    for beta in sorted({p["beta"] for p in points}):  # where each beta's optimum lies
        opt = next(p for p in points if p["beta"] == beta)
        ax.plot(opt["optimum_kl"], opt["optimum_gold"], "kx", markersize=7)
        ax.annotate(
            f"pi*, beta={beta:g}",
            (opt["optimum_kl"], opt["optimum_gold"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    for method in sorted({p["method"] for p in points}, key=_order):
        pts = [p for p in points if p["method"] == method]
        ax.scatter(
            [p["kl"] for p in pts],
            [p["gold"] for p in pts],
            marker=MARKERS[method],
            s=28,
            label=method,
            alpha=0.8,
        )
    ax.set_xlim(0, 1.05 * max(max(r["kl"] for r in curve), max(p["kl"] for p in points)))
    ax.set_xlabel("KL(pi || pi_ref) over the arms, nats")
    ax.set_ylabel("expected gold reward")
    ax.set_title("bandit: gold reward vs KL, final policies of each beta and seed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def summary_text(config, rows: list[dict], bandit, refs) -> list[tuple[str, str]]:
    measured = [("gold", "gold", 3), ("KL", "kl", 3), ("gap to frontier", "gap", 3)]
    table = [common.point_cells(r, measured) for r in rows]
    cols = list(table[0]) if table else []
    ref_gold = [frontier_reward_at(bandit, ref, 0.0) for ref in refs.values()]
    text = (
        f"Bandit with {bandit.num_arms} arms (data seed {config.data_seed}); reference = the "
        f"initial policy over the arms (expected gold reward {np.mean(ref_gold):.3f}, best arm "
        f"{bandit.rewards.max(-1).mean():.3f}). Seeds {tuple(config.seeds)}; mean ± standard "
        "error over seeds. `gap to frontier` = the exact frontier's reward at the point's KL "
        "minus the point's gold reward (>= 0 for every policy). `wall s` of a DPO-family "
        "point is its sweep's wall time over its members; `tokens` are prompt + response "
        "tokens of the sequences each run read or sampled; `peak RSS` is the process's "
        "high-water mark after the run."
    )
    return [
        ("Bandit: setup", text),
        ("Bandit: points (final policies)", common.markdown_table(table, cols)),
    ]


class StudyResult(NamedTuple):
    """What :func:`run` returns: ``status`` (``"finished"``), the workdir, and per section the
    points and the per-(method, beta) rows of the summary (empty for a section not run)."""

    status: str
    workdir: str
    points: list
    rows: list
    sequence_points: list
    sequence_rows: list


def run(config, workdir: str) -> StudyResult:
    """The whole study into ``workdir`` (claimed as a ``study_frontier`` run directory)."""
    validate(config)
    points, rows, seq_points, seq_rows = [], [], [], []
    sections, panels = [], {}
    with common.claimed_workdir(workdir, NAME, config) as wd:
        workdir = wd.path
        if "bandit" in config.tasks:
            bandit = pdata.task_from_config(offline_config(config, "dpo", 0).data)
            points, refs = run_points(config, wd, bandit)
            common.write_table(workdir, "points", points)
            curve = frontier_rows(config, bandit, refs)
            common.write_table(workdir, "frontier", curve)
            rows = aggregate(points)
            sections += summary_text(config, rows, bandit, refs)
            panels["bandit"] = (points, curve)
        if "sequence" in config.tasks:
            seq_points, seq_refs = frontier_sequence.run_points(config, wd)
            common.write_table(workdir, "sequence_points", seq_points)
            common.write_table(workdir, "sequence_references", list(seq_refs.values()))
            seq_rows = frontier_sequence.aggregate(seq_points)
            sections.append(frontier_sequence.summary_section(config, seq_rows, seq_refs))
            panels["sequence"] = (seq_rows, seq_refs)
        plot(os.path.join(workdir, "frontier.png"), **panels)
        common.write_summary(workdir, "Reward-KL frontiers", sections)
        with open(os.path.join(workdir, "summary.md")) as f:
            print(f.read(), flush=True)
    return StudyResult("finished", wd.path, points, rows, seq_points, seq_rows)


main = launch.absl_main(run)


if __name__ == "__main__":
    app.run(main)
