"""Tests for prefjax.losses.logprobs: log-probs, reductions, whitening, entropy, chunked path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import log_softmax, trl_masked_whiten
from _reference import token_logprobs as np_token_logprobs
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import prefjax.losses as L

# Jitted handles for fixed-shape property tests (one compilation for every example).
masked_mean = jax.jit(L.masked_mean, static_argnames=("axis", "keepdims"))
masked_sum = jax.jit(L.masked_sum, static_argnames=("axis", "keepdims"))
masked_whiten = jax.jit(L.masked_whiten, static_argnames=("shift_mean", "axis", "unbiased"))


def _lm_case(seed, batch=3, seq=6, vocab=11):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(batch, seq, vocab))).astype(np.float32)
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = (rng.random((batch, seq)) < 0.7).astype(np.int32)
    return logits, labels, mask


# ------------------------------------------------------------------------------ token log-probs


def test_token_logprobs_matches_numpy_log_softmax():
    logits, labels, _ = _lm_case(0)
    got = L.token_logprobs(logits, labels)
    assert got.shape == labels.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_token_logprobs(logits, labels), rtol=1e-5, atol=1e-5)


def test_token_logprobs_bfloat16_upcasts_and_ignore_index_gives_zero():
    logits, labels, _ = _lm_case(1)
    got = L.token_logprobs(jnp.asarray(logits, jnp.bfloat16), labels)
    assert got.dtype == jnp.float32
    ref = np_token_logprobs(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), labels)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    labels = labels.copy()
    labels[0, :2] = -100  # Hugging Face's ignore index
    labels[1, 0] = 11  # == vocab, out of range
    got = L.token_logprobs(logits, labels)
    assert np.all(np.asarray(got)[0, :2] == 0) and float(got[1, 0]) == 0.0


def test_token_logprobs_rejects_float_labels_and_bad_shapes():
    logits, labels, _ = _lm_case(2)
    with pytest.raises(TypeError, match="integer"):
        L.token_logprobs(logits, labels.astype(np.float32))
    with pytest.raises(AssertionError):
        L.token_logprobs(logits, labels[:, :-1])


def test_shift_labels_is_next_token_alignment():
    logits, ids, mask = _lm_case(3)
    lg, lb, m = L.shift_labels(logits, ids, mask)
    np.testing.assert_array_equal(lg, logits[:, :-1])
    np.testing.assert_array_equal(lb, ids[:, 1:])
    np.testing.assert_array_equal(m, mask[:, 1:])
    # logits at t score token t + 1
    np.testing.assert_allclose(
        L.token_logprobs(lg, lb)[:, 0],
        log_softmax(logits[:, 0])[np.arange(3), ids[:, 1]],
        rtol=1e-5,
    )


# --------------------------------------------------------------------------- sequence log-probs


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logprobs_matches_numpy_and_ignores_padding(average):
    logits, labels, mask = _lm_case(4)
    lp = np_token_logprobs(logits, labels) * mask
    expected = lp.sum(-1) / (mask.sum(-1) if average else 1)
    fn = jax.jit(L.sequence_logprobs, static_argnames="average")
    got = fn(logits, labels, mask, average=average)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Pad every row with 3 positions of huge logits and arbitrary labels under mask 0.
    rng = np.random.default_rng(5)
    pad_logits = np.concatenate([logits, 1e30 * rng.normal(size=(3, 3, 11))], 1).astype(np.float32)
    pad_labels = np.concatenate([labels, rng.integers(-100, 11, (3, 3))], 1).astype(np.int32)
    pad_mask = np.concatenate([mask, np.zeros((3, 3), np.int32)], 1)
    np.testing.assert_allclose(fn(pad_logits, pad_labels, pad_mask, average=average), got)


def test_fully_masked_sequence_gives_zero_not_nan_with_finite_gradient():
    logits, labels, _ = _lm_case(6)
    mask = np.zeros(labels.shape, np.int32)
    for average in (False, True):
        fn = jax.jit(
            jax.value_and_grad(
                lambda x, a=average: L.sequence_logprobs(x, labels, mask, average=a).sum()
            )
        )
        value, grad = fn(logits)
        assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


# ------------------------------------------------------------------------------------ entropy


def test_entropy_limits_and_reference():
    np.testing.assert_allclose(L.entropy(jnp.zeros((1, 2, 7))), math.log(7), rtol=1e-6)
    one_hot = jnp.array([[[0.0, -jnp.inf, -jnp.inf]]])
    value, grad = jax.jit(jax.value_and_grad(lambda z: L.entropy(z).sum()))(one_hot)
    assert float(value) == 0.0 and np.all(np.isfinite(grad))
    logits, _, _ = _lm_case(7)
    p = np.exp(log_softmax(logits))
    np.testing.assert_allclose(
        L.entropy(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32, True
    )
    np.testing.assert_allclose(L.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)


# ------------------------------------------------------------------------- masked reductions


def test_masked_mean_axes_and_all_masked():
    x = np.array([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], np.float32)
    m = np.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(L.masked_mean(x, m, axis=-1), [1.5, 0.0])
    np.testing.assert_allclose(L.masked_mean(x, m), 1.5)
    np.testing.assert_allclose(L.masked_mean(x, m, axis=0), [1.0, 2.0, 0.0])
    np.testing.assert_allclose(L.masked_sum(x, m, axis=-1, keepdims=True), [[3.0], [0.0]])
    value, grad = jax.value_and_grad(lambda v: L.masked_mean(v, np.zeros_like(m)))(x)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_masked_reductions_ignore_nan_and_inf_under_the_mask():
    x = jnp.array([[1.0, jnp.nan, jnp.inf, -jnp.inf]])
    m = jnp.array([[1, 0, 0, 0]])
    value, grad = jax.value_and_grad(lambda v: L.masked_mean(v, m) + L.masked_sum(v, m))(x)
    assert float(value) == 2.0
    np.testing.assert_array_equal(grad, [[2.0, 0.0, 0.0, 0.0]])


def test_masked_mean_rejects_unbroadcastable_mask():
    with pytest.raises(ValueError, match="does not broadcast"):
        L.masked_mean(jnp.zeros((2, 3)), jnp.ones((3, 2)))


def test_masked_whiten_matches_trl_on_masked_positions():
    rng = np.random.default_rng(8)
    x = rng.normal(2.0, 3.0, (4, 6))
    m = (rng.random((4, 6)) < 0.6).astype(np.float64)
    for shift_mean in (True, False):
        want = trl_masked_whiten(x, m, shift_mean=shift_mean)
        got = L.masked_whiten(x.astype(np.float32), m, shift_mean=shift_mean)
        np.testing.assert_allclose(np.asarray(got)[m == 1], want[m == 1], rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got)[m == 0] == 0)


def test_masked_whiten_per_row_and_degenerate_cases():
    x = jnp.array([[1.0, 2.0, 3.0, 40.0], [5.0, 5.0, 7.0, 7.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    rows = masked_whiten(x, m, axis=-1)
    np.testing.assert_allclose(rows[0, :3], [-1.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(L.masked_mean(rows, m, axis=-1), [0.0, 0.0], atol=1e-6)
    # All masked, or a single valid value: finite, zero output, finite gradients.
    value_and_grad = jax.jit(jax.value_and_grad(lambda v, mk: L.masked_whiten(v, mk).sum()))
    for mask in (jnp.zeros((2, 4)), jnp.zeros((2, 4)).at[0, 0].set(1)):
        value, grad = value_and_grad(x, mask)
        assert np.isfinite(value) and np.all(np.isfinite(grad))


# Non-binary masks act as weights (the module docstring: "reductions weight by it"; masked_sum
# and masked_mean say so, the formulas of masked_var, masked_whiten and sequence_logprobs carry
# m_i). Row 0 weighs more than one token in all (Bessel's factor n / (n - 1) applies), row 1 less
# than one (the factor is skipped), and the NaN sits where the weight is 0.
_WEIGHTED_X = np.array([[1.0, -2.0, np.nan, 4.0, 0.5], [3.0, np.nan, -1.0, 2.0, 7.0]], np.float32)
_WEIGHTS = np.array([[0.5, 1.0, 0.0, 0.25, 2.0], [0.25, 0.0, 0.5, 0.0, 0.125]], np.float32)


def _weighted_stats_by_hand(x, w):
    """Per-row weighted sum, mean, biased variance and Bessel factor (n = sum of weights)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    x = np.where(w != 0, x, 0.0)  # the NaNs carry weight 0
    n = w.sum(-1)
    total = (w * x).sum(-1)
    mean = total / n
    biased_var = (w * (x - mean[:, None]) ** 2).sum(-1) / n
    bessel = np.array([k / (k - 1) if k > 1 else 1.0 for k in n])
    return total, mean, biased_var, bessel


