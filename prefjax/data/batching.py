"""Fixed-shape batches, length buckets, and a resumable, sharded batch iterator.

Batches are dicts of NumPy arrays (layouts in ``docs/data.md`` and the module docstring of
:mod:`prefjax.data`). Every batch of an iterator has the same batch size, and its sequence
length is one of a few *bucket* lengths (by default powers of two up to ``max_len``), so a
jitted step compiles once per bucket rather than once per batch.

The iterator (:class:`BatchIterator`) is a ``grain.MapDataset`` of *batch plans*: batch ``i``
of epoch ``e`` is a pure function of ``(seed, e, i)``, so the iterator's position is one
integer (``{"next_index": i}`` from grain plus a fingerprint), a resumed run sees exactly the
batches an uninterrupted run would, and every process of a multi-host job computes the same
global plan and keeps its own slice of each global batch: shards are disjoint, cover the data,
and agree on the bucket length.
"""

from __future__ import annotations

import functools
import math
import sys

import grain
import jax
import numpy as np

from prefjax.data.dataset import TokenizedDataset
from prefjax.data.packing import (
    num_segments_per_example,
    pack,
    padding_fraction,
    round_rows,
    rows_needed,
    sequence_lengths,
)


def default_buckets(max_len: int, min_bucket: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` below ``max_len``, then ``max_len`` itself.

    >>> default_buckets(100)
    (16, 32, 64, 100)
    """
    out = []
    b = min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def bucket_length(length: int, buckets) -> int:
    """The smallest bucket ``>= length``.

    >>> bucket_length(33, (16, 32, 64))
    64
    """
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(
        f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}"
    )


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids ``cumsum(mask) - 1`` clipped at 0 (so left padding starts real tokens at 0)."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int32)


def _pack(seqs, masks_from, seq_len: int, pad_id: int, pad_side: str):
    """``seqs`` list of (prompt, response) int arrays -> ids, attention mask, loss mask
    ``[n, seq_len]``; rows whose pair is ``None`` stay fully padded."""
    n = len(seqs)
    ids = np.full((n, seq_len), pad_id, np.int32)
    attn = np.zeros((n, seq_len), np.int32)
    loss = np.zeros((n, seq_len), np.int32)
    for i, pr in enumerate(seqs):
        if pr is None:
            continue
        p, r = pr
        length = len(p) + len(r)
        start = 0 if pad_side == "right" else seq_len - length
        ids[i, start : start + len(p)] = p
        ids[i, start + len(p) : start + length] = r
        attn[i, start : start + length] = 1
        if masks_from:
            loss[i, start + len(p) : start + length] = 1
    return ids, attn, loss


def _step_arrays(seqs, step_labels, seq_len: int, pad_side: str) -> dict[str, np.ndarray]:
    """``step_labels`` / ``step_mask`` ``[n, seq_len]`` of (prompt, response) ``seqs`` whose
    responses carry token-aligned labels (-1: no step ends at this token)."""
    n = len(seqs)
    labels = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, (pr, lab) in enumerate(zip(seqs, step_labels, strict=True)):
        if pr is None:
            continue
        p, r = pr
        start = (0 if pad_side == "right" else seq_len - len(p) - len(r)) + len(p)
        labels[i, start : start + len(r)] = np.maximum(lab, 0)
        mask[i, start : start + len(r)] = lab >= 0
    return {"step_labels": labels, "step_mask": mask}


def collate(
    ds: TokenizedDataset,
    indices,
    seq_len: int,
    *,
    pad_side: str = "right",
    num_responses: int | None = None,
    with_positions: bool = False,
    with_example_mask: bool | None = None,
) -> dict[str, np.ndarray]:
    """Builds one batch from the examples at ``indices`` (``-1`` = padding row).

    Layouts (all ``int32`` unless noted; ``loss_mask`` marks response tokens including EOS):

    * pairwise: ``input_ids, attention_mask, loss_mask`` ``[batch, 2, seq]``, index 0 the chosen
      response and 1 the rejected one (a ranking of two); the step reads them as they are.
    * sft / unpaired: ``input_ids, attention_mask, loss_mask`` ``[batch, seq]`` (+ ``label``).
    * listwise: ``input_ids, attention_mask, loss_mask`` ``[batch, k, seq]`` best first, and
      ``response_mask [batch, k]``.
    * prompt: ``prompt_input_ids, prompt_attention_mask`` ``[batch, seq]`` (use
      ``pad_side="left"`` for generation).
    * step: as sft, plus ``step_labels`` and ``step_mask`` ``[batch, seq]``: 1 in ``step_mask``
      at each labelled step's separator token, where ``step_labels`` holds its 0/1 label (0
      elsewhere).

    Numeric extra columns are gathered under their own names. ``example_mask [batch]`` (1 real,
    0 padding row) is added when ``with_example_mask`` is true, or (default ``None``) when any
    index is ``-1``.
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    idx = np.asarray(indices, np.int64)
    real = idx >= 0
    safe = np.where(real, idx, 0)
    c = ds.columns
    pad = ds.pad_id
    prompts = [c["prompt_ids"][j] if ok else None for j, ok in zip(safe, real, strict=True)]
    batch: dict[str, np.ndarray] = {}

    def responses(groups, k):
        # k (prompt, response) sequences per example, None for an empty slot or a padding row:
        # [batch * k, seq] -> [batch, k, seq].
        seqs = [
            None if p is None or y is None else (p, y)
            for p, ys in zip(prompts, groups, strict=True)
            for y in ys
        ]
        ids, attn, loss = _pack(seqs, True, seq_len, pad, pad_side)
        for name, x in (("input_ids", ids), ("attention_mask", attn), ("loss_mask", loss)):
            batch[name] = x.reshape(len(idx), k, seq_len)
        if with_positions:
            batch["positions"] = positions_from_mask(batch["attention_mask"])

    if ds.kind == "pairwise":
        responses([(c["chosen_ids"][j], c["rejected_ids"][j]) for j in safe], 2)
    elif ds.kind in ("sft", "unpaired"):
        seqs = [
            None if p is None else (p, c["response_ids"][j])
            for p, j in zip(prompts, safe, strict=True)
        ]
        ids, attn, loss = _pack(seqs, True, seq_len, pad, pad_side)
        batch.update(input_ids=ids, attention_mask=attn, loss_mask=loss)
        if with_positions:
            batch["positions"] = positions_from_mask(attn)
    elif ds.kind == "step":
        seqs = [
            None if p is None else (p, c["response_ids"][j])
            for p, j in zip(prompts, safe, strict=True)
        ]
        ids, attn, loss = _pack(seqs, True, seq_len, pad, pad_side)
        batch.update(input_ids=ids, attention_mask=attn, loss_mask=loss)
        batch.update(_step_arrays(seqs, [c["step_labels"][j] for j in safe], seq_len, pad_side))
        if with_positions:
            batch["positions"] = positions_from_mask(attn)
    elif ds.kind == "prompt":
        seqs = [None if p is None else (p, p[:0]) for p in prompts]
        ids, attn, _ = _pack(seqs, False, seq_len, pad, pad_side)
        batch["prompt_input_ids"] = ids
        batch["prompt_attention_mask"] = attn
        if with_positions:
            batch["prompt_positions"] = positions_from_mask(attn)
    elif ds.kind == "listwise":
        k = num_responses or ds.num_responses()
        rmask = np.zeros((len(idx), k), np.int32)
        groups = []
        for b, (p, j) in enumerate(zip(prompts, safe, strict=True)):
            ys = [] if p is None else list(c["responses_ids"][j])
            if len(ys) > k:
                raise ValueError(f"example {j} has {len(ys)} responses, batch allows {k}")
            rmask[b, : len(ys)] = 1
            groups.append(ys + [None] * (k - len(ys)))
        responses(groups, k)
        batch["response_mask"] = rmask
    batch.update(example_columns(ds, idx))
    if with_example_mask or (with_example_mask is None and not real.all()):
        batch["example_mask"] = real.astype(np.int32)
    return batch


def example_columns(ds: TokenizedDataset, indices) -> dict[str, np.ndarray]:
    """The numeric per-example columns of the examples at ``indices`` (``-1``: zeros), 64-bit
    values as 32-bit (JAX runs without x64 by default); the ``label`` of unpaired data too."""
    idx = np.asarray(indices, np.int64)
    real = idx >= 0
    safe = np.where(real, idx, 0)
    out = {}
    if ds.kind == "unpaired":
        out["label"] = np.where(real, ds.columns["label"][safe], 0).astype(np.int32)
    for name in ds.batch_columns():
        if name == "label" and ds.kind == "unpaired":
            continue
        col = ds.columns[name]
        vals = col[safe]
        vals = np.where(real.reshape((-1,) + (1,) * (col.ndim - 1)), vals, 0).astype(col.dtype)
        if vals.dtype == np.float64:
            vals = vals.astype(np.float32)
        elif vals.dtype == np.int64:
            vals = vals.astype(np.int32)
        out[name] = vals
    return out


def collate_packed(
    ds: TokenizedDataset,
    indices,
    row_length: int,
    num_rows: int,
    *,
    num_responses: int | None = None,
    example_offset: int = 0,
) -> dict[str, np.ndarray]:
    """A packed batch of the examples at ``indices`` (layout in :mod:`prefjax.data.packing`):
    packed token arrays ``[num_rows, row_length]``, ``sequence_mask [batch, k]``,
    ``example_mask [batch]`` (always), and the per-example columns of :func:`collate`."""
    idx = np.asarray(indices, np.int64)
    k = num_segments_per_example(ds, num_responses)
    batch = pack(ds, idx, row_length, num_rows, num_responses=k, example_offset=example_offset)
    if ds.kind == "listwise":
        batch["response_mask"] = batch["sequence_mask"].copy()
    batch.update(example_columns(ds, idx))
    batch["example_mask"] = (idx >= 0).astype(np.int32)
    return batch


class _BatchPlan:
    """Random-access sequence of global batches: item ``i`` -> (local indices, seq_len)."""

    def __init__(self, it: BatchIterator):
        self.it = it
        self.per_epoch = it.batches_per_epoch
        self.length = sys.maxsize if it.num_epochs is None else self.per_epoch * it.num_epochs

    def __len__(self):
        return self.length

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one plan object per iterator)
    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        it = self.it
        n, bsz = len(it.dataset), it.batch_size
        rng = np.random.default_rng([it.seed, epoch])
        order = rng.permutation(n) if it.shuffle else np.arange(n)
        if it.group_by_length > 1:
            # Sort windows of `group_by_length` batches by length so batches are homogeneous
            # (less padding), then shuffle the batch order so lengths do not trend in an epoch.
            window = bsz * it.group_by_length
            lengths = it.lengths
            chunks = [order[s : s + window] for s in range(0, n, window)]
            order = np.concatenate(
                [ch[np.argsort(lengths[ch], kind="stable")] for ch in chunks if len(ch)]
            )
        batches = [order[s : s + bsz] for s in range(0, n, bsz)]
        if it.drop_remainder and batches and len(batches[-1]) < bsz:
            batches.pop()
        if batches and len(batches[-1]) < bsz:
            batches[-1] = np.concatenate([batches[-1], -np.ones(bsz - len(batches[-1]), np.int64)])
        if it.group_by_length > 1 and it.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def __getitem__(self, i: int):
        epoch, j = divmod(int(i), self.per_epoch)
        glob = self.epoch_plan(epoch)[j]
        local = self.it.local_batch_size
        p = self.it.process_index
        mine = glob[p * local : (p + 1) * local]
        if self.it.packing:
            # Rows (the batch's only varying size) agree across processes: each computes every
            # process's count from the shared global plan and takes the largest.
            it = self.it
            shards = (glob[q * local : (q + 1) * local] for q in range(it.process_count))
            rows = max(rows_needed(it.dataset, s, it.row_length, it.k) for s in shards)
            return mine, round_rows(rows, it.row_multiple)
        real = glob[glob >= 0]
        longest = int(self.it.lengths[real].max()) if len(real) else 1
        return mine, bucket_length(longest, self.it.buckets)


class BatchIterator:
    """Deterministic, resumable, sharded iterator of fixed-shape batches.

    Args:
      dataset: a :class:`TokenizedDataset`.
      batch_size: GLOBAL batch size (examples, or pairs for pairwise data); each process yields
        ``batch_size // process_count`` of them.
      seed: shuffling seed; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
      shuffle: shuffle every epoch (``False``: dataset order).
      num_epochs: ``None`` iterates forever.
      drop_remainder: drop the last partial batch of an epoch (default); otherwise pad it with
        fully masked rows, and every batch (so all steps and all processes share one structure)
        carries ``example_mask [batch]``.
      buckets: allowed sequence lengths (default :func:`default_buckets` of the dataset's
        ``max_len``, or of ``max_prompt_len`` for prompt datasets); a batch is padded to the
        smallest bucket that fits its longest example.
      pad_side: ``"right"`` or ``"left"``; default right for training batches and left for
        ``prompt`` datasets (generation appends to the right end of every row).
      group_by_length: if > 1, sort windows of this many batches by length before batching, so
        similar lengths share a batch (less padding, still deterministic).
      process_index, process_count: this process's shard (default ``jax.process_index()`` /
        ``jax.process_count()``).
      with_positions: also emit ``*positions`` arrays (``cumsum(mask) - 1``).
      packing: emit packed batches (:mod:`prefjax.data.packing`: the same examples per batch,
        their sequences side by side in rows with segment ids and per-segment positions) instead
        of padded ones; ``sft``, ``unpaired``, ``pairwise`` and ``listwise`` data.
      row_length: tokens per packed row (default the largest bucket, i.e. ``max_len``).
      row_multiple: packed rows per batch are rounded up to a multiple of this (per process; the
        number of devices the batch is split over).
      num_threads, prefetch: grain read options (batches prepared ahead in threads).

    ``get_state()`` returns a small JSON-able dict; ``set_state(state)`` resumes there.

    Example:
      >>> from prefjax.data.dataset import object_array
      >>> ids = object_array([np.arange(1, n + 1, dtype=np.int32) for n in (3, 5, 2, 7)])
      >>> ds = TokenizedDataset("prompt", {"prompt_ids": ids}, pad_id=0, max_len=8)
      >>> it = BatchIterator(ds, 2, seed=0, process_index=0, process_count=1)  # left-padded
      >>> first = next(it); state = it.get_state(); second = next(it)
      >>> it.set_state(state); np.array_equal(next(it)["prompt_input_ids"],
      ...                                      second["prompt_input_ids"])
      True
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        buckets=None,
        pad_side: str | None = None,
        group_by_length: int = 1,
        process_index: int | None = None,
        process_count: int | None = None,
        with_positions: bool = False,
        packing: bool = False,
        row_length: int | None = None,
        row_multiple: int = 1,
        num_threads: int = 1,
        prefetch: int = 2,
    ):
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be positive and divisible by "
                f"process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if pad_side is None:
            pad_side = "left" if dataset.kind == "prompt" else "right"
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
        if len(dataset) == 0:
            raise ValueError("cannot iterate over an empty dataset")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // process_count
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.drop_remainder = bool(drop_remainder)
        limit = dataset.max_len
        if dataset.kind == "prompt" and dataset.max_prompt_len is not None:
            limit = dataset.max_prompt_len
        self.buckets = tuple(sorted(buckets)) if buckets is not None else default_buckets(limit)
        self.pad_side = pad_side
        self.group_by_length = int(group_by_length)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.with_positions = with_positions
        self.lengths = dataset.lengths()
        if self.lengths.max(initial=0) > self.buckets[-1]:
            raise ValueError(
                f"longest example has {self.lengths.max()} tokens, largest bucket is "
                f"{self.buckets[-1]}"
            )
        n = len(dataset)
        self.batches_per_epoch = (
            n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)
        )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset has {n} examples, fewer than one batch of {batch_size} "
                "(use drop_remainder=False)"
            )
        self._num_responses = dataset.num_responses() if dataset.kind == "listwise" else None
        self.packing = bool(packing)
        self.row_length = int(row_length or self.buckets[-1])
        self.row_multiple = int(row_multiple)
        if self.packing:
            self.k = num_segments_per_example(dataset, self._num_responses)
            if self.row_length < self.lengths.max(initial=0) or self.row_multiple < 1:
                raise ValueError(
                    f"row_length={self.row_length} must hold the longest sequence "
                    f"({self.lengths.max()} tokens) and row_multiple={self.row_multiple} be >= 1"
                )
        plan = _BatchPlan(self)
        self._plan = plan
        ds = grain.MapDataset.source(plan).map(self._collate)
        opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._grain_dataset = ds
        self._iter = iter(ds.to_iter_dataset(opts))

    def _collate(self, item):
        indices, seq_len = item
        if self.packing:  # seq_len is the number of packed rows
            return collate_packed(
                self.dataset,
                indices,
                self.row_length,
                seq_len,
                num_responses=self._num_responses,
                example_offset=self.process_index * self.local_batch_size,
            )
        return collate(
            self.dataset,
            indices,
            seq_len,
            pad_side=self.pad_side,
            num_responses=self._num_responses,
            with_positions=self.with_positions,
            with_example_mask=not self.drop_remainder,
        )

    @property
    def grain_dataset(self) -> grain.MapDataset:
        """The underlying ``grain.MapDataset`` of batches (random access by global step)."""
        return self._grain_dataset

    def epoch_indices(self, epoch: int) -> list[np.ndarray]:
        """This process's example indices of every batch of ``epoch`` (-1 = padding row)."""
        out = []
        for j in range(self.batches_per_epoch):
            local, _ = self._plan[epoch * self.batches_per_epoch + j]
            out.append(local)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "process_count": self.process_count,
        }

    def get_state(self) -> dict:
        """JSON-able position: ``{"next_index": step, ...fingerprint}``."""
        state = dict(self._iter.get_state())
        state.update(self._fingerprint())
        return state

    def set_state(self, state: dict) -> None:
        """Resumes at ``state`` (from :meth:`get_state` of an iterator over the same data)."""
        mine = self._fingerprint()
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"iterator state was saved with {key}={state[key]!r}, this iterator has "
                    f"{key}={value!r}; resuming would not reproduce the batch sequence"
                )
        self._iter.set_state({"next_index": int(state["next_index"])})

    @property
    def step(self) -> int:
        """Number of batches consumed so far (the next batch's global index)."""
        return int(self._iter.get_state()["next_index"])


def padding_fractions(it: BatchIterator, epoch: int = 0) -> dict[str, float]:
    """The share of token slots that hold padding over one epoch of ``it``'s batches.

    Returns ``{"padded": ..., "packed": ...}``: the same batches (the same examples in each) as
    padded rows (every sequence a row of the batch's bucket length; padding rows count as
    padding) and as packed rows of ``it.row_length`` (:mod:`prefjax.data.packing`), whichever of
    the two ``it`` emits.
    """
    ds, k = it.dataset, num_segments_per_example(it.dataset, it._num_responses)
    real = padded = packed = 0
    for glob in it._plan.epoch_plan(epoch):
        lengths = sequence_lengths(ds, glob, k)
        real += int(lengths.sum())
        longest = int(it.lengths[glob[glob >= 0]].max()) if (glob >= 0).any() else 1
        padded += len(glob) * k * bucket_length(longest, it.buckets)
        local = it.local_batch_size
        shards = [glob[q * local : (q + 1) * local] for q in range(it.process_count)]
        rows = max(rows_needed(ds, s, it.row_length, k) for s in shards)
        packed += round_rows(rows, it.row_multiple) * it.process_count * it.row_length
    return {"padded": padding_fraction(real, padded), "packed": padding_fraction(real, packed)}


def eval_batches(dataset: TokenizedDataset, batch_size: int, **kw):
    """One ordered pass over ``dataset`` in fixed-shape batches, keeping every example: the
    last batch is padded with masked rows and carries ``example_mask`` (weight metrics by it).

    Keyword arguments go to :class:`BatchIterator` (e.g. ``process_index``/``process_count``).
    """
    kw = {"shuffle": False, "num_epochs": 1, "drop_remainder": False, **kw}
    return BatchIterator(dataset, batch_size, **kw)
