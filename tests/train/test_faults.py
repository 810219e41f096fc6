"""Crash safety of the training loop: a run SIGKILLed two or three times in a row at seeded points,
then rerun with the same command, ends exactly where an uninterrupted run ends.

Every run is the DPO launcher (``python -m experiments.dpo``) as a child process with a tiny
config (:data:`FLAGS`: 8 steps, a train record every 3 steps so logging windows straddle the
checkpoints of every 2nd step, held-out evaluation every 4), in two variants: ``dpo`` (no warm-up)
and ``warmup`` (a 4-step SFT warm-up stage in ``<workdir>/sft_warmup`` first, so kills land in the
stage, at its end and at the hand-over to DPO). A module-scoped fixture runs each variant once
uninterrupted (the reference); all children share one compilation cache, so only the first one
compiles, and all inherit the test process's environment (``JAX_PLATFORMS=cpu``, 8 simulated
devices), the reference and every trial alike.

A trial (``trial_ids``, seeded by its id with ``numpy.random.default_rng``) kills the run 2-3
times in a row, mixing two kinds of kill:

* **named**: ``PREFJAX_FAULT_INJECTION=<point>:<step>`` (:mod:`prefjax.train.faults`): the point
  is drawn from :data:`~prefjax.train.faults.POINTS`, the step among those the invocation will
  still pass (:func:`pending_events` models the loop's order of events from the committed
  checkpoints), so every named kill must fire;
* **timed**: the parent sends ``SIGKILL`` after a seeded delay in [0, 0.8 x the reference's wall
  time): start-up (imports, devices, ``run.json``), data building, restore, (cached) compilation,
  step-0 evaluation, training, checkpoint writes, the end-of-run report. Where it landed is read
  from the child's last console line (and from the checkpoint directories: an orbax temporary or
  an uncommitted step means a write was in flight). One that comes after the run already
  finished is counted as "after finish", not as a kill.

After each kill the directory must still be resumable (opened in-process on a copy, and the next
invocation must not exit 2); after the final, fault-free invocation (exit 0), the params, every
``metrics.jsonl`` record (ignoring ``time`` and ``steps_per_second``), ``config.json``,
``summary.txt`` and the file lists equal the reference's (for ``warmup`` also those of the
stage). The first trial of each variant starts with a deterministic kill inside ``run.json``'s
atomic replace (between the fsynced ``run.json.tmp`` and ``os.replace``) of the very first claim
of the run (``dpo``) or of its warm-up stage (``warmup``), :data:`REPLACE_KILLS`; its planned
kills then run on the directory that kill left. :func:`test_kill_point_coverage` (last) prints
and checks the totals.

The suite runs 2 of the trials (one per variant; ``PREFJAX_FAULT_TRIALS=8`` runs all 8) to fit
CI's time, with the two ``run.json`` replace kills. Measured with all 8 on 2 shared CPU
cores at load average 5-6 (other jobs running): 8 trials (4 ``dpo``, 4 ``warmup``),
23 kill points: 14 named (step 3, metrics 5, checkpoint 4, committed 2; 6 of them in
the warm-up stage) and 9 timed (4 in start-up, 1 in setup, 3 in DPO training and checkpoints, 1
in warm-up training; none after the finish), 12 of all kills with a checkpoint write in flight;
plus the 2 ``run.json`` replace kills. Wall time 15.5 min (9.2 CPU-min): an invocation costs
15-40 s however few its steps (imports about 7 s, data, orbax's first save in a process about
6 s), the first child compiles (90 s), and a trial is 3-4 invocations, so 8 trials cannot fit
the 4 min once aimed at; ``-k trial0`` runs one trial (and its reference) in about 3 min.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import launch as launcher
from prefjax.train import checkpointing, faults
from prefjax.train import workdir as run_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_STEPS = 8
LOG_EVERY = 3  # not a multiple of CHECKPOINT_EVERY: checkpoints carry a logging window
EVAL_EVERY = 4
CHECKPOINT_EVERY = 2
WARMUP_STEPS = 4  # the "warmup" variant's SFT stage (it checkpoints only at its end)

FLAGS = (
    f"--config.train.num_steps={NUM_STEPS}",
    f"--config.train.log_every={LOG_EVERY}",
    f"--config.train.eval_every={EVAL_EVERY}",
    f"--config.checkpoint.every={CHECKPOINT_EVERY}",
    "--config.checkpoint.keep=10",  # nothing is deleted: every checkpoint stays comparable
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=16",
    "--config.eval.generate=False",
    "--config.optimizer.warmup_steps=1",
    "--config.optimizer.learning_rate=3e-3",  # every step visibly moves the weights
    "--config.logging.progress=False",
    "--config.logging.tensorboard=False",
    "--config.logging.plot=False",
)
VARIANTS = {
    "dpo": ("--config.sft_warmup.num_steps=0",),
    "warmup": (f"--config.sft_warmup.num_steps={WARMUP_STEPS}",),
}
STAGE_DIR = "sft_warmup"
# Directories whose listings must match the reference's, per variant.
LISTED = {
    "dpo": ("", "checkpoints"),
    "warmup": ("", "checkpoints", STAGE_DIR, f"{STAGE_DIR}/checkpoints"),
}
IGNORED_KEYS = {"time", "steps_per_second"}
ORBAX_TMP = ".orbax-checkpoint-tmp"
INCOMPLETE = "checkpoints_incomplete"

CHILD_TIMEOUT_S = 300  # one invocation; a hang fails the test instead of blocking the suite
# Timed kills fall in [0, TIMED_SPAN x the wall time of a rerun of the finished reference): that
# rerun (imports, data, restore, report, no steps) is the fixed cost of an invocation, measured
# with a warm compilation cache (the reference itself is the module's first child and compiles);
# a run from scratch takes about twice as long.
TIMED_SPAN = 1.6
SEED = 20_251_202
# (variant, trial id); the id seeds the trial, so a failure reproduces with -k <id>.
# The suite runs 2 trials (one per variant) to stay inside CI's time; PREFJAX_FAULT_TRIALS=8
# runs the 8 measured in the module docstring.
_NUM_TRIALS = int(os.environ.get("PREFJAX_FAULT_TRIALS", "2"))
TRIALS = [("dpo", i) for i in range(4)][: _NUM_TRIALS // 2] + [("warmup", i) for i in range(4, 8)][
    : _NUM_TRIALS - _NUM_TRIALS // 2
]

# The child dies inside Workdir._write, after run.json.tmp is written and fsynced and before
# os.replace makes it run.json: the one moment the atomic write leaves two names.
KILL_AT_REPLACE = """
import os, runpy, signal, sys
_replace, _seen = os.replace, [0]
def _replace_or_die(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)) == "run.json.tmp":
        _seen[0] += 1
        if _seen[0] == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = _replace_or_die
