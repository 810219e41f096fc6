r"""Release gate: ``python -m experiments.studies.gate WORKDIR [--flags]``.

Reads ``WORKDIR/metrics.jsonl`` of a finished (or running) prefjax run -- any algorithm: DPO,
PPO, GRPO/RLOO, online DPO -- and prints one row per check of
:func:`prefjax.train.evaluation.release_gate`: the proxy reward rising while the held-out gold
reward falls (over-optimisation), response length growth, KL to the reference beyond a budget,
entropy collapse; each with its verdict, the step where the behaviour began, the step where it
was detected, the metric names read and their values. It writes nothing. Thresholds::

    python -m experiments.studies.gate runs/ppo_default --kl_budget=5 --max_length_ratio=1.3
    python -m experiments.studies.gate runs/dpo_tiny --gold_key=eval/gold_reward  # greedy gold

Exit statuses:

======  =========================================================================================
0       passed: no check raised a flag (a check whose metrics the run did not record is "n/a")
1       flagged: at least one check raised a flag (with ``--fail_on_missing``, also a check that
        could not run for lack of its metrics)
2       refused: no ``WORKDIR/metrics.jsonl`` (the path is named), a damaged record, or an
        invalid threshold
======  =========================================================================================
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments.studies import common
from prefjax.train import evaluation
from prefjax.train import logging as metric_logging

EXIT_PASSED = 0
EXIT_FLAGGED = 1
EXIT_REFUSED = 2

_DEFAULTS = evaluation.GateConfig()
flags.DEFINE_float(
    "gold_drop", _DEFAULTS.gold_drop, "Over-optimisation: gold reward fall below its peak."
)
flags.DEFINE_float(
    "max_length_ratio", _DEFAULTS.max_length_ratio, "Length growth: longest ratio to the first."
)
flags.DEFINE_float("kl_budget", _DEFAULTS.kl_budget, "KL(pi || pi_ref) budget, nats/response.")
flags.DEFINE_float(
    "min_entropy_fraction", _DEFAULTS.min_entropy_fraction, "Entropy floor, fraction of first."
)
flags.DEFINE_integer(
    "patience", _DEFAULTS.patience, "Consecutive records a condition must hold to flag."
)
for _quantity in evaluation.GATE_KEYS:
    flags.DEFINE_string(
        f"{_quantity}_key",
        "",
        f"Metric name(s) of the {_quantity}, comma-separated (default: evaluation.GATE_KEYS).",
    )
flags.DEFINE_bool("fail_on_missing", False, "Exit 1 also when a check has no metrics (n/a).")
FLAGS = flags.FLAGS


class GateError(ValueError):
    """The run cannot be gated (no metrics file, a damaged record); names the path."""


def read_run(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (:func:`prefjax.train.logging.read_records`)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        found = sorted(
            os.path.relpath(os.path.join(d, "metrics.jsonl"), workdir)
            for d, _, files in os.walk(workdir)
            if "metrics.jsonl" in files
        )
        hint = f"; runs below it: {', '.join(found[:5])}" if found else ""
        raise GateError(f"{path}: no such file (is {workdir} a prefjax run directory?){hint}")
    records = metric_logging.read_records(path)
    if not records:
        raise GateError(f"{path}: no records")
    return records


def format_report(report: evaluation.GateReport, path: str, records: list[dict]) -> str:
    """The printed report: a header line and a markdown table, one row per check."""
    steps = [int(r["step"]) for r in records]
    rows = [
        {
            "check": c.name,
            "verdict": c.status.upper() if c.status == "flag" else c.status,
            "began (step)": "" if c.began is None else c.began,
            "detected (step)": "" if c.detected is None else c.detected,
            "metrics": ", ".join(c.keys),
            "values": c.detail,
        }
        for c in report.checks
    ]
    columns = ["check", "verdict", "began (step)", "detected (step)", "metrics", "values"]
    head = f"release gate: {path} ({len(records)} records, steps {min(steps)}-{max(steps)})"
    verdict = "FLAGGED" if report.flagged else "passed"
    return f"{head}\n\n{common.markdown_table(rows, columns)}\n\n{verdict}"


def exit_status(report: evaluation.GateReport, *, fail_on_missing: bool = False) -> int:
    """:data:`EXIT_FLAGGED` when a check flagged (or, with ``fail_on_missing``, was n/a)."""
    missing = fail_on_missing and any(c.status == "n/a" for c in report.checks)
    return EXIT_FLAGGED if report.flagged or missing else EXIT_PASSED


def gate(workdir: str, config: evaluation.GateConfig, *, fail_on_missing: bool = False) -> int:
    """Prints the report of ``workdir``'s run and returns the exit status."""
    records = read_run(workdir)
    report = evaluation.release_gate(records, config)
    print(format_report(report, os.path.join(workdir, "metrics.jsonl"), records), flush=True)
    return exit_status(report, fail_on_missing=fail_on_missing)


def config_from_flags() -> evaluation.GateConfig:
    """The :class:`~prefjax.train.evaluation.GateConfig` the command line gives."""
    keys = dict(evaluation.GATE_KEYS)
    for quantity in keys:
        value = FLAGS[f"{quantity}_key"].value
        if value:
            keys[quantity] = tuple(k.strip() for k in value.split(",") if k.strip())
    return evaluation.GateConfig(
        gold_drop=FLAGS.gold_drop,
        max_length_ratio=FLAGS.max_length_ratio,
        kl_budget=FLAGS.kl_budget,
        min_entropy_fraction=FLAGS.min_entropy_fraction,
        patience=FLAGS.patience,
        keys=keys,
    )


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(
            "usage: python -m experiments.studies.gate WORKDIR [--flags]", exitcode=EXIT_REFUSED
        )
    try:
        status = gate(argv[1], config_from_flags(), fail_on_missing=FLAGS.fail_on_missing)
    except ValueError as err:  # GateError, a damaged metrics.jsonl line, a bad threshold
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
