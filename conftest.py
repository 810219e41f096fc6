"""Test-suite set-up shared by tests/ and the doctests in prefjax/.

Eight simulated CPU devices let sharding tests run on one machine; the flag must be set before
jax is first imported, which is why it lives here rather than in a fixture.
"""

import collections
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and each runs a few times, so the XLA CPU compile is most of a
# test's time. The older elemental IR emitters compile fused loops about twice as fast as the
# MLIR fusion emitters (22.4 -> 9.6 s CPU on two DPO-step tests) and compute the same HLO, so the
# cost-analysis and HLO tests see the same programs; launcher subprocesses inherit the flag.
# Benchmarks and launchers keep XLA's defaults.
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# Matplotlib without a display (notebooks and end-of-run plots).
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import prefjax  # noqa: E402

# ``pytest -n 2`` hands each worker whole files (``--dist loadfile`` in setup.cfg), by default
# those with the most tests first, which left the few-test, minute-long launcher and subprocess
# files for the end: one worker ran them while the other had nothing left. These files go first,
# longest first (CPU seconds of the file's tests in one process, children included, about CI's
# wall seconds; the unnumbered ones placed by CI's durations); the others follow, most tests
# first as before (``--no-loadscope-reorder`` makes xdist keep this order).
LONGEST_FILES = (
    "tests/train/test_faults.py",  # 115 s
    "tests/experiments/test_own_data.py",  # 110 s
    "tests/test_benchmarks.py",  # 80 s with the slow ones (every benchmark script, tiny sizes)
    "tests/train/test_grpo.py",  # 95 s
    "tests/experiments/test_study_overoptimisation.py",
    "tests/experiments/test_study_frontier.py",
    "tests/test_notebooks.py",  # 68 s
    "tests/experiments/test_ppo_launcher.py",  # 66 s
    "tests/train/test_online_dpo.py",  # 66 s
    "tests/experiments/test_launchers.py",  # 65 s
    "tests/train/test_ppo.py",
    "tests/train/test_loop.py",
    "tests/experiments/test_sweep_launcher.py",  # 60 s
    "tests/train/test_multiprocess.py",  # 54 s
    "tests/experiments/test_study_dpo_dynamics.py",
    "tests/experiments/test_study_diversity.py",
    "tests/experiments/test_online_launchers.py",  # 45 s
    "tests/train/test_sweep.py",  # 42 s
    "tests/experiments/test_launch_errors.py",  # 16 s
)


def pytest_collection_modifyitems(config, items):
    """Longest files first, then by number of tests; a file's tests stay together, in order."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    per_file = collections.Counter(_file_of(item) for item in items)
    items.sort(key=lambda item: (rank.get(_file_of(item), len(rank)), -per_file[_file_of(item)]))


def _file_of(item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    """Names every docstring example may use without importing them."""
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, prefjax=prefjax)