runpy.run_module("experiments.dpo", run_name="__main__", alter_sys=True)
"""
# variant -> (the trial that starts with it, which run.json write dies, the directory it claims):
# the run's first claim (dpo), the warm-up stage's first claim (warmup: the run claims first).
REPLACE_KILLS = {"dpo": (0, 1, ""), "warmup": (4, 2, STAGE_DIR)}

# Filled by the trials, checked by test_kill_point_coverage (the last test of the module).
TALLY: collections.Counter = collections.Counter()
TRIALS_RUN: list[str] = []


def source_stamps() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every source file the children import from this checkout."""
    out = {}
    for top in ("prefjax", "experiments"):
        for root, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    st = os.stat(path)
                    out[os.path.relpath(path, REPO)] = (st.st_mtime_ns, st.st_size)
    return out


SOURCES = source_stamps()  # at collection: every child must run this code


def assert_code_unchanged() -> None:
    """Runs compared across invocations must all run one version of the code; a checkout edited
    while the module runs would make a mismatch meaningless."""
    now = source_stamps()
    changed = sorted(p for p in set(now) | set(SOURCES) if now.get(p) != SOURCES.get(p))
    assert not changed, f"the code under test changed while this module ran: {changed}"


# -- children ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One compilation cache for every child of this module: only the first compiles."""
    return str(tmp_path_factory.mktemp("xla_cache"))


