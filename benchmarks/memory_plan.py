r"""Predicted per-device memory of the DPO train step, and whether it fits a device.

Compiles the exact train step the launchers run (``prefjax.train.cost.compile_train_step``) from
shapes only -- no weight is ever allocated, so a Llama-1B plan takes a minute on a laptop CPU --
and prints XLA's memory analysis per device: the step's arguments (trainable parameters, AdamW
moments, the frozen reference, the batch), its temporaries (activations kept for the backward,
logits, workspace), its outputs and the part of them written over the donated state; the peak is
``arguments + temporaries + outputs - aliased``. The mesh is simulated with
``--xla_force_host_platform_device_count`` when the plan runs on the CPU.

The verdict compares the peak with the named device's memory and with the share of it that JAX's
GPU allocator takes by default (75 %, ``XLA_PYTHON_CLIENT_MEM_FRACTION``).

Examples::

    python -m benchmarks.memory_plan --preset=llama1b --batch_size=8 --seq_len=1024 \
        --fsdp=8 --reference=live --dtype=bfloat16 --remat=full --device=h100-80gb
    python -m benchmarks.memory_plan --preset=llama1b --batch_size=8 --seq_len=1024 \
        --reference=precomputed --logps_chunk_size=2048 --device=a100-40gb
    python -m benchmarks.memory_plan --preset=tiny --batch_size=8 --seq_len=128 --flops

``--flops`` also compiles the step with the layer scan unrolled (longer) and prints its FLOPs
against the analytical count of ``prefjax.train.cost.analytical_flops``.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import app, flags

from experiments.configs import common as config_common
from prefjax import models
from prefjax import sharding as shd
from prefjax.train import config as train_config
from prefjax.train import cost, dpo

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama1b", "Model preset: tiny | gpt2 | llama1b.")
flags.DEFINE_integer("batch_size", 8, "Preference pairs per step (config.data.batch_size).")
flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence (config.data.max_len).")
flags.DEFINE_integer("data", 1, "Mesh axis data (config.mesh.data).")
flags.DEFINE_integer("fsdp", 1, "Mesh axis fsdp (config.mesh.fsdp).")
flags.DEFINE_integer("tensor", 1, "Mesh axis tensor (config.mesh.tensor).")
flags.DEFINE_enum(
    "reference",
    "live",
    ["live", "precomputed", "lora"],
    "live: a frozen copy; precomputed: reference log-probs in the batch; lora: LoRA adapters, "
    "the base with adapters off as reference.",
)
flags.DEFINE_integer("lora_rank", 16, "Adapter rank with --reference=lora.")
flags.DEFINE_list(
    "lora_targets", ["q_proj", "v_proj"], "Adapted projections with --reference=lora."
)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params: f32).")
flags.DEFINE_integer("logps_chunk_size", 0, "Tokens per vocabulary chunk (0 = full logits).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Activation rematerialisation.")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (config.optimizer.grad_accum_steps).")
flags.DEFINE_integer("vocab", 0, "Vocabulary size override (0 = the preset's).")
flags.DEFINE_string("device", "h100-80gb", "Device to fit: one of DEVICES, or a size like 24gb.")
flags.DEFINE_bool(
    "flops", False, "Also compile unrolled and compare FLOPs with the analytical count."
)
flags.DEFINE_string("json_out", "", "Write the plan as JSON here (default: $OUT/memory_plan.json).")

GIB = 1024**3
# Memory per device in GiB as the vendors state it (GB = 1e9 bytes where they say GB).
DEVICES = {
    "h200-141gb": 141e9 / GIB,
    "h100-80gb": 80.0,
    "a100-80gb": 80.0,
    "a100-40gb": 40.0,
    "l40s-48gb": 48.0,
    "a10g-24gb": 24.0,
    "l4-24gb": 24.0,
    "rtx4090-24gb": 24.0,
    "tpu-v5e-16gb": 16.0,
    "tpu-v5p-95gb": 95.0,
    "tpu-v4-32gb": 32.0,
}
ARG_NAMES = (
    "preset",
    "batch_size",
    "seq_len",
    "data",
    "fsdp",
    "tensor",
    "reference",
    "dtype",
    "logps_chunk_size",
    "remat",
    "grad_accum",
    "vocab",
    "device",
)
# JAX's GPU allocator preallocates this share of the device by default.
JAX_DEFAULT_FRACTION = 0.75


def device_bytes(name: str) -> float:
    """Bytes of memory of ``--device``."""
    if name in DEVICES:
        return DEVICES[name] * GIB
    if name.lower().endswith("gb") and name[:-2].replace(".", "", 1).isdigit():
        return float(name[:-2]) * GIB
    raise app.UsageError(f"--device={name!r}: one of {sorted(DEVICES)} or a size such as 24gb")


def simulate_devices(n: int) -> None:
    """Make ``n`` host devices for the mesh (JAX reads the flag when its CPU backend starts, at
    the first device query, not at import)."""
    flag = f"--xla_force_host_platform_device_count={n}"
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def run_config():
    """The run config of the flags, validated as a launcher would."""
    config = config_common.base_config("dpo")
    config.model.preset = FLAGS.preset
    config.model.dtype = FLAGS.dtype
    config.model.remat = FLAGS.remat
    config.model.logps_chunk_size = FLAGS.logps_chunk_size
    config.data.batch_size = FLAGS.batch_size
    config.data.max_len = FLAGS.seq_len
    config.data.max_prompt_len = FLAGS.seq_len // 2
    config.optimizer.grad_accum_steps = FLAGS.grad_accum
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = FLAGS.data, FLAGS.fsdp, FLAGS.tensor
    config.algorithm.reference = {"live": "copy", "lora": "lora_base"}.get(
        FLAGS.reference, FLAGS.reference
    )
    if FLAGS.reference == "lora":
        config.model.lora.rank = FLAGS.lora_rank
        config.model.lora.targets = tuple(FLAGS.lora_targets)
    train_config.validate(config, FLAGS.data * FLAGS.fsdp * FLAGS.tensor, dpo)
    return config


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of sharded ``ShapeDtypeStruct`` s (its largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def plan() -> dict:
    config = run_config()
    mesh = shd.make_mesh(config.mesh)
    model_cfg = cost.model_config(config)
    if FLAGS.vocab:
        model_cfg = model_cfg.replace(vocab_size=FLAGS.vocab)
    t0 = time.perf_counter()
    compiled = cost.compile_train_step(config, dpo, mesh, model_cfg=model_cfg, count_flops=False)
    compile_s = time.perf_counter() - t0
    step = cost.step_cost(compiled)
    model = models.Model(model_cfg, None, head=dpo.HEAD)
    state, frozen, *_ = cost.abstract_inputs(config, dpo, model, mesh)
    batch = cost.abstract_batch(config, dpo, mesh)
    lora = FLAGS.reference == "lora"
    count = cost.analytical_flops(
        model_cfg,
        num_sequences=2 * FLAGS.batch_size,
        seq_len=FLAGS.seq_len,
        reference=config.algorithm.reference,
        lora_rank=FLAGS.lora_rank if lora else 0,
        lora_targets=tuple(FLAGS.lora_targets) if lora else (),
    )
    result = {
        "args": {name: FLAGS[name].value for name in ARG_NAMES},
        "backend": jax.devices()[0].platform,
        "num_devices": mesh.size,
        "compile_s": compile_s,
        "state_bytes": tree_bytes_per_device(state),
        "frozen_bytes": tree_bytes_per_device(frozen) if frozen is not None else 0,
        "batch_bytes": tree_bytes_per_device(batch),
        "argument_bytes": step.argument_bytes,
        "temp_bytes": step.temp_bytes,
        "output_bytes": step.output_bytes,
        "alias_bytes": step.alias_bytes,
        "peak_bytes": step.peak_bytes,
        "analytical_flops": count.total,
    }
    if FLAGS.flops:
        unrolled = cost.compile_train_step(config, dpo, mesh, model_cfg=model_cfg)
        flops = cost.step_cost(unrolled).flops * mesh.size  # per device -> whole step
        result["compiled_flops"] = flops
        result["flops_ratio"] = flops / count.total
    return result


def report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:8.2f} MiB"  # noqa: E731
    capacity = device_bytes(FLAGS.device)
    lines = [
        f"DPO step, {FLAGS.preset}, {FLAGS.batch_size} pairs x {FLAGS.seq_len} tokens, mesh "
        f"data={FLAGS.data} fsdp={FLAGS.fsdp} tensor={FLAGS.tensor}, reference={FLAGS.reference}, "
        f"{FLAGS.dtype}, remat={FLAGS.remat}, logps_chunk_size={FLAGS.logps_chunk_size}, "
        f"grad_accum={FLAGS.grad_accum} (compiled for {r['backend']} in {r['compile_s']:.0f} s)",
        "per device:",
        f"  trainable params + AdamW state {g(r['state_bytes'])}",
        f"  frozen reference / LoRA base   {g(r['frozen_bytes'])}",
        f"  batch                          {g(r['batch_bytes'])}",
        f"  arguments (the three above)    {g(r['argument_bytes'])}",
        f"  temporaries                    {g(r['temp_bytes'])}",
        f"  outputs                        {g(r['output_bytes'])}",
        f"  - aliased (donated state)      {g(r['alias_bytes'])}",
        f"  peak                           {g(r['peak_bytes'])}",
        f"analytical FLOPs per step {r['analytical_flops']:.3e}",
    ]
    if "compiled_flops" in r:
        lines.append(
            f"compiled FLOPs per step {r['compiled_flops']:.3e} "
            f"({r['flops_ratio']:.3f}x the analytical count)"
        )
    pool = JAX_DEFAULT_FRACTION * capacity
    fits = r["peak_bytes"] <= pool
    verdict = (
        "fits"
        if fits
        else (
            "fits only with XLA_PYTHON_CLIENT_MEM_FRACTION raised"
            if r["peak_bytes"] <= capacity
            else "does not fit"
        )
    )
    lines.append(
        f"{FLAGS.device}: {capacity / GIB:.1f} GiB, JAX's default pool {pool / GIB:.1f} GiB -> "
        f"{verdict} ({100 * r['peak_bytes'] / capacity:.0f} % of the device)"
    )
    r["fits"] = fits
    return "\n".join(lines)


def main(argv):
    del argv
    device_bytes(FLAGS.device)  # a bad --device fails before compiling
    simulate_devices(FLAGS.data * FLAGS.fsdp * FLAGS.tensor)
    result = plan()
    print(report(result), flush=True)
    out = FLAGS.json_out or (
        os.path.join(os.environ["OUT"], "memory_plan.json") if "OUT" in os.environ else ""
    )
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
