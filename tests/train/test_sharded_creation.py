"""The loop builds the model with the mesh: parameters are born sharded, never whole on a device.

On the 8 simulated CPU devices of the root conftest with ``mesh.fsdp=8``, every parameter of the
tiny preset has an ``embed`` axis that the FSDP rules split 8 ways. The test records the
``Setup`` the loop hands to training and checks that each leaf of the train state (params and
AdamW moments) and of the frozen reference is split (its largest shard on any device is smaller
than the array), and that the parameter initialiser only ever ran under tracing (the
``eval_shape`` / jitted init with sharded outputs), never eagerly on one device.
"""

import jax
import numpy as np

import prefjax.models.model as model_lib
from prefjax.train import dpo, loop
from prefjax.train import setup as train_setup
from tests.train.test_loop import tiny_config


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
    """Paths of the array leaves (ndim > 0) some device holds whole."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if getattr(leaf, "ndim", 0) == 0:
            continue
        largest = max(int(np.prod(s.data.shape)) for s in leaf.addressable_shards)
        if largest >= leaf.size:
            out.append(jax.tree_util.keystr(path))
    return out


def test_loop_creates_the_model_sharded_over_fsdp(tmp_path, monkeypatch):
    assert jax.device_count() == 8
    eager_inits = []
    real_init = model_lib._init_params

    def spy(config, head, key):
        if not isinstance(key, jax.core.Tracer):
            eager_inits.append(head)  # a whole parameter tree materialised on one device
        return real_init(config, head, key)

    monkeypatch.setattr(model_lib, "_init_params", spy)
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "train.num_steps": 2})
    algorithm = Recorded()
    result = loop.run(config, str(tmp_path), algorithm)
    assert result.status == "finished" and result.step == 2
    setup = algorithm.built
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert eager_inits == []
    assert _unsplit_leaves(setup.model.params) == []
    assert _unsplit_leaves(setup.frozen) == []
    assert algorithm.unsplit_state == []  # params and AdamW moments
    # The check itself can fail: the same tree placed whole on one device is caught.
    whole = jax.device_put(setup.model.params, jax.devices()[0])
    assert len(_unsplit_leaves(whole)) == len(jax.tree.leaves(whole))
