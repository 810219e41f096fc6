"""Loading files into validated rows and tokenised datasets, and datasets from a config.

The loaders run exactly the checks of ``python -m prefjax.data.validate``: by default the first
bad row raises a :class:`~prefjax.data.errors.DataError` naming its file, line and field; with
``on_error="drop"`` bad rows are dropped, each one logged with its reason and listed in the
returned :class:`~prefjax.data.errors.DropReport` (``dataset.info["dropped"]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prefjax.data.dataset import TokenizedDataset
from prefjax.data.errors import DropReport, Row
from prefjax.data.readers import read_records
from prefjax.data.schemas import validate_rows
from prefjax.data.splits import check_leakage, grouped_split
from prefjax.data.tasks import Bandit, RepeatTask
from prefjax.data.tokenize import TruncationPolicy, tokenize


def _paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    return [os.fspath(p).strip() for p in paths]


def load_rows(
    paths,
    *,
    kind: str | None = None,
    on_error: str = "raise",
    split: str = "train",
    allow_duplicates: bool = False,
) -> tuple[str, list[Row], DropReport]:
    """Reads and validates one or more files (a list or a comma-separated string).

    Duplicates are checked across all the files together. Returns ``(kind, rows, report)``.
    """
    rows: list[Row] = []
    for path in _paths(paths):
        rows.extend(read_records(path, split=split))
    if not rows:
        raise ValueError(f"no records in {paths}")
    return validate_rows(rows, kind, on_error=on_error, allow_duplicates=allow_duplicates)


def load_dataset(
    paths,
    tokenizer,
    *,
    kind: str | None = None,
    max_len: int,
    max_prompt_len: int | None = None,
    truncation: TruncationPolicy | None = None,
    on_error: str = "raise",
    add_bos: bool = True,
    append_eos: bool = True,
    split: str = "train",
) -> TokenizedDataset:
    """Reads, validates and tokenises files into a :class:`TokenizedDataset`.

    ``dataset.info["dropped"]`` lists every row dropped (validation and truncation) when
    ``on_error="drop"``.
    """
    kind, rows, report = load_rows(paths, kind=kind, on_error=on_error, split=split)
    ds = tokenize(
        rows,
        tokenizer,
        kind,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
        truncation=truncation or TruncationPolicy(),
        on_error=on_error,
        add_bos=add_bos,
        append_eos=append_eos,
    )
    ds.info["dropped"].extend(report)
    return ds


def load_split_datasets(
    paths,
    tokenizer,
    *,
    eval_fraction: float = 0.1,
    seed: int = 0,
    kind: str | None = None,
    by: str = "auto",
    **tokenize_kw,
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Loads files and splits them by prompt group into ``(train, eval)`` datasets."""
    on_error = tokenize_kw.pop("on_error", "raise")
    kind, rows, report = load_rows(paths, kind=kind, on_error=on_error)
    train_rows, eval_rows = grouped_split(rows, eval_fraction=eval_fraction, seed=seed, by=by)
    out = []
    for part in (train_rows, eval_rows):
        ds = tokenize(part, tokenizer, kind, on_error=on_error, **tokenize_kw)
        ds.info["validation_dropped"] = report
        out.append(ds)
    return out[0], out[1]


def datasets_from_config(
    data_config,
    tokenizer,
    kind: str = "pairwise",
) -> tuple[TokenizedDataset, TokenizedDataset | None, object | None]:
    """Train / eval datasets described by a launcher's ``config.data``.

    Reads ``task`` (``"sequence"`` | ``"bandit"`` | ``"files"``), ``train_files``,
    ``eval_files``, ``max_len``, ``max_prompt_len``, ``num_train``, ``num_eval``,
    ``label_noise`` (the built-in tasks' flip rate) and ``seed``; optional fields
    ``eval_fraction`` (files without eval_files), ``on_error`` and, for listwise data,
    ``num_responses``.

    Returns:
      ``(train, eval, task)``: ``task`` is the built-in task object (for gold rewards and the
      bandit's optimum) or ``None`` for files; ``eval`` may be ``None`` for files without
      ``eval_files`` and ``eval_fraction``.
    """

    def get(name, default=None):
        return (
            data_config.get(name, default)
            if hasattr(data_config, "get")
            else getattr(data_config, name, default)
        )

    max_len, max_prompt_len = get("max_len"), get("max_prompt_len")
    seed = int(get("seed", 0))
    task_name = get("task", "sequence")
    if task_name in ("sequence", "bandit"):
        noise = float(get("label_noise", 0.0) or 0.0)
        task = (
            RepeatTask(flip_prob=noise)
            if task_name == "sequence"
            else Bandit.make(seed=seed, flip_prob=noise)
        )
        make = {
            "pairwise": task.pairwise_dataset,
            "sft": task.sft_dataset,
            "unpaired": task.unpaired_dataset,
            "listwise": task.listwise_dataset,
            "prompt": task.prompt_dataset,
        }[kind]
        kw = {} if kind == "prompt" else {"max_len": max_len}
        if kind == "listwise":
            kw["num_responses"] = int(get("num_responses", 4))
        train = make(
            tokenizer, int(get("num_train")), seed=seed, max_prompt_len=max_prompt_len, **kw
        )
        # A different seed stream for eval; the task's prompts are few, so eval measures fit
        # to fresh samples rather than unseen prompts (use files + grouped splits for that).
        ev = make(
            tokenizer,
            int(get("num_eval")),
            seed=seed + 1_000_003,
            max_prompt_len=max_prompt_len,
            **kw,
        )
        return train, ev, task
    if task_name != "files":
        raise ValueError(
            f"config.data.task must be 'sequence', 'bandit' or 'files', got {task_name!r}"
        )
    if not get("train_files"):
        raise ValueError("config.data.task='files' needs config.data.train_files")
    on_error = get("on_error", "raise")
    tkw = dict(kind=kind, max_len=max_len, max_prompt_len=max_prompt_len, on_error=on_error)
    if kind == "prompt":
        tkw["max_len"] = max_prompt_len or max_len
    if get("eval_files"):
        return (
            load_dataset(get("train_files"), tokenizer, **tkw),
            load_dataset(get("eval_files"), tokenizer, **tkw),
            None,
        )
    frac = get("eval_fraction", 0.0)
    if frac:
        train, ev = load_split_datasets(
            get("train_files"), tokenizer, eval_fraction=frac, seed=seed, **tkw
        )
        return train, ev, None
    return load_dataset(get("train_files"), tokenizer, **tkw), None, None


def check_leakage_files(train_paths: Sequence[str] | str, eval_paths: Sequence[str] | str):
    """:func:`prefjax.data.splits.check_leakage` on two (sets of) files."""
    return check_leakage(load_rows(train_paths)[1], load_rows(eval_paths)[1])
