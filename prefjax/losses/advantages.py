r"""Advantages and returns: GAE, discounted returns, group-relative (GRPO) and leave-one-out (RLOO).

Conventions shared by every function here:

* Token arrays are batch-major, ``[batch, seq]``: ``rewards[b, t]`` is the reward received after
  emitting token ``t`` of sequence ``b`` and ``values[b, t]`` the critic's estimate
  :math:`V(s_t)` of the state in which token ``t`` is emitted. Scans run time-major inside
  (transpose, ``jax.lax.scan(..., reverse=True)``, transpose back), vectorised over the batch.
* ``mask`` marks the tokens that are actions (1/True: response tokens) and the ones that are not
  (0/False: prompt, padding, tool output). A masked position is **skipped**: it earns no reward,
  takes no discount step, and the running advantage/return and the "next value" are carried
  through it unchanged to the previous real token; its own output is 0. Hence padding after the
  end contributes nothing and right/left padding never changes a result.
* The value after the last real token of a row is 0 (the response ended: a terminal state) unless
  ``bootstrap_value`` gives one (a truncated rollout). ``dones[b, t] = 1`` marks a real token after
  which the episode ended (packed episodes): the bootstrap from the next value and the recursion are
  cut there.
* Everything is computed in float32 at least: inputs are promoted, never demoted, by the rule
  shared by :mod:`prefjax.losses` (bfloat16 -> float32; float64 kept under ``jax_enable_x64``;
  "float32" in a Returns section means that compute dtype). Nothing is jitted here:
  the caller jits once. Advantages are normally treated as constants by the policy loss; the
  policy-gradient losses in :mod:`prefjax.losses.policy_gradient` apply ``stop_gradient`` to them.
* Whitening (normalising advantages to zero mean, unit variance over the real tokens of a batch)
  is a separate step: :func:`prefjax.losses.masked_whiten`.

Example, a two-token response followed by one padding token:

  >>> rewards = jnp.array([[0.0, 1.0, 0.0]])
  >>> values = jnp.array([[0.5, 0.5, 7.0]])         # 7.0 sits on padding: ignored
  >>> mask = jnp.array([[1, 1, 0]])
  >>> adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
  >>> print(adv, ret)
  [[0.5 0.5 0. ]] [[1. 1. 0.]]
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from prefjax.losses.logprobs import _upcast

__all__ = [
    "GAEOutput",
    "gae",
    "discounted_returns",
    "group_advantages",
    "rloo_advantages",
]


class GAEOutput(NamedTuple):
    """Result of :func:`gae`; unpacks as ``advantages, returns = gae(...)``.

    Attributes:
      advantages: ``[batch, seq]`` float32, :math:`\\hat A_t`; 0 at masked positions.
      returns: ``[batch, seq]`` float32, the value targets :math:`\\hat A_t + V(s_t)` (the
        :math:`\\lambda`-return); 0 at masked positions.
    """

    advantages: jax.Array
    returns: jax.Array


class _ReverseCarry(NamedTuple):
    """Scan carry: the accumulated quantity at the next real token (0 past the end)."""

    next_acc: jax.Array  # [batch]


class _GAECarry(NamedTuple):
    """Scan carry of :func:`gae`: the next real token's value and advantage, and the constants."""

    next_value: jax.Array  # [batch]; the bootstrap past the last real token
    next_adv: jax.Array  # [batch]; 0 past the end
    gamma: jax.Array  # scalar
    gamma_lam: jax.Array  # scalar


def _gae_step(carry: _GAECarry, x):
    """One backward GAE step: the TD error and the advantage at a real token, in one pass (no
    gather of the next real value); a module-level function so eager calls reuse the scan.

    The step's output is the carried advantage itself (at a masked position: the next real
    token's), zeroed at masked positions by the caller in one vectorised pass: a body with one
    output array fewer to compute and store is 1.5x faster on a CPU (benchmarks/README.md)."""
    reward, value, real, *not_done = x  # each [batch]; not_done only with dones
    not_done = not_done[0] if not_done else 1.0
    delta = reward + carry.gamma * not_done * carry.next_value - value
    adv = delta + carry.gamma_lam * not_done * carry.next_adv
    carry = carry._replace(
        next_value=jnp.where(real, value, carry.next_value),
        next_adv=jnp.where(real, adv, carry.next_adv),
    )
    return carry, carry.next_adv


