r"""Reward over-optimisation (after Gao et al., 2022) on the built-in bandit.

``python -m experiments.studies.overoptimisation [--config=...overoptimisation.py:tiny|full]
[--workdir=...]``

The claim: optimising a learned (proxy) reward model raises the proxy reward monotonically with
:math:`d = \sqrt{KL(\pi\,\|\,\pi_{ref})}` while the true (gold) reward rises, peaks and falls,
sooner for worse proxies; the gold reward follows :math:`R(d) = d(\alpha - \beta d)` under
best-of-N and :math:`R(d) = d(\alpha - \beta \log d)` under RL (Gao et al., 2022, Eqs. 1-2,
rewards measured from the initial policy's).

On the built-in bandit (``prefjax.data.Bandit``: single-token arms with known gold rewards), so
every quantity is exact:

1. :math:`\pi_{ref}`: the tiny model after SFT on one demonstration per arm (near uniform), its
   next-token distribution over the arms (``prefjax.train.evaluation.bandit_policy``);
2. proxies: Bradley-Terry reward models (``prefjax.train.reward``) trained on ``num_train``
   gold-labelled pairs each; a proxy's score of every arm is one forward. Each seed is another
   bandit instance (gold rewards, reference table, pairs, labels) and proxy initialisation; the
   reference policy is shared (same prompt, same arms);
3. best-of-N: :func:`best_of_n_probs` gives the exact distribution of the arm picked by the
   proxy among N draws from :math:`\pi_{ref}` (ties broken at random), hence its exact gold,
   proxy and KL; a Monte Carlo of the same selection (draw, pick, score) checks it. The usual
   :math:`KL = \log N - (N-1)/N` (:func:`kl_formula`) holds for continuous scores; over a few
   arms it is an upper bound that the exact KL departs from as N grows (the selection
   saturates on the proxy's top arm);
4. RL: PPO (``prefjax.train.ppo``) from :math:`\pi_{ref}` against each proxy, the policy over
   the arms measured every ``ppo.eval_every`` iterations;
5. fits of both forms by least squares (:func:`fit_form`), per proxy, on the gains over
   :math:`\pi_{ref}`.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments import launch
from experiments.configs import ppo as ppo_configs
from experiments.configs import reward_model as reward_model_configs
from experiments.configs import sft as sft_configs
from experiments.studies import common
from prefjax import data
from prefjax.train import evaluation, loop, online, ppo, reward, sft
from prefjax.train.errors import ConfigError

NAME = "study_overoptimisation"
FLAGS = flags.FLAGS
launch.define_config_flag("studies/overoptimisation")  # --config, --config.*, --workdir
FORMS = ("bon", "rl")


# ----------------------------------------------------------------------------------------------
# Best-of-N over a discrete policy, exactly
# ----------------------------------------------------------------------------------------------


def best_of_n_probs(ref_probs, scores, ns) -> np.ndarray:
    r"""Distribution of the best-scored of N i.i.d. draws from a discrete policy.

    With the arms' scores grouped into distinct levels :math:`s_1 < \dots < s_G`, the mass
    :math:`F_g = \sum_{s(a) \le s_g} \pi(a)` below each level and ties broken uniformly at random
    among the draws at the top level (so within a level the pick follows :math:`\pi`):

    .. math:: P_N(a) = \big(F_{g(a)}^N - F_{g(a)-1}^N\big)\,\frac{\pi(a)}{F_{g(a)} - F_{g(a)-1}}

    Args:
      ref_probs: ``[..., K]`` probabilities of the arms (summing to 1 on the last axis).
      scores: ``[..., K]`` the proxy's score of each arm.
      ns: ``[M]`` values of N (>= 1).

    Returns:
      ``[..., M, K]`` float64 selection probabilities.

    Example:
      >>> p = best_of_n_probs([0.5, 0.5], [0.0, 1.0], [1, 2])
      >>> p.tolist()  # N = 2: the better arm unless both draws are the worse one
      [[0.5, 0.5], [0.25, 0.75]]
    """
    ref = np.asarray(ref_probs, np.float64)
    s = np.asarray(scores, np.float64)
    ns = np.asarray(ns, np.float64)
    if ref.shape != s.shape:
        raise ValueError(f"ref_probs {ref.shape} and scores {s.shape} must have one shape")
    if np.any(ns < 1):
        raise ValueError(f"best-of-N needs N >= 1, got {ns.tolist()}")
    flat_ref, flat_s = ref.reshape(-1, ref.shape[-1]), s.reshape(-1, s.shape[-1])
    out = np.zeros((flat_ref.shape[0], ns.size, ref.shape[-1]))
    for row, (p, sc) in enumerate(zip(flat_ref, flat_s, strict=True)):
        order = np.argsort(sc, kind="stable")
        level = np.cumsum(np.r_[True, np.diff(sc[order]) != 0]) - 1  # [K] level of each arm
        mass = np.bincount(level, weights=p[order])  # [G]
        upper = np.minimum(np.cumsum(mass), 1.0)  # F_g, clipped against rounding above 1
        lower = upper - mass
        top = upper[None, :] ** ns[:, None] - np.maximum(lower, 0.0)[None, :] ** ns[:, None]
        within = np.where(mass[level] > 0, p[order] / np.where(mass > 0, mass, 1.0)[level], 0.0)
        out[row][:, order] = top[:, level] * within[None, :]  # [M, K]
    return out.reshape(*ref.shape[:-1], ns.size, ref.shape[-1])


def kl_formula(ns) -> np.ndarray:
    r""":math:`\log N - (N - 1)/N`: the KL of best-of-N to the sampling policy when the scores
    are continuous (no ties), an upper bound otherwise (Beirami et al., 2024)."""
    ns = np.asarray(ns, np.float64)
    return np.log(ns) - (ns - 1.0) / ns


def kl_to(probs, ref_probs) -> np.ndarray:
    """``[...]`` :math:`KL(p\\,\\|\\,q)` over the last axis; ``0 log 0 = 0``."""
    p, q = np.asarray(probs, np.float64), np.asarray(ref_probs, np.float64)
    ratio = np.where(p > 0, p / np.where(q > 0, q, 1.0), 1.0)
    return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), axis=-1)


def sample_best_of_n(rng, ref_probs, scores, n: int, num_draws: int) -> np.ndarray:
    """``[num_draws]`` arms picked by best-of-``n``: ``n`` draws from ``ref_probs`` ``[K]``,
    the first of the best-scored kept (as ``prefjax.rollout.best_of_n``; the draws are
    exchangeable, so this is the random tie-break)."""
    draws = rng.choice(len(ref_probs), size=(num_draws, n), p=ref_probs)  # [draws, n]
    best = np.argmax(np.asarray(scores)[draws], axis=1)  # [draws]
    return draws[np.arange(num_draws), best]


# ----------------------------------------------------------------------------------------------
# The functional forms of Gao et al. (2022)
# ----------------------------------------------------------------------------------------------


def _features(d, form: str) -> np.ndarray:
    d = np.asarray(d, np.float64)
    if form == "bon":
        return np.stack([d, -(d**2)], axis=-1)  # R = alpha d - beta d^2
    if form == "rl":
        d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
        return np.stack([d, -d_log_d], axis=-1)  # R = alpha d - beta d log d
    raise ValueError(f"form={form!r}: expected one of {FORMS}")


def predict(d, alpha: float, beta: float, form: str) -> np.ndarray:
    r"""``bon``: :math:`d(\alpha - \beta d)`; ``rl``: :math:`d(\alpha - \beta \log d)`
    (0 at d = 0)."""
    return _features(d, form) @ np.asarray([alpha, beta], np.float64)


def fit_form(d, gain, form: str) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of :func:`predict` to ``gain`` ``[n]`` at ``d`` ``[n]``
    (``numpy.linalg.lstsq``; no intercept: the gain is 0 at d = 0 by construction)."""
    x = _features(d, form)
    (alpha, beta), *_ = np.linalg.lstsq(x, np.asarray(gain, np.float64), rcond=None)
    return float(alpha), float(beta)


