"""Tests for prefjax.losses.preference: hand-computed values, TRL parity, identities, numerics."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    plackett_luce_loop,
    trl_bco_running_mean_first_step,
    trl_cpo_loss,
    trl_dpo_loss,
    trl_kto_kl,
    trl_kto_loss,
    trl_odds_ratio_loss,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import prefjax.losses as L

PAIRWISE_NAMES = sorted(L.PAIRWISE_LOSSES)
# Jitted handles: eager dispatch compiles every primitive separately, which is slow on CPU.
plackett_luce = jax.jit(L.plackett_luce_loss)
sequence_logprobs = jax.jit(L.sequence_logprobs, static_argnames="average")


def _pair_logps(seed, batch=6, dtype=np.float64):
    """Random summed log-probs in a realistic range, and a policy near the reference."""
    rng = np.random.default_rng(seed)
    ref_c = -rng.uniform(5.0, 40.0, batch)
    ref_r = -rng.uniform(5.0, 40.0, batch)
    pol_c = ref_c + rng.normal(0.0, 3.0, batch)
    pol_r = ref_r + rng.normal(0.0, 3.0, batch)
    return [x.astype(dtype) for x in (pol_c, pol_r, ref_c, ref_r)]


# ----------------------------------------------------------------------- hand-computed values


def test_bradley_terry_hand_computed():
    # P(chosen > rejected) = sigmoid(2.0 - 0.5) = 1 / (1 + e^-1.5) = 0.8176; loss = -log P = 0.2014.
    loss = L.bradley_terry_loss(jnp.array([2.0]), jnp.array([0.5]))
    p = 1.0 / (1.0 + math.exp(-1.5))
    assert round(p, 3) == 0.818
    assert round(float(loss[0]), 3) == 0.201
    np.testing.assert_allclose(loss[0], -math.log(p), rtol=1e-6)


def test_bradley_terry_margin_and_label_smoothing():
    c, r, m, eps = jnp.array([2.0, 1.0]), jnp.array([0.5, 1.5]), jnp.array([1.0, 0.0]), 0.1
    d = np.array([2.0 - 0.5 - 1.0, 1.0 - 1.5])
    expected = -(1 - eps) * np.log(1 / (1 + np.exp(-d))) - eps * np.log(1 / (1 + np.exp(d)))
    got = L.bradley_terry_loss(c, r, margin=m, label_smoothing=eps)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_dpo_hand_computed():
    # h = (-8.2 + 8.5) - (-9.5 + 9.1) = 0.3 + 0.4 = 0.7; loss = -log sigmoid(0.07) = 0.6585.
    out = L.dpo_loss(
        jnp.array([-8.2]), jnp.array([-9.5]), jnp.array([-8.5]), jnp.array([-9.1]), beta=0.1
    )
    expected = math.log1p(math.exp(-0.1 * 0.7))
    assert round(expected, 3) == 0.659
    np.testing.assert_allclose(out.loss[0], expected, rtol=1e-6)
    np.testing.assert_allclose(out.chosen_rewards[0], 0.1 * 0.3, rtol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards[0], 0.1 * -0.4, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_at_reference_is_log2_with_gradient_minus_beta_over_2(beta):
    z = jnp.full((3,), -7.0)
    out = L.dpo_loss(z, z, z, z, beta=beta)
    assert np.all(np.asarray(out.loss) == np.float32(math.log(2.0)))
    # d loss / d h at h = 0 is -beta * sigmoid(0) = -beta / 2; h rises 1 per unit of log pi_w.
    grads = jax.grad(lambda pc, pr: L.dpo_loss(pc, pr, z, z, beta=beta).loss.sum(), (0, 1))(z, z)
    np.testing.assert_allclose(grads[0], -beta / 2, rtol=1e-6)
    np.testing.assert_allclose(grads[1], beta / 2, rtol=1e-6)


# ------------------------------------------------------------------------------ TRL parity


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)], ids=["b0.1", "b0.5-ls"])
def test_pairwise_matches_trl_float64(name, beta, label_smoothing):
    smoothing_types = ("sigmoid", "robust", "exo_pair")
    if label_smoothing and name not in smoothing_types:
        label_smoothing = 0.0
    pc, pr, rc, rr = _pair_logps(hash((name, beta)) % 2**32)
    if name == "ipo":  # TRL feeds IPO length-averaged log-probs (see ipo_loss's docstring).
        lengths_c, lengths_r = np.arange(3, 9), np.arange(10, 4, -1)
        pc, rc, pr, rr = pc / lengths_c, rc / lengths_c, pr / lengths_r, rr / lengths_r
    want = trl_dpo_loss(name, pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    with jax.enable_x64(True):
        got = L.PAIRWISE_LOSSES[name](pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
        assert got.loss.dtype == jnp.float64
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)


def test_bco_pair_running_mean_matches_older_trl():
    pc, pr, rc, rr = _pair_logps(3)
    delta = trl_bco_running_mean_first_step(pc, pr, rc, rr, 0.2)
    want = trl_dpo_loss("bco_pair", pc, pr, rc, rr, beta=0.2, bco_delta=delta)
    with jax.enable_x64(True):
        got = L.bco_pair_loss(pc, pr, rc, rr, beta=0.2, delta=delta)
        np.testing.assert_allclose(got.loss, want[0], rtol=1e-6, atol=1e-6)


def test_exo_pair_zero_smoothing_means_trl_default():
    pc, pr, rc, rr = _pair_logps(4)
    want = trl_dpo_loss("exo_pair", pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    with jax.enable_x64(True):
        got = L.exo_pair_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
        np.testing.assert_allclose(got.loss, want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)], ids=["unweighted", "weighted"])
def test_kto_matches_trl_float64(weights):
    rng = np.random.default_rng(5)
    policy, ref = -rng.uniform(5, 30, 8), -rng.uniform(5, 30, 8)
    policy = ref + rng.normal(0, 2, 8)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    mismatched_policy, mismatched_ref = -rng.uniform(5, 30, 8), -rng.uniform(5, 30, 8)
    kl = trl_kto_kl(mismatched_policy, mismatched_ref)
    d = desirable == 1
    want, want_c, want_r = trl_kto_loss(
        policy[d],
        policy[~d],
        ref[d],
        ref[~d],
        kl,
        beta=0.1,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    with jax.enable_x64(True):
        z0 = L.kto_reference_point(mismatched_policy, mismatched_ref)
        np.testing.assert_allclose(z0, kl, rtol=1e-12)
        got = L.kto_loss(
            policy,
            ref,
            desirable,
            z0,
            beta=0.1,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
        )
        # TRL concatenates [desirable..., undesirable...]; reorder ours the same way.
        np.testing.assert_allclose(np.concatenate([got.loss[d], got.loss[~d]]), want, rtol=1e-6)
        np.testing.assert_allclose(got.rewards[d], want_c, rtol=1e-6)
        np.testing.assert_allclose(got.rewards[~d], want_r, rtol=1e-6)


def test_orpo_matches_trl_float64():
    rng = np.random.default_rng(6)
    chosen, rejected = -rng.uniform(0.05, 3.0, 7), -rng.uniform(0.05, 3.0, 7)
    trl_losses, trl_c, trl_r, _, trl_log_odds_mean = trl_odds_ratio_loss(chosen, rejected, beta=0.1)
    with jax.enable_x64(True):
        got = L.orpo_loss(chosen, rejected, beta=0.1)
        # TRL returns beta * log sigmoid(log_odds) and subtracts it from the NLL.
        np.testing.assert_allclose(got.loss, -trl_losses, rtol=1e-6)
        np.testing.assert_allclose(got.chosen_rewards, trl_c, rtol=1e-6)
        np.testing.assert_allclose(got.rejected_rewards, trl_r, rtol=1e-6)
        log_odds = L.orpo_log_odds_ratio(chosen, rejected)
        np.testing.assert_allclose(log_odds.mean(), trl_log_odds_mean, rtol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_and_cpo_match_trl_float64(label_smoothing):
    rng = np.random.default_rng(7)
    chosen, rejected = -rng.uniform(0.1, 3.0, 7), -rng.uniform(0.1, 3.0, 7)
    want_simpo = trl_cpo_loss(
        "simpo", chosen, rejected, beta=2.0, label_smoothing=label_smoothing, simpo_gamma=1.2
    )
    want_cpo = trl_cpo_loss("sigmoid", chosen, rejected, beta=0.1, label_smoothing=label_smoothing)
    with jax.enable_x64(True):
        simpo = L.simpo_loss(chosen, rejected, beta=2.0, gamma=1.2, label_smoothing=label_smoothing)
        cpo = L.cpo_loss(chosen, rejected, beta=0.1, label_smoothing=label_smoothing)
        for g, w in zip(simpo, want_simpo, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)
        for g, w in zip(cpo, want_cpo, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------- identities and limits


def test_robust_equals_dpo_without_label_noise():
    args = _pair_logps(8, dtype=np.float32)
    np.testing.assert_allclose(
        L.robust_dpo_loss(*args, beta=0.3).loss, L.dpo_loss(*args, beta=0.3).loss, rtol=1e-6
    )


def test_robust_dpo_is_unbiased_under_label_flips():
    # E over flips with rate eps of the robust loss = the clean DPO loss (Chowdhury et al., Lemma).
    pc, pr, rc, rr = _pair_logps(9, dtype=np.float32)
    eps = 0.2
    keep = L.robust_dpo_loss(pc, pr, rc, rr, label_smoothing=eps).loss
    flip = L.robust_dpo_loss(pr, pc, rr, rc, label_smoothing=eps).loss
    clean = L.dpo_loss(pc, pr, rc, rr).loss
    np.testing.assert_allclose((1 - eps) * keep + eps * flip, clean, rtol=1e-5)


def test_listwise_at_k2_equals_dpo():
    pc, pr, rc, rr = _pair_logps(10, dtype=np.float32)
    listwise_dpo = jax.jit(lambda p, r: L.listwise_dpo_loss(p, r, beta=0.2))
    listwise = listwise_dpo(np.stack([pc, pr], 1), np.stack([rc, rr], 1))
    dpo = L.dpo_loss(pc, pr, rc, rr, beta=0.2)
    np.testing.assert_allclose(listwise.loss, dpo.loss, rtol=1e-5)
    np.testing.assert_allclose(listwise.rewards[:, 0], dpo.chosen_rewards, rtol=1e-6)


def test_plackett_luce_matches_loop_and_k2_is_bradley_terry():
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(5, 4)) * 3
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_allclose(
        plackett_luce(scores.astype(np.float32), mask=mask),
        plackett_luce_loop(scores, mask),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        plackett_luce(scores[:, :2].astype(np.float32)),
        L.bradley_terry_loss(scores[:, 0], scores[:, 1]),
        rtol=1e-5,
    )


def test_plackett_luce_padding_slots_are_ignored_even_if_nan():
    scores = np.array([[1.0, -2.0, 0.5, np.nan, -np.inf]], np.float32)
    mask = np.array([[1, 1, 1, 0, 0]])
    got = plackett_luce(scores, mask=mask)
    np.testing.assert_allclose(got, plackett_luce(scores[:, :3]), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda s: L.plackett_luce_loss(s, mask=mask).sum()))(scores)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0, 3:] == 0)


@pytest.mark.parametrize("fn", [L.plackett_luce_loss, None], ids=["plackett_luce", "listwise"])
def test_fully_masked_row_gives_zero_not_nan(fn):
    scores = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    mask = jnp.array([[0, 0, 0], [1, 1, 1]])
    if fn is None:

        def fn(s, mask):
            return L.listwise_dpo_loss(s, jnp.zeros_like(s), mask=mask).loss

    loss, grad = jax.jit(jax.value_and_grad(lambda s: fn(s, mask=mask)[0]))(scores)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def test_padding_a_sequence_leaves_every_pairwise_loss_unchanged():
    # Log-probs come from sequence_logprobs; padding the chosen/rejected sequences with garbage
    # logits and arbitrary token ids under mask 0 must not change any loss.
    rng = np.random.default_rng(12)
    b, t, v, pad = 3, 5, 7, 4

    def logps(logits, labels, mask, average):
        return sequence_logprobs(logits, labels, mask, average=average)

    base = [rng.normal(size=(b, t, v)).astype(np.float32) for _ in range(4)]
    labels = [rng.integers(0, v, (b, t)) for _ in range(2)]
    mask = (rng.random((b, t)) < 0.8).astype(np.int32)
    padded = [np.concatenate([x, 1e4 * rng.normal(size=(b, pad, v))], 1) for x in base]
    padded_labels = [np.concatenate([y, rng.integers(0, v, (b, pad))], 1) for y in labels]
    padded_mask = np.concatenate([mask, np.zeros((b, pad), np.int32)], 1)
    for name, fn in L.PAIRWISE_LOSSES.items():
        average = name == "ipo"
        a = [logps(x, labels[i % 2], mask, average) for i, x in enumerate(base)]
        p = [logps(x, padded_labels[i % 2], padded_mask, average) for i, x in enumerate(padded)]
        np.testing.assert_allclose(fn(*p).loss, fn(*a).loss, rtol=1e-6, err_msg=name)


def test_kto_reference_point_is_clamped_and_gradient_free():
    z0 = L.kto_reference_point(jnp.array([-5.0, -6.0]), jnp.array([-4.0, -4.0]))
    assert float(z0) == 0.0  # mean log-ratio -1.5 < 0 -> clamped
    grad = jax.grad(
        lambda k: L.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.array([1, 0]), k).loss.sum()
    )
    assert float(grad(0.3)) == 0.0


def test_kto_hand_computed():
    # r = 1.0, z0 = 0.5, beta = 0.5: desirable 1 - sigmoid(0.25); undesirable 1 - sigmoid(-0.25).
    out = L.kto_loss(
        jnp.array([-1.0, -1.0]),
        jnp.array([-2.0, -2.0]),
        jnp.array([True, False]),
        0.5,
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=3.0,
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    np.testing.assert_allclose(out.loss, [2 * (1 - sig(0.25)), 3 * (1 - sig(-0.25))], rtol=1e-6)
    np.testing.assert_allclose(out.rewards, [0.5, 0.5], rtol=1e-6)


def test_kto_loss_clamps_a_negative_kl_estimate_to_zero():
    # kto_loss clamps z0 itself (its docstring), whoever computed the estimate: a batch KL of
    # -0.8 (e.g. averaged across devices, unclamped) must act as z0 = 0. r = 1.5 and -0.5.
    beta = 0.5
    out = L.kto_loss(
        jnp.array([-1.0, -3.0, -1.0]),
        jnp.array([-2.5, -2.5, -2.5]),
        jnp.array([1, 1, 0]),
        jnp.array(-0.8),
        beta=beta,
        undesirable_weight=2.0,
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    z0 = 0.0
    want = [
        1 - sig(beta * (1.5 - z0)),
        1 - sig(beta * (-0.5 - z0)),
        2 * (1 - sig(beta * (z0 - 1.5))),
    ]
    np.testing.assert_allclose(out.loss, want, rtol=1e-6)
    # Not the unclamped value: with z0 = -0.8 the first loss would be 1 - sigmoid(1.15).
    assert abs(float(out.loss[0]) - (1 - sig(beta * (1.5 + 0.8)))) > 0.05


def test_sft_loss_uses_fractional_masks_as_weights():
    # The formula weighs each token by m_t: -sum_t m_t log p_t (/ sum_t m_t when averaged).
    lp = np.log(np.array([[0.5, 0.25, 0.125, 0.9], [0.5, 0.1, 0.2, 0.4]]))
    w = np.array([[1.0, 0.5, 0.0, 0.25], [0.125, 0.0, 2.0, 0.5]])
    weighted = (w * lp).sum(-1)
    lp32 = lp.astype(np.float32)
    np.testing.assert_allclose(L.sft_loss(lp32, w, average=False), -weighted, rtol=1e-6)
    np.testing.assert_allclose(L.sft_loss(lp32, w), -weighted / w.sum(-1), rtol=1e-6)


def test_orpo_log_odds_formula_and_limits():
    p_w, p_l = np.array([0.6, 0.1]), np.array([0.3, 0.1])
    expected = np.log(p_w / (1 - p_w)) - np.log(p_l / (1 - p_l))
    got = L.orpo_log_odds_ratio(np.log(p_w).astype(np.float32), np.log(p_l).astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # p -> 1 is clamped (finite loss and gradient) instead of infinite odds.
    loss, grad = jax.value_and_grad(lambda c: L.orpo_loss(c, jnp.array([-1.0])).loss.sum())(
        jnp.array([0.0])
    )
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_simpo_margin_shifts_the_logit():
    c, r = jnp.array([-0.5]), jnp.array([-1.0])
    # beta * (c - r) - gamma = 2.0 * 0.5 - 1.0 = 0 -> log 2.
    np.testing.assert_allclose(L.simpo_loss(c, r, beta=2.0, gamma=1.0).loss, [math.log(2)], 1e-6)


def test_sft_loss_mean_and_sum():
    lp = jnp.log(jnp.array([[0.5, 0.25, 0.125], [0.5, 0.5, 0.5]]))
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(L.sft_loss(lp, mask), [1.5 * math.log(2), 0.0], rtol=1e-6)
    np.testing.assert_allclose(
        L.sft_loss(lp, mask, average=False), [3 * math.log(2), 0.0], rtol=1e-6
    )


# --------------------------------------------------------------------- transformations, numerics


def _all_losses():
    """(id, callable of float arrays, example inputs) for every differentiable loss."""
    pc, pr, rc, rr = _pair_logps(13, batch=3, dtype=np.float32)
    avg_c, avg_r = pc / 10.0, pr / 12.0
    rng = np.random.default_rng(14)
    scores = rng.normal(size=(2, 3)).astype(np.float32)
    mask3 = np.array([[1, 1, 1], [1, 1, 0]])
    token_lp = np.log(rng.uniform(0.05, 0.9, (2, 4))).astype(np.float32)
    token_mask = np.array([[1, 1, 0, 1], [0, 1, 1, 0]])
    cases = [
        (name, lambda a, b, c, d, fn=fn: fn(a, b, c, d, beta=0.5).loss, (pc, pr, rc, rr))
        for name, fn in sorted(L.PAIRWISE_LOSSES.items())
    ]
    cases += [
        (
            "bradley_terry",
            lambda a, b: L.bradley_terry_loss(a, b, margin=0.3, label_smoothing=0.1),
            (avg_c, avg_r),
        ),
        ("plackett_luce", lambda s: L.plackett_luce_loss(s, mask=mask3), (scores,)),
        (
            "listwise_dpo",
            lambda s, r: L.listwise_dpo_loss(s, r, beta=0.5, mask=mask3).loss,
            (scores, scores[::-1].copy()),
        ),
        ("kto", lambda a, b: L.kto_loss(a, b, np.array([1, 0, 1]), 0.2, beta=0.5).loss, (pc, rc)),
        ("orpo", lambda a, b: L.orpo_loss(a, b).loss, (avg_c, avg_r)),
        ("simpo", lambda a, b: L.simpo_loss(a, b).loss, (avg_c, avg_r)),
        ("cpo", lambda a, b: L.cpo_loss(a, b, beta=0.5).loss, (avg_c, avg_r)),
        ("sft", lambda lp: L.sft_loss(lp, token_mask), (token_lp,)),
    ]
    return cases


ALL_LOSSES = _all_losses()


@pytest.mark.parametrize("name,fn,args", ALL_LOSSES, ids=[c[0] for c in ALL_LOSSES])
def test_jit_equals_eager(name, fn, args):
    np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,fn,args", ALL_LOSSES, ids=[c[0] for c in ALL_LOSSES])
def test_gradients_match_finite_differences(name, fn, args):
    with jax.enable_x64(True):
        args64 = tuple(np.asarray(a, np.float64) for a in args)
        loss = jax.jit(lambda *a: fn(*a).sum())
        check_grads(loss, args64, order=1, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("name,fn,args", ALL_LOSSES, ids=[c[0] for c in ALL_LOSSES])
def test_bfloat16_extreme_logps_stay_finite(name, fn, args):
    # Log-probs of -1e4 (long, unlikely responses) in bfloat16: float32 loss, finite values/grads.
    extreme = tuple(jnp.asarray(np.where(np.asarray(a) < 0, -1e4, a), jnp.bfloat16) for a in args)
    if name in ("plackett_luce", "listwise_dpo"):
        extreme = tuple(
            jnp.asarray(np.full_like(a, -1e4), jnp.bfloat16).at[:, 0].set(0.0) for a in args
        )

    def total(*a):
        loss = fn(*a)
        return loss.sum(), loss

    argnums = tuple(range(len(extreme)))
    (_, loss), grads = jax.jit(jax.value_and_grad(total, argnums, has_aux=True))(*extreme)
    assert loss.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(loss)))
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_pairwise_losses_share_dpo_signature():
    reference = inspect.signature(L.dpo_loss)
    for name, fn in L.PAIRWISE_LOSSES.items():
        params = inspect.signature(fn).parameters
        for p in reference.parameters.values():
            assert p.name in params, (name, p.name)
            assert params[p.name].kind == p.kind, (name, p.name)


@pytest.mark.parametrize(
    "name", ["ipo", "hinge", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"]
)
def test_label_smoothing_is_refused_where_undefined(name):
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.PAIRWISE_LOSSES[name](z, z, z, z, label_smoothing=0.1)


def test_bad_hyperparameters_and_shapes_raise_clear_errors():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        L.dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.robust_dpo_loss(z, z, z, z, label_smoothing=0.5)
    with pytest.raises(AssertionError):
        L.dpo_loss(z, jnp.zeros(3), z, z)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-50, 0, width=32), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_plackett_luce_masking_equals_slicing(values, keep):
    scores = np.asarray(values, np.float32)[None]  # [1, 6]: fixed shape, one compilation
    mask = np.asarray(keep)[None]
    got = plackett_luce(scores, mask=mask)
    np.testing.assert_allclose(got, plackett_luce_loop(scores, mask), rtol=1e-4, atol=1e-4)
    # Garbage in masked slots changes nothing.
    garbage = np.where(mask, scores, 1e6).astype(np.float32)
    np.testing.assert_allclose(plackett_luce(garbage, mask=mask), got, rtol=1e-6)
