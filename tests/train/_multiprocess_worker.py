"""One process of ``tests/train/test_multiprocess.py``: one PPO update on the global CPU mesh.

``python tests/train/_multiprocess_worker.py OUT NUM_PROCESSES PROCESS_ID PORT`` with
``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count`` set by the caller. With more
than one process it joins the job through :func:`prefjax.sharding.initialize_distributed`
(coordinator ``localhost:PORT``; cross-process collectives over gloo, JAX's default CPU
implementation), builds the mesh over every process's devices (``data`` = all of them), places a
fixed rollout and the parameters on it, runs :func:`prefjax.train.ppo.make_ppo_update` once and
writes the updated policy and value parameters, a few metrics and the job's shape to ``OUT``
(``.npz``). Everything is deterministic, so every process, and a one-process job, must write the
same numbers.
"""

import sys

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from prefjax import models
from prefjax import sharding as shd
from prefjax.train import common, ppo

# One layer is enough: the update crosses process boundaries in every all-reduce of a gradient.
TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
B, PROMPT, NEW = 16, 6, 5
# 2 epochs x 2 shuffled minibatches of 8 rows x 2 micro-batches of 4: one row per device of a
# 4-device data mesh in every micro-batch.
HP = ppo.PPOHparams(num_epochs=2, num_minibatches=2, grad_accum=2, vf_coef=0.5)
METRICS = ("ppo/loss", "ppo/clipfrac", "rollout/kl", "grad_norm", "update_norm")


def fixed_rollout() -> dict[str, np.ndarray]:
    """Left-padded prompts, ragged responses (lengths 1..5), random scores; seeded."""
    rng = np.random.default_rng(0)
    prompt_mask = np.ones((B, PROMPT), np.int32)
    for i in range(B):
        prompt_mask[i, : i % 3] = 0
    lengths = np.array([5, 3, 1, 4, 2, 5, 3, 4, 1, 2, 5, 5, 3, 2, 4, 1])
    response_mask = (np.arange(NEW)[None] < lengths[:, None]).astype(np.int32)
    return {
        "prompt_ids": (rng.integers(3, 200, (B, PROMPT)) * prompt_mask).astype(np.int32),
        "prompt_mask": prompt_mask,
        "tokens": (rng.integers(3, 200, (B, NEW)) * response_mask).astype(np.int32),
        "response_mask": response_mask,
        "scores": rng.standard_normal(B).astype(np.float32),
    }


def place(tree, shardings):
    """Host arrays (the same on every process) as global arrays: each process fills its own
    devices' shards."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings
    )


def host(x: jax.Array) -> np.ndarray:
    """The value of a global array on this process: its local copy if replicated."""
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)


def main(out: str, num_processes: int, process_id: int, port: int) -> None:
    if num_processes > 1:
        config = ml_collections.ConfigDict({"mesh": {"distributed": True}})
        shd.initialize_distributed(
            config,
            coordinator_address=f"localhost:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
        )
    model = models.from_preset("tiny", key=jax.random.key(0), **TINY)
    policy = jax.device_get(model.params)
    value = jax.device_get(ppo.value_head_init(model, jax.random.key(3)))
    frozen = jax.tree.map(lambda x: 1.1 * x, policy)  # a reference away from the policy

    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    rules = shd.DEFAULT_RULES
    p_shard = shd.param_shardings(mesh, model.param_axes, policy, rules)
    v_shard = shd.param_shardings(mesh, ppo.value_axes(model, HP), value, rules)
    tx = optax.sgd(0.1)
    state, state_shard = ppo.create_sharded_state(
        mesh, tx, tx, place(policy, p_shard), p_shard, place(value, v_shard), v_shard, 0.05
    )
    frozen = place(frozen, p_shard)
    batch = shd.shard_batch(mesh, fixed_rollout())
    update = ppo.make_ppo_update(model, HP, constrain=common.micro_batch_constraint(mesh))
    jitted = ppo.jit_update(update, mesh, state_shard, p_shard)
    new, metrics = jitted(state, batch, frozen, jax.random.key(1))

    leaves = [host(x) for x in jax.tree.leaves((new.params, new.value_params))]
    # Rows of the rollout this process holds: its share of the data split, not the whole batch.
    local_rows = sum(s.data.shape[0] for s in batch["tokens"].addressable_shards)
    np.savez(
        out,
        *leaves,
        metric_names=np.asarray(METRICS),
        metrics=np.asarray([float(host(metrics[n])) for n in METRICS]),
        job=np.asarray([jax.process_count(), jax.device_count(), mesh.shape["data"], local_rows]),
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
