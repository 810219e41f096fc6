"""The training loop every algorithm shares: build, resume, train, evaluate, checkpoint, report.

``prefjax.train.<algo>.run(config, workdir)`` calls :func:`run` with its own module, which fills
the ``Algorithm`` protocol of :mod:`prefjax.train` (its objective, batch kind, reference kind,
validation); reference log-probs for a ``"precomputed"`` reference come from
:mod:`prefjax.train.reference`. In order, :func:`run`

1. validates the config (naming the bad field) and opens the workdir (:mod:`prefjax.train.workdir`:
   refuses a directory of another run, algorithm or config, claims a new one, takes its lock);
2. builds the mesh, the model (preset or local HF folder; LoRA), and the initial policy params --
   from ``model.init_from`` (another run's checkpoint) or from an SFT warm-up stage run by this
   same loop in ``<workdir>/sft_warmup`` when ``config.sft_warmup.num_steps > 0``;
3. builds the train/eval datasets (:mod:`prefjax.train.inputs`), checks their fingerprint against
   the recorded run's, adds precomputed reference log-probs when asked, and builds the sharded
   state and jitted steps (:func:`prefjax.train.setup.build_setup`, or the algorithm's own
   ``setup`` when it has one);
4. resumes from the newest complete checkpoint in ``<workdir>/checkpoints`` (train state *and*
   data-iterator position), or evaluates the initial policy at step 0 on a fresh run;
5. trains ``train.num_steps`` steps with a progress bar, console/JSONL/TensorBoard metrics every
   ``train.log_every`` steps, held-out evaluation every ``train.eval_every`` steps, periodic
   checkpoints, non-finite handling (``skip`` counts, ``stop`` checkpoints and raises
   :class:`NonFiniteError`), a checkpoint-then-exit on SIGTERM/SIGINT (preemption), and the
   algorithm's own stop condition (``Setup.should_stop``, "Stopping early" below);
6. at the end writes the final checkpoint, ``curves.png``, ``summary.txt`` and, when
   ``export.hf``, the trained policy (LoRA merged) as a Hugging Face folder.

Step ``s`` in every record means "after ``s`` optimiser steps"; a resumed run continues the same
``metrics.jsonl`` (records written after the checkpoint it resumes from are dropped first, and the
logging window in progress at the checkpoint is restored with it, so every record equals an
uninterrupted run's). A run that fails before its first step removes the workdir it created.

Stopping early (``Setup.should_stop``)
--------------------------------------
An algorithm may end a run on its own metrics: ``setup.should_stop(host_metrics)`` is asked
after every step with that step's metrics (fetched every step when it is set, and only then),
and a reason string ends the run *at that step*: its logging record is written (``run/stopped``
= 1), the held-out evaluation runs, a checkpoint is written with the reason in its metadata
(``stop_reason``), ``run.json`` records the invocation's end (``ended``), ``curves.png`` and
``summary.txt`` are written, and the result's status is ``"stopped"``. Such a run has ended: the
same command on that workdir resumes the stop checkpoint, prints the reason and trains nothing
(status ``"stopped"``, nothing written or removed). It continues only under a result-changing
config change accepted with ``train.resume_with_changes=true`` (e.g. a raised budget); a new
``--workdir`` starts a separate run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from prefjax import models, sharding
from prefjax.train import checkpointing, evaluation, faults, inputs, reference
from prefjax.train import config as train_config
from prefjax.train import logging as metric_logging
from prefjax.train import setup as train_setup
from prefjax.train import workdir as run_dir


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss or gradient (``train.nonfinite="stop"``)."""


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final (or last checkpointed) ``TrainState``.
      step: optimiser steps taken.
      status: ``"finished"`` | ``"preempted"`` (SIGTERM/SIGINT or ``stop_after_steps``) |
        ``"stopped"`` (the algorithm's ``Setup.should_stop`` ended the run; ``stop_reason``).
      eval_metrics: the last held-out evaluation (``eval/...`` names), ``{}`` if none.
      workdir: the absolute run directory.
      setup: the algorithm's ``Setup`` (model, frozen pytree, jitted steps).
      stop_reason: why the run stopped (status ``"stopped"``), else ``""``.
    """

    state: Any
    step: int
    status: str
    eval_metrics: dict
    workdir: str
    setup: Any
    stop_reason: str = ""


class StopRequest:
    """Set by SIGTERM / SIGINT; the loop checkpoints and exits at the next step boundary.

    ``with stop.installed():`` handles both signals on the main thread (elsewhere: nothing);
    ``stop.signal_name`` is then the first one received, or ``None``.
    """

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = name
        print(f"\n{name} received: writing a checkpoint, then stopping.", flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be handled on the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def mean_records(records: list[Mapping[str, float]]) -> dict[str, float]:
    """One logging window's record: the mean of each metric over the window's steps (host
    floats), skipped steps left out of the means and summed into ``train/skipped``."""
    kept = [r for r in records if not r.get("train/skipped", 0.0)]
    out: dict[str, float] = {}
    for name in kept[0] if kept else ():
        if name == "train/skipped":
            continue
        out[name] = float(np.mean([r[name] for r in kept if name in r]))
    out["train/skipped"] = float(sum(r.get("train/skipped", 0.0) for r in records))
    return out


def _nonfinite_names(metrics: Mapping[str, float]) -> list[str]:
    bad = [k for k, v in metrics.items() if k != "train/skipped" and not math.isfinite(float(v))]
    # The objective and the gradient first: they are what decides the skip.
    return sorted(bad, key=lambda k: (k != "loss", k != "grad_norm", k))


def evaluate(setup, params, eval_data: inputs.EvalData, config) -> dict[str, float]:
    """Held-out metrics of ``params``: the eval step averaged exactly over the eval split, plus
    the generation / closed-form metrics of the built-in tasks (``eval/`` names)."""
    sums: dict[str, Any] = {}
    for i, batch in enumerate(eval_data.batches()):
        if config.eval.num_batches and i >= config.eval.num_batches:
            break
        out = setup.eval_step(params, setup.shard_batch(batch), setup.frozen)
        sums = evaluation.merge_metric_sums(sums, out)
    # The objective's own finalisation, as in the train step (means and derived metrics).
    final = setup.objective.finalize(sums)
    metrics = {f"eval/{k}": float(v) for k, v in sorted(final.items())}
    metrics.update(inputs.task_metrics(setup, params, eval_data, config))
    return metrics


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a pipeline's ``init_params`` hook is given (see :func:`run`): the run's model and
    tokenizer (shared by the stages, with their compiled code) and its open workdir."""

    model: Any
    tokenizer: Any
    workdir: run_dir.Workdir


class StagePreempted(Exception):
    """A stage run by :func:`run_stage` was preempted; the enclosing run stops as preempted."""

    def __init__(self, result: RunResult):
        super().__init__("preempted during a stage")
        self.result = result


def run_stage(config, workdir: str, algorithm, *, parent: Stage, name: str) -> RunResult:
    """Runs ``algorithm`` as a stage inside an enclosing run (e.g. the SFT warm-up before DPO,
    composed in ``experiments/pipelines.py``): same model and compiled code, its own workdir
    (normally under the parent's) with its own identity, no end-of-run report. Raises
    :class:`StagePreempted` unless the stage finished."""
    result = run(
        config,
        workdir,
        algorithm,
        _stage=name,
        _model=(parent.model, parent.tokenizer),
        _parent=parent.workdir,
    )
    if result.status != "finished":
        raise StagePreempted(result)
    return result


def initial_params(config, model, tokenizer, wd, init_params):
    """Policy params before training: the ``model.init_from`` checkpoint's (host arrays), those
    of a pipeline's ``init_params(Stage(model, tokenizer, wd))`` hook, or ``None`` (the model's
    own)."""
    if config.model.init_from:
        params = checkpointing.restore_params(config.model.init_from)
        expected = jax.tree.structure(model.params)
        if jax.tree.structure(params) != expected:
            raise ValueError(
                f"config.model.init_from={config.model.init_from!r}: its params do not match "
                f"the model built from config.model (was it a LoRA or reward-model run?)"
            )
        return params
    if init_params is not None:
        return init_params(Stage(model, tokenizer, wd))
    return None


def run(
    config,
    workdir: str,
    algorithm,
    *,
    stop_after_steps: int | None = None,
    step_hook: Callable[[int, Any, dict], None] | None = None,
    init_params: Callable[[Stage], Any] | None = None,
    _stage: str = "",
    _model=None,
    _parent=None,
) -> RunResult:
    """Trains ``algorithm`` as ``config`` says, in ``workdir``; see the module docstring.

    Args:
      config: an ``ml_collections.ConfigDict`` from ``experiments/configs/``.
      workdir: run directory (created; resumed from when it holds checkpoints).
      algorithm: the module (or object) with ``setup`` (e.g. ``prefjax.train.dpo``).
      stop_after_steps: stop as on SIGTERM (checkpoint, status "preempted") after this many steps
        of this invocation; for time-sliced jobs and tests.
      step_hook: called as ``hook(step, state, metrics)`` after every step (host metrics).
      init_params: a pipeline's hook ``init_params(stage) -> params | None`` giving the initial
        policy params on a run that does not resume (e.g. an SFT warm-up run as a stage with
        :func:`run_stage`); the loop itself runs exactly one algorithm.

    Returns:
      A :class:`RunResult`.

    Raises:
      prefjax.train.errors.ConfigError: a config field is invalid (named in the message).
      prefjax.train.workdir.WorkdirError: the workdir belongs to another run, or resuming it
        would mix configs or data (each differing field named).
      NonFiniteError: ``train.nonfinite="stop"`` and a step was non-finite (after checkpointing).
    """
    train_config.validate(config, jax.device_count(), algorithm=algorithm)
    derived = train_config.derived(config, jax.device_count(), workdir, algorithm=algorithm)
    workdir = derived.workdir
    is_main = jax.process_index() == 0
    config_json = _config_json(config)
    # Before anything is written: is this directory ours to use (see prefjax.train.workdir)?
    wd = run_dir.Workdir(
        workdir,
        config.algorithm.name,
        config_json,
        allow_changes=bool(config.train.resume_with_changes),
        is_main=is_main,
        parent=_parent,
    ).open()
    try:
        return _run(
            config, wd, derived, algorithm, stop_after_steps, step_hook, init_params, _stage, _model
        )
    except BaseException:
        if wd.discard() and is_main:
            print(
                f"{'[' + _stage + '] ' if _stage else ''}the run failed before its first step; "
                f"removed what it had written ({wd.path} "
                f"{'removed' if wd.created else 'left empty, as it was'}).",
                flush=True,
            )
        raise
    finally:
        wd.release()


def _run(config, wd, derived, algorithm, stop_after_steps, step_hook, init_params, _stage, _model):
    workdir = wd.path
    is_main = jax.process_index() == 0
    tag = f"[{_stage}] " if _stage else ""
    config_json = wd.config_json
    if is_main:
        wd.check_export_dir(derived.export_dir)
        for change in wd.changes:
            kind = "restart" if wd.restart else ("allowed" if change.free else "override")
            print(f"{tag}config change ({kind}): {change.describe()}", flush=True)
    stop = StopRequest()

    mesh = sharding.make_mesh(config.mesh)
    key = jax.random.key(config.seed)
    model_key, setup_key, step_key = jax.random.split(key, 3)
    if _model is not None:  # a stage of a larger run shares the model (and its compiled code)
        model, tokenizer = _model
    else:
        # Born sharded on the mesh: no device ever holds a whole unsharded parameter.
        model, tokenizer = inputs.build_model(config, model_key, head=derived.head, mesh=mesh)
    try:
        params = initial_params(config, model, tokenizer, wd, init_params)
    except StagePreempted as p:
        return p.result._replace(workdir=workdir)
    if params is not None:  # host arrays (init_from) or another stage's: placed like the model's
        rules = sharding.rules_from_config(config.mesh)
        params = sharding.shard_params(mesh, params, model.param_axes, rules)
        model = inputs.with_params(model, params)

    data = inputs.build_data(config, tokenizer, derived.batch_kind, generate=derived.head == "lm")
    if is_main:
        print(f"{tag}data: {data.description}", flush=True)
        if data.padding:
            print(f"{tag}data padding: {data.padding}", flush=True)
    # Same config, other data (a file edited in place) is refused like a changed config.
    wd.check_data(run_dir.data_fingerprint([data.train, data.eval.dataset]))
    if derived.reference == "precomputed":
        t0 = time.time()
        outcomes = reference.add_reference_logps(
            config, model, mesh, (data.train, data.eval.dataset)
        )
        if is_main:
            how = ", ".join(
                f"{split} {o}" for split, o in zip(("train", "eval"), outcomes, strict=True)
            )
            print(f"{tag}reference log-probs ({how}) in {time.time() - t0:.1f}s", flush=True)

    if hasattr(algorithm, "setup"):  # its own set-up (extra frozen trees, a wrapped step, ...)
        setup = algorithm.setup(config, model, mesh, setup_key)
    else:
        setup = train_setup.build_setup(config, model, mesh, setup_key, algorithm)
    inputs.prepare_task_eval(setup, model, data.eval)
    train_iter = data.train_iterator()
    ckpt = None
    if config.checkpoint.enabled:
        ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            every=config.checkpoint.every,
        )
    state, start = setup.state, 0
    restored = ckpt.restore_latest(setup.state) if ckpt else None
    ended = ""  # the reason of a run that stopped early and has ended (nothing to train)
    if restored is not None:
        state, start = restored.state, restored.step
        train_iter.set_state(restored.data_state)
        previous_stop = restored.meta.get("stop_reason", "")
        # Only a result-changing change, accepted with train.resume_with_changes, continues it.
        if previous_stop and not any(not c.free for c in wd.changes):
            ended = previous_stop
            if is_main:
                print(
                    f"{tag}this run stopped at step {start}: {ended}; {_has_ended(workdir)}",
                    flush=True,
                )
        elif is_main and previous_stop:
            print(
                f"{tag}continuing the run that stopped at step {start} ({previous_stop}) under "
                "the changed config",
                flush=True,
            )
        elif is_main and start >= config.train.num_steps:
            print(
                f"{tag}this run already finished at step {start} "
                f"(train.num_steps={config.train.num_steps}); nothing to train. Raise "
                "--config.train.num_steps to extend it.",
                flush=True,
            )
        elif is_main:
            print(f"{tag}resumed from step {start} ({restored.meta.get('reason')})", flush=True)
    wd.begin(start)

    num_steps = config.train.num_steps
    progress = metric_logging.Progress(
        num_steps, start, enabled=is_main and config.logging.progress, desc=_stage or "train"
    )
    writer = metric_logging.MetricWriter(
        workdir,
        tensorboard=config.logging.tensorboard,
        enabled=is_main,
        print_fn=progress.write,
    )
    # Records newer than the checkpoint resumed from were written by an invocation that did
    # not get to checkpoint them: they are recomputed now, so each step keeps one record. (A run
    # with no checkpoint yet starts again from step 0, step-0 evaluation included.)
    writer.truncate_after(start if restored is not None else -1)

    def save(step, reason, *, fetch=True, stop_reason=""):
        if ckpt is not None:
            if fetch and pending:  # the window saved with the checkpoint holds host values
                window.extend(to_host(pending))
                pending.clear()
            extra = {"window": window, "skipped_total": skipped_total}
            if stop_reason:  # a resumption of this checkpoint knows the run has ended
                extra["stop_reason"] = stop_reason
            ckpt.save(step, state, train_iter.get_state(), config_json, reason=reason, meta=extra)
            faults.maybe_crash("checkpoint", step)
            if faults.armed("committed", step):
                ckpt.wait()
                faults.crash()

    eval_metrics: dict = {}
    if start == 0 and config.train.eval_every:
        eval_metrics = evaluate(setup, state.params, data.eval, config)
        writer.write(0, eval_metrics, split="eval")

    status, step, stop_reason = ("stopped" if ended else "finished"), start, ended
    # The logging window in progress at the checkpoint travels with it, so the first record
    # after a resumption averages the same steps as an uninterrupted run's.
    window: list[dict] = list(restored.meta.get("window", [])) if restored else []
    if restored is not None and "skipped_total" in restored.meta:
        skipped_total = int(restored.meta["skipped_total"])
    else:
        skipped_total = _skipped_before(writer.path, start) if is_main else 0
    t_start, steps_run = time.time(), 0
    # Metrics stay on the device until a logging step, so the host prepares and dispatches the
    # next batches while the device computes (a per-step fetch would wait for every step). They
    # are fetched every step only where a decision needs them then: train.nonfinite="stop"
    # (checkpoint and stop at that very step), the algorithm's should_stop and a step_hook.
    sync_every_step = (
        config.train.nonfinite == "stop" or setup.should_stop is not None or step_hook is not None
    )
    pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet on the host

    def to_host(step_metrics: list[tuple[int, Any]]) -> list[dict[str, float]]:
        """Fetch metrics and count the skipped steps (the step itself left their weights)."""
        nonlocal skipped_total
        fetched = jax.device_get([m for _, m in step_metrics])
        out = []
        for (s, _), m in zip(step_metrics, fetched, strict=True):
            m = {k: float(v) for k, v in m.items()}
            bad = _nonfinite_names(m)
            if m.get("train/skipped", 0.0) or bad:
                m["train/skipped"] = 1.0
                skipped_total += 1
                if config.train.nonfinite == "stop":
                    save(s, "nonfinite", fetch=False)  # called while fetching
                    if ckpt:
                        ckpt.wait()
                    names = ", ".join(f"{n}={m[n]}" for n in bad) or "loss/gradient"
                    raise NonFiniteError(
                        f"step {s}: non-finite {names} (train.nonfinite='stop'). The "
                        f"weights were not updated by this batch; the last good state is "
                        f"checkpointed at step {s} in {workdir}/checkpoints."
                    )
                progress.write(
                    f"step {s}: non-finite {', '.join(bad) or 'loss/gradient'}; "
                    f"batch skipped (skipped so far: {skipped_total})"
                )
            out.append(m)
        return out

    try:
        with stop.installed():
            for step in range(start + 1, (start if ended else num_steps) + 1):
                batch = setup.shard_batch(next(train_iter))
                state, metrics = setup.train_step(state, batch, setup.frozen, step_key)
                steps_run += 1
                faults.maybe_crash("step", step)
                if steps_run == 1:
                    wd.mark_step()
                pending.append((step, metrics))
                if sync_every_step:
                    (metrics,) = to_host(pending)
                    pending.clear()
                    window.append(metrics)
                    if step_hook is not None:
                        step_hook(step, state, metrics)
                    if setup.should_stop is not None:
                        stop_reason = setup.should_stop(metrics) or ""
                    progress.update(1, **{"last loss": metrics.get("loss", float("nan"))})
                else:
                    progress.update(1)
                # The run ends here: this step's record, evaluation and checkpoint are the last.
                last = step == num_steps or bool(stop_reason)
                if step % config.train.log_every == 0 or last:
                    if pending:
                        window.extend(to_host(pending))
                        pending.clear()
                        progress.update(0, **{"last loss": window[-1].get("loss", float("nan"))})
                    record = mean_records(window)
                    record["train/skipped_total"] = float(skipped_total)
                    if stop_reason:
                        record["run/stopped"] = 1.0
                    record["steps_per_second"] = steps_run / max(time.time() - t_start, 1e-9)
                    writer.write(
                        step, record, note=f"mean of steps {step - len(window) + 1}-{step}"
                    )
                    window = []
                evaluate_now = config.train.eval_every and step % config.train.eval_every == 0
                if evaluate_now or (last and not _stage):
                    eval_metrics = evaluate(setup, state.params, data.eval, config)
                    writer.write(step, eval_metrics, split="eval")
                if stop_reason:
                    status = "stopped"
                    save(step, f"stopped: {stop_reason}", stop_reason=stop_reason)
                    break
                if step == num_steps:
                    save(step, "final")
                elif ckpt is not None and ckpt.should_save(step):
                    save(step, "periodic")
                if stop.signal_name or (stop_after_steps and steps_run >= stop_after_steps):
                    status = "preempted"
                    save(step, f"stopped ({stop.signal_name or 'stop_after_steps'})")
                    break
    finally:
        progress.close()
        if ckpt is not None:
            ckpt.close()
        writer.close()
    if start >= num_steps:
        step = start

    if is_main and status == "preempted":
        print(
            f"{tag}stopped at step {step}; checkpoint written. Run the same command to resume.",
            flush=True,
        )
    if status == "stopped":
        wd.mark_ended(status, step, stop_reason, trained=not ended)
    stopped_now = status == "stopped" and not ended
    if is_main and stopped_now:
        if ckpt is None:
            how = "no checkpoint (checkpoint.enabled=false): a rerun starts again from step 0."
        else:
            how = f"checkpoint written; {_has_ended(workdir)}"
        print(f"{tag}stopped at step {step}: {stop_reason}; {how}", flush=True)
    if is_main and (status == "finished" or stopped_now) and not _stage:
        note = f"stopped at step {step}: {stop_reason}" if stopped_now else ""
        report(config, wd, derived, setup, state, note=note)
    return RunResult(state, step, status, eval_metrics, workdir, setup, stop_reason)


