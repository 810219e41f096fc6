r"""Online sampling for RL: n responses per prompt, stop conditions, log-probs the trainer replays.

:func:`sample` decodes with :func:`prefjax.models.generate` (the KV-cache decoder; no second
decoder here) and then scores the sampled tokens with one teacher-forced forward pass under the
*sampling transform* -- temperature, then top-k, then top-p, exactly as
:func:`prefjax.models.sample_logits` applies them:

.. math:: \log\pi_{T,k,p}(y_t \mid x, y_{<t}) = z_{y_t}/T - \log\!\sum_{v \in S_t} e^{z_v/T}

where :math:`S_t` is the set of tokens the transform keeps. :func:`token_logprobs` is that
function; the trainer calls the very same one on its own parameters, so the rollout's ("old")
log-probs and the trainer's log-probs are one numeric path, and the first PPO/GRPO epoch's ratio
is 1 (a classic source of silent bias is a trainer that scores samples under plain
``softmax(logits)`` while the sampler drew them at temperature 0.7 / top-p 0.9). The token that
was sampled is always kept in :math:`S_t`: a logit within rounding of the top-p boundary cannot
turn the sampled token into a ``-inf`` log-prob when the forward pass is replayed.

Rows are prompt-major: the ``n`` samples of prompt ``i`` are rows ``i * n ... i * n + n - 1`` (what
:func:`prefjax.losses.group_advantages` expects). Each row draws its own random stream, so the
``n`` samples of one prompt are distinct draws.

A row ends at the first EOS id, stop id or stop sequence (token ids of a stop string) in its
*response* (never searched in the prompt), included in its response mask; after it the tokens are
``pad_id`` and the mask 0. ``finish_reason`` says why each row ended: :data:`FINISH_EOS`,
:data:`FINISH_STOP` or :data:`FINISH_LENGTH` (the ``max_new_tokens`` budget ran out).

Sharding: :func:`make_sampler` jits :func:`sample` with the prompts split over ``("data",
"fsdp")`` and the parameters in the shardings they have for training (never gathered onto one
device), so a rollout runs data-parallel on the training mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import losses, models
from prefjax import sharding as shd

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
FINISH_REASONS = ("eos", "stop", "length")  # indexed by the FINISH_* codes


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (hashable: one compiled sampler per value).

    Attributes:
      max_new_tokens: response budget per row.
      num_samples: responses per prompt ``n``.
      temperature: softmax temperature (> 0; online RL samples, it never decodes greedily).
      top_k: keep the ``k`` most likely tokens (0 = off).
      top_p: nucleus mass (1 = off).
      eos_ids: ids that end a row with reason ``"eos"``.
      stop_ids: further ids that end a row with reason ``"stop"``.
      stop_sequences: token-id sequences (encoded stop strings) that end a row, reason ``"stop"``.
      pad_id: id written after a row has ended.
    """

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 for sampling")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences: a stop sequence encodes to no tokens")


def stop_sequences_from_strings(tokenizer: Any, stop_strings: Sequence[str]) -> tuple:
    """Stop strings as token-id sequences (``tokenizer.encode`` without special tokens).

    A stop string is matched on these ids, so with a subword tokenizer a string the model writes
    with another segmentation is not matched (byte tokenizers match every occurrence).
    """
    out = []
    for s in stop_strings:
        ids = tuple(int(t) for t in tokenizer.encode(s))
        if not ids:
            raise ValueError(f"stop string {s!r} encodes to no tokens")
        out.append(ids)
    return tuple(out)


