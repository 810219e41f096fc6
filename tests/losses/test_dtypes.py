"""Dtype contract of every public function in prefjax.losses: promote, never demote.

Every loss computes in ``jnp.result_type(x, jnp.float32)``: bfloat16 inputs give float32 outputs,
float64 inputs give float64 outputs under ``jax_enable_x64`` (a researcher checking gradients in
float64 must not silently get float32). The public names are enumerated from the package, so a
new loss without a case here fails :func:`test_every_public_function_has_a_dtype_case`.

Each case builds its inputs from float32-representable values, so the float32 and float64 runs
see the same numbers and differ only in the precision of the computation. That float64 is really
used end to end is checked by nudging each float64 input below float32 resolution: the outputs
must follow. Three losses are also held to NumPy float64 references at 1e-12.
"""

import functools
import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_reference_pg import gae_reference, ppo_policy_reference
from _reference import trl_dpo_loss

import prefjax.losses as L

B, T, V, K, D = 4, 5, 7, 3, 6  # batch, seq, vocab, list size, d_model


class _Inputs:
    """Deterministic inputs in one dtype; every instance draws the same values in the same order."""

    def __init__(self, dtype):
        self.dtype = dtype
        self._rng = np.random.default_rng(20240613)

    def normal(self, *shape, loc=0.0, scale=1.0):
        x = np.asarray(self._rng.normal(loc, scale, shape), np.float32)  # exact in float32/64
        return jnp.asarray(x, self.dtype)

    def logps(self, *shape):  # log-probabilities: negative, of order -1..-3
        x = -np.abs(self._rng.normal(1.5, 0.7, shape)).astype(np.float32) - np.float32(0.05)
        return jnp.asarray(x, self.dtype)

    def mask(self, *shape):  # bool: a mask never sets the compute dtype
        m = self._rng.random(shape) < 0.75
        m[..., 0] = True  # no empty row: every case exercises arithmetic
        return jnp.asarray(m)

    def flags(self, *shape, p=0.3):  # e.g. dones
        return jnp.asarray(self._rng.random(shape) < p)

    def labels(self, *shape):
        return jnp.asarray(self._rng.integers(0, V, shape).astype(np.int32))


def _pairwise(fn, **static):
    def case(d):
        return (d.logps(B), d.logps(B), d.logps(B), d.logps(B)), {}, static

    return fn, case


