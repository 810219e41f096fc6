"""DPO-family train/eval steps: exact accumulation, reference handling, skips, variants, the bandit.

Every expected value is computed independently of the step: log-probs from ``model.apply`` logits
with a NumPy log-softmax, then the loss from ``prefjax.losses``; gradient checks use SGD without
momentum so the parameter change after one step *is* ``-lr * grad``.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, losses, models
from prefjax import sharding as shd
from prefjax.train import dpo, evaluation, reference
from prefjax.train import setup as train_setup
from prefjax.train.state import TrainState

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 16


def make_config(**algorithm):
    config = config_common.base_config("dpo")
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
    config.algorithm.update(algorithm)
    return config


@pytest.fixture(scope="module")
def model():
    base = models.from_preset("tiny", key=jax.random.key(0), **TINY)
    return base


@pytest.fixture(scope="module")
def policy_params(model):
    """A policy different from the reference (``model.params``), so no loss sits at log 2."""
    noise = jax.tree.map(
        lambda x: 0.02 * jax.random.normal(jax.random.key(7), x.shape, x.dtype), model.params
    )
    return jax.tree.map(jnp.add, model.params, noise)


@pytest.fixture(scope="module")
def pairwise():
    ds = data.RepeatTask().pairwise_dataset(TOK, 16, seed=0)
    return ds, data.collate(ds, np.arange(8), SEQ)


@functools.lru_cache(maxsize=8)
def _apply(model):
    return jax.jit(lambda params, ids, attn, lora: model.apply(params, ids, attn, lora=lora))


def np_logps(model, params, ids, attn, lmask, lora=None):
    """Independent summed response log-probs: NumPy log-softmax of ``model.apply`` logits."""
    logits = np.asarray(_apply(model)(params, ids, attn, lora), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.asarray(ids)[:, 1:, None], -1)[..., 0]
    mask = np.asarray(lmask)[:, 1:]
    return ((picked - logz) * mask).sum(-1), mask.sum(-1)


def pair_logps(model, params, batch):
    """``{"chosen": (logps, counts), "rejected": ...}`` of a ``[batch, 2, seq]`` pair batch."""
    side = lambda i: [
        np.asarray(batch[n])[:, i] for n in ("input_ids", "attention_mask", "loss_mask")
    ]
    return {
        name: np_logps(model, params, *side(i)) for i, name in enumerate(("chosen", "rejected"))
    }


SINGLE = shd.single_device_mesh()


_SETUPS = {}


def cached_setup(config, model):
    """One ``dpo.setup`` (and so one compilation) per distinct config in this module."""
    key = (config.to_json_best_effort(), id(model))
    if key not in _SETUPS:
        _SETUPS[key] = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), dpo)
    return _SETUPS[key]


def run_one_step(config, model, params, batch):
    """One jitted train step from ``params`` (a fresh state) on the single-device mesh."""
    setup = cached_setup(config, model)
    state = TrainState.create(params=jax.tree.map(jnp.copy, params), tx=setup.state.tx)
    new_state, metrics = setup.train_step(state, batch, setup.frozen, jax.random.key(2))
    return setup, new_state, jax.device_get(metrics)


def max_tree_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ----------------------------------------------------------------- accumulation, compile once


def test_grad_accumulation_over_4_micro_batches_equals_one_batch(model, policy_params, pairwise):
    _, batch = pairwise
    _, one, m1 = run_one_step(make_config(beta=0.5), model, policy_params, batch)
    config = make_config(beta=0.5)
    config.optimizer.grad_accum_steps = 4
    _, four, m4 = run_one_step(config, model, policy_params, batch)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for name in ("rewards/accuracy", "rewards/margin", "logps/chosen", "length/rejected"):
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, atol=1e-6)
    assert max_tree_diff(four.params, one.params) < 1e-6
    assert max_tree_diff(one.params, policy_params) > 1e-4  # the step did move


def test_frozen_reference_shares_the_model_buffers_and_the_state_does_not(model):
    setup = cached_setup(make_config(), model)
    ptr = lambda tree: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]  # noqa: E731
    # The frozen reference is model.params itself (no third copy of the weights) ...
    assert ptr(setup.frozen) == ptr(model.params)
    # ... while the trainable state, donated at every step, is a copy of its own.
    assert not set(ptr(setup.state.params)) & set(ptr(model.params))


class TracedOnce:
    """DPO whose loss may be traced once: three batches of one shape compile one step."""

    NAME, HEAD = dpo.NAME, dpo.HEAD
    reference = staticmethod(dpo.reference)

    @staticmethod
    def objective(model, config):
        objective = dpo.objective(model, config)
        return dataclasses.replace(objective, loss=chex.assert_max_traces(objective.loss, n=1))


def test_step_traces_once_and_skips_nonfinite_batches(model, pairwise):
    ds, _ = pairwise
    config = make_config()
    config.optimizer.name = "adamw"
    setup = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), TracedOnce)
    state = setup.state
    losses_seen = []
    for start in (0, 4, 8):  # three different batches of the same shape: one trace
        batch = data.collate(ds, np.arange(start, start + 8), SEQ)
        state, metrics = setup.train_step(state, batch, setup.frozen, jax.random.key(0))
        losses_seen.append(float(metrics["loss"]))
        assert float(metrics["train/skipped"]) == 0.0
    assert int(state.step) == 3 and len(set(losses_seen)) == 3
    # A batch whose loss is non-finite (here through a NaN in the reference weights) is skipped:
    # params and AdamW moments unchanged, the step counted.
    params_before = jax.device_get(state.params)
    opt_before = jax.device_get(state.opt_state)
    poisoned = jax.tree.map(lambda x: x.at[0].set(jnp.nan), setup.frozen)
    state, metrics = setup.train_step(state, batch, poisoned, jax.random.key(0))
    assert float(metrics["train/skipped"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))
    assert float(metrics["update_norm"]) == 0.0
    assert max_tree_diff(state.params, params_before) == 0.0
    assert max_tree_diff(state.opt_state, opt_before) == 0.0
    assert int(state.step) == 4
    state, metrics = setup.train_step(state, batch, setup.frozen, jax.random.key(0))
    assert float(metrics["train/skipped"]) == 0.0
    assert max_tree_diff(state.params, params_before) > 0.0
    chex.clear_trace_counter()


# ------------------------------------------------------------------------ reference handling


def test_precomputed_reference_equals_live_reference(model, policy_params, pairwise):
    ds, batch = pairwise
    columns = dpo.precompute_reference_logps(model, model.params, ds, batch_size=8)
    expected = pair_logps(model, model.params, data.collate(ds, np.arange(len(ds)), SEQ))
    assert columns["ref_logps"].shape == (len(ds), 2)
    np.testing.assert_allclose(columns["ref_logps"][:, 0], expected["chosen"][0], rtol=1e-5)
    np.testing.assert_allclose(columns["ref_logps"][:, 1], expected["rejected"][0], rtol=1e-5)
    pre_batch = data.collate(ds.add_columns(**columns), np.arange(8), SEQ)
    assert pre_batch["ref_logps"].shape == (8, 2)
    _, live, m_live = run_one_step(make_config(beta=0.5), model, policy_params, batch)
    setup, pre, m_pre = run_one_step(
        make_config(beta=0.5, reference="precomputed"), model, policy_params, pre_batch
    )
    assert setup.frozen is None  # no reference in memory
    np.testing.assert_allclose(m_pre["loss"], m_live["loss"], rtol=1e-5)
    assert max_tree_diff(pre.params, live.params) < 1e-5


def test_lora_base_reference_equals_frozen_copy_of_base(model, pairwise):
    _, batch = pairwise
    lora = model.init_lora(jax.random.key(3), rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    # Trained-looking adapters: b is zero at init, so perturb every adapter matrix.
    lora = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), lora
    )
    lora_config = make_config(reference="lora_base", beta=0.5)
    lora_config.model.lora.rank = 4
    lora_eval = jax.jit(train_setup.make_eval_step(dpo, model, lora_config))
    out_lora = lora_eval(lora, batch, model.params)
    # The same policy as plain merged weights, with a frozen *copy* of the base as reference.
    merged = model.merge_lora(model.params, lora)
    copy_eval = jax.jit(
        train_setup.make_eval_step(dpo, model, make_config(reference="copy", beta=0.5))
    )
    out_copy = copy_eval(merged, batch, jax.tree.map(jnp.copy, model.params))
    for name in ("loss", "rewards/margin", "logps/chosen", "kl/logratio"):
        np.testing.assert_allclose(out_lora[name][0], out_copy[name][0], rtol=2e-5, atol=1e-5)
    # Independent: the loss from NumPy log-probs of the merged policy and the base.
    pol, ref = pair_logps(model, merged, batch), pair_logps(model, model.params, batch)
    expected = losses.dpo_loss(
        pol["chosen"][0], pol["rejected"][0], ref["chosen"][0], ref["rejected"][0], beta=0.5
    ).loss.sum()
    np.testing.assert_allclose(out_lora["loss"][0], expected, rtol=1e-4)
    assert abs(float(out_lora["rewards/margin"][0])) > 1e-4  # adapters changed the policy


# ---------------------------------------------------------------------- every loss variant


VARIANTS = [*sorted(losses.PAIRWISE_LOSSES), "orpo", "simpo"]


def variant_algorithm(name):
    algo = dict(loss=name, beta=0.3, reference="none" if name in ("orpo", "simpo") else "copy")
    if name in ("robust", "sigmoid"):
        algo["label_smoothing"] = 0.1
    return algo


@pytest.fixture(scope="module")
def variant_outputs(model, policy_params, pairwise):
    """Every variant's eval step in one jitted function (one compilation for all of them)."""
    _, batch = pairwise
    steps = {
        n: train_setup.make_eval_step(dpo, model, make_config(**variant_algorithm(n)))
        for n in VARIANTS
    }
    # The vocabulary-chunked log-probs (config.model.logps_chunk_size) must give the same loss.
    chunked = make_config(**variant_algorithm("sigmoid"))
    chunked.model.logps_chunk_size = 24
    steps["sigmoid_chunked"] = train_setup.make_eval_step(dpo, model, chunked)
    # RPO: the sigmoid loss plus rpo_alpha times the chosen response's per-token NLL.
    steps["sigmoid_rpo"] = train_setup.make_eval_step(
        dpo, model, make_config(loss="sigmoid", beta=0.3, rpo_alpha=0.5)
    )

    def all_variants(params, batch, ref):
        return {
            n: step(params, batch, None if n in ("orpo", "simpo") else ref)
            for n, step in steps.items()
        }

    return jax.device_get(jax.jit(all_variants)(policy_params, batch, model.params))