class Rollout(NamedTuple):
    """Sampled responses, ``R = num_prompts * n`` rows, prompt-major.

    Attributes:
      prompt_ids: ``[R, P]`` int32 prompts (as given: left-padded preferably), repeated ``n`` times.
      prompt_mask: ``[R, P]`` int32, 1 on real prompt tokens.
      tokens: ``[R, N]`` int32 response tokens, ``pad_id`` after the row ended.
      response_mask: ``[R, N]`` int32, 1 up to and including the token that ended the row.
      logprobs: ``[R, N]`` float32 log-probs of ``tokens`` under the sampling transform (0 where
        the mask is 0), from :func:`token_logprobs`.
      finish_reason: ``[R]`` int32 :data:`FINISH_EOS` / :data:`FINISH_STOP` / :data:`FINISH_LENGTH`.
      lengths: ``[R]`` int32 response tokens (``response_mask.sum(-1)``).
      prompt_index: ``[R]`` int32 row of the prompt batch each response answers.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    finish_reason: jax.Array
    lengths: jax.Array
    prompt_index: jax.Array


def transform_logits(
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    keep: jax.Array | None = None,
) -> jax.Array:
    """Logits ``[..., V]`` of the sampling distribution: ``/ temperature``, then top-k, then top-p.

    Dropped tokens get ``finfo(float32).min``; the thresholds are those of
    :func:`prefjax.models.sample_logits` (top-k keeps logits ``>=`` the k-th largest; top-p keeps
    a token while the mass strictly before it is below ``top_p``). ``keep`` (``[...]`` int ids)
    is never dropped (the sampled token, when replaying).

    Example:
      >>> z = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
      >>> p = jax.nn.softmax(transform_logits(z, top_p=0.6))
      >>> print(jnp.round(p, 3))   # 0.5 alone is below 0.6, so 0.3 is kept too: 5/8, 3/8
      [[0.625 0.375 0.   ]]
    """
    logits = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    vocab = logits.shape[-1]
    kept = jnp.ones(logits.shape, bool)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, vocab))[0][..., -1:]  # [..., 1]
        kept &= logits >= kth
    if top_p < 1.0:
        masked = jnp.where(kept, logits, neg_inf)
        sorted_logits = jnp.sort(masked, axis=-1)[..., ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), -1, keepdims=True)
        kept &= logits >= threshold
    if keep is not None:
        kept |= jnp.arange(vocab) == keep[..., None]
    return jnp.where(kept, logits, neg_inf)


def sequences(rollout_or_prompt: Any, tokens=None, response_mask=None):
    """``(input_ids, attention_mask, loss_mask)`` ``[R, P + N]``: prompt then response.

    Pass a :class:`Rollout`, or ``(prompt_ids, prompt_mask)`` as the first argument with
    ``tokens`` and ``response_mask``. The loss mask is the response mask (0 on the prompt).
    """
    if isinstance(rollout_or_prompt, Rollout):
        r = rollout_or_prompt
        prompt_ids, prompt_mask, tokens, response_mask = (
            r.prompt_ids,
            r.prompt_mask,
            r.tokens,
            r.response_mask,
        )
    else:
        prompt_ids, prompt_mask = rollout_or_prompt
    response_mask = jnp.asarray(response_mask, jnp.int32)
    ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)  # [R, P + N]
    attn = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), response_mask], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask, jnp.int32), response_mask], axis=1)
    return ids, attn, loss_mask


def token_logprobs(
    model: Any,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lora: Any = None,
    key: jax.Array | None = None,
    entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Teacher-forced log-probs ``[R, N]`` of response ``tokens`` under the sampling transform.

    One forward pass over ``[prompt, response]``; the logits at position ``t`` predict token
    ``t + 1`` (:func:`prefjax.losses.shift_labels`), go through :func:`transform_logits` (keeping
    the token itself), and give ``log_softmax`` at the token; 0 where ``response_mask`` is 0.
    Differentiable in ``params`` (the trainer's log-probs).

    Args:
      model: an LM-head ``prefjax.models.Model``.
      params: its parameters (the base when ``lora`` is given).
      prompt_ids, prompt_mask: ``[R, P]``.
      tokens, response_mask: ``[R, N]``.
      temperature, top_k, top_p: the sampling transform.
      lora: optional adapters; ``key``: PRNG key for LoRA dropout (``None``: off).
      entropy: also return the entropies ``[R, N]`` of the same (transformed) next-token
        distributions, from the same logits and without gradient (0 where the mask is 0).

    Returns:
      ``[R, N]`` float32; with ``entropy``, ``(logps, entropies)``.
    """
    ids, attn, _ = sequences((prompt_ids, prompt_mask), tokens, response_mask)
    num_new = tokens.shape[1]
    logits = model.apply(params, ids, attn, lora=lora, key=key)
    # [R, P + N, V] -> the N positions that predict the response tokens: P - 1 ... P + N - 2.
    logits = logits[:, -num_new - 1 : -1]
    logits = transform_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, keep=tokens
    )
    logps = losses.token_logprobs(logits, tokens)  # [R, N]
    logps = jnp.where(response_mask > 0, logps, 0.0)
    if not entropy:
        return logps
    ent = losses.entropy(jax.lax.stop_gradient(logits))  # [R, N], a reduction XLA fuses
    return logps, jnp.where(response_mask > 0, ent, 0.0)


def _first_match_end(tokens: jax.Array, stop_sequences: tuple) -> jax.Array:
    """``[R, N]`` bool: True at the last token of every occurrence of a stop sequence."""
    hit = jnp.zeros(tokens.shape, bool)
    n = tokens.shape[1]
    for seq in stop_sequences:
        length = len(seq)
        if length > n:
            continue
        ends = jnp.ones((tokens.shape[0], n - length + 1), bool)
        for j, t in enumerate(seq):
            ends &= tokens[:, j : n - length + 1 + j] == t
        # An occurrence starting at s ends at s + length - 1.
        hit = hit.at[:, length - 1 :].set(hit[:, length - 1 :] | ends)
    return hit


