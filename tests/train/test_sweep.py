"""Sweeps in one compiled step: every member equals its own single DPO run.

Each member of a sweep is trained for a few steps in one stacked state, then compared with the
single run of :func:`prefjax.train.sweep.member_config` -- its own ``build_setup`` and jitted
step, its own compilation with the member's beta / label smoothing / learning rate baked in as
constants, the reference computed inside that step -- on the same batches: parameters, optimiser
state and every metric agree to 1e-5 (float32).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, models
from prefjax import sharding as shd
from prefjax.train import dpo, sweep
from prefjax.train import setup as train_setup
from prefjax.train.errors import ConfigError

TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ, BATCH, STEPS = 16, 4, 3
SINGLE = shd.single_device_mesh()


def make_config(**sweep_axes):
    config = config_common.base_config("dpo")
    config.data.batch_size = BATCH
    # AdamW with weight decay, warm-up, cosine decay and clipping: a learning-rate member must
    # scale all of it.
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 1
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_norm = 1.0
    config.train.num_steps = 10
    config.algorithm.loss = "sigmoid"
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.sweep = sweep.default_config()
    config.sweep.update(sweep_axes)
    return config


@pytest.fixture(scope="module")
def model():
    return models.from_preset("tiny", key=jax.random.key(0), **TINY)


@pytest.fixture(scope="module")
def batches():
    ds = data.RepeatTask().pairwise_dataset(TOK, BATCH * STEPS, seed=0)
    return [data.collate(ds, np.arange(i * BATCH, (i + 1) * BATCH), SEQ) for i in range(STEPS)]


def single_run(config, model, batches):
    """The member's own single run: build_setup + its jitted step, as the loop runs it."""
    setup_key, step_key = sweep.member_keys(config.seed)
    setup = train_setup.build_setup(config, model, SINGLE, setup_key, dpo)
    state, history = setup.state, []
    for batch in batches:
        state, metrics = setup.train_step(state, setup.shard_batch(batch), setup.frozen, step_key)
        history.append(jax.device_get(metrics))
    return state, history


def sweep_run(config, model, batches):
    built = sweep.build_sweep(config, model, SINGLE, sweep.members(config))
    states, history = built.states, []
    for batch in batches:
        states, metrics = built.train_step(
            states, built.base.shard_batch(batch), built.base.frozen, built.params, built.keys
        )
        history.append(jax.device_get(metrics))
    return built, states, history


# The length-bias correlation is a quotient of differences of moments (cancellation at policy
# close to reference, margins ~1e-3): a 1e-7 relative difference in the margins moves it by ~1e-4.
LOOSE = {"length_bias/corr": 1e-3}


def assert_members_equal(config, model, batches, swept=None, compared=-1):
    """Member ``compared`` (by index; the last differs from the first in every swept axis) equals
    its single run; one single run costs one compilation, so not every member is re-run.
    ``swept`` is ``sweep_run``'s result when the caller already has it."""
    built, states, history = swept or sweep_run(config, model, batches)
    assert len(built.group) > 1
    i = compared % len(built.group)
    member = built.group[i]
    state, single_history = single_run(sweep.member_config(config, member), model, batches)
    mine = sweep.unstack(states, i)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    for step, (ours, theirs) in enumerate(zip(history, single_history, strict=True)):
        assert set(ours) == set(theirs)
        for name, value in theirs.items():
            tol = LOOSE.get(name, 1e-5)
            np.testing.assert_allclose(
                ours[name][i], value, rtol=tol, atol=tol, err_msg=f"{member} {step} {name}"
            )
    # The members really differ (a sweep of identical runs would pass the checks above).
    losses = [h["loss"] for h in history]
    assert np.ptp(losses[-1]) > 1e-4


BETA_LS = dict(beta=(0.1, 0.5), label_smoothing=(0.0, 0.2))


@pytest.fixture(scope="module")
def beta_ls_sweep(model, batches):
    """One mapped sweep over beta x label smoothing, shared by the equality and vmap tests."""
    return sweep_run(make_config(**BETA_LS), model, batches)


def test_beta_and_label_smoothing_members_equal_single_runs(model, batches, beta_ls_sweep):
    assert_members_equal(make_config(**BETA_LS), model, batches, swept=beta_ls_sweep)


@pytest.mark.slow
def test_learning_rate_and_seed_members_equal_single_runs(model, batches):
    # LoRA with dropout: the seed picks a member's adapter initialisation and dropout masks.
    config = make_config(learning_rate=(1e-3, 5e-3), seed=(0, 1))
    config.model.lora.rank = 4
    config.model.lora.dropout = 0.1
    config.algorithm.reference = "lora_base"
    assert_members_equal(config, model, batches)


@pytest.mark.slow
def test_vmap_strategy_agrees_with_map(model, batches, beta_ls_sweep):
    config = make_config(**BETA_LS)
    config.sweep.strategy = "vmap"
    _, vmapped, vmapped_history = sweep_run(config, model, batches)
    _, mapped, mapped_history = beta_ls_sweep
    for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(vmapped), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mapped_history[-1]["loss"], vmapped_history[-1]["loss"], rtol=1e-5)


def test_members_are_the_product_of_the_axes():
    config = make_config(beta=(0.1, 0.3), seed=(0, 1, 2))
    group = sweep.members(config)
    assert [(m.beta, m.seed) for m in group] == [(b, s) for b in (0.1, 0.3) for s in (0, 1, 2)]
    assert {m.label_smoothing for m in group} == {0.0}
    assert group[4].name(sweep.swept_axes(config)) == "beta=0.3,seed=1"
    single = sweep.member_config(config, group[4])
    assert "sweep" not in single and single.algorithm.beta == 0.3 and single.seed == 1
    params = sweep.member_params(config, group)
    np.testing.assert_allclose(params.update_scale, jnp.ones(6))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sweep.strategy", "pmap", "config.sweep.strategy"),
        ("algorithm.loss", "kto", "config.algorithm.loss='kto'"),
        ("sweep.beta", (0.1, 0.1), "config.sweep.beta"),
        ("train.nonfinite", "stop", "config.train.nonfinite"),
    ],
)
def test_invalid_sweeps_name_the_field(field, value, message):
    config = make_config()
    block, name = field.split(".")
    config[block][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.validate(config)
