"""Tests for prefjax.losses.policy_gradient: PPO policy/value losses, GRPO, REINFORCE, reducers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_reference_pg import ppo_policy_reference, value_loss_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from prefjax.losses import (
    LOSS_REDUCTIONS,
    constant_mean,
    entropy_bonus,
    grpo_loss,
    k3,
    ppo_policy_loss,
    reinforce_loss,
    sequence_mean,
    token_mean,
    value_loss,
)


def _random_case(seed, batch=3, seq=6, spread=0.5):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, size=(batch, seq)).astype(np.float32)
    new = (old + rng.normal(0.0, spread, size=(batch, seq))).astype(np.float32)  # ratios ~ e^+-0.5
    adv = rng.normal(size=(batch, seq)).astype(np.float32)
    mask = (rng.random((batch, seq)) < 0.75).astype(np.int32)
    return new, old, adv, mask


@pytest.mark.parametrize(
    "eps_low,eps_high,dual_clip",
    [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)],
    ids=["symmetric", "clip-higher", "dual-clip"],
)
def test_ppo_policy_loss_matches_loop_reference_under_jit(eps_low, eps_high, dual_clip):
    new, old, adv, mask = _random_case(0, spread=1.5)  # wide ratios: every branch is taken
    adv = adv * 3.0
    fn = jax.jit(
        lambda *a: ppo_policy_loss(
            *a, epsilon_low=eps_low, epsilon_high=eps_high, dual_clip=dual_clip
        )
    )
    out = fn(new, old, adv, mask)
    loss, clipped, approx_kl = ppo_policy_reference(
        new, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    np.testing.assert_allclose(out.loss, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.clipfrac, clipped)
    np.testing.assert_allclose(out.approx_kl, approx_kl, rtol=1e-5, atol=1e-6)
    assert 0 < clipped.sum() < mask.sum()  # the case exercises clipped and unclipped tokens


def test_ppo_at_ratio_one_is_minus_advantage_with_policy_gradient():
    _, old, adv, mask = _random_case(1)
    out = ppo_policy_loss(old, old, adv, mask)
    np.testing.assert_allclose(out.loss, -adv * mask, rtol=1e-6)
    assert np.all(np.asarray(out.clipfrac) == 0) and np.all(np.asarray(out.approx_kl) == 0)
    # The same array as logprobs and old_logprobs: old is a constant, d loss / d logp = -A.
    grad = jax.grad(lambda lp: ppo_policy_loss(lp, lp, adv, mask).loss.sum())(jnp.asarray(old))
    np.testing.assert_allclose(grad, -adv * mask, rtol=1e-6)


def test_ppo_clipfrac_dual_clip_and_asymmetric_hand_built():
    old = np.log(np.full((1, 5), 0.5, np.float32))
    # ratios 1.5, 1.5, 0.5, 0.5, 1.1
    new = np.log(np.array([[0.75, 0.75, 0.25, 0.25, 0.55]], np.float32))
    adv = np.array([[1.0, -1.0, 1.0, -1.0, 1.0]], np.float32)
    mask = np.ones((1, 5))
    out = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    # A > 0, r = 1.5: min(1.5, 1.2) -> clipped.  A < 0, r = 1.5: min(-1.5, -1.2) = -1.5 unclipped.
    # A > 0, r = 0.5: min(0.5, 0.8) = 0.5 unclipped.  A < 0, r = 0.5: min(-0.5, -0.8) -> clipped.
    np.testing.assert_allclose(out.loss, [[-1.2, 1.5, -0.5, 0.8, -1.1]], rtol=1e-6)
    np.testing.assert_array_equal(out.clipfrac, [[1, 0, 0, 1, 0]])
    r = np.array([1.5, 1.5, 0.5, 0.5, 1.1])
    np.testing.assert_allclose(out.approx_kl[0], (r - 1) - np.log(r), rtol=1e-5)
    # Clip-higher: epsilon_high = 0.6 leaves r = 1.5 inside the range.
    high = ppo_policy_loss(new, old, adv, mask, epsilon_low=0.2, epsilon_high=0.6)
    np.testing.assert_allclose(high.loss, [[-1.5, 1.5, -0.5, 0.8, -1.1]], rtol=1e-6)
    # Dual clip c = 1.3 bounds the A < 0, r = 1.5 loss 1.5 by c * |A| = 1.3.
    dual = ppo_policy_loss(new, old, adv, mask, dual_clip=1.3)
    np.testing.assert_allclose(dual.loss, [[-1.2, 1.3, -0.5, 0.8, -1.1]], rtol=1e-6)
    np.testing.assert_array_equal(dual.clipfrac, [[1, 1, 0, 1, 0]])


def test_value_loss_matches_loop_reference_under_jit_and_hand_case():
    rng = np.random.default_rng(2)
    values, old_values, returns = rng.normal(size=(3, 3, 6)).astype(np.float32)
    mask = (rng.random((3, 6)) < 0.75).astype(np.int32)
    out = jax.jit(lambda *a: value_loss(*a, clip_eps=0.2))(values, old_values, returns, mask)
    ref = value_loss_reference(values, old_values, returns, mask, clip_eps=0.2)
    np.testing.assert_allclose(out.loss, ref, rtol=1e-5, atol=1e-6)
    unclipped = value_loss(values, old_values, returns, mask, clip_eps=None).loss
    np.testing.assert_allclose(unclipped, 0.5 * (values - returns) ** 2 * mask, rtol=1e-5)
    # Hand case: v moved 1.0 from old 0 toward R = 2, clip keeps 0.2: 0.5 * (0.2 - 2)^2 = 1.62.
    hand = value_loss(np.array([[1.0]]), np.array([[0.0]]), np.array([[2.0]]), np.ones((1, 1)))
    np.testing.assert_allclose(hand.loss, [[1.62]], rtol=1e-6)
    np.testing.assert_array_equal(hand.clipfrac, [[1.0]])


def test_grpo_loss_identities_and_reductions():
    new, old, _, mask = _random_case(3)
    ref = old - 0.3
    seq_adv = np.array([1.0, -0.5, 2.0], np.float32)
    out = grpo_loss(new, old, ref, seq_adv, mask, clip_eps=0.2, beta=0.04)
    ppo = ppo_policy_loss(new, old, np.broadcast_to(seq_adv[:, None], new.shape), mask)
    np.testing.assert_allclose(out.policy_loss, ppo.loss, rtol=1e-6)
    np.testing.assert_allclose(out.kl, k3(new, ref, mask), rtol=1e-6)
    np.testing.assert_allclose(out.loss, ppo.loss + 0.04 * out.kl, rtol=1e-6)
    # Policy = old = reference: the loss is -A on every real token and the KL term vanishes.
    same = grpo_loss(old, old, old, seq_adv, mask, beta=0.04)
    np.testing.assert_allclose(same.loss, -seq_adv[:, None] * mask, rtol=1e-6)
    # The two reductions, by hand: per-sequence means then batch mean vs all-token mean.
    loss = np.asarray(out.loss, np.float64)
    per_seq = [loss[b][mask[b] == 1].mean() if mask[b].any() else 0.0 for b in range(3)]
    np.testing.assert_allclose(sequence_mean(out.loss, mask), np.mean(per_seq), rtol=1e-5)
    np.testing.assert_allclose(token_mean(out.loss, mask), loss[mask == 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(constant_mean(out.loss, mask), loss.sum() / loss.size, rtol=1e-5)
    assert set(LOSS_REDUCTIONS) == {"sequence_mean", "token_mean", "constant_mean"}


def test_reductions_weigh_sequences_vs_tokens_hand_computed():
    loss = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert float(sequence_mean(loss, mask)) == pytest.approx((1.0 + 4.0) / 2)
    assert float(token_mean(loss, mask)) == pytest.approx(8.0 / 5)
    assert float(constant_mean(loss, mask, normalizer=16.0)) == pytest.approx(0.5)


def test_token_and_constant_mean_use_fractional_masks_as_weights():
    # Their formulas weigh each token by m_{i,t}; e.g. a 0.5 marks a token that counts half.
    # (sequence_mean's formula is a plain per-sequence mean over |o_i| tokens: no weight claim.)
    loss = np.array([[1.0, 2.0, np.nan, 4.0], [3.0, -1.0, 5.0, np.nan]], np.float32)
    w = np.array([[0.5, 1.0, 0.0, 0.25], [2.0, 0.5, 0.125, 0.0]], np.float32)
    weighted_sum = 0.5 * 1 + 2.0 + 0.25 * 4 + 2 * 3 - 0.5 + 0.125 * 5  # 9.625
    total_weight = 0.5 + 1.0 + 0.25 + 2.0 + 0.5 + 0.125  # 4.375
    np.testing.assert_allclose(token_mean(loss, w), weighted_sum / total_weight, rtol=1e-6)
    np.testing.assert_allclose(constant_mean(loss, w), weighted_sum / 8, rtol=1e-6)
    np.testing.assert_allclose(constant_mean(loss, w, normalizer=5.0), weighted_sum / 5, rtol=1e-6)


def test_reinforce_loss_gradient_is_minus_advantage():
    new, _, adv, mask = _random_case(4)
    loss = reinforce_loss(new, adv, mask)
    np.testing.assert_allclose(loss, -adv * new * mask, rtol=1e-6)
    grad = jax.grad(lambda lp: reinforce_loss(lp, adv, mask).sum())(jnp.asarray(new))
    np.testing.assert_allclose(grad, -adv * mask, rtol=1e-6)
    seq = reinforce_loss(new, adv[:, 0], mask)  # a [batch] advantage broadcasts over tokens
    np.testing.assert_allclose(seq, -adv[:, :1] * new * mask, rtol=1e-6)


def test_entropy_bonus():
    h = np.array([[2.0, 1.0, np.nan]])
    np.testing.assert_allclose(
        entropy_bonus(h, np.array([[1, 1, 0]]), entropy_coef=0.01), [[-0.02, -0.01, 0.0]]
    )


@pytest.mark.parametrize("name", ["ppo", "ppo_dual", "value", "grpo", "reinforce"])
def test_gradients_match_finite_differences(name):
    # Points away from the clip kinks: ratios e^{+-0.05} inside 1 +- 0.2, and e^{0.6} outside.
    old = jnp.array([[-1.0, -2.0, -0.5, -1.5]])
    lp = old + jnp.array([[0.05, -0.05, 0.6, -0.6]])
    adv = jnp.array([[1.0, -2.0, 0.5, -1.5]])
    mask = jnp.array([[1, 1, 1, 0]])
    fns = {
        "ppo": lambda x: ppo_policy_loss(x, old, adv, mask).loss,
        "ppo_dual": lambda x: ppo_policy_loss(x, old, -adv, mask, dual_clip=1.5).loss,
        "value": lambda x: value_loss(x, old, old + 1.0, mask, clip_eps=0.2).loss,
        "grpo": lambda x: grpo_loss(x, old, old - 0.3, adv[:, 0], mask, beta=0.1).loss,
        "reinforce": lambda x: reinforce_loss(x, adv, mask),
    }
    check_grads(fns[name], (lp,), order=1, modes=["rev"], eps=1e-3)


def test_padding_invariance_and_fully_masked_rows():
    new, old, adv, _ = _random_case(5, batch=2, seq=4)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])  # second row fully masked
    out = ppo_policy_loss(new, old, adv, mask)
    assert np.all(np.asarray(out.loss[1]) == 0) and np.isfinite(float(token_mean(out.loss, mask)))

    def pad(x):  # three padding tokens holding NaN: garbage there must not leak
        return np.concatenate([x, np.full((2, 3), np.nan, np.float32)], axis=1)

    mask_p = np.concatenate([mask, np.zeros((2, 3), np.int32)], axis=1)
    seq_adv = np.array([1.0, 2.0], np.float32)
    cases = {  # name: (loss of (logprobs, mask, padded?) )
        "ppo": lambda lp, m, p: ppo_policy_loss(lp, p(old), p(adv), m).loss,
        "grpo": lambda lp, m, p: grpo_loss(lp, p(old), p(old) - 0.1, seq_adv, m, beta=0.1).loss,
        "reinforce": lambda lp, m, p: reinforce_loss(lp, p(adv), m),
        "value": lambda lp, m, p: value_loss(lp, p(old), p(adv), m).loss,
    }
    for name, loss_fn in cases.items():
        short = loss_fn(new, mask, lambda x: x)
        long = loss_fn(pad(new), mask_p, pad)
        np.testing.assert_allclose(long[:, :4], short, rtol=1e-6, err_msg=name)
        assert np.all(np.asarray(long)[mask_p == 0] == 0.0), name
        for reduce in (sequence_mean, token_mean):
            np.testing.assert_allclose(reduce(long, mask_p), reduce(short, mask), err_msg=name)
        assert np.isfinite(float(constant_mean(long, mask_p))), name
        grad = jax.grad(lambda x, f=loss_fn: token_mean(f(x, mask_p, pad), mask_p))(pad(new))
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask_p == 0] == 0), name


def test_bfloat16_extreme_logprobs_stay_finite():
    lp = jnp.array([[-1e4, -1e4, 0.0, -1.0]], jnp.bfloat16)
    old = jnp.array([[-1e4, 0.0, -1e4, -1.0]], jnp.bfloat16)
    adv = jnp.array([[1.0, -1.0, -1.0, 1.0]], jnp.bfloat16)
    mask = jnp.ones((1, 4))
    outs = [
        ppo_policy_loss(lp, old, adv, mask),
        ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0),
        grpo_loss(lp, old, old, adv[:, 0], mask, beta=0.04),
    ]
    for out in outs:
        for field in out:
            assert field.dtype == jnp.float32 and np.all(np.isfinite(field))
    grad = jax.grad(lambda x: token_mean(grpo_loss(x, old, old, adv, mask).loss, mask))(lp)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_bad_hyperparameters_are_clear_errors():
    x = np.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(x, x, x, x, clip_eps=-0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(x, x, x, x, clip_eps=0.0)
    with pytest.raises(AssertionError):  # chex names the mismatched shapes
        ppo_policy_loss(x, np.zeros((1, 3)), x, x)


_ppo_jit = jax.jit(ppo_policy_loss)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_masking_and_reduction_contract_property(seed, masked_fraction):
    """Masked tokens give 0 whatever they hold; token_mean equals the mean over real tokens and
    sequence_mean the mean of per-row means, each row alone equal to its sliced real tokens."""
    rng = np.random.default_rng(seed)
    new, old, adv, _ = _random_case(seed % 1000, batch=3, seq=5, spread=0.5)
    mask = rng.random((3, 5)) >= masked_fraction
    out = _ppo_jit(new, old, adv, mask)
    noise = rng.normal(size=new.shape).astype(np.float32) * 1e3
    out2 = _ppo_jit(np.where(mask, new, noise), np.where(mask, old, -noise), adv, mask)
    for a, b in zip(out, out2, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.asarray(a)[~mask] == 0.0)
    loss = np.asarray(out.loss, np.float64)
    expected_token = loss[mask].mean() if mask.any() else 0.0
    np.testing.assert_allclose(token_mean(out.loss, mask), expected_token, rtol=1e-5, atol=1e-7)
    rows = [loss[b][mask[b]].mean() if mask[b].any() else 0.0 for b in range(3)]
    np.testing.assert_allclose(sequence_mean(out.loss, mask), np.mean(rows), rtol=1e-5, atol=1e-7)
