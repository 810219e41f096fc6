"""The rollout sampler: replayed log-probs, greedy limit, sampling frequencies, stops, sharding.

One tiny model (hidden 32) and a few compiled samplers are shared by the module.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from prefjax import models, rollout
from prefjax import sharding as shd
from prefjax.rollout import sampler as rs

PAD, BOS, EOS = 256, 257, 258
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def model():
    cfg = models.preset("tiny", **TINY)
    # A larger init than 0.02 so the next-token distribution is far from uniform.
    return models.Model.init(cfg.replace(init_std=0.3), jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of different lengths; the last one contains the EOS id."""
    ids = np.array(
        [[PAD, PAD, BOS, 97, 98], [BOS, 99, 100, 101, 102], [PAD, BOS, 103, EOS, 104]], np.int32
    )
    return ids, (ids != PAD).astype(np.int32)


def unpadded_logits(model, params, prompt_ids, prompt_mask, tokens):
    """Logits ``[R, P + N, V]`` of each row with its prompt padding removed (right-padded
    instead): another padding layout than the sampler's, one jitted forward pass."""
    rows, width = prompt_ids.shape[0], prompt_ids.shape[1] + tokens.shape[1]
    ids = np.full((rows, width), PAD, np.int32)
    for i in range(rows):
        seq = np.concatenate([prompt_ids[i][prompt_mask[i] > 0], tokens[i]])
        ids[i, : len(seq)] = seq
    return np.asarray(_apply(model)(params, ids, (ids != PAD).astype(np.int32)), np.float64)


_APPLY = {}


def _apply(model):
    return _APPLY.setdefault(id(model), jax.jit(model.apply))


def reference_logprobs(model, params, r, *, temperature, top_k, top_p):
    """NumPy replay: each row's unpadded logits, the transform, the token's log-prob."""
    r = jax.device_get(r)
    logits = unpadded_logits(model, params, r.prompt_ids, r.prompt_mask, r.tokens)
    out = np.zeros(r.tokens.shape, np.float64)
    for i in range(r.tokens.shape[0]):
        start = int(r.prompt_mask[i].sum()) - 1
        for t in range(int(r.lengths[i])):
            z = logits[i, start + t] / temperature
            y = r.tokens[i, t]
            keep = np.zeros_like(z, bool)
            keep[np.argsort(-z)[: top_k or len(z)]] = True
            if top_p < 1:
                zz = np.where(keep, z, -np.inf)
                probs = np.exp(zz - zz.max())
                probs /= probs.sum()
                srt = np.sort(probs)[::-1]
                before = np.cumsum(srt) - srt
                keep &= probs >= srt[before < top_p].min()
            keep[y] = True
            zk = np.where(keep, z, -np.inf)
            out[i, t] = z[y] - (zk.max() + np.log(np.exp(zk - zk.max()).sum()))
    return out


def test_logprobs_equal_a_teacher_forced_replay_at_temperature_and_top_p(model, prompts):
    # T = 0.7, top-p 0.9: the log-probs the sampler returns are those of the *truncated*
    # distribution the tokens were drawn from (a NumPy replay on each row without padding).
    cfg = rollout.SamplingConfig(
        max_new_tokens=6, num_samples=2, temperature=0.7, top_p=0.9, eos_ids=(EOS,), pad_id=PAD
    )
    r = rollout.make_sampler(model, cfg)(model.params, *prompts, jax.random.key(1))
    ref = reference_logprobs(model, model.params, r, temperature=0.7, top_k=0, top_p=0.9)
    np.testing.assert_allclose(np.asarray(r.logprobs), ref, atol=1e-5)
    assert np.all(np.asarray(r.logprobs)[np.asarray(r.response_mask) == 0] == 0)
    # The trainer's call (token_logprobs on the same tokens) is bit-identical: ratio exactly 1.
    again = jax.jit(
        lambda p: rollout.token_logprobs(
            model,
            p,
            r.prompt_ids,
            r.prompt_mask,
            r.tokens,
            r.response_mask,
            temperature=0.7,
            top_p=0.9,
        )
    )(model.params)
    assert np.array_equal(np.exp(np.asarray(again) - np.asarray(r.logprobs)), np.ones(again.shape))


