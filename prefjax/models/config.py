"""The one configuration dataclass every prefjax transformer is built from, and the named presets.

A :class:`TransformerConfig` describes a decoder-only transformer of the Llama / Mistral / Qwen2 /
GPT-2 families: the choice of normalisation, position encoding, attention grouping, MLP type and
biases are fields, not subclasses. It is frozen and hashable, so it can be closed over by jitted
functions. ``dtype`` is the compute dtype (activations, matmul inputs) and ``param_dtype`` the
storage dtype of the parameters; bfloat16 compute with float32 parameters is the usual
mixed-precision set-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prefjax.tokenizer import ByteTokenizer

# Names accepted by ``TransformerConfig.remat``: "none" keeps every activation, "full" recomputes
# the whole layer in the backward pass, "dots" saves only the outputs of weight matmuls (no batch
# dimensions) and recomputes the rest -- usually the best speed/memory trade-off.
REMAT_POLICIES = ("none", "full", "dots")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (Hugging Face ``rope_parameters`` / ``rope_scaling``).

    Attributes:
      rope_type: ``"llama3"`` (Llama 3.1/3.2 piecewise scaling) or ``"linear"`` (positions divided
        by ``factor``).
      factor: the context-extension factor.
      low_freq_factor: Llama-3 only, wavelengths above ``original_max_position_embeddings /
        low_freq_factor`` are divided by ``factor``.
      high_freq_factor: Llama-3 only, wavelengths below ``original_max_position_embeddings /
        high_freq_factor`` are kept; those in between are interpolated smoothly.
      original_max_position_embeddings: the pre-training context length.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is not supported "
                "(expected 'llama3' or 'linear')"
            )


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: number of token ids (rows of the embedding).
      hidden_size: width ``D`` of the residual stream.
      num_layers: number of transformer blocks ``L``.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``K`` (``H`` = multi-head, 1 = multi-query, else grouped-query);
        must divide ``num_heads``.
      mlp_dim: hidden width ``F`` of the MLP.
      head_dim: per-head width; ``None`` means ``hidden_size // num_heads``.
      max_positions: the longest sequence (size of the learned position table; documentation
        only for rotary models).
      norm: ``"rms"`` (Llama) or ``"layer"`` (GPT-2, with bias).
      norm_eps: epsilon inside the normalisation.
      position: ``"rope"`` (rotary) or ``"learned"`` (absolute table added to the embeddings).
      rope_theta: rotary base frequency.
      rope_scaling: optional :class:`RopeScaling` (Llama-3 frequency scaling).
      qkv_bias: bias on the query/key/value projections (Qwen2, GPT-2).
      out_bias: bias on the attention output projection (GPT-2).
      mlp_bias: biases in the MLP (GPT-2).
      gated_mlp: ``True`` for SwiGLU-style ``down(act(gate(x)) * up(x))``, ``False`` for
        ``down(act(up(x)))``.
      activation: ``"silu"``, ``"gelu"`` (exact), ``"gelu_tanh"`` (GPT-2's ``gelu_new``) or
        ``"relu"``.
      tie_embeddings: the LM head is the transposed token embedding.
      sliding_window: if set, a query attends only to keys less than this many positions back
        (Mistral / Qwen2 sliding-window attention).
      sliding_window_layers: which layers use the sliding window (one bool per layer, Qwen2's
        ``layer_types``); ``None`` means all layers when ``sliding_window`` is set.
      attention_impl: ``implementation`` passed to ``jax.nn.dot_product_attention``: ``None``
        (let JAX choose), ``"xla"`` or ``"cudnn"`` (flash attention; bf16/fp16 on recent GPUs).
      cache_block_size: KV-cache slots per block of the cached (prefill/decode) attention, which
        reads only the blocks that hold tokens (see ``transformer.cached_attention``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
      remat: one of ``"none"``, ``"full"``, ``"dots"`` (see ``REMAT_POLICIES``).
      scan_unroll: run the layers one after another in the program instead of in a loop over
        the stacked weights (one copy of the block per layer: the same parameters and
        arithmetic, no per-layer stacking of residuals for the backward pass, a longer
        compilation; the cached decoding path still scans). XLA's cost analysis counts a loop
        body once, so ``prefjax.train.cost`` unrolls to count every layer's FLOPs.
      init_std: standard deviation of the normal initialiser of weight matrices and embeddings.
      model_type: the Hugging Face family used on export (``"llama"``, ``"mistral"``, ``"qwen2"``,
        ``"gpt2"``).
      bos_token_id, eos_token_id, pad_token_id: carried through to the exported ``config.json``.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None
    max_positions: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    gated_mlp: bool = True
    activation: str = "silu"
    tie_embeddings: bool = False
    sliding_window: int | None = None
    sliding_window_layers: tuple[bool, ...] | None = None
    attention_impl: str | None = None
    cache_block_size: int = 128
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_unroll: bool = False
    init_std: float = 0.02
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}: {msg}")

        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            check(getattr(self, field) > 0, field, "must be positive")
        check(self.mlp_dim > 0, "mlp_dim", "must be positive")
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads={self.num_heads}",
        )
        if self.head_dim is None:
            check(
                self.hidden_size % self.num_heads == 0,
                "hidden_size",
                f"must be divisible by num_heads={self.num_heads} when head_dim is None",
            )
        check(self.norm in ("rms", "layer"), "norm", "expected 'rms' or 'layer'")
        check(self.position in ("rope", "learned"), "position", "expected 'rope' or 'learned'")
        if self.position == "rope":
            check(self.resolved_head_dim % 2 == 0, "head_dim", "rotary needs an even head_dim")
        check(self.activation in ACTIVATIONS, "activation", f"expected one of {ACTIVATIONS}")
        check(self.remat in REMAT_POLICIES, "remat", f"expected one of {REMAT_POLICIES}")
        check(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"expected one of {ATTENTION_IMPLS}",
        )
        check(
            self.sliding_window is None or self.sliding_window > 0,
            "sliding_window",
            "must be None or positive",
        )
        if self.sliding_window_layers is not None:
            check(
                self.sliding_window is not None
                and len(self.sliding_window_layers) == self.num_layers,
                "sliding_window_layers",
                f"needs sliding_window and one entry per layer ({self.num_layers})",
            )
        check(
            self.attention_impl != "cudnn"
            or jnp.dtype(self.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
            "attention_impl",
            "cuDNN flash attention needs dtype bfloat16 or float16",
        )
        check(self.max_positions > 0, "max_positions", "must be positive")
        check(self.cache_block_size > 0, "cache_block_size", "must be positive")

    def layer_windows(self):
        """Per-layer sliding window sizes (0 = full attention), or ``None`` without windows."""
        if self.sliding_window is None:
            return None
        layers = self.sliding_window_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if s else 0 for s in layers)

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``hidden_size // num_heads`` when it is not set."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def for_init(self) -> TransformerConfig:
        """The config used to create parameters: attention kernel and remat do not change the
        parameters, so initialisation always traces the plain XLA path (also on CPU hosts); nor does
        unrolling the layer scan."""
        return dataclasses.replace(self, attention_impl=None, remat="none", scan_unroll=False)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters of the trunk plus the LM head (no reward/value head)."""
        d, f, v, hd = self.hidden_size, self.mlp_dim, self.vocab_size, self.resolved_head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.out_bias:
            attn += d
        mlp = d * f * (3 if self.gated_mlp else 2)
        if self.mlp_bias:
            mlp += f * (2 if self.gated_mlp else 1) + d
        norm = d * (2 if self.norm == "layer" else 1)
        total = self.num_layers * (attn + mlp + 2 * norm) + norm + v * d
        if not self.tie_embeddings:
            total += v * d
        if self.position == "learned":
            total += self.max_positions * d
        return total