def test_masked_reductions_use_fractional_masks_as_weights():
    x, w = _WEIGHTED_X, _WEIGHTS
    total, mean, biased_var, bessel = _weighted_stats_by_hand(x, w)
    np.testing.assert_allclose(total, [0.5 * 1 - 2 + 0.25 * 4 + 2 * 0.5, 0.25 * 3 - 0.5 + 7 / 8])
    np.testing.assert_allclose(bessel, [3.75 / 2.75, 1.0])  # row 1 weighs 0.875 <= 1: no factor
    np.testing.assert_allclose(L.masked_sum(x, w, axis=-1), total, rtol=1e-6)
    np.testing.assert_allclose(L.masked_mean(x, w, axis=-1), mean, rtol=1e-6)
    pooled = total.sum() / w.sum()  # axis=None: one weighted mean over the whole batch
    np.testing.assert_allclose(L.masked_mean(x, w), pooled, rtol=1e-6)
    np.testing.assert_allclose(L.masked_var(x, w, axis=-1), bessel * biased_var, rtol=1e-5)
    got = L.masked_var(x, w, axis=-1, unbiased=False)
    np.testing.assert_allclose(got, biased_var, rtol=1e-5)


def test_masked_whiten_takes_weighted_statistics_and_does_not_scale_by_the_weight():
    x, w = _WEIGHTED_X, _WEIGHTS
    _, mean, biased_var, bessel = _weighted_stats_by_hand(x, w)
    var = bessel * biased_var
    eps = 1e-8
    want = np.where(w != 0, (x - mean[:, None]) / np.sqrt(var[:, None] + eps), 0.0)
    got = L.masked_whiten(x, w, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    unshifted = np.where(w != 0, want + mean[:, None], 0.0)
    got = L.masked_whiten(x, w, axis=-1, shift_mean=False)
    np.testing.assert_allclose(got, unshifted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logprobs_weights_tokens_by_a_fractional_mask(average):
    logits, labels, _ = _lm_case(9, batch=2, seq=5)
    w = _WEIGHTS
    lp = np_token_logprobs(logits, labels)  # [batch, seq], float64
    weighted = (w * lp).sum(-1)  # sum_t m_t log p_t
    want = weighted / w.sum(-1) if average else weighted
    got = L.sequence_logprobs(logits, labels, w, average=average)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reductions_gradients_match_finite_differences():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 5))
    m = (rng.random((3, 5)) < 0.6).astype(np.float64)
    m[0] = 0.0  # one fully masked row
    with jax.enable_x64(True):
        for fn in (
            lambda v: L.masked_mean(v, m, axis=-1).sum(),
            lambda v: (L.masked_whiten(v, m) * np.arange(5.0)).sum(),
        ):
            check_grads(jax.jit(fn), (x,), order=1, modes=("rev",), eps=1e-5)
        logits, labels, mask = _lm_case(10)
        check_grads(
            jax.jit(lambda z: L.sequence_logprobs(z, labels, mask, average=True).sum()),
            (logits.astype(np.float64),),
            order=1,
            modes=("rev",),
        )
        check_grads(
            jax.jit(lambda z: L.entropy(z).sum()), (logits.astype(np.float64),), 1, ("rev",)
        )


