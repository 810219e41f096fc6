"""The sweep launcher end to end: one workdir per member equal to the member's single run.

``python -m experiments.sweep`` on a small version of its default (a shared SFT warm-up, then
two betas) writes every member's usual run directory and the combined plot; each member's
``metrics.jsonl`` equals that of the single DPO run (``prefjax.train.loop`` through
``experiments.pipelines``) of its beta, started from the same warm-up, also when the sweep was
preempted and the launcher resumed it; a sweep whose members change is refused.
"""

import json
import os

import pytest

from experiments import launch as launch_module
from experiments import pipelines
from experiments.configs import sweep as sweep_config
from prefjax.train import sweep
from prefjax.train.workdir import WorkdirError
from tests.experiments.test_launchers import _compilation_cache, launch  # noqa: F401

SMALL = [
    "--config.train.num_steps=4",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.optimizer.warmup_steps=1",
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=16",
    "--config.eval.num_prompts=8",
    "--config.eval.num_samples=8",
    "--config.eval.max_new_tokens=4",
    "--config.checkpoint.every=2",
    "--config.logging.progress=False",
    "--config.logging.tensorboard=False",
    "--config.sft_warmup.num_steps=2",
    "--config.sweep.beta=(0.1, 1.0)",
]


def small_config(**overrides):
    config = sweep_config.get_config()
    for arg in SMALL:
        field, value = arg.removeprefix("--config.").split("=")
        block, name = field.split(".")
        config[block][name] = eval(value)  # noqa: S307 (the literals above)
    for field, value in overrides.items():
        block, name = field.split(".")
        config[block][name] = value
    return config


def records(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(recs):
    """Records without their wall-clock fields."""
    drop = ("time", "steps_per_second")
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def assert_records_close(ours, theirs, tol=1e-5):
    assert [(r["step"], r["split"]) for r in ours] == [(r["step"], r["split"]) for r in theirs]
    for a, b in zip(comparable(ours), comparable(theirs), strict=True):
        assert set(a) == set(b), set(a) ^ set(b)
        for name, value in b.items():
            if isinstance(value, float):
                # length_bias/corr: a cancellation-prone quotient of moments (test_sweep.py).
                t = 1e-3 if name.endswith("length_bias/corr") else tol
                assert a[name] == pytest.approx(value, rel=t, abs=t), (a["step"], name)


@pytest.mark.slow
def test_sweep_launcher_resumes_to_members_equal_single_runs(tmp_path):
    # Preempted after 3 steps (the warm-up done, a checkpoint at step 2 and one at the stop),
    # then resumed by the launcher: the resumed members equal their uninterrupted single runs.
    workdir = str(tmp_path / "sweep")
    config = small_config()
    part = sweep.run(config, workdir, init_params=pipelines.sft_warmup(config), stop_after_steps=3)
    assert part.status == "preempted" and part.step == 3
    assert launch("experiments.sweep", [f"--workdir={workdir}", *SMALL]) is None  # exit 0
    names = sorted(n for n in os.listdir(workdir) if n.startswith("beta="))
    assert names == ["beta=0.1", "beta=1"]
    assert os.path.getsize(os.path.join(workdir, "sweep.png")) > 10_000
    assert "beta=0.1" in open(os.path.join(workdir, "summary.txt")).read()
    assert os.path.isdir(os.path.join(workdir, "sft_warmup"))
    for name in names:
        member = os.path.join(workdir, name)
        assert "4" in os.listdir(os.path.join(member, "checkpoints"))
        assert os.path.getsize(os.path.join(member, "curves.png")) > 10_000
        assert json.load(open(os.path.join(member, "run.json")))["algorithm"] == "dpo"
        assert [r["step"] for r in records(member) if r["split"] == "train"] == [2, 4]

    # The single run of beta=1.0 through the DPO pipeline (its own warm-up, same seed).
    single = sweep.member_config(config, sweep.members(config)[1])
    pipelines.sft_then_dpo(single, str(tmp_path / "single"))
    assert_records_close(records(os.path.join(workdir, "beta=1")), records(tmp_path / "single"))
    # The other member differs (a sweep of identical members would pass the check above).
    other = [r["loss"] for r in records(os.path.join(workdir, "beta=0.1")) if "loss" in r]
    assert other and other != [r["loss"] for r in records(tmp_path / "single") if "loss" in r]

    # Other members in the same directory: refused, naming the field (exit status 2).
    with pytest.raises(launch_module.LaunchError) as e:
        launch("experiments.sweep", [f"--workdir={workdir}", *SMALL, "--config.sweep.beta=(0.3,)"])
    assert e.value.code == launch_module.EXIT_REFUSED
    with pytest.raises(WorkdirError, match=r"config.sweep.beta: \[0.1, 1.0\] -> \[0.2\]"):
        sweep.run(small_config(**{"sweep.beta": (0.2,)}), workdir)