class _ChunkCarry(NamedTuple):
    """State of the zero-boundary solve of :func:`_gae_chunked`, each ``[batch, chunks]``: every
    chunk solved right to left."""

    seen: jax.Array  # bool: a real token of this chunk lies at or after the current position
    next_value: jax.Array  # the next real token's value inside the chunk (0 before any)
    next_adv: jax.Array  # its zero-boundary advantage
    discount: jax.Array  # D: the product of gamma * lam * (1 - d_u) over the chunk's real
    # tokens from the current one up to (excluding) the chunk's last real token
    last_not_done: jax.Array  # 1 - d at the chunk's last real token


def _chunk_step(carry: _ChunkCarry, x):
    """One step of the zero-boundary solve of a chunk (see :func:`_gae_chunked`)."""
    reward, value, real, not_done, gamma, gamma_lam = x
    delta = reward + gamma * not_done * carry.next_value - value
    adv = delta + gamma_lam * not_done * carry.next_adv
    # D_t = gamma lam (1 - d_t) D_next, except at the chunk's last real token (the empty product).
    discount = jnp.where(carry.seen, gamma_lam * not_done, 1.0) * carry.discount
    new = _ChunkCarry(
        seen=carry.seen | real,
        next_value=jnp.where(real, value, carry.next_value),
        next_adv=jnp.where(real, adv, carry.next_adv),
        discount=jnp.where(real, discount, carry.discount),
        last_not_done=jnp.where(real & ~carry.seen, not_done, carry.last_not_done),
    )
    return new, (jnp.where(real, adv, 0.0), jnp.where(real, discount, 0.0))


class _BoundaryCarry(NamedTuple):
    """Carry of the scan over chunks: the first real token after the chunk, ``[batch]``."""

    value: jax.Array  # its value (the bootstrap past the row's last real token)
    adv: jax.Array  # its advantage (0 past the end)


