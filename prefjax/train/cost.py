r"""What a train step costs, read from the compiled program without materialising a weight.

:func:`compile_train_step` lowers and compiles the exact train step the loop runs
(:func:`prefjax.train.setup.make_train_step`, jitted by :func:`prefjax.train.common.jit_steps`
with the run's shardings) from ``jax.ShapeDtypeStruct`` s only: the parameters come from
``jax.eval_shape`` of the model's initialiser, the optimiser state from ``jax.eval_shape`` of
``tx.init``, the batch from the algorithm's layout. Nothing is allocated, so a Llama-1B step can be
compiled on a laptop to read its cost. :func:`step_cost` reads XLA's

* ``compiled.cost_analysis()``: ``flops`` and ``bytes accessed`` of the program, per device;
* ``compiled.memory_analysis()``: argument, output, alias (donated and reused) and temporary
  buffer sizes per device; the predicted peak is ``arguments + temporaries + outputs - aliased``.

:func:`analytical_flops` writes the count out. With ``N_l`` the matmul FLOPs of one token through
layer weights and the LM head (``2 x`` multiply-adds), per sequence of ``T`` tokens:

.. math::

    F_{fwd} = T\,\big(L\,(2 D D_h (H + 2K) + 2 H D_h D + 2 D F m) + 2 D V\big)
              + L \cdot 2 \cdot 2\,T^2 H D_h

(``m`` = 3 for a gated MLP, 2 otherwise; the last term is ``Q K^T`` and ``P V`` over the full
``T x T`` score matrix, which the XLA attention computes whole, masked rather than skipped). A step
costs ``3 F_fwd`` for the policy (forward, and a backward of twice the forward: one matmul for the
input gradient and one for the weight gradient of every forward matmul), ``F_fwd`` for a live
reference (``"copy"``, ``"lora_base"``), nothing for ``"precomputed"`` reference log-probs; under
LoRA the frozen base gets no weight gradient, so the policy costs ``2 F_fwd`` plus three times the
adapters' matmuls. Elementwise work (norms, softmax, rotary, activations, log-softmax, AdamW) is
left out of the count: it is what the compiled count adds on top (:data:`FLOP_BOUND`).

XLA's cost analysis counts the body of a while loop once, whatever its trip count, and the
layers are one ``nn.scan``: :func:`compile_train_step` therefore compiles with the layer scan
unrolled (``TransformerConfig.scan_unroll``; the same arithmetic, one copy of the block per layer)
unless asked not to, so the count covers every layer. With gradient accumulation the micro-batch
scan is a loop as well; :func:`compile_train_step` compiles one micro-batch per step for the FLOP
count (``count_flops=True``) -- the FLOPs of a step are additive over micro-batches -- and the
configured accumulation for the memory figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefjax import models
from prefjax import sharding as shd
from prefjax.train import common, optim
from prefjax.train import setup as train_setup
from prefjax.train.state import TrainState

# The compiled FLOPs of a step may exceed :func:`analytical_flops` by at most this factor. The
# excess is the elementwise work the analytical count leaves out, and it shrinks with the width:
# about a dozen FLOPs per element of the activations (norms, residuals, rotary, SiLU/GELU), five
# to ten per attention score (mask, max, exp, sum, divide; forward and backward) against the
# ``4 * Dh`` of the score matmuls, and about ten per logit (log-softmax, its gradient) against
# ``2 * D``. At the tiny preset (D = 64, Dh = 16) that is a few per cent (measured 1.04-1.05), at
# GPT-2 width one to two (measured 1.008 with 2 of its layers, 1.024 with all 12). A step that
# recomputes the policy forward (``remat="full"``: 5 instead of 4 forwards with a live reference,
# 1.25x) or that runs the reference twice exceeds it.
FLOP_BOUND = 1.10

# The audited program is analysed, never run: XLA's HLO passes (fusion, CSE, buffer assignment,
# what the cost and memory analyses read) run as usual, only the backend's code generation is
# left unoptimised, which halves the compile time and changes neither analysis.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class StepCost:
    """XLA's figures for one compiled step, per device.

    Attributes:
      flops: ``cost_analysis()["flops"]`` (a loop body counted once).
      bytes_accessed: ``cost_analysis()["bytes accessed"]``.
      argument_bytes: inputs (state, batch, frozen tree, key).
      output_bytes: outputs (new state, metrics).
      alias_bytes: outputs written into donated inputs (counted in both of the above).
      temp_bytes: temporaries (activations kept for the backward, workspace).
    """

    flops: float
    bytes_accessed: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """``arguments + temporaries + outputs - aliased``: the live bytes at the step's peak."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def step_cost(compiled: Any) -> StepCost:
    """The :class:`StepCost` of a ``jax.stages.Compiled``."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0]
    memory = compiled.memory_analysis()
    return StepCost(
        flops=float(analysis.get("flops", 0.0)),
        bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
    )


# ----------------------------------------------------------------------------------------------
# The analytical count
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """The analytical FLOPs of one train step (all devices together).

    Attributes:
      forward: ``F_fwd`` of the whole batch (all sequences): layer and LM-head matmuls plus the
        attention score and value matmuls.
      attention: the attention part of ``forward``.
      policy: the policy's forward and backward.
      reference: the reference forward (0 when precomputed).
    """

    forward: float
    attention: float
    policy: float
    reference: float

    @property
    def total(self) -> float:
        """``policy + reference``."""
        return self.policy + self.reference


def forward_flops_per_token(cfg: models.TransformerConfig, seq_len: int) -> tuple[float, float]:
    """``(matmul, attention)`` FLOPs of one token's forward in a sequence of ``seq_len`` tokens.

    ``matmul`` = ``L (2 D Dh (H + 2K) + 2 H Dh D + 2 D F m) + 2 D V``; ``attention`` =
    ``L * 4 T H Dh`` (this token's row of ``Q K^T`` and of ``P V``, full length ``T``).
    """
    d, hd, h, k = cfg.hidden_size, cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    mlp = 2 * d * cfg.mlp_dim * (3 if cfg.gated_mlp else 2)
    layer = 2 * d * hd * (h + 2 * k) + 2 * h * hd * d + mlp
    matmul = cfg.num_layers * layer + 2 * d * cfg.vocab_size
    attention = cfg.num_layers * 4 * seq_len * h * hd
    return float(matmul), float(attention)


def lora_flops_per_token(
    cfg: models.TransformerConfig, rank: int, targets: tuple[str, ...]
) -> float:
    """Forward FLOPs of the adapters ``x -> (x a) b`` of one token: ``2 r (in + out)`` each."""
    d, hd, h, k, f = (
        cfg.hidden_size,
        cfg.resolved_head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.mlp_dim,
    )
    sizes = {
        "q_proj": (d, h * hd),
        "k_proj": (d, k * hd),
        "v_proj": (d, k * hd),
        "o_proj": (h * hd, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    return float(cfg.num_layers * sum(2 * rank * sum(sizes[t]) for t in targets))


def analytical_flops(
    cfg: models.TransformerConfig,
    *,
    num_sequences: int,
    seq_len: int,
    reference: str,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
) -> FlopCount:
    """The step's FLOPs written out (see the module docstring).

    Args:
      cfg: the model.
      num_sequences: sequences per step (``2 * batch`` for pairs).
      seq_len: tokens per sequence ``T``.
      reference: ``"copy"``, ``"lora_base"`` (a live reference forward), ``"precomputed"`` or
        ``"none"`` (no reference pass).
      lora_rank, lora_targets: the adapters when the policy trains LoRA (``lora_rank > 0``).

    Returns:
      A :class:`FlopCount`: ``policy = 3 F_fwd`` (``2 F_fwd + 3 F_lora`` under LoRA), ``reference
      = F_fwd`` or 0.
    """
    matmul, attention = forward_flops_per_token(cfg, seq_len)
    tokens = num_sequences * seq_len
    forward = tokens * (matmul + attention)
    if lora_rank:
        policy = 2 * forward + 3 * tokens * lora_flops_per_token(cfg, lora_rank, lora_targets)
    else:
        policy = 3 * forward
    live = reference in ("copy", "lora_base")
    return FlopCount(
        forward=forward,
        attention=tokens * attention,
        policy=policy,
        reference=forward if live else 0.0,
    )


# ----------------------------------------------------------------------------------------------
# Abstract inputs and the compiled step
# ----------------------------------------------------------------------------------------------


def _with_sharding(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` s of ``tree`` carrying ``shardings`` (a matching pytree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def model_config(config: Any) -> models.TransformerConfig:
    """The :class:`~prefjax.models.TransformerConfig` of ``config.model`` (a named preset)."""
    if config.model.path:
        raise ValueError(
            f"config.model.path={config.model.path!r}: the cost audit builds a preset's shapes; "
            "set config.model.path='' and config.model.preset (or pass model_cfg)."
        )
    return models.preset(config.model.preset, **common.model_overrides(config))


def abstract_batch(
    config: Any, algorithm: Any, mesh: Mesh, *, num_responses: int = 2
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global batch of ``algorithm`` for ``config.data`` (``batch_size`` rows
    of ``max_len`` tokens), split over ``("data", "fsdp")`` as the loop places it.

    Layouts (see :func:`prefjax.data.collate`): pairwise ``[batch, 2, seq]`` token arrays (plus
    ``ref_logps [batch, 2]`` with a precomputed reference); listwise ``[batch, k, seq]`` and
    ``response_mask [batch, k]``; sft ``[batch, seq]``; unpaired ``[batch, seq]`` and ``label``.
    """
    batch, seq = int(config.data.batch_size), int(config.data.max_len)
    kind = algorithm.batch_kind(config)
    k = {"pairwise": 2, "listwise": num_responses}.get(kind)
    lead = (batch,) if k is None else (batch, k)
    out = {name: jax.ShapeDtypeStruct(lead + (seq,), jnp.int32) for name in common.TOKENS}
    if kind == "listwise":
        out["response_mask"] = jax.ShapeDtypeStruct((batch, k), jnp.int32)
    if kind == "unpaired":
        out["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if algorithm.reference(config) == "precomputed":
        out["ref_logps"] = jax.ShapeDtypeStruct(lead, jnp.float32)
    sharding = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))
    return {
        name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for name, x in out.items()
    }