# name -> (function, case). A case takes an _Inputs and returns (positional arrays, keyword
# arrays, static keyword arguments); hyperparameters are Python numbers, as callers pass them.
CASES = {
    # --- logprobs.py
    "token_logprobs": (L.token_logprobs, lambda d: ((d.normal(B, T, V), d.labels(B, T)), {}, {})),
    "sequence_logprobs": (
        L.sequence_logprobs,
        lambda d: ((d.normal(B, T, V), d.labels(B, T), d.mask(B, T)), {}, {"average": True}),
    ),
    "entropy": (L.entropy, lambda d: ((d.normal(B, T, V, scale=2.0),), {}, {})),
    "chunked_token_logprobs": (
        L.chunked_token_logprobs,
        lambda d: ((d.normal(B, T, D), d.normal(D, V), d.labels(B, T)), {}, {"chunk_size": 8}),
    ),
    "masked_sum": (L.masked_sum, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {"axis": -1})),
    "masked_mean": (L.masked_mean, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {"axis": -1})),
    "masked_var": (L.masked_var, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {"axis": -1})),
    "masked_whiten": (L.masked_whiten, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {})),
    # --- preference.py
    "bradley_terry_loss": (
        L.bradley_terry_loss,
        lambda d: (
            (d.normal(B), d.normal(B)),
            {"margin": d.normal(B, scale=0.3)},
            {"label_smoothing": 0.1},
        ),
    ),
    "plackett_luce_loss": (
        L.plackett_luce_loss,
        lambda d: ((d.normal(B, K),), {"mask": d.mask(B, K)}, {}),
    ),
    "dpo_loss": _pairwise(L.dpo_loss, beta=0.5, label_smoothing=0.1),
    "robust_dpo_loss": _pairwise(L.robust_dpo_loss, beta=0.5, label_smoothing=0.1),
    "ipo_loss": _pairwise(L.ipo_loss, beta=0.5),
    "hinge_loss": _pairwise(L.hinge_loss, beta=0.1),
    "bco_pair_loss": _pairwise(L.bco_pair_loss, beta=0.5),  # delta: its Python default 0.0
    "sppo_hard_loss": _pairwise(L.sppo_hard_loss, beta=0.5),
    "nca_pair_loss": _pairwise(L.nca_pair_loss, beta=0.5),
    "exo_pair_loss": _pairwise(L.exo_pair_loss, beta=0.5),
    "apo_zero_loss": _pairwise(L.apo_zero_loss, beta=0.5),
    "apo_down_loss": _pairwise(L.apo_down_loss, beta=0.5),
    "listwise_dpo_loss": (
        L.listwise_dpo_loss,
        lambda d: ((d.logps(B, K), d.logps(B, K)), {"mask": d.mask(B, K)}, {"beta": 0.5}),
    ),
    "kto_loss": (
        L.kto_loss,
        lambda d: (
            (d.logps(B), d.logps(B), d.mask(B), d.normal(scale=0.5) ** 2),
            {},
            {"beta": 0.5, "undesirable_weight": 1.3},
        ),
    ),
    "kto_reference_point": (L.kto_reference_point, lambda d: ((d.logps(B), d.logps(B)), {}, {})),
    "orpo_log_odds_ratio": (L.orpo_log_odds_ratio, lambda d: ((d.logps(B), d.logps(B)), {}, {})),
    "orpo_loss": (L.orpo_loss, lambda d: ((d.logps(B), d.logps(B)), {}, {"beta": 0.5})),
    "simpo_loss": (L.simpo_loss, lambda d: ((d.logps(B), d.logps(B)), {}, {"beta": 2.0})),
    "cpo_loss": (L.cpo_loss, lambda d: ((d.logps(B), d.logps(B)), {}, {"beta": 0.5})),
    "sft_loss": (L.sft_loss, lambda d: ((d.logps(B, T), d.mask(B, T)), {}, {})),
    # --- advantages.py
    "gae": (
        L.gae,
        lambda d: (
            (d.normal(B, T), d.normal(B, T), d.mask(B, T)),
            {"bootstrap_value": d.normal(B), "dones": d.flags(B, T)},
            {"gamma": 0.9, "lam": 0.95},
        ),
    ),
    "discounted_returns": (
        L.discounted_returns,
        lambda d: (
            (d.normal(B, T), d.mask(B, T)),
            {"bootstrap_value": d.normal(B)},
            {"gamma": 0.9},
        ),
    ),
    "group_advantages": (L.group_advantages, lambda d: ((d.normal(B),), {}, {"group_size": B})),
    "rloo_advantages": (L.rloo_advantages, lambda d: ((d.normal(B),), {}, {"group_size": 2})),
    # --- kl.py
    "k1": (L.k1, lambda d: ((d.logps(B, T), d.logps(B, T), d.mask(B, T)), {}, {})),
    "k2": (L.k2, lambda d: ((d.logps(B, T), d.logps(B, T), d.mask(B, T)), {}, {})),
    "k3": (L.k3, lambda d: ((d.logps(B, T), d.logps(B, T), d.mask(B, T)), {}, {})),
    "kl_estimate": (
        L.kl_estimate,
        lambda d: ((d.logps(B, T), d.logps(B, T)), {"mask": d.mask(B, T)}, {"kind": "k3"}),
    ),
    "kl_shaped_rewards": (
        L.kl_shaped_rewards,
        lambda d: (
            (d.normal(B), d.logps(B, T), d.logps(B, T), d.mask(B, T)),
            {},
            {"kl_coef": 0.1},
        ),
    ),
    "adaptive_kl_init": (L.adaptive_kl_init, lambda d: ((d.normal() ** 2,), {}, {})),
    "adaptive_kl_update": (
        L.adaptive_kl_update,
        lambda d: (
            (L.AdaptiveKLState(d.normal() ** 2), 6.0 + d.normal(scale=0.3)),
            {},
            {"target": 6.0, "horizon": 100.0, "n_steps": 4},
        ),
    ),
    "process_reward_loss": (
        L.process_reward_loss,
        lambda d: ((d.normal(B, T), d.flags(B, T, p=0.5), d.mask(B, T)), {}, {}),
    ),
    # --- policy_gradient.py
    "ppo_policy_loss": (
        L.ppo_policy_loss,
        lambda d: (
            (d.logps(B, T), d.logps(B, T), d.normal(B, T), d.mask(B, T)),
            {},
            {"dual_clip": 3.0},
        ),
    ),
    "value_loss": (
        L.value_loss,
        lambda d: ((d.normal(B, T), d.normal(B, T), d.normal(B, T), d.mask(B, T)), {}, {}),
    ),
    "entropy_bonus": (
        L.entropy_bonus,
        lambda d: ((d.normal(B, T) ** 2, d.mask(B, T)), {}, {"entropy_coef": 0.01}),
    ),
    "grpo_loss": (
        L.grpo_loss,
        lambda d: (
            (d.logps(B, T), d.logps(B, T), d.logps(B, T), d.normal(B), d.mask(B, T)),
            {},
            {"beta": 0.04},
        ),
    ),
    "reinforce_loss": (
        L.reinforce_loss,
        lambda d: ((d.logps(B, T), d.normal(B), d.mask(B, T)), {}, {}),
    ),
    "sequence_mean": (L.sequence_mean, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {})),
    "token_mean": (L.token_mean, lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {})),
    "constant_mean": (
        L.constant_mean,
        lambda d: ((d.normal(B, T), d.mask(B, T)), {}, {"normalizer": 64.0}),
    ),
}