def _gae_chunked(rewards, values, mask, not_done, bootstrap, gamma, lam, chunk_size):
    r"""GAE in ``seq / C`` sequential steps instead of ``seq``: every chunk of ``C`` consecutive
    tokens of every row solved at once from a zero boundary, then one scan over the chunk
    boundaries, then one vectorised correction.

    Within a chunk, let :math:`s^*` be its last real token and :math:`V_{in}, A_{in}` the value
    and advantage of the first real token after the chunk. Every real :math:`t` of the chunk has

    .. math:: \hat A_t = \hat A^0_t + D_t\,g, \qquad
        g = \gamma\,(1 - d_{s^*})\,(V_{in} + \lambda A_{in}), \qquad
        D_t = \prod_{\text{real } u \in [t, s^*)} \gamma\lambda\,(1 - d_u)

    where :math:`\hat A^0` is the chunk's GAE with a zero boundary (no value, no advantage after
    :math:`s^*`): the boundary enters only through :math:`s^*`'s TD error
    (:math:`+\gamma(1-d_{s^*})V_{in}`) and its recursion (:math:`+\gamma\lambda(1-d_{s^*})
    A_{in}`), both discounted back by :math:`D_t`.

    Layout: batch-major throughout, ``[batch, seq] -> [batch, n_c, C]`` is a reshape, not a
    transpose (the transposes of a time-major scan cost as much as the scan's arithmetic on a
    CPU). The zero-boundary solve is ``C`` unrolled elementwise steps over ``[batch, n_c]``
    slices (``C`` small: XLA fuses the chain, recomputing a little of it per output); its final
    state gives each chunk's first real token (value, :math:`\hat A^0`, :math:`D`) and
    :math:`1 - d_{s^*}`; an ``n_c``-step ``lax.scan`` over ``[batch]`` carries
    :math:`(V_{in}, A_{in})` from the last chunk to the first; one fused pass adds :math:`D_t g`.
    Masked positions pass everything through, so the tail padding to a multiple of ``C``
    changes nothing.
    """
    batch, seq = rewards.shape
    dtype = rewards.dtype
    c = max(1, min(chunk_size, seq))
    n = -(-seq // c)  # chunks
    pad = n * c - seq

    def chunked(x, fill):  # [batch, seq] -> [batch, n * c] (masked tail) -> [batch, n, c]
        return jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill).reshape(batch, n, c)

    r, v = chunked(rewards, 0), chunked(values, 0)
    m, nd = chunked(mask, False), chunked(not_done, 1)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)
    zeros = jnp.zeros((batch, n), dtype)
    state = _ChunkCarry(jnp.zeros((batch, n), jnp.bool_), zeros, zeros, zeros + 1.0, zeros)
    adv0, discount = [None] * c, [None] * c
    for j in reversed(range(c)):  # the chunk's positions, right to left, all chunks at once
        x = (r[..., j], v[..., j], m[..., j], nd[..., j], gamma, gamma * lam)
        state, (adv0[j], discount[j]) = _chunk_step(state, x)
    adv0 = jnp.stack(adv0, axis=-1)  # c x [batch, n] -> [batch, n, c]
    discount = jnp.stack(discount, axis=-1)
    first = jax.tree.map(lambda x: x.T, state)  # [batch, n] -> [n, batch]: scanned over n

    def boundary_step(after: _BoundaryCarry, chunk: _ChunkCarry):
        # ``after``: the first real token after this chunk; returns the one at or after it.
        g = gamma * chunk.last_not_done * (after.value + lam * after.adv)
        adv = chunk.next_adv + chunk.discount * g
        out = _BoundaryCarry(
            jnp.where(chunk.seen, chunk.next_value, after.value),
            jnp.where(chunk.seen, adv, after.adv),
        )
        return out, g

    init = _BoundaryCarry(bootstrap.astype(dtype), jnp.zeros((batch,), dtype))
    _, g = jax.lax.scan(boundary_step, init, first, reverse=True)  # [n, batch]
    # Real tokens have adv0 and D set; masked ones hold 0 + 0 * g = 0.
    adv = adv0 + discount * g.T[..., None]  # [batch, n, c]
    return adv.reshape(batch, n * c)[:, :seq]


def _check_unit_interval(name: str, value) -> None:
    """Rejects a Python-number hyperparameter outside [0, 1] (traced values pass unchecked)."""
    if isinstance(value, numbers.Real) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def _as_bool_mask(mask: ArrayLike, name: str = "mask") -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _optional_row(x: ArrayLike | None, like: jax.Array, name: str) -> jax.Array:
    """A per-row ``[batch]`` argument, upcast (zeros in ``like``'s dtype when not given)."""
    batch = like.shape[0]
    if x is None:
        return jnp.zeros((batch,), like.dtype)
    x = _upcast(x)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = ({batch},), got {x.shape}")
    return x


def _optional_dones(dones: ArrayLike | None, mask: jax.Array) -> jax.Array:
    """``dones`` as a bool ``[batch, seq]`` read at real tokens only (False where masked)."""
    if dones is None:
        return jnp.zeros(mask.shape, jnp.bool_)
    dones = jnp.asarray(dones)
    if dones.shape != mask.shape:
        raise ValueError(f"dones must have the shape of mask {mask.shape}, got {dones.shape}")
    return jnp.logical_and(_as_bool_mask(dones, "dones"), mask)


def _next_real_values(values: jax.Array, mask: jax.Array, bootstrap: jax.Array) -> jax.Array:
    """For every position t, the value at the first real token after t (or the bootstrap).

    Vectorised "carry the next value through masked positions": the index of the next real
    token is a reverse running minimum over positions, and index ``seq`` points at the bootstrap.
    """
    batch, seq = values.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    real_pos = jnp.where(mask, positions, seq)  # [batch, seq]; seq = "no real token here"
    # Shift left by one so position t looks strictly after itself; slot seq is the bootstrap.
    after = jnp.concatenate([real_pos[:, 1:], jnp.full((batch, 1), seq)], axis=1)
    next_idx = jax.lax.cummin(after, axis=1, reverse=True)  # [batch, seq]
    values_ext = jnp.concatenate([values, bootstrap[:, None]], axis=1)  # [batch, seq + 1]
    return jnp.take_along_axis(values_ext, next_idx, axis=1)


