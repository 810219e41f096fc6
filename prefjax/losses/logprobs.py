r"""Token log-probabilities, sequence log-probabilities, entropy and masked reductions.

Conventions shared by every function here:

* ``logits`` are ``[batch, seq, vocab]`` and ``labels`` are ``[batch, seq]`` integer token ids
  **already aligned** with the logits: ``labels[b, t]`` is scored under ``logits[b, t]``. A causal
  language model's logits at position ``t`` predict token ``t + 1``, so a train step either calls
  :func:`shift_labels` or slices by hand::

      token_logps = token_logprobs(logits[:, :-1], input_ids[:, 1:])   # [batch, seq - 1]
      mask = loss_mask[:, 1:]                                            # [batch, seq - 1]

* ``mask`` marks the tokens that count (1/True) and the ones that do not (0/False: prompt,
  padding). It may be bool, int or float; reductions weight by it, so padding never changes a
  result, and an all-masked reduction is 0 (not NaN) with finite, zero gradients.
* Everything is computed in float32 at least: floating inputs are promoted, never demoted, to
  ``jnp.result_type(x, jnp.float32)`` on entry (:func:`_upcast`), so bfloat16/float16 become
  float32 and float64 stays float64 under ``jax_enable_x64``; "float32" in a Returns section
  means that compute dtype. Nothing is reduced over the batch: the caller chooses the reduction
  (:func:`masked_mean` over tokens, ``.mean()`` over examples).

Example, a batch of two right-padded sequences:

  >>> logits = jnp.zeros((2, 4, 8))                      # uniform over 8 tokens
  >>> labels = jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]])
  >>> mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  >>> print(sequence_logprobs(logits, labels, mask) / jnp.log(8.0))
  [-3. -2.]
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "token_logprobs",
    "shift_labels",
    "sequence_logprobs",
    "entropy",
    "chunked_token_logprobs",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]


def _compute_dtype(*xs: ArrayLike) -> jnp.dtype:
    """The dtype a loss computes in: the inputs' promoted dtype, at least float32.

    ``jnp.result_type(*xs, jnp.float32)``: bfloat16/float16 (and integer or bool) inputs give
    float32, float64 inputs float64 (under ``jax_enable_x64``). For a typed array this is
    ``jnp.promote_types(x.dtype, jnp.float32)``; ``result_type`` also treats Python scalars as
    weakly typed, so a hyperparameter such as ``0.0`` never promotes float32 data to float64.
    The one promotion rule of :mod:`prefjax.losses`: every module upcasts through here.
    """
    return jnp.result_type(*xs, jnp.float32)


def _upcast(x: ArrayLike) -> jax.Array:
    """``x`` as an array in :func:`_compute_dtype`: promoted, never demoted (float64 is kept)."""
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x))


def _weighted_inputs(x: ArrayLike, mask: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``x`` and the mask (bool/int/float) in one compute dtype, the mask broadcast to ``x``.

    The mask is a weight in the reductions, so it takes part in the promotion: a float64 weight
    is not rounded to float32 (bool and integer masks never raise the dtype).
    """
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    dtype = _compute_dtype(x, mask)
    try:
        return x.astype(dtype), jnp.broadcast_to(mask.astype(dtype), x.shape)
    except ValueError as err:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the values' shape {x.shape}"
        ) from err


