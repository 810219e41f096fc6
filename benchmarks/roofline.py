r"""Decode against the memory-bandwidth roofline: the fraction of the device's peak bandwidth that
one decode step of ``prefjax.models`` uses.

At RLHF rollout batches a decode step is bound by the bytes it must read: every weight once, and
the keys and values of every token the cache holds. Counted per step::

    bytes = parameter bytes (as stored; of an untied input embedding only the B rows gathered)
          + K/V read: layers * B * held * 2 * kv_heads * head_dim * itemsize
          + K/V written: the same for the one new token

``roofline time = bytes / peak bandwidth`` and the reported **fraction = roofline time / measured
step time** (1.0 = the step moves its bytes at the device's peak). ``held`` is the mean number of
tokens held over the timed steps (the prompt, the warm-up step, then one more per step). With
``--compiled_bytes`` the step's ``bytes accessed`` from XLA's cost analysis (layers unrolled; it
also counts activations and the logits) is printed beside it, and the counted bytes are a lower
bound on it.

Command (one GPU; the issue's shape, Llama-3.2-1B at batch 64, bfloat16 weights and cache)::

    python -m benchmarks.roofline --preset=llama1b --batch=64 --held=512 --slots=1024

and on the shape of the Hugging Face ``generate`` peer (``hf_generate.py``: vocabulary 32000,
untied, 128-token prompts and 256 new tokens, so 256 tokens held on average)::

    python -m benchmarks.roofline --preset=llama1b --vocab=32000 --tie=false --batch=64 \
        --held=128 --steps=254 --slots=384

Peak bandwidth by device kind (``--peak_gbps`` overrides): H100 SXM 3350 GB/s, H100 PCIe 2000,
H200 4800, A100 80 GB 2039, A100 40 GB 1555, L4 300, TPU v5e 819, TPU v4 1200; on a CPU the
``np.copyto`` bandwidth measured in the same run (``benchmarks/host.py``). The step is the
jitted, cache-donating ``Model.decode_step`` the sampler runs, timed over ``--steps`` consecutive
steps after a ``--held``-token prefill (medians of ``--repeats``, each from a fresh prefill).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import prefjax.models as pm
from benchmarks.host import copy_bandwidth

flags.DEFINE_string("preset", "llama1b", "Model preset: tiny | gpt2 | llama1b.")
flags.DEFINE_integer("vocab", 0, "Vocabulary size override (0 = the preset's).")
flags.DEFINE_enum(
    "tie", "preset", ["preset", "true", "false"], "Tied input/output embeddings (peers: false)."
)
flags.DEFINE_integer("batch", 64, "Rows decoded together.")
flags.DEFINE_integer("held", 512, "Tokens each row holds before the timed steps (the prefill).")
flags.DEFINE_integer("slots", 1024, "Cache slots allocated per row.")
flags.DEFINE_integer("steps", 32, "Timed decode steps per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (medians).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights, compute and cache.")
flags.DEFINE_bool(
    "compiled_bytes", False, "Also compile the step unrolled for XLA's bytes accessed (slow)."
)
flags.DEFINE_float("peak_gbps", 0.0, "Peak memory bandwidth in GB/s (0 = by device kind).")
flags.DEFINE_string("json_out", "", "Write the results as JSON here (default: $OUT/roofline.json).")
FLAGS = flags.FLAGS

# Peak HBM bandwidth, bytes/s, matched in order against ``device_kind`` (lower case).
PEAK_BANDWIDTH = (
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),
    ("h200", 4.8e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb", 2.039e12),
    ("a100", 1.555e12),
    ("l4", 0.3e12),
    ("tpu v5 lite", 0.819e12),
    ("tpu v5e", 0.819e12),
    ("tpu v4", 1.2e12),
)


def peak_bandwidth() -> tuple[float, str]:
    """Bytes/s of the default device and where the figure comes from."""
    if FLAGS.peak_gbps > 0:
        return FLAGS.peak_gbps * 1e9, "--peak_gbps"
    device = jax.devices()[0]
    if device.platform == "cpu":
        return copy_bandwidth(), "measured np.copyto (CPU)"
    kind = device.device_kind.lower()
    for name, peak in PEAK_BANDWIDTH:
        if name in kind:
            return peak, f"{device.device_kind} datasheet"
    raise app.UsageError(f"no peak bandwidth known for {device.device_kind!r}: pass --peak_gbps")


def step_bytes(config: pm.TransformerConfig, params, batch: int, held: float) -> dict:
    """The bytes one decode step must move (see the module docstring), by part."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    param_bytes = sum(x.size * x.dtype.itemsize for _, x in leaves)
    if not config.tie_embeddings:  # the input table: only the B rows looked up are read
        (table,) = [x for path, x in leaves if "embed" in jax.tree_util.keystr(path).split("'")]
        param_bytes -= (table.size - batch * table.shape[1]) * table.dtype.itemsize
    itemsize = jnp.dtype(config.dtype).itemsize
    per_token = config.num_layers * 2 * config.num_kv_heads * config.resolved_head_dim * itemsize
    return {
        "params": float(param_bytes),
        "kv_read": float(batch * held * per_token),
        "kv_write": float(batch * per_token),
    }


