"""The blocked causal attention equals ``jax.nn.dot_product_attention``, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import models
from prefjax.models import attention


def causal_mask(lengths, seq, window=None):
    """``[B, T, T]``: causal, right padding after ``lengths``, optional sliding window, and the
    diagonal always visible (as the transformer builds it)."""
    idx = np.arange(seq)
    mask = (idx[None, :] <= idx[:, None])[None] & (
        idx[None, None, :] < np.asarray(lengths)[:, None, None]
    )
    if window is not None:
        mask &= (idx[:, None] - idx[None, :] < window)[None]
    return jnp.asarray(mask | np.eye(seq, dtype=bool)[None])


@pytest.mark.parametrize(
    "seq,heads,kv_heads,block,window",
    [(70, 4, 2, 32, None), (40, 6, 1, 16, 9)],
    ids=["gqa-ragged-blocks", "mqa-window"],
)
def test_blocked_equals_dot_product_attention(seq, heads, kv_heads, block, window):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (3, seq, heads, 8))
    k = jax.random.normal(keys[1], (3, seq, kv_heads, 8))
    v = jax.random.normal(keys[2], (3, seq, kv_heads, 8))
    w = jax.random.normal(keys[3], q.shape)  # a cotangent for the gradients
    mask = causal_mask([seq, seq - 5, 7], seq, window)

    def outputs_and_grads(fn):
        # One compilation: the output (aux) and the gradients of <output, w>.
        loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * w), fn(q, k, v))
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return (out, *grads)

    blocked = lambda q, k, v: attention.blocked_causal_attention(q, k, v, mask, block=block)
    full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    for got, want in zip(outputs_and_grads(blocked), outputs_and_grads(full), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_block_size():
    assert attention.block_size(128) == 32  # 4 blocks: 10/16 of the score matrix
    assert attention.block_size(1024) == 128  # at most MAX_BLOCKS = 8 blocks
    assert attention.block_size(20) == 32  # one block: the whole matrix


def test_model_on_cpu_equals_xla_attention():
    # The default (blocked on a CPU) and the explicit XLA path give the same logits, with left
    # padding (a padding query sees only itself).
    model = models.from_preset("tiny", key=jax.random.key(0))
    xla = models.Model(model.config.replace(attention_impl="xla"), model.params)
    ids = np.arange(3, 3 + 2 * 40, dtype=np.int32).reshape(2, 40)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    got = jax.jit(model.apply)(model.params, ids, mask)
    np.testing.assert_allclose(got, jax.jit(xla.apply)(xla.params, ids, mask), atol=1e-5)
