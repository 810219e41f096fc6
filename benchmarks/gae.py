r"""GAE at RLHF sizes: ``prefjax.losses.gae`` (reverse ``lax.scan`` and ``lax.associative_scan``)
against a NumPy loop over reversed time and TRL's torch loop, plus the memory-bandwidth limit.

Command (CPU; the defaults are the 512 x 1024 float32 case)::

    python benchmarks/gae.py --batch=512 --seq=1024 --repeats=15

Every implementation computes the same advantages on the same data (checked against the scan to
1e-4 before timing); times are medians of interleaved repeats (A B C D A B C D ...), after a
warm-up call (compilation). ``limit`` is the time to move the bytes GAE must touch -- read rewards,
values and the mask, write advantages and returns, ``20 * batch * seq`` bytes in float32 -- at the
copy bandwidth measured in the same run (``np.copyto`` of a 256 MB array). TRL's loop is
``PPOTrainer``'s: ``delta = r_t + gamma V_{t+1} - V_t``, ``A_t = delta + gamma lam A_{t+1}`` over
reversed time, vectorised over the batch (right-padded responses, masking applied after).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("batch", 512, "Rows (responses).")
flags.DEFINE_integer("seq", 1024, "Tokens per row.")
flags.DEFINE_integer("repeats", 15, "Interleaved timed repeats per implementation.")
flags.DEFINE_float("gamma", 1.0, "Discount.")
flags.DEFINE_float("lam", 0.95, "GAE lambda.")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/gae.json).")
FLAGS = flags.FLAGS


def numpy_loop(rewards, values, mask, gamma, lam):
    """Reverse loop over time, vectorised over the batch (right-padded rows)."""
    batch, seq = rewards.shape
    adv = np.zeros_like(rewards)
    last = np.zeros(batch, rewards.dtype)
    for t in range(seq - 1, -1, -1):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < seq else 0.0
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def trl_loop(torch, rewards, values, mask, gamma, lam):
    """TRL PPOTrainer's GAE loop (torch, no grad)."""
    with torch.no_grad():
        values = values * mask
        rewards = rewards * mask
        seq = rewards.shape[1]
        last, out = 0, []
        for t in reversed(range(seq)):
            next_v = values[:, t + 1] if t < seq - 1 else 0.0
            delta = rewards[:, t] + gamma * next_v - values[:, t]
            last = delta + gamma * lam * last
            out.append(last)
        adv = torch.stack(out[::-1], axis=1) * mask
        return adv, (adv + values) * mask


def copy_bandwidth() -> float:
    """Bytes/s of a large ``np.copyto`` (read + write counted), the best of 5."""
    src = np.ones(64 * 2**20, np.float32)  # 256 MB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def main(argv):
    del argv
    import jax

    from prefjax import losses

    b, t, gamma, lam = FLAGS.batch, FLAGS.seq, FLAGS.gamma, FLAGS.lam
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    lengths = rng.integers(t // 4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)  # ragged, right-padded

    ways = {}
    for algorithm in ("scan", "associative"):
        fn = jax.jit(
            lambda r, v, m, a=algorithm: losses.gae(r, v, m, gamma=gamma, lam=lam, algorithm=a)
        )
        args = [jax.device_put(x) for x in (rewards, values, mask)]
        ways[f"prefjax {algorithm}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    ways["numpy loop"] = lambda: numpy_loop(rewards, values, mask, gamma, lam)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tr = [torch.from_numpy(x) for x in (rewards, values, mask)]
        ways["TRL loop (torch)"] = lambda: trl_loop(torch, *tr, gamma, lam)
    except ImportError:
        print("torch not installed: TRL's loop is not timed")

    reference = np.asarray(ways["prefjax scan"]()[0])
    for name, fn in ways.items():
        got = np.asarray(fn()[0])  # also the warm-up (compilation)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4, err_msg=name)
    times = {name: [] for name in ways}
    for _ in range(FLAGS.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    bandwidth = copy_bandwidth()
    limit = 20 * b * t / bandwidth
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"GAE {b} x {t} float32, gamma={gamma}, lam={lam}; {FLAGS.repeats} interleaved repeats")
    print(
        f"memory limit {limit * 1e3:.2f} ms "
        f"({20 * b * t / 1e6:.1f} MB at {bandwidth / 1e9:.1f} GB/s)"
    )
    print(
        f"{'implementation':<22}{'median ms':>10}{'x limit':>9}{'TRL / it':>10}{'numpy / it':>12}"
    )
    for name, m in med.items():
        trl = med.get("TRL loop (torch)", float("nan")) / m
        print(
            f"{name:<22}{m * 1e3:>10.2f}{m / limit:>9.1f}{trl:>10.1f}{med['numpy loop'] / m:>12.1f}"
        )
    out = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "gae.json")
    with open(out, "w") as f:
        json.dump({"batch": b, "seq": t, "median_s": med, "limit_s": limit}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
