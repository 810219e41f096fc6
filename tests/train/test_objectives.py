"""What every algorithm's objective shares: its config block, its batch layout, one finalisation.

* each ``config.algorithm`` block is the algorithm's ``default_config()`` and nothing else (an
  SFT or reward-model config has no ``beta``), read as attributes;
* train and eval metrics come from the same ``finalize``: on one batch, the train step's metrics
  (computed at the parameters before its update) equal the eval step's summed stats finalised
  (the eval step adds DPO's ``entropy/response``);
* eval stats summed over two half batches finalise to the whole batch's metrics (exact means,
  also for the derived ``rewards/std``, ``perplexity`` and ``length_bias/corr``).
"""

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, models
from prefjax import sharding as shd
from prefjax.train import dpo, evaluation, reward, sft
from prefjax.train import setup as train_setup

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 16
SINGLE = shd.single_device_mesh()

# (algorithm, config changes, the dataset its batches come from)
CASES = {
    "dpo": (dpo, {}, lambda: data.RepeatTask().pairwise_dataset(TOK, 8, seed=0)),
    "dpo_kto": (dpo, {"loss": "kto"}, lambda: data.RepeatTask().unpaired_dataset(TOK, 8, seed=2)),
    "dpo_listwise": (
        dpo,
        {"loss": "listwise"},
        lambda: data.RepeatTask().listwise_dataset(TOK, 8, num_responses=3, seed=1),
    ),
    "sft": (sft, {}, lambda: data.RepeatTask().sft_dataset(TOK, 8, seed=0)),
    "reward": (reward, {}, lambda: data.RepeatTask().pairwise_dataset(TOK, 8, seed=0)),
    "reward_pl": (
        reward,
        {"loss": "plackett_luce"},
        lambda: data.RepeatTask().listwise_dataset(TOK, 8, num_responses=3, seed=1),
    ),
}


def make_config(algorithm, **changes):
    config = config_common.base_config(algorithm.NAME)
    config.data.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.algorithm.update(changes)
    return config


@pytest.mark.parametrize("algorithm", [sft, reward, dpo])
def test_the_algorithm_block_is_the_algorithms_own(algorithm):
    block = config_common.base_config(algorithm.NAME).algorithm
    assert block.to_dict() == algorithm.default_config().to_dict()
    assert block.name == algorithm.NAME


def test_sft_and_reward_configs_have_no_dpo_fields():
    for name in ("sft", "reward"):
        block = config_common.base_config(name).algorithm
        for field in ("beta", "gamma", "reference", "rpo_alpha", "desirable_weight"):
            assert field not in block, (name, field)
    assert {"beta", "reference", "rpo_alpha"} <= set(config_common.base_config("dpo").algorithm)


@pytest.fixture(scope="module")
def models_by_head():
    return {
        head: models.from_preset("tiny", key=jax.random.key(0), head=head, **TINY)
        for head in ("lm", "reward")
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_and_eval_metrics_come_from_one_finalisation(case, models_by_head):
    algorithm, changes, dataset = CASES[case]
    model = models_by_head[algorithm.HEAD]
    config = make_config(algorithm, **changes)
    ds = dataset()
    # Every batch has the same shape and an example_mask: one compilation of each step.
    collate = lambda idx: data.collate(ds, idx, SEQ, with_example_mask=True)  # noqa: E731
    batch = collate(np.arange(8))
    setup = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), algorithm)
    params = jax.device_get(setup.state.params)
    _, train = setup.train_step(setup.state, batch, setup.frozen, jax.random.key(2))
    train = jax.device_get(train)
    # The whole batch, and the same batch as two halves summed: exact means either way.
    whole = evaluation.merge_metric_sums({}, setup.eval_step(params, batch, setup.frozen))
    halves = {}
    for idx in ([0, 1, 2, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 4, 5, 6, 7]):
        half = collate(np.asarray(idx))
        halves = evaluation.merge_metric_sums(halves, setup.eval_step(params, half, setup.frozen))
    eval_whole = jax.device_get(setup.objective.finalize(whole))
    eval_halves = jax.device_get(setup.objective.finalize(halves))
    # Every metric the objective defines is in both, train-only ones are the update's norms;
    # DPO's entropy is eval-only by default (algorithm.train_entropy=False).
    update_only = {"grad_norm", "param_norm", "update_norm", "train/skipped", "learning_rate"}
    eval_only = {"entropy/response"} if algorithm is dpo else set()
    assert eval_only <= set(eval_whole)
    assert set(train) - update_only == set(eval_whole) - eval_only
    assert set(eval_whole) == set(eval_halves)
    for name, value in eval_whole.items():
        if name in eval_only:
            np.testing.assert_allclose(eval_halves[name], value, rtol=2e-5, err_msg=name)
            continue
        if name == "tokens":  # SFT's per-batch count: two half batches average to half of it
            np.testing.assert_allclose(eval_halves[name] * 2, value, rtol=1e-6)
            continue
        np.testing.assert_allclose(train[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(eval_halves[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    derived = {
        "sft": "perplexity",
        "reward": "rewards/std",
        "reward_pl": "rewards/top1_accuracy",
        "dpo": "length_bias/corr",
        "dpo_kto": "rewards/margin",
        "dpo_listwise": "rewards/accuracy",
    }[case]
    assert derived in eval_whole
