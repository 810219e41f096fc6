"""The transformer against an independent NumPy float64 forward pass written from the equations.

``test_hf.py`` checks prefjax against Hugging Face ``transformers``; this file checks it against
no library at all, so a bug shared by both (or a parity test skipped because ``transformers`` is
not installed) still fails here. The reference below reads only the config and the parameter
pytree, and shares no code with ``prefjax.models``:

* positions are counted per row (the n-th real token has position n), not by ``cumsum``;
* rotary embeddings are complex multiplication: dimension ``i`` and ``i + Dh/2`` are the real and
  imaginary parts of ``z_i``, rotated to ``z_i * exp(1j * position * theta ** (-2i / Dh))``
  (Su et al., 2021, Eq. 34, in the half-split layout of Hugging Face), with ``theta`` from the
  config;
* attention is a loop over query heads, query head ``h`` reading key/value head
  ``h // (H / K)`` (grouped-query attention, Ainslie et al., 2023), scores ``q . k / sqrt(Dh)``,
  keys allowed when causal and not padding;
* RMSNorm ``x / sqrt(mean(x^2) + eps) * g`` or LayerNorm ``(x - mu) / sqrt(var + eps) * g + b``;
  SwiGLU ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` with the family's activation.

Parameters are perturbed away from their initial values (norm scales away from 1, biases away
from 0) so that every one of them changes the logits. Logits are compared at real tokens only:
the output at a padding position is unspecified.
"""

import math

import jax
import numpy as np
import pytest

import prefjax.models as pm
from tests.models.test_transformer import GPT2_TINY

# float32 model against a float64 reference; logits are O(1) (see ``test_reference_is_not_flat``).
ATOL = 1e-5
PAD = 256  # the byte tokenizer's pad id

CONFIGS = {
    # Llama family: RMSNorm, rotary with a non-default theta, grouped-query attention (4 query
    # heads share 2 key/value heads), SwiGLU, untied LM head.
    "llama": dict(rope_theta=1000.0),
    # GPT-2 family: LayerNorm, learned positions, plain MLP with tanh-GELU, biases everywhere,
    # multi-head attention, LM head tied to the embedding.
    "gpt2": dict(GPT2_TINY),
    # Qwen2-like multi-query attention with q/k/v biases, head_dim != hidden / heads, a gated MLP
    # with the exact GELU, tied embeddings.
    "mqa": dict(
        num_kv_heads=1,
        head_dim=24,
        qkv_bias=True,
        activation="gelu",
        tie_embeddings=True,
        rope_theta=500.0,
        model_type="qwen2",
    ),
}


# ------------------------------------------------------------------------------------------------
# The reference, in float64 NumPy, one row at a time.


def _activation(name, x):
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu":  # x * Phi(x)
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    if name == "gelu_tanh":  # Hendrycks & Gimpel (2016), Sec. 2
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(name)


def _norm(cfg, p, x):
    """RMSNorm (Zhang & Sennrich, 2019, Eq. 4) or LayerNorm (Ba et al., 2016) over ``D``."""
    if cfg.norm == "rms":
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + cfg.norm_eps) * p["scale"]
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]


def _linear(p, x, contract):
    """``x @ kernel (+ bias)``, contracting the last ``contract`` axes of ``x``."""
    y = np.tensordot(x, p["kernel"], axes=contract)
    return y + p["bias"] if "bias" in p else y


