r"""DPO's failure modes on the sequence task: ``python -m experiments.studies.dpo_dynamics``.

Likelihood displacement -- the chosen and the rejected responses' log-probabilities under the
policy both falling while the margin between them grows -- measured over training, with the gold
reward of the policy's samples and its KL to the reference alongside. Every variant starts from
one reference, an SFT model of the task's base policy (the distribution the built-in pairs are
drawn from), and trains the same number of steps on the same number of pairs per step:

* ``dpo`` (sigmoid loss), ``ipo``, ``rpo`` (DPO + ``rpo_alpha`` x the chosen response's
  per-token NLL): offline, on the task's built-in pairs;
* ``sft_dpo``: SFT on the pairs' chosen responses first, then DPO with that model as the
  reference (the usual SFT-then-DPO recipe);
* ``dpo_onpolicy``: DPO on pairs sampled from the reference itself (two samples per train
  prompt, labelled by Bradley-Terry under the gold reward at the task's temperature), against
  ``dpo``'s pairs from the base policy, which the reference only approximates (off-policy);
* ``online_dpo``: pairs sampled from the current policy every step (best and worst of K by the
  gold reward), the offline DPO budget in steps and pairs per step.

Presets: ``:tiny`` (the test suite's; a few minutes on 2 CPU cores) and ``:full`` (a GPU: longer
runs, 5 seeds). Outputs in the workdir: ``dynamics.jsonl/.csv`` (one row per variant x seed x
evaluation step), ``dynamics.png`` and ``summary.md``.
"""

import ml_collections

from experiments.configs import common

PRESETS = ("tiny", "full")
VARIANTS = ("dpo", "ipo", "rpo", "sft_dpo", "dpo_onpolicy", "online_dpo")


def get_config(arg=None):
    preset = common.parse_arg(arg, PRESETS)
    config = ml_collections.ConfigDict()
    # Run directory used when --workdir is not given.
    config.workdir_default = f"runs/study_dpo_dynamics_{preset}"
    # Variants to train, a subset of VARIANTS (experiments/configs/studies/dpo_dynamics.py).
    config.variants = VARIANTS
    # Seeds of model initialisation, of the task's sampled data (pairs, held-out prompts, batch
    # order) and of sampling; the task's definition is fixed.
    config.seeds = (0,)

    config.reference = ref = ml_collections.ConfigDict()
    # SFT steps on the task's base policy that make the shared reference, and their peak
    # learning rate.
    ref.num_steps = 150
    ref.learning_rate = 3e-3
    # sft_dpo: SFT steps on the chosen responses (from the reference) before its DPO.
    ref.chosen_steps = 50

    config.dpo = dpo = ml_collections.ConfigDict()
    # Every variant: optimiser steps, pairs per step, peak learning rate, KL strength beta.
    dpo.num_steps = 60
    dpo.batch_size = 16
    dpo.learning_rate = 3e-4
    dpo.beta = 0.1
    # rpo: weight of the chosen response's per-token NLL.
    dpo.rpo_alpha = 1.0
    # Offline pairs: the built-in task's, and the number sampled from the reference for
    # dpo_onpolicy (two samples per train prompt).
    dpo.num_train = 1024
    # online_dpo: samples per prompt (best vs worst by gold reward).
    dpo.num_samples = 4

    config.eval = ev = ml_collections.ConfigDict()
    # Measurement cadence in steps (0 = the initial and final policy only).
    ev.every = 10
    # Held-out pairs of each kind whose chosen / rejected log-probs are followed.
    ev.num_pairs = 64
    # Samples (temperature 1) over the held-out prompts: their mean gold reward and KL.
    ev.num_samples = 128
    # Maximum new tokens per sampled response (measurements and the on-policy pairs).
    ev.max_new_tokens = 12

    config.mesh = mesh = ml_collections.ConfigDict()
    # Call jax.distributed.initialize() at start-up (multi-host jobs).
    mesh.distributed = False
    # Write curves.png, TensorBoard files and a progress bar in every training run.
    config.run_logging = False

    if preset == "full":
        config.seeds = (0, 1, 2, 3, 4)
        ref.num_steps = 300
        ref.chosen_steps = 150
        dpo.num_steps = 400
        dpo.num_train = 4096
        ev.every = 25
        ev.num_pairs = 256
        ev.num_samples = 512
    return config
