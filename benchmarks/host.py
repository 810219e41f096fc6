"""The machine a benchmark runs on: its memory bandwidth, and holding a process to a number of
cores (no flags here: importable by every script)."""

from __future__ import annotations

import os
import time

import numpy as np


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


def limit_threads(threads: int) -> None:
    """Hold this process (XLA's CPU runtime and torch alike) to ``threads`` cores; call it before
    JAX's backend starts.

    The process is pinned to the first ``threads`` of the cores it may use: XLA's CPU runtime
    splits its loop fusions over the machine's cores and runs independent operations side by
    side whatever its Eigen setting, so a thread-count flag alone leaves it on every core (its
    CPU time then exceeds its wall time). Eigen's own pool is switched off at one thread, and
    torch, if imported, is set to ``threads`` threads.
    """
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    extra = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()