# Public functions deliberately without a case, with the reason.
NOT_LOSSES = {
    "shift_labels": "slices its inputs and computes nothing: their dtypes pass through unchanged",
}


def _public_names():
    """Every public name of prefjax.losses and of its submodules' ``__all__`` (modules excluded)."""
    names = {n for n, v in vars(L).items() if not n.startswith("_") and not inspect.ismodule(v)}
    for module in vars(L).values():
        if isinstance(module, types.ModuleType) and module.__name__.startswith(L.__name__ + "."):
            names |= set(getattr(module, "__all__", ()))
    return names


def test_every_public_function_has_a_dtype_case():
    functions, registries = set(), {}
    for name in _public_names():
        value = getattr(L, name)
        if isinstance(value, dict):  # PAIRWISE_LOSSES, KL_ESTIMATORS, LOSS_REDUCTIONS
            registries[name] = value
        elif inspect.isclass(value):  # the NamedTuple outputs and states: containers, no maths
            assert issubclass(value, tuple), name
        else:
            assert inspect.isfunction(value), name
            functions.add(name)
    assert functions == set(CASES) | set(NOT_LOSSES), (
        f"without a dtype case: {sorted(functions - set(CASES) - set(NOT_LOSSES))}; "
        f"stale cases: {sorted(set(CASES) - functions)}"
    )
    # A registry only names public functions, so its entries are covered by the cases above.
    for name, registry in registries.items():
        for fn in registry.values():
            assert fn.__name__ in CASES and getattr(L, fn.__name__) is fn, (name, fn)


@functools.cache
def _call(name):
    """The case's function with its static keywords bound, one jitted handle per case (so the
    perturbed float64 run reuses the float64 compilation)."""
    fn, case = CASES[name]
    static = case(_Inputs(jnp.float32))[2]

    def call(args, kwargs):
        return fn(*args, **kwargs, **static)

    return call, jax.jit(call)


