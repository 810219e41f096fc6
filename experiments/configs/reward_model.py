r"""Reward model: a transformer with a scalar head trained on preference pairs.

Command (the embedded default: tiny model, built-in sequence task, CPU)::

    python -m experiments.reward_model             # writes runs/reward_tiny
    python -m experiments.reward_model --config.algorithm.loss=plackett_luce   # listwise data

Expected runtime: about 20 s on 2 CPU cores for the tiny preset (measured 18 s wall, cold
compilation cache). Measured (seed 0): held-out ``eval/rewards/accuracy`` 0.46 -> 0.90,
``eval/rewards/margin`` -0.04 -> 3.15, ``eval/loss`` 0.72 -> 0.29 over 300 steps.

What "it learned" looks like: held-out ``eval/rewards/accuracy`` rises from 0.5 towards the
accuracy the Bradley-Terry labelling allows (the task's labels follow the gold reward except for
``data.label_noise``), and ``eval/rewards/margin`` grows. Loss starts at log 2 = 0.693.

Losses: ``bradley_terry`` (pairs; ``--config.algorithm.margin=True`` subtracts the pair's margin
column), ``plackett_luce`` (listwise rankings) or ``prm`` (a process reward model on
step-labelled solutions).

Process reward model (preset ``prm``: ``loss="prm"`` on the built-in ``arithmetic`` task, batch
64, learning rate 3e-3)::

    python -m experiments.reward_model --config=experiments/configs/reward_model.py:prm

What "it learned" looks like: held-out ``eval/steps/accuracy`` rises from the rate of correct
steps (about 0.59, what a constant guess gets) towards 1 and ``eval/steps/auc`` from about 0.5
towards 1. Measured (seed 0, 300 steps, 6.7 min wall on 2 CPU cores shared with other jobs):
accuracy 0.59 -> 0.87, AUC 0.43 -> 0.92, ``eval/steps/outcome_accuracy`` 0.43 -> 0.73.
"""

from experiments.configs import common


def get_config(arg=None):
    preset = common.parse_arg(arg, ("tiny", "gpt2", "llama1b", "prm"))
    config = common.base_config("reward")
    config.workdir_default = "runs/reward_tiny"
    config.optimizer.learning_rate = 1e-3
    config.train.num_steps = 300
    config.train.eval_every = 100
    config.checkpoint.every = 100
    # No generation: a reward model is scored by held-out preference accuracy.
    config.eval.generate = False
    if preset == "prm":
        # A process reward model on the built-in multi-step task (per-step gold labels).
        config.workdir_default = "runs/prm_tiny"
        config.algorithm.loss = "prm"
        config.data.task = "arithmetic"
        config.data.batch_size = 64
        config.data.num_train = 4096
        config.optimizer.learning_rate = 3e-3
        preset = "tiny"
    common.apply_model_preset(config, preset)
    return config
