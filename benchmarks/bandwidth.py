"""Memory bandwidth of the machine a benchmark runs on (no flags: importable by every script)."""

from __future__ import annotations

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