def masked_sum(x: ArrayLike, mask: ArrayLike, axis=None, *, keepdims: bool = False) -> jax.Array:
    r"""Sum of ``x`` over the positions where ``mask`` is set.

    .. math:: \mathrm{sum}(x; m) = \sum_i m_i\, x_i

    Masked positions are removed with ``jnp.where`` (not multiplied by 0), so a NaN or ``inf`` in a
    masked position (e.g. a ``-inf`` log-prob of a padding token) neither leaks into the result nor
    into the gradient.

    Args:
      x: values, any shape; float (upcast to float32).
      mask: same shape as ``x`` (or broadcastable to it); 1/True marks values that count.
        Non-binary float masks act as weights.
      axis: axis or tuple of axes to reduce; ``None`` reduces everything.
      keepdims: keep the reduced axes with size 1.

    Returns:
      The masked sum, float32, with ``axis`` reduced.

    Example:
      >>> x = jnp.array([[1.0, 2.0, jnp.nan], [3.0, 4.0, 5.0]])
      >>> m = jnp.array([[1, 1, 0], [1, 0, 0]])
      >>> print(masked_sum(x, m, axis=-1))
      [3. 3.]
    """
    x, m = _weighted_inputs(x, mask)
    # where, not x * m: 0 * nan = nan, and nan * 0 would also poison the gradient.
    return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis, keepdims=keepdims)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis=None, *, keepdims: bool = False) -> jax.Array:
    r"""Mean of ``x`` over the positions where ``mask`` is set; 0 where nothing is set.

    .. math:: \mathrm{mean}(x; m) = \frac{\sum_i m_i x_i}{\sum_i m_i}
        \quad (0 \text{ if } \textstyle\sum_i m_i = 0)

    The all-masked case returns exactly 0 with a zero (not NaN) gradient: the denominator is
    clamped before the division and the result selected with ``jnp.where`` (the "double where"
    trick, as optax ``_ranking.py::_safe_reduce``).

    Args:
      x: values, any shape; float (upcast to float32).
      mask: same shape as ``x`` (or broadcastable to it); 1/True marks values that count.
        Non-binary float masks act as weights (weighted mean).
      axis: axis or tuple of axes to reduce; ``None`` reduces everything (one token-weighted mean
        over the whole batch).
      keepdims: keep the reduced axes with size 1.

    Returns:
      The masked mean, float32, with ``axis`` reduced.

    Example:
      >>> x = jnp.array([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
      >>> m = jnp.array([[1, 1, 0], [0, 0, 0]])
      >>> print(masked_mean(x, m, axis=-1))        # second row fully masked -> 0
      [1.5 0. ]
      >>> print(masked_mean(x, m))                 # over all tokens of the batch
      1.5
    """
    x, m = _weighted_inputs(x, mask)
    total = masked_sum(x, m, axis=axis, keepdims=keepdims)
    count = jnp.sum(m, axis=axis, keepdims=keepdims)
    safe_count = jnp.where(count != 0, count, 1.0)  # avoids 0/0 in the value and its gradient
    return jnp.where(count != 0, total / safe_count, 0.0)


def masked_var(
    x: ArrayLike, mask: ArrayLike, axis=None, *, unbiased: bool = True, keepdims: bool = False
) -> jax.Array:
    r"""Variance of ``x`` over the positions where ``mask`` is set.

    .. math:: \mathrm{var}(x; m) = \frac{n}{n - 1}\,
        \mathrm{mean}\big((x - \mathrm{mean}(x; m))^2; m\big),\quad n = \textstyle\sum_i m_i

    With ``unbiased=True`` (the default, as TRL's ``masked_var``) Bessel's correction
    :math:`n / (n - 1)` is applied; it is skipped (factor 1) when :math:`n \le 1` rather than
    dividing by zero. An all-masked reduction is 0.

    Args:
      x: values, any shape; float (upcast to float32).
      mask: same shape as ``x`` (or broadcastable); 1/True marks values that count.
      axis: axis or tuple of axes to reduce; ``None`` reduces everything.
      unbiased: apply Bessel's correction.
      keepdims: keep the reduced axes with size 1.

    Returns:
      The masked variance, float32, with ``axis`` reduced.

    Example:
      >>> x = jnp.array([1.0, 2.0, 3.0, 100.0])
      >>> m = jnp.array([1, 1, 1, 0])
      >>> print(masked_var(x, m), masked_var(x, m, unbiased=False))
      1.0 0.6666667
    """
    x, m = _weighted_inputs(x, mask)
    mean = masked_mean(x, m, axis=axis, keepdims=True)
    var = masked_mean(jnp.square(x - mean), m, axis=axis, keepdims=keepdims)
    if unbiased:
        n = jnp.sum(m, axis=axis, keepdims=keepdims)
        correction = jnp.where(n > 1, n / jnp.where(n > 1, n - 1.0, 1.0), 1.0)
        var = var * correction
    return var


