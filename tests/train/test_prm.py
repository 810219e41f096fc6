"""Process reward models: the step scorer against the reward head, the per-step loss and its
metrics against NumPy, the min / product aggregation by hand, config errors, and a PRM trained on
the built-in arithmetic task that judges held-out steps."""

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, losses, models
from prefjax import sharding as shd
from prefjax.rollout import prm
from prefjax.train import reward
from prefjax.train import setup as train_setup

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 32
SEP = 10  # "\n"


def make_config(**algorithm):
    config = config_common.base_config("reward")
    config.data.task = "arithmetic"
    config.data.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.algorithm.update(loss="prm", **algorithm)
    return config


@pytest.fixture(scope="module")
def model():
    return models.from_preset("tiny", key=jax.random.key(0), head="reward", **TINY)


@pytest.fixture(scope="module")
def batch():
    ds = data.ArithmeticTask().step_dataset(TOK, 8, seed=3)
    return data.collate(ds, [0, 1, 2, 3, 4, 5, 6, -1], SEQ)  # one padding row


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_step_logits_at_the_last_token_are_the_reward_models_score(model, batch):
    ids, attn = batch["input_ids"][:7], batch["attention_mask"][:7]
    logits = np.asarray(prm.step_logits(model, model.params, ids, attn), np.float64)
    last = attn.sum(1) - 1  # right padding: the last real token
    expected = np.asarray(model.apply(model.params, ids, attn), np.float64)
    np.testing.assert_allclose(logits[np.arange(7), last], expected, rtol=1e-5, atol=1e-6)
    # Causal: a token's score does not depend on what follows it.
    cut = np.where(np.arange(SEQ) < 10, attn, 0)
    short = np.asarray(prm.step_logits(model, model.params, ids, cut))
    np.testing.assert_allclose(short[:, :10], logits[:, :10], rtol=1e-5, atol=1e-6)


def test_prm_loss_and_metrics_match_numpy(model, batch):
    out = train_setup.make_eval_step(reward, model, make_config())(model.params, batch, None)
    z = np.asarray(
        prm.step_logits(model, model.params, batch["input_ids"], batch["attention_mask"])
    )
    mask = batch["step_mask"] * batch["example_mask"][:, None]
    y = batch["step_labels"].astype(np.float64)
    p = _sigmoid(z.astype(np.float64))
    # Binary cross-entropy of each labelled step, written out.
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(float(out["loss"][0]), (bce * mask).sum(), rtol=1e-5)
    assert float(out["loss"][1]) == mask.sum()  # mean over the labelled steps
    correct = ((p > 0.5) == (y > 0.5)) * mask
    np.testing.assert_allclose(float(out["steps/accuracy"][0]), correct.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(out["steps/positive_rate"][0]), (y * mask).sum())
    rows = mask.sum(1) > 0
    pred = np.array([p[i][mask[i] > 0].min() > 0.5 for i in np.flatnonzero(rows)])
    gold = np.array([y[i][mask[i] > 0].min() > 0.5 for i in np.flatnonzero(rows)])
    assert float(out["steps/outcome_accuracy"][0]) == (pred == gold).sum()
    assert float(out["steps/outcome_accuracy"][1]) == 7  # the padding row does not count
    # The per-example loss is the library's, which the docstring example derives by hand.
    per_example = losses.process_reward_loss(z, y, mask)
    np.testing.assert_allclose(np.asarray(per_example), (bce * mask).sum(1), rtol=1e-5)


