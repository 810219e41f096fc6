"""Tests for prefjax.losses.kl: k1/k2/k3 estimators, KL-shaped rewards, adaptive KL controller."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from prefjax.losses import (
    KL_ESTIMATORS,
    adaptive_kl_init,
    adaptive_kl_update,
    k1,
    k2,
    k3,
    kl_estimate,
    kl_shaped_rewards,
)

# A small categorical pair: policy p, reference q over five tokens.
P = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
Q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
EXACT_KL = float(np.sum(P * np.log(P / Q)))  # KL(p || q)


def test_estimators_hand_computed():
    lp = np.array([[-1.0, -3.0, -0.5]], np.float32)
    ref = np.array([[-2.0, -2.0, -0.5]], np.float32)
    log_ratio = lp - ref  # log pi - log pi_ref
    np.testing.assert_allclose(k1(lp, ref), log_ratio, rtol=1e-6)
    np.testing.assert_allclose(k2(lp, ref), 0.5 * log_ratio**2, rtol=1e-6)
    np.testing.assert_allclose(k3(lp, ref), np.exp(-log_ratio) - 1 + log_ratio, rtol=1e-6)
    for kind, fn in KL_ESTIMATORS.items():
        np.testing.assert_array_equal(kl_estimate(lp, ref, kind=kind), fn(lp, ref))


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_have_exact_kl_expectation(kind):
    # E_{y ~ p}[k(y)] computed exactly over the five outcomes equals KL(p || q).
    est = kl_estimate(np.log(P)[None], np.log(Q)[None], kind=kind)[0]
    np.testing.assert_allclose(float(np.sum(P * np.asarray(est))), EXACT_KL, rtol=1e-5)


def test_estimators_by_sampling_categorical():
    rng = np.random.default_rng(0)
    n = 200_000
    y = rng.choice(len(P), size=n, p=P)
    lp, ref = np.log(P)[y].astype(np.float32), np.log(Q)[y].astype(np.float32)
    for kind in ("k1", "k3"):  # unbiased: the sample mean is within 4 standard errors of KL
        samples = np.asarray(kl_estimate(lp, ref, kind=kind), np.float64)
        stderr = samples.std() / math.sqrt(n)
        assert abs(samples.mean() - EXACT_KL) < 4 * stderr, kind
    # k3 has lower variance than k1 here (Schulman 2020), and k2, k3 are never negative.
    assert np.var(k3(lp, ref)) < np.var(k1(lp, ref))
    assert np.all(np.asarray(k2(lp, ref)) >= 0) and np.all(np.asarray(k3(lp, ref)) >= 0)
    # k2 is biased: its expectation is E_p[0.5 log^2(p/q)], not the KL.
    k2_expect = float(np.sum(P * 0.5 * np.log(P / Q) ** 2))
    assert abs(np.mean(np.asarray(k2(lp, ref), np.float64)) - k2_expect) < 0.01
    assert abs(k2_expect - EXACT_KL) > 0.01


def test_mask_removes_garbage_with_finite_gradients():
    lp = jnp.array([[-1.0, jnp.inf, jnp.nan]])
    ref = jnp.array([[-2.0, -jnp.inf, 0.0]])
    mask = jnp.array([[1, 0, 0]])
    for kind in KL_ESTIMATORS:
        out = kl_estimate(lp, ref, kind=kind, mask=mask)
        assert np.all(np.isfinite(out)) and float(out[0, 1]) == 0.0 == float(out[0, 2])
        grad = jax.grad(lambda x, kind=kind: kl_estimate(x, ref, kind=kind, mask=mask).sum())(lp)
        assert np.all(np.isfinite(grad)), kind


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_gradients_match_finite_differences(kind):
    lp = jnp.array([[-1.0, -0.3, -2.0]])
    ref = jnp.array([[-1.5, -0.2, -1.0]])
    check_grads(lambda x: kl_estimate(x, ref, kind=kind), (lp,), order=1, modes=["rev"], eps=1e-3)


def test_bfloat16_extreme_logprobs_stay_finite():
    # Policy and reference disagree by 1e4 nats both ways, and agree at -1e4.
    lp = jnp.array([[-1e4, -1.0, -1e4]], jnp.bfloat16)
    ref = jnp.array([[-1.0, -1e4, -1e4]], jnp.bfloat16)
    for kind in KL_ESTIMATORS:
        out = kl_estimate(lp, ref, kind=kind)
        grad = jax.grad(lambda x, kind=kind: kl_estimate(x, ref, kind=kind).sum())(lp)
        assert out.dtype == jnp.float32 and np.all(np.isfinite(out)), kind
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), kind
        assert float(out[0, 2]) == 0.0
    assert float(k3(lp, ref)[0, 0]) == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-5)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(np.zeros(2), np.zeros(2), kind="k4")


def test_kl_shaped_rewards_hand_computed_right_and_left_padding():
    lp = np.array([[-1.0, -2.0, -1.0, 0.0], [0.0, -1.0, -1.0, -3.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -1.0, 0.0], [0.0, -2.0, -1.0, -1.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])  # right padding, then left padding
    scores = np.array([2.0, -1.0], np.float32)
    beta = 0.1
    out = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=beta)
    kl = (lp - ref) * mask  # k1 per token
    expected = -beta * kl
    expected[0, 2] += 2.0  # last real token of row 0
    expected[1, 3] += -1.0  # last real token of row 1
    np.testing.assert_allclose(out.rewards, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.kl, kl, rtol=1e-6)
    # Summed over a response: score - beta * KL, the objective of Ziegler et al. (2019), Eq. 2.
    np.testing.assert_allclose(out.rewards.sum(-1), scores - beta * kl.sum(-1), rtol=1e-6)


def test_kl_shaped_rewards_fully_masked_row_and_padding_invariance():
    lp = np.array([[-1.0, -2.0], [-1.0, -1.0]], np.float32)
    ref = np.array([[-1.5, -1.0], [-3.0, -3.0]], np.float32)
    mask = np.array([[1, 1], [0, 0]])
    out = kl_shaped_rewards(np.array([1.0, 5.0]), lp, ref, mask, kl_coef=0.2, kind="k3")
    assert np.all(np.asarray(out.rewards[1]) == 0.0)  # no real token: no score, no penalty
    pad = np.full((2, 2), np.nan, np.float32)
    padded = kl_shaped_rewards(
        np.array([1.0, 5.0]),
        np.concatenate([lp, pad], 1),
        np.concatenate([ref, pad], 1),
        np.concatenate([mask, np.zeros((2, 2), int)], 1),
        kl_coef=0.2,
        kind="k3",
    )
    np.testing.assert_allclose(padded.rewards[:, :2], out.rewards, rtol=1e-6)
    assert np.all(np.asarray(padded.rewards[:, 2:]) == 0.0)


def test_adaptive_kl_controller_formula_and_direction():
    beta0, target, horizon, n = 0.1, 6.0, 100.0, 8
    state = adaptive_kl_init(beta0)
    for kl, error in [(6.6, 0.1), (12.0, 0.2), (1.0, -0.2), (6.0, 0.0)]:  # clip at +-0.2
        new = adaptive_kl_update(state, kl, target=target, horizon=horizon, n_steps=n)
        expected = float(state.kl_coef) * (1 + error * n / horizon)
        np.testing.assert_allclose(float(new.kl_coef), expected, rtol=1e-6)
        state = new
    # Pure and jit/scan-safe: KL persistently above target makes beta grow geometrically.
    update = jax.jit(lambda s, kl: adaptive_kl_update(s, kl, target=1.0, horizon=10.0))
    state = adaptive_kl_init(1.0)
    for _ in range(5):
        state = update(state, jnp.float32(5.0))
    np.testing.assert_allclose(float(state.kl_coef), (1 + 0.2 / 10) ** 5, rtol=1e-6)
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_update(state, 1.0, target=0.0)