def _reverse_step(carry: _ReverseCarry, x):
    """One backward step; a module-level function so eager calls reuse the compiled scan."""
    delta, discount, real = x  # each [batch]
    acc = delta + discount * carry.next_acc
    acc = jnp.where(real, acc, carry.next_acc)  # masked: carry the next real token's value
    return _ReverseCarry(acc), jnp.where(real, acc, 0.0)


ALGORITHMS = ("scan", "associative", "chunked")
# Tokens per chunk of algorithm="chunked" (seq / C sequential steps; C = 4 measured fastest at
# 512 x 1024 on a CPU, benchmarks/README.md).
DEFAULT_CHUNK_SIZE = 4


def _reverse_discounted_sum(
    deltas: jax.Array, discounts: jax.Array, mask: jax.Array, algorithm: str = "scan"
) -> jax.Array:
    r"""Masked reverse recursion :math:`y_t = \delta_t + c_t\,y_{t+1}` over real tokens.

    Masked positions output 0 and pass :math:`y_{t+1}` through unchanged. ``algorithm``:

    * ``"scan"`` -- one reverse ``lax.scan`` over time, vectorised over the batch (``seq``
      dependent steps);
    * ``"associative"`` -- the same linear recurrence as a composition of affine maps
      :math:`y \mapsto a_t y + b_t` (:math:`a_t = c_t, b_t = \delta_t` on real tokens and the
      identity :math:`a_t = 1, b_t = 0` on masked ones), which is associative:
      :math:`(a_t, b_t) \circ (a_{t+1}, b_{t+1}) = (a_t a_{t+1},\; b_t + a_t b_{t+1})`, so
      ``lax.associative_scan`` evaluates every suffix in :math:`O(\log seq)` parallel steps.
    """
    # One dtype for the carry and its update (scan requires it): the promoted one of both inputs.
    dtype = jnp.result_type(deltas, discounts)
    deltas, discounts = deltas.astype(dtype), discounts.astype(dtype)
    if algorithm == "associative":
        a = jnp.where(mask, discounts, 1.0).astype(dtype)
        b = jnp.where(mask, deltas, 0.0).astype(dtype)

        def compose(later, earlier):
            # reverse=True hands (the later suffix, the earlier element): earlier applied last.
            (a_late, b_late), (a_early, b_early) = later, earlier
            return a_early * a_late, b_early + a_early * b_late

        _, ys = jax.lax.associative_scan(compose, (a, b), reverse=True, axis=1)
        return jnp.where(mask, ys, 0.0)
    if algorithm != "scan":
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    init = _ReverseCarry(jnp.zeros(deltas.shape[:1], dtype))
    # [batch, seq] -> [seq, batch]: scan over time, vectorised over the batch.
    xs = (deltas.T, discounts.T, mask.T)
    _, ys = jax.lax.scan(_reverse_step, init, xs, reverse=True)
    return ys.T  # [seq, batch] -> [batch, seq]


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    mask: ArrayLike,
    *,
    gamma: float,
    lam: float,
    bootstrap_value: ArrayLike | None = None,
    dones: ArrayLike | None = None,
    algorithm: str = "scan",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> GAEOutput:
    r"""Generalized Advantage Estimation over token sequences (Schulman et al., 2016).

    .. math::
        \delta_t = r_t + \gamma\,(1 - d_t)\,V(s_{t+1}) - V(s_t), \qquad
        \hat A_t = \delta_t + \gamma\lambda\,(1 - d_t)\,\hat A_{t+1}, \qquad
        R_t = \hat A_t + V(s_t)

    i.e. :math:`\hat A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}` (Eq. 16 of the GAE paper;
    the finite-horizon form is Eq. 11-12 of the PPO paper). :math:`t` runs over the **real**
    tokens of a row only (``mask`` = 1): masked positions are skipped, so :math:`s_{t+1}` is the
    state of the next real token, :math:`V` after the last real token is 0 (or
    ``bootstrap_value``), and padding contributes nothing. ``dones`` (:math:`d_t`) cut the
    recursion at episode ends inside a row. :math:`\lambda = 0` gives the one-step TD error
    :math:`\delta_t`; :math:`\lambda = 1` the discounted return minus the value.

    ``algorithm="scan"`` (the reference form) runs one reverse ``jax.lax.scan`` over time
    (vectorised over the batch) that carries the next real token's value and advantage, so the
    TD error and the advantage of each token come out of the same step;
    ``algorithm="associative"`` evaluates the same linear recurrence with
    ``jax.lax.associative_scan`` (``O(log seq)`` parallel steps instead of ``seq`` dependent
    ones: what a GPU or TPU wants for long responses); ``algorithm="chunked"`` solves every
    chunk of ``chunk_size`` tokens at once from a zero boundary, batch-major (no transposes),
    then scans the ``seq / chunk_size`` chunk boundaries and adds each chunk's boundary term
    (the fastest form on a CPU, see ``benchmarks/README.md``). All three agree to float32
    rounding.

    Args:
      rewards: ``[batch, seq]`` per-token rewards (e.g. from :func:`kl_shaped_rewards`).
      values: ``[batch, seq]`` critic values :math:`V(s_t)`.
      mask: ``[batch, seq]`` bool/int/float, 1 on tokens that are actions (response tokens).
      gamma: discount :math:`\gamma \in [0, 1]` (1.0 is usual for language models).
      lam: GAE :math:`\lambda \in [0, 1]` (0.95 in most RLHF recipes).
      bootstrap_value: optional ``[batch]`` value of the state after the last real token, for
        truncated rollouts; default 0 (the response ended).
      dones: optional ``[batch, seq]``, 1 at a real token after which the episode terminated
        (read only where ``mask`` is set).
      algorithm: ``"scan"`` (reverse ``lax.scan``), ``"associative"``
        (``lax.associative_scan``) or ``"chunked"`` (two-level chunked scan).
      chunk_size: tokens per chunk of ``algorithm="chunked"`` (ignored otherwise).

    Returns:
      :class:`GAEOutput` ``(advantages, returns)``, each ``[batch, seq]`` float32, 0 where masked.

    Example:
      >>> r = jnp.array([[0.0, 0.0, 1.0]])
      >>> v = jnp.array([[0.2, 0.4, 0.6]])
      >>> m = jnp.ones((1, 3))
      >>> adv, ret = gae(r, v, m, gamma=1.0, lam=0.0)   # lambda = 0: one-step TD errors
      >>> print(adv)
      [[0.2 0.2 0.4]]
      >>> print(ret)                                    # TD(0) targets r_t + V(s_{t+1})
      [[0.4 0.6 1. ]]

    References:
      Schulman, Moritz, Levine, Jordan, Abbeel, "High-Dimensional Continuous Control Using
      Generalized Advantage Estimation", ICLR 2016, Eqs. (11)-(16). Masked-token handling as in
      verl's ``compute_gae_advantage_return`` (observation tokens skipped).
    """
    rewards = _upcast(rewards)
    values = _upcast(values)
    mask = _as_bool_mask(mask)
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    bootstrap = _optional_row(bootstrap_value, rewards, "bootstrap_value")
    not_done = 1.0 - _optional_dones(dones, mask).astype(rewards.dtype)

    if algorithm == "scan":
        # One reverse scan carries the next real token's value and advantage (no gather).
        dtype = jnp.result_type(rewards, values, bootstrap)
        init = _GAECarry(
            bootstrap.astype(dtype),
            jnp.zeros(rewards.shape[:1], dtype),
            jnp.asarray(gamma, dtype),
            jnp.asarray(gamma * lam, dtype),
        )
        # [batch, seq] -> [seq, batch]: scan over time, vectorised over the batch.
        xs = (rewards.astype(dtype).T, values.astype(dtype).T, mask.T)
        if dones is not None:  # (without them every step's not_done is 1: one input fewer)
            xs += (not_done.astype(dtype).T,)
        _, carried = jax.lax.scan(_gae_step, init, xs, reverse=True)
        advantages = jnp.where(mask, carried.T, 0.0)  # [seq, batch] -> [batch, seq]
    elif algorithm == "chunked":
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        dtype = jnp.result_type(rewards, values, bootstrap)
        advantages = _gae_chunked(
            rewards.astype(dtype),
            values.astype(dtype),
            mask,
            not_done.astype(dtype),
            bootstrap,
            gamma,
            lam,
            chunk_size,
        )
    else:
        next_values = _next_real_values(values, mask, bootstrap)  # [batch, seq]
        # TD errors, vectorised; masked positions hold 0 (never read by the recurrence).
        deltas = jnp.where(mask, rewards + gamma * not_done * next_values - values, 0.0)
        advantages = _reverse_discounted_sum(deltas, gamma * lam * not_done, mask, algorithm)
    returns = jnp.where(mask, advantages + values, 0.0)
    return GAEOutput(advantages, returns)