@pytest.mark.parametrize("name", VARIANTS)
def test_pairwise_variant_eval_loss_matches_independent(
    name, variant_outputs, model, policy_params, pairwise
):
    _, batch = pairwise
    algo = variant_algorithm(name)
    out = variant_outputs[name]
    pol = pair_logps(model, policy_params, batch)
    (pc, nc), (pr, nr) = pol["chosen"], pol["rejected"]
    if name == "orpo":
        term = losses.orpo_loss(pc / nc, pr / nr, beta=0.3).loss
        expected = (-(pc / nc) + term).sum()
    elif name == "simpo":
        expected = losses.simpo_loss(pc / nc, pr / nr, beta=0.3, gamma=0.5).loss.sum()
    else:
        ref = pair_logps(model, model.params, batch)
        (rc, _), (rr, _) = ref["chosen"], ref["rejected"]
        if name == "ipo":  # IPO takes length-averaged log-probs (as TRL)
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        kwargs = {"label_smoothing": algo["label_smoothing"]} if "label_smoothing" in algo else {}
        expected = losses.PAIRWISE_LOSSES[name](pc, pr, rc, rr, beta=0.3, **kwargs).loss.sum()
    np.testing.assert_allclose(float(out["loss"][0]), float(expected), rtol=1e-4, atol=1e-5)
    assert float(out["loss"][1]) == 8.0
    assert np.isfinite(float(out["rewards/accuracy"][0]))


