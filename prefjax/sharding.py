"""Device mesh, logical-axis rules and sharding helpers.

prefjax runs one program on one ``Mesh`` with three named axes:

* ``data``   -- pure data parallelism: parameters replicated, batch split;
* ``fsdp``   -- fully sharded data parallelism: the batch *and* the parameters are split (ZeRO-3);
* ``tensor`` -- tensor (model) parallelism: matmul dimensions (MLP width, heads, vocabulary) split.

Models name the axes of every parameter with a small logical vocabulary (``embed``, ``mlp``,
``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``layers``); *rules* in the config map each
logical name to a mesh axis, a tuple of mesh axes, or ``None`` (replicated), exactly as flax's
``logical_axis_rules``. Everything that turns names into ``NamedSharding`` lives in this module, so
the models never know about meshes and the train steps never know about logical names.

Conventions:

* The batch axis of every input array is split over ``("data", "fsdp")``.
* A mesh axis is used at most once per array (first dimension wins, as in ``flax.linen``).
* A dimension whose size is not divisible by its mesh axes is replicated instead (a tiny model's
  259-token byte vocabulary cannot be split 8 ways); :func:`logical_to_spec` records the fallback.
* Activations: inside a jitted step (:func:`with_activation_sharding`) the models' residual stream
  is split by rows over ``("data", "fsdp")`` (:data:`ACTIVATION_RULES`), whatever the order the
  step put its rows in; XLA gathers each FSDP-split weight where it is used.

Example (8 devices: 2-way data parallel x 4-way FSDP)::

    mesh = make_mesh(config.mesh)                     # data=2, fsdp=-1 -> fsdp=4
    shardings = param_shardings(mesh, model.param_axes, model.params, config.mesh.rules)
    params = jax.device_put(model.params, shardings)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Fully sharded data parallelism combined with tensor parallelism (maxtext's default pairing):
# with ``tensor=1`` this is pure FSDP, with ``fsdp=1`` pure Megatron-style tensor parallelism.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)
FSDP_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("vocab", None),
    ("layers", None),
)
TENSOR_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)
REPLICATED_RULES: tuple[tuple[str, Any], ...] = ()

# The activations' one logical axis (``prefjax.models.transformer.BATCH``): the rows of a forward
# pass, split as the batch is.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (("batch", BATCH_AXES),)

Rules = Sequence[tuple[str, Any]]


# ----------------------------------------------------------------------------------------------
# Multi-host start-up
# ----------------------------------------------------------------------------------------------


def initialize_distributed(config: Any = None, **kwargs: Any) -> bool:
    """Calls ``jax.distributed.initialize`` when ``config.mesh.distributed`` is set.

    Must run before anything touches a device. On Cloud TPU pod slices and SLURM/Open MPI GPU
    clusters JAX detects the coordinator, process count and index by itself; elsewhere pass them
    as keyword arguments (``coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0``)
    or set ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

    Args:
      config: a config with a ``mesh.distributed`` bool, or ``None`` to initialise unconditionally.
      **kwargs: forwarded to ``jax.distributed.initialize``.

    Returns:
      ``True`` if ``jax.distributed.initialize`` was called.
    """
    if config is not None and not bool(config.mesh.get("distributed", False)):
        return False
    env = {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
        "process_id": os.environ.get("JAX_PROCESS_ID"),
    }
    for name, value in env.items():
        if value is not None and name not in kwargs:
            kwargs[name] = int(value) if name != "coordinator_address" else value
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def mesh_shape(
    data: int = 1, fsdp: int = -1, tensor: int = 1, *, num_devices: int | None = None
) -> tuple[int, int, int]:
    """Resolves ``(data, fsdp, tensor)`` sizes, one of which may be ``-1`` ("the rest").

    Errors name the config field (``config.mesh.<axis>``) that is wrong.

    >>> prefjax.sharding.mesh_shape(2, -1, 1, num_devices=8)
    (2, 4, 1)
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size}: mesh sizes must be positive or -1.")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(
            f"config.mesh.{rest[1]}=-1: only one mesh axis may be -1 (also config.mesh.{rest[0]})."
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            fixed = ", ".join(f"config.mesh.{n}={v}" for n, v in sizes.items() if v != -1)
            raise ValueError(
                f"config.mesh.{rest[0]}=-1: the other axes ({fixed}) multiply to {known}, which "
                f"does not divide the {num_devices} devices."
            )
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
            f"{known} but there are {num_devices} devices (use -1 for one axis to take the rest)."
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(
    mesh_config: Any = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh from ``config.mesh`` (or defaults: all FSDP).

    Args:
      mesh_config: an object with ``data``, ``fsdp``, ``tensor`` ints (``-1`` = the rest), e.g.
        ``config.mesh``; ``None`` puts every device on ``fsdp``.
      devices: devices to use (default: all of ``jax.devices()``).

    Returns:
      A ``jax.sharding.Mesh`` with ``Auto`` axes (shardings are given to ``jit`` explicitly).
    """
    devices = list(jax.devices() if devices is None else devices)
    if mesh_config is None:
        shape = mesh_shape(num_devices=len(devices))
    else:
        shape = mesh_shape(
            mesh_config.data, mesh_config.fsdp, mesh_config.tensor, num_devices=len(devices)
        )
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    else:
        mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return mesh


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1x1x1 mesh on one device (the single-device reference in tests and benchmarks)."""
    device = jax.devices()[0] if device is None else device
    return Mesh(np.asarray([device]).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ----------------------------------------------------------------------------------------------
# Logical axis rules
# ----------------------------------------------------------------------------------------------


def validate_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """Checks ``config.mesh.rules`` and returns ``{logical: (mesh axes...)}``.

    Each rule is ``(logical_name, mesh_axis | tuple_of_mesh_axes | None)``; a name may appear once.
    """
    table: dict[str, tuple[str, ...]] = {}
    for index, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"config.mesh.rules[{index}]={rule!r}: each rule must be a pair "
                "(logical_axis_name, mesh_axis or tuple of mesh axes or None)."
            )
        name, target = rule
        if name in table:
            raise ValueError(f"config.mesh.rules[{index}]: logical axis {name!r} appears twice.")
        if target is None:
            axes: tuple[str, ...] = ()
        elif isinstance(target, str):
            axes = (target,)
        else:
            axes = tuple(target)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ValueError(
                    f"config.mesh.rules[{index}]=({name!r}, {target!r}): unknown mesh axis "
                    f"{axis!r}; the mesh axes are {MESH_AXES}."
                )
        table[name] = axes
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Rules,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps one array's logical axis names to a ``PartitionSpec``.

    Logical names without a rule (and ``None``) are replicated. A mesh axis already used by an
    earlier dimension is not used again. Given ``mesh`` and ``shape``, mesh axes of size 1 are
    dropped and a dimension that the mesh axes do not divide is replicated.

    >>> rules = (("embed", "fsdp"), ("mlp", "tensor"))
    >>> tuple(prefjax.sharding.logical_to_spec(("embed", "mlp"), rules))
    ('fsdp', 'tensor')
    >>> rules = (("mlp", "tensor"), ("embed", "tensor"))  # "tensor" is used once, by "mlp"
    >>> tuple(prefjax.sharding.logical_to_spec(("mlp", "embed", "heads"), rules))
    ('tensor',)
    """
    table = validate_rules(rules)
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        axes = tuple(a for a in table.get(name, ()) if a not in used) if name is not None else ()
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % size:
                    _note_fallback(name, shape[dim], axes, size)
                    axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


_FALLBACKS: set[tuple[Any, ...]] = set()


def _note_fallback(name: Any, dim: int, axes: tuple[str, ...], size: int) -> None:
    key = (name, dim, axes)
    if key not in _FALLBACKS:
        _FALLBACKS.add(key)
        logging.info(
            "sharding: logical axis %r of size %d is not divisible by mesh axes %s (size %d); "
            "replicating that dimension.",
            name,
            dim,
            axes,
            size,
        )


def _is_axes_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def param_specs(param_axes: Any, params: Any, rules: Rules, mesh: Mesh | None = None) -> Any:
    """``PartitionSpec`` pytree for ``params`` from its logical axes (``model.param_axes``).

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
    """

    def one(axes: Any, leaf: Any) -> PartitionSpec:
        shape = getattr(leaf, "shape", None)
        if axes is not None and shape is not None and len(axes) != len(shape):
            raise ValueError(
                f"logical axes {axes} do not match a parameter of shape {tuple(shape)}."
            )
        return logical_to_spec(axes, rules, mesh, shape)

    return jax.tree.map(one, param_axes, params, is_leaf=_is_axes_leaf)


def param_shardings(mesh: Mesh, param_axes: Any, params: Any, rules: Rules) -> Any:
    """``NamedSharding`` pytree for ``params`` (arrays or shape structs) under ``rules``.

    Example::

        shardings = param_shardings(mesh, model.param_axes, model.params, config.mesh.rules)
        lora_shardings = param_shardings(mesh, model.lora_axes(lora), lora, config.mesh.rules)
    """
    specs = param_specs(param_axes, params, rules, mesh)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh`` (scalars, step counters, PRNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(ndim: int) -> PartitionSpec:
    """``PartitionSpec`` for an input array: leading (batch) axis over ``("data", "fsdp")``."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))) if ndim else PartitionSpec()


def batch_sharding(mesh: Mesh, batch: Any) -> Any:
    """``NamedSharding`` pytree for a batch (dict of arrays): leading axis over data x fsdp."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x))), batch)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (``data * fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, *, field: str = "config.data.batch_size") -> None:
    """Raises a clear error when ``batch_size`` cannot be split over ``data * fsdp``."""
    ways = data_parallel_size(mesh)
    if batch_size % ways:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the data-parallel size "
            f"data*fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']} = {ways}."
        )


def shard_batch(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Places a *global* host batch (the same on every process) on the mesh, batch axis split."""
    for name, value in batch.items():
        if np.ndim(value) and np.shape(value)[0] % data_parallel_size(mesh):
            raise ValueError(
                f"batch[{name!r}] has leading size {np.shape(value)[0]}, not divisible by the "
                f"data-parallel size {data_parallel_size(mesh)}."
            )
    shardings = batch_sharding(mesh, dict(batch))
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), shardings)
    # Every process holds the whole batch: each keeps the shards of its own devices.
    return {
        name: jax.make_array_from_process_local_data(
            shardings[name], np.asarray(value), np.shape(value)
        )
        for name, value in batch.items()
    }


