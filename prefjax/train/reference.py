"""Reference log-probs computed ahead of training (``algorithm.reference="precomputed"``).

:func:`precompute_reference_logps` runs the reference once over a dataset; the result becomes
a dataset column (``ref_logps``, ``[N, 2]`` for pairs and ``[N, K]`` for rankings), so a run
never holds the reference in memory. :func:`add_reference_logps` does that for a run's
train and held-out data, and with ``config.algorithm.reference_cache_dir`` set keeps each result
on disk under a key of what determines it -- a fingerprint of the reference weights, of the
tokenised dataset and of the sequence layout (batch size and data-parallel split, which set each
example's padding, the log-prob chunking and the compute dtypes) -- so later runs and sweeps over
the same reference and data load it instead of recomputing it, and a change to either is a miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import prefjax
from prefjax import sharding as shd
from prefjax.data import batching
from prefjax.train import common
from prefjax.train import workdir as run_dir


def add_reference_logps(config, model, mesh, datasets) -> list[str]:
    """One reference pass over each dataset (the run's train and held-out data).

    With ``config.algorithm.reference_cache_dir`` set, a dataset whose key (:func:`cache_key`)
    is already in the cache is loaded from it and a new result is added to it.

    Returns:
      per dataset, ``"computed"``, ``"cached"`` (computed and stored) or ``"reused"``.
    """
    chunk = int(config.model.logps_chunk_size)
    cache_dir = config.algorithm.reference_cache_dir
    layout = {
        "batch_size": int(config.data.eval_batch_size),
        "data_parallel": int(shd.data_parallel_size(mesh)),
        "logps_chunk_size": chunk,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "attention_impl": config.model.attention_impl,
    }
    weights = params_fingerprint(model.params) if cache_dir else ""
    outcomes = []
    for ds in datasets:
        path = os.path.join(cache_dir, cache_key(weights, ds, layout) + ".npz") if cache_dir else ""
        cols = _load(path, ds) if path else None
        if cols is not None:
            outcomes.append("reused")
        else:
            cols = precompute_reference_logps(
                model,
                model.params,
                ds,
                batch_size=config.data.eval_batch_size,
                mesh=mesh,
                chunk_size=chunk,
            )
            if path and jax.process_index() == 0:
                _store(path, cols, {"weights": weights, "layout": layout, "examples": len(ds)})
            outcomes.append("cached" if path else "computed")
        ds.add_columns(**cols)
    return outcomes


def params_fingerprint(params: Any) -> str:
    """A fingerprint of a parameter pytree: its structure, shapes, dtypes and every value.

    Two checksums of each leaf's bits (a plain and a position-weighted sum, modulo 2^32) are
    computed on the devices where the leaf lives, so sharded or multi-host parameters are never
    gathered; any change of a value, a shape or the tree changes the result.
    """

    def checksums(x):
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
        weight = (jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | 1
        return jnp.stack(
            [jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)]
        )

    leaves, treedef = jax.tree.flatten(params)
    sums = jax.device_get(jax.jit(lambda xs: [checksums(x) for x in xs])(leaves))
    h = hashlib.sha256(str(treedef).encode())
    for leaf, pair in zip(leaves, sums, strict=True):
        h.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
        h.update(np.asarray(pair, np.uint32).tobytes())
    return "params:" + h.hexdigest()


def cache_key(weights: str, dataset: Any, layout: Mapping[str, Any]) -> str:
    """The cache file name of ``dataset``'s reference log-probs: a SHA-256 of the reference
    weights' fingerprint, the tokenised dataset's fingerprint (without any ``ref_logps``
    column) and the sequence layout, plus the prefjax version."""
    columns = {k: v for k, v in dataset.columns.items() if k != "ref_logps"}
    data = run_dir.data_fingerprint(
        [_Columns(dataset.kind, dataset.max_len, columns, len(dataset))]
    )
    blob = json.dumps(
        {"weights": weights, "data": data, "layout": dict(layout), "version": prefjax.__version__},
        sort_keys=True,
    )
    return "ref_logps-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclasses.dataclass
class _Columns:
    """A dataset's columns without its reference log-probs, for its fingerprint."""

    kind: str
    max_len: int
    columns: dict
    size: int

    def __len__(self) -> int:
        return self.size


def _load(path: str, dataset: Any) -> dict[str, np.ndarray] | None:
    """The cached columns at ``path``, or ``None`` when there are none (a miss)."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        ref_logps = f["ref_logps"]
    if ref_logps.shape[0] != len(dataset):  # a truncated or foreign file: recompute
        return None
    return {"ref_logps": ref_logps}


def _store(path: str, columns: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Writes the cache file atomically (a reader sees the whole file or none)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path[: -len(".npz")] + ".json", "w") as f:  # what the key was made of
        json.dump(dict(meta), f, indent=1, sort_keys=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **columns)
    os.replace(tmp, path)


def precompute_reference_logps(
    model: Any,
    ref_params: Any,
    dataset_or_batches: Any,
    *,
    batch_size: int = 32,
    mesh: Any = None,
    chunk_size: int = 0,
    seq_len: int | None = None,
    rules: Any = None,
) -> dict[str, np.ndarray]:
    """One reference pass over a dataset; the result becomes dataset columns.

    After ``ds = ds.add_columns(**precompute_reference_logps(model, ref_params, ds))`` every
    batch carries the reference log-probs and a DPO run with ``reference="precomputed"`` never
    loads the reference again.

    Args:
      model: the reference model (LM head).
      ref_params: its parameters.
      dataset_or_batches: a ``prefjax.data.TokenizedDataset`` (pairwise or listwise; read in
        order, each example exactly once) or an iterable of batches (each processed in order;
        padding rows marked by ``example_mask`` are dropped).
      batch_size: examples per forward pass when given a dataset.
      mesh: optional mesh; batches are split over ``("data", "fsdp")`` (the size is rounded up
        to a multiple of the data-parallel size with padding rows) and ``ref_params`` are
        sharded by ``rules`` (default ``prefjax.sharding.DEFAULT_RULES``).
      chunk_size: vocabulary-chunked log-probs (see ``config.model.logps_chunk_size``).
      seq_len: pad every batch to this length (default: the dataset's bucket for each batch).

    Returns:
      ``{"ref_logps": [N, K]}`` (float32, summed over response tokens): ``K = 2`` (chosen,
      rejected) for pairs; for rankings 0 where an example has fewer than ``K`` responses.
    """
    if mesh is not None:
        ways = shd.data_parallel_size(mesh)
        batch_size = -(-batch_size // ways) * ways
        # The reference lives on the same mesh as the batches, sharded by the rules.
        ref_params = shd.shard_params(
            mesh, ref_params, model.param_axes, shd.DEFAULT_RULES if rules is None else rules
        )

    @jax.jit
    def logps_fn(params, ids, attn, lmask):
        return common.response_logps(model, params, ids, attn, lmask, chunk_size=chunk_size)[0]

    def batches() -> Iterable[Mapping[str, Any]]:
        if not hasattr(dataset_or_batches, "kind"):
            yield from dataset_or_batches
            return
        ds = dataset_or_batches
        if ds.kind not in ("pairwise", "listwise"):
            raise ValueError(
                f"precompute_reference_logps: dataset kind {ds.kind!r} (expected pairwise or "
                "listwise)."
            )
        buckets = batching.default_buckets(ds.max_len)
        lengths = ds.lengths()
        for start in range(0, len(ds), batch_size):
            idx = np.arange(start, min(start + batch_size, len(ds)))
            length = seq_len or batching.bucket_length(int(lengths[idx].max()), buckets)
            idx = np.concatenate([idx, -np.ones(batch_size - len(idx), np.int64)])
            yield batching.collate(ds, idx, length)

    def run(ids, attn, lmask):
        ids, attn, lmask = (np.asarray(x) for x in (ids, attn, lmask))
        if mesh is not None:
            placed = shd.shard_batch(
                mesh, {"ids": ids, "attn": attn, "lmask": lmask}
            )  # leading axis over data x fsdp
            ids, attn, lmask = placed["ids"], placed["attn"], placed["lmask"]
        out = logps_fn(ref_params, ids, attn, lmask)
        if jax.process_count() > 1:  # gather the shards every process computed
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out)

    out = []
    for batch in batches():
        if np.ndim(batch["input_ids"]) != 3:
            raise ValueError(
                "precompute_reference_logps: batches must be pairwise or listwise "
                "(input_ids [batch, k, seq])."
            )
        num, k, _ = np.shape(batch["input_ids"])
        keep = np.asarray(batch.get("example_mask", np.ones(num, np.int32))) > 0
        # [batch, k, seq] -> [k * batch, seq]: one pass over every response, as the train step.
        tokens = (common.flatten_responses(np.asarray(batch[n])) for n in common.TOKENS)
        logps = common.unflatten_responses(run(*tokens), k)
        if "response_mask" in batch:
            logps = logps * np.asarray(batch["response_mask"])
        out.append(np.asarray(logps)[keep])
    return {"ref_logps": np.concatenate(out).astype(np.float32)}