def finish(
    tokens: jax.Array, valid: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cut each row at its first stop event; ``(tokens, response_mask, finish_reason)``.

    Args:
      tokens: ``[R, N]`` generated tokens.
      valid: ``[R, N]`` 0/1, the positions the decoder generated (its mask).
      config: the stop ids / sequences.

    Returns:
      ``tokens`` with ``pad_id`` after the end, the response mask (1 up to and including the
      ending token) and ``finish_reason`` ``[R]``.
    """
    valid = valid > 0
    eos = jnp.isin(tokens, jnp.asarray(config.eos_ids or (-1,), jnp.int32)) & valid
    stop = jnp.isin(tokens, jnp.asarray(config.stop_ids or (-1,), jnp.int32)) & valid
    stop |= _first_match_end(tokens, config.stop_sequences) & valid
    ended = eos | stop
    before = jnp.cumsum(ended, axis=-1) - ended  # events strictly before each position
    mask = valid & (before == 0)
    last = ended & mask  # the ending token, if any
    reason = jnp.where(
        jnp.any(last & eos, -1),
        FINISH_EOS,
        jnp.where(jnp.any(last & ~eos, -1), FINISH_STOP, FINISH_LENGTH),
    ).astype(jnp.int32)
    return jnp.where(mask, tokens, config.pad_id), mask.astype(jnp.int32), reason


def sample(
    model: Any,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    config: SamplingConfig,
    *,
    lora: Any = None,
) -> Rollout:
    """``config.num_samples`` responses to each prompt, with their finish reasons and log-probs.

    Args:
      model: an LM-head ``prefjax.models.Model`` (its config; ``params`` passed explicitly).
      params: parameters (the base under LoRA).
      prompt_ids, prompt_mask: ``[B, P]``, left-padded preferably; every row needs a real token.
      key: PRNG key of this rollout.
      config: :class:`SamplingConfig`.
      lora: optional adapters.

    Returns:
      A :class:`Rollout` with ``R = B * num_samples`` rows (traceable: jit it, e.g. with
      :func:`make_sampler`).
    """
    n = config.num_samples
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    # [B, P] -> [B * n, P], prompt-major: the n samples of a prompt are contiguous rows.
    prompt_ids = jnp.repeat(prompt_ids, n, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, n, axis=0)
    enders = tuple(config.eos_ids) + tuple(config.stop_ids)
    out = models.generate(
        model,
        params,
        prompt_ids,
        prompt_mask,
        key=key,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eos_id=enders or None,
        pad_id=config.pad_id,
        lora=lora,
    )
    tokens, mask, reason = finish(out.tokens, out.mask, config)
    logprobs = token_logprobs(
        model,
        params,
        prompt_ids,
        prompt_mask,
        tokens,
        mask,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        lora=lora,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=tokens,
        response_mask=mask,
        logprobs=jax.lax.stop_gradient(logprobs),
        finish_reason=reason,
        lengths=mask.sum(-1),
        prompt_index=jnp.repeat(jnp.arange(prompt_ids.shape[0] // n, dtype=jnp.int32), n),
    )


def make_sampler(
    model: Any,
    config: SamplingConfig,
    *,
    mesh: Mesh | None = None,
    params_sharding: Any = None,
) -> Any:
    """Jitted ``sampler(params, prompt_ids, prompt_mask, key, *, lora=None) -> Rollout``.

    With ``mesh`` the prompts and every rollout array are split over ``("data", "fsdp")`` and
    the parameters keep ``params_sharding`` (the training shardings; default: as they arrive),
    so sampling is data-parallel on the training mesh without gathering the weights.
    """

    def fn(params, prompt_ids, prompt_mask, key, lora):
        return sample(model, params, prompt_ids, prompt_mask, key, config, lora=lora)

    if mesh is None:
        jitted = jax.jit(fn)
    else:
        rows = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))
        out = Rollout(*([rows] * len(Rollout._fields)))
        # The rows constraint of the models (shd.activation_sharding) keeps the residual stream
        # split by rows where XLA would follow FSDP-split weights into the activations.
        jitted = jax.jit(
            shd.with_activation_sharding(mesh, fn),
            in_shardings=(params_sharding, rows, rows, shd.replicated(mesh), None),
            out_shardings=out,
        )

    def sampler(params, prompt_ids, prompt_mask, key, *, lora=None):
        return jitted(params, prompt_ids, prompt_mask, key, lora)

    sampler.jitted = jitted  # the compiled program, for its cost and memory analyses
    return sampler