def _byte_vocab_size() -> int:
    return ByteTokenizer().vocab_size


def preset(name: str, **overrides) -> TransformerConfig:
    """The configuration of a named preset, with optional field overrides.

    Presets:
      ``tiny``: a Llama-style model small enough for unit tests on a CPU (hidden 64, 2 layers,
        4 query / 2 key-value heads, MLP 128, byte-level vocabulary, 256 positions).
      ``gpt2``: GPT-2 small (hidden 768, 12 layers, 12 heads, learned positions, LayerNorm, GELU,
        tied embeddings, vocabulary 50257, 1024 positions).
      ``llama1b``: Llama-3.2-1B (hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, vocabulary
        128256, rope theta 500000 with Llama-3 scaling factor 32, tied embeddings).

    Args:
      name: one of ``PRESETS``.
      **overrides: fields to change, e.g. ``vocab_size=32000`` or ``dtype=jnp.bfloat16``.

    Returns:
      The :class:`TransformerConfig`.

    Example:
      >>> cfg = prefjax.models.preset("llama1b", vocab_size=32000)
      >>> cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size
      (16, 8, 32000)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


def _tiny() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=_byte_vocab_size(),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        max_positions=256,
        norm_eps=1e-6,
        tie_embeddings=False,
        model_type="llama",
    )


def _gpt2() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        mlp_dim=3072,
        max_positions=1024,
        norm="layer",
        norm_eps=1e-5,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        gated_mlp=False,
        activation="gelu_tanh",
        tie_embeddings=True,
        model_type="gpt2",
        bos_token_id=50256,
        eos_token_id=50256,
    )


def _llama1b() -> TransformerConfig:
    return TransformerConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        head_dim=64,
        max_positions=131072,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_embeddings=True,
        model_type="llama",
        bos_token_id=128000,
        eos_token_id=128001,
    )


PRESETS = {"tiny": _tiny, "gpt2": _gpt2, "llama1b": _llama1b}
