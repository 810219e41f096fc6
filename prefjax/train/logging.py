"""What a researcher sees during and after a run: console lines, progress bar, metrics.jsonl,
TensorBoard event files, the end-of-run curves (PNG) and summary table.

Every record is one flat dict of floats with ``/``-namespaced names, keyed by the optimiser step.
Train records use the step's metric names (``loss``, ``rewards/accuracy``, ``grad_norm``, ...,
averaged over the ``train.log_every`` steps since the last record); evaluation records prefix them
with ``eval/`` (``eval/rewards/accuracy``, ``eval/gold_reward``, ``eval/kl``). ``metrics.jsonl``
holds one JSON object per line: ``{"step": 40, "split": "train", "time": ..., "loss": 0.61, ...}``.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from prefjax.train import faults

# Curves drawn at the end of a run: (panel title, [(metric name, label), ...]). A panel appears
# when at least one of its metrics was recorded.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", "train"), ("eval/loss", "held-out"))),
    (
        "preference accuracy",
        (("rewards/accuracy", "train"), ("eval/rewards/accuracy", "held-out")),
    ),
    (
        "implicit rewards (beta * log-ratio)",
        (
            ("eval/rewards/chosen", "chosen"),
            ("eval/rewards/rejected", "rejected"),
            ("eval/rewards/margin", "margin"),
        ),
    ),
    (
        "log-probs (held-out, per sequence)",
        (("eval/logps/chosen", "chosen"), ("eval/logps/rejected", "rejected")),
    ),
    (
        "KL to the reference (nats / sequence)",
        (
            ("eval/kl", "sampled, held-out prompts"),
            ("eval/kl/logratio", "log-ratio on held-out pairs"),
        ),
    ),
    (
        "gold reward of generated responses",
        (
            ("eval/gold_reward", "greedy, held-out prompts"),
            ("eval/gold_reward_sampled", "sampled, held-out prompts"),
            ("eval/gold_reward_train_prompts", "greedy, train prompts"),
        ),
    ),
    ("KL(pi_theta || pi*) (bandit)", (("eval/kl_to_optimal", "held-out prompts"),)),
    (
        "response length (tokens)",
        (
            ("eval/length/chosen", "chosen"),
            ("eval/length/rejected", "rejected"),
            ("eval/length/generated", "greedy"),
            ("eval/length/sampled", "sampled"),
        ),
    ),
    ("gradient norm", (("grad_norm", "before clipping"),)),
)

# Rows of the end-of-run summary table (first and last recorded value of each, when present).
SUMMARY_METRICS = (
    "loss",
    "eval/loss",
    "eval/rewards/accuracy",
    "eval/rewards/margin",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/kl",
    "eval/gold_reward",
    "eval/gold_reward_train_prompts",
    "eval/gold_reward_sampled",
    "eval/kl_to_optimal",
    "eval/length/generated",
    "train/skipped_total",
)


def _finite_float(x) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value


class MetricWriter:
    """Writes records to ``metrics.jsonl``, TensorBoard and the console (process 0 only).

    Args:
      workdir: run directory.
      tensorboard: also write ``<workdir>/tensorboard`` event files (tensorboardX).
      enabled: ``False`` on processes other than 0.
      console: print a line per record (via ``print_fn``).
      print_fn: how console lines are written (the progress bar's ``write`` keeps the bar intact).
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        console: bool = True,
        print_fn=print,
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.console = console
        self.print_fn = print_fn
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records newer than ``step`` (written after the checkpoint a run resumes from),
        and a last line cut short by a crash. The file is replaced atomically: a crash during
        the rewrite leaves the old file or the new one, never a shorter one."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.read().splitlines()
        records = _parse_lines(lines, self.path)
        kept = [line for line, r in zip(lines, records, strict=True) if r and r["step"] <= step]
        if len(kept) == sum(r is not None for r in records) == len(lines):
            return  # nothing to drop
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(line + "\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(
        self, step: int, metrics: Mapping[str, float], *, split: str = "train", note: str = ""
    ) -> None:
        """Appends one record; ``note`` (e.g. ``"mean of steps 1-20"``) labels the console line."""
        if not self.enabled:
            return
        values = {k: _finite_float(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if v is not None}
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        # NaN/inf are written as JSON null so the file stays standard JSON. One write call per
        # record: a crash can cut only the last line short, which readers then ignore.
        line = json.dumps({k: (None if _nonfinite(v) else v) for k, v in record.items()}) + "\n"
        with open(self.path, "a") as f:
            if faults.armed("metrics", step):  # crash-safety tests: die mid-record
                f.write(line[: len(line) // 2])
                f.flush()
                faults.crash()
            f.write(line)
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name if split == "train" else name, value, step)
            self._tb.flush()
        if self.console:
            self.print_fn(format_line(step, values, split, note=note))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _nonfinite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


# Metrics shown on the console (everything goes to metrics.jsonl and TensorBoard).
CONSOLE_METRICS = (
    "loss",
    "perplexity",
    "rewards/accuracy",
    "rewards/margin",
    "kl/logratio",
    "grad_norm",
    "learning_rate",
    "train/skipped_total",
    "steps_per_second",
    "eval/loss",
    "eval/perplexity",
    "eval/rewards/accuracy",
    "eval/rewards/margin",
    "eval/kl",
    "eval/gold_reward",
    "eval/gold_reward_train_prompts",
    "eval/gold_reward_sampled",
    "eval/length/generated",
    "eval/kl_to_optimal",
)


def format_line(step: int, values: Mapping[str, float], split: str, note: str = "") -> str:
    """``[train] step 40 (mean of steps 21-40) | loss 0.612 | ...`` (a handful of keys).

    Train lines show means over the logging window (the progress bar shows the last step's
    loss, labelled ``last loss``); eval lines show one evaluation of the held-out split.
    """
    parts = [f"[{split}] step {step}" + (f" ({note})" if note else "")]
    for name in CONSOLE_METRICS:
        if name in values:
            parts.append(f"{name.removeprefix('eval/')} {values[name]:.4g}")
    return " | ".join(parts)


def read_records(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (``None`` values kept as NaN).

    A last line cut short (the process was killed while writing it) is ignored; a damaged line
    anywhere else is an error naming the file and line.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    records = [r for r in _parse_lines(lines, path) if r is not None]
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in records]


def _parse_lines(lines: Sequence[str], path: str) -> list[dict | None]:
    """One record (or ``None`` for a blank or cut-short last line) per line."""
    out: list[dict | None] = []
    for i, line in enumerate(lines):
        if not line.strip():
            out.append(None)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # the write in progress when the process died
                out.append(None)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({err.msg})") from None
        out.append(record if isinstance(record, dict) and "step" in record else None)
    return out


def series(records: Sequence[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric across records."""
    pts = [(r["step"], r[name]) for r in records if name in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts, strict=True)
    return np.asarray(steps), np.asarray(values, dtype=float)


def plot_curves(records: Sequence[dict], path: str, *, title: str = "") -> str | None:
    """Saves the panels of :data:`PANELS` that have data to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [
        (name, [(m, label) for m, label in curves if series(records, m)[0].size])
        for name, curves in PANELS
    ]
    panels = [(n, c) for n, c in panels if c]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels, strict=False):
        for metric, label in curves:
            steps, values = series(records, metric)
            style = "o-" if steps.size < 30 else "-"
            ax.plot(steps, values, style, label=label, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(records: Sequence[dict]) -> str:
    """A small text table: first and last recorded value of the metrics that matter."""
    rows = []
    for name in SUMMARY_METRICS:
        steps, values = series(records, name)
        if steps.size:
            rows.append((name, steps[0], values[0], steps[-1], values[-1]))
    if not rows:
        return "(no metrics recorded)"
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'first (step)':>20}  {'last (step)':>20}"]
    lines.append("-" * len(lines[0]))
    for name, s0, v0, s1, v1 in rows:
        lines.append(f"{name:<{width}}  {f'{v0:.4f} ({s0})':>20}  {f'{v1:.4f} ({s1})':>20}")
    return "\n".join(lines)


class Progress:
    """A tqdm progress bar (steps/s, ETA) or, when disabled, nothing."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str = "train"):
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