class Invocation:
    def __init__(self, rc: int, wall_s: float, output: str, how: str):
        self.rc, self.wall_s, self.output, self.how = rc, wall_s, output, how

    def describe(self) -> str:
        tail = "\n    ".join(self.output.splitlines()[-8:])
        return f"{self.how}: exit {self.rc} after {self.wall_s:.1f}s; last output:\n    {tail}"


def launch(
    workdir: str,
    variant: str,
    cache: str,
    log_path: str,
    *,
    fault: str | None = None,
    kill_after: float | None = None,
    code: str | None = None,
    how: str = "",
) -> Invocation:
    """Runs the launcher once: ``fault`` arms the injection hook, ``kill_after`` sends SIGKILL
    after that many seconds (unless the child ended first), ``code`` runs ``python -c code``
    instead of ``-m experiments.dpo`` (with the same flags)."""
    env = dict(os.environ)  # the test process's platform and device flags, for every child
    env.pop(faults.ENV, None)
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    if fault is not None:
        env[faults.ENV] = fault
    entry = ["-c", code] if code is not None else ["-m", "experiments.dpo"]
    cmd = [sys.executable, "-u", *entry, f"--workdir={workdir}", *FLAGS, *VARIANTS[variant]]
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            if kill_after is not None:
                try:
                    proc.wait(timeout=kill_after)  # = time.sleep that ends early if it exits
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
            rc = proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log_path, errors="replace") as f:
        output = f.read()
    return Invocation(rc, time.monotonic() - t0, output, how or "plain rerun")


# -- what a run directory holds ------------------------------------------------------------------
def committed_steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n)
        for n in os.listdir(directory)
        if n.isdigit() and os.path.exists(os.path.join(directory, n, checkpointing.COMMIT_FILE))
    )


def write_traces(workdir: str) -> dict[str, int]:
    """Checkpoint writes in flight: orbax temporaries and step directories without a commit
    (with their mtimes, to tell a new one from one an earlier kill left)."""
    out = {}
    for sub in ("checkpoints", f"{STAGE_DIR}/checkpoints"):
        d = os.path.join(workdir, sub)
        if not os.path.isdir(d):
            continue
        for n in sorted(os.listdir(d)):
            uncommitted = n.isdigit() and not os.path.exists(
                os.path.join(d, n, checkpointing.COMMIT_FILE)
            )
            if ORBAX_TMP in n or uncommitted:
                out[f"{sub}/{n}"] = os.stat(os.path.join(d, n)).st_mtime_ns
    return out


def pending_events(variant: str, workdir: str) -> list[tuple[str, int, str]]:
    """``(point, step, stage)`` of the fault points the next invocation passes, in order, each at
    its first occurrence (where ``PREFJAX_FAULT_INJECTION`` fires), from the committed
    checkpoints: the loop resumes from the newest and redoes what came after it."""
    events = []
    dpo_start = (committed_steps(os.path.join(workdir, "checkpoints")) or [0])[-1]
    warm_done = committed_steps(os.path.join(workdir, STAGE_DIR, "checkpoints"))
    if variant == "warmup" and not dpo_start and not warm_done:
        for s in range(1, WARMUP_STEPS + 1):  # the stage: no evaluation, one final checkpoint
            events.append(("step", s, "warm-up"))
            if s % LOG_EVERY == 0 or s == WARMUP_STEPS:
                events.append(("metrics", s, "warm-up"))
            if s == WARMUP_STEPS:
                events += [("checkpoint", s, "warm-up"), ("committed", s, "warm-up")]
    if dpo_start == 0:
        events.append(("metrics", 0, "dpo"))  # the step-0 evaluation of a fresh run
    for s in range(dpo_start + 1, NUM_STEPS + 1):
        events.append(("step", s, "dpo"))
        if s % LOG_EVERY == 0 or s == NUM_STEPS:
            events.append(("metrics", s, "dpo"))  # train record
        if s % EVAL_EVERY == 0 or s == NUM_STEPS:
            events.append(("metrics", s, "dpo"))  # eval record
        if s % CHECKPOINT_EVERY == 0 or s == NUM_STEPS:
            events += [("checkpoint", s, "dpo"), ("committed", s, "dpo")]
    seen, out = set(), []
    for point, step, stage in events:
        if (point, step) not in seen:
            seen.add((point, step))
            out.append((point, step, stage))
    return out