def test_binned_auc_equals_the_rank_auc_when_bins_separate_scores():
    # Scores in distinct bins (1/32 apart): the binned AUC is the exact Mann-Whitney AUC.
    scores = (np.array([3, 9, 14, 20, 25, 30, 5, 17]) + 0.5) / reward.AUC_BINS
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    pos, neg = scores[labels == 1], scores[labels == 0]
    exact = np.mean([float(a > b) for a in pos for b in neg])
    stats = reward._auc_histogram(scores[None], labels[None].astype(np.float32), np.ones((1, 8)))
    auc = reward.finalize_prm({**stats, "loss": (0.0, 1.0)})["steps/auc"]
    np.testing.assert_allclose(float(auc), exact, rtol=1e-6)
    # Pairs in one bin count one half; only one class: 0.5.
    np.testing.assert_allclose(float(reward.binned_auc([1.0, 0.0], [1.0, 0.0])), 0.5)
    np.testing.assert_allclose(float(reward.binned_auc([0.0, 2.0], [0.0, 0.0])), 0.5)
    np.testing.assert_allclose(float(reward.binned_auc([0.0, 1.0], [1.0, 0.0])), 1.0)


def test_aggregation_min_and_product_by_hand():
    probs = np.array([[0.9, 0.3, 0.5, 0.8], [0.6, 0.7, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    mins = prm.aggregate_step_scores(probs, mask, aggregation="min")
    prods = prm.aggregate_step_scores(probs, mask, aggregation="product", empty=-1.0)
    np.testing.assert_allclose(np.asarray(mins), [0.5, 0.6, 0.0], rtol=1e-6)  # no step: empty
    np.testing.assert_allclose(np.asarray(prods), [0.9 * 0.5 * 0.8, 0.6 * 0.7, -1.0], rtol=1e-6)
    # A masked probability of 0 neither zeroes the product nor gives a NaN gradient.
    grad = jax.grad(lambda q: prm.aggregate_step_scores(q, mask, aggregation="product").sum())(
        jax.numpy.asarray(probs, jax.numpy.float32)
    )
    assert np.isfinite(np.asarray(grad)).all() and float(grad[1, 2]) == 0.0
    # Many steps: the product stays representable (log space) and equals exp(sum log p).
    many = np.full((1, 100), 0.6)
    np.testing.assert_allclose(
        float(prm.aggregate_step_scores(many, np.ones((1, 100)), aggregation="product")[0]),
        np.exp(100 * np.log(0.6)),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="aggregation='mean'"):
        prm.aggregate_step_scores(probs, mask, aggregation="mean")


def test_prm_rewards_read_separators_of_the_response_only(model):
    # Left-padded prompt "a\nb" (it contains the separator) + response "1\n2\n" + EOS.
    prompt, response = [257, 97, SEP, 98], [49, SEP, 50, SEP, TOK.eos_id]
    ids = np.array([[256, 256, *prompt, *response]])
    attn = (ids != 256).astype(np.int32)
    resp = np.zeros_like(ids)
    resp[0, 6:] = 1
    mask = prm.separator_mask(ids, resp, SEP)
    assert np.flatnonzero(np.asarray(mask[0])).tolist() == [7, 9]  # not the prompt's one at 4
    z = np.asarray(prm.step_logits(model, model.params, ids, attn))[0]
    for aggregation, expected in (
        ("min", _sigmoid(z[[7, 9]]).min()),
        ("product", _sigmoid(z[[7, 9]]).prod()),
    ):
        got = prm.prm_rewards(
            model, model.params, ids, attn, resp, separator_id=SEP, aggregation=aggregation
        )
        np.testing.assert_allclose(float(got[0]), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(margin=True), "config.algorithm.margin"),
        (dict(label_smoothing=0.1), "config.algorithm.label_smoothing"),
        (dict(task="sequence"), "config.data.task='sequence'"),
        (dict(task="bandit"), "config.data.task='bandit'"),
    ],
    ids=["margin", "label_smoothing", "sequence-task", "bandit-task"],
)
def test_invalid_prm_configs_name_the_field(overrides, field):
    task = overrides.pop("task", None)
    config = make_config(**overrides)
    if task:
        config.data.task = task
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        config_common.validate(config, num_devices=1)
    assert reward.batch_kind(make_config()) == "step"
