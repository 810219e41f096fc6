"""Sampling from a causal LM with the fixed-shape KV cache.

:func:`generate` prefills the prompt once, samples the first token from the prompt's last logits,
then runs one :meth:`Model.decode_step` and one sampling step per further token inside a
``lax.while_loop`` (stopping early when every row has produced EOS). Everything has fixed shapes,
so the whole sampler is one jitted program per ``(config, max_new_tokens, sampling settings)``;
params, prompts, adapters and the key are ordinary traced arguments. The loop carries the KV cache,
which every step updates in place (only the new token's keys/values are written), and the last
token needs no decode step, so ``N`` new tokens cost ``N - 1`` steps.

Prompts may be left-padded (the usual choice) or right-padded: the first new token is sampled from
the logits at each row's last real prompt token, and positions continue from the number of real
tokens, so both give the same continuation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from prefjax.models.config import TransformerConfig
from prefjax.models.model import LoRA, Model, Params
from prefjax.models.transformer import KVCache, last_token_index


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
      tokens: ``[B, N]`` int32 new tokens; ``pad_id`` after a row's EOS.
      mask: ``[B, N]`` int32, 1 for generated tokens up to and including the first EOS.
      logprobs: ``[B, N]`` float32 log-probability of each token under ``softmax(logits /
        temperature)`` (plain ``softmax(logits)`` for greedy decoding), before top-k / top-p
        truncation; 0 where ``mask`` is 0, and 0 everywhere with ``logprobs=False``.
      lengths: ``[B]`` int32 number of generated tokens (``mask.sum(-1)``).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


def sample_logits(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """Sample token ids ``[B]`` from logits ``[B, V]``.

    ``temperature == 0`` is greedy (argmax). ``top_k > 0`` keeps the ``k`` most likely tokens;
    ``top_p < 1`` keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al., 2020). Both may be combined (top-k first).

    Example:
      >>> logits = jnp.array([[0.0, 5.0, 1.0]])
      >>> sample = prefjax.models.sample_logits
      >>> int(sample(jax.random.key(0), logits, temperature=0.0)[0])
      1
      >>> int(sample(jax.random.key(0), logits, top_k=1)[0])
      1
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (the top token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class _Sampled(NamedTuple):
    """What the loop keeps of the tokens sampled so far."""

    step: jax.Array  # [] number of tokens sampled so far
    key: jax.Array
    tokens: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N]
    done: jax.Array  # [B] bool, EOS already produced


class _Carry(NamedTuple):
    cache: KVCache
    sampled: _Sampled


def _token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """``log softmax(logits / temperature)[tokens]`` ``[B]`` as ``z[token] - logsumexp(z)``:
    one reduction over the vocabulary instead of a ``[B, V]`` log-softmax array."""
    z = logits if temperature == 0.0 else logits / temperature
    picked = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "head",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_ids",
        "pad_id",
        "logprobs",
    ),
)
def _generate(
    params,
    prompt_ids,
    prompt_mask,
    key,
    lora,
    *,
    config: TransformerConfig,
    head: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
    logprobs: bool,
):
    model = Model(config, None, head=head)
    batch, prompt_len = prompt_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    # The LM head only at each row's last prompt token: [B, D] @ [D, V], not [B, P, D] @ [D, V]
    # (at batch 32 and 64-token prompts the full prompt logits cost as much as 64 decode steps).
    hidden, cache = model.prefill(
        params, prompt_ids, prompt_mask, cache, lora=lora, return_hidden=True
    )
    last = last_token_index(prompt_mask)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    first_logits = jnp.einsum(
        "bd,dv->bv", last_hidden, model.unembedding(params), preferred_element_type=jnp.float32
    )
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def sample(s: _Sampled, logits: jax.Array) -> _Sampled:
        # Sample token `s.step` from its logits [B, V]; rows past their EOS get pad_id.
        key, subkey = jax.random.split(s.key)
        logits = logits.astype(jnp.float32)
        tok = sample_logits(subkey, logits, temperature=temperature, top_k=top_k, top_p=top_p)
        # The log-prob is a log-sum-exp over the vocabulary per row and step: left out when no
        # caller reads it (at batch 64 and 32,000 tokens, ~10 % of a CPU decode step).
        logp = jnp.zeros(tok.shape, jnp.float32)
        if logprobs:
            logp = _token_logprobs(logits, tok, temperature)
        tok = jnp.where(s.done, pad_id, tok)
        logp = jnp.where(s.done, 0.0, logp)
        return _Sampled(
            step=s.step + 1,
            key=key,
            tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logp[:, None], (0, s.step)),
            done=s.done | jnp.isin(tok, eos),
        )

    def cond(c: _Carry):
        return (c.sampled.step < max_new_tokens) & ~jnp.all(c.sampled.done)

    def body(c: _Carry):
        # Feed the last sampled token, then sample the next one from its logits.
        tok = jax.lax.dynamic_index_in_dim(c.sampled.tokens, c.sampled.step - 1, 1, False)
        logits, cache = model.decode_step(params, tok, c.cache, lora=lora)
        return _Carry(cache, sample(c.sampled, logits))

    first = sample(
        _Sampled(
            step=jnp.zeros((), jnp.int32),
            key=key,
            tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
            logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
            done=jnp.zeros((batch,), bool),
        ),
        first_logits,
    )
    final = jax.lax.while_loop(cond, body, _Carry(cache, first)).sampled
    # A token counts if no EOS came strictly before it.
    is_eos = jnp.isin(final.tokens, eos)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
    steps = jnp.arange(max_new_tokens)[None, :]
    mask = ((eos_before == 0) & (steps < final.step)).astype(jnp.int32)
    return GenerateOutput(
        tokens=jnp.where(mask == 1, final.tokens, pad_id),
        mask=mask,
        logprobs=final.logprobs * mask,
        lengths=mask.sum(-1),
    )