# ----------------------------------------------------------------------------------------------
# Sub-run configs
# ----------------------------------------------------------------------------------------------


def validate(config) -> None:
    """Start-up checks of the study's fields, each error naming the field."""
    if not config.reward_model.num_train or not config.seeds:
        raise ConfigError("config.reward_model.num_train and config.seeds: at least one each")
    for n in config.reward_model.num_train:
        if n < config.reward_model.batch_size:
            raise ConfigError(
                f"config.reward_model.num_train={tuple(config.reward_model.num_train)}: {n} pairs"
                f" is fewer than config.reward_model.batch_size={config.reward_model.batch_size}"
            )
    ns = list(config.best_of_n.ns)
    if not ns or ns[0] != 1 or any(b <= a for a, b in zip(ns, ns[1:], strict=False)):
        raise ConfigError(f"config.best_of_n.ns={tuple(ns)}: increasing, starting at 1")
    if config.best_of_n.num_draws < 2:
        raise ConfigError(f"config.best_of_n.num_draws={config.best_of_n.num_draws}: >= 2")
    if config.ppo.eval_every < 1 or config.ppo.num_steps < config.ppo.eval_every:
        raise ConfigError(
            f"config.ppo.eval_every={config.ppo.eval_every}: in [1, config.ppo.num_steps="
            f"{config.ppo.num_steps}]"
        )