def discounted_returns(
    rewards: ArrayLike,
    mask: ArrayLike,
    *,
    gamma: float,
    bootstrap_value: ArrayLike | None = None,
    dones: ArrayLike | None = None,
    algorithm: str = "scan",
) -> jax.Array:
    r"""Discounted return-to-go over the real tokens of each row (Monte Carlo returns).

    .. math:: G_t = r_t + \gamma\,(1 - d_t)\,G_{t+1}, \qquad G_{\text{after last}} = V_{\text{boot}}

    i.e. :math:`G_t = \sum_{l \ge 0} \gamma^l r_{t+l}` (Sutton & Barto, 2018, Eq. 3.8), with the
    same masking rules as :func:`gae` (masked positions skipped and 0 in the output; ``dones``
    cut the sum). Equal to ``gae(rewards, 0, mask, gamma=gamma, lam=1).returns``. Used as the
    REINFORCE return and as a Monte Carlo value target.

    Args:
      rewards: ``[batch, seq]`` per-token rewards.
      mask: ``[batch, seq]``, 1 on real (action) tokens.
      gamma: discount in ``[0, 1]``.
      bootstrap_value: optional ``[batch]`` value after the last real token (default 0).
      algorithm: ``"scan"``, ``"associative"`` or ``"chunked"``, as in :func:`gae`.
      dones: optional ``[batch, seq]`` episode ends (see :func:`gae`).

    Returns:
      ``[batch, seq]`` float32 returns, 0 where masked.

    Example:
      >>> r = jnp.array([[1.0, 0.0, 2.0, 5.0]])
      >>> m = jnp.array([[1, 1, 1, 0]])                 # the 5.0 is on padding
      >>> print(discounted_returns(r, m, gamma=0.5))   # 1 + 0.5 * (0 + 0.5 * 2)
      [[1.5 1.  2.  0. ]]
    """
    rewards = _upcast(rewards)
    mask = _as_bool_mask(mask)
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, mask])
    _check_unit_interval("gamma", gamma)
    if algorithm == "chunked":  # the identity above: GAE with zero values and lambda = 1
        zeros = jnp.zeros_like(rewards)
        kw = dict(bootstrap_value=bootstrap_value, dones=dones, algorithm=algorithm)
        return gae(rewards, zeros, mask, gamma=gamma, lam=1.0, **kw).returns
    bootstrap = _optional_row(bootstrap_value, rewards, "bootstrap_value")
    not_done = 1.0 - _optional_dones(dones, mask).astype(rewards.dtype)
    # The bootstrap enters as an extra reward gamma * V_boot on the last real token of each row
    # (unless that token is a done), which the recursion then discounts back.
    zeros = jnp.zeros_like(rewards)
    next_boot = _next_real_values(zeros, mask, bootstrap)  # bootstrap after the last real token
    deltas = jnp.where(mask, rewards + gamma * not_done * next_boot, 0.0)
    return _reverse_discounted_sum(deltas, gamma * not_done, mask, algorithm)


