"""Packed (padding-free) batches: several sequences side by side in rows of a fixed length.

A padded batch gives every sequence a row as long as the batch's longest one; on real preference
data, whose lengths vary by 10x and more, most of that is padding. A packed batch places the same
examples' sequences one after another in ``num_rows`` rows of ``row_length`` tokens (first-fit
decreasing, deterministic), and marks which tokens belong together:

* ``input_ids, loss_mask`` ``[rows, row_length]`` as in a padded batch;
* ``attention_mask`` ``[rows, row_length]`` int32: 0 on padding, else the token's **segment id**
  ``e * k + i + 1`` for response ``i`` of example ``e`` of the (global) batch, ``k`` responses
  per example (2 for a pair: chosen and rejected are separate segments that share nothing, each
  with its own copy of the prompt). The model attends within a segment only;
* ``positions`` ``[rows, row_length]``: positions restart at 0 in every segment, so each sequence
  gets the rotary phases (or learned positions) it would have alone;
* ``sequence_mask`` ``[batch, k]`` int32: 1 where response ``i`` of example ``e`` exists (its
  shape carries the batch size and ``k`` into the step), and ``example_mask [batch]``;
* per-example columns (``label``, ``margin``, ``ref_logps``, gold rewards, ...) ``[batch, ...]``
  and, for rankings, ``response_mask [batch, k]``, as in a padded batch.

Every sequence is scored exactly as it would be in its own padded row: the step reads log-probs
and rewards per segment (``prefjax.train.common``), and attention, positions and the shifted
loss mask never cross a segment boundary. Which examples form batch ``i`` is the padded plan's
(:class:`~prefjax.data.batching.BatchIterator`), so packing is as deterministic and resumable as
padding; only the number of rows varies from batch to batch, rounded up to ``row_multiple`` (a
few compiled shapes; every process of a multi-host job uses the largest of their counts).
"""

from __future__ import annotations

import math

import numpy as np

from prefjax.data.dataset import TokenizedDataset

PACKABLE_KINDS = ("sft", "unpaired", "pairwise", "listwise")


def num_segments_per_example(ds: TokenizedDataset, num_responses: int | None = None) -> int:
    """``k``: responses per example (2 for pairs, 1 for SFT / unpaired, K for rankings)."""
    if ds.kind not in PACKABLE_KINDS:
        raise ValueError(f"packing needs one of {PACKABLE_KINDS} datasets, got {ds.kind!r}")
    if ds.kind == "pairwise":
        return 2
    if ds.kind == "listwise":
        return num_responses or ds.num_responses()
    return 1


def example_sequences(ds: TokenizedDataset, index: int, k: int) -> list:
    """The ``k`` ``(prompt_ids, response_ids)`` sequences of example ``index`` (``None`` for a
    missing ranking slot, all ``None`` for a padding row ``index = -1``)."""
    if index < 0:
        return [None] * k
    c = ds.columns
    prompt = c["prompt_ids"][index]
    if ds.kind == "pairwise":
        responses = [c["chosen_ids"][index], c["rejected_ids"][index]]
    elif ds.kind == "listwise":
        responses = list(c["responses_ids"][index])
        if len(responses) > k:
            raise ValueError(f"example {index} has {len(responses)} responses, batch allows {k}")
    else:
        responses = [c["response_ids"][index]]
    seqs = [(prompt, y) for y in responses]
    return seqs + [None] * (k - len(seqs))


