"""Online DPO: pairs from ranked samples (chosen = the higher score), DPO's step on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import online_dpo as online_dpo_config
from prefjax import models
from prefjax import sharding as shd
from prefjax.train import online, online_dpo
from prefjax.train import setup as train_setup

PAD, BOS, EOS = 256, 257, 258
TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)


def hand_rollout():
    """2 prompts x K = 3 samples; the chosen sample is not the first row of its group, and the
    second group ties (no preference)."""
    tokens = np.array(
        [
            [97, EOS, PAD],
            [98, 98, EOS],
            [99, PAD, PAD],
            [100, EOS, PAD],
            [101, EOS, PAD],
            [102, 1, 2],
        ]
    )
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    prompts = np.array([[PAD, BOS, 65]] * 3 + [[BOS, 66, 67]] * 3)
    return {
        "prompt_ids": jnp.asarray(prompts),
        "prompt_mask": jnp.asarray((prompts != PAD).astype(np.int32)),
        "tokens": jnp.asarray(tokens),
        "response_mask": jnp.asarray(mask),
        "old_logprobs": jnp.zeros((6, 3)),
        "finish_reason": jnp.zeros((6,), jnp.int32),
        "scores": jnp.array([0.2, 0.9, -0.5, 0.3, 0.3, 0.3]),
        "raw_scores": jnp.array([0.2, 0.9, -0.5, 0.3, 0.3, 0.3]),
        "weights": jnp.ones((6,)),
    }


def test_chosen_is_the_higher_scored_sample():
    pairs = online_dpo.preference_batch(hand_rollout(), 3, listwise=False)
    # Group 0: chosen = row 1 (0.9), rejected = row 2 (-0.5); prompt then response tokens.
    assert pairs["input_ids"].shape == (2, 2, 6)
    assert pairs["input_ids"][0, 0].tolist() == [PAD, BOS, 65, 98, 98, EOS]
    assert pairs["input_ids"][0, 1].tolist() == [PAD, BOS, 65, 99, PAD, PAD]
    assert pairs["loss_mask"][0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert pairs["loss_mask"][0, 1].tolist() == [0, 0, 0, 1, 0, 0]
    assert pairs["score_chosen"].tolist()[0] == pytest.approx(0.9)
    assert pairs["score_rejected"].tolist()[0] == pytest.approx(-0.5)
    assert pairs["example_mask"].tolist() == [1, 0]  # the tied group carries no preference
    ranked = online_dpo.preference_batch(hand_rollout(), 3, listwise=True)
    assert ranked["input_ids"][0, :, 3].tolist() == [98, 97, 99]  # 0.9, 0.2, -0.5


@pytest.fixture(scope="module")
def model():
    return models.Model.init(models.preset("tiny", **TINY).replace(init_std=0.2), jax.random.key(0))


@pytest.mark.slow
def test_logged_chosen_reward_is_the_higher_scored_sample(model):
    # The DPO step on the hand-made rollout: the logged scores are the pair's, chosen above
    # rejected; the tied group does not count; the step's implicit rewards start at 0 (policy =
    # reference) and the loss at log 2.
    config = online_dpo_config.get_config("tiny")
    config.data.batch_size = 2
    config.algorithm.num_samples = 3
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = shd.single_device_mesh()
    base = train_setup.build_setup(config, model, mesh, jax.random.key(1), online_dpo)
    update = online.jit_update(base, online_dpo.make_update(model, config, schedule=base.schedule))
    _, m = update(base.state, hand_rollout(), base.frozen, jax.random.key(2))
    m = jax.device_get(m)
    assert m["score/chosen"] == pytest.approx(0.9) and m["score/rejected"] == pytest.approx(-0.5)
    assert m["pairs/kept_fraction"] == 0.5
    assert m["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_config_errors_name_the_field():
    config = online_dpo_config.get_config("tiny")
    config.algorithm.loss = "kto"
    with pytest.raises(ValueError, match=r"config\.algorithm\.loss='kto'"):
        online_dpo.validate_config(config)
    config = online_dpo_config.get_config("tiny")
    config.algorithm.reference = "precomputed"
    with pytest.raises(ValueError, match=r"config\.algorithm\.reference='precomputed'"):
        online_dpo.validate_config(config)
