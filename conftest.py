"""Test-suite set-up shared by tests/ and the doctests in prefjax/.

Eight simulated CPU devices let sharding tests run on one machine; the flag must be set before
jax is first imported, which is why it lives here rather than in a fixture.
"""

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


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    """Names every docstring example may use without importing them."""
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, prefjax=prefjax)
