r"""Online DPO on pairs sampled from the current policy: ``python -m experiments.online_dpo``.

The embedded default first runs ``sft_warmup.num_steps`` steps of SFT on the sequence task's base
policy, then online DPO: K = 4 samples per prompt from the current policy, the highest and lowest
by gold reward as chosen and rejected, the sigmoid DPO loss against the SFT policy. Measured
numbers are in docs/online.md. ``:tiny`` is the test suite's preset (a few steps); ``:bandit``
runs online DPO on the KL-regularised bandit with Bradley-Terry labels (pairs ordered by the gold
reward plus Gumbel noise), whose population optimum is the closed form
``pi* = pi_ref exp(r / beta) / Z``: ``eval/kl_to_optimal`` is ``KL(pi_theta || pi*)``.
"""

import ml_collections

from experiments.configs import common, grpo

PRESETS = ("default", "tiny", "bandit")


def get_config(arg=None):
    preset = common.parse_arg(arg or "default", PRESETS)
    config = common.base_config("online_dpo")
    config.workdir_default = f"runs/online_dpo_{preset}"
    algo = config.algorithm
    # The fields of config.algorithm and their defaults: prefjax.train.online_dpo.default_config().
    algo.num_samples = 4
    algo.max_new_tokens = 10
    algo.beta = 0.1
    # Prompts of the sequence task are 5 tokens ("<bos>c*n="): one bucket of 8, no padding to 32.
    config.data.max_prompt_len = 8
    config.data.max_len = 24
    config.data.pad_to_max_len = False
    # Prompts per step (x num_samples responses, one pair per prompt).
    config.data.batch_size = 16
    config.data.eval_batch_size = 64
    config.data.num_eval = 64
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "constant"
    config.train.num_steps = 60
    config.train.log_every = 10
    config.train.eval_every = 20
    config.checkpoint.every = 30
    config.eval.num_prompts = 32
    config.eval.num_samples = 128
    config.eval.max_new_tokens = 10

    config.sft_warmup = warm = ml_collections.ConfigDict()
    # SFT steps on the task's base policy before online DPO (0 = off); the result is the reference.
    warm.num_steps = 200
    # Peak learning rate of the warm-up.
    warm.learning_rate = 3e-3
    config.data.sft_responses = "base"

    if preset == "tiny":
        config.sft_warmup.num_steps = 20
        config.train.num_steps = 4
        config.optimizer.warmup_steps = 1
        config.train.log_every = 2
        config.train.eval_every = 0
        config.checkpoint.every = 2
        config.data.batch_size = 8
        config.algorithm.max_new_tokens = 6
        config.eval.num_prompts = 8
        config.eval.num_samples = 16
        config.eval.max_new_tokens = 6
        config.data.num_eval = 16
        config.data.eval_batch_size = 8
        config.logging.tensorboard = False
    elif preset == "bandit":
        grpo.bandit_task(config)
        algo.labels = "bradley_terry"
        algo.num_samples = 2
        algo.beta = 0.5
        # 64 pairs per step: Bradley-Terry labels are noisy, so more pairs than GRPO's groups.
        config.data.batch_size = 64
        config.optimizer.learning_rate = 1e-2
        config.train.num_steps = 150
        # One prompt: the held-out rollouts are fresh samples of it, one batch the train shape.
        config.data.num_eval = 64
        config.data.eval_batch_size = 64
    return config