@pytest.mark.slow
def test_replay_matches_the_kv_cache_decoder_without_truncation(model, prompts):
    # Without top-k / top-p the decoder's own log-probs (KV-cache path) are the same
    # distribution: the teacher-forced replay and the incremental decode agree to 1e-5.
    cfg = rollout.SamplingConfig(max_new_tokens=6, temperature=0.7, eos_ids=(EOS,), pad_id=PAD)
    key = jax.random.key(2)
    r = rollout.make_sampler(model, cfg)(model.params, *prompts, key)
    out = models.generate(
        model,
        model.params,
        *prompts,
        key=key,
        max_new_tokens=6,
        temperature=0.7,
        eos_id=EOS,
        pad_id=PAD,
    )
    assert np.array_equal(np.asarray(r.tokens), np.asarray(out.tokens))
    np.testing.assert_allclose(np.asarray(r.logprobs), np.asarray(out.logprobs), atol=1e-5)


@pytest.mark.slow
def test_top_k_one_is_greedy_argmax_by_full_recomputation(model, prompts):
    cfg = rollout.SamplingConfig(max_new_tokens=5, top_k=1, pad_id=PAD)
    r = rollout.make_sampler(model, cfg)(model.params, *prompts, jax.random.key(3))
    # Argmax decoding by full recomputation: the whole sequence re-run for every new token.
    tokens = np.full((3, 5), PAD, np.int32)
    lengths = prompts[1].sum(-1)
    for t in range(5):
        logits = unpadded_logits(model, model.params, *prompts, tokens)
        tokens[:, t] = np.argmax(logits[np.arange(3), lengths - 1 + t], axis=-1)
    assert np.array_equal(np.asarray(r.tokens), tokens)
    # A one-token support: log-prob 0 everywhere, every row ran to the budget.
    assert np.all(np.asarray(r.logprobs) == 0)
    assert list(np.asarray(r.finish_reason)) == [rollout.FINISH_LENGTH] * 3


@pytest.mark.slow
def test_sampled_frequencies_match_the_softmax(model, prompts):
    # Temperature 1, no truncation: 3000 first tokens of one prompt against softmax(logits),
    # chi-square over the 12 likeliest tokens and the rest pooled (fixed seed).
    n = 3000
    cfg = rollout.SamplingConfig(max_new_tokens=1, num_samples=n, pad_id=PAD)
    ids, mask = prompts[0][:1], prompts[1][:1]
    r = rollout.make_sampler(model, cfg)(model.params, ids, mask, jax.random.key(4))
    logits = np.asarray(model.apply(model.params, ids, mask), np.float64)[0, -1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:12]
    counts = np.bincount(np.asarray(r.tokens[:, 0]), minlength=len(probs))
    observed = np.append(counts[top], n - counts[top].sum())
    expected = n * np.append(probs[top], 1 - probs[top].sum())
    assert stats.chisquare(observed, expected).pvalue > 0.01
    # The log-probs returned are the softmax's.
    np.testing.assert_allclose(
        np.asarray(r.logprobs[:, 0]), np.log(probs[np.asarray(r.tokens[:, 0])]), atol=1e-5
    )
    # The n samples of one prompt are distinct streams, not n copies of one draw.
    assert len(set(np.asarray(r.tokens[:, 0]).tolist())) > 20


def test_finish_cuts_at_eos_stop_id_or_stop_sequence_in_the_response():
    cfg = rollout.SamplingConfig(
        max_new_tokens=6, eos_ids=(EOS,), stop_ids=(7,), stop_sequences=((5, 6),), pad_id=PAD
    )
    tokens = jnp.array(
        [
            [1, 2, EOS, 3, EOS, 4],  # eos at 2
            [1, 7, 2, EOS, 3, 4],  # stop id at 1
            [1, 5, 6, 2, 3, 4],  # stop sequence ending at 2
            [1, 5, 2, 6, 3, 4],  # never (5 and 6 not adjacent): length
            [1, 2, 3, PAD, PAD, PAD],  # the decoder stopped early
        ]
    )
    valid = jnp.array([[1] * 6] * 4 + [[1, 1, 1, 0, 0, 0]])
    out, mask, reason = rs.finish(tokens, valid, cfg)
    assert np.asarray(mask).sum(-1).tolist() == [3, 2, 3, 6, 3]
    assert np.asarray(reason).tolist() == [
        rollout.FINISH_EOS,
        rollout.FINISH_STOP,
        rollout.FINISH_STOP,
        rollout.FINISH_LENGTH,
        rollout.FINISH_LENGTH,
    ]
    assert np.asarray(out[0]).tolist() == [1, 2, EOS, PAD, PAD, PAD]
    assert np.asarray(out[2]).tolist() == [1, 5, 6, PAD, PAD, PAD]