def test_bfloat16_extreme_logits_stay_finite():
    logits, labels, mask = _lm_case(11)
    extreme = jnp.asarray(np.where(logits > 0, 1e4, -1e4), jnp.bfloat16)

    def total(z):
        return L.sequence_logprobs(z, labels, mask, average=True).sum() + L.entropy(z).sum()

    value, grad = jax.jit(jax.value_and_grad(total))(extreme)
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))


# ---------------------------------------------------------------------- property tests (masks)

_ROW = st.lists(st.floats(-1e3, 1e3, width=32), min_size=8, max_size=8)
_MASK = st.lists(st.booleans(), min_size=8, max_size=8)


@settings(max_examples=25, deadline=None)
@given(_ROW, _MASK, st.floats(-1e6, 1e6, width=32))
def test_masking_equals_slicing(values, keep, garbage):
    x = np.asarray(values, np.float32)
    m = np.asarray(keep)
    kept = x[m]
    # Reductions see only the kept values; what sits under the mask is irrelevant.
    x_garbage = np.where(m, x, np.float32(garbage))
    got_mean = masked_mean(x_garbage, m)
    got_sum = masked_sum(x_garbage, m)
    want_mean = kept.mean(dtype=np.float64) if kept.size else 0.0
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got_sum, kept.sum(dtype=np.float64), rtol=1e-5, atol=1e-2)