def _run(name, dtype, *, nudge=None, trace_only=False):
    """The case's outputs (a list of arrays) for inputs in ``dtype``, jitted as callers jit.

    ``nudge``: ``(i, perturb)`` multiplies the i-th float input leaf by
    ``1 + perturb * (1, 2 or 3)`` element by element (not a uniform scaling, which
    scale-invariant functions such as whitening would ignore). ``trace_only``: shapes and dtypes
    only (``jax.eval_shape``, nothing compiled or run).
    """
    args, kwargs, _ = CASES[name][1](_Inputs(dtype))
    leaves, treedef = jax.tree.flatten((args, kwargs))
    if nudge is not None:
        i, perturb = nudge
        j = _float_leaves(leaves)[i]
        pattern = 1 + jnp.arange(leaves[j].size).reshape(leaves[j].shape) % 3
        leaves[j] = leaves[j] * (1 + perturb * pattern)
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    call, jitted = _call(name)
    out = jax.eval_shape(call, args, kwargs) if trace_only else jitted(args, kwargs)
    return jax.tree.leaves(out)


def _float_leaves(leaves):
    return [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]


def _num_float_inputs(name):
    args, kwargs, _ = CASES[name][1](_Inputs(jnp.float32))
    return len(_float_leaves(jax.tree.leaves((args, kwargs))))


def _assert_dtypes(leaves, dtype, name):
    for leaf in leaves:
        assert leaf.dtype == dtype, f"{name}: output {leaf.dtype}, expected {dtype}"


_EPS32 = float(np.finfo(np.float32).eps)


