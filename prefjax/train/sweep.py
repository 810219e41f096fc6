"""Hyper-parameter sweeps in one compiled step: K DPO policies against one reference and one batch.

A sweep trains K *members*, DPO runs that differ only in ``beta``, ``label_smoothing``, the
learning rate and the seed, side by side:

* the K train states are one :class:`~prefjax.train.state.TrainState` stacked on a leading
  ``[K]`` axis (:func:`init_states`); every member starts from the same initial policy (the
  model's params, an ``init_from`` checkpoint, or an SFT warm-up's result), with LoRA adapters
  initialised from its own seed;
* each step reads **one** batch and computes the frozen reference's log-probs **once** for it
  (:func:`prefjax.train.dpo.reference_logps`), then runs every member's update on that batch
  with its own hyper-parameters as traced arrays (:class:`MemberParams`): ``beta`` and
  ``label_smoothing`` go into the objective (:class:`prefjax.train.dpo.HParams`), the learning
  rate scales the optimiser's update (which is linear in it), the seed gives the member's step
  keys (LoRA dropout) exactly as a single run derives them from ``config.seed``;
* :data:`STRATEGIES` says how the members share the compiled step: ``"map"`` runs them one
  after the other inside the same program (``lax.map``: the batch, the reference and one
  dispatch shared, each member's matmuls as in a single run), ``"vmap"`` batches them
  (``jax.vmap``: every matmul and gather gains a ``[K]`` batch dimension). On XLA's CPU backend
  ``"map"`` is the faster (``benchmarks/README.md``, "Sweeps").

Member ``m`` after ``n`` steps equals the single DPO run of :func:`member_config` ``(config,
m)`` after ``n`` steps (same initial policy and reference, same batches) to float32 rounding
(``tests/train/test_sweep.py``). The members are the cartesian product of ``config.sweep``'s
axes (:func:`members`); an empty axis takes the config's own value.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prefjax import sharding as shd
from prefjax.train import checkpointing, common, dpo, inputs, loop, reference
from prefjax.train import config as train_config
from prefjax.train import logging as metric_logging
from prefjax.train import setup as train_setup
from prefjax.train import workdir as run_dir
from prefjax.train.common import Batch, Metrics, Stats
from prefjax.train.errors import ConfigError
from prefjax.train.state import TrainState

# How the members share one compiled step (see the module docstring).
STRATEGIES = ("map", "vmap")
# The swept fields, in the order the cartesian product (and a member's name) lists them.
AXES = ("beta", "label_smoothing", "learning_rate", "seed")


def default_config() -> ml_collections.ConfigDict:
    """``config.sweep``: the values of each swept field and how the members share a step."""
    sweep = ml_collections.ConfigDict()
    # Values of config.algorithm.beta, one member per value (x the other axes); () = the
    # config's own value only.
    sweep.beta = ()
    # Values of config.algorithm.label_smoothing (conservative DPO's epsilon, in [0, 0.5)).
    sweep.label_smoothing = ()
    # Values of config.optimizer.learning_rate (peak, per step); the schedule's shape is shared.
    sweep.learning_rate = ()
    # Values of config.seed: a member's LoRA initialisation and dropout keys (the initial
    # policy and the data order are shared by all members).
    sweep.seed = ()
    # How the members share the compiled step: "map" (one after the other, lax.map) | "vmap"
    # (batched); benchmarks/README.md, "Sweeps", compares them.
    sweep.strategy = "map"
    return sweep


@dataclasses.dataclass(frozen=True)
class Member:
    """One member's values of the swept fields."""

    beta: float
    label_smoothing: float
    learning_rate: float
    seed: int

    def name(self, axes: Sequence[str] = AXES) -> str:
        """``"beta=0.1,seed=2"``: the values of ``axes`` (the swept ones), for directory names."""
        return ",".join(f"{a}={getattr(self, a):g}" for a in axes) or "base"


class MemberParams(NamedTuple):
    """The members' traced hyper-parameters, each ``[K]`` float32 (one entry per member).

    Attributes:
      beta: ``config.algorithm.beta`` of each member.
      label_smoothing: ``config.algorithm.label_smoothing`` of each member.
      update_scale: each member's learning rate over the config's (the optimiser was built
        for the config's; its update is linear in the learning rate).
    """

    beta: jax.Array
    label_smoothing: jax.Array
    update_scale: jax.Array


