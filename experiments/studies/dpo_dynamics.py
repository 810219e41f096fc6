r"""Study 3, DPO's failure modes: ``python -m experiments.studies.dpo_dynamics``.

Likelihood displacement (Razin et al., 2024; Pal et al., 2024): the DPO loss only asks the margin
:math:`\beta[(\log\pi_\theta(y_w) - \log\pi_{ref}(y_w)) - (\log\pi_\theta(y_l) -
\log\pi_{ref}(y_l))]` to grow, and it can grow with *both* log-probabilities falling, the mass
moving to responses in neither side of any pair. This study follows, over training, the summed
log-probabilities :math:`\log\pi_\theta(y_w|x)` and :math:`\log\pi_\theta(y_l|x)` of fixed
held-out pairs, the gold reward of the policy's samples (temperature 1) and its sampled KL to the
reference, for the variants of ``experiments/configs/studies/dpo_dynamics.py``.

Layout of the workdir (claimed as a ``study_dpo_dynamics`` run directory; running the command
again resumes every run): ``runs/seed=<s>/reference`` (the SFT model every variant starts from),
``runs/seed=<s>/sft_chosen`` (``sft_dpo``'s extra SFT), ``runs/seed=<s>/onpolicy_{train,eval}
.jsonl`` (pairs sampled from the reference), one run per variant, ``measurements/`` (each run's
measurements as they are taken), and ``dynamics.jsonl/.csv``, ``dynamics.png``, ``summary.md``.

Each variant's log-probs are measured on held-out pairs of the distribution it trains on: the
task's base-policy pairs for the offline variants and for ``online_dpo``, the reference's own
samples for ``dpo_onpolicy`` (both kinds are recorded for every variant).
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app

from experiments import launch, pipelines
from experiments.configs import dpo as dpo_config
from experiments.configs import online_dpo as online_dpo_config
from experiments.configs.studies import dpo_dynamics as study_config
from experiments.studies import common
from prefjax import data as pdata
from prefjax.train import checkpointing, dpo, evaluation, inputs, loop, online_dpo, sft
from prefjax.train import common as train_common
from prefjax.train.errors import ConfigError

launch.define_config_flag("studies/dpo_dynamics")  # --config, --config.*, --workdir

NAME = "study_dpo_dynamics"
# The pairs each variant trains on (and whose log-probs are its curve).
PAIRS = {v: "onpolicy" if v == "dpo_onpolicy" else "offline" for v in study_config.VARIANTS}


class StudyResult(NamedTuple):
    """What :func:`run` returns: ``status`` (``"finished"``), the workdir, every measurement
    and the per-variant summary rows."""

    status: str
    workdir: str
    rows: list
    summary: list


# ----------------------------------------------------------------------------------------------
# Configs of the runs
# ----------------------------------------------------------------------------------------------


def _common(c, config, seed: int) -> None:
    c.seed = seed
    c.data.seed = seed
    c.logging.plot = c.logging.tensorboard = c.logging.progress = bool(config.run_logging)
    c.checkpoint.every = 0


def reference_config(config, seed: int) -> ml_collections.ConfigDict:
    """The SFT run on the task's base policy that makes every variant's reference."""
    base = dpo_config.get_config("tiny")
    base.sft_warmup.num_steps = config.reference.num_steps
    base.sft_warmup.learning_rate = config.reference.learning_rate
    c = pipelines.sft_warmup_config(base)
    _common(c, config, seed)
    c.eval.generate = False  # the study measures the policies itself
    return c


def sft_chosen_config(config, seed: int, reference_dir: str) -> ml_collections.ConfigDict:
    """``sft_dpo``'s SFT on the built-in pairs' chosen responses, from the reference."""
    c = reference_config(config, seed)
    c.data.sft_responses = "chosen"
    c.data.num_train = config.dpo.num_train
    c.model.init_from = reference_dir
    c.train.num_steps = config.reference.chosen_steps
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, c.train.num_steps)
    return c


def dpo_run_config(config, seed: int, variant: str, init_dir: str, files=None):
    """A DPO-family run of ``variant`` from ``init_dir`` (its initial policy and reference)."""
    d = config.dpo
    c = dpo_config.get_config("tiny")
    _common(c, config, seed)
    c.sft_warmup.num_steps = 0
    c.model.init_from = init_dir
    c.algorithm.loss = "ipo" if variant == "ipo" else "sigmoid"
    c.algorithm.beta = float(d.beta)
    c.algorithm.rpo_alpha = float(d.rpo_alpha) if variant == "rpo" else 0.0
    c.data.num_train = d.num_train
    c.data.batch_size = d.batch_size
    c.data.num_eval = config.eval.num_pairs
    c.optimizer.learning_rate = d.learning_rate
    c.optimizer.warmup_steps = min(10, d.num_steps // 5)
    c.train.num_steps = d.num_steps
    c.train.log_every = max(1, config.eval.every or d.num_steps)
    c.train.eval_every = 0
    c.eval.generate = False  # the study measures the samples itself (the same way for all)
    if files is not None:
        c.data.task = "files"
        c.data.train_files, c.data.eval_files = files
    return c


def online_run_config(config, seed: int, init_dir: str) -> ml_collections.ConfigDict:
    """Online DPO from the reference at the offline budget (steps x pairs per step)."""
    d = config.dpo
    c = online_dpo_config.get_config("default")
    _common(c, config, seed)
    c.sft_warmup.num_steps = 0
    c.model.init_from = init_dir
    c.algorithm.beta = float(d.beta)
    c.algorithm.num_samples = d.num_samples
    c.algorithm.max_new_tokens = config.eval.max_new_tokens
    c.data.batch_size = d.batch_size
    c.data.num_eval = 16
    c.data.eval_batch_size = 16
    c.optimizer.learning_rate = d.learning_rate
    c.optimizer.warmup_steps = min(10, d.num_steps // 5)
    c.train.num_steps = d.num_steps
    c.train.log_every = max(1, config.eval.every or d.num_steps)
    c.train.eval_every = 0
    c.eval.generate = False
    return c


def validate(config) -> None:
    """The study's own fields (each run's config is validated by its run)."""
    common.check_subset("config.variants", config.variants, study_config.VARIANTS)
    common.check_seeds("config.seeds", config.seeds)
    if config.eval.every < 0 or config.eval.num_pairs < 1 or config.eval.num_samples < 1:
        raise ConfigError(
            "config.eval.every must be >= 0, config.eval.num_pairs and num_samples >= 1"
        )


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def _prompt_batch(prompts, tokenizer, max_prompt_len: int) -> dict:
    """Left-padded prompts for sampling."""
    records = [{"prompt": p, "prompt_id": p} for p in prompts]
    ds = pdata.tokenize(
        records,
        tokenizer,
        "prompt",
        max_len=max_prompt_len,
        max_prompt_len=max_prompt_len,
        append_eos=False,
    )
    return pdata.collate(ds, np.arange(len(ds)), int(ds.lengths().max()), pad_side="left")


@functools.lru_cache(maxsize=8)
def _pair_logps_fn(model):
    def fn(params, ids, attn, mask):
        return train_common.response_logps(model, params, ids, attn, mask)[0]

    return jax.jit(fn)


def pair_logps(model, params, batch) -> tuple[float, float]:
    """Mean ``(log pi(y_w|x), log pi(y_l|x))`` over a pairwise batch ``[n, 2, L]`` (summed over
    each response's tokens, EOS included)."""
    n, _, length = batch["input_ids"].shape
    flat = {
        k: batch[k].reshape(2 * n, length) for k in ("input_ids", "attention_mask", "loss_mask")
    }
    logps = np.asarray(
        _pair_logps_fn(model)(params, flat["input_ids"], flat["attention_mask"], flat["loss_mask"]),
        np.float64,
    ).reshape(n, 2)  # [2n] -> [n, 2]: chosen, rejected
    return float(logps[:, 0].mean()), float(logps[:, 1].mean())


class Probe:
    """What every measurement reads: held-out pairs of both kinds, held-out prompts to sample,
    and the model (its architecture; the parameters are the measured policy's)."""

    def __init__(self, config, model, tokenizer, task, pairs: dict, prompts, seed: int):
        self.config, self.model, self.tokenizer, self.task = config, model, tokenizer, task
        self.pairs, self.seed = pairs, seed
        reps = -(-config.eval.num_samples // len(prompts))
        self.sample_prompts = _prompt_batch(
            (list(prompts) * reps)[: config.eval.num_samples], tokenizer, 16
        )

    def measure(self, params, ref_params) -> dict:
        """Log-probs of the held-out pairs, gold reward and KL of the policy's samples."""
        out = {}
        for kind, batch in self.pairs.items():
            out[f"logp_chosen_{kind}"], out[f"logp_rejected_{kind}"] = pair_logps(
                self.model, params, batch
            )
        key = jax.random.key(self.seed)
        ev = self.config.eval
        sampled = evaluation.gold_reward_of_generations(
            self.model,
            params,
            self.task,
            self.tokenizer,
            self.sample_prompts,
            max_new_tokens=ev.max_new_tokens,
            greedy=False,
            key=key,
            prefix="sampled",
        )
        kl = evaluation.sampled_kl_to_reference(
            self.model,
            params,
            ref_params,
            self.sample_prompts,
            max_new_tokens=ev.max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            key=key,
        )
        out["gold"] = sampled["sampled/reward"]
        out["length"] = sampled["sampled/length/mean"]
        out["kl"] = kl["kl/sampled"]
        return out


class Recorder:
    """Measurements of one run, appended to ``path`` as they are taken (a resumed run replaces
    the records after its checkpoint: the last record of a step wins)."""

    def __init__(self, path: str, probe: Probe, ref_params, every: int, num_steps: int):
        self.path, self.probe, self.ref_params = path, probe, ref_params
        self.every, self.num_steps = every, num_steps

    def record(self, step: int, params) -> None:
        row = {"step": int(step), **self.probe.measure(params, self.ref_params)}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def hook(self, step: int, state, metrics) -> None:
        """The loop's ``step_hook``."""
        if (self.every and step % self.every == 0) or step == self.num_steps:
            self.record(step, state.params)

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        by_step = {r["step"]: r for r in common.read_table(self.path)}
        return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------------------------
# On-policy pairs
# ----------------------------------------------------------------------------------------------


def _decode(tokenizer, tokens, mask) -> list[str]:
    return [
        tokenizer.decode(r) for r in evaluation.unpad(tokens, mask * (tokens != tokenizer.eos_id))
    ]


def onpolicy_records(
    model, params, task, tokenizer, prompts, num: int, seed: int, max_new_tokens: int
) -> list[dict]:
    """Up to ``num`` pairs of two distinct non-empty samples of ``params`` (temperature 1) for
    prompts drawn from ``prompts`` (each pair once, as a preference file must hold it), labelled
    by Bradley-Terry under the gold reward at the task's temperature."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=2 * num)]
    batch = _prompt_batch(chosen, tokenizer, 16)
    samples = []
    for i in range(2):
        _, tokens, mask = evaluation.score_generations(
            model,
            params,
            task,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            greedy=False,
            key=jax.random.fold_in(jax.random.key(seed), i),
        )
        samples.append(_decode(tokenizer, tokens, mask))
    keep, seen = [], set()
    for x, a, b in zip(chosen, *samples, strict=True):
        pair = (x, frozenset((a, b)))
        if a and b and a != b and pair not in seen:  # distinct, non-empty, each pair once
            seen.add(pair)
            keep.append((x, a, b))
    keep = keep[:num]
    r_a = np.asarray([task.gold_reward(x, a) for x, a, _ in keep])
    r_b = np.asarray([task.gold_reward(x, b) for x, _, b in keep])
    p_a = pdata.preference_probability(r_a, r_b, temperature=task.temperature)
    a_wins = rng.random(len(keep)) < p_a
    out = []
    for (x, a, b), ra, rb, win in zip(keep, r_a, r_b, a_wins, strict=True):
        (w, rw), (lose, rl) = ((a, ra), (b, rb)) if win else ((b, rb), (a, ra))
        out.append(
            dict(
                prompt=x,
                chosen=w,
                rejected=lose,
                prompt_id=x,
                chosen_gold_reward=float(rw),
                rejected_gold_reward=float(rl),
            )
        )
    return out


def _write_jsonl(path: str, records) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


def _finished(result, what: str, wd) -> None:
    if result.status != "finished":
        raise RuntimeError(f"{what}: run {result.status}")
    wd.mark_step()  # the study has results now: a later failure keeps its directory


def run_seed(config, wd, seed: int) -> list[dict]:
    """Every variant of one seed; returns their measurements (one row per variant x step)."""
    base = os.path.join(wd.path, "runs", f"seed={seed}")
    ref_dir = os.path.join(base, "reference")
    ref_config = reference_config(config, seed)
    _finished(loop.run(ref_config, ref_dir, sft), "reference SFT", wd)

    probe_config = dpo_run_config(config, seed, "dpo", ref_dir)
    model, tokenizer = inputs.build_model(probe_config, jax.random.key(seed))
    splits = pdata.datasets_from_config(probe_config.data, tokenizer, "pairwise")
    task = splits.task
    held = sorted(splits.held_out)
    train_prompts = sorted(set(task.prompts) - splits.held_out)
    ref_params = checkpointing.restore_params(ref_dir)

    files = None
    pairs = {"offline": _pairs_batch(splits.eval, config.eval.num_pairs)}
    if "dpo_onpolicy" in config.variants:
        files = (
            os.path.join(base, "onpolicy_train.jsonl"),
            os.path.join(base, "onpolicy_eval.jsonl"),
        )
        if not all(os.path.exists(f) for f in files):
            n_eval = config.eval.num_pairs
            recs = onpolicy_records(
                model,
                ref_params,
                task,
                tokenizer,
                train_prompts,
                config.dpo.num_train,
                seed,
                config.eval.max_new_tokens,
            )
            held_recs = onpolicy_records(
                model,
                ref_params,
                task,
                tokenizer,
                held,
                n_eval,
                seed + 1,
                config.eval.max_new_tokens,
            )
            _write_jsonl(files[0], recs)
            _write_jsonl(files[1], held_recs)
        eval_ds = pdata.tokenize(
            common.read_table(files[1]),
            tokenizer,
            "pairwise",
            max_len=probe_config.data.max_len,
            max_prompt_len=probe_config.data.max_prompt_len,
        )
        pairs["onpolicy"] = _pairs_batch(eval_ds, config.eval.num_pairs)
    probe = Probe(config, model, tokenizer, task, pairs, held, seed)

    rows = []
    for variant in config.variants:
        init_dir = ref_dir
        if variant == "sft_dpo":
            init_dir = os.path.join(base, "sft_chosen")
            c = sft_chosen_config(config, seed, ref_dir)
            _finished(loop.run(c, init_dir, sft), "sft_dpo's SFT on chosen", wd)
        if variant == "online_dpo":
            c, module = online_run_config(config, seed, init_dir), online_dpo
        else:
            use = files if variant == "dpo_onpolicy" else None
            c, module = dpo_run_config(config, seed, variant, init_dir, use), dpo
        init = checkpointing.restore_params(init_dir)
        rec = Recorder(
            os.path.join(wd.path, "measurements", f"seed={seed}.{variant}.jsonl"),
            probe,
            init,
            config.eval.every,
            c.train.num_steps,
        )
        if not any(r["step"] == 0 for r in rec.rows()):
            rec.record(0, init)
        result = pipelines.sft_then(module)(c, os.path.join(base, variant), step_hook=rec.hook)
        _finished(result, variant, wd)
        for r in rec.rows():
            own = PAIRS[variant]
            rows.append(
                {
                    "variant": variant,
                    "seed": int(seed),
                    "pairs": "online" if variant == "online_dpo" else own,
                    "step": r["step"],
                    "logp_chosen": r[f"logp_chosen_{own}"],
                    "logp_rejected": r[f"logp_rejected_{own}"],
                    "margin": r[f"logp_chosen_{own}"] - r[f"logp_rejected_{own}"],
                    **{k: v for k, v in r.items() if k != "step"},
                }
            )
    return rows


def _pairs_batch(ds, num: int) -> dict:
    """The first ``num`` pairs of ``ds`` as one ``[n, 2, L]`` batch."""
    n = min(num, len(ds))
    return pdata.collate(ds, np.arange(n), ds.max_len)


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: initial -> final change of each curve, mean and stderr over seeds."""
    out = []
    for variant in study_config.VARIANTS:
        seeds = sorted({r["seed"] for r in rows if r["variant"] == variant})
        if not seeds:
            continue
        delta: dict[str, list[float]] = {}
        final: dict[str, list[float]] = {}
        for seed in seeds:
            curve = sorted(
                (r for r in rows if r["variant"] == variant and r["seed"] == seed),
                key=lambda r: r["step"],
            )
            for name in ("logp_chosen", "logp_rejected", "margin", "gold", "kl", "length"):
                delta.setdefault(name, []).append(curve[-1][name] - curve[0][name])
                final.setdefault(name, []).append(curve[-1][name])
            final.setdefault("gold_initial", []).append(curve[0]["gold"])
            final.setdefault("gold_peak", []).append(max(r["gold"] for r in curve))
        row = {"variant": variant, "seeds": len(seeds)}
        for name, values in delta.items():
            row[f"d_{name}"], row[f"d_{name}_se"] = common.mean_stderr(values)
        for name, values in final.items():
            row[name], row[f"{name}_se"] = common.mean_stderr(values)
        out.append(row)
    return out


def plot(rows: list[dict], path: str) -> str:
    """``dynamics.png``: chosen / rejected log-probs, gold reward and KL against steps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [
        ("logp_chosen", "log pi(chosen), held-out pairs"),
        ("logp_rejected", "log pi(rejected), held-out pairs"),
        ("gold", "gold reward of samples (T = 1)"),
        ("kl", "KL(pi || pi_ref), sampled, nats"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for variant in study_config.VARIANTS:
        vr = [r for r in rows if r["variant"] == variant]
        if not vr:
            continue
        steps = sorted({r["step"] for r in vr})
        for ax, (name, title) in zip(axes, panels, strict=True):
            ys = [np.mean([r[name] for r in vr if r["step"] == s]) for s in steps]
            ax.plot(steps, ys, "o-", markersize=3, label=variant)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def displacement(row: dict) -> str:
    """``"yes"`` when the seed-mean chosen and rejected log-probs both fell while the margin grew,
    ``"no"`` otherwise; ``" (n.s.)"`` is added when the chosen log-prob's change is within two
    standard errors of 0 (over several seeds)."""
    fell = row["d_logp_chosen"] < 0 and row["d_logp_rejected"] < 0 and row["d_margin"] > 0
    unsure = row["seeds"] > 1 and abs(row["d_logp_chosen"]) < 2 * row["d_logp_chosen_se"]
    return ("yes" if fell else "no") + (" (n.s.)" if unsure else "")


def summary_sections(config, summary: list[dict]) -> list[tuple[str, str]]:
    table = [
        {
            "variant": r["variant"],
            "pairs": PAIRS[r["variant"]] if r["variant"] != "online_dpo" else "online",
            "seeds": r["seeds"],
            "Δ log π(chosen)": common.fmt_over_seeds(
                r["d_logp_chosen"], r["d_logp_chosen_se"], r["seeds"], 2
            ),
            "Δ log π(rejected)": common.fmt_over_seeds(
                r["d_logp_rejected"], r["d_logp_rejected_se"], r["seeds"], 2
            ),
            "Δ margin": common.fmt_over_seeds(r["d_margin"], r["d_margin_se"], r["seeds"], 2),
            "gold start → peak → end": f"{r['gold_initial']:.3f} → {r['gold_peak']:.3f} → "
            + common.fmt_over_seeds(r["gold"], r["gold_se"], r["seeds"]),
            "KL end": common.fmt_over_seeds(r["kl"], r["kl_se"], r["seeds"], 2),
            "displacement": displacement(r),
        }
        for r in summary
    ]
    text = (
        f"Every variant starts from one SFT reference ({config.reference.num_steps} steps on the "
        f"task's base policy) and trains {config.dpo.num_steps} steps x {config.dpo.batch_size} "
        f"pairs, beta {config.dpo.beta}. Δ = final minus initial value over training; log-probs "
        "are summed over a response's tokens (EOS included), on held-out pairs of the "
        "distribution the variant trains on; gold reward and KL from "
        f"{config.eval.num_samples} samples of held-out prompts. Mean ± standard error over "
        f"seeds {tuple(config.seeds)}. `displacement`: chosen and rejected log-probs both fell "
        "while the margin grew (n.s.: the chosen log-prob's change is within two standard "
        "errors of 0)."
    )
    cols = list(table[0]) if table else []
    return [("Setup", text), ("Initial -> final", common.markdown_table(table, cols))]


def run(config, workdir: str) -> StudyResult:
    """The whole study into ``workdir`` (claimed as a ``study_dpo_dynamics`` run directory)."""
    validate(config)
    with common.claimed_workdir(workdir, NAME, config) as wd:
        workdir = wd.path
        rows = []
        for seed in config.seeds:
            rows += run_seed(config, wd, seed)
        common.write_table(workdir, "dynamics", rows)
        plot(rows, os.path.join(workdir, "dynamics.png"))
        summary = summarize(rows)
        common.write_summary(
            workdir, "DPO's failure modes on the sequence task", summary_sections(config, summary)
        )
        with open(os.path.join(workdir, "summary.md")) as f:
            print(f.read(), flush=True)
    return StudyResult("finished", workdir, rows, summary)


main = launch.absl_main(run)


if __name__ == "__main__":
    app.run(main)
