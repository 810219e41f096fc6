"""Reference log-probs computed ahead of training (``algorithm.reference="precomputed"``).

:func:`precompute_reference_logps` runs the reference once over a dataset; the result becomes
dataset columns (``ref_chosen_logps`` / ``ref_rejected_logps``, or ``ref_logps`` for rankings),
so a run never holds the reference in memory. :func:`add_reference_logps` does that for a run's
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
      Pairwise: ``{"ref_chosen_logps": [N], "ref_rejected_logps": [N]}``; listwise:
      ``{"ref_logps": [N, K]}`` (float32, summed over response tokens).
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

    chosen, rejected, listwise = [], [], []
    for batch in batches():
        keep = np.asarray(batch.get("example_mask", np.ones(_leading(batch), np.int32))) > 0
        if "chosen_input_ids" in batch:
            num = batch["chosen_input_ids"].shape[0]
            ids = np.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
            attn = np.concatenate(
                [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
            )
            lmask = np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
            out = run(ids, attn, lmask)
            chosen.append(out[:num][keep])
            rejected.append(out[num:][keep])
        elif np.ndim(batch["input_ids"]) == 3:
            num, k, seq = batch["input_ids"].shape
            ids, attn, lmask = (
                np.asarray(batch[n]).reshape(num * k, seq)  # [batch, k, seq] -> [batch * k, seq]
                for n in ("input_ids", "attention_mask", "loss_mask")
            )
            out = run(ids, attn, lmask)
            out = out.reshape(num, k) * np.asarray(batch["response_mask"])
            listwise.append(out[keep])
        else:
            raise ValueError(
                "precompute_reference_logps: batches must be pairwise (chosen_input_ids, ...) or "
                "listwise (input_ids [batch, k, seq])."
            )
    if listwise:
        return {"ref_logps": np.concatenate(listwise).astype(np.float32)}
    return {
        "ref_chosen_logps": np.concatenate(chosen).astype(np.float32),
        "ref_rejected_logps": np.concatenate(rejected).astype(np.float32),
    }


def _leading(batch: Mapping[str, Any]) -> int:
    for name in ("chosen_input_ids", "input_ids"):
        if name in batch:
            return int(np.shape(batch[name])[0])
    raise ValueError("batch has neither chosen_input_ids nor input_ids")
