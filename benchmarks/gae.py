r"""GAE at RLHF sizes: ``prefjax.losses.gae`` (reverse ``lax.scan``, ``lax.associative_scan`` and
the chunked form) against the plain Python loop, a NumPy loop over reversed time and TRL's torch
loop, plus the memory-bandwidth limit.

Command (CPU; the defaults are the 512 x 1024 float32 case)::

    python benchmarks/gae.py --batch=512 --seq=1024 --repeats=15 --python_repeats=3

Every implementation computes the same advantages on the same data (checked against the scan to
1e-4 before timing); times are medians of interleaved repeats (A B C D A B C D ...), after a
warm-up call (compilation). ``limit`` is the time to move the bytes GAE must touch -- read rewards,
values and the mask, write advantages and returns, ``20 * batch * seq`` bytes in float32 -- at the
copy bandwidth measured in the same run (``np.copyto`` of a 256 MB array). TRL's loop is
``PPOTrainer``'s: ``delta = r_t + gamma V_{t+1} - V_t``, ``A_t = delta + gamma lam A_{t+1}`` over
reversed time, vectorised over the batch (right-padded responses, masking applied after). The
Python loop is GAE as the papers' pseudo-code writes it: a double loop over rows and reversed
time on Python floats and lists (the arrays converted with ``tolist()`` once, outside the timing),
skipping masked tokens like ``prefjax.losses.gae``; it is slow, so it is timed in the first
``--python_repeats`` rounds only (still interleaved with the others). The table gives every
implementation's median and its ratio to each baseline: ``python / it`` = the Python loop's median
over this row's, likewise ``numpy / it`` and ``TRL / it``; ``x limit`` = this row's median over the
memory limit.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

from benchmarks.host import copy_bandwidth

flags.DEFINE_integer("batch", 512, "Rows (responses).")
flags.DEFINE_integer("seq", 1024, "Tokens per row.")
flags.DEFINE_integer("repeats", 15, "Interleaved timed repeats per implementation.")
flags.DEFINE_integer(
    "python_repeats", 3, "Of those, the rounds the (slow) Python loop is timed in."
)
flags.DEFINE_float("gamma", 1.0, "Discount.")
flags.DEFINE_float("lam", 0.95, "GAE lambda.")
flags.DEFINE_integer(
    "torch_threads", 0, "torch's intra-op threads for TRL's loop (0 = one per CPU core)."
)
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/gae.json).")
FLAGS = flags.FLAGS


def python_loop(rewards, values, mask, gamma, lam):
    """The textbook double loop on Python lists: for each row, reversed time, skipping masked
    tokens (the next value and advantage carried through them)."""
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask, strict=True):
        adv, ret = [0.0] * len(r), [0.0] * len(r)
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(len(r))):
            if not m[t]:
                continue
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            next_value = v[t]
            adv[t], ret[t] = next_adv, next_adv + v[t]
        advantages.append(adv)
        returns.append(ret)
    return advantages, returns


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
    for algorithm in ("scan", "associative", "chunked"):
        fn = jax.jit(
            lambda r, v, m, a=algorithm: losses.gae(r, v, m, gamma=gamma, lam=lam, algorithm=a)
        )
        args = [jax.device_put(x) for x in (rewards, values, mask)]
        ways[f"prefjax {algorithm}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    lists = [x.tolist() for x in (rewards, values, mask)]
    ways["python loop"] = lambda: python_loop(*lists, gamma, lam)
    ways["numpy loop"] = lambda: numpy_loop(rewards, values, mask, gamma, lam)
    try:
        import torch

        torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
        tr = [torch.from_numpy(x) for x in (rewards, values, mask)]
        ways["TRL loop (torch)"] = lambda: trl_loop(torch, *tr, gamma, lam)
    except ImportError:
        print("torch not installed: TRL's loop is not timed")

    reference = np.asarray(ways["prefjax scan"]()[0])
    for name, fn in ways.items():
        got = np.asarray(fn()[0])  # also the warm-up (compilation)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4, err_msg=name)
    times = {name: [] for name in ways}
    for i in range(FLAGS.repeats):
        for name, fn in ways.items():
            if name == "python loop" and i >= FLAGS.python_repeats:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    bandwidth = copy_bandwidth()
    limit = 20 * b * t / bandwidth
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"GAE {b} x {t} float32, gamma={gamma}, lam={lam}; {FLAGS.repeats} interleaved repeats "
        f"({FLAGS.python_repeats} for the Python loop)"
    )
    print(
        f"memory limit {limit * 1e3:.2f} ms "
        f"({20 * b * t / 1e6:.1f} MB at {bandwidth / 1e9:.1f} GB/s)"
    )
    baselines = {"python / it": "python loop", "numpy / it": "numpy loop"}
    baselines["TRL / it"] = "TRL loop (torch)"
    print(
        f"{'implementation':<22}{'median ms':>11}{'x limit':>9}"
        + "".join(f"{k:>13}" for k in baselines)
    )
    ratios = {}
    for name, m in med.items():
        ratios[name] = {k: med.get(base, float("nan")) / m for k, base in baselines.items()}
        cells = "".join(f"{ratios[name][k]:>13.1f}" for k in baselines)
        print(f"{name:<22}{m * 1e3:>11.2f}{m / limit:>9.1f}{cells}")
    out = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "gae.json")
    record = {"batch": b, "seq": t, "median_s": med, "limit_s": limit, "ratios": ratios}
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    app.run(main)