def landed_in(output: str) -> str:
    """Where a timed kill landed, from the child's last console lines."""
    phase = "start-up (imports, devices, run.json)"
    for line in output.splitlines():
        if line.startswith("SFT warm-up:"):
            phase = "warm-up: start-up"
        elif line.startswith("[sft warm-up] data:"):
            phase = "warm-up: model, restore, compile"
        elif line.startswith("[sft warm-up] "):
            phase = "warm-up: restored or finished"
        elif line.startswith("data:"):
            phase = "setup: restore, compile, step-0 evaluation"
        elif line.startswith(("resumed from step", "this run already finished")):
            phase = "setup: restore, compile, step-0 evaluation"
        elif line.startswith(("[train] step", "[eval] step")):
            phase = (
                "warm-up: training"
                if phase.startswith("warm-up")
                else "training, evaluation, checkpoints"
            )
        elif line.startswith("metric "):
            phase = "end-of-run report"
    return phase


def resumed_from(output: str) -> int:
    m = re.search(r"^(?:resumed from step|this run already finished at step) (\d+)", output, re.M)
    return int(m.group(1)) if m else 0


def listing(workdir: str, variant: str) -> dict[str, list[str]]:
    out = {}
    for sub in LISTED[variant]:
        d = os.path.join(workdir, sub)
        out[sub] = sorted(os.listdir(d)) if os.path.isdir(d) else None
    return out


def read_jsonl(path: str) -> list[dict]:
    """Strict: every line a whole record (a cut-short line left over is a failure here)."""
    with open(path) as f:
        text = f.read()
    assert not text or text.endswith("\n"), f"{path}: the last line is cut short"
    return [json.loads(line) for line in text.splitlines()]


def stage_dirs(variant: str) -> list[str]:
    return ["", STAGE_DIR] if variant == "warmup" else [""]


# -- the references -----------------------------------------------------------------------------
class Reference:
    def __init__(self, variant: str, workdir: str, rerun: Invocation):
        self.variant, self.workdir, self.rerun_s = variant, workdir, rerun.wall_s
        self.listing = listing(workdir, variant)
        self.metrics, self.params, self.text, self.record = {}, {}, {}, {}
        for sub in stage_dirs(variant):
            d = os.path.join(workdir, sub)
            self.metrics[sub] = read_jsonl(os.path.join(d, "metrics.jsonl"))
            self.params[sub] = checkpointing.restore_params(d)
            with open(os.path.join(d, run_dir.RUN_FILE)) as f:
                self.record[sub] = json.load(f)
            for name in ("config.json", "summary.txt"):
                if os.path.exists(os.path.join(d, name)):
                    with open(os.path.join(d, name)) as f:
                        self.text[(sub, name)] = f.read()


@pytest.fixture(scope="module")
def references(tmp_path_factory, xla_cache):
    """``references(variant)``: the uninterrupted run of that variant (run once, on demand)."""
    made: dict[str, Reference] = {}

    def get(variant: str) -> Reference:
        if variant not in made:
            root = tmp_path_factory.mktemp(f"reference_{variant}")
            workdir = str(root / "run")
            inv = launch(workdir, variant, xla_cache, str(root / "log.txt"), how="reference")
            assert inv.rc == 0, inv.describe()
            assert committed_steps(os.path.join(workdir, "checkpoints"))[-1] == NUM_STEPS
            records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            # Rerunning a finished run trains nothing and changes no record (and times the fixed
            # cost of an invocation, which the timed kills are scaled by).
            rerun = launch(workdir, variant, xla_cache, str(root / "rerun.txt"), how="rerun")
            assert rerun.rc == 0 and "already finished" in rerun.output, rerun.describe()
            assert read_jsonl(os.path.join(workdir, "metrics.jsonl")) == records
            made[variant] = Reference(variant, workdir, rerun)
            print(
                f"\nreference {variant}: {inv.wall_s:.1f}s, rerun when finished: "
                f"{rerun.wall_s:.1f}s",
                flush=True,
            )
        return made[variant]

    return get