def _has_ended(workdir: str) -> str:
    """What a run stopped by its ``should_stop`` says about going on (at the stop and on
    every rerun of the same command)."""
    return (
        f"the run has ended: the same command on {workdir} trains nothing (its checkpoints "
        "and metrics are kept as they are). To go on, start a separate run with another "
        "--workdir (e.g. with the limit raised), or continue this one from its last checkpoint "
        "under the changed values with --config.train.resume_with_changes=true."
    )


def _skipped_before(metrics_path: str, step: int) -> int:
    if not os.path.exists(metrics_path):
        return 0
    totals = [
        r.get("train/skipped_total", 0.0)
        for r in metric_logging.read_records(metrics_path)
        if r.get("step", 0) <= step and "train/skipped_total" in r
    ]
    return int(totals[-1]) if totals else 0


def report(config, wd, derived, setup, state, *, note: str = "") -> None:
    """End of run, in ``wd`` (a :class:`~prefjax.train.workdir.Workdir`): ``curves.png`` from
    its ``metrics.jsonl``, ``summary.txt`` (with any accepted config changes, and ``note``: why
    a run stopped early) and, when ``derived.export_dir`` is set, the policy of ``state``
    (``setup.policy_params``) exported."""
    workdir = wd.path
    records = metric_logging.read_records(os.path.join(workdir, "metrics.jsonl"))
    title = f"{config.algorithm.name} ({config.algorithm.loss}) on {config.data.task}"
    changes = wd.accepted_changes()
    if changes:  # the run was continued under other values: say so wherever it is shown
        title += f" -- resumed with {len(changes)} change(s), see summary.txt"
    if config.logging.plot:
        path = metric_logging.plot_curves(records, os.path.join(workdir, "curves.png"), title=title)
        if path:
            print(f"curves: {path}")
    table = metric_logging.summary_table(records)
    if changes:
        table += "\n\nresumed with changes (train.resume_with_changes=true; see run.json):"
        for c in changes:
            table += f"\n  from step {c['step']}: {c['field']}: {c['old']!r} -> {c['new']!r}"
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
        f.write(title + "\n" + (note + "\n" if note else "") + table + "\n")
    print(table, flush=True)
    if derived.export_dir:
        params = jax.device_get(setup.policy_params(state.params, setup.frozen))
        models.save_pretrained(setup.model, params, derived.export_dir)
        wd.mark_export(derived.export_dir)
        print(f"exported the trained policy (Hugging Face format) to {derived.export_dir}")
    print(f"workdir: {workdir}", flush=True)
