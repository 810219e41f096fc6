r"""Causal self-attention over a whole sequence: the kernel the training forward calls.

:func:`causal_attention` takes ``q [B, T, H, Dh]``, ``k, v [B, T, K, Dh]`` (``K`` divides ``H``:
multi-head, grouped- or multi-query) and a boolean ``mask [B, T, T]`` that is causal (no query
sees a later key; padding, sliding windows and segments may remove more), and returns
``softmax(q k^T / sqrt(Dh) + mask) v`` as ``[B, T, H, Dh]``.

On a CPU with ``implementation=None`` it computes the attention in blocks of queries, each block
against the keys up to its last query only (:func:`blocked_causal_attention`): the blocks above
the diagonal, all masked, are never computed, so a sequence split into ``n`` blocks costs
``(n + 1) / (2 n)`` of the full score matrix, forward and backward, and the layout (queries and
keys grouped by key head, ``[B, K, G, T, S]``, no repeated keys) needs no transpose of the scores.
Everywhere else (GPU, TPU, or an explicit ``"xla"`` / ``"cudnn"``) it is
``jax.nn.dot_product_attention``. Both compute the scores in float32 and scale them after the
product, as JAX's XLA implementation does, so they agree to float32 rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Queries per block of the blocked attention: 32 or more, at most this many blocks per sequence
# (the 2-core CPU measurements of benchmarks/README.md: 32-query blocks halve the tiny preset's
# attention time at 128 tokens; more blocks than 8 only add operations).
MIN_BLOCK = 32
MAX_BLOCKS = 8


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str | None
) -> jax.Array:
    """Attention of ``q`` over ``k, v`` under the causal boolean ``mask`` (see the module).

    Args:
      q: ``[B, T, H, Dh]`` queries.
      k, v: ``[B, T, K, Dh]`` keys and values.
      mask: ``[B, T, T]`` bool, True where query ``t`` may see key ``s``; False for every
        ``s > t``.
      implementation: ``None`` (blocked on a CPU, JAX's choice elsewhere), ``"xla"`` or
        ``"cudnn"`` (``jax.nn.dot_product_attention``; cuDNN also skips the upper blocks).

    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``q``.
    """
    if implementation is None and jax.default_backend() == "cpu":
        return blocked_causal_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask[:, None],
        is_causal=implementation == "cudnn",
        implementation=implementation,
    )


def block_size(seq: int) -> int:
    """Queries per block for a sequence of ``seq`` tokens: ``max(MIN_BLOCK, ceil(seq /
    MAX_BLOCKS))``."""
    return max(MIN_BLOCK, -(-seq // MAX_BLOCKS))


def blocked_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int | None = None
) -> jax.Array:
    r"""Causal attention one block of queries at a time, keys only up to the block's end.

    .. math:: o_{t} = \sum_{s \le e(t)} \mathrm{softmax}_s\big(\mathrm{where}(m_{ts},
        q_t \cdot k_s / \sqrt{D_h}, -\infty)\big)\, v_s

    with ``e(t)`` the last position of ``t``'s block: the keys after it are masked for every
    query of the block (causality), so leaving them out changes nothing but the work. Masked
    scores get ``-0.7 * float32 max`` added (``jax.nn.dot_product_attention`` replaces them by
    it), whose ``exp`` is 0 either way.

    Args:
      q: ``[B, T, H, Dh]``; k, v: ``[B, T, K, Dh]``; mask: ``[B, T, T]`` bool, causal.
      block: queries per block (default :func:`block_size`).

    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``q``.
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[2]
    block = block_size(t) if block is None else block
    # [B, T, H, Dh] -> [B, T, K, G, Dh]: the G query heads that share each key/value head.
    q = q.reshape(b, t, kv_heads, h // kv_heads, hd)
    scale = jnp.float32(1.0 / math.sqrt(hd))
    big_neg = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        # [B, Tb, K, G, Dh] x [B, S, K, Dh] -> [B, K, G, Tb, S], S = stop (keys up to the block)
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", q[:, start:stop], k[:, :stop], preferred_element_type=jnp.float32
        )
        # The mask as an additive [B, 1, 1, Tb, S] bias (0 or -0.7 * max): s + 0 is s exactly,
        # and no score-sized array of the constant is materialised (a where would broadcast it).
        bias = jnp.where(mask[:, None, None, start:stop, :stop], jnp.float32(0.0), big_neg)
        scores = scores * scale + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, v[:, :stop]))  # [B, Tb, K, G, Dh]
    # Blocks along the query axis -> [B, T, K, G, Dh] -> [B, T, H, Dh]
    return jnp.concatenate(outs, axis=1).reshape(b, t, h, hd).astype(q.dtype)