# -- checks --------------------------------------------------------------------------------------
def assert_resumable(workdir: str, ref: Reference, context: str) -> None:
    """The directory a killed invocation left is not refused: :meth:`Workdir.open` (what every
    invocation does first) accepts it, run and stage alike. Opened on a copy, so the trial's own
    directory is not touched."""
    if not os.path.exists(workdir):
        return  # killed before it made the directory: the next invocation makes it
    probe = workdir + ".probe"
    shutil.rmtree(probe, ignore_errors=True)
    shutil.copytree(workdir, probe, symlinks=True)
    try:
        for sub in stage_dirs(ref.variant):
            path = os.path.join(probe, sub)
            if sub and not os.path.exists(path):
                continue
            config = ref.record[sub]["config"]
            wd = run_dir.Workdir(path, config["algorithm"]["name"], config)
            try:
                wd.open()
            except run_dir.WorkdirError as err:
                left = sorted(os.listdir(os.path.join(workdir, sub)))
                pytest.fail(
                    f"{context}: the killed run left {os.path.join(workdir, sub)} (holding "
                    f"{left}) refused by Workdir.open: {err}"
                )
            finally:
                wd.release()
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def assert_same_records(got: list[dict], want: list[dict], where: str) -> None:
    keys = [(r["step"], r["split"]) for r in got]
    dupes = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
    assert not dupes, f"{where}: (step, split) recorded more than once: {dupes}"
    assert keys == [(r["step"], r["split"]) for r in want], f"{where}: other records"
    for g, w in zip(got, want, strict=True):
        at = f"{where}, step {w['step']} {w['split']}"
        assert set(g) - IGNORED_KEYS == set(w) - IGNORED_KEYS, f"{at}: other metric names"
        for name in sorted(set(w) - IGNORED_KEYS - {"step", "split"}):
            if w[name] is None or g[name] is None:  # non-finite, written as null
                assert g[name] is w[name], f"{at}, {name}: {g[name]} vs {w[name]}"
            else:
                np.testing.assert_allclose(
                    g[name], w[name], rtol=0, atol=1e-6, err_msg=f"{at}, {name}"
                )


def assert_same_params(got, want, where: str) -> None:
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def, f"{where}: other params structure"
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(w),
            rtol=0,
            atol=1e-6,
            err_msg=f"{where}: {jax.tree_util.keystr(path)}",
        )


def assert_matches_reference(
    workdir: str,
    ref: Reference,
    *,
    write_in_flight: bool,
    invocations: int,
    last: Invocation,
    story: str,
) -> None:
    """The final state of a killed-and-resumed run equals the uninterrupted run's."""
    assert_code_unchanged()
    assert committed_steps(os.path.join(workdir, "checkpoints"))[-1:] == [NUM_STEPS], story
    got = listing(workdir, ref.variant)
    for sub, names in ref.listing.items():
        have = got[sub] or []
        missing = sorted(n for n in set(names) - set(have) if ORBAX_TMP not in n)
        assert not missing, f"{story}\n{sub or '.'}: lost {missing} (has {have})"
        extra = sorted(set(have) - set(names))
        if INCOMPLETE in extra:
            assert write_in_flight, (
                f"{story}\n{sub or '.'}: {INCOMPLETE} appeared although no kill landed during a "
                "checkpoint write"
            )
            extra.remove(INCOMPLETE)
        assert not extra, f"{story}\n{sub or '.'}: files the reference does not have: {extra}"
    for sub in stage_dirs(ref.variant):
        d = os.path.join(workdir, sub)
        where = f"{story}\n{os.path.join(sub, 'metrics.jsonl') if sub else 'metrics.jsonl'}"
        assert_same_records(read_jsonl(os.path.join(d, "metrics.jsonl")), ref.metrics[sub], where)
        assert_same_params(
            checkpointing.restore_params(d), ref.params[sub], f"{story}\nparams {sub}"
        )
        for (s, name), text in ref.text.items():
            if s == sub:
                with open(os.path.join(d, name)) as f:
                    assert f.read() == text, f"{story}\n{os.path.join(sub, name)} differs"
        with open(os.path.join(d, run_dir.RUN_FILE)) as f:
            record = json.load(f)
        assert record["config"] == ref.record[sub]["config"], story
        assert record["data_fingerprint"] == ref.record[sub]["data_fingerprint"], story
        # One entry per invocation that got past start-up: at least the final one, never more
        # than were started.
        assert 1 <= len(record["invocations"]) <= invocations, f"{story}\n{record['invocations']}"
    with open(os.path.join(workdir, run_dir.RUN_FILE)) as f:
        last_entry = json.load(f)["invocations"][-1]
    assert last_entry["resumed_from_step"] == resumed_from(last.output), story


