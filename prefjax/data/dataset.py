"""Column-oriented tokenised datasets.

A :class:`TokenizedDataset` is a dict of NumPy arrays that share a leading example axis, plus a
``kind`` saying which batch layout it collates to. Token sequences are variable length, so they
are stored as object arrays whose elements are ``int32`` arrays (prompt and responses separately,
so loss masks are exact); every other column is an ordinary NumPy array.

Columns by kind (``*`` = token columns):

=========  ==========================================================================
pairwise   ``prompt_ids*``, ``chosen_ids*``, ``rejected_ids*``
sft        ``prompt_ids*``, ``response_ids*``
unpaired   ``prompt_ids*``, ``response_ids*``, ``label`` (1 desirable, 0 undesirable)
listwise   ``prompt_ids*``, ``responses_ids*`` (each element an object array of K_i
           token arrays, best first)
prompt     ``prompt_ids*``
step       ``prompt_ids*``, ``response_ids*`` (the steps, each followed by the step
           separator), ``step_labels*`` (aligned with ``response_ids``: the step's 0/1 label
           at its separator token, -1 at every other token)
=========  ==========================================================================

Every kind also has ``prompt_id`` (strings, the split/grouping key) and ``source_index`` (the
row's line or record index in its file). Numeric per-example columns — the optional ``margin``,
the built-in tasks' ``chosen_gold_reward``/``rejected_gold_reward``, or reference log-probs added
later with :meth:`TokenizedDataset.add_columns` — flow unchanged into every batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("pairwise", "sft", "unpaired", "listwise", "prompt", "step")

TOKEN_COLUMNS = {
    "pairwise": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "sft": ("prompt_ids", "response_ids"),
    "unpaired": ("prompt_ids", "response_ids"),
    "listwise": ("prompt_ids", "responses_ids"),
    "prompt": ("prompt_ids",),
    "step": ("prompt_ids", "response_ids", "step_labels"),
}

# Columns that describe the example but never travel in a batch (strings, bookkeeping).
META_COLUMNS = ("prompt_id", "source_index")


def object_array(items: Sequence) -> np.ndarray:
    """A 1-D object array holding ``items`` as elements (never broadcast into 2-D)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