def swept_axes(config: Any) -> tuple[str, ...]:
    """The axes of ``config.sweep`` with values, in :data:`AXES` order."""
    return tuple(a for a in AXES if len(config.sweep[a]))


def members(config: Any) -> list[Member]:
    """The cartesian product of ``config.sweep``'s axes (an empty one: the config's value)."""
    own = {
        "beta": float(config.algorithm.beta),
        "label_smoothing": float(config.algorithm.label_smoothing),
        "learning_rate": float(config.optimizer.learning_rate),
        "seed": int(config.seed),
    }
    values = [tuple(config.sweep[a]) or (own[a],) for a in AXES]
    return [
        Member(float(b), float(s), float(lr), int(seed))
        for b, s, lr, seed in itertools.product(*values)
    ]


def member_config(config: Any, member: Member) -> ml_collections.ConfigDict:
    """The single run ``member`` equals: ``config`` with the member's values, no sweep block."""
    single = ml_collections.ConfigDict(config.to_dict())
    del single["sweep"]
    single.algorithm.beta = member.beta
    single.algorithm.label_smoothing = member.label_smoothing
    single.optimizer.learning_rate = member.learning_rate
    single.seed = member.seed
    return single


def validate(config: Any) -> None:
    """The sweep's own start-up checks (each member's config is checked as a single run's)."""
    sweep = config.sweep
    if sweep.strategy not in STRATEGIES:
        raise ConfigError(f"config.sweep.strategy={sweep.strategy!r}: expected one of {STRATEGIES}")
    if config.algorithm.name != dpo.NAME:
        raise ConfigError(f"config.algorithm.name={config.algorithm.name!r}: sweeps train 'dpo'")
    if config.algorithm.loss == "kto":
        raise ConfigError(
            "config.algorithm.loss='kto': a sweep computes the reference once per batch, which "
            "KTO's in-batch KL reference point does not allow; sweep a pairwise loss"
        )
    for axis in AXES:
        values = tuple(sweep[axis])
        if len(set(values)) != len(values):
            raise ConfigError(f"config.sweep.{axis}={values}: a value is listed twice")
    if not float(config.optimizer.learning_rate) > 0:
        raise ConfigError(
            f"config.optimizer.learning_rate={config.optimizer.learning_rate}: must be > 0 "
            "(members' rates scale the config's)"
        )
    if config.train.nonfinite != "skip":
        raise ConfigError(
            f"config.train.nonfinite={config.train.nonfinite!r}: a sweep skips a member's "
            "non-finite step (its weights kept, counted in train/skipped); use 'skip'"
        )


def member_params(config: Any, group: Sequence[Member]) -> MemberParams:
    """``[K]`` arrays of ``group``'s hyper-parameters (update scales against the config's rate)."""
    base = float(config.optimizer.learning_rate)
    f32 = lambda xs: jnp.asarray(xs, jnp.float32)
    return MemberParams(
        beta=f32([m.beta for m in group]),
        label_smoothing=f32([m.label_smoothing for m in group]),
        update_scale=f32([m.learning_rate / base for m in group]),
    )