def _quiet(sub, config) -> None:
    sub.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    sub.logging.progress = bool(config.logging.progress)
    sub.logging.plot = False
    sub.logging.tensorboard = False
    sub.train.eval_every = 0  # evaluated once, at the end
    sub.checkpoint.every = 0  # the final checkpoint only
    sub.optimizer.warmup_steps = 0
    sub.data.label_noise = config.bandit.label_noise


def reference_config(config, train_file: str, eval_file: str) -> ml_collections.ConfigDict:
    """SFT on one row per arm (files: the bandit task has no SFT data)."""
    sub = sft_configs.get_config("tiny")
    _quiet(sub, config)
    sub.data.task = "files"
    sub.data.train_files, sub.data.eval_files = train_file, eval_file
    sub.data.batch_size = config.reference.batch_size
    sub.optimizer.learning_rate = config.reference.learning_rate
    sub.train.num_steps = config.reference.num_steps
    sub.eval.generate = False
    return sub


def reward_model_config(config, num_train: int, seed: int) -> ml_collections.ConfigDict:
    """A Bradley-Terry proxy on ``num_train`` gold-labelled pairs of the bandit."""
    sub = reward_model_configs.get_config("tiny")
    _quiet(sub, config)
    sub.seed = sub.data.seed = seed
    sub.data.task = "bandit"
    # Held-out pairs in batches of the training size: one more compiled shape at most.
    sub.data.num_eval = 4 * config.reward_model.batch_size
    sub.data.eval_batch_size = config.reward_model.batch_size
    sub.data.num_train = num_train
    sub.data.batch_size = config.reward_model.batch_size
    sub.optimizer.learning_rate = config.reward_model.learning_rate
    sub.train.num_steps = config.reward_model.num_steps
    return sub


def ppo_config(config, reference_dir: str, rm_dir: str, seed: int) -> ml_collections.ConfigDict:
    """PPO on the bandit from the reference policy, scored by the proxy in ``rm_dir``."""
    sub = ppo_configs.get_config("bandit")
    _quiet(sub, config)
    sub.seed = sub.data.seed = seed
    sub.model.init_from = reference_dir
    algo = sub.algorithm
    algo.reward.source = "model"
    algo.reward.model_dir = rm_dir
    algo.kl_coef = config.ppo.kl_coef
    algo.num_samples = config.ppo.num_samples
    # The final held-out evaluation samples batches of the training size (the sampler compiled
    # once); its bandit metrics are exact anyway.
    sub.data.batch_size = sub.data.eval_batch_size = sub.data.num_eval = config.ppo.batch_size
    sub.optimizer.learning_rate = config.ppo.learning_rate
    sub.train.num_steps = config.ppo.num_steps
    sub.train.log_every = config.ppo.eval_every
    return sub


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


class Proxy(NamedTuple):
    """One trained proxy: its size, seed, bandit instance, run directory, ``[P, K]`` scores of
    the arms and held-out agreement with the gold order of pairs
    (``eval/rewards/gold_accuracy``)."""

    num_train: int
    seed: int
    bandit: data.Bandit
    workdir: str
    scores: np.ndarray
    gold_accuracy: float


