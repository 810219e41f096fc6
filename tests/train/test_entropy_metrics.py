"""Policy entropy as the DPO family, online DPO and GRPO/RLOO log it (``entropy/response``,
``eval/rollout/entropy``, ``rollout/entropy``): uniform logits give ``log V`` nats per token, and
on a random model the value equals ``-sum_v p log p`` of the model's own logits over the response
positions, computed here in NumPy. The DPO family records it in the eval step, and in the train
step only with ``algorithm.train_entropy``, whose compiled step keeps one more ``[tokens, vocab]``
float32 temporary for it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import online_dpo as online_dpo_config
from prefjax import data, models, rollout
from prefjax import sharding as shd
from prefjax.train import common, cost, dpo, grpo, online
from prefjax.train import config as train_config
from prefjax.train import setup as train_setup
from prefjax.train.errors import ConfigError
from tests.train.test_grpo import config_for, ragged_rollout
from tests.train.test_objectives import SEQ, TINY, TOK, make_config


def _model(init_std):
    # init_std 0: every weight matrix and embedding is 0, so every logit is 0 (uniform).
    return models.Model.init(
        models.preset("tiny", **TINY).replace(init_std=init_std), jax.random.key(0)
    )


def _entropy_np(logits):
    """``[..., V]`` logits -> ``[...]`` entropies, float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(-1)


def _response_entropy_np(model, ids, attn, loss_mask):
    """Mean entropy over the response tokens: the logits at ``t`` predict token ``t + 1``."""
    ent = _entropy_np(model.apply(model.params, ids, attn))[:, :-1]  # [rows, seq - 1]
    mask = np.asarray(loss_mask)[:, 1:] > 0
    return ent[mask].mean()


@pytest.mark.parametrize(
    "init_std, train_entropy",
    [(0.0, False), (0.2, False), (0.2, True)],
    ids=["uniform", "random", "random-train-step"],
)
def test_dpo_logs_the_policy_entropy_on_the_batch_responses(init_std, train_entropy):
    model = _model(init_std)
    config = make_config(dpo, train_entropy=train_entropy)
    ds = data.RepeatTask().pairwise_dataset(TOK, 8, seed=0)
    batch = data.collate(ds, np.arange(8), SEQ, with_example_mask=True)
    setup = train_setup.build_setup(config, model, shd.single_device_mesh(), jax.random.key(1), dpo)
    stats = setup.eval_step(setup.state.params, batch, setup.frozen)
    got = float(setup.objective.finalize(stats)["entropy/response"])
    if train_entropy:  # the train step's metrics are of the parameters before its update
        _, train = setup.train_step(setup.state, batch, setup.frozen, jax.random.key(2))
        assert float(train["entropy/response"]) == pytest.approx(got, rel=1e-6)
    if init_std == 0.0:
        assert got == pytest.approx(np.log(model.config.vocab_size), rel=1e-6)
        return
    # Chosen and rejected rows alike: [batch, 2, seq] -> [2 * batch, seq].
    flat = [np.asarray(batch[k]).reshape(16, -1) for k in common.TOKENS]
    want = _response_entropy_np(model, *flat)
    assert got == pytest.approx(want, rel=1e-5)
    assert 0.5 < got < np.log(model.config.vocab_size) - 0.01  # not the uniform value


def test_dpo_train_step_without_the_entropy_keeps_fewer_temporaries():
    # Compiled from shapes only, at a vocabulary where the logits dominate: 2 pairs x 32 tokens.
    # With train_entropy the compiled step keeps one more float32 temporary of the shifted
    # logits, [2 * 2, 32 - 1, 8192] (measured 20 617 744 -> 24 681 488 bytes: +4 063 744, the
    # shifted logits' 4 063 232 and 512 more).
    config = make_config(dpo)
    config.data.update(batch_size=2, max_len=32)
    model_cfg = models.preset("tiny", **TINY).replace(vocab_size=8192)
    shifted_logits_bytes = 2 * 2 * 31 * 8192 * 4
    mesh = shd.single_device_mesh()
    model = models.Model(model_cfg, None, head=dpo.HEAD)
    state, frozen, *_ = cost.abstract_inputs(config, dpo, model, mesh)
    batch = cost.abstract_batch(config, dpo, mesh)
    key = jax.random.key(0)
    temp, names = {}, {}
    for on in (False, True):
        config.algorithm.train_entropy = on
        compiled = cost.compile_train_step(
            config, dpo, mesh, model_cfg=model_cfg, count_flops=False
        )
        temp[on] = cost.step_cost(compiled).temp_bytes
        step = train_setup.make_train_step(dpo, model, config)
        names[on] = set(jax.eval_shape(step, state, batch, frozen, key)[1])
    assert "entropy/response" not in names[False]
    assert names[True] - names[False] == {"entropy/response"}
    assert temp[True] - temp[False] > 0.9 * shifted_logits_bytes
    # Eval records it either way (from the same objective's eval loss).
    eval_step = train_setup.make_eval_step(dpo, model, config)
    assert "entropy/response" in jax.eval_shape(eval_step, state.params, batch, frozen)


