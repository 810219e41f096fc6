r"""Best-of-N with a process reward model on the built-in arithmetic task.

``python -m experiments.prm_best_of_n --policy_dir=RUN --prm_dir=RUN [--num_samples=8]``

``--policy_dir`` is any run whose checkpoint is a policy (an SFT run, a GRPO run's
``sft_warmup`` folder, ...), ``--prm_dir`` an ``experiments/reward_model.py`` run trained with
``loss="prm"`` (``--config=experiments/configs/reward_model.py:prm``). For every held-out prompt
of the policy run's task it samples ``num_samples`` responses (temperature 1) and prints the mean
gold reward of: one sample (the first, i.e. best-of-1), the PRM's pick by the ``min`` and by the
``product`` of the step probabilities, and the oracle pick (the best gold reward among the
samples), each averaged over ``--repeats`` independent draws (median and spread printed).
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from prefjax import data, models, rollout
from prefjax.train import checkpointing, common, online

flags.DEFINE_string("policy_dir", None, "run directory of the policy (its newest checkpoint)")
flags.DEFINE_string("prm_dir", None, "run directory of a reward_model.py run with loss='prm'")
flags.DEFINE_integer("num_samples", 8, "N: responses sampled per prompt")
flags.DEFINE_integer("repeats", 5, "independent draws (medians reported)")
flags.DEFINE_integer("max_new_tokens", 13, "response budget in tokens")
flags.DEFINE_integer("seed", 0, "PRNG seed of the first draw")
FLAGS = flags.FLAGS


def load_policy(run_dir: str):
    """``(model, config)`` of a run's newest checkpoint as an LM-head policy."""
    with open(os.path.join(run_dir, "run.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f)["config"])
    overrides = common.model_overrides(cfg)
    if cfg.model.path:
        model_config = models.config_from_hf(cfg.model.path).replace(**overrides)
    else:
        model_config = models.preset(cfg.model.preset, **overrides)
    params = checkpointing.restore_params(run_dir)
    return models.Model(model_config, params, head="lm"), cfg


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    policy, cfg = load_policy(FLAGS.policy_dir)
    task = data.task_from_config(cfg.data)
    if not isinstance(task, data.ArithmeticTask):
        raise app.UsageError(f"{FLAGS.policy_dir}: data.task={cfg.data.task!r}, not 'arithmetic'")
    tokenizer = online.tokenizer_of(cfg)
    prompts = sorted(
        data.loaders.held_out_prompts(task.prompts, cfg.data.eval_fraction, cfg.data.seed)
    )
    ds = data.tokenize([{"prompt": p} for p in prompts], tokenizer, "prompt", max_len=16)
    batch = data.collate(ds, np.arange(len(ds)), 16, pad_side="left")
    n = FLAGS.num_samples
    sampler = rollout.make_sampler(
        policy,
        rollout.SamplingConfig(
            max_new_tokens=FLAGS.max_new_tokens,
            num_samples=n,
            eos_ids=(tokenizer.eos_id,),
            pad_id=tokenizer.pad_id,
        ),
    )
    gold = rollout.GoldReward(task, tokenizer)
    prms = {a: online.prm_from_workdir(FLAGS.prm_dir, aggregation=a) for a in rollout.AGGREGATIONS}
    results: dict[str, list[float]] = {"best_of_1": [], "oracle": []}
    for repeat in range(FLAGS.repeats):
        key = jax.random.key(FLAGS.seed + repeat)
        r = sampler(policy.params, batch["prompt_input_ids"], batch["prompt_attention_mask"], key)
        g = np.asarray(gold(r)).reshape(-1, n)  # [prompts, n]
        results["best_of_1"].append(float(g[:, 0].mean()))
        results["oracle"].append(float(g.max(1).mean()))
        for name, source in prms.items():
            pick = np.asarray(rollout.best_of_n(r, source(r), n).index) % n
            results.setdefault(f"prm_{name}", []).append(float(g[np.arange(len(g)), pick].mean()))
    print(f"{len(prompts)} held-out prompts x {n} samples, {FLAGS.repeats} draws")
    print(f"{'pick':<12} {'gold (median)':>14} {'min':>7} {'max':>7}")
    for name, values in results.items():
        v = np.asarray(values)
        print(f"{name:<12} {np.median(v):>14.3f} {v.min():>7.3f} {v.max():>7.3f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["policy_dir", "prm_dir"])
    app.run(main)
