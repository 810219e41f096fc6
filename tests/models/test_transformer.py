"""Forward-pass properties of the transformer: padding, KV cache, heads, dtypes, remat, axes.

Compilation dominates the cost of these tests on a CPU, so they share jitted functions (see
``_model_testing.jitted``) and fixed input shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_testing import abstract_model, jitted

import prefjax.models as pm
from prefjax.models.transformer import default_positions, last_token_index

AXIS_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", None}
PAD = 256  # the byte tokenizer's pad id

# A GPT-2-shaped tiny config: LayerNorm, learned positions, plain GELU MLP, biases, tied embeddings.
GPT2_TINY = dict(
    norm="layer",
    position="learned",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    gated_mlp=False,
    activation="gelu_tanh",
    tie_embeddings=True,
    num_kv_heads=4,
    model_type="gpt2",
)


def test_default_positions_and_last_token():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    )
    np.testing.assert_array_equal(last_token_index(mask), [4, 2, 4])


def _left_pad(rows, length):
    """Left-pad variable-length rows to ``[len(rows), length]`` ids and mask."""
    ids = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    return ids, mask


def test_padding_does_not_change_real_token_logits(tiny, batch):
    ids, mask = batch
    apply = jitted(tiny)
    logits = np.asarray(apply(tiny.params, ids, mask))
    assert np.all(np.isfinite(logits))  # padding queries stay finite too
    # Reference: each row's real tokens alone, unpadded, one forward each (same shape [1, 8] by
    # padding only on the right, which cannot affect earlier tokens under the causal mask).
    for row in range(3):
        real = mask[row] == 1
        alone = np.full((1, 8), PAD, np.int32)
        alone[0, : real.sum()] = ids[row][real]
        ref = np.asarray(apply(tiny.params, alone, np.ones((1, 8), np.int32)))
        np.testing.assert_allclose(logits[row][real], ref[0, : real.sum()], atol=2e-5, rtol=0)


def test_hidden_states_times_unembedding_is_logits(tiny, batch):
    ids, mask = batch
    hidden = jitted(tiny, "hidden_states")(tiny.params, ids, mask)
    assert hidden.shape == (3, 8, tiny.config.hidden_size)
    logits = jitted(tiny)(tiny.params, ids, mask)
    np.testing.assert_allclose(hidden @ tiny.unembedding(tiny.params), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["lm", "value"])
def test_param_axes_cover_every_parameter(head):
    for overrides in ({}, GPT2_TINY):
        model = abstract_model(pm.preset("tiny", **overrides), head)
        flat_p = jax.tree_util.tree_flatten_with_path(model.params)[0]
        flat_a = dict(
            jax.tree_util.tree_flatten_with_path(
                model.param_axes, is_leaf=lambda x: isinstance(x, tuple)
            )[0]
        )
        assert len(flat_p) == len(flat_a)
        for path, leaf in flat_p:
            axes = flat_a[path]
            assert len(axes) == leaf.ndim, (path, axes, leaf.shape)
            assert set(axes) <= AXIS_NAMES, axes
            if path[0].key == "layers":
                assert axes[0] == "layers" and leaf.shape[0] == model.config.num_layers


# Llama-style with GQA and a sliding window shorter than the prompts, and GPT-2 style.
@pytest.mark.parametrize("overrides", [{"sliding_window": 3}, GPT2_TINY], ids=["llama", "gpt2"])
def test_kv_cache_greedy_decode_equals_full_recomputation(overrides):
    model = pm.from_preset("tiny", key=jax.random.key(2), init_std=0.3, **overrides)
    prompts = [[10, 11, 12, 13], [20, 21, 22, 23, 24, 25], [30, 31, 32]]
    ids, mask = _left_pad(prompts, 6)
    # Row 2 is right-padded instead: the sampler must continue after its last real token.
    ids[2], mask[2] = [30, 31, 32, PAD, PAD, PAD], [1, 1, 1, 0, 0, 0]
    steps = 5
    out = pm.greedy_generate(model, model.params, ids, mask, max_new_tokens=steps)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, steps) and np.all(np.asarray(out.mask) == 1)
    # Full recomputation without a cache: under the causal mask, one forward over prompt +
    # generated tokens gives, at every position, the logits computed from that prefix alone.
    full_ids, full_mask = _left_pad(
        [p + list(t) for p, t in zip(prompts, tokens, strict=True)], 6 + steps
    )
    full = np.asarray(jitted(model)(model.params, full_ids, full_mask))
    for t in range(steps):
        step_logits = full[:, 6 + t - 1]  # the position predicting generated token t
        np.testing.assert_array_equal(tokens[:, t], step_logits.argmax(-1))
        logp = np.asarray(jax.nn.log_softmax(step_logits))
        np.testing.assert_allclose(out.logprobs[:, t], logp[np.arange(3), tokens[:, t]], atol=1e-4)
    # The tokens are not trivially constant (the test would be weak otherwise).
    assert len(np.unique(tokens)) > 2


def test_prefill_and_decode_step_logits(tiny, batch):
    ids, mask = batch
    cache = tiny.init_cache(3, 10)
    logits, cache = jax.jit(tiny.prefill)(tiny.params, ids, mask, cache)
    np.testing.assert_allclose(logits, jitted(tiny)(tiny.params, ids, mask), atol=2e-5)
    assert int(cache.length) == 8
    np.testing.assert_array_equal(cache.next_position, mask.sum(-1))
    new = np.array([1, 2, 3], np.int32)
    step_logits, cache = jax.jit(tiny.decode_step)(tiny.params, new, cache)
    assert int(cache.length) == 9
    # Row 2 is right-padded: its new token follows the padding but gets position 6.
    full_ids = np.concatenate([ids, new[:, None], np.full((3, 1), PAD, np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, 1), np.int32), np.zeros((3, 1), np.int32)], 1)
    full = jitted(tiny)(tiny.params, full_ids, full_mask)
    np.testing.assert_allclose(step_logits, full[:, 8], atol=2e-5)


def test_prefill_in_two_chunks_equals_one(tiny, batch):
    ids, mask = batch
    prefill = jax.jit(tiny.prefill)
    cache = tiny.init_cache(3, 8)
    first, cache = prefill(tiny.params, ids[:, :5], mask[:, :5], cache)
    second, cache = prefill(tiny.params, ids[:, 5:], mask[:, 5:], cache)
    full = jitted(tiny)(tiny.params, ids, mask)
    chunked = np.concatenate([first, second], axis=1)
    np.testing.assert_allclose(chunked[mask == 1], np.asarray(full)[mask == 1], atol=2e-5)
    np.testing.assert_array_equal(cache.next_position, mask.sum(-1))


def test_reward_head_reads_last_real_token(tiny):
    model = tiny.with_head("reward", key=jax.random.key(3))
    real = [5, 6, 7, 8, 9]
    ids = np.full((5, 11), PAD, np.int32)
    mask = np.zeros((5, 11), np.int32)
    for r, start in enumerate([0, 6, 3, 2]):  # right, left, both-sided padding
        ids[r, start : start + 5], mask[r, start : start + 5] = real, 1
    ids[4, :5], mask[4, :5] = real[:-1] + [10], 1  # a different last token
    ids[0, 7:] = 42  # garbage under the mask changes nothing
    rewards = np.asarray(jitted(model)(model.params, ids, mask))
    assert rewards.shape == (5,)
    np.testing.assert_allclose(rewards[:4], rewards[0], atol=1e-5)
    assert abs(rewards[4] - rewards[0]) > 1e-6
    # Independent reading: the head's kernel applied to the hidden state of the last real token.
    hidden = jitted(model, "hidden_states")(model.params, ids, mask)
    manual = hidden[1, -1] @ model.params["reward_head"]["kernel"][:, 0]
    np.testing.assert_allclose(rewards[1], manual, atol=1e-5)


def test_value_head_per_token(tiny, batch):
    model = tiny.with_head("value", key=jax.random.key(4))
    ids, mask = batch
    values = jitted(model)(model.params, ids, mask)
    assert values.shape == (3, 8) and values.dtype == jnp.float32
    hidden = jitted(model, "hidden_states")(model.params, ids, mask)
    head = model.params["value_head"]
    np.testing.assert_allclose(
        values, hidden @ head["kernel"][:, 0] + head["bias"][0], atol=1e-5, rtol=0
    )


def test_with_head_shares_trunk(tiny):
    value = tiny.with_head("value", key=jax.random.key(5))
    reward = value.with_head("reward", key=jax.random.key(5))
    assert "lm_head" not in value.params and set(value.params["value_head"]) == {"kernel", "bias"}
    assert set(reward.params) == {"embed", "layers", "final_norm", "reward_head"}
    assert value.params["layers"] is tiny.params["layers"]
    assert jax.tree.map(jnp.shape, reward.params) == jax.tree.map(
        jnp.shape, abstract_model(tiny.config, "reward").params
    )


def test_bfloat16_compute_close_to_float32(tiny, batch):
    ids, mask = batch
    bf16 = pm.Model(tiny.config.replace(dtype=jnp.bfloat16), tiny.params)
    hidden = jax.eval_shape(bf16.hidden_states, bf16.params, ids, mask)
    assert hidden.dtype == jnp.bfloat16
    # Parameters stay float32; only the computation is bfloat16.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
    ref = np.asarray(jax.nn.log_softmax(jitted(tiny)(tiny.params, ids, mask)))
    got = np.asarray(jax.nn.log_softmax(jitted(bf16)(bf16.params, ids, mask)))
    err = np.abs(got - ref)[mask == 1].max()
    # bfloat16 keeps 8 bits of mantissa (relative error 2^-8 ~ 4e-3 per rounding).
    assert err < 3e-2, err
    assert err > 0  # it really ran in lower precision


_REF_GRADS = {}


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_gradients(tiny, batch, policy):
    ids, mask = batch

    def grads(model):
        def loss(params):
            logits = model.apply(params, ids, mask)
            logp = jax.nn.log_softmax(logits[:, :-1])
            tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -(tok * mask[:, 1:]).sum()

        return jax.jit(jax.grad(loss))(model.params)

    if "ref" not in _REF_GRADS:
        _REF_GRADS["ref"] = grads(tiny)
    got = grads(pm.Model(tiny.config.replace(remat=policy), tiny.params))
    # Recomputation reassociates float32 sums: agree to 1e-5 of each gradient's scale.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0),
        got,
        _REF_GRADS["ref"],
    )


@pytest.mark.parametrize(
    "overrides",
    [{}, {"remat": "full"}, {"sliding_window": 3, "sliding_window_layers": (True, False)}],
    ids=["plain", "remat", "windows"],
)
def test_unrolled_layers_equal_the_layer_scan(tiny, batch, overrides):
    """``scan_unroll`` runs the layers one after another with slices of the same stacked weights
    (and, with adapters, of the stacked LoRA weights): the same logits and gradients as the scan,
    per-layer windows included, and no loop left in the differentiated program."""
    ids, mask = batch
    scanned = pm.Model(tiny.config.replace(**overrides), tiny.params)
    unrolled = pm.Model(scanned.config.replace(scan_unroll=True), tiny.params)
    lora = tiny.init_lora(jax.random.key(3), rank=2, alpha=2.0, targets="all")
    b = lambda path, x: x + 0.1 if path[-1].key == "b" else x  # noqa: E731
    lora = lora.replace(weights=jax.tree_util.tree_map_with_path(b, lora.weights))

    def loss(model, params, adapters):
        logits = model.apply(params, ids, mask, lora=adapters)
        return jnp.sum(jax.nn.log_softmax(logits) * mask[..., None]), logits

    for adapters in (None, lora):
        fn = lambda m, a=adapters: jax.value_and_grad(  # noqa: E731
            lambda p: loss(m, p, a), has_aux=True
        )
        (want, want_logits), want_grads = jax.jit(fn(scanned))(tiny.params)
        (got, got_logits), got_grads = jax.jit(fn(unrolled))(tiny.params)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0),
            got_grads,
            want_grads,
        )
    hlo = jax.jit(jax.grad(lambda p: loss(unrolled, p, None)[0])).lower(tiny.params).as_text()
    assert "while" not in hlo and "stablehlo.while" not in hlo


def test_sliding_window_masks_distant_keys(tiny, batch):
    ids, mask = batch
    windowed = pm.Model(tiny.config.replace(sliding_window=2), tiny.params)
    a = np.asarray(jitted(tiny)(tiny.params, ids, mask))
    b = np.asarray(jitted(windowed)(windowed.params, ids, mask))
    # The first two real tokens of every row see the same keys either way; later ones do not.
    pos = np.asarray(default_positions(mask))
    near = (pos < 2) & (mask == 1)
    np.testing.assert_allclose(a[near], b[near], atol=1e-6)
    assert np.abs(a - b)[(pos >= 2) & (mask == 1)].min() > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        pm.preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        pm.preset("tiny", remat="sometimes")
    with pytest.raises(ValueError, match="unknown preset"):
        pm.preset("huge")
    with pytest.raises(ValueError, match="sliding_window_layers"):
        pm.preset("tiny", sliding_window=4, sliding_window_layers=(True,))
    with pytest.raises(ValueError, match="attention_impl.*bfloat16"):
        pm.preset("tiny", attention_impl="cudnn")


def test_init_does_not_depend_on_attention_kernel_or_remat(tiny):
    # A cuDNN config can be initialised on a host without cuDNN; remat changes nothing either.
    cfg = tiny.config.replace(attention_impl="cudnn", dtype=jnp.bfloat16, remat="full")
    other = pm.Model.init(cfg, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, other.params, tiny.params)


def test_bad_inputs_are_reported(tiny):
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny.apply(tiny.params, np.zeros((2, 3), np.int32), np.ones((2, 4)))
    with pytest.raises(ValueError, match="integers"):
        tiny.apply(tiny.params, np.zeros((2, 3), np.float32), np.ones((2, 3)))
    gpt2_like = pm.Model(pm.preset("tiny", **GPT2_TINY), None)
    with pytest.raises(ValueError, match="max_positions"):
        gpt2_like.init_cache(1, 1000)
    with pytest.raises(ValueError, match="max_positions=256"):
        gpt2_like.apply(None, np.zeros((1, 300), np.int32), np.ones((1, 300)))


def test_presets_shapes():
    llama = pm.preset("llama1b")
    # Llama-3.2-1B has 1,235,814,400 parameters (tied embeddings), as its model card reports.
    assert llama.num_params() == 1_235_814_400
    assert pm.preset("llama1b", vocab_size=32000).vocab_size == 32000
    # GPT-2 small: 124,439,808 parameters (tied LM head).
    assert pm.preset("gpt2").num_params() == 124_439_808
    tiny = pm.preset("tiny")
    assert tiny.vocab_size == pm.ByteTokenizer().vocab_size
    assert pm.param_count(abstract_model(llama).params) == llama.num_params()
    assert pm.param_count(abstract_model(pm.preset("gpt2")).params) == 124_439_808
