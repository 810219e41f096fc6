"""Sampling: truncation rules, sampled frequencies, EOS handling, reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax.models as pm

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _frequencies(n=20000, **kwargs):
    logits = jnp.log(jnp.tile(jnp.asarray(PROBS), (n, 1)))
    tokens = pm.sample_logits(jax.random.key(0), logits, **kwargs)
    return np.bincount(np.asarray(tokens), minlength=len(PROBS)) / n


def _close(freq, probs, n=20000):
    # 5 binomial standard deviations.
    tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12
    np.testing.assert_array_less(np.abs(freq - probs), tol)


def test_sampling_frequencies_follow_the_truncated_distribution():
    _close(_frequencies(), PROBS)
    # Temperature 2: p ** (1/2), renormalised.
    tempered = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    _close(_frequencies(temperature=2.0), tempered)
    # top-k = 2 keeps {0, 1}.
    _close(_frequencies(top_k=2), np.r_[PROBS[:2] / 0.8, 0, 0])
    # top-p = 0.7: the mass before token 1 is 0.5 < 0.7 (kept), before token 2 it is 0.8 (dropped).
    _close(_frequencies(top_p=0.7), np.r_[PROBS[:2] / 0.8, 0, 0])
    # top-p = 0.85 also keeps token 2 (mass before it 0.8 < 0.85).
    _close(_frequencies(top_p=0.85), np.r_[PROBS[:3] / 0.95, 0])
    np.testing.assert_array_equal(_frequencies(n=10, temperature=0.0), [1, 0, 0, 0])


@pytest.fixture(scope="module")
def model():
    return pm.from_preset("tiny", key=jax.random.key(11), init_std=0.3)


def test_eos_ends_a_row(model):
    ids = np.array([[256, 10, 11], [20, 21, 22]], np.int32)
    mask = (ids != 256).astype(np.int32)
    free = pm.greedy_generate(model, model.params, ids, mask, max_new_tokens=6)
    tokens = np.asarray(free.tokens)
    # Choose as EOS a token that row 0 produces at step 2 and that does not occur earlier.
    eos = int(tokens[0, 2])
    assert eos not in tokens[0, :2], "pick another step: the token also occurs earlier"
    stopped = pm.greedy_generate(model, model.params, ids, mask, max_new_tokens=6, eos_id=eos)
    np.testing.assert_array_equal(stopped.mask[0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(stopped.tokens[0], np.r_[tokens[0, :3], [0, 0, 0]])
    assert int(stopped.lengths[0]) == 3
    np.testing.assert_array_equal(stopped.logprobs[0, 3:], 0.0)
    # Row 1 is unaffected up to its own first EOS (if any).
    row1 = list(tokens[1])
    n1 = row1.index(eos) + 1 if eos in row1 else 6
    np.testing.assert_array_equal(stopped.tokens[1, :n1], tokens[1, :n1])
    assert int(stopped.lengths[1]) == n1


def test_sampling_is_reproducible_from_the_key(model):
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    mask = np.ones_like(ids)
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=50)
    a = pm.generate(model, model.params, ids, mask, key=jax.random.key(1), **kwargs)
    b = pm.generate(model, model.params, ids, mask, key=jax.random.key(1), **kwargs)
    c = pm.generate(model, model.params, ids, mask, key=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    logp = np.asarray(a.logprobs)
    assert np.all(logp <= 0) and np.all(np.isfinite(logp)) and logp.min() < 0


def test_generate_argument_errors(model):
    ids = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pm.generate(model, model.params, ids, ids, key=jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match="LM head"):
        value = model.with_head("value")
        pm.generate(value, value.params, ids, ids, key=jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask"):
        pm.generate(model, model.params, ids, ids[:, :2], key=jax.random.key(0), max_new_tokens=2)


def test_logprobs_false_gives_the_same_tokens_and_no_logprobs(model):
    """``logprobs=False`` skips only the per-step log-sum-exp: the same tokens, mask and lengths
    (sampled and greedy), log-probs all 0."""
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    mask = np.ones_like(ids)
    for temperature in (1.0, 0.0):
        kwargs = dict(key=jax.random.key(3), max_new_tokens=6, temperature=temperature, eos_id=7)
        full = pm.generate(model, model.params, ids, mask, **kwargs)
        tokens_only = pm.generate(model, model.params, ids, mask, logprobs=False, **kwargs)
        for name in ("tokens", "mask", "lengths"):
            np.testing.assert_array_equal(getattr(tokens_only, name), getattr(full, name))
        assert np.all(np.asarray(full.logprobs)[np.asarray(full.mask) == 1] < 0)
        assert not np.any(np.asarray(tokens_only.logprobs))
