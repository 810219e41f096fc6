"""LoRA adapters: a separate pytree, exact at initialisation, trainable alone, mergeable."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_testing import jitted

import prefjax.models as pm


@functools.lru_cache
def _apply_with_lora(model):
    return jax.jit(lambda p, ids, mask, lora: model.apply(p, ids, mask, lora=lora))


def _random_b(lora, key):
    """Adapters with ``b`` drawn at random (at initialisation ``b`` is zero)."""
    weights = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jax.random.normal(jax.random.fold_in(key, zlib.crc32(str(path).encode())), x.shape)
            * 0.1
            if path[-1].key == "b"
            else x
        ),
        lora.weights,
    )
    return lora.replace(weights=weights)


@pytest.fixture(scope="module")
def lora(tiny):
    return tiny.init_lora(jax.random.key(7), rank=4, alpha=8.0, targets="all")


def test_lora_structure_and_axes(tiny, lora):
    assert lora.rank == 4 and lora.scale == 2.0
    assert lora.targets == pm.LORA_TARGETS
    q = lora.weights["layers"]["attn"]["q_proj"]
    cfg = tiny.config
    assert q["a"].shape == (cfg.num_layers, cfg.hidden_size, 4)
    assert q["b"].shape == (cfg.num_layers, 4, cfg.num_heads, cfg.resolved_head_dim)
    o = lora.weights["layers"]["attn"]["o_proj"]
    assert o["a"].shape == (cfg.num_layers, cfg.num_heads, cfg.resolved_head_dim, 4)
    assert np.all(np.asarray(q["b"]) == 0) and np.any(np.asarray(q["a"]) != 0)
    # Layers get different adapters (the scan splits the init rng per layer).
    assert not np.allclose(q["a"][0], q["a"][1])
    axes = tiny.lora_axes(lora)
    assert axes.weights["layers"]["attn"]["q_proj"]["a"] == ("layers", "embed", None)
    assert axes.weights["layers"]["attn"]["q_proj"]["b"] == ("layers", None, "heads", "head_dim")
    assert axes.weights["layers"]["mlp"]["down_proj"]["a"] == ("layers", "mlp", None)
    # Same tree structure as the adapters, so shardings map one to one.
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(lora)
    # Default targets are the query and value projections.
    default = tiny.init_lora(jax.random.key(0), rank=2, alpha=2.0)
    assert default.targets == ("q_proj", "v_proj")


def test_zero_b_equals_base_exactly(tiny, lora, batch):
    ids, mask = batch
    base = np.asarray(jitted(tiny)(tiny.params, ids, mask))
    adapted = np.asarray(_apply_with_lora(tiny)(tiny.params, ids, mask, lora))
    np.testing.assert_array_equal(adapted, base)


def test_gradients_reach_only_the_adapters(tiny, lora, batch):
    ids, mask = batch

    def loss(lora_, params):
        logits = tiny.apply(params, ids, mask, lora=lora_)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask[:, 1:])

    # Differentiate the adapters only; the base is an ordinary (frozen) argument.
    grad_fn = jax.jit(jax.value_and_grad(loss))
    value, grads = grad_fn(lora, tiny.params)
    assert isinstance(grads, pm.LoRA) and grads.alpha == lora.alpha
    for path, g in jax.tree_util.tree_flatten_with_path(grads.weights)[0]:
        g = np.asarray(g)
        if path[-1].key == "b":
            assert np.abs(g).max() > 0, path
        else:
            # d loss / d a = x^T (d loss / d y) b^T vanishes while b = 0 (Hu et al., 2021).
            assert np.all(g == 0), path
    # One SGD step on the adapters lowers the loss; the base is untouched.
    stepped = jax.tree.map(lambda w, g: w - 1e-3 * g, lora, grads)
    new_value, new_grads = grad_fn(stepped, tiny.params)
    assert float(new_value) < float(value)
    a_grad = new_grads.weights["layers"]["attn"]["q_proj"]["a"]
    assert np.abs(np.asarray(a_grad)).max() > 0  # once b != 0, a learns too


def test_merge_lora_equals_adapter_forward(tiny, lora, batch):
    ids, mask = batch
    trained = _random_b(lora, jax.random.key(8))
    adapted = np.asarray(_apply_with_lora(tiny)(tiny.params, ids, mask, trained))
    merged = pm.merge_lora(tiny.params, trained)
    assert jax.tree.structure(merged) == jax.tree.structure(tiny.params)
    out = np.asarray(jitted(tiny)(merged, ids, mask))
    np.testing.assert_allclose(out, adapted, atol=2e-5, rtol=0)
    base = np.asarray(jitted(tiny)(tiny.params, ids, mask))
    assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
    # Untargeted parameters are the same arrays; targeted kernels changed by (alpha / r) a @ b.
    assert merged["embed"] is tiny.params["embed"]
    a = trained.weights["layers"]["mlp"]["up_proj"]["a"][0]
    b = trained.weights["layers"]["mlp"]["up_proj"]["b"][0]
    np.testing.assert_allclose(
        merged["layers"]["mlp"]["up_proj"]["kernel"][0],
        tiny.params["layers"]["mlp"]["up_proj"]["kernel"][0] + 2.0 * a @ b,
        atol=1e-6,
    )


def test_cached_decoding_uses_the_adapters(tiny, lora, batch):
    ids, mask = batch
    trained = _random_b(lora, jax.random.key(10))
    cache = tiny.init_cache(3, 8)
    logits, _ = jax.jit(tiny.prefill)(tiny.params, ids, mask, cache, lora=trained)
    adapted = _apply_with_lora(tiny)(tiny.params, ids, mask, trained)
    np.testing.assert_allclose(logits, adapted, atol=2e-5, rtol=0)


def test_lora_dropout_needs_a_key(tiny, batch):
    ids, mask = batch
    lora = _random_b(
        tiny.init_lora(jax.random.key(9), rank=2, alpha=2.0, dropout=0.5), jax.random.key(1)
    )
    plain = _apply_with_lora(tiny)(tiny.params, ids, mask, lora.replace(dropout=0.0))
    # Without a key dropout is off (evaluation).
    np.testing.assert_allclose(_apply_with_lora(tiny)(tiny.params, ids, mask, lora), plain, atol=0)
    train = jax.jit(lambda p, adapters, k: tiny.apply(p, ids, mask, lora=adapters, key=k))
    k1 = train(tiny.params, lora, jax.random.key(1))
    k2 = train(tiny.params, lora, jax.random.key(2))
    assert np.abs(np.asarray(k1) - np.asarray(plain)).max() > 1e-4
    assert np.abs(np.asarray(k1) - np.asarray(k2)).max() > 1e-4


def test_lora_argument_errors(tiny):
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        tiny.init_lora(jax.random.key(0), rank=2, alpha=1.0, targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        tiny.init_lora(jax.random.key(0), rank=0, alpha=1.0)
    gpt2_like = pm.Model(pm.preset("tiny", gated_mlp=False), None)
    with pytest.raises(ValueError, match="gate_proj"):
        gpt2_like.init_lora(jax.random.key(0), rank=2, alpha=1.0, targets=("gate_proj",))