def masked_whiten(
    x: ArrayLike,
    mask: ArrayLike,
    *,
    shift_mean: bool = True,
    axis=None,
    unbiased: bool = True,
    epsilon: float = 1e-8,
) -> jax.Array:
    r"""Normalise ``x`` to zero mean and unit variance over the masked positions.

    .. math:: \mathrm{whiten}(x; m) = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}
        \ (+\,\mu \text{ if not shift\_mean}),\quad
        \mu = \mathrm{mean}(x; m),\ \sigma^2 = \mathrm{var}(x; m)

    The statistics use only the masked positions, so padding does not move them; the output is 0
    at masked positions. ``shift_mean=False`` adds the mean back (only the scale changes), as PPO
    implementations do for rewards. Matches TRL's ``masked_whiten`` (``trl/trainer/utils.py``,
    unbiased variance, :math:`\epsilon = 10^{-8}`) on the masked positions.

    Args:
      x: values, e.g. advantages ``[batch, seq]``; float (upcast to float32).
      mask: same shape as ``x`` (or broadcastable); 1/True marks values that count.
      shift_mean: if False, the mean is added back after scaling.
      axis: axes the statistics are taken over; ``None`` (default) pools the whole batch, as PPO
        does; ``-1`` whitens each row separately.
      unbiased: Bessel-corrected variance (TRL's default).
      epsilon: added to the variance before the square root.

    Returns:
      Whitened values, float32, the shape of ``x``; 0 where ``mask`` is 0.

    Example:
      >>> x = jnp.array([[1.0, 2.0, 3.0, 50.0]])
      >>> m = jnp.array([[1, 1, 1, 0]])
      >>> print(masked_whiten(x, m))
      [[-1.  0.  1.  0.]]
    """
    x, m = _weighted_inputs(x, mask)
    mean = masked_mean(x, m, axis=axis, keepdims=True)
    var = masked_var(x, m, axis=axis, unbiased=unbiased, keepdims=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + epsilon)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(m != 0, whitened, 0.0)


def token_logprobs(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Log-probability of each label under its logits: ``log_softmax(logits)[..., labels]``.

    .. math:: \log p_t = z_{t, y_t} - \log\textstyle\sum_v e^{z_{t, v}}

    Labels are **aligned** with the logits (``labels[b, t]`` is scored by ``logits[b, t]``); for a
    causal LM use :func:`shift_labels` first (logits at ``t`` predict token ``t + 1``). Computed as
    a gather minus a ``logsumexp`` in float32, which never builds the full log-softmax array in
    the output. Labels outside ``[0, vocab)`` (e.g. the ``-100`` ignore index) give 0, not an
    out-of-bounds gather; they must still be excluded by the caller's ``mask``.

    Args:
      logits: ``[..., vocab]`` float (bfloat16 upcast to float32), e.g. ``[batch, seq, vocab]``.
      labels: ``[...]`` integer token ids, typically ``[batch, seq]``.

    Returns:
      ``[...]`` float32 log-probabilities (``[batch, seq]``).

    Example:
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))   # [1, 1, 3]
      >>> print(token_logprobs(logits, jnp.array([[1]])))     # log 0.25
      [[-1.3862944]]
    """
    logits = _upcast(logits)
    labels = jnp.asarray(labels)
    chex.assert_rank(logits, labels.ndim + 1)
    chex.assert_equal_shape_prefix((logits, labels), labels.ndim)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    vocab = logits.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    safe_labels = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    # logsumexp subtracts the max internally: stable for any logit scale.
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(valid, logps, 0.0)


def shift_labels(
    logits: ArrayLike, input_ids: ArrayLike, mask: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""Next-token alignment: drop the last logit and the first token (and mask position).

    A causal LM's ``logits[:, t]`` predict ``input_ids[:, t + 1]``. This returns
    ``(logits[:, :-1], input_ids[:, 1:], mask[:, 1:])`` so that the results line up for
    :func:`token_logprobs` / :func:`sequence_logprobs`. The mask is the *token* mask
    (``loss_mask`` of the data batch): it marks tokens whose prediction counts, so it is shifted
    with the labels.

    Args:
      logits: ``[batch, seq, vocab]`` from a causal LM.
      input_ids: ``[batch, seq]`` the tokens that were fed in.
      mask: optional ``[batch, seq]`` loss mask over ``input_ids``.

    Returns:
      ``(logits [batch, seq-1, vocab], labels [batch, seq-1], mask [batch, seq-1] or None)``.

    Example:
      >>> logits = jnp.zeros((1, 3, 5)); ids = jnp.array([[1, 2, 3]])
      >>> lg, lb, m = shift_labels(logits, ids, jnp.array([[0, 1, 1]]))
      >>> print(lg.shape, lb, m)
      (1, 2, 5) [[2 3]] [[1 1]]
    """
    logits = jnp.asarray(logits)
    input_ids = jnp.asarray(input_ids)
    chex.assert_rank(logits, 3)
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape_prefix((logits, input_ids), 2)
    shifted_mask = None
    if mask is not None:
        mask = jnp.asarray(mask)
        chex.assert_equal_shape((input_ids, mask))
        shifted_mask = mask[:, 1:]
    # [batch, seq, vocab] -> [batch, seq - 1, vocab]; [batch, seq] -> [batch, seq - 1]
    return logits[:, :-1], input_ids[:, 1:], shifted_mask


