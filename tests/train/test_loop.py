"""The training loop: exact resumption, SIGTERM, damaged checkpoints, non-finite steps.

Every run here is the tiny DPO config on the built-in sequence task with a handful of steps. The
runs share compiled executables through a persistent compilation cache (same shapes, same HLO),
so only the first run pays for compilation.
"""

import dataclasses
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from experiments.configs import dpo as dpo_config
from prefjax.train import dpo, loop
from prefjax.train import setup as train_setup

NUM_STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)


def tiny_config(**changes):
    config = dpo_config.get_config()
    config.sft_warmup.num_steps = 0
    config.data.num_train = 64
    config.data.num_eval = 16
    config.data.batch_size = 8
    config.data.eval_batch_size = 16
    config.optimizer.warmup_steps = 1
    config.optimizer.learning_rate = 3e-3  # large enough that every step visibly moves weights
    config.train.num_steps = NUM_STEPS
    config.train.log_every = 2
    config.train.eval_every = 0
    config.eval.generate = False
    config.checkpoint.every = 0
    config.logging.progress = False
    config.logging.tensorboard = False
    config.logging.plot = False
    for field, value in changes.items():
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def assert_trees_close(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = loop.run(tiny_config(), workdir, dpo)
    assert result.status == "finished" and result.step == NUM_STEPS
    return host(result.state.params), workdir


def test_uninterrupted_run_writes_metrics_and_final_checkpoint(uninterrupted):
    _, workdir = uninterrupted
    recs = records(workdir)
    train_steps = [r["step"] for r in recs if r["split"] == "train"]
    assert train_steps == [2, 4, 6]
    final_eval = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in final_eval] == [NUM_STEPS]
    assert 0.0 <= final_eval[0]["eval/rewards/accuracy"] <= 1.0
    assert os.path.exists(
        os.path.join(workdir, "checkpoints", str(NUM_STEPS), "commit_success.txt")
    )
    assert os.path.exists(os.path.join(workdir, "summary.txt"))


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    params, _ = uninterrupted
    workdir = str(tmp_path)
    first = loop.run(tiny_config(), workdir, dpo, stop_after_steps=2)
    assert first.status == "preempted" and first.step == 2
    # The parameters did move: the comparison below is not trivially true.
    assert not np.allclose(
        host(first.state.params)["embed"]["embedding"], params["embed"]["embedding"]
    )
    second = loop.run(tiny_config(), workdir, dpo, stop_after_steps=3)
    assert second.status == "preempted" and second.step == 5
    third = loop.run(tiny_config(), workdir, dpo)
    assert third.status == "finished" and third.step == NUM_STEPS
    assert_trees_close(host(third.state.params), params)
    # metrics.jsonl is continuous: one train record per logging step, no duplicates.
    assert [r["step"] for r in records(workdir) if r["split"] == "train"] == [2, 4, 6]


def test_sigterm_writes_a_checkpoint_that_resumes(uninterrupted, tmp_path):
    params, _ = uninterrupted
    workdir = str(tmp_path)

    def send_sigterm(step, state, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    result = loop.run(tiny_config(), workdir, dpo, step_hook=send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored after the run
    assert result.status == "preempted" and result.step == 3
    meta = os.path.join(workdir, "checkpoints", "3", "meta", "metadata")
    assert "SIGTERM" in open(meta).read()
    resumed = loop.run(tiny_config(), workdir, dpo)
    assert resumed.step == NUM_STEPS
    assert_trees_close(host(resumed.state.params), params)


def test_half_written_newest_checkpoint_is_ignored(uninterrupted, tmp_path):
    params, _ = uninterrupted
    workdir = str(tmp_path)
    loop.run(tiny_config(), workdir, dpo, stop_after_steps=2)
    ckpts = os.path.join(workdir, "checkpoints")
    # Step 4: a copy of step 2 whose write never committed (no commit marker).
    shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, "4"))
    os.remove(os.path.join(ckpts, "4", "commit_success.txt"))
    # Step 5: committed but with its array data missing (a damaged file system).
    shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, "5"))
    shutil.rmtree(os.path.join(ckpts, "5", "state", "d"))
    # An orbax temporary directory left by a killed write.
    os.makedirs(os.path.join(ckpts, "5.orbax-checkpoint-tmp-1234", "state"))
    result = loop.run(tiny_config(), workdir, dpo)
    assert result.step == NUM_STEPS
    assert_trees_close(host(result.state.params), params)  # resumed from step 2, not 4 or 5
    set_aside = sorted(os.listdir(ckpts + "_incomplete"))
    assert [name.split("-")[0] for name in set_aside] == ["4", "5"]


class PoisonedDPO:
    """``prefjax.train.dpo`` whose step ``bad_step`` sees a NaN reference (a non-finite loss)."""

    def __init__(self, bad_step):
        self.bad_step = bad_step
        self.params_around_bad_step = None

    def __getattr__(self, name):  # the rest of the Algorithm protocol is dpo's
        return getattr(dpo, name)

    def setup(self, config, model, mesh, key):
        setup = train_setup.build_setup(config, model, mesh, key, dpo)
        step = setup.train_step

        def train_step(state, batch, frozen, key):
            if int(state.step) + 1 != self.bad_step:
                return step(state, batch, frozen, key)
            before = host(state.params)
            nan_frozen = jax.tree.map(lambda x: x * np.nan, frozen)
            state, metrics = step(state, batch, nan_frozen, key)
            self.params_around_bad_step = (before, host(state.params))
            return state, metrics

        return dataclasses.replace(setup, train_step=train_step)