def member_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(setup_key, step_key)`` of a run with ``config.seed = seed``, as the loop splits them."""
    _, setup_key, step_key = jax.random.split(jax.random.key(seed), 3)
    return setup_key, step_key


# ----------------------------------------------------------------------------------------------
# Stacked state
# ----------------------------------------------------------------------------------------------


def stacked_sharding(sharding: Any) -> Any:
    """A pytree of ``NamedSharding`` with a leading, unsplit ``[K]`` member axis."""
    return jax.tree.map(
        lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)),
        sharding,
        is_leaf=lambda s: isinstance(s, NamedSharding),
    )


def stack(trees: Sequence[Any]) -> Any:
    """``K`` pytrees of one structure -> one pytree with a leading ``[K]`` axis on every leaf."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
    """Member ``index``'s slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)


def initial_trainable(config: Any, model: Any, member: Member) -> Any:
    """A member's trainable params: LoRA adapters from its seed, or the model's params."""
    if not common.uses_lora(config):
        return model.params
    lora = config.model.lora
    setup_key, _ = member_keys(member.seed)
    return model.init_lora(
        setup_key,
        rank=lora.rank,
        alpha=float(lora.alpha),
        targets=tuple(lora.targets),
        dropout=float(lora.dropout),
    )


def init_states(
    config: Any, model: Any, group: Sequence[Member], tx: Any, state_sharding: TrainState
) -> TrainState:
    """The members' fresh train states stacked on ``[K]``, placed by ``stacked_sharding``.

    ``tx`` is the optimiser of the config's learning rate (one for every member; its state does
    not depend on the rate), ``state_sharding`` one member's ``TrainState`` of shardings.
    """
    states = [TrainState.create(params=initial_trainable(config, model, m), tx=tx) for m in group]
    return jax.device_put(stack(states), stacked_sharding(state_sharding))


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


def shares_reference(config: Any) -> bool:
    """Whether the step computes reference log-probs (a frozen copy or the LoRA base)."""
    return dpo.reference(config) in ("copy", "lora_base")


def _member_config(config: Any) -> ml_collections.ConfigDict:
    """The config each member's objective is built from: the reference log-probs arrive with
    the batch (``ref_logps``, computed once for all members) when the run has a live one."""
    single = ml_collections.ConfigDict(config.to_dict())
    if shares_reference(config):
        single.algorithm.reference = "precomputed"
    return single


def _over_members(fn: Callable[..., Any], strategy: str) -> Callable[..., Any]:
    """``fn(member_args...)`` applied to every member of ``[K]``-stacked arguments."""
    if strategy == "vmap":
        return jax.vmap(fn)
    return lambda *xs: jax.lax.map(lambda args: fn(*args), xs)


def make_sweep_step(
    model: Any,
    config: Any,
    *,
    schedule: Any = None,
    mesh: Any = None,
    strategy: str = "map",
) -> Callable[..., tuple[TrainState, Metrics]]:
    """``step(states, batch, frozen, params, keys) -> (states, metrics)``, unjitted.

    Args:
      model, config: as for :func:`prefjax.train.setup.make_train_step` (``config`` may keep its
        ``sweep`` block; the members' values come in ``params``).
      schedule: the config's learning-rate schedule (``learning_rate`` metric, scaled).
      mesh: optional; keeps micro-batches split over ``("data", "fsdp")``.
      strategy: one of :data:`STRATEGIES`.

    The step's arguments: ``states`` a ``[K]``-stacked ``TrainState``; one ``batch`` and one
    ``frozen`` tree for all members; ``params`` :class:`MemberParams` of ``[K]``; ``keys`` the
    members' ``[K]`` step keys (:func:`member_keys`). It returns the new stacked states and the
    metrics of every member, each ``[K]``.
    """
    single = _member_config(config)
    reference = dpo.reference_logps(model, config)
    share = shares_reference(config)
    num_micro = config.optimizer.grad_accum_steps
    constrain = common.micro_batch_constraint(mesh)

    def step(states, batch, frozen, params, keys):
        if share:  # once per batch, not once per member
            batch = {**batch, "ref_logps": jax.lax.stop_gradient(reference(frozen, batch))}

        def member(state, p, key):
            objective = dpo.objective(model, single, hparams=dpo.HParams(p.beta, p.label_smoothing))
            update = common.make_update(
                objective, num_micro=num_micro, schedule=schedule, constrain=constrain
            )
            return update(state, batch, frozen, key, update_scale=p.update_scale)

        return _over_members(member, strategy)(states, params, keys)

    return step


def make_sweep_eval_step(
    model: Any, config: Any, *, strategy: str = "map"
) -> Callable[[Any, Batch, Any, MemberParams], Stats]:
    """``eval_step(params, batch, frozen, member_params) -> stats``: every member's held-out
    :data:`~prefjax.train.common.Stats` on one batch (each entry ``[K]``), the reference once."""
    single = _member_config(config)
    reference = dpo.reference_logps(model, config)
    share = shares_reference(config)

    def eval_step(params, batch, frozen, hparams):
        if share:
            batch = {**batch, "ref_logps": reference(frozen, batch)}

        def member(p, hp):
            objective = dpo.objective(
                model, single, hparams=dpo.HParams(hp.beta, hp.label_smoothing)
            )
            return common.make_eval_step(objective)(p, batch, frozen)

        return _over_members(member, strategy)(params, hparams)

    return eval_step


def finalize(stats: Stats, index: int) -> Metrics:
    """Member ``index``'s metrics from summed ``[K]`` stats (DPO's own finalisation)."""
    return dpo.finalize(unstack(stats, index))


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepSetup:
    """What a sweep trains with (:func:`build_sweep`).

    Attributes:
      base: a single run's :class:`~prefjax.train.common.Setup` of the config's own learning rate
        (member 0's values otherwise): the frozen tree, mesh, shardings, schedule, optimiser and
        model every member shares (its own jitted steps are not used).
      group: the members, in stacking order.
      states: their ``TrainState`` stacked on ``[K]``.
      params: their :class:`MemberParams`.
      keys: their ``[K]`` step keys.
      train_step: jitted ``(states, batch, frozen, params, keys) -> (states, metrics)``, states
        donated.
      eval_step: jitted ``(params, batch, frozen, member_params) -> stats`` (each ``[K]``).
      state_sharding: the stacked ``TrainState`` of shardings (checkpoint restore).
    """

    base: common.Setup
    group: list[Member]
    states: TrainState
    params: MemberParams
    keys: jax.Array
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    state_sharding: Any


def build_sweep(config: Any, model: Any, mesh: Any, group: Sequence[Member]) -> SweepSetup:
    """Stacked states and the jitted sweep steps of ``group`` on ``mesh``."""
    group = list(group)
    first = member_config(config, group[0])
    first.optimizer.learning_rate = config.optimizer.learning_rate  # the update scales' unit
    base = train_setup.build_setup(first, model, mesh, member_keys(group[0].seed)[0], dpo)
    states = init_states(config, model, group, base.state.tx, base.state_sharding)
    strategy = config.sweep.strategy
    step = make_sweep_step(model, config, schedule=base.schedule, mesh=mesh, strategy=strategy)
    stacked = stacked_sharding(base.state_sharding)
    repl = shd.replicated(mesh)
    train_step = jax.jit(
        shd.with_activation_sharding(mesh, step),
        in_shardings=(stacked, base.batch_sharding, base.frozen_sharding, repl, repl),
        out_shardings=(stacked, repl),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        shd.with_activation_sharding(mesh, make_sweep_eval_step(model, config, strategy=strategy)),
        in_shardings=(stacked.params, base.batch_sharding, base.frozen_sharding, repl),
        out_shardings=repl,
    )
    keys = jnp.stack([member_keys(m.seed)[1] for m in group])
    return SweepSetup(
        base=base,
        group=group,
        states=states,
        params=member_params(config, group),
        keys=keys,
        train_step=train_step,
        eval_step=eval_step,
        state_sharding=stacked,
    )


# ----------------------------------------------------------------------------------------------
# The run: one workdir per member, one batch stream, one compiled step
# ----------------------------------------------------------------------------------------------


class SweepResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      states: the members' final ``TrainState`` stacked on ``[K]``.
      step: optimiser steps taken (by every member).
      status: ``"finished"`` | ``"preempted"``.
      group: the members, in stacking order.
      workdirs: each member's run directory (absolute), in the same order.
      eval_metrics: each member's last held-out evaluation (``eval/...``), ``{}`` if none.
      workdir: the sweep's directory.
    """

    states: Any
    step: int
    status: str
    group: list
    workdirs: list
    eval_metrics: list
    workdir: str


def _json(config: Any) -> dict:
    return json.loads(config.to_json_best_effort())


def _add_stats(total: dict, new: Stats) -> dict:
    """Adds one eval step's ``[K]`` stats into a running host total (float64, as
    :func:`prefjax.train.evaluation.merge_metric_sums` adds a single run's)."""
    out = dict(total)
    for name, (num, den) in jax.device_get(dict(new)).items():
        a, b = total.get(name, (0.0, 0.0))
        out[name] = (a + np.asarray(num, np.float64), b + np.asarray(den, np.float64))
    return out


def evaluate(built: SweepSetup, params: Any, eval_data: Any, config: Any) -> list[dict]:
    """Every member's held-out metrics (``eval/`` names): the sweep's eval step summed over the
    eval split, then each member's built-in task metrics (decoded responses, KL), as
    :func:`prefjax.train.loop.evaluate` gives a single run."""
    base, sums = built.base, {}
    for i, batch in enumerate(eval_data.batches()):
        if config.eval.num_batches and i >= config.eval.num_batches:
            break
        out = built.eval_step(params, base.shard_batch(batch), base.frozen, built.params)
        sums = _add_stats(sums, out)
    out = []
    for i, member in enumerate(built.group):
        single = member_config(config, member)
        metrics = {f"eval/{k}": float(v) for k, v in sorted(finalize(sums, i).items())}
        # The member's own objective: the bandit's optimum depends on its beta.
        view = dataclasses.replace(base, objective=dpo.objective(base.model, single))
        metrics.update(inputs.task_metrics(view, unstack(params, i), eval_data, single))
        out.append(metrics)
    return out


def plot(group: Sequence[Member], axes: Sequence[str], final: Sequence[dict], path: str) -> str:
    """``sweep.png``: held-out gold reward and KL to the reference of each member's final
    policy against the first swept axis (one line per value of the others)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x_axis = axes[0] if axes else "beta"
    panels = [
        ("eval/gold_reward", "gold reward (greedy, held out)"),
        ("eval/gold_reward_sampled", "gold reward (sampled, held out)"),
        ("eval/kl", "KL(pi || pi_ref), sampled, nats"),
        ("eval/rewards/accuracy", "held-out preference accuracy"),
    ]
    panels = [(k, t) for k, t in panels if any(k in f for f in final)]
    fig, plots = plt.subplots(1, max(len(panels), 1), figsize=(4.4 * max(len(panels), 1), 3.3))
    plots = np.atleast_1d(plots)
    lines: dict[str, list] = {}
    for member, metrics in zip(group, final, strict=True):
        label = member.name([a for a in axes if a != x_axis]) if len(axes) > 1 else x_axis
        lines.setdefault(label, []).append((getattr(member, x_axis), metrics))
    for ax, (key, title) in zip(plots, panels, strict=False):
        for label, pts in lines.items():
            pts = sorted((x, m[key]) for x, m in pts if key in m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, markersize=4)
        if x_axis in ("beta", "learning_rate"):
            ax.set_xscale("log")
        ax.set_xlabel(x_axis)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(group: Sequence[Member], axes: Sequence[str], final: Sequence[dict]) -> str:
    """A text table: one row per member, its final held-out metrics."""
    names = [
        n
        for n in (
            "eval/loss",
            "eval/rewards/accuracy",
            "eval/rewards/margin",
            "eval/gold_reward",
            "eval/gold_reward_sampled",
            "eval/kl",
        )
        if any(n in f for f in final)
    ]
    width = max([len(m.name(axes)) for m in group] + [6])
    head = f"{'member':<{width}}  " + "  ".join(f"{n.removeprefix('eval/'):>17}" for n in names)
    rows = [head, "-" * len(head)]
    for member, metrics in zip(group, final, strict=True):
        cells = "  ".join(f"{metrics.get(n, float('nan')):>17.4f}" for n in names)
        rows.append(f"{member.name(axes):<{width}}  {cells}")
    return "\n".join(rows)


def run(
    config: Any,
    workdir: str,
    *,
    init_params: Callable[[loop.Stage], Any] | None = None,
    stop_after_steps: int | None = None,
) -> SweepResult:
    """Trains every member of ``config.sweep`` in one compiled step; see the module docstring.

    ``workdir`` holds the sweep's own ``run.json`` (the whole config, ``sweep`` block included,
    so a changed list of members is refused like any changed config), one run directory per
    member named by its swept values (``beta=0.1,seed=1``: ``run.json`` of the member's single
    run, ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``summary.txt``), ``sweep.png``
    and ``summary.txt`` across members, and the shared stage of ``init_params`` (the SFT
    warm-up, run once). Running it again resumes every member from its checkpoint.

    Args:
      config: a DPO config with a ``sweep`` block (:func:`default_config`).
      workdir: the sweep's directory.
      init_params: a pipeline's hook giving the shared initial policy (and reference), as for
        :func:`prefjax.train.loop.run`.
      stop_after_steps: stop (checkpoint, status ``"preempted"``) after this many steps.

    Raises:
      prefjax.train.errors.ConfigError: a field of the sweep or of a member's config is invalid.
      prefjax.train.workdir.WorkdirError: the directory (or a member's) belongs to another run,
        or resuming it would mix configs or data.
    """
    validate(config)
    group, axes = members(config), swept_axes(config)
    if "seed" in axes and not (config.model.init_from or config.model.path or init_params):
        raise ConfigError(
            f"config.sweep.seed={tuple(config.sweep.seed)}: each seed's single run would start "
            "from its own random initial policy, which is also its reference, so the members "
            "could not share one; start every member from one policy (config.model.init_from, "
            "config.model.path or the SFT warm-up), the seeds then pick LoRA initialisations "
            "and dropout"
        )
    singles = [member_config(config, m) for m in group]
    for single in singles:
        train_config.validate(single, jax.device_count(), algorithm=dpo)
    derived = train_config.derived(singles[0], jax.device_count(), workdir, algorithm=dpo)
    is_main = jax.process_index() == 0
    root = run_dir.Workdir(
        derived.workdir,
        f"{dpo.NAME}_sweep",
        _json(config),
        allow_changes=bool(config.train.resume_with_changes),
        is_main=is_main,
    ).open()
    wds: list[run_dir.Workdir] = []
    try:
        for member, single in zip(group, singles, strict=True):
            path = os.path.join(root.path, member.name(axes))
            wds.append(
                run_dir.Workdir(
                    path,
                    dpo.NAME,
                    _json(single),
                    allow_changes=bool(config.train.resume_with_changes),
                    is_main=is_main,
                    parent=root,
                ).open()
            )
        return _run(config, root, wds, group, axes, singles, init_params, stop_after_steps)
    except BaseException:
        for wd in [*wds, root]:
            wd.discard()
        raise
    finally:
        for wd in [*wds, root]:
            wd.release()


def _run(config, root, wds, group, axes, singles, init_params, stop_after_steps) -> SweepResult:
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(config.mesh)
    model_key = jax.random.split(jax.random.key(config.seed), 3)[0]
    model, tokenizer = inputs.build_model(config, model_key, head=dpo.HEAD, mesh=mesh)
    params = loop.initial_params(config, model, tokenizer, root, init_params)
    if params is not None:  # the shared initial policy (and reference), placed like the model's
        rules = shd.rules_from_config(config.mesh)
        model = inputs.with_params(model, shd.shard_params(mesh, params, model.param_axes, rules))
    data = inputs.build_data(config, tokenizer, dpo.batch_kind(config))
    if is_main:
        print(f"data: {data.description}", flush=True)
        print(
            f"sweep: {len(group)} members ({', '.join(axes) or 'none swept'}), "
            f"strategy {config.sweep.strategy!r}",
            flush=True,
        )
    fingerprint = run_dir.data_fingerprint([data.train, data.eval.dataset])
    for wd in [root, *wds]:
        wd.check_data(fingerprint)
    if dpo.reference(config) == "precomputed":
        reference.add_reference_logps(config, model, mesh, (data.train, data.eval.dataset))
    built = build_sweep(config, model, mesh, group)
    base = built.base
    inputs.prepare_task_eval(base, model, data.eval)
    train_iter = data.train_iterator()
    ckpts = (
        [
            checkpointing.Checkpointer(
                os.path.join(wd.path, "checkpoints"),
                keep=config.checkpoint.keep,
                every=config.checkpoint.every,
            )
            for wd in wds
        ]
        if config.checkpoint.enabled
        else []
    )
    states, start = built.states, 0
    restored = [c.restore_latest(base.state) for c in ckpts]
    steps = {None if r is None else r.step for r in restored}
    if len(steps) > 1:
        found = ", ".join(
            f"{wd.path}: {r.step if r else 'none'}" for wd, r in zip(wds, restored, strict=True)
        )
        raise run_dir.WorkdirError(
            f"the members of the sweep in {root.path} have checkpoints of different steps "
            f"({found}); resuming would start them from different points. Move the newer "
            "checkpoints aside (checkpoints/<step>) so every member has the same latest step."
        )
    if restored and restored[0] is not None:
        start = restored[0].step
        states = jax.device_put(stack([r.state for r in restored]), built.state_sharding)
        train_iter.set_state(restored[0].data_state)
        if is_main:
            print(f"resumed every member from step {start}", flush=True)
    for wd in [root, *wds]:
        wd.begin(start)

    num_steps, k = config.train.num_steps, len(group)
    progress = metric_logging.Progress(
        num_steps, start, enabled=is_main and config.logging.progress, desc=f"sweep x{k}"
    )
    writers = [
        metric_logging.MetricWriter(
            wd.path, tensorboard=config.logging.tensorboard, enabled=is_main, console=False
        )
        for wd in wds
    ]
    for w in writers:
        w.truncate_after(start if start else -1)
    meta = [r.meta if r else {} for r in restored] or [{}] * k
    windows = [list(m.get("window", [])) for m in meta]
    skipped = [int(m.get("skipped_total", 0)) for m in meta]
    pending: list[tuple[int, Any]] = []
    names = [m.name(axes) for m in group]

    def fetch() -> None:
        for _, metrics in pending:
            host = jax.device_get(metrics)
            for i in range(k):
                m = {name: float(v[i]) for name, v in host.items()}
                if m.get("train/skipped", 0.0) or not all(map(math.isfinite, m.values())):
                    m["train/skipped"] = 1.0
                    skipped[i] += 1
                windows[i].append(m)
        pending.clear()

    def save(step: int, reason: str) -> None:
        fetch()
        for i, ckpt in enumerate(ckpts):
            extra = {"window": windows[i], "skipped_total": skipped[i]}
            ckpt.save(
                step,
                unstack(states, i),
                train_iter.get_state(),
                _json(singles[i]),
                reason=reason,
                meta=extra,
            )

    def write_eval(step: int) -> list[dict]:
        final = evaluate(built, states.params, data.eval, config)
        for w, metrics in zip(writers, final, strict=True):
            w.write(step, metrics, split="eval")
        shown = ", ".join(
            f"{n}: {f.get('eval/rewards/accuracy', float('nan')):.3f}"
            for n, f in zip(names, final, strict=True)
        )
        progress.write(f"step {step} eval/rewards/accuracy  {shown}")
        return final

    eval_metrics: list[dict] = [{} for _ in group]
    if start == 0 and config.train.eval_every:
        eval_metrics = write_eval(0)
    status, step, stop = "finished", start, loop.StopRequest()
    t_start, steps_run = time.time(), 0
    try:
        with stop.installed():
            for step in range(start + 1, num_steps + 1):
                batch = base.shard_batch(next(train_iter))
                states, metrics = built.train_step(
                    states, batch, base.frozen, built.params, built.keys
                )
                steps_run += 1
                if steps_run == 1:
                    for wd in wds:
                        wd.mark_step()
                pending.append((step, metrics))
                progress.update(1)
                if step % config.train.log_every == 0 or step == num_steps:
                    fetch()
                    rate = steps_run / max(time.time() - t_start, 1e-9)
                    shown = []
                    for i, w in enumerate(writers):
                        record = loop.mean_records(windows[i])
                        record["train/skipped_total"] = float(skipped[i])
                        record["steps_per_second"] = rate
                        first = step - len(windows[i]) + 1
                        w.write(step, record, note=f"mean of steps {first}-{step}")
                        windows[i] = []
                        shown.append(f"{names[i]}: {record.get('loss', float('nan')):.4f}")
                    progress.write(f"step {step} loss  {', '.join(shown)}")
                evaluate_now = config.train.eval_every and step % config.train.eval_every == 0
                if evaluate_now or step == num_steps:
                    eval_metrics = write_eval(step)
                if step == num_steps:
                    save(step, "final")
                elif ckpts and ckpts[0].should_save(step):
                    save(step, "periodic")
                if stop.signal_name or (stop_after_steps and steps_run >= stop_after_steps):
                    status = "preempted"
                    save(step, f"stopped ({stop.signal_name or 'stop_after_steps'})")
                    break
    finally:
        progress.close()
        for c in ckpts:
            c.close()
        for w in writers:
            w.close()
    if start >= num_steps:
        step = start
    if is_main and status == "finished":
        for i, (wd, single) in enumerate(zip(wds, singles, strict=True)):
            d = train_config.derived(single, jax.device_count(), wd.path, algorithm=dpo)
            loop.report(single, wd, d, base, unstack(states, i))
        if any(eval_metrics):
            if config.logging.plot:
                path = plot(group, axes, eval_metrics, os.path.join(root.path, "sweep.png"))
                print(f"sweep plot: {path}", flush=True)
            table = summary(group, axes, eval_metrics)
            with open(os.path.join(root.path, "summary.txt"), "w") as f:
                f.write(table + "\n")
            print(table, flush=True)
    paths = [wd.path for wd in wds]
    return SweepResult(states, step, status, group, paths, eval_metrics, root.path)