class StudyResult(NamedTuple):
    """What :func:`run` returns (``status`` as a training run's: the launcher reads it)."""

    status: str
    workdir: str
    files: dict


def _finished(result: loop.RunResult) -> bool:
    return result.status == "finished"


def _last_eval(run_dir: str) -> dict:
    rows = common.read_table(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in rows if r.get("split") == "eval"]
    return evals[-1] if evals else {}


def arm_scores(rm_result: loop.RunResult, bandit: data.Bandit, tokenizer) -> np.ndarray:
    """``[P, K]`` a reward model's score of every (prompt, arm), tokenised as its training pairs
    (BOS + prompt + arm, no EOS) and read at the arm token."""
    records = [{"prompt": p, "completion": a} for p in bandit.prompts for a in bandit.arms]
    max_len = bandit.default_max_len
    ds = data.tokenize(records, tokenizer, "sft", max_len=max_len, append_eos=False)
    batch = data.collate(ds, np.arange(len(ds)), max_len)
    model = rm_result.setup.model
    scores = model.apply(rm_result.state.params, batch["input_ids"], batch["attention_mask"])
    return np.asarray(jax.device_get(scores), np.float64).reshape(len(bandit.prompts), -1)


def best_of_n_rows(config, ref_probs, proxy: Proxy) -> list[dict]:
    """Exact and sampled best-of-N against ``proxy`` for every ``config.best_of_n.ns``."""
    bandit = proxy.bandit
    ns = np.asarray(config.best_of_n.ns)
    probs = best_of_n_probs(ref_probs, proxy.scores, ns)  # [P, M, K]
    gold = np.einsum("pmk,pk->mp", probs, bandit.rewards).mean(-1)  # [M]
    score = np.einsum("pmk,pk->mp", probs, proxy.scores).mean(-1)
    kl = np.maximum(kl_to(probs, ref_probs[:, None, :]).mean(0), 0.0)  # [M]; rounding below 0
    rng = np.random.default_rng([config.seed, proxy.seed, proxy.num_train])
    rows = []
    for m, n in enumerate(ns):
        picked = [
            sample_best_of_n(rng, ref_probs[p], proxy.scores[p], int(n), config.best_of_n.num_draws)
            for p in range(len(bandit.prompts))
        ]
        sampled = np.concatenate([bandit.rewards[p, a] for p, a in enumerate(picked)])
        freq = np.stack([np.bincount(a, minlength=bandit.num_arms) for a in picked])
        freq = freq / config.best_of_n.num_draws
        mean, stderr = common.mean_stderr(sampled)
        rows.append(
            {
                "num_train": proxy.num_train,
                "seed": proxy.seed,
                "n": int(n),
                "kl_formula": float(kl_formula(n)),
                "kl": float(kl[m]),
                "d": float(np.sqrt(max(kl[m], 0.0))),
                "gold": float(gold[m]),
                "proxy": float(score[m]),
                "gold_gain": float(gold[m] - gold[0]),
                "proxy_gain": float(score[m] - score[0]),
                "gold_sampled": mean,
                "gold_sampled_stderr": stderr,
                "kl_sampled": float(kl_to(freq, ref_probs).mean()),
            }
        )
    return rows


def _policy_row(proxy, step, probs, ref_probs) -> dict:
    kl = float(kl_to(probs, ref_probs).mean())
    return {
        "num_train": proxy.num_train,
        "seed": proxy.seed,
        "step": int(step),
        "kl": kl,
        "d": float(np.sqrt(max(kl, 0.0))),
        "gold": float(proxy.bandit.expected_reward(probs).mean()),
        "proxy": float((probs * proxy.scores).sum(-1).mean()),
    }


