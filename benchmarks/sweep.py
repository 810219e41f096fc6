r"""Sweeps in one compiled step against K separate runs: wall time per member-step.

Three measurements, each in one process and interleaved (a block of every way, repeated), so a
ratio compares figures taken under the same machine load:

* ``step`` (default): the training loop's body for ``K`` members. ``separate`` is K runs' worth
  of work as K separate runs do it: each member draws its own batch from its own
  ``BatchIterator``, shards it and calls its own jitted DPO step (the single-run step of
  ``prefjax.train.setup.build_setup``; the members' steps differ only in baked-in constants, so
  one compiled step serves all K states here and no compilation is timed). ``sweep/<strategy>``
  draws one batch and calls the sweep step (``prefjax.train.sweep.build_sweep``) for all K
  members, with the reference computed once. Reported: ms per member-step (block time / (steps
  x K)) and ``separate / sweep``. ``--no_data`` leaves the input pipeline out (the same sharded
  batch every step): the jitted steps alone.
* ``--launcher``: whole runs, as a user starts them: K ``python -m experiments.dpo
  --config.algorithm.beta=<b>`` processes one after another against one ``python -m
  experiments.sweep`` process of the same K betas, run between the two halves of them (same
  steps, evaluation at the end, no SFT warm-up, a cold compilation cache for each), wall time
  of each.
* ``--matmul``: the building block, one dense layer of the step's shape for K members three
  ways in one jitted function: batched over members (``einsum('kmd,kdf->kmf')``, what ``vmap``
  makes of it), a loop of K plain matmuls (``lax.map``), and the K members' rows folded into one
  matmul with shared weights (the bound when nothing but the batch differs).

Examples::

    python -m benchmarks.sweep --members=1,4,16
    python -m benchmarks.sweep --members=4 --launcher --launcher_steps=50
    python -m benchmarks.sweep --members=1,4,16 --matmul
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("members", ["1", "4", "16"], "Sweep sizes K.")
flags.DEFINE_list("strategies", ["vmap", "map"], "prefjax.train.sweep strategies to time.")
flags.DEFINE_string("preset", "tiny", "experiments/configs/sweep.py preset.")
flags.DEFINE_integer("batch_size", 0, "Pairs per step (0 = the preset's).")
flags.DEFINE_integer("steps", 10, "Steps per timed block.")
flags.DEFINE_integer("repeats", 3, "Timed blocks per way (after one warm-up block each).")
flags.DEFINE_bool("data", True, "Include the input pipeline (batch iterator + sharding).")
flags.DEFINE_bool("launcher", False, "Time whole launcher runs instead (K dpo runs vs a sweep).")
flags.DEFINE_integer("launcher_steps", 50, "Train steps of each launcher run.")
flags.DEFINE_bool("matmul", False, "Time one dense layer for K members three ways instead.")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/sweep.json).")


def _config(k: int):
    from experiments.configs import sweep as sweep_config

    config = sweep_config.get_config(FLAGS.preset)
    config.sweep.beta = tuple(0.1 * (i + 1) for i in range(k))
    if FLAGS.batch_size:
        config.data.batch_size = FLAGS.batch_size
    return config


def _median_ms(times: list[float], per: int) -> float:
    return 1e3 * statistics.median(times) / per


def time_steps(k: int) -> dict:
    """``separate`` and ``sweep/<strategy>`` ms per member-step for ``k`` members."""
    import jax

    from prefjax import data, models, sharding
    from prefjax.train import common, dpo, sweep
    from prefjax.train import setup as train_setup

    config = _config(k)
    config.sft_warmup.num_steps = 0
    mesh = sharding.single_device_mesh()
    model = common.build_model(config, key=jax.random.key(0))
    group = sweep.members(config)
    dataset = data.RepeatTask().pairwise_dataset(models.ByteTokenizer(), 2048, seed=0)
    iterator = lambda: data.BatchIterator(
        dataset,
        config.data.batch_size,
        seed=0,
        process_index=0,
        process_count=1,
        buckets=(config.data.max_len,),
    )
    single = train_setup.build_setup(
        sweep.member_config(config, group[0]), model, mesh, jax.random.key(1), dpo
    )
    states = [jax.tree.map(lambda x: x.copy(), single.state) for _ in group]
    iterators = [iterator() for _ in group]
    fixed = single.shard_batch(next(iterator()))
    key = jax.random.key(2)

    def separate_block() -> float:
        nonlocal states
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            for i in range(k):
                batch = single.shard_batch(next(iterators[i])) if FLAGS.data else fixed
                states[i], _ = single.train_step(states[i], batch, single.frozen, key)
        jax.block_until_ready(states)
        return time.perf_counter() - start

    ways = {"separate": separate_block}
    for strategy in FLAGS.strategies:
        config.sweep.strategy = strategy
        built = sweep.build_sweep(config, model, mesh, group)
        it = iterator()

        def block(built=built, it=it) -> float:
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                batch = built.base.shard_batch(next(it)) if FLAGS.data else fixed
                built.states, _ = built.train_step(
                    built.states, batch, built.base.frozen, built.params, built.keys
                )
            jax.block_until_ready(built.states)
            return time.perf_counter() - start

        ways[f"sweep/{strategy}"] = block
    times = {name: [] for name in ways}
    for fn in ways.values():  # warm-up: compilation
        fn()
    for _ in range(FLAGS.repeats):
        for name, fn in ways.items():
            times[name].append(fn())
    ms = {name: _median_ms(t, FLAGS.steps * k) for name, t in times.items()}
    out = {"members": k, "ms_per_member_step": ms}
    out["speedup"] = {n: ms["separate"] / v for n, v in ms.items() if n != "separate"}
    return out


def time_matmul(k: int) -> dict:
    """One dense layer of the step's shape for ``k`` members: batched, looped, folded."""
    import jax
    import jax.numpy as jnp

    config = _config(k)
    rows = 2 * config.data.batch_size * config.data.max_len  # [2 * batch * seq] tokens
    d, f = 64, 128  # the tiny preset's hidden and MLP widths
    x = jax.random.normal(jax.random.key(0), (rows, d))
    w = jax.random.normal(jax.random.key(1), (k, d, f))
    xs = jnp.broadcast_to(x, (k, rows, d))
    fwd_bwd = lambda fn: jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(fn(w, x)))))
    ways = {
        "batched (vmap)": fwd_bwd(lambda w, x: jnp.einsum("kmd,kdf->kmf", x, w)),
        "loop (lax.map)": fwd_bwd(lambda w, x: jax.lax.map(lambda a: a[1] @ a[0], (w, x))),
        "folded (shared w)": fwd_bwd(lambda w, x: x.reshape(-1, d) @ w[0]),
    }
    times = {name: [] for name in ways}
    for fn in ways.values():
        fn(w, xs).block_until_ready()
    for _ in range(FLAGS.repeats * 5):
        for name, fn in ways.items():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                fn(w, xs).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {
        "members": k,
        "ms_per_member": {n: _median_ms(t, FLAGS.steps * k) for n, t in times.items()},
    }


