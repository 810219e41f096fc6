r"""Where the DPO step's time goes on a CPU, in prefjax and in plain PyTorch, side by side.

Builds the same two steps as ``benchmarks/dpo_step.py`` (its flags: ``--preset``,
``--batch_pairs``, ``--seq_len``, ``--reference``, ...) in one process, both runtimes limited to
``--threads`` threads, and

1. times them interleaved (one prefjax step, one PyTorch step, ``--steps`` times): medians of the
   wall time and of the process's CPU time per step. With ``--threads=1`` the CPU time is the
   step's work whatever else the machine runs, so the ratio survives a loaded machine;
2. profiles ``--trace_steps`` steps of each: prefjax with ``jax.profiler`` (one event per XLA
   operation), attributed to the model part named in the HLO metadata (attention, MLP, norms,
   LM head and log-probs, the layer loop's bookkeeping, optimiser), PyTorch with
   ``torch.profiler`` (self CPU time per ``aten`` operator); prints the top operations of each.

Example::

    python -m benchmarks.profile_step --preset=tiny --batch_pairs=8 --seq_len=128 \
        --prompt_len=64 --dtype=float32 --threads=1
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import dpo_step, host

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", 1, "Threads of each runtime (XLA intra-op and torch).")
flags.DEFINE_integer("trace_steps", 3, "Steps of each framework under the profiler.")
flags.DEFINE_integer("top", 15, "Operations listed per framework.")

# Model parts, matched in order against an XLA operation's metadata op_name.
PARTS = (
    ("attention", ("_attend", "attention")),
    ("mlp", ("/mlp/",)),
    ("projections q/k/v/o", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("norms", ("_norm", "Norm")),
    ("rotary", ("apply_rope",)),
    ("lm head + log-probs", ("apply_head", "logprob", "logsumexp", "take_along_axis", "shift")),
    ("embedding", ("embed",)),
    ("optimizer + norms of updates", ("adam", "clip", "tree_norm", "apply_gradients", "optax")),
    ("layer loop (stack, slice)", ("while", "dynamic_update_slice", "dynamic_slice")),
)


def timed_both(run_step) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    run_step()
    return time.perf_counter() - wall, time.process_time() - cpu


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (shape, op_name)}`` from a compiled module's text."""
    out = {}
    pattern = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"")
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def part_of(op_name: str) -> str:
    for part, keys in PARTS:
        if any(k in op_name for k in keys):
            return part
    return "other (unnamed: broadcasts, copies)"


def profile_prefjax(run_step, hlo_text: str, steps: int) -> dict:
    """Per-operation and per-part milliseconds per step of the prefjax step."""
    import jax

    meta = hlo_metadata(hlo_text)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run_step()
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in meta:
            per_op[name] += e.get("dur", 0) / 1e3 / steps  # us -> ms per step
    parts = collections.Counter()
    rows = []
    for name, ms in per_op.most_common():
        shape, op_name = meta[name]
        direction = "backward" if "transpose(" in op_name else "forward"
        parts[f"{part_of(op_name)} ({direction})"] += ms
        rows.append({"op": name, "ms": ms, "shape": shape, "op_name": op_name})
    return {"total_ms": sum(per_op.values()), "parts": dict(parts.most_common()), "ops": rows}


def profile_torch(run_step, steps: int) -> dict:
    """Self CPU milliseconds per step of each ``aten`` operator of the PyTorch step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_step()
    rows = [
        {"op": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps}
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms": sum(r["ms"] for r in rows), "ops": rows}


def main(argv):
    del argv
    host.limit_threads(FLAGS.threads)
    import jax

    run_jax, info = dpo_step.build_prefjax()
    run_torch, torch_info = dpo_step.build_torch(FLAGS.threads)
    dpo_step.warm_up(run_jax)
    dpo_step.warm_up(run_torch)
    times = {"prefjax": [], "torch": []}
    for _ in range(FLAGS.steps):
        times["prefjax"].append(timed_both(run_jax))
        times["torch"].append(timed_both(run_torch))
    med = {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
        for k, v in times.items()
    }
    print(
        f"{FLAGS.preset}, {FLAGS.batch_pairs} pairs x {FLAGS.seq_len} tokens, {FLAGS.dtype}, "
        f"reference={FLAGS.reference}, {FLAGS.threads} thread(s), medians of {FLAGS.steps} "
        "interleaved steps:"
    )
    for k, (wall, cpu) in med.items():
        print(f"  {k:8s} {1e3 * wall:8.1f} ms wall  {1e3 * cpu:8.1f} ms CPU")
    ratio_wall = med["torch"][0] / med["prefjax"][0]
    ratio_cpu = med["torch"][1] / med["prefjax"][1]
    print(f"  prefjax speed / torch speed: {ratio_wall:.2f}x (wall), {ratio_cpu:.2f}x (CPU time)")
    hlo = info["hlo_text"]()
    prof_jax = profile_prefjax(run_jax, hlo, FLAGS.trace_steps)
    prof_torch = profile_torch(run_torch, FLAGS.trace_steps)
    print(f"prefjax by model part (ms per step, {prof_jax['total_ms']:.1f} ms in XLA operations):")
    for part, ms in prof_jax["parts"].items():
        print(f"  {ms:8.2f}  {100 * ms / prof_jax['total_ms']:5.1f} %  {part}")
    print(f"prefjax top {FLAGS.top} operations:")
    for r in prof_jax["ops"][: FLAGS.top]:
        print(f"  {r['ms']:8.2f}  {r['shape'][:34]:34s} {r['op_name'][-90:]}")
    print(f"torch top {FLAGS.top} operators (self CPU, {prof_torch['total_ms']:.1f} ms per step):")
    for r in prof_torch["ops"][: FLAGS.top]:
        print(f"  {r['ms']:8.2f}  x{r['calls']:<4d} {r['op']}")
    result = {
        "args": {k: FLAGS[k].value for k in ("preset", "batch_pairs", "seq_len", "threads")},
        "jax": jax.__version__,
        "median_wall_s": {k: v[0] for k, v in med.items()},
        "median_cpu_s": {k: v[1] for k, v in med.items()},
        "ratio_wall": ratio_wall,
        "ratio_cpu": ratio_cpu,
        "prefjax_profile": {**prof_jax, "ops": prof_jax["ops"][:50]},
        "torch_profile": {**prof_torch, "ops": prof_torch["ops"][:50]},
        "torch": torch_info,
    }
    out = FLAGS.json_out or (
        os.path.join(os.environ["OUT"], "profile_step.json") if "OUT" in os.environ else ""
    )
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(app.run(main))
