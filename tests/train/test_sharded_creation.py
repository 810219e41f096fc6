"""The loop builds the model with the mesh: parameters are born sharded, never whole on a device.

On the 8 simulated CPU devices of the root conftest with ``mesh.fsdp=8``, every parameter of the
tiny preset has an ``embed`` axis that the FSDP rules split 8 ways. Each test records the
``Setup`` the loop hands to training and checks that each leaf of the train state (params and
AdamW moments) and of the frozen reference is split (its largest shard on any device is smaller
than the array), and that the parameter initialiser only ever ran under tracing (the
``eval_shape`` / jitted init with sharded outputs), never eagerly on one device. The three ways a
run gets its initial policy are covered: the preset's own init, an SFT warm-up stage of the
``experiments/pipelines.py`` pipeline (whose sharded policy is handed over without a copy) and
``model.init_from`` (another run's checkpoint, placed by the rules).
"""

import jax
import numpy as np
import pytest

import prefjax.models.model as model_lib
from experiments import pipelines
from prefjax.train import dpo, loop
from prefjax.train import setup as train_setup
from tests.train.test_loop import host, tiny_config

FSDP8 = {"mesh.data": 1, "mesh.fsdp": 8}


class Recorded:
    """DPO, keeping the ``Setup`` the loop trains with."""

    def __init__(self):
        self.built = self.unsplit_state = None

    def __getattr__(self, name):
        return getattr(dpo, name)

    def setup(self, config, model, mesh, key):  # the protocol's optional hook
        self.built = train_setup.build_setup(config, model, mesh, key, dpo)
        # Before the first step donates it: the train state handed to the step.
        state = self.built.state
        self.unsplit_state = _unsplit_leaves((state.params, state.opt_state))
        return self.built


def _unsplit_leaves(tree):
    """Paths of the array leaves (ndim > 0) some device holds whole (or that are host arrays)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if getattr(leaf, "ndim", 0) == 0:
            continue
        if not isinstance(leaf, jax.Array):
            out.append(jax.tree_util.keystr(path) + " (not on the devices)")
            continue
        largest = max(int(np.prod(s.data.shape)) for s in leaf.addressable_shards)
        if largest >= leaf.size:
            out.append(jax.tree_util.keystr(path))
    return out


def _buffers(tree):
    """The device buffers of every shard of every leaf (equal lists: the same memory)."""
    return [
        [s.data.unsafe_buffer_pointer() for s in leaf.addressable_shards]
        for leaf in jax.tree.leaves(tree)
    ]


@pytest.fixture
def eager_inits(monkeypatch):
    """Heads of the parameter inits run eagerly (a whole tree materialised on one device)."""
    calls = []
    real_init = model_lib._init_params

    def spy(config, head, key):
        if not isinstance(key, jax.core.Tracer):
            calls.append(head)
        return real_init(config, head, key)

    monkeypatch.setattr(model_lib, "_init_params", spy)
    return calls


def _assert_sharded_setup(algorithm):
    setup = algorithm.built
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert _unsplit_leaves(setup.model.params) == []
    assert _unsplit_leaves(setup.frozen) == []
    assert algorithm.unsplit_state == []  # params and AdamW moments


def test_sft_warmup_hands_its_sharded_policy_to_dpo(tmp_path, eager_inits):
    """The model both stages share is born sharded; the warm-up's policy stays so."""
    assert jax.device_count() == 8
    config = tiny_config(**FSDP8, **{"train.num_steps": 1, "sft_warmup.num_steps": 2})
    handed = []
    warmup = pipelines.sft_warmup(config)

    def init_params(stage):
        handed.append(warmup(stage))
        return handed[-1]

    algorithm = Recorded()
    result = loop.run(config, str(tmp_path), algorithm, init_params=init_params)
    assert result.status == "finished"
    assert eager_inits == []
    (policy,) = handed
    # The stage's trained policy stays on the mesh, split as the model's...
    assert _unsplit_leaves(policy) == []
    _assert_sharded_setup(algorithm)
    # ... and becomes DPO's initial policy and frozen reference without a copy.
    assert _buffers(algorithm.built.model.params) == _buffers(policy)
    assert _buffers(algorithm.built.frozen) == _buffers(policy)
    # The check itself can fail: the same tree placed whole on one device is caught.
    whole = jax.device_put(algorithm.built.model.params, jax.devices()[0])
    assert len(_unsplit_leaves(whole)) == len(jax.tree.leaves(whole))
    assert len(_unsplit_leaves(jax.device_get(whole))) == len(jax.tree.leaves(whole))


def test_init_from_is_placed_by_the_rules(tmp_path, eager_inits):
    first = loop.run(tiny_config(**FSDP8, **{"train.num_steps": 1}), str(tmp_path / "a"), dpo)
    config = tiny_config(**FSDP8, **{"train.num_steps": 1, "model.init_from": first.workdir})
    algorithm = Recorded()
    loop.run(config, str(tmp_path / "b"), algorithm)
    assert eager_inits == []
    _assert_sharded_setup(algorithm)
    # The other run's weights, not a fresh init.
    jax.tree.map(
        np.testing.assert_array_equal, host(algorithm.built.model.params), host(first.state.params)
    )
