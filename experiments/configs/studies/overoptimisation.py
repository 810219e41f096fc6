r"""Reward over-optimisation (after Gao et al., 2022) on the built-in bandit.

Command::

    python -m experiments.studies.overoptimisation    # :tiny, writes runs/overoptimisation_tiny
    python -m experiments.studies.overoptimisation \
        --config=experiments/configs/studies/overoptimisation.py:full   # a GPU

What it runs (all in the workdir, each sub-run resumable and refused like any prefjax run):
``reference/`` -- SFT of the tiny model on one demonstration per arm, whose next-token
distribution over the arms (close to uniform) is the study's :math:`\pi_{ref}`;
``rm_n<pairs>_s<seed>/`` -- one Bradley-Terry reward model (the proxy) per amount of
gold-labelled pairs and seed (a seed is a bandit instance);
``ppo_n<pairs>_s<seed>/`` -- PPO from :math:`\pi_{ref}` against each proxy. Best-of-N is
computed exactly over the arms (and checked by sampling). Outputs: ``bon.jsonl/.csv``,
``rl.jsonl/.csv``, ``fits.json``, ``overoptimisation.png``, ``summary.md``.

Measured runtime (2 CPU cores shared with other jobs, load average about 13, so upper bounds):
``:tiny`` 178 s wall, 75 s CPU, most of it compiling the SFT, reward-model and PPO steps;
``:full`` (8 instances x 4 proxy sizes: 32 reward models and 32 PPO runs) 32 min wall, 10 min
CPU (not measured on a GPU; it is sized by its many small runs, not by the model).

What it shows: proxy reward rising monotonically with :math:`d = \sqrt{KL(\pi\,\|\,\pi_{ref})}`
for every proxy, over-stating the gold gain more the farther the policy goes and the fewer pairs
the proxy had; gold reward at every d growing with the proxy's data; gold peaking and falling
only in instances whose small-data proxy ranks a wrong arm first (docs/studies.md, section 2).
"""

import ml_collections

from experiments.configs import common

PRESETS = ("tiny", "full")


def get_config(arg=None):
    preset = common.parse_arg(arg, PRESETS)
    config = ml_collections.ConfigDict()
    # Seed of the sampled best-of-N draws (each proxy's seed is added to it).
    config.seed = 0
    # Run directory used when --workdir is not given.
    config.workdir_default = f"runs/overoptimisation_{preset}"

    # Replicates: seed s is the built-in bandit of data.seed = s (8 single-token arms, one
    # prompt; its gold rewards ~ N(0, 1), the reference table its pairs are drawn from, their
    # labels) and the initialisation of its proxies. Means and standard errors are over seeds.
    config.seeds = (0,)
    # Gold fall (peak gain minus the gain at the largest d) above which a curve counts as
    # over-optimised, in gold reward units (the gold rewards have standard deviation 1).
    config.fall_threshold = 0.05

    config.bandit = bandit = ml_collections.ConfigDict()
    # Symmetric label-flip probability of the gold-labelled pairs (on top of the Bradley-Terry
    # noise of temperature 1).
    bandit.label_noise = 0.0

    config.reference = ref = ml_collections.ConfigDict()
    # pi_ref: the SFT policy's next-token distribution over the arms (renormalised), trained on
    # one demonstration per arm (files refuse duplicate rows), so close to uniform. Its SFT
    # optimiser steps, peak learning rate and batch size (examples; at most the 8 arms).
    ref.num_steps = 40
    ref.learning_rate = 3e-3
    ref.batch_size = 8

    config.reward_model = rm = ml_collections.ConfigDict()
    # Gold-labelled pairs (drawn from the reference table, labelled by Bradley-Terry under the
    # gold reward) of each proxy: the "size" axis of the study.
    rm.num_train = (16, 1024)
    # Optimiser steps, peak learning rate, batch size (pairs) of each proxy.
    rm.num_steps = 60
    rm.learning_rate = 1e-3
    rm.batch_size = 16

    config.best_of_n = bon = ml_collections.ConfigDict()
    # N of best-of-N (N = 1 is pi_ref itself).
    bon.ns = (1, 2, 4, 8, 16, 32, 64)
    # Sampled selections per N (the Monte Carlo check of the exact selection distribution).
    bon.num_draws = 2000

    config.ppo = p = ml_collections.ConfigDict()
    # PPO iterations against each proxy, and the iterations between two measurements of the
    # policy over the arms (gold, proxy, KL to pi_ref).
    p.num_steps = 16
    p.eval_every = 2
    # KL coefficient beta (k1, in the reward): small, so the policy travels far from pi_ref.
    p.kl_coef = 0.02
    # Peak learning rate, prompts per iteration, responses per prompt.
    p.learning_rate = 3e-4
    p.batch_size = 16
    p.num_samples = 4

    # Device mesh of every sub-run (see experiments/configs/common.py).
    config.mesh = common.base_config("sft").mesh

    config.logging = log = ml_collections.ConfigDict()
    # Progress bars of the sub-runs.
    log.progress = True

    if preset == "full":
        rm.num_train = (16, 64, 256, 1024)
        config.seeds = tuple(range(8))
        rm.num_steps = 200
        bon.ns = tuple(2**k for k in range(11))  # 1 ... 1024
        bon.num_draws = 4000
        p.num_steps = 40
    return config