def test_chunked_logps_equal_full_logits(variant_outputs):
    full, chunked = variant_outputs["sigmoid"], variant_outputs["sigmoid_chunked"]
    for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margin"):
        np.testing.assert_allclose(float(chunked[name][0]), float(full[name][0]), rtol=1e-5)


def test_rpo_adds_the_chosen_nll_per_token(variant_outputs, model, policy_params, pairwise):
    _, batch = pairwise
    out = variant_outputs["sigmoid_rpo"]
    (pc, nc), (pr, _) = (pair_logps(model, policy_params, batch)[s] for s in ("chosen", "rejected"))
    ref = pair_logps(model, model.params, batch)
    (rc, _), (rr, _) = ref["chosen"], ref["rejected"]
    dpo_part = losses.dpo_loss(pc, pr, rc, rr, beta=0.3).loss
    nll = -(pc / nc)  # Pang et al. (2024), Eq. 2: -log pi(y_w|x) / |y_w|
    np.testing.assert_allclose(
        float(out["loss"][0]), float((dpo_part + 0.5 * nll).sum()), rtol=1e-4
    )
    np.testing.assert_allclose(float(out["loss/preference"][0]), float(dpo_part.sum()), rtol=1e-4)
    np.testing.assert_allclose(float(out["nll/chosen"][0]), float(nll.sum()), rtol=1e-4)
    # Without rpo_alpha the extra metrics are absent and the loss is DPO's alone.
    assert "nll/chosen" not in variant_outputs["sigmoid"]


