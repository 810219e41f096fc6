"""Fault injection for crash-safety tests: the process kills itself at a named point.

``PREFJAX_FAULT_INJECTION=<point>:<step>`` makes the run send itself ``SIGKILL`` (which no
handler can catch, like a node failure or the OOM killer) at that point of that step:

========== ==============================================================================
``step``        right after step ``<step>`` is dispatched, before its metrics are fetched
``metrics``     half-way through writing a ``metrics.jsonl`` record of step ``<step>``
``checkpoint``  right after the checkpoint of step ``<step>`` was handed to the background
                writer (the write is in flight)
``committed``   right after the checkpoint of step ``<step>`` has been committed
========== ==============================================================================

Unset (the normal case) it costs one dictionary look-up per call. ``tests/train/test_faults.py``
drives it.
"""

from __future__ import annotations

import os
import signal

ENV = "PREFJAX_FAULT_INJECTION"
POINTS = ("step", "metrics", "checkpoint", "committed")


def armed(point: str, step: int) -> bool:
    """Whether the injected fault is at ``point`` of ``step``."""
    spec = os.environ.get(ENV)
    return spec is not None and spec == f"{point}:{step}"


def crash() -> None:
    """Ends the process at once, as a node failure would (no cleanup, no handlers)."""
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_crash(point: str, step: int) -> None:
    if armed(point, step):
        crash()
