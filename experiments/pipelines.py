"""Multi-stage runs composed from single-algorithm runs of :func:`prefjax.train.loop.run`.

The loop trains exactly one algorithm; a pipeline hands it an ``init_params`` hook that runs an
earlier stage with :func:`prefjax.train.loop.run_stage` (same model, its own workdir inside the
run's, with its own ``run.json``) and returns that stage's trained policy:

* :func:`sft_then_dpo` -- the DPO launcher's default: ``config.sft_warmup.num_steps`` steps of SFT
  (in ``<workdir>/sft_warmup``), whose policy becomes DPO's initial policy and frozen reference;
* :func:`sft_then` -- the same warm-up before any other algorithm (the online launchers: GRPO,
  online DPO), whose policy becomes its initial policy and reference.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from prefjax.train import dpo, loop, sft


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
