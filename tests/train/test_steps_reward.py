"""Reward-model steps: Bradley-Terry (with margin) and Plackett-Luce, checked against independent
scores, and a reward model that reaches the accuracy the Bradley-Terry labelling allows."""

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, losses, models
from prefjax import sharding as shd
from prefjax.train import evaluation, reward
from prefjax.train import setup as train_setup

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 16
SINGLE = shd.single_device_mesh()


def make_config(**algorithm):
    config = config_common.base_config("reward")
    config.data.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.algorithm.update(algorithm)
    return config


@pytest.fixture(scope="module")
def model():
    return models.from_preset("tiny", key=jax.random.key(0), head="reward", **TINY)


def scores(model, params, ids, attn):
    return np.asarray(model.apply(params, ids, attn), np.float64)


def test_bradley_terry_with_margin_matches_independent(model):
    ds = data.RepeatTask().pairwise_dataset(TOK, 8, seed=0)
    margin = np.linspace(0.0, 1.0, 8, dtype=np.float32)
    batch = data.collate(ds.add_columns(margin=margin), np.arange(8), SEQ)
    out = train_setup.make_eval_step(reward, model, make_config(margin=True))(
        model.params, batch, None
    )
    side = lambda i: [batch[n][:, i] for n in ("input_ids", "attention_mask")]  # [batch, 2, seq]
    chosen, rejected = scores(model, model.params, *side(0)), scores(model, model.params, *side(1))
    # -log sigmoid(r_w - r_l - m), written out.
    expected = np.log1p(np.exp(-(chosen - rejected - margin))).sum()
    np.testing.assert_allclose(float(out["loss"][0]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(out["rewards/accuracy"][0]), (chosen > rejected).sum())
    no_margin = train_setup.make_eval_step(reward, model, make_config())(model.params, batch, None)
    assert float(no_margin["loss"][0]) < float(out["loss"][0])  # a margin makes it harder
    gold = batch["chosen_gold_reward"] - batch["rejected_gold_reward"]
    np.testing.assert_allclose(
        float(out["rewards/gold_accuracy"][0]), ((chosen - rejected) * gold > 0).sum()
    )


def test_plackett_luce_matches_independent(model):
    ds = data.RepeatTask().listwise_dataset(TOK, 4, num_responses=3, seed=1)
    batch = data.collate(ds, np.arange(4), SEQ)
    out = train_setup.make_eval_step(reward, model, make_config(loss="plackett_luce"))(
        model.params, batch, None
    )
    flat = lambda n: np.asarray(batch[n]).reshape(12, SEQ)
    s = scores(model, model.params, flat("input_ids"), flat("attention_mask")).reshape(4, 3)
    expected = losses.plackett_luce_loss(s, mask=batch["response_mask"])
    np.testing.assert_allclose(float(out["loss"][0]), float(np.sum(expected)), rtol=1e-4)
    # Plackett-Luce by hand for row 0 (all 3 responses valid): -sum_k log softmax(s_k..s_K)[0].
    row = s[0]
    by_hand = -sum(row[k] - np.log(np.exp(row[k:]).sum()) for k in range(3))
    np.testing.assert_allclose(float(expected[0]), by_hand, rtol=1e-5)


def test_invalid_reward_configs_name_the_field():
    with pytest.raises(ValueError, match=r"config\.algorithm\.loss='sigmoid'"):
        reward.validate_config(make_config(loss="sigmoid"))
    config = make_config()
    config.model.lora.rank = 4
    with pytest.raises(ValueError, match=r"config\.model\.lora\.rank"):
        reward.validate_config(config)


@pytest.mark.slow
def test_reward_model_reaches_bradley_terry_ceiling():
    """Held-out label accuracy within a few points of the Bayes-optimal classifier's.

    The labels are Bradley-Terry draws under the gold reward (temperature 0.1), so no model can
    beat predicting the higher gold reward; that classifier's expected accuracy is the ceiling.
    """
    model = models.from_preset("tiny", key=jax.random.key(0), head="reward")
    task = data.RepeatTask()
    train = task.pairwise_dataset(TOK, 4096, seed=0)
    held_out = task.pairwise_dataset(TOK, 512, seed=1)
    config = make_config()
    config.data.batch_size = 64
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 20
    config.train.num_steps = 300
    setup = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), reward)
    it = data.BatchIterator(train, 64, seed=0, buckets=(SEQ,), process_index=0, process_count=1)
    state = setup.state
    for _ in range(config.train.num_steps):
        state, _ = setup.train_step(state, next(it), None, jax.random.key(0))
    batches = [data.collate(held_out, np.arange(i, i + 128), SEQ) for i in range(0, 512, 128)]
    metrics = evaluation.evaluate_batches(setup.eval_step, state.params, batches, None)
    ceiling = evaluation.bt_accuracy_ceiling(
        held_out["chosen_gold_reward"],
        held_out["rejected_gold_reward"],
        temperature=task.temperature,
    )
    print(
        f"held-out accuracy {metrics['rewards/accuracy']:.3f}, ceiling {ceiling:.3f}, "
        f"gold-order accuracy {metrics['rewards/gold_accuracy']:.3f}"
    )
    assert metrics["rewards/accuracy"] > ceiling - 0.05
    assert metrics["rewards/accuracy"] < ceiling + 0.03  # beating the Bayes rate means a bug
    assert metrics["rewards/gold_accuracy"] > 0.93  # it learned the gold reward's order
