"""Policy entropy as the DPO family and GRPO/RLOO log it (``entropy/response``,
``rollout/entropy``): uniform logits give ``log V`` nats per token, and on a random model the
value equals ``-sum_v p log p`` of the model's own logits over the response positions, computed
here in NumPy. Online DPO runs the DPO objective on its sampled pairs, so the DPO case covers it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import data, models, rollout
from prefjax import sharding as shd
from prefjax.train import common, dpo, grpo
from prefjax.train import setup as train_setup
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


@pytest.mark.parametrize("init_std", [0.0, 0.2], ids=["uniform", "random"])
def test_dpo_logs_the_policy_entropy_on_the_batch_responses(init_std):
    model = _model(init_std)
    config = make_config(dpo)
    ds = data.RepeatTask().pairwise_dataset(TOK, 8, seed=0)
    batch = data.collate(ds, np.arange(8), SEQ, with_example_mask=True)
    setup = train_setup.build_setup(config, model, shd.single_device_mesh(), jax.random.key(1), dpo)
    stats = setup.eval_step(setup.state.params, batch, setup.frozen)
    got = float(setup.objective.finalize(stats)["entropy/response"])
    if init_std == 0.0:
        assert got == pytest.approx(np.log(model.config.vocab_size), rel=1e-6)
        return
    # Chosen and rejected rows alike: [batch, 2, seq] -> [2 * batch, seq].
    flat = [np.asarray(batch[k]).reshape(16, -1) for k in common.TOKENS]
    want = _response_entropy_np(model, *flat)
    assert got == pytest.approx(want, rel=1e-5)
    assert 0.5 < got < np.log(model.config.vocab_size) - 0.01  # not the uniform value


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