def test_dpo_train_entropy_is_validated_naming_the_field():
    config = make_config(dpo)
    del config.algorithm["train_entropy"]
    config.algorithm.train_entropy = "yes"  # a config built without the typed default
    with pytest.raises(ConfigError, match=r"config\.algorithm\.train_entropy='yes'.*True/False"):
        train_config.validate(config, 1, dpo)
    config = make_config(dpo, train_entropy=True)
    config.model.logps_chunk_size = 8
    with pytest.raises(ConfigError, match=r"train_entropy=True.*logps_chunk_size=8"):
        train_config.validate(config, 1, dpo)
    config.algorithm.train_entropy = False  # the chunked step simply records no entropy
    train_config.validate(config, 1, dpo)


@pytest.mark.parametrize("init_std", [0.0, 0.2], ids=["uniform", "random"])
def test_online_dpo_eval_logs_the_entropy_of_its_held_out_samples(init_std):
    model = _model(init_std)
    config = online_dpo_config.get_config("tiny")
    batch = ragged_rollout(model)
    batch["weights"][-4:] = 0.0  # padding rows count for nothing
    with_entropy = online.eval_kl_stats(model, config, True, entropy=True)
    stats = with_entropy(model.params, batch, model.params)
    # The sampled KL is unchanged by the entropy riding on the same forward pass.
    kl = online.eval_kl_stats(model, config, True)(model.params, batch, model.params)
    np.testing.assert_allclose(stats["kl/sampled"], kl["kl/sampled"], rtol=1e-6)
    total, tokens = (float(x) for x in stats["rollout/entropy"])
    assert tokens == float(np.sum(batch["response_mask"][:-4]))
    if init_std == 0.0:
        assert total / tokens == pytest.approx(np.log(model.config.vocab_size), rel=1e-6)
        return
    ids, attn, lmask = rollout.sequences(
        (batch["prompt_ids"], batch["prompt_mask"]), batch["tokens"], batch["response_mask"]
    )
    want = _response_entropy_np(model, ids[:-4], attn[:-4], lmask[:-4])
    assert total / tokens == pytest.approx(want, rel=1e-5)


def test_response_logps_entropy_needs_the_full_logits():
    model = _model(0.0)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="chunk_size=0"):
        common.response_logps(model, model.params, ids, ids, ids, chunk_size=2, entropy=True)


@pytest.mark.parametrize("init_std", [0.0, 0.2], ids=["uniform", "random"])
def test_grpo_logs_the_policy_entropy_along_its_rollout(init_std):
    model = _model(init_std)
    config = config_for()
    batch = ragged_rollout(model)
    frozen = model.params  # the reference: a copy of the policy
    prepared = grpo.prepare(model, config)(batch, frozen)
    objective = grpo.objective(model, config)
    _, stats = objective.loss(
        model.params, prepared, frozen, None, objective.denominators(prepared)
    )
    total, tokens = (float(x) for x in stats["rollout/entropy"])
    got = total / tokens
    if init_std == 0.0:
        assert got == pytest.approx(np.log(model.config.vocab_size), rel=1e-6)
        return
    ids, attn, lmask = rollout.sequences(
        (batch["prompt_ids"], batch["prompt_mask"]), batch["tokens"], batch["response_mask"]
    )
    assert tokens == float(np.sum(batch["response_mask"]))
    assert got == pytest.approx(_response_entropy_np(model, ids, attn, lmask), rel=1e-5)
