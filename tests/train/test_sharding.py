"""Mesh, logical-axis rules, sharded init, and sharded train steps equal to the single-device step.

Runs on the 8 simulated CPU devices set up by the root conftest. The sharded-step tests compare a
DPO / reward-model step on a 1-device mesh with the same step under FSDP rules (``fsdp=8``) and
tensor-parallel rules (``data=4, tensor=2``): same loss, same parameters after one SGD step (SGD,
so the parameter change *is* the gradient), and parameters partitioned as the rules say.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.configs import common as config_common
from prefjax import data, models
from prefjax import sharding as shd
from prefjax.train import cost, dpo, reward
from prefjax.train import setup as train_setup

# A smaller-than-tiny Llama (byte vocabulary) so that compiling three meshes stays fast.
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def mesh_config(data_=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES):
    return ml_collections.ConfigDict(
        dict(data=data_, fsdp=fsdp, tensor=tensor, rules=rules, distributed=False)
    )


# ----------------------------------------------------------------------------------- the mesh


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ((1, -1, 1), (1, 8, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((-1, 1, 1), (8, 1, 1)),
        ((4, 1, 2), (4, 1, 2)),
    ],
    ids=["fsdp-rest", "mixed", "data-rest", "explicit"],
)
def test_mesh_shape_resolves_rest(sizes, expected):
    assert shd.mesh_shape(*sizes, num_devices=8) == expected
    mesh = shd.make_mesh(mesh_config(*sizes))
    assert tuple(mesh.shape[a] for a in shd.MESH_AXES) == expected
    assert mesh.size == 8


@pytest.mark.parametrize(
    "sizes,field",
    [
        ((3, -1, 1), "config.mesh.fsdp=-1"),
        ((-1, -1, 1), "config.mesh.fsdp=-1"),
        ((2, 2, 1), "config.mesh"),
        ((0, 8, 1), "config.mesh.data=0"),
    ],
    ids=["indivisible", "two-rest", "wrong-product", "zero"],
)
def test_invalid_mesh_names_the_field(sizes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        shd.mesh_shape(*sizes, num_devices=8)


# ------------------------------------------------------------------------------------- rules


def test_logical_to_spec_rules():
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", ("fsdp", "tensor")), ("layers", None))
    assert shd.logical_to_spec(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
    # A mesh axis is used once per array: "vocab" wants fsdp+tensor but embed took fsdp.
    assert shd.logical_to_spec(("embed", "vocab"), rules) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("vocab", "embed"), rules) == P(("fsdp", "tensor"))
    # Unknown names and None replicate.
    assert shd.logical_to_spec(("heads", None), rules) == P()
    mesh = shd.make_mesh(mesh_config(1, 8, 1))
    # 100 is not divisible by 8: replicated; 64 is.
    assert shd.logical_to_spec(("embed",), rules, mesh, (100,)) == P()
    assert shd.logical_to_spec(("embed",), rules, mesh, (64,)) == P("fsdp")


def test_bad_rules_name_the_field():
    with pytest.raises(ValueError, match=r"config\.mesh\.rules\[1\].*unknown mesh axis 'model'"):
        shd.validate_rules((("embed", "fsdp"), ("mlp", "model")))
    with pytest.raises(ValueError, match=r"appears twice"):
        shd.validate_rules((("embed", "fsdp"), ("embed", None)))


def _shapes(config):
    return jax.eval_shape(lambda k: models.Model.init(config, k).params, jax.random.key(0))


def test_param_shardings_follow_rules():
    config = models.preset("tiny", **TINY)
    model_axes = models.Model(config, None).param_axes
    shapes = _shapes(config)
    fsdp = shd.make_mesh(mesh_config(1, 8, 1))
    specs = shd.param_specs(model_axes, shapes, shd.FSDP_RULES, fsdp)
    q = model_axes["layers"]["attn"]["q_proj"]["kernel"]
    assert q == ("layers", "embed", "heads", "head_dim")
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, "fsdp")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, None, "fsdp")
    tp = shd.make_mesh(mesh_config(4, 1, 2))
    specs = shd.param_specs(model_axes, shapes, shd.TENSOR_RULES, tp)
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, None, "tensor")
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, None, "tensor")
    assert specs["lm_head"]["kernel"] == P(None, "tensor")


def test_sharded_init_is_born_sharded_and_equals_plain_init():
    config = models.preset("tiny", **TINY)
    mesh = shd.make_mesh(mesh_config(1, 8, 1))
    axes = models.Model(config, None).param_axes
    init = lambda k: models.Model.init(config, k).params
    params = shd.sharded_init(init, mesh, axes, shd.FSDP_RULES, jax.random.key(3))
    kernel = params["layers"]["mlp"]["up_proj"]["kernel"]  # [layers, embed=32, mlp]
    assert kernel.sharding.spec == P(None, "fsdp")
    # Each device holds 1/8 of the embed axis.
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4, 64)}
    plain = init(jax.random.key(3))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_helpers():
    mesh = shd.make_mesh(mesh_config(2, 4, 1))
    batch = {"x": np.arange(16 * 3).reshape(16, 3), "y": np.arange(16)}
    out = shd.make_global_batch(mesh, batch)
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    assert out["y"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        shd.shard_batch(mesh, {"x": np.zeros((12, 2))})
    with pytest.raises(ValueError, match=r"config\.data\.batch_size=12"):
        shd.check_batch_size(12, mesh)


def test_row_constraint_splits_the_forward_by_rows_and_only_on_a_split_batch():
    # Pairs [batch, 2, seq] as the DPO step flattens them, chosen rows then rejected rows: split
    # over the batch, the flat rows are not one block per device, which the row constraint fixes.
    model = models.from_preset("tiny", key=jax.random.key(0), **TINY)
    ids = (np.arange(8 * 2 * 16).reshape(8, 2, 16) % 200 + 3).astype(np.int32)

    def logits(params, pairs):
        rows = jnp.swapaxes(pairs, 0, 1).reshape(-1, pairs.shape[-1])  # [2 * batch, seq]
        return model.apply(params, rows, jnp.ones_like(rows))

    plain = jax.jit(logits).lower(model.params, ids)
    assert "sharding_constraint" not in plain.as_text()
    # One device (and no mesh): the step is traced exactly as without the constraint.
    for mesh in (None, shd.single_device_mesh()):
        same = jax.jit(shd.with_activation_sharding(mesh, logits)).lower(model.params, ids)
        assert same.as_text() == plain.as_text()
    plain = plain.compile()
    for sizes in ((1, 2, 1), (2, 1, 1)):  # fsdp=2 (parameters split on "embed"), data=2
        mesh = shd.make_mesh(mesh_config(*sizes), devices=jax.devices()[:2])
        params = shd.shard_params(mesh, model.params, model.param_axes, shd.FSDP_RULES)
        pairs = jax.device_put(ids, NamedSharding(mesh, P(shd.BATCH_AXES)))
        split = jax.jit(shd.with_activation_sharding(mesh, logits)).lower(params, pairs)
        assert "sharding_constraint" in split.as_text()
        split = split.compile()
        np.testing.assert_allclose(split(params, pairs), plain(model.params, ids), atol=1e-5)
        # Each of the two devices computes its half of the rows, not the whole batch: their
        # FLOPs add up to the single device's (without the constraint: 1.10x over fsdp=2, 2.00x
        # over data=2).
        ratio = 2 * cost.step_cost(split).flops / cost.step_cost(plain).flops
        assert ratio <= 1.02, (sizes, ratio)


def test_initialize_distributed_is_off_unless_asked():
    config = ml_collections.ConfigDict({"mesh": {"distributed": False}})
    assert shd.initialize_distributed(config) is False


# ------------------------------------------------------------- sharded steps == single device


def _config(algorithm, mesh, **algo):
    config = config_common.base_config(algorithm)
    config.data.batch_size = 8
    config.optimizer.name = "sgd"
    config.optimizer.b1 = 0.0
    config.optimizer.learning_rate = 0.5
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.clip_norm = 0.0
    config.train.num_steps = 10
    config.mesh = mesh
    config.algorithm.update(algo)
    return config


@pytest.fixture(scope="module")
def pair_batch():
    tok = models.ByteTokenizer()
    ds = data.RepeatTask().pairwise_dataset(tok, 8, seed=0)
    return data.collate(ds, np.arange(8), 16)


MESHES = {
    "fsdp": (mesh_config(1, 8, 1, shd.FSDP_RULES), {"embed": "fsdp"}),
    "tensor": (mesh_config(4, 1, 2, shd.TENSOR_RULES), {"mlp": "tensor", "heads": "tensor"}),
}


def _one_step(module, config, model, batch):
    mesh = shd.make_mesh(config.mesh)
    setup = train_setup.build_setup(config, model, mesh, jax.random.key(1), module)
    state, metrics = setup.train_step(
        setup.state, setup.shard_batch(batch), setup.frozen, jax.random.key(2)
    )
    return state, jax.device_get(metrics)


def _check_partitioned(state, kind):
    layers = state.params["layers"]
    if kind == "fsdp":
        assert layers["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp")
        assert layers["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp")
        shard = layers["mlp"]["up_proj"]["kernel"].addressable_shards[0].data
        assert shard.shape == (2, 4, 64)  # embed 32 / 8
    else:
        assert layers["attn"]["q_proj"]["kernel"].sharding.spec == P(None, None, "tensor")
        assert layers["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor")
        if "lm_head" in state.params:  # [embed, vocab]: vocab 264 over tensor=2
            assert state.params["lm_head"]["kernel"].sharding.spec == P(None, "tensor")
        shard = layers["mlp"]["down_proj"]["kernel"].addressable_shards[0].data
        assert shard.shape == (2, 32, 32)  # mlp 64 / 2


_SINGLE = {}


def _model(algo):
    head = "lm" if algo == "dpo" else "reward"
    model = models.from_preset("tiny", key=jax.random.key(0), head=head, **TINY)
    if algo == "dpo":
        # Move the policy away from its reference copy so the loss is not exactly log 2.
        model = models.Model(model.config, jax.tree.map(lambda x: 1.5 * x, model.params), head=head)
    return model


def _single(algo, batch):
    """The reference: the same step on a one-device mesh (cached across mesh kinds)."""
    if algo not in _SINGLE:
        module = dpo if algo == "dpo" else reward
        config = _config(algo, mesh_config(1, 1, 1), **ALGO_KW[algo])
        setup = train_setup.build_setup(
            config, _model(algo), shd.single_device_mesh(), jax.random.key(1), module
        )
        state, metrics = setup.train_step(
            setup.state, setup.shard_batch(batch), setup.frozen, jax.random.key(2)
        )
        _SINGLE[algo] = (jax.device_get(state.params), jax.device_get(metrics))
    return _SINGLE[algo]


ALGO_KW = {"dpo": {"beta": 0.5}, "reward": {}}


@pytest.mark.parametrize("kind", list(MESHES))
@pytest.mark.parametrize("algo", ["dpo", "reward"])
def test_sharded_step_equals_single_device(algo, kind, pair_batch):
    module = dpo if algo == "dpo" else reward
    model = _model(algo)
    single_params, single_metrics = _single(algo, pair_batch)
    mesh, _ = MESHES[kind]
    state, metrics = _one_step(module, _config(algo, mesh, **ALGO_KW[algo]), model, pair_batch)
    _check_partitioned(state, kind)
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], single_metrics["grad_norm"], rtol=1e-4)
    max_diff = max(
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single_params), strict=True)
    )
    loss_diff = abs(float(metrics["loss"]) - float(single_metrics["loss"]))
    print(
        f"{algo}/{kind}: |loss - single| = {loss_diff:.2e}, max |params - single| = {max_diff:.2e}"
    )
    assert max_diff < 2e-5
    # The step really moved the parameters (the comparison is not vacuous).
    moved = max(
        float(np.max(np.abs(a - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(model.params), strict=True)
    )
    assert moved > 1e-3