def sequence_logprobs(
    logits: ArrayLike, labels: ArrayLike, mask: ArrayLike, *, average: bool = False
) -> jax.Array:
    r"""Summed (or mask-averaged) log-probability of the masked tokens of each sequence.

    .. math:: \log\pi(y \mid x) = \sum_t m_t \log p_t
        \qquad\text{or, with average=True,}\qquad
        \frac{\sum_t m_t \log p_t}{\sum_t m_t}

    The sum is what DPO and its variants take (``*_logps`` in :mod:`prefjax.losses.preference`);
    the average is what IPO (as TRL runs it), ORPO and SimPO take. Padding (``mask == 0``) never
    changes the result; an all-masked row gives 0.

    Args:
      logits: ``[batch, seq, vocab]`` aligned with ``labels`` (see :func:`shift_labels`).
      labels: ``[batch, seq]`` integer token ids.
      mask: ``[batch, seq]`` 1 for response tokens that count, 0 for prompt and padding.
      average: divide by the number of masked tokens (length-normalised log-prob).

    Returns:
      ``[batch]`` float32.

    Example:
      >>> logits = jnp.zeros((1, 3, 4))                 # uniform: log p = -log 4 per token
      >>> s = sequence_logprobs(logits, jnp.array([[1, 2, 3]]), jnp.array([[0, 1, 1]]))
      >>> print(s / jnp.log(4.0))
      [-2.]
    """
    logps = token_logprobs(logits, labels)
    chex.assert_equal_shape((logps, jnp.asarray(mask)))
    if average:
        return masked_mean(logps, mask, axis=-1)
    return masked_sum(logps, mask, axis=-1)