def rl_rows(config, workdir, reference, tokenizer, ref_probs, proxy):
    """PPO against ``proxy`` from the reference policy; ``(run result, rows)``, a row every
    ``config.ppo.eval_every`` iterations. The rows live in ``<ppo run>/arm_policy.jsonl`` so a
    resumed or finished run keeps those of earlier invocations."""
    sub = ppo_config(config, reference.workdir, proxy.workdir, proxy.seed)
    run_dir = os.path.join(workdir, f"ppo_n{proxy.num_train}_s{proxy.seed}")
    path = os.path.join(run_dir, "arm_policy.jsonl")
    rows = {0: _policy_row(proxy, 0, ref_probs, ref_probs)}
    if os.path.exists(path):
        rows.update({r["step"]: r for r in common.read_table(path)})
    model = reference.setup.model  # the policy's architecture: PPO's state.params fit it

    def hook(step, state, metrics):
        del metrics
        if step % config.ppo.eval_every == 0 or step == config.ppo.num_steps:
            logp = evaluation.bandit_policy(model, state.params, proxy.bandit, tokenizer)
            rows[step] = _policy_row(proxy, step, np.exp(logp), ref_probs)

    try:
        result = loop.run(sub, run_dir, ppo, step_hook=hook)
    finally:
        if os.path.isdir(run_dir):
            data.write_jsonl(path, [rows[s] for s in sorted(rows)])
    out = [rows[s] for s in sorted(rows)]
    for r in out:
        r["gold_gain"] = r["gold"] - rows[0]["gold"]
        r["proxy_gain"] = r["proxy"] - rows[0]["proxy"]
    return result, out


def fit_rows(rows: list[dict], form: str, fall_threshold: float) -> dict:
    """Per size: each seed's ``(alpha, beta)`` of gold and proxy gains, where the gold gain
    peaks, its fall from the peak to the largest d (``overoptimised`` when the fall exceeds
    ``fall_threshold``), and the means and standard errors of all these over seeds."""
    out = {}
    for n in sorted({r["num_train"] for r in rows}):
        per_seed = []
        for seed in sorted({r["seed"] for r in rows if r["num_train"] == n}):
            rs = [r for r in rows if r["num_train"] == n and r["seed"] == seed]
            d = [r["d"] for r in rs]
            fit = {"seed": seed}
            for target in ("gold", "proxy"):
                fit[f"{target}_alpha"], fit[f"{target}_beta"] = fit_form(
                    d, [r[f"{target}_gain"] for r in rs], form
                )
            peak = max(rs, key=lambda r: r["gold_gain"])
            last = max(rs, key=lambda r: r["d"])
            fall = peak["gold_gain"] - last["gold_gain"]
            fit.update(
                d_peak=peak["d"],
                gold_gain_peak=peak["gold_gain"],
                d_max=last["d"],
                gold_gain_at_d_max=last["gold_gain"],
                proxy_gain_at_d_max=last["proxy_gain"],
                gold_fall=fall,
                overoptimised=float(fall > fall_threshold),
            )
            per_seed.append(fit)
        summary = {}
        for key in [k for k in per_seed[0] if k != "seed"]:
            summary[key], summary[f"{key}_stderr"] = common.mean_stderr([f[key] for f in per_seed])
        out[str(n)] = {**summary, "per_seed": per_seed}
    return out


def run(config, workdir: str) -> StudyResult:
    """Runs the study into ``workdir`` (see the module docstring), claimed as a ``NAME`` run
    directory: another run's or study's directory, or the same study with a config that differs
    in a field that changes the results, is refused; the same command resumes."""
    validate(config)
    with common.claimed_workdir(workdir, NAME, config) as wd:
        return _run(config, wd)


