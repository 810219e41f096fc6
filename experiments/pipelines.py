"""Multi-stage runs composed from single-algorithm runs of :func:`prefjax.train.loop.run`.

The loop trains exactly one algorithm; a pipeline hands it an ``init_params`` hook that runs an
earlier stage with :func:`prefjax.train.loop.run_stage` (same model, its own workdir inside the
run's, with its own ``run.json``) and returns that stage's trained policy:

* :func:`sft_then_dpo` -- the DPO launcher's default: ``config.sft_warmup.num_steps`` steps of SFT
  (in ``<workdir>/sft_warmup``), whose policy becomes DPO's initial policy and frozen reference;
* :func:`sft_rm_ppo` -- SFT, then a reward model on the task's pairs, then PPO scored by that
  model from the SFT policy: three runs side by side in the workdir (``python -m experiments.ppo
  --config=experiments/configs/ppo.py:rm``);
* :func:`sft_then` -- the same warm-up before any other algorithm (the online launchers: GRPO,
  online DPO), whose policy becomes its initial policy and reference.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from prefjax.train import dpo, loop, ppo, reward, sft


def sft_warmup_config(config) -> ml_collections.ConfigDict:
    """The SFT stage run before DPO when ``config.sft_warmup.num_steps > 0`` (same model/data)."""
    warm = ml_collections.ConfigDict(config.to_dict())
    del warm["sft_warmup"]
    warm.algorithm = sft.default_config()  # SFT's own block: no beta, no reference
    warm.optimizer.learning_rate = config.sft_warmup.learning_rate
    warm.train.num_steps = config.sft_warmup.num_steps
    warm.optimizer.warmup_steps = min(config.optimizer.warmup_steps, warm.train.num_steps)
    warm.train.eval_every = 0
    warm.export.hf = False
    warm.logging.plot = False
    warm.checkpoint.every = 0
    return warm


def sft_warmup(config):
    """The ``init_params`` hook that runs the SFT warm-up stage and returns its policy."""

    def init_params(stage: loop.Stage):
        warm = sft_warmup_config(config)
        warm_dir = os.path.join(stage.workdir.path, "sft_warmup")
        if jax.process_index() == 0:
            print(f"SFT warm-up: {warm.train.num_steps} steps in {warm_dir}", flush=True)
        result = loop.run_stage(warm, warm_dir, sft, parent=stage, name="sft warm-up")
        # The trained policy as it lies on the mesh (same mesh and rules as the next stage): no
        # host copy of the weights, which a multi-host job could not even gather.
        return result.setup.policy_params(result.state.params, result.setup.frozen)

    return init_params


def sft_then_dpo(config, workdir: str, **kwargs) -> loop.RunResult:
    """SFT warm-up (when ``config.sft_warmup.num_steps > 0``), then DPO: ``python -m
    experiments.dpo``. ``kwargs`` go to :func:`prefjax.train.loop.run` (``stop_after_steps``,
    ``step_hook``)."""
    warm = "sft_warmup" in config and config.sft_warmup.num_steps > 0
    init = sft_warmup(config) if warm else None
    return loop.run(config, workdir, dpo, init_params=init, **kwargs)


def sft_then(algorithm):
    """``run(config, workdir, **kwargs)``: the SFT warm-up (when ``config.sft_warmup.num_steps >
    0``), then ``algorithm`` from its policy (``python -m experiments.grpo``)."""

    def run(config, workdir: str, **kwargs) -> loop.RunResult:
        warm = "sft_warmup" in config and config.sft_warmup.num_steps > 0
        init = sft_warmup(config) if warm else None
        return loop.run(config, workdir, algorithm, init_params=init, **kwargs)

    return run


def _stage_config(config, algorithm_block) -> ml_collections.ConfigDict:
    """A copy of ``config`` for another algorithm: its own ``config.algorithm``, no pipeline
    blocks."""
    stage = ml_collections.ConfigDict(config.to_dict())
    for block in ("sft_warmup", "pipeline"):
        if block in stage:
            del stage[block]
    stage.algorithm = algorithm_block
    stage.export.hf = False
    stage.checkpoint.every = 0
    return stage


def sft_rm_ppo_configs(config, workdir: str) -> tuple[ml_collections.ConfigDict, ...]:
    """The three runs of :func:`sft_rm_ppo`: SFT (``config.sft_warmup``), a Bradley-Terry reward
    model on the task's labelled pairs (``config.pipeline``), and PPO scored by that model from
    the SFT policy (which is also its reference)."""
    sft_config = _stage_config(config, sft.default_config())
    sft_config.optimizer.learning_rate = config.sft_warmup.learning_rate
    sft_config.train.num_steps = config.sft_warmup.num_steps
    sft_config.train.eval_every = 0
    rm_config = _stage_config(config, reward.default_config())
    rm_config.optimizer.learning_rate = config.pipeline.reward_model_learning_rate
    rm_config.optimizer.schedule = "cosine"
    rm_config.train.num_steps = config.pipeline.reward_model_steps
    rm_config.train.eval_every = 0
    rm_config.eval.generate = False
    for stage in (sft_config, rm_config):
        stage.optimizer.warmup_steps = min(10, stage.train.num_steps)
        stage.logging.plot = False
    ppo_config = ml_collections.ConfigDict(config.to_dict())
    ppo_config.sft_warmup.num_steps = 0
    ppo_config.model.init_from = os.path.join(workdir, "sft")
    ppo_config.algorithm.reward.source = "model"
    ppo_config.algorithm.reward.model_dir = os.path.join(workdir, "reward_model")
    return sft_config, rm_config, ppo_config


def sft_rm_ppo(config, workdir: str, **kwargs) -> loop.RunResult:
    """SFT -> reward model -> PPO on the learned reward: ``python -m experiments.ppo
    --config=experiments/configs/ppo.py:rm``. Three resumable runs side by side in ``workdir``
    (``sft/``, ``reward_model/``, ``ppo/``); ``kwargs`` go to the PPO run."""
    sft_config, rm_config, ppo_config = sft_rm_ppo_configs(config, workdir)
    for name, stage_config, algorithm in (
        ("sft", sft_config, sft),
        ("reward_model", rm_config, reward),
    ):
        if jax.process_index() == 0:
            print(f"{name}: {stage_config.train.num_steps} steps in {workdir}/{name}", flush=True)
        result = loop.run(stage_config, os.path.join(workdir, name), algorithm)
        if result.status != "finished":
            return result
    return loop.run(ppo_config, os.path.join(workdir, "ppo"), ppo, **kwargs)
