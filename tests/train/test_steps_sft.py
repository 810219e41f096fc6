"""SFT step: token-mean NLL against an independent computation, and exact accumulation when the
micro-batches hold different numbers of response tokens (where averaging per-micro-batch means, as
``optax.MultiSteps`` does, would be wrong); plus the optimiser pieces."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import common as config_common
from prefjax import data, models
from prefjax import sharding as shd
from prefjax.train import optim, sft
from prefjax.train import setup as train_setup
from prefjax.train.state import TrainState

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 16
SINGLE = shd.single_device_mesh()


def make_config():
    config = config_common.base_config("sft")
    config.data.batch_size = 8
    config.optimizer.name = "sgd"
    config.optimizer.b1 = 0.0
    config.optimizer.learning_rate = 0.5
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.clip_norm = 0.0
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    return config


@pytest.fixture(scope="module")
def model():
    return models.from_preset("tiny", key=jax.random.key(0), **TINY)


@pytest.fixture(scope="module")
def batch():
    ds = data.RepeatTask().sft_dataset(TOK, 8, seed=0)
    b = data.collate(ds, np.arange(8), SEQ)
    counts = b["loss_mask"][:, 1:].sum(-1)
    assert len(set(counts.tolist())) > 1  # unequal response lengths: the point of the test
    return b


def test_sft_loss_is_token_mean_nll(model, batch):
    out = train_setup.make_eval_step(sft, model, make_config())(model.params, batch, None)
    logits = np.asarray(model.apply(model.params, batch["input_ids"], batch["attention_mask"]))
    logits = logits[:, :-1].astype(np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, batch["input_ids"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    expected = -((picked - logz) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(out["loss"][0] / out["loss"][1]), expected, rtol=1e-5)
    assert float(out["loss"][1]) == mask.sum()


def test_sft_accumulation_is_exact_with_unequal_token_counts(model, batch):
    def one_step(accum):
        config = make_config()
        config.optimizer.grad_accum_steps = accum
        setup = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), sft)
        state = TrainState.create(params=jax.tree.map(jnp.copy, model.params), tx=setup.state.tx)
        state, metrics = setup.train_step(state, batch, None, jax.random.key(2))
        return jax.device_get(state.params), jax.device_get(metrics)

    p1, m1 = one_step(1)
    p4, m4 = one_step(4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["perplexity"], np.exp(m1["loss"]), rtol=1e-5)
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True)
    )
    assert diff < 1e-6
    # The mean of per-micro-batch means (optax.MultiSteps) differs here: the check has teeth.
    micro = optim.split_micro_batches(batch, 4)
    masks = np.asarray(micro["loss_mask"])[:, :, 1:]
    assert len({int(m.sum()) for m in masks}) > 1


def test_decay_mask_and_schedules():
    params = {
        "layers": {
            "attn_norm": {"scale": jnp.ones((2, 4))},
            "mlp": {"kernel": jnp.ones((2, 4, 4))},
        },
        "lm_head": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
    }
    mask = optim.decay_mask(params)
    assert mask["layers"]["mlp"]["kernel"] and mask["lm_head"]["kernel"]
    assert not mask["layers"]["attn_norm"]["scale"]  # 2-D, but a norm: no decay
    assert not mask["lm_head"]["bias"]
    opt = ml_collections.ConfigDict(
        dict(learning_rate=1.0, warmup_steps=10, schedule="cosine", name="adamw")
    )
    schedule = optim.make_schedule(opt, 110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(schedule(60), 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-6)
    opt.schedule = "linear"
    np.testing.assert_allclose(optim.make_schedule(opt, 110)(60), 0.5, rtol=1e-6)
    opt.schedule = "exp"
    with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='exp'"):
        optim.make_schedule(opt, 110)


def test_adamw_decays_matrices_only_and_clips():
    opt = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=0.1,
            warmup_steps=0,
            schedule="constant",
            weight_decay=0.5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            clip_norm=1.0,
        )
    )
    tx, _ = optim.make_optimizer(opt, 10)
    params = {"w": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: only the decoupled decay moves parameters, and only the matrix.
    np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
    big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
    clipped = optax.clip_by_global_norm(1.0).update(big, optax.EmptyState())[0]
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
