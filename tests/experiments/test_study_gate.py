"""``python -m experiments.studies.gate WORKDIR``: the report and the exit statuses on runs whose
``metrics.jsonl`` is written by the loop's own writer from constructed metric series."""

import os
import subprocess
import sys

import pytest

from experiments.studies import gate
from prefjax.train import evaluation
from prefjax.train import logging as metric_logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = (0, 20, 40, 60, 80, 100, 120)
PROXY = (0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3)
# Peak 0.8 at step 60; more than the default 0.05 below it first at step 100 (0.70).
OVEROPTIMISED = (0.5, 0.6, 0.7, 0.8, 0.76, 0.70, 0.6)
HEALTHY = (0.5, 0.6, 0.7, 0.72, 0.74, 0.78, 0.77)


def _write_run(workdir, gold, kl=(0, 1, 2, 3, 4, 5, 6)):
    """A PPO-like run: train records with rollout entropy and length between eval records."""
    os.makedirs(workdir)
    writer = metric_logging.MetricWriter(str(workdir), tensorboard=False, console=False)
    for i, step in enumerate(STEPS):
        if step:
            writer.write(step, {"loss": 0.5, "rollout/entropy": 2.0 - 0.1 * i})
        metrics = {
            "eval/rollout/score_raw": PROXY[i],
            "eval/gold_reward_sampled": gold[i],
            "eval/kl": kl[i],
            "eval/length/sampled": 6.0 + 0.1 * i,
        }
        writer.write(step, metrics, split="eval")
    writer.close()
    return str(workdir)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.studies.gate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_gate_passes_a_healthy_run_and_flags_an_overoptimised_one(tmp_path, capsys):
    healthy = _write_run(tmp_path / "healthy", HEALTHY)
    assert gate.gate(healthy, evaluation.GateConfig()) == gate.EXIT_PASSED == 0
    out = capsys.readouterr().out
    assert "| overoptimisation | pass |" in out and out.rstrip().endswith("passed")
    # Every check ran: the train records carry the entropy, the eval records the rest.
    assert "n/a" not in out

    bad = _write_run(tmp_path / "bad", OVEROPTIMISED)
    assert gate.gate(bad, evaluation.GateConfig()) == gate.EXIT_FLAGGED == 1
    out = capsys.readouterr().out
    assert "| overoptimisation | FLAG | 60 | 100 |" in out and out.rstrip().endswith("FLAGGED")
    assert "| kl | pass |" in out  # 6 nats is within the default 10


def test_gate_missing_metrics_are_na_unless_asked_to_fail(tmp_path, capsys):
    workdir = tmp_path / "dpo"
    os.makedirs(workdir)
    writer = metric_logging.MetricWriter(str(workdir), tensorboard=False, console=False)
    writer.write(0, {"eval/loss": 0.69, "eval/rewards/margin": 0.0}, split="eval")
    writer.write(10, {"eval/loss": 0.5, "eval/rewards/margin": 0.4}, split="eval")
    writer.close()
    report = evaluation.release_gate(gate.read_run(str(workdir)))
    assert [c.status for c in report.checks] == ["n/a"] * 4
    assert gate.exit_status(report) == 0
    assert gate.exit_status(report, fail_on_missing=True) == 1


def test_gate_refuses_a_directory_without_metrics_naming_the_path(tmp_path):
    (tmp_path / "sweep" / "beta=0.1").mkdir(parents=True)
    (tmp_path / "sweep" / "beta=0.1" / "metrics.jsonl").write_text('{"step": 0, "loss": 1}\n')
    with pytest.raises(gate.GateError, match=r"sweep/metrics\.jsonl: no such file") as err:
        gate.read_run(str(tmp_path / "sweep"))
    assert "beta=0.1/metrics.jsonl" in str(err.value)  # where the runs are


@pytest.mark.slow
def test_gate_command_line_exit_statuses(tmp_path):
    bad = _write_run(tmp_path / "bad", OVEROPTIMISED)
    flagged = _cli(bad)
    assert flagged.returncode == 1, flagged.stderr
    assert "| overoptimisation | FLAG | 60 | 100 |" in flagged.stdout
    # Thresholds from flags: a fall of 0.2 is within --gold_drop=0.25; KL 6 > --kl_budget=5
    # first at step 120.
    kl = _cli(bad, "--gold_drop=0.25", "--kl_budget=5")
    assert kl.returncode == 1
    assert "| overoptimisation | pass |" in kl.stdout and "| kl | FLAG | 120 | 120 |" in kl.stdout
    missing = _cli(str(tmp_path / "nothing"))
    assert missing.returncode == 2
    assert f"{tmp_path / 'nothing' / 'metrics.jsonl'}: no such file" in missing.stderr