def test_stop_ids_end_rows_and_pad_the_rest(model, prompts):
    # Every byte below 128 is a stop id: rows end early; the EOS id inside prompt 2 is not
    # searched (the response of row 2 still has tokens).
    cfg = rollout.SamplingConfig(
        max_new_tokens=8,
        num_samples=4,
        eos_ids=(EOS,),
        stop_ids=tuple(range(128)),
        pad_id=PAD,
    )
    r = jax.device_get(rollout.make_sampler(model, cfg)(model.params, *prompts, jax.random.key(5)))
    assert r.tokens.shape == (12, 8) and r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.all(r.lengths >= 1)
    for i in range(12):
        n = r.lengths[i]
        assert np.all(r.tokens[i, n:] == PAD) and np.all(r.response_mask[i, n:] == 0)
        ends = [t < 128 or t == EOS for t in r.tokens[i, :n]]
        assert not any(ends[:-1])  # nothing ended the row before its last token
        expected = (
            rollout.FINISH_EOS
            if r.tokens[i, n - 1] == EOS
            else rollout.FINISH_STOP
            if ends[-1]
            else rollout.FINISH_LENGTH
        )
        assert r.finish_reason[i] == expected
    assert set(r.finish_reason.tolist()) >= {rollout.FINISH_STOP}


def test_stop_strings_encode_to_ids():
    tok = models.ByteTokenizer()
    assert rollout.stop_sequences_from_strings(tok, ["\n\n", "END"]) == ((10, 10), (69, 78, 68))
    with pytest.raises(ValueError, match="encodes to no tokens"):
        rollout.stop_sequences_from_strings(tok, [""])
    with pytest.raises(ValueError, match="temperature=0"):
        rollout.SamplingConfig(max_new_tokens=2, temperature=0)


@pytest.mark.slow
def test_sharded_sampler_on_8_devices_equals_one_device(model, prompts):
    # Prompts split over data x fsdp (8 ways), params sharded by the FSDP rules (never whole on a
    # device): the same tokens and log-probs as on one device.
    cfg = rollout.SamplingConfig(
        max_new_tokens=4, num_samples=4, temperature=0.7, top_p=0.9, eos_ids=(EOS,), pad_id=PAD
    )
    ids, mask = (np.concatenate([x, x, x])[:8] for x in prompts)  # 8 prompts -> 32 rows
    key = jax.random.key(6)
    single = jax.device_get(rollout.make_sampler(model, cfg)(model.params, ids, mask, key))
    mesh = shd.make_mesh(
        ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1, rules=shd.DEFAULT_RULES))
    )
    p_shard = shd.param_shardings(mesh, model.param_axes, model.params, shd.DEFAULT_RULES)
    params = jax.device_put(model.params, p_shard)
    assert any(
        len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(params)
    )
    sampler = rollout.make_sampler(model, cfg, mesh=mesh, params_sharding=p_shard)
    out = sampler(params, ids, mask, key)
    assert out.tokens.sharding.spec[0] == shd.BATCH_AXES
    out = jax.device_get(out)
    assert np.array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)


def test_sharded_sampler_splits_its_work_by_rows(model):
    """On fsdp = 8 each device decodes its own eighth of the rows: the compiled program's FLOPs
    per device are the single-device program's / 8 (without the rows constraint XLA followed
    the embed-split weights into the activations: 1.08x that)."""
    cfg = rollout.SamplingConfig(max_new_tokens=4, temperature=0.7, top_p=0.9, pad_id=PAD)
    ids = np.random.default_rng(0).integers(2, 200, (32, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    key = jax.random.key(1)

    def flops(fn, *args):
        cost = fn.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    single = flops(jax.jit(lambda *a: rollout.sample(model, *a, cfg)), model.params, ids, mask, key)
    mesh = shd.make_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1, rules=shd.DEFAULT_RULES))
    )
    p_shard = shd.param_shardings(mesh, model.param_axes, model.params, shd.DEFAULT_RULES)
    sampler = rollout.make_sampler(model, cfg, mesh=mesh, params_sharding=p_shard)
    params = jax.device_put(model.params, p_shard)
    per_device = flops(sampler.jitted, params, ids, mask, key, None)
    assert per_device == pytest.approx(single / 8, rel=0.01)
