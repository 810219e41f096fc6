r"""PPO with GAE on sampled responses: ``python -m experiments.ppo``.

The embedded default first runs ``sft_warmup.num_steps`` steps of SFT on the sequence task's base
policy (``<workdir>/sft_warmup``; its policy becomes PPO's initial policy and frozen reference),
then PPO against the task's gold reward: responses sampled at temperature 1, the score on each
response's last real token and ``-beta * KL`` (k1) on every token, GAE (gamma 1, lambda 0.95)
with a value head on the policy trunk, whitened advantages, 4 epochs x 2 shuffled minibatches per
rollout batch. Measured numbers are in docs/online.md ("PPO").

Presets: ``:default``; ``:tiny`` (the test suite's: a few steps); ``:bandit`` (the
KL-regularised bandit, whose optimum is known in closed form: ``eval/kl_to_optimal`` is
``KL(pi_theta || pi*)``); ``:rm`` (the last stage of ``python -m experiments.ppo
--config=experiments/configs/ppo.py:rm``, the SFT -> reward model -> PPO pipeline, scored by the
learned reward model; see experiments/pipelines.py ``sft_rm_ppo``).
"""

import ml_collections

from experiments.configs import common, grpo

PRESETS = ("default", "tiny", "bandit", "rm")


def get_config(arg=None):
    preset = common.parse_arg(arg or "default", PRESETS)
    config = common.base_config("ppo")
    config.workdir_default = f"runs/ppo_{preset}"
    algo = config.algorithm
    # The fields of config.algorithm and their defaults: prefjax.train.ppo.default_config().
    algo.num_samples = 2
    algo.max_new_tokens = 10
    algo.kl_coef = 0.05
    # Prompts of the sequence task are 5 tokens ("<bos>c*n="): one bucket of 8, no padding to 32.
    config.data.max_prompt_len = 8
    config.data.max_len = 24
    config.data.pad_to_max_len = False
    # Prompts per PPO iteration (x num_samples responses).
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.data.num_eval = 64
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    # PPO iterations (rollout batches); each takes num_epochs x num_minibatches optimiser steps.
    config.train.num_steps = 40
    config.train.log_every = 5
    config.train.eval_every = 20
    config.checkpoint.every = 20
    config.eval.num_prompts = 32
    config.eval.num_samples = 128
    config.eval.max_new_tokens = 10

    config.sft_warmup = warm = ml_collections.ConfigDict()
    # SFT steps on the task's base policy before PPO (0 = off); the result is the reference.
    warm.num_steps = 200
    # Peak learning rate of the warm-up.
    warm.learning_rate = 3e-3
    config.data.sft_responses = "base"

    config.pipeline = pipe = ml_collections.ConfigDict()
    # "sft_ppo" (SFT warm-up, then PPO on config.algorithm.reward) | "sft_rm_ppo" (SFT, then a
    # reward model on the task's labelled pairs, then PPO scored by it; three runs side by side).
    pipe.name = "sft_ppo"
    # SFT -> reward model -> PPO (experiments.pipelines.sft_rm_ppo, preset :rm): reward-model
    # steps and learning rate, and its training pairs (labelled by the gold reward).
    pipe.reward_model_steps = 300
    pipe.reward_model_learning_rate = 1e-3

    if preset == "tiny":
        config.sft_warmup.num_steps = 4
        config.train.num_steps = 2
        config.train.log_every = 1
        config.train.eval_every = 0
        config.checkpoint.every = 1
        config.data.batch_size = 8
        algo.max_new_tokens = 4
        algo.num_minibatches = 2
        algo.num_epochs = 2
        config.eval.num_prompts = 8
        config.eval.num_samples = 8
        config.eval.max_new_tokens = 4
        config.data.num_eval = 8
        config.data.eval_batch_size = 8
        config.logging.tensorboard = False
        config.logging.plot = False
        pipe.reward_model_steps = 4
    elif preset == "bandit":
        grpo.bandit_task(config)
        algo.kl_estimator = "k1"
        algo.kl_coef = 0.5
        algo.num_samples = 4
        config.optimizer.learning_rate = 3e-3
        config.train.num_steps = 100
    elif preset == "rm":
        pipe.name = "sft_rm_ppo"
    return config
