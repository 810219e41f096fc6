"""Flax linen modules of the decoder-only transformer.

One :class:`Transformer` covers the Llama, Mistral, Qwen2 and GPT-2 families (see
:class:`~prefjax.models.config.TransformerConfig`). Conventions shared by every module here:

* Shapes: ``B`` batch, ``T`` query length, ``S`` key length (cache slots), ``D`` hidden size,
  ``H`` query heads, ``K`` key/value heads, ``Dh`` head size, ``F`` MLP width, ``V`` vocabulary,
  ``L`` layers.
* Parameters carry logical axis names (``nn.with_logical_partitioning``) from the vocabulary
  ``embed, mlp, heads, kv_heads, head_dim, vocab, layers``. The layers are one ``nn.scan``, so
  every per-layer parameter has a leading ``layers`` axis of size ``L``: one compiled layer body
  whatever the depth.
* LoRA adapters live in a separate variable collection ``"lora"`` (``a``/``b`` under the adapted
  projection), scanned like the parameters; the module uses them when they are present.
* Attention over the sequence goes through :func:`prefjax.models.attention.causal_attention`
  (blocked on a CPU, ``jax.nn.dot_product_attention`` elsewhere). Padding may be on either side: a
  boolean mask combines causality, key padding and the optional sliding window, and positions are
  given explicitly (``cumsum(attention_mask) - 1`` by default), so left-padded prompts get the
  same rotary phases as unpadded ones.
* The KV cache is an explicit pytree (:class:`KVCache`) holding every layer's keys and values in
  one stacked buffer. It is part of the layer scan's carry, so each layer writes only the new
  tokens' keys/values into it with ``lax.dynamic_update_slice`` (XLA updates the buffer in place,
  and a jitted caller that donates the cache never copies it), and cached attention
  (:func:`cached_attention`) reads only the cache blocks that hold tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from prefjax.models import attention
from prefjax.models.config import TransformerConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class KVCache(flax.struct.PyTreeNode):
    """Preallocated key/value cache of fixed maximum length ``S``.

    Every row writes its next token(s) into the same slots (``length`` onwards); slots holding
    padding are marked invalid by ``mask`` so they are never attended to. Cached attention reads
    the slots ``first_slot .. length - 1`` only (in blocks), so the cost of a step follows the
    tokens held, not ``S``.

    Attributes:
      k, v: ``[L, B, S, K, Dh]`` keys (after rotary) and values, in the compute dtype.
      mask: ``[B, S]`` int32, 1 where a slot holds a real token.
      positions: ``[B, S]`` int32 position id of the token in each slot (for sliding windows).
      length: ``[]`` int32, number of slots filled so far (the same for every row).
      next_position: ``[B]`` int32, position id the next real token of each row gets.
      first_slot: ``[]`` int32, the first slot holding a real token in any row (``S`` while
        there is none): the slots before it hold only left padding and are never read.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    positions: jax.Array
    length: jax.Array
    next_position: jax.Array
    first_slot: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots ``S``."""
        return self.k.shape[2]


def init_cache(config: TransformerConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache` for ``batch_size`` rows and ``max_len`` slots."""
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.resolved_head_dim)
    return KVCache(
        k=jnp.zeros(shape, config.dtype),
        v=jnp.zeros(shape, config.dtype),
        mask=jnp.zeros((batch_size, max_len), jnp.int32),
        positions=jnp.zeros((batch_size, max_len), jnp.int32),
        length=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
        first_slot=jnp.full((), max_len, jnp.int32),
    )


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(attention_mask) - 1`` clipped at 0: ``[B, T]`` int32.

    The first real token of every row gets position 0 whatever the padding on its left; padding
    tokens get position 0 (or the last real position for right padding) and are masked anyway.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row, ``[B]`` (works for left and right padding)."""
    mask = attention_mask.astype(bool)
    seq = mask.shape[-1]
    # argmax finds the first True of the reversed mask, i.e. the last True of the mask.
    return seq - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


# ------------------------------------------------------------------------------------------------
# Rotary embeddings.


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """Rotary inverse frequencies ``[Dh / 2]`` (float32), with Llama-3 or linear scaling.

    Follows Hugging Face ``_compute_default_rope_parameters`` and
    ``_compute_llama3_parameters`` (float32 arithmetic, so logits match to float32 precision).
    """
    dim = config.resolved_head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # Llama 3: keep high frequencies, divide low frequencies by `factor`, interpolate between.
    factor = np.float32(scaling.factor)
    old_len = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_len / np.float32(scaling.low_freq_factor)
    high_freq_wavelen = old_len / np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` ``[B, T, N, Dh]`` by ``positions`` ``[B, T]`` (Hugging Face half-split layout:
    dimension ``i`` pairs with ``i + Dh/2``)."""
    # [B, T, 1] * [Dh/2] -> [B, T, Dh/2]; angles in float32 as Hugging Face computes them.
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------------------------
# Cached attention.


