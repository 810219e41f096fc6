r"""Reward-KL frontiers on the KL-regularised bandit: ``python -m experiments.studies.frontier``.

Every method optimises (or is derived from) :math:`\max_\pi E_\pi[r] - \beta\,KL(\pi\|\pi_{ref})`,
whose maximiser :math:`\pi^*_\beta \propto \pi_{ref} e^{r/\beta}` traces, over :math:`\beta`, the
exact frontier: the largest expected gold reward any policy reaches at a given KL to the
reference. The study trains each method at each ``betas`` value and ``seeds`` entry on the
built-in bandit (8 single-token arms, the reference is the initial policy over them) and plots
its final policies' (KL, gold reward) points against that curve:

* ``dpo``, ``ipo``, ``rpo`` (DPO + the chosen response's NLL): offline, on the task's labelled
  pairs, the betas of one seed trained by one sweep (``prefjax.train.sweep``: one compile);
* ``ppo`` (k1 KL in the reward), ``rloo`` (RLOO with the k1 KL in the reward, the exact
  KL-regularised objective), ``online_dpo`` (Bradley-Terry labels under the gold reward on the
  best vs worst of K samples): online, one run per beta (PPO's beta lives in its train state, so
  the persistent compilation cache compiles PPO once; RLOO and online DPO once per beta).

Presets: ``:tiny`` (the test suite's: 2 betas, 1 seed, a few dozen steps; about a minute on 2 CPU
cores) and ``:full`` (a GPU: 7 betas, 5 seeds, full-length runs). Outputs in the workdir:
``points.jsonl/.csv`` (one row per method x beta x seed: gold reward, KL, the frontier's reward
at that KL, the gap to it, wall time, tokens processed, peak memory), ``frontier.jsonl/.csv``
(the exact curve), ``frontier.png`` and ``summary.md``.
"""

import ml_collections

from experiments.configs import common

PRESETS = ("tiny", "full")
METHODS = ("dpo", "ipo", "rpo", "ppo", "rloo", "online_dpo")


def get_config(arg=None):
    preset = common.parse_arg(arg, PRESETS)
    config = ml_collections.ConfigDict()
    # Run directory used when --workdir is not given.
    config.workdir_default = f"runs/study_frontier_{preset}"
    # Methods to trace, a subset of METHODS (experiments/configs/studies/frontier.py).
    config.methods = METHODS
    # KL coefficients beta of every method (the objective's beta; DPO's beta).
    config.betas = (0.25, 1.0)
    # Seeds of the model initialisation (so of the reference policy) and of the sampling keys;
    # the bandit itself (rewards, pairs) is fixed by data_seed.
    config.seeds = (0,)
    # Seed of the bandit (its rewards and the offline pairs).
    config.data_seed = 0
    # Betas of the dense exact frontier curve: a log-spaced grid of this many points.
    config.frontier_points = 400

    config.offline = off = ml_collections.ConfigDict()
    # DPO / IPO / RPO: optimiser steps, pairs per step, peak learning rate, labelled pairs.
    off.num_steps = 30
    off.batch_size = 16
    off.learning_rate = 3e-3
    off.num_train = 512
    # RPO's weight of the chosen response's per-token NLL.
    off.rpo_alpha = 1.0

    config.online = on = ml_collections.ConfigDict()
    # PPO / RLOO / online DPO: iterations, prompts per iteration, samples per prompt, peak
    # learning rate.
    on.num_steps = 15
    on.batch_size = 16
    on.num_samples = 4
    on.learning_rate = 3e-3
    # Online DPO's labels: "bradley_terry" (best vs worst of the samples by score + Gumbel noise,
    # the bandit's own preference model, whose DPO optimum is pi*_beta) | "ranked" (by score).
    on.online_dpo_labels = "bradley_terry"
    # PPO: epochs x minibatches of optimiser steps per rollout batch.
    on.ppo_epochs = 2
    on.ppo_minibatches = 2

    config.mesh = mesh = ml_collections.ConfigDict()
    # Call jax.distributed.initialize() at start-up (multi-host jobs).
    mesh.distributed = False
    # Write curves.png, TensorBoard files and a progress bar in every training run.
    config.run_logging = False

    if preset == "full":
        config.betas = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
        config.seeds = (0, 1, 2, 3, 4)
        off.num_steps = 300
        off.num_train = 4096
        off.learning_rate = 1e-3
        on.num_steps = 150
        on.batch_size = 32
    return config