def test_listwise_eval_loss_matches_independent(model, policy_params):
    ds = data.RepeatTask().listwise_dataset(TOK, 4, num_responses=3, seed=1)
    batch = data.collate(ds, np.arange(4), SEQ)
    eval_step = jax.jit(
        train_setup.make_eval_step(dpo, model, make_config(loss="listwise", beta=0.2))
    )
    out = eval_step(policy_params, batch, model.params)
    flat = lambda x: np.asarray(x).reshape(12, SEQ)
    args = [flat(batch[n]) for n in ("input_ids", "attention_mask", "loss_mask")]
    pol = np_logps(model, policy_params, *args)[0].reshape(4, 3)
    ref = np_logps(model, model.params, *args)[0].reshape(4, 3)
    expected = losses.listwise_dpo_loss(pol, ref, beta=0.2, mask=batch["response_mask"]).loss
    np.testing.assert_allclose(float(out["loss"][0]), float(expected.sum()), rtol=1e-4)


def test_mismatched_pairs_for_kto_reference_point():
    # Row 0: prompt [5, 6], response [7, 8]; row 1: prompt [9], response [10, 11, 12]; pad 0.
    ids = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 0, 0]])
    attn = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    lmask = jnp.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    kl_ids, kl_attn, kl_lmask = dpo.mismatched_pairs(ids, attn, lmask)
    np.testing.assert_array_equal(kl_ids, [[5, 6, 10, 11, 12, 0], [9, 7, 8, 0, 0, 0]])
    np.testing.assert_array_equal(kl_attn, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(kl_lmask, [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    # Left padding gives the same mismatched (right-padded) sequences.
    left = jnp.array([[0, 0, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12]])
    out = dpo.mismatched_pairs(left, jnp.roll(attn, 2, 1), jnp.roll(lmask, 2, 1))
    np.testing.assert_array_equal(out[0], kl_ids)


def test_kto_eval_loss_matches_independent(model, policy_params):
    ds = data.RepeatTask().unpaired_dataset(TOK, 8, seed=2)
    batch = data.collate(ds, np.arange(8), SEQ)
    assert 0 < batch["label"].sum() < 8
    config = make_config(loss="kto", beta=0.2, desirable_weight=1.5)
    out = jax.jit(train_setup.make_eval_step(dpo, model, config))(
        policy_params, batch, model.params
    )
    args = [batch[n] for n in ("input_ids", "attention_mask", "loss_mask")]
    kl_args = dpo.mismatched_pairs(*(jnp.asarray(a) for a in args))
    pol, ref = np_logps(model, policy_params, *args)[0], np_logps(model, model.params, *args)[0]
    z0 = max(
        0.0,
        float(
            np.mean(
                np_logps(model, policy_params, *kl_args)[0]
                - np_logps(model, model.params, *kl_args)[0]
            )
        ),
    )
    expected = losses.kto_loss(pol, ref, batch["label"], z0, beta=0.2, desirable_weight=1.5).loss
    np.testing.assert_allclose(float(out["loss"][0]), float(expected.sum()), rtol=1e-4)
    np.testing.assert_allclose(float(out["kl/reference_point"][0]) / 8, z0, rtol=1e-4, atol=1e-6)


# ------------------------------------------------- rewards/accuracy: ties and genuine margins


ACCURACY_DATA = {
    "sigmoid": lambda n: data.RepeatTask().pairwise_dataset(TOK, n, seed=0),
    "listwise": lambda n: data.RepeatTask().listwise_dataset(TOK, n, num_responses=3, seed=1),
    "kto": lambda n: data.RepeatTask().unpaired_dataset(TOK, n, seed=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(ACCURACY_DATA))
def test_accuracy_is_one_half_when_policy_equals_reference(loss):
    # On 2 data-parallel devices the train step's policy pass (under value_and_grad) and its
    # reference pass of the tiny preset round differently (|margin| ~ 1e-7 on some batches), so
    # counting only exact zeros as ties gave 0.375-0.625 for pairs; listwise and KTO, which had
    # no ties at all, gave 0.
    model = models.from_preset("tiny", key=jax.random.key(0))
    config = make_config(loss=loss, beta=0.5)
    config.mesh.data = 2
    mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:2])
    setup = train_setup.build_setup(config, model, mesh, jax.random.key(1), dpo)
    assert max_tree_diff(setup.state.params, setup.frozen) == 0.0  # a live copy, same values
    ds = ACCURACY_DATA[loss](24)
    for start in (0, 8, 16):
        batch = jax.device_put(
            data.collate(ds, np.arange(start, start + 8), SEQ), setup.batch_sharding
        )
        sums, count = setup.eval_step(setup.state.params, batch, setup.frozen)["rewards/accuracy"]
        assert float(sums) / float(count) == 0.5
        state = TrainState.create(params=jax.tree.map(jnp.copy, model.params), tx=setup.state.tx)
        _, metrics = setup.train_step(state, batch, setup.frozen, jax.random.key(2))
        assert float(metrics["rewards/accuracy"]) == 0.5, start


def test_accuracy_counts_rounding_as_ties_and_small_genuine_margins_as_wins(model, policy_params):
    """The tie tolerance, with hand-made reference log-probs (``reference="precomputed"``)."""
    ds = ACCURACY_DATA["sigmoid"](8)  # its own: add_columns writes into the dataset
    columns = dpo.precompute_reference_logps(model, policy_params, ds, batch_size=8)
    setup = cached_setup(make_config(beta=0.5, reference="precomputed"), model)

    def accuracy(ref_chosen, ref_rejected):
        ref_logps = np.stack([ref_chosen, ref_rejected], axis=1)
        batch = data.collate(ds.add_columns(ref_logps=ref_logps), np.arange(8), SEQ)
        sums, count = setup.eval_step(policy_params, batch, None)["rewards/accuracy"]
        return float(sums) / float(count)

    rc, rr = columns["ref_logps"][:, 0], columns["ref_logps"][:, 1]
    # Rounding: the reference of the same weights moved by 1-3 ulps per log-prob, chosen and
    # rejected in opposite directions (|margin| up to 3 eps * sum |logps|, under the 8 eps bound);
    # the margins' signs are unbalanced, so exact-zero ties alone would give 1/8, not 1/2.
    ulps = np.array([1, 2, 3, 1, 2, 3, 1, -1], np.float32)
    nudge = lambda x, n: x + n * np.abs(np.spacing(x))  # x moved by n float32 ulps
    assert np.all(nudge(rc, ulps) != rc)
    assert accuracy(nudge(rc, ulps), nudge(rr, -ulps)) == 0.5
    # Genuine: a log-ratio difference d_i = 1e-2 * sign_i nats is counted, ~50x the tolerance
    # here (8 eps * beta * sum |logps|, logps ~ -50 nats), though 1e-4 of the logps' size.
    sign = np.array([1, -1, -1, 1, -1, 1, 1, 1], np.float32)
    assert 0.5 * 1e-2 > 20 * np.max(8 * np.finfo(np.float32).eps * 0.5 * 2 * (-rc - rr))
    # Reference chosen raised by d_i: margin_i = -beta * d_i, a win where sign_i < 0 (3 of 8).
    assert accuracy(rc + 1e-2 * sign, rr) == np.mean(sign < 0)
    assert accuracy(rc, rr + 1e-2 * sign) == np.mean(sign > 0)


@pytest.mark.parametrize("loss", sorted(ACCURACY_DATA))
def test_accuracy_of_a_different_policy_matches_numpy(loss, model, policy_params):
    """Genuine margins are not ties: the eval accuracy is the NumPy count of correct signs."""
    batch = data.collate(ACCURACY_DATA[loss](8), np.arange(8), SEQ)
    beta = 0.5
    out = jax.jit(train_setup.make_eval_step(dpo, model, make_config(loss=loss, beta=beta)))(
        policy_params, batch, model.params
    )
    if loss == "sigmoid":
        pol, ref = pair_logps(model, policy_params, batch), pair_logps(model, model.params, batch)
        margin = beta * (
            (pol["chosen"][0] - ref["chosen"][0]) - (pol["rejected"][0] - ref["rejected"][0])
        )
        correct = margin > 0
    elif loss == "listwise":
        flat = lambda x: np.asarray(x).reshape(24, SEQ)
        args = [flat(batch[n]) for n in ("input_ids", "attention_mask", "loss_mask")]
        r = beta * (
            np_logps(model, policy_params, *args)[0] - np_logps(model, model.params, *args)[0]
        )
        r = r.reshape(8, 3)  # responses ranked best first: pairs (0, 1), (0, 2), (1, 2)
        margin = np.stack([r[:, 0] - r[:, 1], r[:, 0] - r[:, 2], r[:, 1] - r[:, 2]], 1)
        correct = (margin > 0).mean(1)
    else:
        args = [batch[n] for n in ("input_ids", "attention_mask", "loss_mask")]
        margin = beta * (
            np_logps(model, policy_params, *args)[0] - np_logps(model, model.params, *args)[0]
        )
        correct = np.where(batch["label"] > 0, margin > 0, margin < 0)
    assert np.min(np.abs(margin)) > 1e-4  # clear of the tie tolerance (< 4e-5 here)
    sums, count = out["rewards/accuracy"]
    np.testing.assert_allclose(float(sums) / float(count), np.mean(correct), rtol=1e-6)


def test_invalid_combinations_name_the_field(model):
    with pytest.raises(ValueError, match=r"config\.algorithm\.loss='dpoo'"):
        dpo.validate_config(make_config(loss="dpoo"))
    with pytest.raises(ValueError, match=r"config\.algorithm\.reference='none'"):
        dpo.validate_config(make_config(reference="none"))
    with pytest.raises(ValueError, match=r"config\.algorithm\.reference='copy'.*reference-free"):
        dpo.validate_config(make_config(loss="simpo", reference="copy"))
    with pytest.raises(ValueError, match=r"lora_base' needs LoRA"):
        dpo.validate_config(make_config(reference="lora_base"))
    with pytest.raises(ValueError, match=r"config\.algorithm.*label_smoothing=0\.2"):
        dpo.validate_config(make_config(loss="ipo", label_smoothing=0.2))
    with pytest.raises(ValueError, match=r"precomputed' is not supported with loss='kto'"):
        dpo.validate_config(make_config(loss="kto", reference="precomputed"))
    with pytest.raises(ValueError, match=r"config\.algorithm\.rpo_alpha=1\.0: .* not 'kto'"):
        dpo.validate_config(make_config(loss="kto", rpo_alpha=1.0))
    with pytest.raises(ValueError, match=r"config\.algorithm\.rpo_alpha=-0\.5 must be"):
        dpo.validate_config(make_config(rpo_alpha=-0.5))


# ---------------------------------------------------------------------------- the bandit


def population_batch(bandit):
    """Every ordered pair of arms once, weighted by P(pair) * P(label): the population DPO loss.

    With pairs drawn uniformly and Bradley-Terry labels at temperature 1, the expected loss over
    the preference distribution is sum_{a != b} sigma(r_a - r_b) * loss(a > b) / #pairs. Its
    minimiser over policies is exactly pi* ∝ pi_ref exp(r / beta) (DPO paper, Sec. 5), so the
    trained policy must reach the closed form (not an empirical-frequency approximation of it).
    """
    k = bandit.num_arms
    records, weights = [], []
    for a in range(k):
        for b in range(k):
            if a != b:
                records.append(
                    {
                        "prompt": bandit.prompts[0],
                        "chosen": bandit.arms[a],
                        "rejected": bandit.arms[b],
                    }
                )
                weights.append(1.0 / (1.0 + np.exp(-(bandit.rewards[0, a] - bandit.rewards[0, b]))))
    ds = data.tokenize(records, TOK, "pairwise", max_len=SEQ, append_eos=False)
    batch = data.collate(ds, np.arange(len(ds)), SEQ)
    # example_mask doubles as a per-example weight in the steps' sums and denominators.
    batch["example_mask"] = np.asarray(weights, np.float32)
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_dpo_on_bandit_converges_to_closed_form_optimum(beta, model):
    bandit = data.Bandit.make(num_arms=4, seed=0, reward_scale=0.5)
    ref_logprobs = evaluation.bandit_policy(model, model.params, bandit, TOK)
    batch = population_batch(bandit)
    config = make_config(beta=beta)
    config.data.batch_size = 12
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.train.num_steps = 250
    setup = train_setup.build_setup(config, model, SINGLE, jax.random.key(1), dpo)
    start = evaluation.bandit_metrics(
        model, model.params, bandit, TOK, beta, ref_logprobs=ref_logprobs
    )
    state = setup.state
    for _ in range(config.train.num_steps):
        state, metrics = setup.train_step(state, batch, setup.frozen, jax.random.key(0))
    end = evaluation.bandit_metrics(
        model, state.params, bandit, TOK, beta, ref_logprobs=ref_logprobs
    )
    print(
        f"beta={beta}: KL(pi||pi*) {start['bandit/kl_to_optimum']:.4f} -> "
        f"{end['bandit/kl_to_optimum']:.5f}"
    )
    assert start["bandit/kl_to_optimum"] > 0.005  # pi_ref is measurably off the optimum
    assert end["bandit/kl_to_optimum"] < min(0.01, start["bandit/kl_to_optimum"] / 20)
    np.testing.assert_allclose(
        end["bandit/objective"], end["bandit/optimal_objective"], atol=0.01 * beta + 1e-3
    )


# ------------------------------------------------------------------ reference log-prob cache


def test_reference_cache_reuses_and_invalidates(model, tmp_path, monkeypatch):
    computed = []
    real = reference.precompute_reference_logps
    monkeypatch.setattr(
        reference,
        "precompute_reference_logps",
        lambda *a, **k: computed.append(1) or real(*a, **k),
    )
    config = make_config(reference="precomputed", reference_cache_dir=str(tmp_path / "cache"))
    fresh = lambda seed=0: data.RepeatTask().pairwise_dataset(TOK, 12, seed=seed)  # noqa: E731
    first = fresh()
    assert reference.add_reference_logps(config, model, SINGLE, [first]) == ["cached"]
    again = fresh()
    assert reference.add_reference_logps(config, model, SINGLE, [again]) == ["reused"]
    assert len(computed) == 1  # the second run never ran the reference
    np.testing.assert_array_equal(again["ref_logps"], first["ref_logps"])
    expected = real(model, model.params, fresh(), batch_size=config.data.eval_batch_size)
    np.testing.assert_array_equal(again["ref_logps"], expected["ref_logps"])
    # Other data: a miss, computed and stored beside the first entry.
    other = fresh(seed=1)
    assert reference.add_reference_logps(config, model, SINGLE, [other]) == ["cached"]
    # Other reference weights (one value moved by 1e-3): a miss too.
    leaves, treedef = jax.tree.flatten(model.params)
    leaves[0] = leaves[0].at[0, 0].add(1e-3)
    moved = models.Model(model.config, jax.tree.unflatten(treedef, leaves), head=model.head)
    assert reference.add_reference_logps(config, moved, SINGLE, [fresh()]) == ["cached"]
    # Another sequence layout (the batch size sets each example's padding): a miss.
    config.data.eval_batch_size = 4
    assert reference.add_reference_logps(config, model, SINGLE, [fresh()]) == ["cached"]
    assert len(computed) == 4
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4
    # Without a cache directory nothing is kept.
    config.algorithm.reference_cache_dir = ""
    assert reference.add_reference_logps(config, model, SINGLE, [fresh()]) == ["computed"]