def _grouped(rewards: ArrayLike, group_size: int, *, min_size: int) -> jax.Array:
    """``[batch]`` -> ``[batch // group_size, group_size]`` with checks naming the argument."""
    rewards = _upcast(rewards)
    chex.assert_rank(rewards, 1)
    if not isinstance(group_size, numbers.Integral) or group_size < min_size:
        raise ValueError(f"group_size must be an integer >= {min_size}, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards has {rewards.shape[0]} entries, not a multiple of group_size={group_size}; "
            "lay the batch out as [num_prompts * group_size], the responses of a prompt contiguous"
        )
    return rewards.reshape(-1, group_size)  # [batch] -> [num_prompts, group_size]


def group_advantages(
    rewards: ArrayLike,
    *,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-4,
) -> jax.Array:
    r"""Group-relative advantages of GRPO (Shao et al., 2024, Sec. 4.1.2).

    .. math:: \hat A_i = \frac{r_i - \mathrm{mean}(r_{g(i)})}{\mathrm{std}(r_{g(i)}) + \epsilon}

    where :math:`g(i)` is the group of ``group_size`` responses sampled for the same prompt as
    response :math:`i`. The std is the unbiased sample std (``ddof=1``), as in TRL's
    ``GRPOTrainer`` and verl, and ``eps`` = 1e-4 is TRL's; a group whose rewards are all equal
    gets advantages 0. ``normalize_std=False`` keeps only the mean baseline (Dr. GRPO, Liu et al.,
    2025, who show the std division biases toward too-easy/too-hard prompts). The sequence
    advantage applies to every token of the response (outcome supervision); broadcast it with
    ``adv[:, None]`` or pass it ``[batch]`` to :func:`grpo_loss`.

    Args:
      rewards: ``[batch]`` scalar rewards, ``batch = num_prompts * group_size``, laid out
        prompt-major (the ``group_size`` responses of one prompt contiguous).
      group_size: responses per prompt :math:`G \ge 2`.
      normalize_std: divide by the group std (GRPO) or not (Dr. GRPO).
      eps: added to the std.

    Returns:
      ``[batch]`` float32 advantages, zero-mean within each group.

    Example:
      >>> r = jnp.array([1.0, 0.0, 1.0, 0.0, 3.0, 3.0])
      >>> print(group_advantages(r, group_size=2, normalize_std=False))
      [ 0.5 -0.5  0.5 -0.5  0.   0. ]

    References:
      Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
      Models", 2024, Sec. 4.1.2 (outcome supervision). Liu et al., "Understanding R1-Zero-Like
      Training: A Critical Perspective" (Dr. GRPO), 2025, Sec. 3.1.
    """
    groups = _grouped(rewards, group_size, min_size=2)  # [num_prompts, group_size]
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if normalize_std:
        std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
        # Double where: an all-equal group (std 0) gives 0, not 0/0, even with eps = 0.
        safe = jnp.where(std > 0, std + eps, 1.0)
        centred = jnp.where(std > 0, centred / safe, 0.0)
    return centred.reshape(-1)  # [num_prompts, group_size] -> [batch]