def finish(workdir, variant, cache, logs, history) -> Invocation:
    """Reruns the same command without faults until it exits 0 (never refused, never failed)."""
    for _ in range(3):
        inv = launch(workdir, variant, cache, f"{logs}/{len(history)}.txt")
        history.append(inv)
        assert inv.rc in (0, launcher.EXIT_PREEMPTED), "\n".join(h.describe() for h in history)
        if inv.rc == 0:
            return inv
    pytest.fail("no fault-free rerun finished:\n" + "\n".join(h.describe() for h in history))


# -- the trials ----------------------------------------------------------------------------------
def plan(trial: int) -> tuple[list[str], np.ndarray]:
    """The trial's kinds of kill in order (both kinds in every trial) and one uniform draw each:
    the step (named) or the delay (timed)."""
    rng = np.random.default_rng([SEED, trial])
    n = 3 if rng.random() < 0.8 else 2
    kinds = ["named", "timed"] + [str(rng.choice(["named", "timed"]))] * (n - 2)
    return [str(k) for k in rng.permutation(kinds)], rng.random(n)


def choose_named(variant: str, workdir: str, k: int, u: float) -> tuple[str, int, str]:
    """Kill i of trial t is named by the point ``POINTS[(t + i) % 4]`` (or the next one
    the run still passes), so every point is covered; its step is drawn among those pending."""
    events = pending_events(variant, workdir)
    for i in range(len(faults.POINTS)):
        point = faults.POINTS[(k + i) % len(faults.POINTS)]
        steps = [e for e in events if e[0] == point]
        if steps:
            return steps[int(u * len(steps))]
    raise AssertionError(f"no fault point left to reach in {workdir}")