def entropy(logits: ArrayLike) -> jax.Array:
    r"""Entropy of the categorical distribution at each position.

    .. math:: H_t = -\sum_v p_{t,v} \log p_{t,v},\qquad p_t = \mathrm{softmax}(z_t)

    Computed from ``log_softmax`` in float32; vocabulary entries with ``-inf`` logits (masked
    out, probability 0) contribute 0 rather than :math:`0 \cdot (-\infty) = \mathrm{NaN}`, to the
    value and to the gradient.

    Args:
      logits: ``[..., vocab]`` float, typically ``[batch, seq, vocab]``.

    Returns:
      ``[...]`` float32 entropies in nats (``[batch, seq]``); reduce with :func:`masked_mean`.

    Example:
      >>> print(entropy(jnp.zeros((1, 2, 4))) / jnp.log(4.0))   # uniform: log V nats
      [[1. 1.]]
    """
    logits = _upcast(logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    # Double where: p * log_p is 0 * -inf = nan for -inf logits, in the value and the gradient.
    safe_log_p = jnp.where(p > 0, log_p, 0.0)
    return -jnp.sum(p * safe_log_p, axis=-1)


def chunked_token_logprobs(
    hidden: ArrayLike, unembedding: ArrayLike, labels: ArrayLike, *, chunk_size: int = 1024
) -> jax.Array:
    r"""``token_logprobs(hidden @ unembedding, labels)`` without a ``[batch, seq, vocab]`` array.

    .. math:: \log p_t = h_t^\top W_{:, y_t} - \log \textstyle\sum_v \exp(h_t^\top W_{:, v})

    The ``batch * seq`` token positions are split into chunks of ``chunk_size`` tokens; a
    ``jax.lax.map`` runs the projection, ``logsumexp`` and gather one chunk at a time, and the
    chunk body is wrapped in ``jax.checkpoint`` so the backward pass recomputes each chunk's
    logits instead of storing them. Peak memory is about ``chunk_size * vocab`` float32 values in
    both directions instead of ``batch * seq * vocab`` (the usual cause of out-of-memory errors
    in DPO on large vocabularies). Gradients flow to ``hidden`` and ``unembedding``; the gradient
    of ``unembedding`` is accumulated across chunks by the scan's transpose.

    The projection is computed with float32 accumulation (``preferred_element_type``), so for
    bfloat16 inputs the result is at least as accurate as ``token_logprobs(hidden @ unembedding,
    labels)``; for float32 inputs the two agree to rounding. Labels outside ``[0, vocab)`` give 0,
    as in :func:`token_logprobs`.

    Args:
      hidden: ``[batch, seq, d_model]`` final hidden states (after the final norm), aligned with
        ``labels`` (use ``hidden[:, :-1]`` with ``input_ids[:, 1:]`` for next-token prediction).
      unembedding: ``[d_model, vocab]`` output projection (the tied embedding transposed, or the
        LM head kernel).
      labels: ``[batch, seq]`` integer token ids.
      chunk_size: tokens per chunk (static). The last chunk is padded; smaller means less memory
        and more sequential steps.

    Returns:
      ``[batch, seq]`` float32 log-probabilities.

    Example:
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 4))
      >>> w = jax.random.normal(jax.random.key(1), (4, 10))
      >>> y = jnp.array([[1, 2, 3], [4, 5, 9]])
      >>> full = token_logprobs(h @ w, y)
      >>> print(bool(jnp.allclose(chunked_token_logprobs(h, w, y, chunk_size=4), full, atol=1e-5)))
      True
    """
    hidden = jnp.asarray(hidden)
    unembedding = jnp.asarray(unembedding)
    labels = jnp.asarray(labels)
    chex.assert_rank(hidden, 3)
    chex.assert_rank(unembedding, 2)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix((hidden, labels), 2)
    if hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"hidden has d_model={hidden.shape[-1]} but unembedding is {unembedding.shape}; "
            "expected unembedding of shape [d_model, vocab]"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    batch, seq, d_model = hidden.shape
    vocab = unembedding.shape[1]
    num_tokens = batch * seq
    chunk_size = min(chunk_size, max(num_tokens, 1))
    num_chunks = -(-num_tokens // chunk_size)
    pad = num_chunks * chunk_size - num_tokens
    # [batch, seq, d_model] -> [num_tokens, d_model] -> [num_chunks, chunk_size, d_model]
    flat_hidden = jnp.pad(hidden.reshape(num_tokens, d_model), ((0, pad), (0, 0)))
    flat_labels = jnp.pad(labels.reshape(num_tokens), (0, pad))
    flat_hidden = flat_hidden.reshape(num_chunks, chunk_size, d_model)
    flat_labels = flat_labels.reshape(num_chunks, chunk_size)
    out_dtype = _compute_dtype(hidden, unembedding)

    @jax.checkpoint  # recompute the [chunk_size, vocab] logits in the backward pass
    def chunk_logps(args):
        h, y = args  # [chunk_size, d_model], [chunk_size]
        logits = jnp.einsum("cd,dv->cv", h, unembedding, preferred_element_type=out_dtype)
        valid = (y >= 0) & (y < vocab)
        picked = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(valid, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)

    logps = jax.lax.map(chunk_logps, (flat_hidden, flat_labels))  # [num_chunks, chunk_size]
    # [num_chunks, chunk_size] -> [num_tokens] -> [batch, seq]
    return logps.reshape(-1)[:num_tokens].reshape(batch, seq)