def rloo_advantages(rewards: ArrayLike, *, group_size: int) -> jax.Array:
    r"""REINFORCE leave-one-out advantages (Kool et al., 2019; Ahmadian et al., 2024, Eq. 6).

    .. math:: \hat A_i = r_i - \frac{1}{k - 1} \sum_{j \ne i} r_j
        = \frac{k}{k - 1}\,\big(r_i - \mathrm{mean}(r_{g(i)})\big)

    Each of the :math:`k` = ``group_size`` responses to a prompt is baselined by the mean reward of
    the other :math:`k - 1`, an unbiased baseline since it does not depend on response :math:`i`.

    Args:
      rewards: ``[batch]`` rewards, ``batch = num_prompts * group_size``, prompt-major.
      group_size: samples per prompt :math:`k \ge 2`.

    Returns:
      ``[batch]`` float32 advantages.

    Example:
      >>> r = jnp.array([1.0, 2.0, 6.0])               # one prompt, k = 3
      >>> print(rloo_advantages(r, group_size=3))      # 1 - 4, 2 - 3.5, 6 - 1.5
      [-3.  -1.5  4.5]

    References:
      Kool, van Hoof, Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
      Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
      Human Feedback in LLMs", ACL 2024, Eq. (6).
    """
    groups = _grouped(rewards, group_size, min_size=2)  # [num_prompts, group_size]
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)  # [num_prompts, group_size] -> [batch]