@pytest.mark.slow
@pytest.mark.parametrize("variant, trial", TRIALS, ids=[f"{v}-trial{t}" for v, t in TRIALS])
def test_killed_runs_resume_to_the_uninterrupted_result(
    variant, trial, references, xla_cache, tmp_path
):
    ref = references(variant)
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    kinds, draws = plan(trial)
    history: list[Invocation] = []
    story_lines = [f"trial {trial} ({variant}), kills planned: {kinds}"]
    write_in_flight = False
    counts = collections.Counter()

    def story() -> str:
        return "\n".join(story_lines + [h.describe() for h in history[-2:]])

    if REPLACE_KILLS[variant][0] == trial:
        _, nth, claimed = REPLACE_KILLS[variant]
        where = claimed or "the run"
        how = f"kill 0: SIGKILL inside os.replace of run.json write #{nth} (claim of {where})"
        code = KILL_AT_REPLACE.format(nth=nth)
        inv = launch(workdir, variant, xla_cache, f"{logs}/replace.txt", code=code, how=how)
        history.append(inv)
        story_lines.append(how)
        assert inv.rc == -signal.SIGKILL, story()
        left = sorted(os.listdir(os.path.join(workdir, claimed)))
        assert "run.json.tmp" in left and "run.json" not in left, f"{left}\n{story()}"  # hit it
        counts["run.json atomic replace"] += 1
        # The next invocations must not be refused (exit 2): a named kill must fire, a timed one
        # must end by the kill, the final rerun must finish.
        assert_resumable(workdir, ref, story())

    for i, kind in enumerate(kinds):
        traces_before = write_traces(workdir)
        if kind == "named":
            if not pending_events(variant, workdir):
                break  # a timed kill came after the finish: nothing left to kill at
            point, step, stage = choose_named(variant, workdir, trial + i, draws[i])
            how = f"kill {i + 1}: {faults.ENV}={point}:{step} ({stage})"
            inv = launch(
                workdir, variant, xla_cache, f"{logs}/{i}.txt", fault=f"{point}:{step}", how=how
            )
            history.append(inv)
            story_lines.append(how)
            assert inv.rc == -signal.SIGKILL, f"the named fault did not fire:\n{story()}"
            counts[f"named {point}"] += 1
            write_in_flight |= point == "checkpoint"
        else:
            # Stratified: kill i of trial t falls in quarter (t + i) % 4 of the span.
            delay = float(((trial + i) % 4 + draws[i]) / 4 * TIMED_SPAN * ref.rerun_s)
            how = f"kill {i + 1}: SIGKILL after {delay:.2f}s"
            inv = launch(workdir, variant, xla_cache, f"{logs}/{i}.txt", kill_after=delay, how=how)
            history.append(inv)
            if inv.rc == 0:
                story_lines.append(how + ": came after the run finished")
                counts["timed after finish"] += 1
                continue
            assert inv.rc == -signal.SIGKILL, f"not ended by the kill:\n{story()}"
            phase = landed_in(inv.output)
            counts[f"timed {phase}"] += 1
            story_lines.append(f"{how}: landed in {phase}")
        traces = sorted(t for t, m in write_traces(workdir).items() if traces_before.get(t) != m)
        if traces:
            counts["kills during a checkpoint write"] += 1
            story_lines.append(f"  checkpoint write in flight: {traces}")
            write_in_flight = True
        assert_resumable(workdir, ref, story())
    last = finish(workdir, variant, xla_cache, logs, history)
    story_lines.append(f"final rerun exit 0 after {last.wall_s:.1f}s")
    TRIALS_RUN.append(f"{variant}-trial{trial}")
    TALLY.update(counts)
    TALLY["trials"] += 1
    print("\n" + "\n".join(story_lines), flush=True)
    assert_matches_reference(
        workdir,
        ref,
        write_in_flight=write_in_flight,
        invocations=len(history),
        last=last,
        story=story(),
    )


@pytest.mark.slow  # it reads the trials' tallies, so it runs where they run
def test_kill_point_coverage():
    """The totals over the trials (printed with -s); meaningful only when all of them ran."""
    lines = [f"trials: {TALLY['trials']} ({', '.join(TRIALS_RUN)})"]
    lines += [f"  {name}: {n}" for name, n in sorted(TALLY.items()) if name != "trials"]
    named = sum(n for k, n in TALLY.items() if k.startswith("named "))
    timed = sum(n for k, n in TALLY.items() if k.startswith("timed ") and k != "timed after finish")
    lines.append(f"kill points: {named} named + {timed} timed = {named + timed}")
    summary = "\n".join(lines)
    print("\n" + summary, flush=True)
    # Every trial of the module ran in this process (the suite keeps a file on one worker:
    # --dist loadfile); -k selections check what they ran.
    assert TALLY["trials"] == len(TRIALS_RUN) >= 1, summary
    assert named + timed >= 2 * len(TRIALS_RUN), summary  # each trial kills at least twice
    # The trials of REPLACE_KILLS that ran each killed inside run.json's replace once.
    starts = {f"{v}-trial{t}" for v, (t, _, _) in REPLACE_KILLS.items()}
    assert TALLY["run.json atomic replace"] == len(starts & set(TRIALS_RUN)), summary
    if len(TRIALS_RUN) == len(TRIALS) >= 4:
        assert named >= 4 and timed >= 2, summary
    if len(TRIALS_RUN) == len(TRIALS) >= 2:
        assert named >= 1 and timed + named >= 4, summary
