"""Prompt-grouped, deterministic train/eval splits and a leakage check.

Rows that share a prompt (or a ``prompt_id``) are related comparisons: splitting them across
train and eval leaks the answer. :func:`grouped_split` assigns whole groups to one side, by
sorting the groups on a seeded hash of their key, so the assignment is deterministic, does not
depend on row order, and a group keeps its side when other groups are added to the data.
:func:`check_leakage` reports prompts (and exact examples) shared by two sets of rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

from prefjax.data.errors import Row
from prefjax.data.tokenize import prompt_key


def group_key(row: Row | dict, by: str = "auto") -> str:
    """The grouping key of a normalised row: ``prompt_id`` if present (``by="auto"``), or the
    prompt's canonical text (``by="prompt"``), or ``prompt_id`` strictly (``by="prompt_id"``)."""
    d = row.data if isinstance(row, Row) else row
    if by == "prompt_id" or (by == "auto" and d.get("prompt_id") is not None):
        if d.get("prompt_id") is None:
            raise ValueError("by='prompt_id' but a row has no prompt_id")
        return "id:" + str(d["prompt_id"])
    if by not in ("auto", "prompt"):
        raise ValueError(f"by must be 'auto', 'prompt' or 'prompt_id', got {by!r}")
    return "prompt:" + prompt_key(d["prompt"])


def _rank(key: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def grouped_split(
    rows: Sequence[Row | dict],
    *,
    eval_fraction: float = 0.1,
    seed: int = 0,
    by: str = "auto",
) -> tuple[list, list]:
    """Splits rows into ``(train, eval)`` so that no prompt group is on both sides.

    ``ceil(eval_fraction * num_groups)`` groups (at least one, at most all but one when there
    are two or more groups) go to eval, chosen by a seeded hash of the group key; rows keep
    their order within each side.

    >>> rows = [{"prompt": p, "chosen": "a", "rejected": "b"} for p in "xxyzz"]
    >>> train, ev = grouped_split(rows, eval_fraction=0.34, seed=0)
    >>> sorted({r["prompt"] for r in train} & {r["prompt"] for r in ev})
    []
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    keys = [group_key(r, by) for r in rows]
    groups = sorted(set(keys), key=lambda k: _rank(k, seed))
    if not groups:
        return [], []
    n_eval = math.ceil(eval_fraction * len(groups))
    if len(groups) >= 2:
        n_eval = min(max(n_eval, 1), len(groups) - 1)
    eval_groups = set(groups[:n_eval])
    train = [r for r, k in zip(rows, keys, strict=True) if k not in eval_groups]
    ev = [r for r, k in zip(rows, keys, strict=True) if k in eval_groups]
    return train, ev


@dataclasses.dataclass
class LeakageReport:
    """Prompt groups and exact examples shared by two sets of rows.

    ``shared_groups`` are group keys (``prompt_id`` or prompt text) found on both sides;
    ``shared_prompt_texts`` are prompts whose text occurs on both sides under different
    ``prompt_id`` values (a renamed duplicate); ``shared_examples`` counts eval rows identical
    to a train row (ignoring ``prompt_id``).
    """

    shared_groups: list[str]
    shared_prompt_texts: list[str]
    shared_examples: int
    train_rows_leaking: int
    eval_rows_leaking: int
    num_train_groups: int
    num_eval_groups: int

    @property
    def leaks(self) -> bool:
        return bool(self.shared_groups or self.shared_prompt_texts or self.shared_examples)

    def summary(self, limit: int = 10) -> str:
        lines = [
            f"leakage: {len(self.shared_groups)} of {self.num_eval_groups} eval prompt groups "
            f"also in train, {len(self.shared_prompt_texts)} more prompts shared by text under "
            f"other ids ({self.eval_rows_leaking} eval rows, {self.train_rows_leaking} train "
            f"rows); {self.shared_examples} identical examples"
        ]
        for g in (self.shared_groups + self.shared_prompt_texts)[:limit]:
            lines.append(f"  shared: {g[:120]!r}")
        n = len(self.shared_groups) + len(self.shared_prompt_texts)
        if n > limit:
            lines.append(f"  ... and {n - limit} more")
        return "\n".join(lines)


def _data(r):
    return r.data if isinstance(r, Row) else r


def check_leakage(train_rows, eval_rows, *, by: str = "auto") -> LeakageReport:
    """Compares two sets of rows (normalised, or raw with a ``prompt`` field).

    Groups are compared by ``by`` (see :func:`group_key`); with ``by="auto"`` prompts are also
    compared by text, so the same prompt under two different ``prompt_id`` values is caught.
    """
    tk = [group_key(r, by) for r in train_rows]
    ek = [group_key(r, by) for r in eval_rows]
    shared = set(tk) & set(ek)
    texts: set[str] = set()
    if by == "auto":
        tt = [group_key(r, "prompt") for r in train_rows]
        et = [group_key(r, "prompt") for r in eval_rows]
        covered = {t for t, k in zip(et, ek, strict=True) if k in shared}
        texts = (set(tt) & set(et)) - covered
    else:
        tt, et = tk, ek

    def example_key(r):
        d = _data(r)
        return repr(
            sorted(
                (k, prompt_key(v) if isinstance(v, (str, list)) else repr(v))
                for k, v in d.items()
                if k != "prompt_id"
            )
        )

    same = {example_key(r) for r in train_rows}
    return LeakageReport(
        shared_groups=sorted(shared),
        shared_prompt_texts=sorted(texts),
        shared_examples=sum(example_key(r) in same for r in eval_rows),
        train_rows_leaking=sum(k in shared or t in texts for k, t in zip(tk, tt, strict=True)),
        eval_rows_leaking=sum(k in shared or t in texts for k, t in zip(ek, et, strict=True)),
        num_train_groups=len(set(tk)),
        num_eval_groups=len(set(ek)),
    )