def abstract_inputs(
    config: Any, algorithm: Any, model: models.Model, mesh: Mesh
) -> tuple[TrainState, Any, Any, Any, Any]:
    """``(state, frozen, state_sharding, frozen_sharding, schedule)`` as shapes: what
    :func:`prefjax.train.setup.build_setup` would hold, without an array.

    The parameters are ``jax.eval_shape`` of the model's initialiser; LoRA adapters, the
    optimiser state and the ``TrainState`` the same; each carries the sharding the rules give it.
    """
    cfg, head = model.config, model.head
    rules = shd.rules_from_config(config.mesh)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda k: models.Model.init(cfg, k, head=head).params, key)
    reference = algorithm.reference(config)
    if common.uses_lora(config):
        lora = config.model.lora
        trainable = jax.eval_shape(
            lambda k, p: models.Model(cfg, p, head=head).init_lora(
                k,
                rank=lora.rank,
                alpha=float(lora.alpha),
                targets=tuple(lora.targets),
                dropout=float(lora.dropout),
            ),
            key,
            params,
        )
        trainable_axes = model.lora_axes(trainable)
        frozen, frozen_axes = params, model.param_axes
    else:
        trainable, trainable_axes = params, model.param_axes
        keep = reference == "copy"
        frozen, frozen_axes = (params, model.param_axes) if keep else (None, None)
    params_sharding = shd.param_shardings(mesh, trainable_axes, trainable, rules)
    state_sharding = common.state_sharding(mesh, tx, trainable, params_sharding)
    state = jax.eval_shape(lambda p: TrainState.create(params=p, tx=tx), trainable)
    state = _with_sharding(state, state_sharding)
    frozen_sharding = None
    if frozen is not None:
        frozen_sharding = shd.param_shardings(mesh, frozen_axes, frozen, rules)
        frozen = _with_sharding(frozen, frozen_sharding)
    return state, frozen, state_sharding, frozen_sharding, schedule


