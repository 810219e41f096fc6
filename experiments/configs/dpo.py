r"""Direct Preference Optimization and its family (IPO, hinge, robust, KTO, ORPO, SimPO, listwise).

Command: the embedded default is the main job of prefjax::

    python -m experiments.dpo                      # tiny model, built-in sequence task, CPU

It prints its workdir (``runs/dpo_tiny``), trains, and writes ``checkpoints/``, ``metrics.jsonl``,
``tensorboard/``, ``curves.png`` and ``summary.txt`` there. Running it again resumes (and, when
finished, only re-evaluates and re-plots). Other presets and overrides::

    python -m experiments.dpo --config.algorithm.loss=ipo --config.algorithm.beta=0.5
    python -m experiments.dpo --config=experiments/configs/dpo.py:llama1b \
        --config.model.path=/models/Llama-3.2-1B-SFT --config.data.train_files=prefs.jsonl

Expected runtime: about 1-2 minutes on 2 CPU cores.

Why there is a warm-up: a randomly initialised policy emits noise, so the gold reward of its
greedy responses cannot move under DPO alone (DPO only re-weights responses the reference already
produces). The default therefore first runs ``sft_warmup.num_steps`` steps of SFT on the task's
preferred responses (recorded under ``<workdir>/sft_warmup``), then runs DPO with the SFT model as
both the initial policy and the frozen reference, which is the standard SFT -> DPO pipeline. Set
``--config.sft_warmup.num_steps=0`` to start DPO from ``model.init_from`` or a pretrained
``model.path`` instead.

What "it learned" looks like: held-out ``eval/rewards/accuracy`` (implicit-reward preference
accuracy) rises from 0.5 towards the labels' agreement with the gold reward,
``eval/rewards/margin`` grows, ``eval/gold_reward`` of greedy responses rises above the SFT
reference's, and ``eval/kl`` (KL to the reference on held-out responses) stays bounded (a few nats
per sequence). Measured numbers are in docs/training.md.
"""

import ml_collections

from experiments.configs import common


def get_config(arg=None):
    preset = common.parse_arg(arg, ("tiny", "gpt2", "llama1b"))
    config = common.base_config("dpo")
    # A key of prefjax.losses.PAIRWISE_LOSSES ("sigmoid" is DPO), or "listwise" | "kto" | "orpo"
    # | "simpo" (these two need algorithm.reference="none").
    config.algorithm.loss = "sigmoid"
    config.algorithm.beta = 0.5
    config.algorithm.reference = "copy"
    config.optimizer.learning_rate = 3e-4
    config.train.num_steps = 200
    config.train.eval_every = 50
    config.checkpoint.every = 100

    config.sft_warmup = warm = ml_collections.ConfigDict()
    # SFT steps on the preferred responses before DPO (0 = off); the result is the reference.
    warm.num_steps = 200
    # Peak learning rate of the warm-up (same optimiser and schedule shape as the DPO phase).
    warm.learning_rate = 3e-3
    # The warm-up imitates the task's base policy, the distribution the preference pairs were
    # sampled from, so the reference is the policy that generated the data (DPO's assumption).
    config.data.sft_responses = "base"

    common.apply_model_preset(config, preset)
    if preset != "tiny":
        # Real runs start from an SFT checkpoint (model.path or model.init_from).
        config.sft_warmup.num_steps = 0
    return config