def _launch(module: str, args: list[str], cache: str) -> float:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", module, *args], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def time_launchers(k: int) -> dict:
    """Wall time of K ``experiments.dpo`` runs one after another vs one ``experiments.sweep``."""
    betas = [0.1 * (i + 1) for i in range(k)]
    common = [
        f"--config.train.num_steps={FLAGS.launcher_steps}",
        f"--config.train.log_every={max(FLAGS.launcher_steps // 5, 1)}",
        "--config.train.eval_every=0",
        "--config.sft_warmup.num_steps=0",
        "--config.checkpoint.every=0",
        "--config.logging.progress=False",
    ]
    sweep_args = [*common, f"--config.sweep.beta=({','.join(map(str, betas))},)"]
    with tempfile.TemporaryDirectory() as tmp:
        dpo_run = lambda i: _launch(
            "experiments.dpo",
            [*common, f"--config.algorithm.beta={betas[i]}", f"--workdir={tmp}/dpo_{i}"],
            f"{tmp}/cache_dpo_{i}",
        )
        # The sweep runs between the two halves of the separate runs, so a drift in the
        # machine's load weighs on both sides alike.
        separate = sum(dpo_run(i) for i in range(k // 2))
        swept = _launch(
            "experiments.sweep", [*sweep_args, f"--workdir={tmp}/sweep"], f"{tmp}/cache_sweep"
        )
        separate += sum(dpo_run(i) for i in range(k // 2, k))
    return {
        "members": k,
        "separate_runs_s": separate,
        "sweep_run_s": swept,
        "speedup": separate / swept,
    }


def main(argv):
    del argv
    results = []
    for k in map(int, FLAGS.members):
        if FLAGS.launcher:
            r = time_launchers(k)
            print(
                f"K={k:2d}  {k} dpo launcher runs {r['separate_runs_s']:.1f} s, one sweep "
                f"run {r['sweep_run_s']:.1f} s: {r['speedup']:.2f}x",
                flush=True,
            )
        elif FLAGS.matmul:
            r = time_matmul(k)
            shown = ", ".join(f"{n} {v:.3f}" for n, v in r["ms_per_member"].items())
            print(f"K={k:2d}  ms per member (dense fwd+bwd): {shown}", flush=True)
        else:
            r = time_steps(k)
            shown = ", ".join(f"{n} {v:.2f}" for n, v in r["ms_per_member_step"].items())
            ratios = ", ".join(f"{n} {v:.2f}x" for n, v in r["speedup"].items())
            print(
                f"K={k:2d}  ms per member-step: {shown}  (separate / sweep: {ratios})", flush=True
            )
        results.append(r)
    path = FLAGS.json_out or (
        os.path.join(os.environ["OUT"], "sweep.json") if os.environ.get("OUT") else ""
    )
    if path:
        with open(path, "w") as f:
            json.dump(
                {
                    "flags": {"data": FLAGS.data, "steps": FLAGS.steps, "repeats": FLAGS.repeats},
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    app.run(main)
