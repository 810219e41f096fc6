"""Multi-process: a PPO update on a 2-process CPU job equals the one-process update.

Two processes on localhost, each with 2 simulated CPU devices, join one job through
``jax.distributed.initialize`` (``prefjax.sharding.initialize_distributed``; cross-process
all-reduces over gloo) and run one PPO update (2 epochs x 2 minibatches x 2 micro-batches,
ragged responses) on the 4-device global data mesh, each process holding half of the rollout.
A third process runs the same update alone on one device. Each writes its updated parameters;
the parent compares them (``tests/train/_multiprocess_worker.py`` is the worker).
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multiprocess_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out, num_processes, process_id, port, local_devices):
    # The suite's compile flag (conftest.py) with this worker's own device count: the workers
    # compile with the elemental emitters too (about half the compile time, the same HLO).
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={local_devices}"]),
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = [sys.executable, WORKER, str(out), str(num_processes), str(process_id), str(port)]
    # Output to a file, not a pipe: a worker blocked on a full pipe would stall the whole job.
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, outs):
    """Waits for every process; on a failure or a timeout kills the rest and shows the log."""
    try:
        for p, out in zip(procs, outs, strict=True):
            p.wait(timeout=TIMEOUT_S)
            if p.returncode != 0:
                with open(f"{out}.log") as f:
                    log = f.read()
                raise AssertionError(f"worker {out} exited with {p.returncode}:\n{log[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _load(path):
    """``(parameter leaves, {metric: value}, job)`` written by a worker."""
    with np.load(path) as f:
        leaves = [f[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in f.files))]
        metrics = dict(zip(f["metric_names"].tolist(), f["metrics"].tolist(), strict=True))
        return leaves, metrics, f["job"].tolist()


@pytest.mark.slow
def test_two_process_ppo_update_equals_the_one_process_update(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    single = tmp_path / "single.npz"
    procs = [_start(out, 2, i, port, local_devices=2) for i, out in enumerate(outs)]
    procs.append(_start(single, 1, 0, 0, local_devices=1))
    _wait(procs, [*outs, single])

    ref_leaves, ref_metrics, ref_job = _load(single)
    assert ref_job == [1, 1, 1, 16]  # one process, one device, the whole rollout
    for out in outs:
        leaves, metrics, job = _load(out)
        # 2 processes, 4 global devices, data split 4 ways: this process held 8 of the 16 rows.
        assert job == [2, 4, 4, 8]
        assert len(leaves) == len(ref_leaves)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, ref_leaves, strict=True))
        print(f"{out.name}: max |params - one-process update| = {diff:.2e}")
        assert diff < 1e-5
        for name, value in ref_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # The update did something: the weights moved and later minibatches were clipped.
    assert ref_metrics["update_norm"] > 1e-3 and ref_metrics["ppo/clipfrac"] > 0
