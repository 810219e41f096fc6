"""The online launchers end to end: ``:tiny`` presets, stop/resume equal to an uninterrupted run
(rollout keys included), a reward model loaded from a real reward-model workdir."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import pipelines
from experiments.configs import grpo as grpo_config
from prefjax import models, rollout
from prefjax.train import checkpointing, grpo, online
from tests.experiments.test_launchers import SMALL, _compilation_cache, launch  # noqa: F401


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
    run = pipelines.sft_then(grpo)
    full = run(_tiny_grpo(False), str(tmp_path / "full"))
    assert full.status == "finished" and full.step == 4
    first = run(_tiny_grpo(False), str(tmp_path / "cut"), stop_after_steps=2)
    assert first.status == "preempted" and first.step == 2
    second = run(_tiny_grpo(False), str(tmp_path / "cut"))
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
    assert "eval/gold_reward" in records(workdir, "eval")[-1]


@pytest.mark.slow
def test_reward_model_from_a_reward_model_workdir(tmp_path):
    workdir = str(tmp_path / "rm")
    assert launch("experiments.reward_model", [f"--workdir={workdir}", *SMALL]) is None
    source = online.reward_model_from_workdir(workdir)
    assert source.model.head == "reward"
    # The restored params are the run's final ones, and score a rollout at its last real token.
    params = checkpointing.restore_params(workdir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(source.params), params)
    tok = models.ByteTokenizer()
    prompt = np.array([[tok.pad_id, tok.bos_id, 97, 42, 51, 61]] * 2)
    r = rollout.Rollout(
        prompt_ids=prompt,
        prompt_mask=(prompt != tok.pad_id).astype(np.int32),
        tokens=np.array([[97, 97, 97, tok.eos_id], [97, tok.eos_id, tok.pad_id, tok.pad_id]]),
        response_mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]]),
        logprobs=np.zeros((2, 4), np.float32),
        finish_reason=np.zeros(2, np.int32),
        lengths=np.array([4, 2]),
        prompt_index=np.arange(2),
    )
    scores = np.asarray(source(r))
    alone = np.array([[tok.bos_id, 97, 42, 51, 61, 97, tok.eos_id]])
    expected = source.model.apply(source.params, alone, np.ones_like(alone))
    assert scores[1] == pytest.approx(float(expected[0]), abs=1e-5)
    # A GRPO config naming that workdir validates; one naming an SFT run would not.
    config = _tiny_grpo()
    config.algorithm.reward.source = "model"
    config.algorithm.reward.model_dir = workdir
    grpo.validate_config(config)
