"""Tests for prefjax.losses.advantages: GAE, discounted returns, GRPO and RLOO advantages."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_reference_pg import gae_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax.losses import discounted_returns, gae, group_advantages, rloo_advantages

# Most checks call the jitted function (gamma and lam traced: one compilation per shape), which
# is also how a train step calls it; the doctests and a few tests below exercise eager mode.
_gae_jit = jax.jit(gae, static_argnames="algorithm")


def _random_case(seed, batch=3, seq=7, layout="holes", min_length=1):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, seq)).astype(np.float32)
    values = rng.normal(size=(batch, seq)).astype(np.float32)
    if layout == "holes":  # masked tokens anywhere (prompt, tool output, padding)
        mask = (rng.random((batch, seq)) < 0.7).astype(np.int32)
    elif layout == "right":
        lengths = rng.integers(min_length, seq + 1, size=batch)
        mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    else:  # left padding
        lengths = rng.integers(min_length, seq + 1, size=batch)
        mask = (np.arange(seq)[None] >= seq - lengths[:, None]).astype(np.int32)
    return rewards, values, mask


def _mid_row_dones(rng, mask, per_row=2):
    """Episode ends anywhere in a row: random flags everywhere (those on masked positions must be
    ignored) plus ``per_row`` forced on real tokens before the row's last real token, so several
    episodes are packed into each row that has enough real tokens."""
    dones = rng.random(mask.shape) < 0.15
    for b in range(mask.shape[0]):
        inner = np.flatnonzero(mask[b])[:-1]  # real tokens with a real token after them
        if inner.size:
            dones[b, rng.choice(inner, size=min(per_row, inner.size), replace=False)] = True
    return dones.astype(np.int32)


@pytest.mark.parametrize("layout", ["holes", "right", "left"])
@pytest.mark.parametrize(
    "gamma,lam,bootstrap,with_dones",
    [
        (1.0, 0.95, False, False),
        (0.9, 0.8, True, False),
        (0.99, 1.0, True, True),
        (0.9, 0.7, False, True),
    ],
    ids=["llm-default", "bootstrap", "bootstrap+dones", "dones"],
)
@pytest.mark.parametrize("algorithm", ["scan", "associative", "chunked"])
def test_gae_matches_loop_reference_under_jit(layout, gamma, lam, bootstrap, with_dones, algorithm):
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), so a failure would not
    # reproduce.
    seed = zlib.crc32(f"{layout}/{gamma}/{lam}/{bootstrap}/{with_dones}".encode())
    rewards, values, mask = _random_case(seed, layout=layout, min_length=4)
    rng = np.random.default_rng(seed + 1)
    boot = rng.normal(size=rewards.shape[0]).astype(np.float32) if bootstrap else None
    dones = _mid_row_dones(rng, mask) if with_dones else None
    if with_dones:  # several episode ends inside a row, not only at its last real token
        last_real = [np.flatnonzero(m).max(initial=0) for m in mask]
        inside = [np.sum((dones * mask)[b, : last_real[b]]) for b in range(mask.shape[0])]
        assert sum(n >= 2 for n in inside) >= 2, inside
    fn = jax.jit(
        lambda r, v, m, b, d: gae(
            r, v, m, gamma=gamma, lam=lam, bootstrap_value=b, dones=d, algorithm=algorithm
        )
    )
    adv, ret = fn(rewards, values, mask, boot, dones)
    ref_adv, ref_ret = gae_reference(
        rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=boot, dones=dones
    )
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert adv.dtype == jnp.float32


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values, _ = _random_case(0)
    mask = np.ones_like(rewards)
    gamma = 0.9
    next_values = np.concatenate([values[:, 1:], np.zeros((values.shape[0], 1))], axis=1)
    td_error = rewards + gamma * next_values - values  # delta_t, V after the end = 0
    adv, ret = _gae_jit(rewards, values, mask, gamma=gamma, lam=0.0)
    np.testing.assert_allclose(adv, td_error, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, rewards + gamma * next_values, rtol=1e-5, atol=1e-6)


def test_gae_lambda_one_gamma_one_zero_values_is_monte_carlo_return_to_go():
    rewards, _, _ = _random_case(1)
    mask = np.ones_like(rewards)
    return_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]  # G_t = sum_{k >= t} r_k
    adv, ret = gae(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, return_to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, return_to_go, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards, values, mask = _random_case(2, layout="right")
    boot = np.array([0.5, -1.0, 2.0], np.float32)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0, bootstrap_value=boot)
    g = discounted_returns(rewards, mask, gamma=0.9, bootstrap_value=boot)
    np.testing.assert_allclose(adv, np.where(mask, g - values, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, g, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed_with_interior_mask_and_bootstrap():
    # Real tokens at t = 0 and 2; t = 1 (e.g. a tool output) and t = 3 (padding) are skipped.
    rewards = np.array([[1.0, 100.0, 2.0, 100.0]])
    values = np.array([[0.5, 100.0, 1.0, 100.0]])
    mask = np.array([[1, 0, 1, 0]])
    gamma, lam, boot = 0.5, 0.5, 4.0
    delta2 = 2.0 + gamma * boot - 1.0  # 3.0: V after the last real token is the bootstrap
    delta0 = 1.0 + gamma * 1.0 - 0.5  # 1.0: the next real token's value is carried through t=1
    adv2 = delta2
    adv0 = delta0 + gamma * lam * adv2  # 1.75; t = 1 takes no discount step
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=np.array([boot]))
    np.testing.assert_allclose(adv, [[adv0, 0.0, adv2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[adv0 + 0.5, 0.0, adv2 + 1.0, 0.0]], rtol=1e-6)


def test_gae_dones_split_packed_episodes():
    # Two episodes packed in one row equal the two run separately.
    rewards, values, _ = _random_case(3, batch=1, seq=6)
    mask = np.ones((1, 6))
    dones = np.array([[0, 0, 1, 0, 0, 0]])
    adv, ret = _gae_jit(rewards, values, mask, gamma=0.9, lam=0.9, dones=dones)
    a1, r1 = _gae_jit(rewards[:, :3], values[:, :3], mask[:, :3], gamma=0.9, lam=0.9)
    a2, r2 = _gae_jit(rewards[:, 3:], values[:, 3:], mask[:, 3:], gamma=0.9, lam=0.9)
    np.testing.assert_allclose(adv, np.concatenate([a1, a2], axis=1), rtol=1e-6)
    np.testing.assert_allclose(ret, np.concatenate([r1, r2], axis=1), rtol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gae_padding_invariance_with_garbage_in_padding(side):
    rewards, values, _ = _random_case(4, batch=2, seq=5)
    mask = np.ones((2, 5), np.int32)
    adv, ret = _gae_jit(rewards, values, mask, gamma=0.95, lam=0.9)
    pad = np.full((2, 3), np.nan, np.float32)  # whatever sits on padding must not leak
    cat = (
        (lambda x, p: np.concatenate([x, p], 1))
        if side == "right"
        else (lambda x, p: np.concatenate([p, x], 1))
    )
    padded_mask = cat(mask, np.zeros((2, 3), np.int32))
    adv_p, ret_p = _gae_jit(cat(rewards, pad), cat(values, pad), padded_mask, gamma=0.95, lam=0.9)
    real = slice(0, 5) if side == "right" else slice(3, 8)
    np.testing.assert_allclose(adv_p[:, real], adv, rtol=1e-6)
    np.testing.assert_allclose(ret_p[:, real], ret, rtol=1e-6)
    assert np.all(np.asarray(adv_p)[padded_mask == 0] == 0.0)


def test_gae_fully_masked_row_is_zero_with_finite_gradient():
    rewards, values, _ = _random_case(5, batch=2, seq=4)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    adv, ret = _gae_jit(rewards, values, mask, gamma=1.0, lam=0.95)
    assert np.all(np.asarray(adv[1]) == 0.0) and np.all(np.asarray(ret[1]) == 0.0)

    def total(v):
        return jnp.sum(_gae_jit(rewards, v, mask, gamma=1.0, lam=0.95).advantages ** 2)

    grad = jax.jit(jax.grad(total))(jnp.asarray(values))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[1]) == 0.0)


def test_gae_bfloat16_inputs_are_finite_float32():
    rewards, values, mask = _random_case(6)
    adv, ret = gae(
        jnp.asarray(rewards, jnp.bfloat16) * 1e4,
        jnp.asarray(values, jnp.bfloat16),
        mask,
        gamma=1.0,
        lam=0.95,
    )
    assert adv.dtype == jnp.float32 and np.all(np.isfinite(adv)) and np.all(np.isfinite(ret))


def test_discounted_returns_hand_computed_and_dones():
    r = np.array([[1.0, 2.0, 3.0, 9.0]])
    m = np.array([[1, 1, 1, 0]])
    g = 0.5
    expected = [[1 + g * 2 + g * g * 3, 2 + g * 3, 3.0, 0.0]]
    np.testing.assert_allclose(discounted_returns(r, m, gamma=g), expected, rtol=1e-6)
    dones = np.array([[1, 0, 0, 0]])  # the episode ends after t = 0
    np.testing.assert_allclose(
        discounted_returns(r, m, gamma=g, dones=dones), [[1.0, 2 + g * 3, 3.0, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(  # bootstrap enters after the last real token only
        discounted_returns(r, m, gamma=g, bootstrap_value=np.array([8.0])),
        [[1 + g * 2 + g**2 * 3 + g**3 * 8, 2 + g * 3 + g**2 * 8, 3 + g * 8, 0.0]],
        rtol=1e-6,
    )


def test_gae_rejects_bad_arguments():
    r = np.zeros((2, 3))
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, r, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, r, gamma=1.0, lam=-0.1)
    with pytest.raises(ValueError, match="bootstrap_value"):
        gae(r, r, r, gamma=1.0, lam=0.9, bootstrap_value=np.zeros(3))
    with pytest.raises(ValueError, match="dones"):
        gae(r, r, r, gamma=1.0, lam=0.9, dones=np.zeros((2, 4)))
    with pytest.raises(AssertionError):  # chex shape check names the mismatch
        gae(r, np.zeros((2, 4)), r, gamma=1.0, lam=0.9)


def test_group_advantages_hand_computed():
    rewards = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], np.float32)
    # Group 1: mean 2, unbiased std 1 -> (r - 2) / (1 + eps); group 2: all equal -> 0.
    eps = 1e-4
    expected = [-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]
    np.testing.assert_allclose(group_advantages(rewards, group_size=3), expected, rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(rewards, group_size=3, normalize_std=False), [-1, 0, 1, 0, 0, 0]
    )
    # Two groups of two: [1, 2] -> std sqrt(0.5) -> +-0.5 / (sqrt(0.5) + eps).
    two = group_advantages(np.array([1.0, 2.0, 0.0, 0.0]), group_size=2, eps=0.0)
    np.testing.assert_allclose(two, [-0.5 / np.sqrt(0.5), 0.5 / np.sqrt(0.5), 0, 0], rtol=1e-6)


def test_rloo_advantages_hand_computed_leave_one_out():
    rewards = np.array([1.0, 2.0, 6.0, 0.0, 4.0, 8.0], np.float32)
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0 - 6, 4 - 4, 8 - 2]
    np.testing.assert_allclose(rloo_advantages(rewards, group_size=3), expected, rtol=1e-6)
    # Identity: k / (k - 1) times the mean-centred reward.
    centred = group_advantages(rewards, group_size=3, normalize_std=False)
    np.testing.assert_allclose(rloo_advantages(rewards, group_size=3), 1.5 * centred, rtol=1e-6)


def test_group_advantages_reject_bad_group_size():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(np.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(np.zeros(4), group_size=1)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),  # seed
    st.floats(0.0, 1.0),  # gamma
    st.floats(0.0, 1.0),  # lam
    st.floats(0.0, 1.0),  # fraction of masked positions
)
def test_gae_masking_contract_property(seed, gamma, lam, masked_fraction):
    """Masked positions output 0 and whatever they hold never changes the real positions."""
    rng = np.random.default_rng(seed)
    batch, seq = 3, 6
    rewards = rng.normal(size=(batch, seq)).astype(np.float32)
    values = rng.normal(size=(batch, seq)).astype(np.float32)
    mask = rng.random((batch, seq)) >= masked_fraction
    adv, ret = _gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
    noise = rng.normal(size=(batch, seq)).astype(np.float32) * 1e3
    garbage_r, garbage_v = np.where(mask, rewards, noise), np.where(mask, values, -noise)
    adv2, ret2 = _gae_jit(garbage_r, garbage_v, mask, gamma=gamma, lam=lam)
    np.testing.assert_array_equal(adv, adv2)
    np.testing.assert_array_equal(ret, ret2)
    assert np.all(np.asarray(adv)[~mask] == 0.0) and np.all(np.asarray(ret)[~mask] == 0.0)
    # Masking equals slicing: each row equals GAE on its real tokens alone.
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        if real.size == 0:
            continue
        ones = np.ones((1, real.size), bool)
        a_b, _ = _gae_jit(
            rewards[b : b + 1, real], values[b : b + 1, real], ones, gamma=gamma, lam=lam
        )
        np.testing.assert_allclose(np.asarray(adv)[b, real], a_b[0], rtol=1e-5, atol=1e-5)


def test_gae_vmap_and_eager_agree_with_jit():
    cases = [_random_case(seed, batch=2, seq=5) for seed in (10, 11)]
    rewards, values, mask = (np.stack(x) for x in zip(*cases, strict=True))  # [2, batch, seq]
    stacked = jax.vmap(lambda r, v, m: gae(r, v, m, gamma=0.9, lam=0.95))(rewards, values, mask)
    for i in range(2):
        eager = gae(rewards[i], values[i], mask[i], gamma=0.9, lam=0.95)
        jitted = _gae_jit(rewards[i], values[i], mask[i], gamma=0.9, lam=0.95)
        for a, b, c in zip(stacked, eager, jitted, strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**31 - 1),  # seed
    st.floats(0.0, 1.0),  # gamma
    st.floats(0.0, 1.0),  # lam
    st.sampled_from(["holes", "right", "left"]),
    st.sampled_from([1, 5, 16, 63]),  # seq (few shapes: few compilations)
    st.booleans(),  # dones inside rows
    st.sampled_from(["associative", "chunked"]),
)
def test_gae_parallel_forms_equal_the_reverse_scan(
    seed, gamma, lam, layout, seq, with_dones, algorithm
):
    """The parallel forms (lax.associative_scan; chunks solved side by side, then their
    boundaries) equal the reference reverse scan to float32 rounding on ragged masks and episode
    boundaries, for GAE and the discounted returns."""
    rewards, values, mask = _random_case(seed, batch=4, seq=seq, layout=layout)
    rng = np.random.default_rng(seed)
    dones = _mid_row_dones(rng, mask) if with_dones else None
    boot = rng.normal(size=4).astype(np.float32)
    kw = dict(gamma=gamma, lam=lam, bootstrap_value=boot, dones=dones)
    scan = _gae_jit(rewards, values, mask, **kw)
    parallel = _gae_jit(rewards, values, mask, algorithm=algorithm, **kw)
    for a, b in zip(scan, parallel, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    kw.pop("lam")
    np.testing.assert_allclose(
        discounted_returns(rewards, mask, algorithm=algorithm, **kw),
        discounted_returns(rewards, mask, **kw),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 64])
def test_gae_chunked_any_chunk_size_equals_the_reverse_scan(chunk_size):
    """Chunks of 1 (every token its own chunk), sizes that leave a padded tail chunk (3, 8 of
    seq 21), and one chunk longer than the rows (64): the same advantages, with episode ends
    and a bootstrap, and a chunk boundary falling inside masked runs and right after a done."""
    rewards, values, mask = _random_case(7, batch=5, seq=21, layout="holes")
    rng = np.random.default_rng(7)
    dones = _mid_row_dones(rng, mask)
    kw = dict(gamma=0.97, lam=0.9, bootstrap_value=rng.normal(size=5), dones=dones)
    ref = gae(rewards, values, mask, **kw)
    got = gae(rewards, values, mask, algorithm="chunked", chunk_size=chunk_size, **kw)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        gae(rewards, values, mask, algorithm="chunked", chunk_size=0, **kw)


def test_gae_rejects_an_unknown_algorithm():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        gae(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), gamma=1.0, lam=1.0, algorithm="x")