@settings(max_examples=25, deadline=None)
@given(_ROW, _MASK)
def test_whitened_values_have_zero_mean_unit_variance(values, keep):
    x = np.asarray(values, np.float32)
    m = np.asarray(keep)
    w = np.asarray(masked_whiten(x, m))
    assert np.all(np.isfinite(w)) and np.all(w[~m] == 0)
    kept = x[m].astype(np.float64)
    if kept.size >= 2 and kept.std() > 1e-2:
        np.testing.assert_allclose(w[m].mean(), 0.0, atol=1e-4)
        np.testing.assert_allclose(w[m].std(ddof=1), 1.0, rtol=1e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_sequence_logprobs_padding_invariance_property(seed, pad):
    # Right-padding to a fixed total length (8) never changes the summed or averaged log-prob.
    rng = np.random.default_rng(seed)
    seq = 8 - pad
    logits = rng.normal(size=(2, 8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 8)).astype(np.int32)
    mask = (rng.random((2, 8)) < 0.7).astype(np.int32)
    mask[:, seq:] = 0
    noisy = logits.copy()
    noisy[:, seq:] = rng.normal(size=(2, pad, 5)) * 1e3
    for average in (False, True):
        np.testing.assert_allclose(
            _seq_logps(noisy, labels, mask, average), _seq_logps(logits, labels, mask, average)
        )


_seq_logps = jax.jit(
    lambda logits, labels, mask, average: L.sequence_logprobs(
        logits, labels, mask, average=average
    ),
    static_argnums=3,
)


# ------------------------------------------------------------------------- chunked log-probs


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 100], ids=lambda c: f"chunk{c}")
def test_chunked_token_logprobs_equals_plain_values_and_gradients(chunk_size):
    rng = np.random.default_rng(12)
    h = rng.normal(size=(2, 6, 8)).astype(np.float32)
    w = rng.normal(size=(8, 13)).astype(np.float32)
    y = rng.integers(0, 13, (2, 6)).astype(np.int32)
    y[1, -1] = -100  # ignore index -> 0 on both paths
    weights = rng.normal(size=(2, 6)).astype(np.float32)

    def chunked(h, w):
        return (L.chunked_token_logprobs(h, w, y, chunk_size=chunk_size) * weights).sum()

    def plain(h, w):
        return (L.token_logprobs(h @ w, y) * weights).sum()

    got = jax.jit(jax.value_and_grad(chunked, (0, 1)))(h, w)
    want = jax.jit(jax.value_and_grad(plain, (0, 1)))(h, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, x in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, x, rtol=1e-4, atol=1e-5)


def test_chunked_token_logprobs_finite_differences_and_bfloat16():
    rng = np.random.default_rng(13)
    h = rng.normal(size=(2, 3, 4))
    w = rng.normal(size=(4, 6))
    y = rng.integers(0, 6, (2, 3)).astype(np.int32)
    with jax.enable_x64(True):
        check_grads(
            jax.jit(lambda h, w: L.chunked_token_logprobs(h, w, y, chunk_size=4).sum()),
            (h, w),
            order=1,
            modes=("rev",),
        )
    hb, wb = jnp.asarray(100 * h, jnp.bfloat16), jnp.asarray(100 * w, jnp.bfloat16)
    got = L.chunked_token_logprobs(hb, wb, y, chunk_size=4)
    assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
    ref = np_token_logprobs(np.asarray(hb, np.float64) @ np.asarray(wb, np.float64), y)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1.0)


def test_chunked_token_logprobs_never_materialises_full_logits():
    # Compiled temporary memory of value-and-grad: the plain path holds [B, T, V] float32 logits
    # (and their gradient); the chunked path only [chunk, V] at a time.
    batch, seq, d_model, vocab, chunk = 2, 64, 16, 8192, 16
    shapes = (
        jax.ShapeDtypeStruct((batch, seq, d_model), jnp.float32),
        jax.ShapeDtypeStruct((d_model, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
    )
    full_logits_bytes = batch * seq * vocab * 4

    def temp_bytes(fn):
        grad = jax.grad(lambda h, w, y: fn(h, w, y).sum(), (0, 1))
        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda h, w, y: L.token_logprobs(h @ w, y))
    chunked = temp_bytes(lambda h, w, y: L.chunked_token_logprobs(h, w, y, chunk_size=chunk))
    assert plain >= full_logits_bytes
    assert chunked < full_logits_bytes / 2


def test_chunked_token_logprobs_validates_inputs():
    h, w, y = jnp.zeros((1, 2, 4)), jnp.zeros((3, 5)), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="d_model"):
        L.chunked_token_logprobs(h, w, y, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_token_logprobs(h, jnp.zeros((4, 5)), y, chunk_size=0)
