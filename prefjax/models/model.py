"""The :class:`Model` object: a config, a parameter pytree and pure functions over them.

``Model`` is what training code holds. It wraps the linen :class:`~prefjax.models.transformer.
Transformer` so that callers never see variable collections or boxed metadata:

* ``model.params`` is a plain nested dict of arrays; ``model.param_axes`` the same structure with a
  tuple of logical axis names per leaf (for ``prefjax.sharding``);
* ``model.apply(params, input_ids, attention_mask)`` is pure and jit-safe (the caller jits);
* LoRA adapters are a separate pytree (:class:`LoRA`), so the frozen base doubles as the reference
  policy: ``model.apply(params, ...)`` is the reference, ``model.apply(params, ..., lora=lora)`` the
  policy;
* ``init_cache`` / ``prefill`` / ``decode_step`` expose the fixed-shape KV cache for samplers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prefjax.models import transformer as tf
from prefjax.models.config import TransformerConfig, preset
from prefjax.models.transformer import HEADS, LORA_TARGETS, KVCache, LoraSpec

Params = Any


class LoRA(flax.struct.PyTreeNode):
    """LoRA adapters: a pytree of ``a``/``b`` matrices plus static hyper-parameters.

    ``weights`` mirrors the parameter tree, holding ``{"a": [L, *in, r], "b": [L, r, *out]}`` under
    each adapted projection (e.g. ``weights["layers"]["attn"]["q_proj"]``). An adapted projection
    computes ``W x + (alpha / r) * b(a(dropout(x)))`` (Hu et al., 2021, Eq. 3 with the
    ``alpha / r`` scaling of Sec. 4.1). ``alpha`` and ``dropout`` are static (not leaves), so
    ``jax.grad`` and optax see only the matrices.
    """

    weights: dict
    alpha: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        """The adapter rank ``r`` (last axis of every ``a``)."""
        leaves = jax.tree_util.tree_leaves_with_path(self.weights)
        for path, leaf in leaves:
            if getattr(path[-1], "key", None) == "a":
                return int(leaf.shape[-1])
        raise ValueError("LoRA.weights holds no adapter")

    @property
    def targets(self) -> tuple[str, ...]:
        """Names of the adapted projections, e.g. ``("q_proj", "v_proj")``."""
        found = set()

        def visit(tree):
            for name, sub in tree.items():
                if isinstance(sub, dict) and "a" in sub and "b" in sub:
                    found.add(name)
                elif isinstance(sub, dict):
                    visit(sub)

        visit(self.weights)
        return tuple(t for t in LORA_TARGETS if t in found)

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


def _axes_tree(boxed) -> Any:
    """Boxed (``nn.LogicallyPartitioned``) variables -> tuples of logical axis names."""
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _check_tokens(input_ids, attention_mask, where: str):
    if input_ids.ndim != 2:
        raise ValueError(f"{where}: input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{where}: attention_mask shape {attention_mask.shape} != input_ids shape "
            f"{input_ids.shape}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{where}: input_ids must be integers, got {input_ids.dtype}")


class Model:
    """A transformer with one head, its parameters and pure functions over them.

    Build one with :func:`from_preset`, :func:`from_pretrained` or ``Model.init(config, key)``.

    Attributes:
      config: the :class:`~prefjax.models.config.TransformerConfig`.
      head: ``"lm"`` (logits ``[B, T, V]``), ``"reward"`` (``[B]`` at the last real token) or
        ``"value"`` (``[B, T]``).
      params: the parameter pytree (plain nested dicts of arrays).

    Example:
      >>> model = prefjax.models.from_preset("tiny", key=jax.random.key(0))
      >>> ids = jnp.array([[5, 6, 7, 8], [0, 0, 9, 10]])
      >>> mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1]])
      >>> model.apply(model.params, ids, mask).shape
      (2, 4, 264)
      >>> model.param_axes["layers"]["attn"]["q_proj"]["kernel"]
      ('layers', 'embed', 'heads', 'head_dim')
    """

    def __init__(self, config: TransformerConfig, params: Params, *, head: str = "lm"):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        self.config = config
        self.head = head
        self.params = params

    def __repr__(self):
        return f"Model(head={self.head!r}, config={self.config!r})"

    # -- construction ------------------------------------------------------------------------

    def module(self, lora: LoRA | LoraSpec | None = None, deterministic: bool = True):
        """The linen module (for advanced use; ``apply`` is the usual entry point)."""
        if isinstance(lora, LoRA):
            spec = LoraSpec(scale=lora.scale, dropout=lora.dropout)
        elif isinstance(lora, LoraSpec):
            spec = lora
        else:
            spec = LoraSpec()
        return tf.Transformer(self.config, self.head, spec, deterministic)

    @classmethod
    def init(cls, config: TransformerConfig, key: jax.Array, *, head: str = "lm") -> Model:
        """A model with freshly initialised parameters."""
        params = _init_params(config, head, key)
        return cls(config, params, head=head)

    @functools.cached_property
    def param_axes(self) -> Params:
        """Logical axis names of every parameter (same structure as ``params``)."""
        return _param_axes(self.config.for_init(), self.head)

    def with_head(self, head: str, *, key: jax.Array | None = None, params: Params = None) -> Model:
        """The same trunk with another head (e.g. a reward or value model from a policy).

        The trunk parameters are shared (not copied: JAX arrays are immutable); the new head is
        initialised from ``key`` (default ``jax.random.key(0)``).
        """
        params = self.params if params is None else params
        trunk = {
            k: v for k, v in params.items() if k not in ("lm_head", "reward_head", "value_head")
        }
        key = jax.random.key(0) if key is None else key
        new_head = _init_head_params(self.config, head, key)
        return Model(self.config, {**trunk, **new_head}, head=head)

    # -- forward -----------------------------------------------------------------------------

    def _run(self, params, input_ids, attention_mask, positions, lora, key, return_hidden):
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.asarray(attention_mask)
        _check_tokens(input_ids, attention_mask, "Model.apply")
        cfg = self.config
        if cfg.position == "learned" and input_ids.shape[1] > cfg.max_positions:
            raise ValueError(
                f"Model.apply: sequence length {input_ids.shape[1]} exceeds the learned position "
                f"table (TransformerConfig.max_positions={cfg.max_positions})"
            )
        if positions is None:
            positions = tf.default_positions(attention_mask)
        variables = {"params": params}
        if lora is not None:
            variables["lora"] = lora.weights
        deterministic = key is None or lora is None or lora.dropout == 0.0
        rngs = {} if deterministic else {"dropout": key}
        out, _ = self.module(lora, deterministic).apply(
            variables,
            input_ids,
            attention_mask,
            positions,
            None,
            return_hidden=return_hidden,
            rngs=rngs,
        )
        return out

    def apply(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        lora: LoRA | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Forward pass through the head.

        Args:
          params: parameter pytree.
          input_ids: ``[B, T]`` int token ids (left or right padded).
          attention_mask: ``[B, T]`` 0/1, 1 for real tokens; or, for packed rows, 0 for padding
            and each sequence's segment id (tokens attend within their segment only).
          positions: ``[B, T]`` position ids; default ``cumsum(attention_mask) - 1`` (0/1 masks;
            packed rows pass their per-segment positions).
          lora: optional adapters (the base ``params`` stay as given).
          key: PRNG key for LoRA dropout; without it dropout is off.

        Returns:
          ``"lm"``: float32 logits ``[B, T, V]`` (position t predicts token t+1);
          ``"reward"``: float32 ``[B]``; ``"value"``: float32 ``[B, T]``.
        """
        return self._run(params, input_ids, attention_mask, positions, lora, key, False)

    def __call__(self, *args, **kwargs):
        return self.apply(*args, **kwargs)

    def hidden_states(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        lora: LoRA | None = None,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states ``[B, T, D]`` (after the final norm, compute dtype)."""
        return self._run(params, input_ids, attention_mask, positions, lora, key, True)

    def reward_of_hidden(self, params: Params, hidden: jax.Array) -> jax.Array:
        """The reward head on final hidden states: ``[..., D] -> [...]`` float32.

        ``apply`` of a reward model reads the head at each row's last real token; packed rows
        (several sequences per row) read it at each segment's last token instead, so they take
        :meth:`hidden_states` and gather those tokens first.
        """
        if self.head != "reward":
            raise ValueError(f"reward_of_hidden needs a reward head, this model's is {self.head!r}")
        kernel = params["reward_head"]["kernel"].astype(jnp.float32)  # [D, 1]
        return jnp.tensordot(hidden.astype(jnp.float32), kernel, axes=1)[..., 0]

    def unembedding(self, params: Params) -> jax.Array:
        """The ``[D, V]`` output matrix in the compute dtype, so that
        ``hidden_states(...) @ unembedding(params)`` equals the LM logits (up to float32
        accumulation)."""
        if self.config.tie_embeddings:
            return params["embed"]["embedding"].T.astype(self.config.dtype)
        if "lm_head" not in params:
            raise ValueError("params have no 'lm_head' (untied embeddings, non-LM head?)")
        return params["lm_head"]["kernel"].astype(self.config.dtype)

    # -- LoRA --------------------------------------------------------------------------------

    def init_lora(
        self,
        key: jax.Array,
        *,
        rank: int,
        alpha: float,
        targets: Sequence[str] = ("q_proj", "v_proj"),
        dropout: float = 0.0,
    ) -> LoRA:
        """New LoRA adapters: ``a`` Kaiming-uniform, ``b`` zero (so the adapted model starts equal
        to the base).

        Args:
          key: PRNG key.
          rank: adapter rank ``r`` > 0.
          alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
          targets: projections to adapt, from ``LORA_TARGETS`` (``"all"`` for every one).
          dropout: dropout rate on the adapter input during training (needs ``key`` in ``apply``).
        """
        targets = _check_lora_args(self.config, rank, targets, dropout)
        weights = _init_lora_weights(
            self.config.for_init(), self.head, rank, targets, key, self.params
        )
        return LoRA(weights=weights, alpha=float(alpha), dropout=float(dropout))

    def lora_axes(self, lora: LoRA) -> LoRA:
        """Logical axis names of the adapters (a :class:`LoRA` with tuples as leaves)."""
        axes = _lora_axes(self.config.for_init(), self.head, lora.rank, lora.targets)
        return LoRA(weights=axes, alpha=lora.alpha, dropout=lora.dropout)

    def merge_lora(self, params: Params, lora: LoRA) -> Params:
        """Base parameters with ``(alpha / r) * a @ b`` added to each adapted kernel."""
        return merge_lora(params, lora)

    # -- KV cache ----------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty :class:`~prefjax.models.transformer.KVCache` (``max_len`` slots per row)."""
        cfg = self.config
        if cfg.position == "learned" and max_len > cfg.max_positions:
            raise ValueError(
                f"init_cache: max_len={max_len} exceeds the learned position table "
                f"(TransformerConfig.max_positions={cfg.max_positions})"
            )
        return tf.init_cache(cfg, batch_size, max_len)

    def prefill(
        self,
        params: Params,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache,
        *,
        lora: LoRA | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Run ``input_ids`` ``[B, T]`` through the model, appending them to ``cache``.

        Tokens are written to slots ``cache.length ... cache.length + T - 1``; positions continue
        from ``cache.next_position`` (``cumsum(attention_mask) - 1`` on an empty cache), so prompts
        are best left-padded. The caller must keep ``cache.length + T <= cache.max_len``.

        Returns:
          The head's output for the ``T`` tokens (logits ``[B, T, V]`` for an LM), or with
          ``return_hidden`` the final hidden states ``[B, T, D]`` (a sampler needs the logits of
          the last prompt token only: ``hidden @ unembedding(params)`` there), and the cache.
        """
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.asarray(attention_mask)
        _check_tokens(input_ids, attention_mask, "Model.prefill")
        if input_ids.shape[1] > cache.max_len:
            raise ValueError(
                f"Model.prefill: {input_ids.shape[1]} tokens do not fit a cache of "
                f"{cache.max_len} slots"
            )
        positions = cache.next_position[:, None] + tf.default_positions(attention_mask)
        variables = {"params": params}
        if lora is not None:
            variables["lora"] = lora.weights
        return self.module(lora).apply(
            variables, input_ids, attention_mask, positions, cache, return_hidden=return_hidden
        )

    def decode_step(
        self, params: Params, tokens: jax.Array, cache: KVCache, *, lora: LoRA | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Append one token per row (``tokens`` ``[B]``) and return its output and the cache.

        Returns:
          Logits ``[B, V]`` for an LM (values ``[B]`` for a value head) and the updated cache.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"Model.decode_step: tokens must be [batch], got shape {tokens.shape}")
        ids = tokens[:, None]
        mask = jnp.ones_like(ids, dtype=jnp.int32)
        positions = cache.next_position[:, None]
        variables = {"params": params}
        if lora is not None:
            variables["lora"] = lora.weights
        out, cache = self.module(lora).apply(variables, ids, mask, positions, cache)
        return out[:, 0], cache


# ------------------------------------------------------------------------------------------------
# Initialisation helpers (cached per static arguments; XLA drops whatever a jitted init does not
# return, so initialising only a head or only adapters never materialises a random trunk).


def _dummy_inputs():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.ones_like(ids), jnp.zeros_like(ids)


@functools.lru_cache(maxsize=64)
def _init_fn(config: TransformerConfig, head: str):
    """Boxed (``nn.LogicallyPartitioned``) parameter initialiser ``key -> params``."""
    module = tf.Transformer(config.for_init(), head)

    def init(key):
        return module.init({"params": key}, *_dummy_inputs())["params"]

    return init


@functools.lru_cache(maxsize=64)
def _jitted_init(config: TransformerConfig, head: str, part: str | None):
    """Jitted unboxed initialiser of all parameters (``part=None``) or of one entry."""

    def init(key):
        params = nn.unbox(_init_fn(config, head)(key))
        return params if part is None else params[part]

    return jax.jit(init)


def _init_params(config, head, key) -> Params:
    return _jitted_init(config.for_init(), head, None)(key)


def _init_head_params(config, head, key) -> Params:
    names = {"lm": "lm_head", "reward": "reward_head", "value": "value_head"}
    name = names[head]
    if head == "lm" and config.tie_embeddings:
        return {}
    return {name: _jitted_init(config.for_init(), head, name)(key)}


@functools.lru_cache(maxsize=64)
def _param_axes(config: TransformerConfig, head: str) -> Params:
    boxed = jax.eval_shape(_init_fn(config, head), jax.random.key(0))
    return _axes_tree(boxed)


def _check_lora_args(config, rank, targets, dropout) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if targets == ("all",):
        targets = (
            LORA_TARGETS if config.gated_mlp else tuple(t for t in LORA_TARGETS if t != "gate_proj")
        )
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if not targets:
        raise ValueError("LoRA targets is empty")
    for t in targets:
        if t not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; expected names from {LORA_TARGETS}")
        if t == "gate_proj" and not config.gated_mlp:
            raise ValueError(
                "LoRA target 'gate_proj' needs a gated MLP (TransformerConfig.gated_mlp)"
            )
    return tuple(t for t in LORA_TARGETS if t in targets)


@functools.lru_cache(maxsize=64)
def _lora_init_fn(config, head, rank, targets):
    module = tf.Transformer(config.for_init(), head, LoraSpec(rank=rank, targets=targets))

    def init(key, params):
        _, variables = module.apply(
            {"params": params}, *_dummy_inputs(), mutable=["lora"], rngs={"params": key}
        )
        return variables["lora"]

    return init


@functools.lru_cache(maxsize=64)
def _jitted_lora_init(config, head, rank, targets):
    init = _lora_init_fn(config, head, rank, targets)
    return jax.jit(lambda k, p: nn.unbox(init(k, p)))


def _init_lora_weights(config, head, rank, targets, key, params):
    return _jitted_lora_init(config, head, rank, targets)(key, params)


@functools.lru_cache(maxsize=64)
def _lora_axes(config, head, rank, targets):
    init = _lora_init_fn(config, head, rank, targets)
    params = jax.eval_shape(_init_fn(config, head), jax.random.key(0))
    boxed = jax.eval_shape(init, jax.random.key(0), nn.unbox(params))
    return _axes_tree(boxed)


def merge_lora(params: Params, lora: LoRA) -> Params:
    """Fold adapters into the base: ``kernel + (alpha / r) * a @ b`` for each adapted projection.

    The result has the base's structure and dtypes, so ``apply(merge_lora(p, l), ...)`` equals
    ``apply(p, ..., lora=l)`` (without dropout) and can be exported with ``save_pretrained``.
    """
    scale = lora.scale

    def merge(p, w):
        out = dict(p)
        for name, sub in w.items():
            if name not in p:
                raise ValueError(f"LoRA adapter {name!r} has no matching parameter")
            if isinstance(sub, dict) and set(sub) == {"a", "b"}:
                kernel = p[name]["kernel"]
                a = sub["a"].astype(jnp.float32)  # [L, *in, r]
                b = sub["b"].astype(jnp.float32)  # [L, r, *out]
                # Contract the rank axis, keeping the leading layers axis: [L, *in, *out].
                delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
                if delta.shape != kernel.shape:
                    raise ValueError(
                        f"LoRA adapter {name!r}: a @ b has shape {delta.shape}, kernel "
                        f"{kernel.shape}"
                    )
                merged = kernel.astype(jnp.float32) + scale * delta
                out[name] = {**p[name], "kernel": merged.astype(kernel.dtype)}
            else:
                out[name] = merge(p[name], sub)
        return out

    return merge(params, lora.weights)


def from_preset(
    name: str,
    *,
    key: jax.Array,
    head: str = "lm",
    **overrides,
) -> Model:
    """A randomly initialised model of a named preset (no files needed).

    Args:
      name: ``"tiny"``, ``"gpt2"`` or ``"llama1b"`` (see :func:`~prefjax.models.config.preset`).
      key: PRNG key for the initialisation.
      head: ``"lm"``, ``"reward"`` or ``"value"``.
      **overrides: config fields to change, e.g. ``vocab_size=32000``, ``dtype=jnp.bfloat16``,
        ``remat="dots"``.

    Example:
      >>> model = prefjax.models.from_preset("tiny", key=jax.random.key(0), remat="dots")
      >>> model.config.num_layers, model.config.remat, prefjax.models.param_count(model.params)
      (2, 'dots', 107840)
    """
    config = preset(name, **overrides)
    return Model.init(config, key, head=head)


def param_count(params: Params) -> int:
    """Total number of scalars in a pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