def _run(config, wd) -> StudyResult:
    workdir = wd.path
    bandits = {
        seed: data.task_from_config(reward_model_config(config, 16, seed).data)
        for seed in config.seeds
    }
    bandit = bandits[config.seeds[0]]  # every instance has the same prompts and arms
    tokenizer = online.tokenizer_of(sft_configs.get_config("tiny"))

    # 1. pi_ref: SFT on one demonstration per (prompt, arm); files are split by prompt, so the
    # held-out rows are the same arms after another prompt text.
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_file, eval_file = (
        os.path.join(data_dir, f"reference_{s}.jsonl") for s in ("train", "eval")
    )
    for path, prefix in ((train_file, ""), (eval_file, "Held out: ")):
        rows = [
            {"prompt": prefix + p, "completion": a} for p in bandit.prompts for a in bandit.arms
        ]
        data.write_jsonl(path, rows)
    reference = loop.run(
        reference_config(config, train_file, eval_file), os.path.join(workdir, "reference"), sft
    )
    if not _finished(reference):
        return StudyResult(reference.status, workdir, {})
    wd.mark_step()  # the study has results now: a later failure keeps its directory
    ref_logp = evaluation.bandit_policy(
        reference.setup.model, reference.state.params, bandit, tokenizer
    )
    ref_probs = np.exp(ref_logp)  # [P, K]

    # 2. proxies; 3. best-of-N; 4. PPO.
    bon, rl, proxies = [], [], []
    for num_train in config.reward_model.num_train:
        for seed in config.seeds:
            rm_dir = os.path.join(workdir, f"rm_n{num_train}_s{seed}")
            rm = loop.run(reward_model_config(config, num_train, seed), rm_dir, reward)
            if not _finished(rm):
                return StudyResult(rm.status, workdir, {})
            proxy = Proxy(
                num_train,
                seed,
                bandits[seed],
                rm_dir,
                arm_scores(rm, bandits[seed], tokenizer),
                float(_last_eval(rm_dir).get("eval/rewards/gold_accuracy", float("nan"))),
            )
            proxies.append(proxy)
            bon += best_of_n_rows(config, ref_probs, proxy)
            result, rows = rl_rows(config, workdir, reference, tokenizer, ref_probs, proxy)
            if not _finished(result):
                return StudyResult(result.status, workdir, {})
            rl += rows

    files = {}
    files["bon"] = common.write_table(workdir, "bon", bon)
    files["rl"] = common.write_table(workdir, "rl", rl)
    fits = {
        form: fit_rows(r, form, config.fall_threshold) for form, r in (("bon", bon), ("rl", rl))
    }
    fits["proxies"] = [
        {
            "num_train": p.num_train,
            "seed": p.seed,
            "gold_accuracy": p.gold_accuracy,
            "top_arm_is_gold_top": bool(np.all(p.scores.argmax(-1) == p.bandit.rewards.argmax(-1))),
            "scores": p.scores.tolist(),
        }
        for p in proxies
    ]
    fits["ref_probs"] = ref_probs.tolist()
    fits["bandits"] = {
        str(seed): {
            "gold_rewards": b.rewards.tolist(),
            "best_arm_gain": float((b.rewards.max(-1) - b.expected_reward(ref_probs)).mean()),
        }
        for seed, b in bandits.items()
    }
    files["fits"] = os.path.join(workdir, "fits.json")
    with open(files["fits"], "w") as f:
        json.dump(fits, f, indent=1)
    files["plot"] = plot(bon, rl, fits, os.path.join(workdir, "overoptimisation.png"))
    files["summary"] = write_summary(config, workdir, fits, bon)
    if jax.process_index() == 0:
        print(open(files["summary"]).read(), flush=True)
    return StudyResult("finished", workdir, files)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _mean_curve(rows: list[dict], num_train: int, key: str) -> tuple[np.ndarray, ...]:
    """Seed means of ``d``, gold and proxy gains at each N (best-of-N) or step (RL)."""
    rs = [r for r in rows if r["num_train"] == num_train]
    xs = sorted({r[key] for r in rs})
    mean = lambda x, f: float(np.mean([r[f] for r in rs if r[key] == x]))
    return tuple(np.asarray([mean(x, f) for x in xs]) for f in ("d", "gold_gain", "proxy_gain"))


