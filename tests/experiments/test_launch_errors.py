"""What a launcher prints and returns when the input is wrong or the job is preempted: one line,
a documented exit status, and no directory left behind. A taken directory (refused, exit 2) and
a finished run's rerun (exit 0): on the DPO run of ``tests/experiments/test_launchers.py``."""

import os
import signal
import subprocess
import sys

import pytest

from experiments import launch as launch_module
from prefjax.data import DataError
from tests.experiments.test_launchers import SMALL, _compilation_cache, launch  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bad_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e"}\n'
    )
    return path


def test_data_error_is_one_line_exit_2_and_leaves_no_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = [f"--workdir={workdir}", *SMALL, "--config.data.task=files"]
    argv += [f"--config.data.train_files={_bad_file(tmp_path)}"]
    with pytest.raises(launch_module.LaunchError) as err:
        launch("experiments.dpo", argv)
    assert err.value.code == launch_module.EXIT_REFUSED == 2
    message = err.value.message
    assert "\n" not in message and message.startswith("error: ")
    assert "prefs.jsonl:2: field 'rejected'" in message and "--debug" in message
    assert message in capsys.readouterr().err  # printed, not only raised
    assert not workdir.exists()  # the run failed before its first step: nothing left
    # --debug lets the original exception (and its traceback) through.
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: field 'rejected'"):
        launch("experiments.dpo", [*argv, "--debug"])


@pytest.mark.slow
def test_preempted_run_exits_75_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "experiments.dpo", f"--workdir={workdir}", *SMALL]
    cmd += ["--config.sft_warmup.num_steps=0", "--config.train.num_steps=400"]
    cmd += ["--config.train.eval_every=0", "--config.checkpoint.every=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in proc.stdout:  # wait until it trains, then preempt it as a scheduler would
        output.append(line)
        if line.startswith("[train] step"):
            proc.send_signal(signal.SIGTERM)
            break
    output.extend(proc.stdout)
    assert proc.wait(timeout=300) == launch_module.EXIT_PREEMPTED == 75, "".join(output)
    assert "Run the same command to resume" in "".join(output)
    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 400
