"""The online launchers end to end: ``:tiny`` presets, stop/resume equal to an uninterrupted run
(rollout keys included). A reward model loaded from a real reward-model workdir as a source:
``tests/experiments/test_ppo_launcher.py`` (the SFT -> RM -> PPO pipeline's reward-model stage)."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import launch as launch_module
from experiments import pipelines
from experiments.configs import grpo as grpo_config
from prefjax.train import grpo
from tests.experiments.test_launchers import _compilation_cache, launch  # noqa: F401


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _tiny_grpo(generate=True):
    config = grpo_config.get_config("tiny")
    config.logging.progress = False
    config.logging.plot = False
    # Without the task's generation metrics (greedy / sampled gold reward: other compilations);
    # the held-out rollouts (eval/rollout/*, eval/kl/sampled) are still evaluated.
    config.eval.generate = generate
    return config


@pytest.mark.slow
def test_grpo_tiny_resumes_exactly_where_it_stopped(tmp_path):
    # Through launch.main (its on-disk compilation cache: the interrupted and resumed runs load
    # what the uninterrupted one compiled); the interrupted run directly, as launch.main exits.
    run = pipelines.sft_then(grpo)
    full = launch_module.main(_tiny_grpo(False), str(tmp_path / "full"), run)
    assert full.status == "finished" and full.step == 4
    first = run(_tiny_grpo(False), str(tmp_path / "cut"), stop_after_steps=2)
    assert first.status == "preempted" and first.step == 2
    second = launch_module.main(_tiny_grpo(False), str(tmp_path / "cut"), run)
    assert second.status == "finished" and second.step == 4
    # Same rollouts (keys folded from the step), same updates, same records.
    a, b = records(tmp_path / "full", "train"), records(tmp_path / "cut", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    for ra, rb in zip(a, b, strict=True):
        for name in ("loss", "rollout/score", "rollout/length", "kl/ref", "grad_norm"):
            assert ra[name] == pytest.approx(rb[name], rel=1e-5, abs=1e-7), name
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
        jax.device_get(full.state.params),
        jax.device_get(second.state.params),
    )
    final = records(tmp_path / "full", "eval")[-1]
    for name in ("eval/rollout/score", "eval/rollout/length", "eval/kl/sampled"):
        assert np.isfinite(final[name]), name


@pytest.mark.slow
def test_online_dpo_launcher_runs_tiny_preset(tmp_path):
    workdir = str(tmp_path / "run")
    argv = [
        "--config=experiments/configs/online_dpo.py:tiny",
        f"--workdir={workdir}",
        "--config.logging.progress=False",
    ]
    assert launch("experiments.online_dpo", argv) is None  # exit status 0
    train = records(workdir, "train")
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["score/chosen"] >= r["score/rejected"]
        assert 0.0 <= r["pairs/kept_fraction"] <= 1.0 and np.isfinite(r["loss"])
    evals = records(workdir, "eval")
    assert "eval/gold_reward" in evals[-1]
    # The policy entropy on held-out samples, what the release gate reads; the train step's
    # entropy/response is off by default (algorithm.train_entropy).
    assert all(
        np.isfinite(r["eval/rollout/entropy"]) and r["eval/rollout/entropy"] > 0 for r in evals
    )
    assert not any("entropy/response" in r for r in train)