class _Softmax(NamedTuple):
    """Running state of the online softmax over cache blocks (float32)."""

    max: jax.Array  # [B, K, G, T] largest score seen so far
    denom: jax.Array  # [B, K, G, T] sum of exp(score - max) so far
    acc: jax.Array  # [B, K, G, T, Dh] sum of exp(score - max) * value so far


def cached_attention(
    q: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    layer: jax.Array,
    query_positions: jax.Array,
    slot_mask: jax.Array,
    slot_positions: jax.Array,
    length: jax.Array,
    first_slot: jax.Array,
    window: jax.Array | None,
    *,
    block_size: int,
) -> jax.Array:
    r"""Attention of ``T`` new queries over the filled slots of one layer's cache, block by block.

    The queries sit at slots ``length .. length + T - 1`` (their keys/values already written).
    Query ``t`` attends to slot ``j`` when ``j <= length + t``, the slot holds a real token
    (``slot_mask``) and, with a window ``w > 0``, ``pos_t - pos_j < w``; it always sees itself,
    so a padding query stays finite. The scores are visited in blocks of ``block_size`` slots
    from the block of ``min(first_slot, length)`` to the block of the last query, with the online
    softmax of Milakov & Gimelshein (2018): per block ``m' = max(m, max_j s_j)``,
    ``l' = l e^{m - m'} + \sum_j e^{s_j - m'}``, ``a' = a e^{m - m'} + \sum_j e^{s_j - m'} v_j``,
    and the output is ``a / l``. Slots past the last query and left padding before
    ``first_slot`` are never read, so the cost follows the tokens held, not the slots allocated.

    A loop and not ``jax.nn.dot_product_attention(key_value_seq_lengths=...)``: that masks the
    slots past the length but still reads (and on CPU computes over) every allocated slot, and
    it cannot skip left padding.

    Args:
      q: ``[B, T, H, Dh]`` queries (after rotary).
      cache_k, cache_v: ``[L, B, S, K, Dh]`` the stacked cache; ``layer`` ``[]`` selects the layer.
      query_positions: ``[B, T]`` position ids of the queries (for the window).
      slot_mask: ``[B, S]`` 1 where a slot holds a real token (including the new ones).
      slot_positions: ``[B, S]`` position id of each slot's token.
      length: ``[]`` slot of the first query.
      first_slot: ``[]`` first slot holding a real token in any row.
      window: ``[]`` this layer's window (0 = full attention) or ``None``.
      block_size: slots per block (static); blocks are ``min(block_size, S)`` slots.

    Returns:
      ``[B, T, H, Dh]`` in the dtype of ``q``.
    """
    batch, seq, heads, head_dim = q.shape
    max_len, kv_heads = cache_k.shape[2], cache_k.shape[3]
    groups = heads // kv_heads
    block = min(block_size, max_len)
    # Query head n = k * G + g uses key/value head k (as jax.nn.dot_product_attention and
    # Hugging Face's repeat_kv): [B, T, H, Dh] -> [B, T, K, G, Dh].
    qg = q.reshape(batch, seq, kv_heads, groups, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    query_slot = length + jnp.arange(seq)  # [T]
    neg = jnp.finfo(jnp.float32).min

    def visit(i, state: _Softmax) -> _Softmax:
        # The last block may reach past S: clamp its start and drop the slots seen already.
        start = jnp.minimum(i * block, max_len - block)
        corner, size = (layer, 0, start, 0, 0), (1, batch, block, kv_heads, head_dim)
        kb = jax.lax.dynamic_slice(cache_k, corner, size)[0]  # [B, Sb, K, Dh]
        vb = jax.lax.dynamic_slice(cache_v, corner, size)[0]
        mb = jax.lax.dynamic_slice_in_dim(slot_mask, start, block, axis=1)  # [B, Sb]
        slots = start + jnp.arange(block)  # [Sb]
        valid = mb.astype(bool)[:, None, :] & (slots[None, :] <= query_slot[:, None])[None]
        if window is not None:
            pb = jax.lax.dynamic_slice_in_dim(slot_positions, start, block, axis=1)
            dist = query_positions[:, :, None] - pb[:, None, :]  # [B, T, Sb]
            valid &= (window <= 0) | (dist < window)
        valid |= (slots[None, :] == query_slot[:, None])[None]
        valid &= (slots >= i * block)[None, None, :]  # [B, T, Sb]
        valid = valid[:, None, None]  # [B, 1, 1, T, Sb]
        scores = jnp.einsum(
            "btkgd,bskd->bkgts", qg, kb.astype(q.dtype), preferred_element_type=jnp.float32
        )
        scores = jnp.where(valid, scores * scale, neg)  # [B, K, G, T, Sb]
        new_max = jnp.maximum(state.max, scores.max(axis=-1))
        correction = jnp.exp(state.max - new_max)
        p = jnp.where(valid, jnp.exp(scores - new_max[..., None]), 0.0)
        pv = jnp.einsum(
            "bkgts,bskd->bkgtd",
            p.astype(q.dtype),
            vb.astype(q.dtype),
            preferred_element_type=jnp.float32,
        )
        return _Softmax(
            max=new_max,
            denom=state.denom * correction + p.sum(axis=-1),
            acc=state.acc * correction[..., None] + pv,
        )

    stats = (batch, kv_heads, groups, seq)
    init = _Softmax(
        max=jnp.full(stats, neg, jnp.float32),
        denom=jnp.zeros(stats, jnp.float32),
        acc=jnp.zeros(stats + (head_dim,), jnp.float32),
    )
    lo = jnp.minimum(first_slot, length) // block
    hi = (length + seq + block - 1) // block
    final = jax.lax.fori_loop(lo, hi, visit, init)
    out = final.acc / final.denom[..., None]  # [B, K, G, T, Dh]
    # [B, K, G, T, Dh] -> [B, T, K, G, Dh] -> [B, T, H, Dh]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, seq, heads, head_dim)
    return out.astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# Layers.

# The one logical name of an activation axis: the rows of a forward pass. Outside a sharded step
# no rule names it and the constraint is nothing; inside one (``prefjax.sharding.
# activation_sharding``) it maps to the batch's mesh axes, so XLA keeps the residual stream split
# by rows instead of following the parameters' ``embed`` split into the activations.
BATCH = "batch"


def split_rows(x: jax.Array) -> jax.Array:
    """``x`` with its leading (row) axis constrained to the ``"batch"`` rule's mesh axes."""
    return nn.with_logical_constraint(x, (BATCH,) + (None,) * (x.ndim - 1))


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


class Norm(nn.Module):
    """RMSNorm (``kind="rms"``, Llama) or LayerNorm with bias (``kind="layer"``, GPT-2).

    Statistics are computed in float32; the normalised activations are cast back to the compute
    dtype before the scale is applied (as Hugging Face Llama does).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dim = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (dim,),
            cfg.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rms":
            y = x32 * jax.lax.rsqrt(
                jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps
            )
            return y.astype(cfg.dtype) * scale.astype(cfg.dtype)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (dim,),
            cfg.param_dtype,
        )
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.dtype)


class Projection(nn.Module):
    """A linear map contracting the last ``len(in_axes)`` dimensions, with an optional LoRA
    adapter ``x -> (dropout(x) @ a) @ b * scale`` added to its output.

    Attributes:
      out_features: output dimensions, e.g. ``(H, Dh)``.
      in_axes, out_axes: logical axis names of the kernel's input and output dimensions.
      use_bias: add a bias of shape ``out_features``.
      lora_rank: when > 0 and the ``"lora"`` collection is mutable, create the adapter (used by
        ``Model.init_lora``); at apply time the adapter is used whenever it exists.
      lora_scale: ``alpha / rank``.
      lora_dropout: dropout rate on the adapter's input (needs a ``"dropout"`` rng when
        ``deterministic`` is False).
    """

    config: TransformerConfig
    out_features: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool = False
    lora_rank: int = 0
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n_in = len(self.in_axes)
        in_features = x.shape[-n_in:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), self.in_axes + self.out_axes
            ),
            in_features + self.out_features,
            cfg.param_dtype,
        )
        x = x.astype(cfg.dtype)
        contract = tuple(range(x.ndim - n_in, x.ndim))
        dims = ((contract, tuple(range(n_in))), ((), ()))
        y = jax.lax.dot_general(x, kernel.astype(cfg.dtype), dims)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                self.out_features,
                cfg.param_dtype,
            )
            y = y + bias.astype(cfg.dtype)
        if self.lora_rank > 0 or self.has_variable("lora", "a"):
            y = y + self._lora(x, in_features, dims)
        return y

    def _lora(self, x, in_features, dims):
        cfg = self.config
        rank = self.lora_rank

        def init_a(shape):
            # Kaiming-uniform with a = sqrt(5) (PyTorch Linear / PEFT default): U(+-1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(math.prod(in_features))
            box = nn.with_logical_partitioning(
                nn.initializers.uniform(2 * bound), self.in_axes + (None,)
            )(self.make_rng("params"), shape, cfg.param_dtype)
            return box.replace_boxed(box.unbox() - jnp.asarray(bound, cfg.param_dtype))

        a = self.variable("lora", "a", init_a, in_features + (rank,)).value
        b = self.variable(
            "lora",
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.out_axes),
            None,  # rng unused by zeros
            (rank,) + self.out_features,
            cfg.param_dtype,
        ).value
        if self.lora_dropout > 0.0:
            x = nn.Dropout(rate=self.lora_dropout)(x, deterministic=self.deterministic)
        h = jax.lax.dot_general(x, a.astype(cfg.dtype), dims)  # [..., r]
        out = jnp.tensordot(h, b.astype(cfg.dtype), axes=1)
        return out * jnp.asarray(self.lora_scale, cfg.dtype)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static LoRA settings carried by the module (not a pytree)."""

    rank: int = 0  # > 0 only while creating adapters
    targets: tuple[str, ...] = ()
    scale: float = 1.0
    dropout: float = 0.0


