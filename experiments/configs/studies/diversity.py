r"""Study 4, diversity and length: ``python -m experiments.studies.diversity``.

Per seed, one SFT policy (the reference of every method, trained on the sequence task's base
policy), then each method of ``methods`` from it at each KL strength of ``betas`` (DPO and online
DPO: ``algorithm.beta``; PPO and GRPO: ``algorithm.kl_coef``), each run with its launcher's
config (``method_preset``) for ``num_steps`` steps. Every final policy, and the SFT policy itself,
samples ``sample.num_samples`` responses to each of ``sample.num_prompts`` held-out prompts,
measured by :func:`prefjax.train.evaluation.diversity_metrics`: per-token entropy, distinct-1/2,
self-BLEU, length, gold reward, the sampled KL to the SFT policy, and the gold reward
reweighted to the SFT policy's length distribution (:func:`~prefjax.train.evaluation.
length_matched_mean`). Writes ``diversity.jsonl``/``.csv`` (one row per seed, method and beta),
``diversity.png`` (each metric against the KL) and ``summary.md`` (means ± standard errors over
seeds) into the workdir; the runs themselves lie in ``seed=<s>/sft`` and
``seed=<s>/<method>/beta=<b>``.

Presets: ``:tiny`` (the test suite's: 100 SFT steps, then plain DPO at beta 0.1 and 1 for 40 steps
in one sweep, one seed; under a minute on 2 CPU cores; add the online methods with
``--config.methods="('dpo', 'ppo', 'grpo', 'online_dpo')"``, 20 steps each at the launchers'
``:tiny`` batch sizes) and ``:full`` (a GPU: SFT, DPO, PPO, GRPO and online DPO at four
strengths each, three seeds, the launchers' default runs).
"""

import ml_collections

from experiments.configs import common

PRESETS = ("tiny", "full")
# The methods the study trains (the SFT reference is always measured).
METHODS = ("dpo", "ppo", "grpo", "online_dpo")


def get_config(arg=None):
    preset = common.parse_arg(arg, PRESETS)
    config = ml_collections.ConfigDict()
    # Study directory used when --workdir is not given (relative to the current directory).
    config.workdir_default = f"runs/study_diversity_{preset}"
    # Seeds of the model initialisation (so of the SFT policy) and of every method's run.
    config.seeds = (0,)
    # Methods trained from the SFT policy, of METHODS.
    config.methods = ("dpo",)
    # Preset of each method's launcher config (experiments/configs/<method>.py) the runs start
    # from: "tiny" (a small batch) | "default" (the launcher's embedded default). DPO has one.
    config.method_preset = "tiny"
    # KL strengths per method: algorithm.beta (DPO, online DPO) or algorithm.kl_coef (PPO, GRPO).
    config.betas = betas = ml_collections.ConfigDict()
    betas.dpo = (0.1, 1.0)
    betas.ppo = (0.01, 0.1)
    betas.grpo = (0.0, 0.2)
    betas.online_dpo = (0.05, 0.5)
    # Optimiser steps of each method's run.
    config.num_steps = steps = ml_collections.ConfigDict()
    steps.dpo = 40
    steps.ppo = 20
    steps.grpo = 20
    steps.online_dpo = 20

    # Fields of each method's run config set after its preset (dotted paths under the method):
    # plain DPO, without the DPO launcher's RPO term (its NLL on the chosen response holds the
    # policy near the data, which is what the study measures the absence of).
    config.overrides = ml_collections.ConfigDict(
        {"dpo": {"algorithm": {"rpo_alpha": 0.0}}, "ppo": {}, "grpo": {}, "online_dpo": {}}
    )

    config.sft = sft = ml_collections.ConfigDict()
    # SFT steps on the sequence task's base policy (the reference of every method).
    sft.num_steps = 100
    # Peak learning rate of the SFT run.
    sft.learning_rate = 3e-3

    config.sample = sample = ml_collections.ConfigDict()
    # Held-out prompts sampled per measured policy (at most the held-out split's).
    sample.num_prompts = 8
    # Responses per prompt (>= 2: distinct-n and self-BLEU compare the responses to one prompt).
    sample.num_samples = 8
    # Response budget in tokens.
    sample.max_new_tokens = 12
    # Sampling temperature (the entropy and the KL are of the policy itself).
    sample.temperature = 1.0
    # Largest n-gram order of self-BLEU.
    config.max_n = 4
    # Tokens per length bin of the length-matched gold reward.
    config.length_bin = 1

    # Device layout of the runs (the launchers' mesh block; data-parallel over every device).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.distributed = False

    if preset == "full":
        config.seeds = (0, 1, 2)
        config.methods = METHODS
        config.method_preset = "default"
        betas.dpo = (0.05, 0.1, 0.5, 1.0)
        betas.ppo = (0.005, 0.02, 0.05, 0.2)
        betas.grpo = (0.0, 0.01, 0.05, 0.2)
        betas.online_dpo = (0.02, 0.05, 0.1, 0.5)
        steps.dpo = 200
        steps.ppo = 40
        steps.grpo = 60
        steps.online_dpo = 60
        sft.num_steps = 200
        sample.num_prompts = 32
        sample.num_samples = 16
    return config