def _rotate(x, positions, theta):
    """Rotary embedding of ``x`` ``[T, N, Dh]`` at ``positions`` ``[T]``, as complex numbers."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])  # [Dh/2]
    z = x[..., :half] + 1j * x[..., half:]  # [T, N, Dh/2]
    z = z * np.exp(1j * positions[:, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def _attention(cfg, p, x, positions, valid):
    """Causal self-attention of one row ``x`` ``[T, D]``; ``valid`` ``[T]`` marks real tokens."""
    q = _linear(p["q_proj"], x, 1)  # [T, H, Dh]
    k = _linear(p["k_proj"], x, 1)  # [T, K, Dh]
    v = _linear(p["v_proj"], x, 1)  # [T, K, Dh]
    if cfg.position == "rope":
        q = _rotate(q, positions, cfg.rope_theta)
        k = _rotate(k, positions, cfg.rope_theta)
    seq, num_heads, head_dim = q.shape
    group = num_heads // cfg.num_kv_heads
    out = np.zeros_like(q)
    for t in range(seq):
        allowed = [s for s in range(t + 1) if valid[s]]  # causal, no padding keys
        if not allowed:
            continue  # a padding query before the first real token: left at 0, never compared
        for h in range(num_heads):
            kv = h // group
            scores = np.array([q[t, h] @ k[s, kv] for s in allowed]) / math.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, h] = sum(w * v[s, kv] for w, s in zip(weights, allowed, strict=True))
    return _linear(p["o_proj"], out, 2)  # [T, H, Dh] -> [T, D]


def _mlp(cfg, p, x):
    up = _linear(p["up_proj"], x, 1)
    if cfg.gated_mlp:
        hidden = _activation(cfg.activation, _linear(p["gate_proj"], x, 1)) * up
    else:
        hidden = _activation(cfg.activation, up)
    return _linear(p["down_proj"], hidden, 1)


def reference_logits(cfg, params, ids, mask):
    """Logits ``[B, T, V]`` of the float64 reference (meaningless at padding positions)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = []
    for row_ids, valid in zip(ids, mask.astype(bool), strict=True):
        # The n-th real token of the row has position n; padding positions are never used.
        positions = np.zeros(len(row_ids), np.int64)
        positions[valid] = np.arange(valid.sum())
        x = p["embed"]["embedding"][row_ids]  # [T, D]
        if cfg.position == "learned":
            x = x + p["pos_embed"]["embedding"][positions]
        for i in range(cfg.num_layers):
            layer = jax.tree.map(lambda a, i=i: a[i], p["layers"])
            h = _norm(cfg, layer["attn_norm"], x)
            x = x + _attention(cfg, layer["attn"], h, positions, valid)
            x = x + _mlp(cfg, layer["mlp"], _norm(cfg, layer["mlp_norm"], x))
        x = _norm(cfg, p["final_norm"], x)
        if cfg.tie_embeddings:
            out.append(x @ p["embed"]["embedding"].T)
        else:
            out.append(x @ p["lm_head"]["kernel"])
    return np.stack(out)


# ------------------------------------------------------------------------------------------------
# The comparison.


def _batch():
    """[3, 10] ids left-padded by 0, 3 and 6 tokens."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, PAD, size=(3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _perturbed_model(overrides):
    """A float32 model whose norm scales and biases are random too (``1 + 0.2 N``, ``0.2 N``)."""
    model = pm.from_preset("tiny", key=jax.random.key(0), init_std=0.1, **overrides)
    rng = np.random.RandomState(1)

    def perturb(path, x):
        name = path[-1].key
        if name == "scale":
            return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        if name == "bias":
            return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        return x

    return pm.Model(model.config, jax.tree_util.tree_map_with_path(perturb, model.params))


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def case(request):
    """(model, prefjax logits, reference logits, mask) for one config."""
    model = _perturbed_model(CONFIGS[request.param])
    ids, mask = _batch()
    logits = np.asarray(jax.jit(model.apply)(model.params, ids, mask))
    ref = reference_logits(model.config, model.params, ids, mask)
    return model, logits, ref, mask


def test_config_is_what_the_reference_assumes(case):
    model, _, _, _ = case
    assert model.config.dtype == np.float32 and model.config.rope_scaling is None
    assert model.config.sliding_window is None  # not modelled by the reference


def test_reference_is_not_flat(case):
    """Logits vary by O(1) across tokens and vocabulary, so ATOL = 1e-5 is a strict test."""
    _, _, ref, mask = case
    real = ref[mask == 1]  # [real tokens, V]
    assert real.std() > 0.3
    assert np.abs(np.diff(real, axis=0)).max() > 0.3


def test_logits_match_numpy_reference(case):
    _, logits, ref, mask = case
    real = mask == 1
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits[real], ref[real], atol=ATOL, rtol=0)