def make_global_batch(mesh: Mesh, local_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Assembles a global batch from each process's shard (multi-host data loading).

    Every process calls this with its own ``local_batch`` (leading size = global batch /
    ``jax.process_count()``, e.g. from a data iterator sharded by
    ``(jax.process_index(), jax.process_count())``); the result is one global ``jax.Array`` per
    field, split over ``("data", "fsdp")``. On one process this is :func:`shard_batch`.
    """
    if jax.process_count() == 1:
        return shard_batch(mesh, local_batch)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        sharding = NamedSharding(mesh, batch_spec(value.ndim))
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def shard_params(mesh: Mesh, params: Any, param_axes: Any, rules: Rules) -> Any:
    """``jax.device_put`` of an existing parameter pytree under ``rules``."""
    return jax.device_put(params, param_shardings(mesh, param_axes, params, rules))


def sharded_init(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    param_axes: Any,
    rules: Rules,
    *args: Any,
) -> Any:
    """Runs ``init_fn(*args)`` so its outputs are born sharded (never whole on one device).

    ``jax.eval_shape`` gives the output shapes, the rules give their shardings, and
    ``jax.jit(init_fn, out_shardings=...)`` materialises each shard directly on its device
    (big_vision's recipe), so a model larger than one device's memory can be initialised.

    Args:
      init_fn: a pure function returning a parameter pytree (e.g. ``lambda key: module.init(...)``).
      mesh: the device mesh.
      param_axes: logical axes with the structure of ``init_fn``'s output, or a function of the
        output shapes returning them.
      rules: logical-axis rules.
      *args: arguments of ``init_fn`` (e.g. a PRNG key).
    """
    shapes = jax.eval_shape(init_fn, *args)
    axes = param_axes(shapes) if callable(param_axes) else param_axes
    shardings = param_shardings(mesh, axes, shapes, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
    """While a step for ``mesh`` is traced: the models' row constraints split the rows as the batch.

    The models mark the residual stream's leading axis with the logical name ``"batch"``
    (``nn.with_logical_constraint``); inside this context it resolves by
    :data:`ACTIVATION_RULES` on ``mesh``'s abstract mesh, so every device computes its own rows.
    With no mesh, or batch axes of size 1, it does nothing: no rule names ``"batch"`` and a
    single-device step is traced exactly as before.
    """
    if mesh is None or data_parallel_size(mesh) == 1:
        yield
        return
    with (
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
        nn.logical_axis_rules(ACTIVATION_RULES),
    ):
        yield


def with_activation_sharding(mesh: Mesh | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced inside :func:`activation_sharding` of ``mesh`` (wrap a step before ``jit``).

    Every jitted train and eval step of :mod:`prefjax.train` is wrapped so.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with activation_sharding(mesh):
            return fn(*args, **kwargs)

    return wrapped


def tree_specs(tree: Any) -> Any:
    """The ``PartitionSpec`` of every array leaf (handy for logs and tests)."""
    return jax.tree.map(lambda x: x.sharding.spec, tree)


def rules_from_config(mesh_config: Any) -> tuple[tuple[str, Any], ...]:
    """``config.mesh.rules`` validated (``DEFAULT_RULES`` when missing; ``()`` replicates all)."""
    rules = mesh_config.get("rules", None) if hasattr(mesh_config, "get") else None
    if rules is None:
        rules = DEFAULT_RULES
    rules = tuple(tuple(r) if isinstance(r, list) else r for r in rules)
    validate_rules(rules)
    return rules