def _is_indicator(x):  # clipfrac-style 0/1 outputs: they cannot follow a tiny nudge
    return bool(np.all((x == 0) | (x == 1)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_inputs_give_float64_outputs_close_to_float32(name):
    with jax.enable_x64(True):
        out64 = _run(name, jnp.float64)
        out32 = _run(name, jnp.float32)  # under x64: float32 data stays float32
        # Each float input in turn nudged far below float32 resolution (a relative 1e-11 to
        # 3e-11); the runs reuse the float64 compilation.
        nudged = [_run(name, jnp.float64, nudge=(i, 1e-11)) for i in range(_num_float_inputs(name))]
    _assert_dtypes(out64, jnp.float64, name)
    _assert_dtypes(out32, jnp.float32, name)
    for a, b in zip(out64, out32, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # float64 is used end to end: every input moves some output, every output (but 0/1
    # indicators) follows some input, by far less than a float32 ulp. An input rounded to
    # float32 on entry moves nothing; a float32 round trip inside freezes the outputs after it
    # (or makes them jump by about an ulp).
    out64 = [np.asarray(x) for x in out64]
    leaf_moved = [_is_indicator(x) for x in out64]
    for i, outs in enumerate(nudged):
        input_moved = False
        for k, (a, b) in enumerate(zip(map(np.asarray, outs), out64, strict=True)):
            moved = bool(np.any(a != b))
            input_moved |= moved
            leaf_moved[k] |= moved
            jump = np.max(np.abs(a - b) / np.maximum(_EPS32 * np.abs(b), 1e-300))
            assert jump <= 0.25, f"{name}: input {i} moved output {k} by {jump:.3g} float32 ulps"
        assert input_moved, f"{name}: float input {i} changed below float32 resolution: no effect"
    assert all(leaf_moved), f"{name}: outputs {leaf_moved} blind to float64-only input changes"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_inputs_give_float32_outputs(name):
    # The output dtype is fixed when the function is traced: no need to compile and run it
    # (the per-module tests check bfloat16 values against float32 references).
    _assert_dtypes(_run(name, jnp.bfloat16, trace_only=True), jnp.float32, name)


# --- float64 results against NumPy float64 references, to float64 precision -------------------


def test_dpo_loss_float64_matches_numpy_reference_to_1e_12():
    rng = np.random.default_rng(11)
    # Summed log-probs, float32-representable so the float32 run below sees the same numbers.
    logps = [-np.abs(rng.normal(30.0, 10.0, size=8)).astype(np.float32) for _ in range(4)]
    logps64 = [x.astype(np.float64) for x in logps]
    kw = dict(beta=0.1, label_smoothing=0.2)
    want, want_chosen, want_rejected = trl_dpo_loss("sigmoid", *logps64, **kw)
    with jax.enable_x64(True):
        got = L.dpo_loss(*logps64, **kw)
        got32 = L.dpo_loss(*logps, **kw)
    assert got.loss.dtype == jnp.float64
    np.testing.assert_allclose(got.loss, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.chosen_rewards, want_chosen, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.rejected_rewards, want_rejected, rtol=1e-12, atol=0)
    # A tolerance float32 cannot meet: the float32 result misses the reference by far more.
    assert np.max(np.abs(np.asarray(got32.loss, np.float64) - want) / want) > 1e-9


def test_gae_float64_matches_loop_reference_to_1e_12():
    rng = np.random.default_rng(12)
    rewards = rng.normal(size=(3, 9)).astype(np.float32).astype(np.float64)
    values = rng.normal(size=(3, 9)).astype(np.float32).astype(np.float64)
    mask = rng.random((3, 9)) < 0.8
    dones = np.zeros((3, 9), bool)
    dones[:, [2, 5]] = True  # two episode ends in the middle of every row
    boot = rng.normal(size=3).astype(np.float32).astype(np.float64)
    gamma, lam = 0.97, 0.9
    want_adv, want_ret = gae_reference(
        rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=boot, dones=dones
    )
    fn = jax.jit(
        lambda r, v, b: L.gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=b, dones=dones)
    )
    with jax.enable_x64(True):
        adv, ret = fn(rewards, values, boot)
        adv32, _ = fn(
            rewards.astype(np.float32), values.astype(np.float32), boot.astype(np.float32)
        )
    assert adv.dtype == ret.dtype == jnp.float64
    np.testing.assert_allclose(adv, want_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(np.asarray(adv32) - want_adv)) > 1e-9  # float32 misses it


def test_ppo_policy_loss_float64_matches_loop_reference_to_1e_12():
    rng = np.random.default_rng(13)
    old = rng.normal(-2.0, 1.0, size=(3, 6))
    new = old + rng.normal(0.0, 0.5, size=(3, 6))
    adv = 3.0 * rng.normal(size=(3, 6))
    mask = rng.random((3, 6)) < 0.8
    loss, clipped, approx_kl = ppo_policy_reference(
        new, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0
    )
    with jax.enable_x64(True):
        out = L.ppo_policy_loss(
            new, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0
        )
    assert out.loss.dtype == out.clipfrac.dtype == jnp.float64
    np.testing.assert_allclose(out.loss, loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out.clipfrac, clipped)
    # The reference's (r - 1) - log r cancels for ratios near 1 (ours is expm1): 1e-10, not 1e-12.
    np.testing.assert_allclose(out.approx_kl, approx_kl, rtol=1e-10, atol=1e-12)


def test_masked_mean_does_not_round_float64_weights_to_float32():
    # A float64 weight is part of the computation: 1/3 is not rounded to float32's 0.33333334.
    x = np.array([[1.0, 2.0, 4.0]])
    w = np.array([[1.0 / 3.0, 1.0, 0.5]])
    with jax.enable_x64(True):
        got = L.masked_mean(x, w, axis=-1)
    assert got.dtype == jnp.float64
    want = (1.0 / 3.0 * 1.0 + 2.0 + 0.5 * 4.0) / (1.0 / 3.0 + 1.0 + 0.5)
    np.testing.assert_allclose(got, [want], rtol=1e-15)