class TokenizedDataset:
    """A tokenised dataset: named columns with a shared leading example axis.

    Args:
      kind: one of ``pairwise``, ``sft``, ``unpaired``, ``listwise``, ``prompt``.
      columns: name -> array with ``len == num_examples``. Token columns are object arrays of
        ``int32`` arrays (see the module docstring).
      pad_id: the tokenizer's padding id, used when collating batches.
      max_len: the ``max_len`` the examples were truncated to (total prompt + response tokens).
      max_prompt_len: the prompt limit used when truncating (``None`` if prompts were not cut).
      info: free-form statistics from tokenisation (truncation counts, dropped rows).

    Example:
      >>> ids = object_array([np.array([1, 2], np.int32), np.array([3], np.int32)])
      >>> ds = TokenizedDataset("prompt", {"prompt_ids": ids}, pad_id=0, max_len=8)
      >>> ds = ds.add_columns(weight=np.array([0.5, 2.0], np.float32))
      >>> len(ds), sorted(ds.columns)
      (2, ['prompt_id', 'prompt_ids', 'source_index', 'weight'])
    """

    def __init__(
        self,
        kind: str,
        columns: Mapping[str, np.ndarray],
        *,
        pad_id: int,
        max_len: int,
        max_prompt_len: int | None = None,
        info: dict | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.pad_id = int(pad_id)
        self.max_len = int(max_len)
        self.max_prompt_len = None if max_prompt_len is None else int(max_prompt_len)
        self.info = dict(info or {})
        cols = dict(columns)
        missing = [c for c in TOKEN_COLUMNS[kind] if c not in cols]
        if missing:
            raise ValueError(f"{kind} dataset needs token columns {missing}")
        n = len(cols[TOKEN_COLUMNS[kind][0]])
        cols.setdefault("prompt_id", object_array([str(i) for i in range(n)]))
        cols.setdefault("source_index", np.arange(n, dtype=np.int64))
        if kind == "unpaired" and "label" not in cols:
            raise ValueError("unpaired dataset needs a 'label' column")
        self.columns: dict[str, np.ndarray] = {}
        self._n = n
        for name, col in cols.items():
            self._set_column(name, col)

    # --------------------------------------------------------------------------------- columns
    def _set_column(self, name: str, col) -> None:
        col = col if isinstance(col, np.ndarray) else np.asarray(col)
        if col.ndim == 0 or len(col) != self._n:
            raise ValueError(
                f"column '{name}' has leading size {col.shape[:1]}, dataset has {self._n} examples"
            )
        self.columns[name] = col

    def add_columns(self, **arrays) -> TokenizedDataset:
        """Adds (or replaces) per-example columns, in place; returns ``self`` for chaining.

        Numeric columns (any shape ``[num_examples, ...]``) are copied into every batch under
        their own name, e.g. ``ref_logps`` (``[N, 2]`` for pairs) from a one-off
        reference pass. Token columns cannot be replaced this way.
        """
        for name, col in arrays.items():
            if name in TOKEN_COLUMNS[self.kind]:
                raise ValueError(f"'{name}' is a token column; build a new dataset instead")
            col = np.asarray(col)
            if col.dtype == object or col.dtype.kind in "USO":
                if name not in META_COLUMNS:
                    raise ValueError(
                        f"column '{name}' must be numeric to travel in batches (got {col.dtype})"
                    )
            self._set_column(name, col)
        return self

    def batch_columns(self) -> list[str]:
        """Names of the numeric, non-token columns that flow into batches."""
        skip = set(TOKEN_COLUMNS[self.kind]) | set(META_COLUMNS)
        return [
            name
            for name, col in self.columns.items()
            if name not in skip and col.dtype != object and col.dtype.kind in "biuf"
        ]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __repr__(self) -> str:
        cols = ", ".join(self.columns)
        return (
            f"TokenizedDataset(kind={self.kind!r}, n={self._n}, max_len={self.max_len}, [{cols}])"
        )

    def select(self, indices) -> TokenizedDataset:
        """A new dataset holding the examples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        cols = {name: col[idx] for name, col in self.columns.items()}
        return TokenizedDataset(
            self.kind,
            cols,
            pad_id=self.pad_id,
            max_len=self.max_len,
            max_prompt_len=self.max_prompt_len,
            info=self.info,
        )

    # --------------------------------------------------------------------------------- lengths
    def lengths(self) -> np.ndarray:
        """``[num_examples]`` int: the longest prompt + response of each example (prompt alone
        for the ``prompt`` kind); batches are padded to a bucket at least this long."""
        p = np.fromiter((len(x) for x in self.columns["prompt_ids"]), np.int64, self._n)
        if self.kind == "prompt":
            return p
        if self.kind == "pairwise":
            c = np.fromiter((len(x) for x in self.columns["chosen_ids"]), np.int64, self._n)
            r = np.fromiter((len(x) for x in self.columns["rejected_ids"]), np.int64, self._n)
            return p + np.maximum(c, r)
        if self.kind == "listwise":
            longest = (max(len(y) for y in ys) for ys in self.columns["responses_ids"])
            return p + np.fromiter(longest, np.int64, self._n)
        r = np.fromiter((len(x) for x in self.columns["response_ids"]), np.int64, self._n)
        return p + r

    def num_responses(self) -> int:
        """Largest number of responses of a listwise example (the K of ``[B, K, T]``)."""
        if self.kind != "listwise":
            raise ValueError("num_responses is defined for listwise datasets only")
        return max((len(ys) for ys in self.columns["responses_ids"]), default=0)


def concatenate(datasets: Sequence[TokenizedDataset]) -> TokenizedDataset:
    """Concatenates datasets of one kind that share their column names."""
    if not datasets:
        raise ValueError("nothing to concatenate")
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.kind != first.kind or set(ds.columns) != set(first.columns):
            raise ValueError("datasets to concatenate must share kind and columns")
    cols = {}
    for name in first.columns:
        parts = [ds.columns[name] for ds in datasets]
        if parts[0].dtype == object:
            cols[name] = object_array([x for part in parts for x in part])
        else:
            cols[name] = np.concatenate(parts)
    return TokenizedDataset(
        first.kind,
        cols,
        pad_id=first.pad_id,
        max_len=max(ds.max_len for ds in datasets),
        max_prompt_len=first.max_prompt_len,
    )
