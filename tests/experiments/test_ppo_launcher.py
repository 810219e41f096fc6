"""The PPO launcher: its ``:tiny`` preset end to end (SFT warm-up, then PPO on the gold reward),
the SFT -> reward model -> PPO pipeline (its reward-model stage loaded back as a reward source),
stop/resume equal to an uninterrupted run, presets and validation that names the field."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import launch as launch_module
from experiments import pipelines
from experiments.configs import common
from experiments.configs import grpo as grpo_config
from experiments.configs import ppo as ppo_config
from prefjax import models, rollout
from prefjax.train import checkpointing, grpo, online, ppo
from tests.experiments.test_launchers import _compilation_cache, launch  # noqa: F401

SMALL = [
    "--config.data.num_train=64",
    "--config.logging.progress=False",
]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sft_reward_model_ppo_pipeline(tmp_path):
    """Three runs side by side; PPO starts from the SFT policy and is scored by the reward
    model (its rollout scores are the model's, not the gold reward)."""
    workdir = str(tmp_path / "rlhf")
    argv = ["--config=experiments/configs/ppo.py:tiny", f"--workdir={workdir}", *SMALL]
    argv += ["--config.pipeline.name=sft_rm_ppo", "--config.pipeline.reward_model_steps=2"]
    assert launch("experiments.ppo", argv) is None
    assert sorted(os.listdir(workdir)) == ["ppo", "reward_model", "sft"]
    run = json.load(open(os.path.join(workdir, "ppo", "run.json")))
    reward_cfg = run["config"]["algorithm"]["reward"]
    assert reward_cfg["source"] == "model"
    assert reward_cfg["model_dir"] == os.path.join(workdir, "reward_model")
    assert run["config"]["model"]["init_from"] == os.path.join(workdir, "sft")
    evals = [r for r in _records(os.path.join(workdir, "ppo")) if r["split"] == "eval"]
    assert 0.0 <= evals[-1]["eval/gold_reward"] <= 1.0
    # Running it again resumes each finished stage without training it again.
    assert launch("experiments.ppo", argv) is None
    _check_reward_model_source(os.path.join(workdir, "reward_model"), os.path.join(workdir, "sft"))


def _check_reward_model_source(workdir, sft_dir):
    """A reward-model run directory as a reward source: its final params, read at the last real
    token of each response; a GRPO config naming it validates; an SFT run is refused."""
    source = online.reward_model_from_workdir(workdir)
    assert source.model.head == "reward"
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
    config = grpo_config.get_config("tiny")
    config.algorithm.reward.source = "model"
    config.algorithm.reward.model_dir = workdir
    grpo.validate_config(config)
    with pytest.raises(ValueError, match="'sft' run, not a reward-model run"):
        online.reward_model_from_workdir(sft_dir)


def test_presets_validate():
    for preset in ppo_config.PRESETS:
        config = ppo_config.get_config(preset)
        common.validate(config, num_devices=8)
    bandit = ppo_config.get_config("bandit")
    assert bandit.data.task == "bandit" and bandit.algorithm.max_new_tokens == 1
    rm = ppo_config.get_config("rm")
    sft_c, rm_c, ppo_c = pipelines.sft_rm_ppo_configs(rm, "/tmp/w")
    assert sft_c.algorithm.name == "sft" and rm_c.algorithm.name == "reward"
    assert ppo_c.algorithm.reward.model_dir == "/tmp/w/reward_model"
    assert ppo_c.model.init_from == "/tmp/w/sft" and ppo_c.sft_warmup.num_steps == 0
    for stage in (sft_c, rm_c):
        assert "pipeline" not in stage and "sft_warmup" not in stage


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_minibatches", 3, r"config\.algorithm\.num_minibatches=3: must divide"),
        ("clip_eps", 1.5, r"config\.algorithm\.clip_eps=1\.5"),
        ("kl_control", "pid", r"config\.algorithm\.kl_control='pid'"),
        ("kl_estimator", "k4", r"config\.algorithm\.kl_estimator='k4'"),
        ("critic", "twin", r"config\.algorithm\.critic='twin'"),
        ("loss_reduction", "sum", r"config\.algorithm\.loss_reduction='sum'"),
        ("gae_lambda", 1.5, r"config\.algorithm\.gae_lambda=1\.5"),
        ("train_critic", False, r"config\.algorithm\.train_critic=False"),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x and "\\" not in x else "",
)
def test_validation_names_the_field(field, value, message):
    config = ppo_config.get_config()
    config.algorithm[field] = value
    with pytest.raises(common.ConfigError, match=message):
        common.validate(config, num_devices=8)


def test_unknown_pipeline_is_refused(tmp_path):
    argv = [f"--workdir={tmp_path}", "--config.pipeline.name=rlhf"]
    with pytest.raises(launch_module.LaunchError, match=r"config\.pipeline\.name='rlhf'") as e:
        launch("experiments.ppo", argv)
    assert e.value.code == launch_module.EXIT_REFUSED


def _resume_config():
    config = ppo_config.get_config("tiny")
    config.data.num_train = 64
    config.logging.progress = False
    # Adaptive beta: the controller's state must travel with the checkpoint too.
    config.algorithm.kl_control = "adaptive"
    config.algorithm.kl_target = 0.01
    config.algorithm.kl_horizon = 20.0
    return config


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_stop_and_resume_equals_uninterrupted(tmp_path):
    """The ``:tiny`` preset through the launcher (SFT warm-up, then 2 PPO iterations on the gold
    reward, the final eval); then the same run stopped after 1 iteration and resumed: policy,
    critic, beta and the rollouts (keyed by the step) equal the uninterrupted run's."""
    run = pipelines.sft_then(ppo)
    whole_dir = str(tmp_path / "whole")
    whole = launch_module.main(_resume_config(), whole_dir, run)
    recs = _records(whole_dir)
    train = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in evals] == [2]
    last = train[-1]
    # Every metric practitioners watch is logged.
    for name in (
        "rollout/score",
        "rollout/kl",
        "rollout/entropy",
        "rollout/length",
        "rollout/eos_fraction",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "values/explained_variance",
        "advantages/mean",
        "returns/mean",
        "kl/coef",
        "time/rollout",
        "time/update",
    ):
        assert name in last, name
    # The scoring pass replays the sampler exactly; the first minibatch is on-policy.
    assert last["rollout/sampler_logprob_gap"] < 1e-4
    assert last["ppo/first/clipfrac"] == 0.0
    assert 0.0 <= evals[-1]["eval/gold_reward"] <= 1.0
    assert "eval/kl/sampled" in evals[-1]
    assert os.path.isdir(os.path.join(whole_dir, "sft_warmup"))
    assert sorted(os.listdir(os.path.join(whole_dir, "checkpoints"))) == ["1", "2"]

    workdir = str(tmp_path / "split")
    first = run(_resume_config(), workdir, stop_after_steps=1)
    assert first.status == "preempted" and first.step == 1
    second = launch_module.main(_resume_config(), workdir, run)
    assert second.status == "finished" and second.step == 2
    a, b = jax.device_get((whole.state, second.state))
    assert float(a.kl_coef) != ppo_config.get_config("tiny").algorithm.kl_coef  # beta moved
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    steps = lambda w: [r["step"] for r in _records(w) if r["split"] == "train"]
    assert steps(workdir) == steps(whole_dir) == [1, 2]
