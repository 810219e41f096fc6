"""Reference log-probs computed ahead of training (``algorithm.reference="precomputed"``).

:func:`precompute_reference_logps` runs the reference once over a dataset; the result becomes
a dataset column (``ref_logps``, ``[N, 2]`` for pairs and ``[N, K]`` for rankings), so a run
never holds the reference in memory. :func:`add_reference_logps` does that for a run's
train and held-out data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from prefjax import sharding as shd
from prefjax.data import batching
from prefjax.train import common


def add_reference_logps(config, model, mesh, datasets) -> None:
    """One reference pass over each dataset (the run's train and held-out data)."""
    chunk = int(config.model.logps_chunk_size)
    for ds in datasets:
        cols = precompute_reference_logps(
            model,
            model.params,
            ds,
            batch_size=config.data.eval_batch_size,
            mesh=mesh,
            chunk_size=chunk,
        )
        ds.add_columns(**cols)


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
