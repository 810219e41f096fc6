r"""Reward-KL frontiers: ``python -m experiments.studies.frontier``.

Every method optimises (or is derived from) :math:`\max_\pi E_\pi[r] - \beta\,KL(\pi\|\pi_{ref})`,
whose maximiser :math:`\pi^*_\beta \propto \pi_{ref} e^{r/\beta}` traces, over :math:`\beta`, the
frontier: the largest gold reward any policy reaches at a given KL to the reference. Two sections
(``tasks``), each training every method at each beta and seed:

* ``bandit`` (``methods``, ``betas``, ``offline``, ``online``): 8 single-token arms, the reference
  is the initial policy over them, and the frontier is exact; every final policy's (KL, gold
  reward) is plotted against it;
* ``sequence`` (the ``sequence`` block): the built-in sequence task, where the frontier has no
  closed form; per seed one SFT policy of the task's base policy is every method's initial
  policy and reference, and the points are measured by each run's held-out evaluation (gold
  reward of sampled responses, sampled k1 KL).

Methods: ``dpo``, ``ipo``, ``rpo`` (DPO + the chosen response's NLL): offline, on the task's
labelled pairs, the betas of one seed trained by one sweep (``prefjax.train.sweep``: one
compile); ``ppo`` (k1 KL in the reward), ``rloo`` (RLOO with the k1 KL in the reward, the exact
KL-regularised objective), ``online_dpo`` (best vs worst of K samples under the gold reward):
online, one run per beta (PPO's beta lives in its train state, so the persistent compilation
cache compiles PPO once; RLOO and online DPO once per beta).

Presets: ``:tiny`` (the test suite's: 2 betas, 1 seed, a few dozen steps per run) and ``:full``
(a GPU: 7 bandit and 5 sequence betas, 5 seeds, full-length runs). Outputs in the workdir:
``points.jsonl/.csv`` (bandit: one row per method x beta x seed: gold reward, KL, the frontier's
reward at that KL, the gap to it, wall time, tokens processed, peak memory),
``frontier.jsonl/.csv`` (the exact bandit curve), ``sequence_points.jsonl/.csv`` (the sequence
task's rows: final and step-0 gold reward and KL, length, cost), ``sequence_references.jsonl/.csv``
(each seed's SFT reference), ``frontier.png`` and ``summary.md``.
"""

import ml_collections

from experiments.configs import common

PRESETS = ("tiny", "full")
TASKS = ("bandit", "sequence")
METHODS = ("dpo", "ipo", "rpo", "ppo", "rloo", "online_dpo")


def offline_block(*, num_steps: int, learning_rate: float, num_train: int):
    """A section's DPO / IPO / RPO fields."""
    off = ml_collections.ConfigDict()
    # Optimiser steps, pairs per step, peak learning rate, labelled pairs of the task.
    off.num_steps = num_steps
    off.batch_size = 16
    off.learning_rate = learning_rate
    off.num_train = num_train
    # RPO's weight of the chosen response's per-token NLL.
    off.rpo_alpha = 1.0
    return off


def online_block(*, num_steps: int, batch_size: int, learning_rate: float, labels: str):
    """A section's PPO / RLOO / online DPO fields."""
    on = ml_collections.ConfigDict()
    # Iterations, prompts per iteration, samples per prompt, peak learning rate.
    on.num_steps = num_steps
    on.batch_size = batch_size
    on.num_samples = 4
    on.learning_rate = learning_rate
    # Online DPO's labels: "bradley_terry" (best vs worst of the samples by score + Gumbel noise
    # of temperature 1: the bandit's own preference model, whose DPO optimum is pi*_beta; noisy
    # for the sequence task's rewards in [0, 1]) | "ranked" (by score).
    on.online_dpo_labels = labels
    # PPO: epochs x minibatches of optimiser steps per rollout batch.
    on.ppo_epochs = 2
    on.ppo_minibatches = 2
    return on


def get_config(arg=None):
    preset = common.parse_arg(arg, PRESETS)
    config = ml_collections.ConfigDict()
    # Run directory used when --workdir is not given.
    config.workdir_default = f"runs/study_frontier_{preset}"
    # Sections of the study, a subset of TASKS: "bandit" (against the exact frontier) and
    # "sequence" (measured points, no closed form).
    config.tasks = TASKS
    # Seeds of the model initialisation (so of each seed's reference policy) and of the
    # sampling keys, for both sections; the tasks themselves are fixed by data_seed.
    config.seeds = (0,)
    # Seed of the tasks' data (the bandit's rewards and pairs; the sequence task's split of
    # prompts and its pairs).
    config.data_seed = 0

    # The bandit section: methods, betas, and the offline / online blocks below.
    # Methods to trace, a subset of METHODS (experiments/configs/studies/frontier.py).
    config.methods = METHODS
    # KL coefficients beta of every method (the objective's beta; DPO's beta).
    config.betas = (0.25, 1.0)
    # Betas of the dense exact frontier curve: a log-spaced grid of this many points.
    config.frontier_points = 400

    # DPO / IPO / RPO (offline) and PPO / RLOO / online DPO (online) on the bandit.
    config.offline = off = offline_block(num_steps=30, learning_rate=3e-3, num_train=512)
    config.online = on = online_block(
        num_steps=15, batch_size=16, learning_rate=3e-3, labels="bradley_terry"
    )

    # The sequence section: every method from one SFT reference per seed, each traced by a
    # beta sweep (the DPO family through prefjax.train.sweep, one compile per loss).
    config.sequence = seq = ml_collections.ConfigDict()
    # Methods to trace, a subset of METHODS.
    seq.methods = METHODS
    # The objective's beta of every method: DPO's / IPO's / online DPO's beta; PPO's and RLOO's
    # k1 KL coefficient in the reward (gold rewards lie in [0, 1], KL in nats per response).
    seq.betas = (0.05, 5.0)
    # Response budget in tokens (the rollouts' and the held-out samples'); the task's longest
    # response is 8 letters + EOS.
    seq.max_new_tokens = 10
    seq.sft = ml_collections.ConfigDict()
    # SFT of the task's base policy (the reference): optimiser steps, peak learning rate.
    seq.sft.num_steps = 100
    seq.sft.learning_rate = 3e-3
    seq.offline = offline_block(num_steps=40, learning_rate=3e-4, num_train=1024)
    seq.online = online_block(num_steps=20, batch_size=8, learning_rate=1e-3, labels="ranked")
    seq.eval = ml_collections.ConfigDict()
    # Every run's held-out evaluation (step 0 and the last step): responses sampled at
    # temperature 1 over the held-out prompts (gold reward and KL), greedy decodes, held-out
    # pairs (DPO's eval losses; the online methods' held-out prompts).
    seq.eval.num_samples = 128
    seq.eval.num_prompts = 8
    seq.eval.num_pairs = 16

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
        seq.betas = (0.02, 0.05, 0.2, 1.0, 5.0)
        seq.sft.num_steps = 300
        seq.offline.num_steps = 300
        seq.offline.num_train = 4096
        seq.online.num_steps = 150
        seq.online.batch_size = 32
        seq.online.learning_rate = 3e-4
        seq.eval.num_samples = 512
        seq.eval.num_pairs = 64
    return config