def _proj(cfg, lora: LoraSpec, deterministic, name, out_features, in_axes, out_axes, use_bias):
    return Projection(
        config=cfg,
        out_features=out_features,
        in_axes=in_axes,
        out_axes=out_axes,
        use_bias=use_bias,
        lora_rank=lora.rank if name in lora.targets else 0,
        lora_scale=lora.scale,
        lora_dropout=lora.dropout,
        deterministic=deterministic,
        name=name,
    )


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query causal self-attention with optional KV cache."""

    config: TransformerConfig
    lora: LoraSpec = LoraSpec()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, attention_mask, layer_cache, window, cache_meta):
        cfg = self.config
        h, k_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        p = lambda *a: _proj(cfg, self.lora, self.deterministic, *a)  # noqa: E731
        q = p("q_proj", (h, hd), ("embed",), ("heads", "head_dim"), cfg.qkv_bias)(x)
        k = p("k_proj", (k_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias)(x)
        v = p("v_proj", (k_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias)(x)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        if layer_cache is None:
            out = self._attend(q, k, v, positions, attention_mask, window)
            new_cache = None
        else:
            out, new_cache = self._attend_cached(
                q, k, v, positions, layer_cache, window, cache_meta
            )
        o_proj = p("o_proj", (cfg.hidden_size,), ("heads", "head_dim"), ("embed",), cfg.out_bias)
        return o_proj(out), new_cache

    def _attend(self, q, k, v, positions, attention_mask, window):
        """Attention within the sequence: causal, key padding, optional sliding window.

        ``attention_mask`` is 0 on padding and otherwise the token's segment id: 1 everywhere in a
        padded row, one id per sequence in a packed row (several sequences side by side). A real
        query attends to the earlier keys of its own segment only, so a packed row computes what
        its sequences would alone (given per-segment positions); with a 0/1 mask this is the
        plain causal, key-padding mask.
        """
        cfg = self.config
        seq = q.shape[1]
        segment = attention_mask.astype(jnp.int32)  # [B, S]
        key_valid = segment > 0
        idx = jnp.arange(seq)
        causal = idx[None, :] <= idx[:, None]  # [T, S]
        # Same segment, or a padding query (which then sees every valid key on its left, as before).
        same = (segment[:, :, None] == segment[:, None, :]) | ~key_valid[:, :, None]  # [B, T, S]
        mask = causal[None] & key_valid[:, None, :] & same  # [B, T, S]
        if window is not None:
            # window is this layer's size (traced, 0 = full attention).
            dist = positions[:, :, None] - positions[:, None, :]
            mask &= (window <= 0) | (dist < window)
        # A padding query has no valid key on its left; let it see itself so its (ignored) output
        # stays finite instead of averaging garbage.
        mask |= jnp.eye(seq, dtype=bool)[None]
        # Blocked on a CPU (the blocks above the diagonal skipped), jax.nn.dot_product_attention
        # elsewhere (cuDNN takes the mask as a bias and is_causal skips the upper blocks).
        return attention.causal_attention(q, k, v, mask, cfg.attention_impl)

    def _attend_cached(self, q, k, v, positions, layer_cache, window, cache_meta):
        """Write ``k, v`` at slot ``length`` of this layer's cache, then attend over the blocks
        that hold tokens (:func:`cached_attention`)."""
        cache_k, cache_v, layer = layer_cache  # [L, B, S, K, Dh] each, [] layer index
        slot_mask, slot_pos, length, first_slot = cache_meta  # [B, S] (updated), [B, S], [], []
        # Only the new tokens' keys/values are written: [1, B, T, K, Dh] at (layer, 0, length).
        start = (layer, 0, length, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
        out = cached_attention(
            q,
            cache_k,
            cache_v,
            layer,
            positions,
            slot_mask,
            slot_pos,
            length,
            first_slot,
            window,
            block_size=self.config.cache_block_size,
        )
        return out, (cache_k, cache_v)


class MLP(nn.Module):
    """SwiGLU-style gated MLP or a plain two-layer MLP."""

    config: TransformerConfig
    lora: LoraSpec = LoraSpec()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        p = lambda *a: _proj(cfg, self.lora, self.deterministic, *a)  # noqa: E731
        act = _activation(cfg.activation)
        up = p("up_proj", (cfg.mlp_dim,), ("embed",), ("mlp",), cfg.mlp_bias)(x)
        if cfg.gated_mlp:
            gate = p("gate_proj", (cfg.mlp_dim,), ("embed",), ("mlp",), cfg.mlp_bias)(x)
            hidden = act(gate) * up
        else:
            hidden = act(up)
        return p("down_proj", (cfg.hidden_size,), ("mlp",), ("embed",), cfg.mlp_bias)(hidden)


class Block(nn.Module):
    """Pre-norm transformer block; the ``nn.scan`` body.

    The carry is ``(x, kv)``: the residual stream ``[B, T, D]`` and the stacked ``(k, v)`` cache
    ``[L, B, S, K, Dh]`` (``None`` without a cache), which each layer updates at its own index.
    """

    config: TransformerConfig
    lora: LoraSpec = LoraSpec()
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, layer_xs, positions, attention_mask, cache_meta):
        cfg = self.config
        x, kv = carry
        x = split_rows(x)  # [B, T, D]
        layer, window = layer_xs  # this layer's index and window size
        layer_cache = None if kv is None else (*kv, layer)
        attn_out, kv = Attention(cfg, self.lora, self.deterministic, name="attn")(
            Norm(cfg, name="attn_norm")(x),
            positions,
            attention_mask,
            layer_cache,
            window,
            cache_meta,
        )
        x = x + attn_out
        x = x + MLP(cfg, self.lora, self.deterministic, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        return (x, kv), None


class Kernel(nn.Module):
    """A bare weight matrix (the untied LM head), returned as is when called."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init_std: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