def generate(
    model: Model,
    params: Params,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    lora: LoRA | None = None,
    logprobs: bool = True,
) -> GenerateOutput:
    """Sample ``max_new_tokens`` tokens after each prompt with the KV cache (jitted).

    Args:
      model: an LM-head :class:`Model` (its ``config`` is used; ``params`` are passed explicitly).
      params: parameters.
      prompt_ids: ``[B, P]`` int prompts (left-padded preferably).
      prompt_mask: ``[B, P]`` 0/1, 1 for real prompt tokens; every row needs at least one.
      key: PRNG key (unused for greedy decoding but still required, to keep one signature).
      max_new_tokens: number of tokens to generate (static).
      temperature: softmax temperature; 0 means greedy.
      top_k: keep only the ``k`` most likely tokens (0 = off).
      top_p: nucleus sampling mass (1 = off).
      eos_id: id(s) that end a row (e.g. a tokenizer's ``eos_id``); ``None`` generates exactly
        ``max_new_tokens`` tokens.
      pad_id: id written after a row has ended.
      lora: optional adapters.
      logprobs: compute each token's log-probability (``GenerateOutput.logprobs``); ``False``
        skips the per-step log-sum-exp over the vocabulary and leaves them 0 (decoding for
        evaluation, where only the tokens are read).

    Returns:
      A :class:`GenerateOutput`.

    Example:
      >>> model = prefjax.models.from_preset("tiny", key=jax.random.key(0))
      >>> out = prefjax.models.generate(model, model.params, jnp.array([[1, 2, 3]]),
      ...                               jnp.ones((1, 3)), key=jax.random.key(1), max_new_tokens=4)
      >>> out.tokens.shape, int(out.lengths[0])
      ((1, 4), 4)
    """
    if model.head != "lm":
        raise ValueError(f"generate needs an LM head, the model has head {model.head!r}")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"generate: prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be "
            "equal [batch, prompt_len] shapes"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    if cfg.position == "learned" and prompt_ids.shape[1] + max_new_tokens > cfg.max_positions:
        raise ValueError(
            f"generate: prompt length {prompt_ids.shape[1]} + max_new_tokens {max_new_tokens} "
            f"exceeds TransformerConfig.max_positions={cfg.max_positions}"
        )
    if eos_id is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos_id, int):
        eos_ids = (eos_id,)
    else:
        eos_ids = tuple(int(e) for e in eos_id)
    return _generate(
        params,
        prompt_ids,
        prompt_mask,
        key,
        lora,
        config=cfg,
        head=model.head,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_ids=eos_ids,
        pad_id=int(pad_id),
        logprobs=bool(logprobs),
    )


def greedy_generate(
    model: Model,
    params: Params,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    lora: LoRA | None = None,
    logprobs: bool = True,
) -> GenerateOutput:
    """Greedy decoding: :func:`generate` with ``temperature=0``."""
    return generate(
        model,
        params,
        prompt_ids,
        prompt_mask,
        key=jax.random.key(0),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        eos_id=eos_id,
        pad_id=pad_id,
        lora=lora,
        logprobs=logprobs,
    )