def compile_train_step(
    config: Any,
    algorithm: Any,
    mesh: Mesh,
    *,
    model_cfg: models.TransformerConfig | None = None,
    count_flops: bool = True,
    num_responses: int = 2,
) -> Any:
    """The compiled train step of ``algorithm`` for ``config`` on ``mesh``, from shapes only.

    Args:
      config: a run config (``config.model``, ``config.data.batch_size`` / ``max_len``,
        ``config.optimizer``, ``config.mesh.rules``, ``config.algorithm``).
      algorithm: the algorithm module (``prefjax.train.dpo``, ``sft``, ``reward``).
      mesh: the device mesh (e.g. ``jax.make_mesh`` over simulated CPU devices).
      model_cfg: the model's shape; default the preset ``config.model`` names, with its dtype,
        remat and attention fields.
      count_flops: compile for the FLOP count: the layer scan unrolled and one micro-batch per
        step (the module docstring says why). ``False`` compiles the step as the loop runs it
        (scanned layers, ``config.optimizer.grad_accum_steps`` micro-batches): the memory figures.
      num_responses: ``k`` of a listwise batch.

    Returns:
      A ``jax.stages.Compiled``; :func:`step_cost` reads it.
    """
    cfg = model_config(config) if model_cfg is None else model_cfg
    if count_flops:
        cfg = cfg.replace(scan_unroll=True)
        config = config.copy_and_resolve_references()
        config.optimizer.grad_accum_steps = 1
    model = models.Model(cfg, None, head=algorithm.HEAD)
    state, frozen, state_sharding, frozen_sharding, schedule = abstract_inputs(
        config, algorithm, model, mesh
    )
    train_step = train_setup.make_train_step(algorithm, model, config, mesh=mesh, schedule=schedule)
    jit_train, _, _ = common.jit_steps(
        mesh,
        train_step,
        train_setup.make_eval_step(algorithm, model, config),
        state_sharding,
        frozen_sharding,
    )
    batch = abstract_batch(config, algorithm, mesh, num_responses=num_responses)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    return jit_train.lower(state, batch, frozen, key).compile(compiler_options=COMPILER_OPTIONS)
