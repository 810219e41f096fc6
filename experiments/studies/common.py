"""What every study writes: tables (JSONL + CSV), summary statistics over seeds, a markdown
summary. Plotting stays in each study (matplotlib imported lazily, as in ``train.logging``)."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from experiments import pipelines
from prefjax.train import logging as metric_logging
from prefjax.train import sweep
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


def aggregate_points(points: Sequence[Mapping], names: Sequence[str], order) -> list[dict]:
    """One row per (method, beta) of ``points`` (sorted by ``order(method)``, then beta): the
    seed mean and standard error of each of ``names`` (``<name>``, ``<name>_se``), the mean
    cost (``wall_s``, ``tokens``, ``peak_rss_mib``; ``peak_device_mib`` where the points have
    it, ``None`` where none recorded it), and ``seeds``."""
    rows = []
    keys = sorted({(p["method"], p["beta"]) for p in points}, key=lambda k: (order(k[0]), k[1]))
    for method, beta in keys:
        group = [p for p in points if p["method"] == method and p["beta"] == beta]
        row = {"method": method, "beta": beta, "seeds": len(group)}
        for name in names:
            row[name], row[f"{name}_se"] = mean_stderr([p[name] for p in group])
        for name in ("wall_s", "tokens", "peak_rss_mib"):
            row[name] = float(np.mean([p[name] for p in group]))
        if any("peak_device_mib" in p for p in group):
            device = [p["peak_device_mib"] for p in group if p.get("peak_device_mib") is not None]
            row["peak_device_mib"] = float(np.mean(device)) if device else None
        rows.append(row)
    return rows


def point_cells(row: Mapping, measured: Sequence[tuple[str, str, int]]) -> dict:
    """A summary-table row of a per-(method, beta) aggregate ``row``: method, beta, seeds, each
    ``(label, name, digits)`` of ``measured`` as mean ± stderr over seeds (:func:`fmt_over_seeds`),
    then the cost columns (wall time, tokens, peak RSS, and peak device memory where recorded)."""
    cells = {"method": row["method"], "beta": f"{row['beta']:g}", "seeds": row["seeds"]}
    for label, name, digits in measured:
        cells[label] = fmt_over_seeds(row[name], row[f"{name}_se"], row["seeds"], digits)
    cells["wall s"] = f"{row['wall_s']:.1f}"
    cells["tokens"] = f"{row['tokens']:.0f}"
    cells["peak RSS MiB"] = f"{row['peak_rss_mib']:.0f}"
    if "peak_device_mib" in row:
        device = row["peak_device_mib"]
        cells["peak device MiB"] = "" if device is None else f"{device:.0f}"
    return cells


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


def eval_records(run_path: str) -> list[dict]:
    """The held-out records of a run's ``metrics.jsonl``, in step order; at least one."""
    records = metric_logging.read_records(os.path.join(run_path, "metrics.jsonl"))
    evals = [r for r in records if r.get("split") == "eval"]
    if not evals:
        raise RuntimeError(f"{run_path}/metrics.jsonl has no held-out evaluation")
    return evals


def final_eval(run_path: str) -> dict:
    """The last held-out record of a run's ``metrics.jsonl``."""
    return eval_records(run_path)[-1]


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (``ru_maxrss``, KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mib() -> float | None:
    """The largest ``peak_bytes_in_use`` of the local accelerators since start-up, MiB; ``None``
    where the backend keeps no such statistic (the CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 2**20 if peaks else None


def timed_run(wd: run_dir.Workdir, key: str, what: str, train: Callable):
    """``(result, cost)`` of ``train()``, a run that must finish; the cost (``wall_s``,
    ``peak_rss_mib``, ``peak_device_mib``) is kept in ``<workdir>/costs/<key>.json`` so that a
    resumed study reports the training's cost, not that of its re-evaluation."""
    path = os.path.join(wd.path, "costs", f"{key}.json")
    t0 = time.time()
    result = train()
    if result.status != "finished":
        raise RuntimeError(f"{what}: run {result.status}")
    wd.mark_step()  # the study has results now: a later failure keeps its directory
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cost = {
            "wall_s": time.time() - t0,
            "peak_rss_mib": peak_rss_mib(),
            "peak_device_mib": peak_device_mib(),
        }
        with open(path, "w") as f:
            json.dump(cost, f)
    with open(path) as f:
        return result, json.load(f)


class BetaRun(NamedTuple):
    """One trained run of :func:`beta_runs`: its beta, directory, cost, config, and how many
    members shared the run's wall time (a sweep's)."""

    beta: float
    path: str
    cost: dict
    config: object
    share: int


def beta_runs(wd, key: str, method_dir: str, betas, *, sweep_config=None, online=None):
    """A method trained at every beta, each run's cost kept under ``key`` (:func:`timed_run`):
    the DPO family as one sweep (``sweep_config``, whose ``sweep.beta`` are the betas: one
    compile), an online method as one run per beta (``online=(algorithm module, beta ->
    config)``, in ``method_dir/beta=<b>``). Returns the :class:`BetaRun` list."""
    if sweep_config is not None:
        result, cost = timed_run(
            wd, key, key, functools.partial(sweep.run, sweep_config, method_dir)
        )
        n = len(result.group)
        return [
            BetaRun(float(m.beta), path, cost, sweep_config, n)
            for m, path in zip(result.group, result.workdirs, strict=True)
        ]
    module, config_of = online
    runs = []
    for beta in betas:
        c = config_of(beta)
        path = os.path.join(method_dir, f"beta={float(beta):g}")
        name = f"{key}.beta={float(beta):g}"
        _, cost = timed_run(wd, name, name, functools.partial(pipelines.sft_then(module), c, path))
        runs.append(BetaRun(float(beta), path, cost, c, 1))
    return runs


def sequences_read(run) -> int:
    """Sequences a :class:`BetaRun`'s training read (offline: both responses of every pair) or
    sampled (online: every response of every prompt)."""
    c = run.config
    per_prompt = c.algorithm.num_samples if "num_samples" in c.algorithm else 2
    return int(c.train.num_steps * c.data.batch_size * per_prompt)