def _remat_policy(name: str):
    if name == "full":
        return None  # save nothing: recompute the whole block
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}")


HEADS = ("lm", "reward", "value")


class Transformer(nn.Module):
    """Decoder-only transformer with an LM, reward or value head.

    Call: ``(input_ids [B,T], attention_mask [B,T], positions [B,T], cache=None)`` returns
    ``(output, cache)`` where output is the head's output (``return_hidden=False``) or the final
    hidden states ``[B, T, D]``, and ``cache`` the updated :class:`KVCache` (or ``None``).

    Heads: ``"lm"`` -> logits ``[B, T, V]`` (float32); ``"reward"`` -> ``[B]`` read at the last real
    token; ``"value"`` -> ``[B, T]``.
    """

    config: TransformerConfig
    head: str = "lm"
    lora: LoraSpec = LoraSpec()
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("vocab", "embed")
            ),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        if cfg.position == "learned":
            self.pos_embed = nn.Embed(
                cfg.max_positions,
                cfg.hidden_size,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std / 2), (None, "embed")
                ),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )
        block = Block
        if cfg.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=_remat_policy(cfg.remat))
        self.block_type = block  # also run one layer at a time by _unrolled_layers
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.lora, self.deterministic)
        self.final_norm = Norm(cfg)
        head_init = nn.initializers.normal(1.0 / math.sqrt(cfg.hidden_size + 1))
        if self.head == "lm" and not cfg.tie_embeddings:
            self.lm_head = Kernel(
                (cfg.hidden_size, cfg.vocab_size),
                ("embed", "vocab"),
                cfg.init_std,
                cfg.param_dtype,
            )
        elif self.head == "reward":
            self.reward_head = nn.DenseGeneral(
                1,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(head_init, ("embed", None)),
                param_dtype=cfg.param_dtype,
            )
        elif self.head == "value":
            self.value_head = nn.DenseGeneral(
                1,
                use_bias=True,
                kernel_init=nn.with_logical_partitioning(head_init, ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                param_dtype=cfg.param_dtype,
            )

    def _unrolled_layers(self, x, windows, positions, attention_mask):
        """The layers one after another in the program (``scan_unroll``), each applied with its
        slice of the stacked weights: the same parameters and arithmetic as the layer scan, but
        no loop, so the backward pass keeps each layer's residuals as they are instead of
        stacking them into ``[L, ...]`` buffers (and the weight gradients are concatenated
        once). The cached (decoding) path always scans."""
        cfg = self.config
        stacked = self.layers.variables  # {"params": [L, ...] leaves, and "lora" with adapters}
        block = self.block_type(cfg, self.lora, self.deterministic, parent=None)  # unbound
        key = None if self.deterministic else self.make_rng("dropout")
        for layer in range(cfg.num_layers):
            variables = jax.tree.map(lambda a, i=layer: a[i], stacked)
            rngs = {} if key is None else {"dropout": jax.random.fold_in(key, layer)}
            window = None if windows is None else windows[layer]
            (x, _), _ = block.apply(
                variables, (x, None), (None, window), positions, attention_mask, None, rngs=rngs
            )
        return x

    def trunk(self, input_ids, attention_mask, positions, cache: KVCache | None = None):
        """Final hidden states ``[B, T, D]`` (after the final norm) and the updated cache."""
        cfg = self.config
        input_ids, attention_mask, positions = map(
            split_rows, (input_ids, attention_mask, positions)
        )
        x = self.embed(input_ids)
        if cfg.position == "learned":
            x = x + self.pos_embed(jnp.clip(positions, 0, cfg.max_positions - 1))
        x = split_rows(x.astype(cfg.dtype))  # [B, T, D]
        windows = cfg.layer_windows()
        windows = None if windows is None else jnp.asarray(windows, jnp.int32)  # [L]
        if cache is None:
            if cfg.scan_unroll and not self.is_initializing():
                x = self._unrolled_layers(x, windows, positions, attention_mask)
            else:
                (x, _), _ = self.layers((x, None), (None, windows), positions, attention_mask, None)
            return self.final_norm(x), None
        seq = input_ids.shape[1]
        start = (0, cache.length)
        slot_mask = jax.lax.dynamic_update_slice(
            cache.mask, attention_mask.astype(jnp.int32), start
        )
        slot_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), start)
        # The first slot of this chunk holding a real token in any row (S when there is none).
        real = jnp.any(attention_mask.astype(bool), axis=0)  # [T]
        chunk_first = jnp.where(jnp.any(real), cache.length + jnp.argmax(real), cache.max_len)
        first_slot = jnp.minimum(cache.first_slot, chunk_first).astype(jnp.int32)
        meta = (slot_mask, slot_pos, cache.length, first_slot)
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)  # [L]
        (x, (new_k, new_v)), _ = self.layers(
            (x, (cache.k, cache.v)), (layer_ids, windows), positions, attention_mask, meta
        )
        new_cache = KVCache(
            k=new_k,
            v=new_v,
            mask=slot_mask,
            positions=slot_pos,
            length=cache.length + seq,
            next_position=cache.next_position + jnp.sum(attention_mask.astype(jnp.int32), axis=-1),
            first_slot=first_slot,
        )
        return self.final_norm(x), new_cache

    def unembedding(self) -> jax.Array:
        """The ``[D, V]`` output matrix in the compute dtype (tied or untied)."""
        if self.config.tie_embeddings:
            return self.embed.embedding.T.astype(self.config.dtype)
        return self.lm_head().astype(self.config.dtype)

    def apply_head(self, hidden, attention_mask):
        cfg = self.config
        if self.head == "lm":
            if cfg.tie_embeddings:
                w = self.embed.embedding.astype(cfg.dtype)  # [V, D]
                return jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
            w = self.lm_head().astype(cfg.dtype)  # [D, V]
            return jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        if self.head == "reward":
            idx = last_token_index(attention_mask)
            last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, D]
            return self.reward_head(last.astype(jnp.float32))[..., 0]
        return self.value_head(hidden.astype(jnp.float32))[..., 0]

    def __call__(
        self,
        input_ids,
        attention_mask,
        positions,
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
    ):
        hidden, cache = self.trunk(input_ids, attention_mask, positions, cache)
        if self.is_initializing():
            self.apply_head(hidden, attention_mask)
        if return_hidden:
            return hidden, cache
        return self.apply_head(hidden, attention_mask), cache
