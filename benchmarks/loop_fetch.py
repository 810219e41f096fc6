r"""What fetching the step's metrics after every step costs the training loop.

``prefjax.train.loop.run`` leaves the DPO step's metrics on the device until a logging step, so
the host loads, shards and dispatches the next batches while the device computes. This times the
same loop body -- next batch from the ``BatchIterator``, ``shard_batch``, the jitted DPO train step
of the launcher's default config -- two ways in one process, alternating:

* ``fetch``: ``jax.device_get`` of the metrics after every step (what a per-step check costs);
* ``deferred``: metrics kept on the device and fetched once at the end of the block.

Each block is ``--steps`` steps; the first block of each way is a warm-up (compilation) and is not
counted. Prints the mean ms/step of each way over ``--repeats`` blocks and their ratio::

    python -m benchmarks.loop_fetch                          # tiny preset, default batch
    python -m benchmarks.loop_fetch --config=experiments/configs/dpo.py:gpt2 --steps=50
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", "experiments/configs/dpo.py:tiny", "DPO launcher config.", lock_config=True
)
flags.DEFINE_integer("steps", 100, "Steps per timed block.")
flags.DEFINE_integer("repeats", 3, "Timed blocks per way (after one warm-up block each).")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/...).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from prefjax import data, models, sharding
    from prefjax.train import common, dpo
    from prefjax.train import setup as train_setup

    config = FLAGS.config
    model = common.build_model(config, key=jax.random.key(0))
    setup = train_setup.build_setup(
        config, model, sharding.single_device_mesh(), jax.random.key(1), dpo
    )
    dataset = data.RepeatTask().pairwise_dataset(models.ByteTokenizer(), 2048, seed=0)
    batches = data.BatchIterator(
        dataset, config.data.batch_size, seed=0, process_index=0, process_count=1
    )
    state, key = setup.state, jax.random.key(2)

    def block(fetch: bool) -> float:
        nonlocal state
        pending = []
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            batch = setup.shard_batch(next(batches))
            state, metrics = setup.train_step(state, batch, setup.frozen, key)
            if fetch:  # what a per-step check does: the floats on the host
                _ = {k: float(v) for k, v in jax.device_get(metrics).items()}
            else:
                pending.append(metrics)
        jax.device_get(pending)
        jax.block_until_ready(state)
        return (time.perf_counter() - start) / FLAGS.steps

    times: dict[str, list[float]] = {"fetch": [], "deferred": []}
    for i in range(FLAGS.repeats + 1):
        for way in times:
            t = block(way == "fetch")
            if i:
                times[way].append(t)
    result = {way: 1e3 * statistics.mean(ts) for way, ts in times.items()}
    result["ratio_fetch_over_deferred"] = result["fetch"] / result["deferred"]
    result["device"] = jax.devices()[0].device_kind
    result["batch_pairs"] = config.data.batch_size
    print(
        f"{result['device']}, {config.data.batch_size} pairs/step: fetch every step "
        f"{result['fetch']:.2f} ms/step, deferred {result['deferred']:.2f} ms/step "
        f"({result['ratio_fetch_over_deferred']:.2f}x)",
        flush=True,
    )
    out = FLAGS.json_out or (
        os.path.join(os.environ["OUT"], "loop_fetch.json") if os.environ.get("OUT") else ""
    )
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