@pytest.mark.parametrize("hook", [True, False], ids=["fetched-every-step", "fetched-when-logged"])
def test_nonfinite_skip_counts_and_keeps_weights(tmp_path, hook):
    # Without a step hook the loop leaves metrics on the device until a logging step; the skip
    # must be counted the same either way.
    algorithm = PoisonedDPO(bad_step=3)
    seen = {}
    result = loop.run(
        tiny_config(),
        str(tmp_path),
        algorithm,
        step_hook=(lambda step, state, m: seen.setdefault(step, m["train/skipped"]))
        if hook
        else None,
    )
    assert result.status == "finished" and result.step == NUM_STEPS
    if hook:
        assert seen == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0}
    before, after = algorithm.params_around_bad_step
    assert_trees_close(after, before, atol=0.0)  # the bad batch changed nothing
    train = [r for r in records(str(tmp_path)) if r["split"] == "train"]
    assert [r["train/skipped_total"] for r in train] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(r["loss"]) for r in train)  # averages leave the skipped step out


def test_nonfinite_stop_names_step_and_metric_after_checkpointing(tmp_path):
    algorithm = PoisonedDPO(bad_step=3)
    config = tiny_config(**{"train.nonfinite": "stop"})
    with pytest.raises(loop.NonFiniteError, match=r"step 3: non-finite loss=nan"):
        loop.run(config, str(tmp_path), algorithm)
    before, after = algorithm.params_around_bad_step
    assert_trees_close(after, before, atol=0.0)
    ckpt = os.path.join(str(tmp_path), "checkpoints", "3")
    assert os.path.exists(os.path.join(ckpt, "commit_success.txt"))
    assert "nonfinite" in open(os.path.join(ckpt, "meta", "metadata")).read()


def test_a_second_run_reuses_the_cached_reference_logps(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    changes = {
        "algorithm.reference": "precomputed",
        "algorithm.reference_cache_dir": cache,
        "train.num_steps": 1,
        "train.eval_every": 1,
    }
    first = loop.run(tiny_config(**changes), str(tmp_path / "a"), dpo)
    assert "reference log-probs (train cached, eval cached)" in capsys.readouterr().out
    # Another run (another beta: the reference log-probs do not depend on it) loads them.
    second = loop.run(tiny_config(**changes, **{"algorithm.beta": 0.2}), str(tmp_path / "b"), dpo)
    assert "reference log-probs (train reused, eval reused)" in capsys.readouterr().out
    assert first.step == second.step == 1
    evals = lambda d: [r for r in records(str(tmp_path / d)) if r["split"] == "eval"]  # noqa: E731
    # At step 0 the policy is the reference in both runs: identical log-probs, margins 0.
    assert evals("a")[0]["step"] == evals("b")[0]["step"] == 0
    assert evals("a")[0]["eval/logps/chosen"] == evals("b")[0]["eval/logps/chosen"]
    assert abs(evals("b")[0]["eval/rewards/margin"]) < 1e-5  # float32 rounding of the two passes
    assert evals("b")[0]["eval/rewards/accuracy"] == 0.5


class StoppingDPO:
    """``prefjax.train.dpo`` with a stop condition (``Setup.should_stop``) that fires on its
    ``stop_at``-th call, recording what it was asked with."""

    def __init__(self, stop_at):
        self.stop_at = stop_at
        self.seen = []

    def __getattr__(self, name):  # the rest of the Algorithm protocol is dpo's
        return getattr(dpo, name)

    def setup(self, config, model, mesh, key):
        setup = train_setup.build_setup(config, model, mesh, key, dpo)

        def should_stop(metrics):
            self.seen.append(metrics["loss"])
            return "the loss limit was reached" if len(self.seen) == self.stop_at else None

        return dataclasses.replace(setup, should_stop=should_stop)


def test_should_stop_ends_the_run_and_a_rerun_trains_nothing(tmp_path, capsys):
    workdir = str(tmp_path)
    algorithm = StoppingDPO(stop_at=3)
    result = loop.run(tiny_config(), workdir, algorithm)
    assert result.status == "stopped" and result.step == 3
    assert result.stop_reason == "the loss limit was reached"
    # Asked at every step with host floats, although metrics are logged every 2 steps.
    assert len(algorithm.seen) == 3 and all(isinstance(v, float) for v in algorithm.seen)
    recs = records(workdir)
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 3]  # the stop step's record (step 3 alone)
    assert train[-1]["loss"] == pytest.approx(algorithm.seen[2], rel=1e-6)
    assert train[-1]["run/stopped"] == 1.0 and "run/stopped" not in train[0]
    assert [r["step"] for r in recs if r["split"] == "eval"] == [3]  # the final evaluation
    meta = json.load(open(os.path.join(workdir, "checkpoints", "3", "meta", "metadata")))
    assert meta["stop_reason"] == "the loss limit was reached"
    out = capsys.readouterr().out
    assert "stopped at step 3: the loss limit was reached; checkpoint written" in out

    # The same command: the run has ended. Nothing is trained, written over or removed.
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    rerun = StoppingDPO(stop_at=100)
    again = loop.run(tiny_config(), workdir, rerun)
    assert again.status == "stopped" and again.step == 3 and rerun.seen == []
    assert again.stop_reason == result.stop_reason
    assert "this run stopped at step 3: the loss limit was reached" in capsys.readouterr().out
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]

    # A result-changing change accepted with resume_with_changes continues the run.
    changed = tiny_config(**{"seed": 1, "train.resume_with_changes": True})
    resumed = loop.run(changed, workdir, StoppingDPO(stop_at=100))
    assert resumed.status == "finished" and resumed.step == NUM_STEPS
    assert [r["step"] for r in records(workdir) if r["split"] == "train"] == [2, 3, 4, 6]
