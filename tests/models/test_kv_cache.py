"""KV cache: in-place updates (compiled bytes flat in the allocation), blocked attention over the
held slots equal to full recomputation, left padding skipped, the sampler unchanged by padding."""

import jax
import numpy as np
import pytest

import prefjax.models as pm
from tests.models._model_testing import jitted

PAD = 256


def _bytes_accessed(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"])


def test_decode_step_bytes_do_not_grow_with_the_allocated_slots(tiny):
    """The compiled decode step touches the same bytes with 256 or 2048 slots allocated.

    Only the new token's keys/values are written (in place, the cache donated) and attention
    reads only the filled blocks (a loop bounded by the fill length), so nothing in the step is
    sized by the allocation. Without donation XLA must copy the cache, and the same measure sees
    the copy: the check is sensitive to a whole-cache pass.
    """
    batch = 4
    tokens = np.zeros((batch,), np.int32)
    measured = {}
    for slots in (256, 2048):
        cache = jax.eval_shape(lambda s=slots: tiny.init_cache(batch, s))
        for donate in (True, False):
            step = jax.jit(tiny.decode_step, donate_argnums=(2,) if donate else ())
            measured[slots, donate] = _bytes_accessed(
                step.lower(tiny.params, tokens, cache).compile()
            )
    cache_bytes = 2 * 4 * np.prod(jax.eval_shape(lambda: tiny.init_cache(batch, 2048)).k.shape)
    # Flat: well under 1 % of the 2048-slot cache (k and v) apart.
    assert abs(measured[2048, True] - measured[256, True]) < 0.01 * cache_bytes
    assert measured[2048, True] < 0.5 * cache_bytes
    # Without donation the 2048-slot step pays at least one copy of the cache more.
    assert measured[2048, False] - measured[256, False] > 0.8 * cache_bytes * (1 - 256 / 2048)


@pytest.fixture(scope="module")
def blocked(tiny):
    """The tiny model with 3-slot cache blocks (not dividing the allocation, so the last block is
    clamped) and a sliding window of 5 on layer 0 only: the same parameters."""
    cfg = tiny.config.replace(
        cache_block_size=3, sliding_window=5, sliding_window_layers=(True, False)
    )
    return pm.Model(cfg, tiny.params)


def _left_pad(rows, width):
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :], mask[r, width - len(row) :] = row, 1
    return ids, mask


def test_blocked_decode_equals_full_recomputation(blocked):
    """Prefill + decode steps over 3-slot blocks give the logits of one full forward pass (no
    cache) at every step; every row has at least 7 slots of left padding, so the first two blocks
    are skipped (``first_slot``)."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    width, steps = 12, 6
    ids, mask = _left_pad(prompts, width)
    cache = blocked.init_cache(3, width + steps)  # 18 slots: blocks of 3 (block 5 full)
    logits, cache = jax.jit(blocked.prefill)(blocked.params, ids, mask, cache)
    assert int(cache.first_slot) == width - 5  # the longest prompt starts at slot 7
    decode = jax.jit(blocked.decode_step)
    # The reference sequence grows on the right of a fixed-width, right-padded array (one
    # compilation): the causal forward ignores the padding after the last real token.
    full_ids = np.concatenate([ids, np.full((3, steps), PAD, np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.zeros((3, steps), np.int32)], axis=1)
    step_logits = np.asarray(logits)[:, -1]
    for t in range(steps):
        tok = step_logits.argmax(-1).astype(np.int32)
        full_ids[:, width + t], full_mask[:, width + t] = tok, 1
        logits, cache = decode(blocked.params, tok, cache)
        step_logits = np.asarray(logits)
        full = np.asarray(jitted(blocked)(blocked.params, full_ids, full_mask))
        np.testing.assert_allclose(step_logits, full[:, width + t], atol=2e-5, err_msg=f"step {t}")
    assert int(cache.length) == width + steps and int(cache.first_slot) == width - 5


def test_extra_left_padding_gives_the_same_tokens(blocked):
    """Greedy generation is the same whether the prompts carry 1 or 10 more slots of left padding
    (skipped whole blocks), and early-finished rows stop at their EOS as without it."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    outs = []
    for width in (5, 14):
        ids, mask = _left_pad(prompts, width)
        outs.append(pm.greedy_generate(blocked, blocked.params, ids, mask, max_new_tokens=6))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    tokens = np.asarray(outs[0].tokens)
    assert len(np.unique(tokens)) > 2  # not trivially constant
    # An EOS that row 0 emits at step 1 ends row 0 there; the other rows keep their tokens up to
    # their own first EOS.
    eos = int(tokens[0, 1])
    ids, mask = _left_pad(prompts, 14)
    stopped = pm.greedy_generate(blocked, blocked.params, ids, mask, max_new_tokens=6, eos_id=eos)
    for r in range(3):
        row = list(tokens[r])
        n = row.index(eos) + 1 if eos in row else 6
        np.testing.assert_array_equal(stopped.tokens[r, :n], tokens[r, :n])
        np.testing.assert_array_equal(stopped.tokens[r, n:], 0)
        assert int(stopped.lengths[r]) == n


def test_cache_block_size_must_be_positive():
    with pytest.raises(ValueError, match="cache_block_size=0"):
        pm.preset("tiny", cache_block_size=0)