def compiled_bytes(model: pm.Model, batch: int) -> float:
    """The decode step's ``bytes accessed`` from XLA's cost analysis, with the layer scan unrolled
    (the analysis counts a loop body once, not once per layer); compiled, never run."""
    unrolled = pm.Model(model.config.replace(scan_unroll=True), model.params)
    step = jax.jit(unrolled.decode_step, donate_argnums=(2,))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cache = jax.eval_shape(lambda: unrolled.init_cache(batch, FLAGS.slots))
    cost = step.lower(model.params, tokens, cache).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"])


def time_steps(model: pm.Model, batch: int) -> float:
    """Median seconds per decode step."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, model.config.vocab_size, (batch, FLAGS.held)), jnp.int32)
    mask = jnp.ones_like(ids)
    prefill = jax.jit(model.prefill)
    step = jax.jit(model.decode_step, donate_argnums=(2,))
    tokens = jnp.ones((batch,), jnp.int32)
    times = []
    for _ in range(FLAGS.repeats + 1):  # the first is the warm-up (compilation)
        _, cache = prefill(model.params, ids, mask, model.init_cache(batch, FLAGS.slots))
        logits, cache = step(model.params, tokens, cache)
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            logits, cache = step(model.params, tokens, cache)
        jax.block_until_ready(logits)
        times.append((time.perf_counter() - t0) / FLAGS.steps)
    return statistics.median(times[1:])


def main(argv):
    del argv
    if FLAGS.held + 1 + FLAGS.steps > FLAGS.slots:
        raise app.UsageError(
            f"--slots={FLAGS.slots} cannot hold --held={FLAGS.held} + 1 + --steps={FLAGS.steps}"
        )
    dtype = jnp.dtype(FLAGS.dtype)
    overrides = {"dtype": dtype, "param_dtype": dtype}
    if FLAGS.vocab:
        overrides["vocab_size"] = FLAGS.vocab
    if FLAGS.tie != "preset":
        overrides["tie_embeddings"] = FLAGS.tie == "true"
    config = pm.preset(FLAGS.preset, **overrides)
    model = pm.Model.init(config, jax.random.key(0))
    step_s = time_steps(model, FLAGS.batch)
    compiled = compiled_bytes(model, FLAGS.batch) if FLAGS.compiled_bytes else None
    held = FLAGS.held + 1 + (FLAGS.steps - 1) / 2  # mean over the timed steps
    parts = step_bytes(config, model.params, FLAGS.batch, held)
    total = sum(parts.values())
    peak, peak_kind = peak_bandwidth()
    result = {
        "preset": FLAGS.preset,
        "vocab": config.vocab_size,
        "tied": config.tie_embeddings,
        "dtype": FLAGS.dtype,
        "batch": FLAGS.batch,
        "held_mean": held,
        "slots": FLAGS.slots,
        "device": jax.devices()[0].device_kind,
        "step_s": step_s,
        "bytes": parts,
        "bytes_total": total,
        "compiled_bytes_accessed": compiled,
        "peak_bytes_per_s": peak,
        "peak_kind": peak_kind,
        "achieved_bytes_per_s": total / step_s,
        "roofline_fraction": total / step_s / peak,
        "tokens_per_s": FLAGS.batch / step_s,
    }
    print(
        f"{FLAGS.preset} ({config.vocab_size} vocab, {FLAGS.dtype}) at batch {FLAGS.batch}, "
        f"{held:.0f} tokens held of {FLAGS.slots} slots, on {result['device']}:"
    )
    mb = lambda x: f"{x / 1e6:,.1f} MB"  # noqa: E731
    print(
        f"  step {step_s * 1e3:.3f} ms ({result['tokens_per_s']:,.0f} tokens/s); moves "
        f"{mb(total)} (params {mb(parts['params'])}, K/V read {mb(parts['kv_read'])}, written "
        f"{mb(parts['kv_write'])})"
        + ("" if compiled is None else f"; compiled bytes accessed {mb(compiled)}")
    )
    print(
        f"  {total / step_s / 1e9:,.0f} GB/s of {peak / 1e9:,.0f} ({peak_kind}): "
        f"{result['roofline_fraction']:.1%} of the bandwidth roofline"
    )
    out = FLAGS.json_out or os.path.join(os.environ.get("OUT", "."), "roofline.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
