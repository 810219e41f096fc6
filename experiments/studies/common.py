"""What every study writes: tables (JSONL + CSV), summary statistics over seeds, a markdown
summary. Plotting stays in each study (matplotlib imported lazily, as in ``train.logging``)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from prefjax.train import workdir as run_dir
from prefjax.train.errors import ConfigError


def write_table(workdir: str, name: str, rows: Sequence[Mapping]) -> tuple[str, str]:
    """Writes ``rows`` to ``workdir/name.jsonl`` and ``workdir/name.csv`` (columns: the union
    of the rows' keys, in first-seen order; a missing value is an empty CSV cell). Returns both
    paths."""
    os.makedirs(workdir, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    jsonl = os.path.join(workdir, f"{name}.jsonl")
    with open(jsonl, "w") as f:
        for row in rows:
            f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
    path = os.path.join(workdir, f"{name}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
    return jsonl, path


def read_table(path: str) -> list[dict]:
    """The rows of a ``.jsonl`` table written by :func:`write_table`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)`` (0 for one value)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_stderr of no values")
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def fmt(mean: float, stderr: float, digits: int = 3) -> str:
    """``"0.512 ± 0.014"``."""
    return f"{mean:.{digits}f} ± {stderr:.{digits}f}"


def fmt_over_seeds(mean: float, stderr: float, seeds: int, digits: int = 3) -> str:
    """:func:`fmt` over several seeds; the mean alone for one seed (no standard error)."""
    return fmt(mean, stderr, digits) if seeds > 1 else f"{mean:.{digits}f}"


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``columns`` (floats to 3 significant decimals)."""

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(workdir: str, title: str, sections: Sequence[tuple[str, str]]) -> str:
    """``workdir/summary.md``: a title and ``(heading, markdown body)`` sections."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "summary.md")
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def check_subset(field: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """Raises ``ConfigError`` naming ``field`` unless ``values`` is a non-empty subset of
    ``allowed`` without repeats."""
    values = tuple(values)
    if not values or len(set(values)) != len(values) or not set(values) <= set(allowed):
        raise ConfigError(f"{field}={values}: expected distinct values from {tuple(allowed)}")


def check_seeds(field: str, seeds: Sequence[int]) -> None:
    """Raises ``ConfigError`` naming ``field`` unless ``seeds`` are distinct integers (>= 1)."""
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{field}={seeds}: expected one or more distinct integer seeds")


@contextlib.contextmanager
def claimed_workdir(workdir: str, name: str, config):
    """The study's run directory, claimed as a ``name`` run (``prefjax.train.workdir``: a
    directory of another run, or a non-empty one without ``run.json``, is refused; a second
    process is locked out); yields the open ``Workdir``. A study that fails before
    ``Workdir.mark_step()`` (its first finished training run) removes a directory it created."""
    wd = run_dir.Workdir(os.path.abspath(workdir), name, json.loads(config.to_json_best_effort()))
    wd.open()
    try:
        wd.begin(0)
        yield wd
    except BaseException:
        wd.discard()
        raise
    finally:
        wd.release()