def plot(bon: list[dict], rl: list[dict], fits: dict, path: str) -> str:
    """Gains over pi_ref against d, one colour per proxy size (seed means): gold (top row, the
    fitted form dotted) and proxy (bottom row, in the proxy's own units); best-of-N left, PPO
    right."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=72, sharex="col")
    sizes = sorted({r["num_train"] for r in bon})
    colours = plt.cm.viridis(np.linspace(0.0, 0.85, len(sizes)))
    for col, (rows, form, key, title) in enumerate(
        ((bon, "bon", "n", "best-of-N"), (rl, "rl", "step", "PPO"))
    ):
        for n, colour in zip(sizes, colours, strict=True):
            d, gold, proxy = _mean_curve(rows, n, key)
            fit = fits[form][str(n)]
            grid = np.linspace(0.0, d.max(), 100)
            axes[0, col].plot(d, gold, "o-", color=colour, label=f"{n} pairs")
            axes[0, col].plot(
                grid, predict(grid, fit["gold_alpha"], fit["gold_beta"], form), ":", color=colour
            )
            axes[1, col].plot(d, proxy, "s--", color=colour, label=f"{n} pairs")
        axes[0, col].set_title(f"{title}: gold reward (fit dotted)")
        axes[1, col].set_title(f"{title}: proxy reward")
        axes[1, col].set_xlabel("d = sqrt(KL(pi || pi_ref))")
        for ax in axes[:, col]:
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_ylabel("gain over pi_ref")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_rows(fits: dict, form: str) -> list[dict]:
    """The table of ``form`` (``bon`` | ``rl``): one row per proxy size, mean ± standard error
    over seeds."""
    rows = []
    for n, fit in fits[form].items():
        proxies = [p for p in fits["proxies"] if str(p["num_train"]) == n]

        def stat(key, digits=3, fit=fit):
            return common.fmt(fit[key], fit[f"{key}_stderr"], digits)

        top = [float(p["top_arm_is_gold_top"]) for p in proxies]
        rows.append(
            {
                "pairs": n,
                "RM gold accuracy": common.fmt(
                    *common.mean_stderr([p["gold_accuracy"] for p in proxies])
                ),
                "proxy top = gold top": f"{int(sum(top))}/{len(top)}",
                "gold α": stat("gold_alpha"),
                "gold β": stat("gold_beta"),
                "proxy α": stat("proxy_alpha"),
                "proxy β": stat("proxy_beta"),
                "gold gain at peak": stat("gold_gain_peak"),
                "d at peak": stat("d_peak", 2),
                "gold fall after peak": stat("gold_fall"),
                "over-optimised": f"{int(round(fit['overoptimised'] * len(top)))}/{len(top)}",
                "d max": stat("d_max", 2),
            }
        )
    return rows


def kl_table(bon: list[dict]) -> str:
    """Per N: the formula, and the exact and sampled KL of the selection (mean ± standard
    error over every proxy)."""
    rows = []
    for n in sorted({r["n"] for r in bon}):
        rs = [r for r in bon if r["n"] == n]
        rows.append(
            {
                "N": n,
                "log N − (N−1)/N": rs[0]["kl_formula"],
                "exact KL": common.fmt(*common.mean_stderr([r["kl"] for r in rs])),
                "sampled KL": common.fmt(*common.mean_stderr([r["kl_sampled"] for r in rs])),
            }
        )
    return common.markdown_table(rows, list(rows[0]))


def write_summary(config, workdir: str, fits: dict, bon: list[dict]) -> str:
    """``summary.md``: per proxy size, the fitted coefficients, where gold peaks and how far it
    falls after (over seeds), for best-of-N and PPO."""
    sections = []
    for form, title in (
        ("bon", "Best-of-N: R(d) = d(α − βd)"),
        ("rl", "PPO: R(d) = d(α − β log d)"),
    ):
        rows = summary_rows(fits, form)
        sections.append((title, common.markdown_table(rows, list(rows[0]))))
    sections.append(("Best-of-N KL: exact and sampled against log N − (N−1)/N", kl_table(bon)))
    gain = np.mean([b["best_arm_gain"] for b in fits["bandits"].values()])
    sections.append(
        (
            "Setting",
            f"Built-in bandit (8 arms, 1 prompt), instances data.seed in {tuple(config.seeds)}, "
            f"label noise {config.bandit.label_noise}; pi_ref: the SFT policy over the arms; "
            "mean ± standard error over seeds. Best-of-N exact over the arms for N in "
            f"{tuple(config.best_of_n.ns)} (d from the exact KL); PPO {config.ppo.num_steps} "
            f"iterations, beta {config.ppo.kl_coef}. Gains are measured from pi_ref (the best "
            f"arm's mean gain: {gain:.3f}); over-optimised: the gold gain falls by more than "
            f"{config.fall_threshold} from its peak to the largest d.",
        )
    )
    return common.write_summary(workdir, "Reward over-optimisation", sections)


main = launch.absl_main(run)


if __name__ == "__main__":
    app.run(main)
