r"""GRPO / RLOO / REINFORCE on sampled responses: ``python -m experiments.grpo``.

The embedded default first runs ``sft_warmup.num_steps`` steps of SFT on the sequence task's base
policy (a random policy never writes ``"bbb"`` for ``"b*3="``, so every group would tie at reward
0), then GRPO against the gold reward: G = 8 samples per prompt, group advantages, k3 KL to the
SFT policy in the loss. Measured numbers are in docs/online.md.

Presets: ``:tiny`` (the test suite's: a few steps), ``:bandit`` (RLOO with the KL in the reward on
the KL-regularised bandit, whose optimum is known in closed form: ``eval/kl_to_optimal`` is
``KL(pi_theta || pi*)``).
"""

import ml_collections

from experiments.configs import common

PRESETS = ("default", "tiny", "bandit")


def bandit_task(config) -> None:
    """The fields every online ``:bandit`` preset shares (GRPO, online DPO, PPO): the bandit task
    without SFT warm-up (it has no responses to imitate), one-token responses, -2 for a response
    that is not an arm, an evaluation every 50 steps."""
    config.data.task = "bandit"
    config.sft_warmup.num_steps = 0
    config.algorithm.max_new_tokens = 1
    config.algorithm.reward.invalid = -2.0
    config.data.max_prompt_len = 16
    config.data.max_len = 24
    config.train.eval_every = 50
    config.eval.max_new_tokens = 1


def get_config(arg=None):
    preset = common.parse_arg(arg or "default", PRESETS)
    config = common.base_config("grpo")
    config.workdir_default = f"runs/grpo_{preset}"
    algo = config.algorithm
    # The fields of config.algorithm and their defaults: prefjax.train.grpo.default_config().
    algo.num_samples = 8
    algo.max_new_tokens = 10
    algo.kl_coef = 0.05
    # Prompts of the sequence task are 5 tokens ("<bos>c*n="): one bucket of 8, no padding to 32.
    config.data.max_prompt_len = 8
    config.data.max_len = 24
    config.data.pad_to_max_len = False
    # Prompts per step (x num_samples responses).
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
    # SFT steps on the task's base policy before GRPO (0 = off); the result is the reference.
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
        config.algorithm.num_samples = 4
        config.algorithm.max_new_tokens = 6
        config.eval.num_prompts = 8
        config.eval.num_samples = 16
        config.eval.max_new_tokens = 6
        config.data.num_eval = 16
        config.data.eval_batch_size = 8
        config.logging.tensorboard = False
    elif preset == "bandit":
        bandit_task(config)
        algo.advantage = "rloo"
        algo.kl_in = "reward"
        algo.kl_estimator = "k1"
        algo.kl_coef = 0.5
        config.optimizer.learning_rate = 3e-3
        config.train.num_steps = 150
        # One prompt: the held-out rollouts are fresh samples of it, one batch the train shape.
        config.data.num_eval = 16
        config.data.eval_batch_size = 16
    return config