def first_fit(lengths, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing bin packing of sequence ``lengths`` into rows of ``row_length``.

    Sequences are taken longest first (ties in their given order: a stable sort, so the result
    is a pure function of ``lengths``); each goes into the first row with room for it, or a new
    row.

    Returns:
      ``(row [n], offset [n], num_rows)``: where each sequence starts.

    Example:
      >>> row, offset, n = first_fit([5, 3, 4, 2], 8)
      >>> row.tolist(), offset.tolist(), n
      ([0, 0, 1, 1], [0, 5, 0, 4], 2)
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > row_length:
        raise ValueError(
            f"a sequence of {int(lengths.max())} tokens does not fit a packed row of {row_length}"
        )
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for j in np.argsort(-lengths, kind="stable"):
        n = int(lengths[j])
        r = next((r for r, u in enumerate(used) if u + n <= row_length), len(used))
        if r == len(used):
            used.append(0)
        row[j], offset[j] = r, used[r]
        used[r] += n
    return row, offset, len(used)


def sequence_lengths(ds: TokenizedDataset, indices, k: int) -> np.ndarray:
    """``[len(indices) * k]`` tokens of every sequence of the examples (0 for a missing one),
    example-major: response ``i`` of example ``e`` at ``e * k + i``."""
    out = np.zeros(len(indices) * k, np.int64)
    for e, j in enumerate(np.asarray(indices, np.int64)):
        for i, pr in enumerate(example_sequences(ds, int(j), k)):
            if pr is not None:
                out[e * k + i] = len(pr[0]) + len(pr[1])
    return out


def rows_needed(ds: TokenizedDataset, indices, row_length: int, k: int) -> int:
    """Rows the first-fit packing of the examples at ``indices`` takes (at least 1)."""
    lengths = sequence_lengths(ds, indices, k)
    return max(first_fit(lengths[lengths > 0], row_length)[2], 1)


def round_rows(rows: int, row_multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``row_multiple`` (the batch's device split)."""
    return int(math.ceil(rows / row_multiple) * row_multiple)


def pack(
    ds: TokenizedDataset,
    indices,
    row_length: int,
    num_rows: int,
    *,
    num_responses: int | None = None,
    example_offset: int = 0,
) -> dict[str, np.ndarray]:
    """The token arrays of a packed batch of the examples at ``indices`` (``-1`` = padding row).

    Args:
      ds: a packable :class:`TokenizedDataset` (``sft``, ``unpaired``, ``pairwise``,
        ``listwise``).
      indices: ``[batch]`` example indices.
      row_length: tokens per row.
      num_rows: rows of the batch (at least :func:`rows_needed`).
      num_responses: ``k`` of a ranking batch (default the dataset's largest).
      example_offset: index of this batch's first example in the global batch (multi-host: the
        process's shard starts there), so segment ids are unique across processes.

    Returns:
      ``input_ids, attention_mask (segment ids), positions, loss_mask`` ``[num_rows, row_length]``
      and ``sequence_mask [batch, k]`` (module docstring).
    """
    k = num_segments_per_example(ds, num_responses)
    idx = np.asarray(indices, np.int64)
    seqs = [pr for j in idx for pr in example_sequences(ds, int(j), k)]
    lengths = np.array([0 if pr is None else len(pr[0]) + len(pr[1]) for pr in seqs], np.int64)
    present = np.flatnonzero(lengths > 0)
    row, offset, needed = first_fit(lengths[present], row_length)
    if needed > num_rows:
        raise ValueError(f"the batch needs {needed} packed rows of {row_length}, got {num_rows}")
    shape = (num_rows, row_length)
    ids = np.full(shape, ds.pad_id, np.int32)
    segment = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    loss = np.zeros(shape, np.int32)
    for s, r, o in zip(present, row, offset, strict=True):
        prompt, response = seqs[s]
        n_p, n = len(prompt), len(prompt) + len(response)
        ids[r, o : o + n_p] = prompt
        ids[r, o + n_p : o + n] = response
        segment[r, o : o + n] = example_offset * k + s + 1
        positions[r, o : o + n] = np.arange(n)
        loss[r, o + n_p : o + n] = 1
    sequence_mask = (lengths > 0).astype(np.int32).reshape(len(idx), k)
    return {
        "input_ids": ids,
        "attention_mask": segment,
        "positions": positions,
        "loss_mask": loss,
        "sequence_mask": sequence_mask,
    }


def padding_fraction(real_tokens: int, total_tokens: int) -> float:
    """``1 - real / total``: the share of a batch's token slots that hold padding."""
    return 1.0 - real_tokens / total_tokens if total_tokens else 0.0
