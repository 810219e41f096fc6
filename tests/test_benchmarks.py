"""Every script in ``benchmarks/`` runs end to end at a tiny size and writes consistent results.

The figures in ``benchmarks/README.md`` come from these scripts, and the GPU rows will be taken in
one short device call: a script that no longer runs (a renamed flag, a changed train-step
signature, a peer that moved) must fail here, on a CPU, not there. Each test runs the script as a
user does (``python -m benchmarks.<name> ...``, one process, one CPU device) and checks what it
wrote: the scripts' own checks (GAE forms agree with each other before timing, greedy decoding
gives the same tokens as Hugging Face ``generate``) end the process with an error when they fail,
and the tests check that every ratio the tables print is the quotient of the medians beside it.
The heavier ones (a PyTorch peer built, or several programs compiled) are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from prefjax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STEP = ["--preset=tiny", "--batch_pairs=2", "--seq_len=32", "--prompt_len=16"]
TINY_STEP += ["--dtype=float32"]


def _run(module: str, args: list[str], tmp_path) -> dict:
    """Runs ``python -m benchmarks.<module> args --json_out=...`` on one CPU device and returns
    the JSON it wrote (the test fails with the script's output if it exits with an error)."""
    out = tmp_path / f"{module}.json"
    # One device, as a user's run has: the suite's eight simulated ones are for sharding tests.
    xla_flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args, f"--json_out={out}"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_gae_benchmark(tmp_path):
    got = _run("gae", ["--batch=8", "--seq=32", "--repeats=2", "--python_repeats=1"], tmp_path)
    forms = {"prefjax scan", "prefjax associative", "prefjax chunked", "python loop"}
    assert forms | {"numpy loop"} <= set(got["median_s"])
    assert got["limit_s"] > 0
    for name, ratios in got["ratios"].items():
        median = got["median_s"][name]
        assert median > 0
        assert ratios["python / it"] == pytest.approx(got["median_s"]["python loop"] / median)
        assert ratios["numpy / it"] == pytest.approx(got["median_s"]["numpy loop"] / median)


def test_memory_plan(tmp_path):
    args = ["--preset=tiny", "--batch_size=2", "--seq_len=32", "--device=h100-80gb"]
    got = _run("memory_plan", args, tmp_path)
    # Peak = arguments + temporaries + outputs, less the outputs aliased to donated arguments.
    assert got["argument_bytes"] == got["state_bytes"] + got["frozen_bytes"] + got["batch_bytes"]
    expected_peak = (
        got["argument_bytes"] + got["temp_bytes"] + got["output_bytes"] - got["alias_bytes"]
    )
    assert got["peak_bytes"] == expected_peak
    assert got["alias_bytes"] == got["state_bytes"]  # the train state is donated, in place
    assert got["fits"] is True and got["analytical_flops"] > 0


def test_roofline(tmp_path):
    args = ["--preset=tiny", "--batch=2", "--held=16", "--slots=64", "--steps=4", "--repeats=2"]
    got = _run("roofline", [*args, "--dtype=float32", "--compiled_bytes"], tmp_path)
    cfg = models.preset("tiny")
    # Counted by hand: the tiny preset is untied, so of its input table only the 2 rows looked
    # up are read; K/V of the 16 prompt tokens, the warm-up step's and on average 1.5 of the 4
    # timed steps' own, 4 bytes each.
    params = models.Model.init(cfg, jax.random.key(0)).params
    table = params["embed"]["embedding"]
    param_bytes = sum(x.size for x in jax.tree.leaves(params)) * 4 - (table.size - 2 * 64) * 4
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.resolved_head_dim * 4
    assert got["held_mean"] == 16 + 1 + 1.5
    assert got["bytes"] == {
        "params": param_bytes,
        "kv_read": 2 * 18.5 * per_token,
        "kv_write": 2 * per_token,
    }
    assert got["bytes_total"] <= got["compiled_bytes_accessed"]  # a lower bound on XLA's count
    assert got["roofline_fraction"] == pytest.approx(
        got["bytes_total"] / got["step_s"] / got["peak_bytes_per_s"]
    )


def test_loop_fetch(tmp_path):
    got = _run("loop_fetch", ["--steps=2", "--repeats=1"], tmp_path)
    assert got["fetch"] > 0 and got["deferred"] > 0
    assert got["ratio_fetch_over_deferred"] == pytest.approx(got["fetch"] / got["deferred"])


@pytest.mark.slow
def test_dpo_step_benchmark_with_its_pytorch_peer(tmp_path):
    got = _run("dpo_step", [*TINY_STEP, "--steps=2", "--torch"], tmp_path)
    ours, theirs = got["prefjax"], got["torch"]
    # The reference starts as a copy of the policy: DPO's loss is log 2 there, and four steps
    # at the preset's learning rate move it by far less than 0.05.
    assert abs(ours["loss"] - math.log(2)) < 0.05
    assert ours["tokens_per_s"] == pytest.approx(2 * 2 * 32 / ours["step_s"])
    assert ours["n_matmul_params"] == theirs["n_matmul_params"]  # the same model on both sides
    assert got["ratio_prefjax_over_torch"] == pytest.approx(theirs["step_s"] / ours["step_s"])


@pytest.mark.slow
def test_profile_step(tmp_path):
    got = _run("profile_step", [*TINY_STEP, "--steps=2", "--trace_steps=1", "--top=3"], tmp_path)
    wall, cpu = got["median_wall_s"], got["median_cpu_s"]
    assert got["ratio_wall"] == pytest.approx(wall["torch"] / wall["prefjax"])
    assert got["ratio_cpu"] == pytest.approx(cpu["torch"] / cpu["prefjax"])
    profile = got["prefjax_profile"]
    assert sum(profile["parts"].values()) == pytest.approx(profile["total_ms"], rel=1e-6)


@pytest.mark.slow
def test_sweep_benchmark(tmp_path):
    args = ["--members=2", "--strategies=map", "--steps=1", "--repeats=1"]
    (row,) = _run("sweep", args, tmp_path)["results"]
    ms = row["ms_per_member_step"]
    assert row["members"] == 2 and ms["separate"] > 0 and ms["sweep/map"] > 0
    assert row["speedup"]["sweep/map"] == pytest.approx(ms["separate"] / ms["sweep/map"])


@pytest.mark.slow
def test_rollout_benchmark_against_hugging_face_generate(tmp_path):
    args = ["--batches=1,2", "--prompt_len=8", "--new_tokens=8", "--cache_lengths=32,64"]
    args += ["--sweep_batch=2", "--step_batch=4", "--step_tokens=4", "--repeats=1"]
    got = _run("rollout", args, tmp_path)  # exits with an error if a greedy token differs
    assert [row["batch"] for row in got["batches"]] == [1, 2]
    assert [row["cache_length"] for row in got["sweep"]] == [32, 64]
    for row in got["batches"] + got["sweep"]:
        assert row["ratio"] == pytest.approx(row["prefjax_tok_s"] / row["hf_tok_s"])
    # The decode step reads and writes what the tokens held need, not what is allocated: the
    # same bytes with 256 and 2048 cache slots.
    step = got["step"]
    assert step["2048"]["bytes_accessed"] == pytest.approx(step["256"]["bytes_accessed"], rel=0.05)


def test_gpu_script_commands_use_flags_the_scripts_define():
    """``benchmarks/gpu.sh`` is only run where a GPU is lent, with little device time: every
    ``python -m benchmarks.<name>`` line in it must name flags that script (or a module it
    imports flags from) defines, so a renamed flag fails here rather than there."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu.sh")).read().replace("\\\n", " ")
    variables = dict(re.findall(r'^([A-Z])="([^"]*)"$', text, flags=re.M))
    for name, value in variables.items():  # D uses S
        variables[name] = re.sub(r"\$([A-Z])\b", lambda m: variables[m.group(1)], value)
    commands = re.findall(r"python -m benchmarks\.(\w+)([^\n]*)", text)
    assert {m for m, _ in commands} >= {"dpo_step", "roofline", "sweep", "gae"}
    for module, args in commands:
        args = re.sub(r"\$([A-Z])\b", lambda m: variables[m.group(1)], args)
        source = open(os.path.join(ROOT, "benchmarks", f"{module}.py")).read()
        if module == "profile_step":
            source += open(os.path.join(ROOT, "benchmarks", "dpo_step.py")).read()
        defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))
        used = set(re.findall(r"--(\w+)", args))
        assert used <= defined, f"benchmarks/{module}.py does not define {used - defined}"
