"""Loading files into validated rows and tokenised datasets, and a run's datasets from a config.

The loaders run exactly the checks of ``python -m prefjax.data.validate``: by default the first
bad row raises a :class:`~prefjax.data.errors.DataError` naming its file, line and field; with
``on_error="drop"`` bad rows are dropped, each one logged with its reason and listed in the
returned :class:`~prefjax.data.errors.DropReport` (``dataset.info["dropped"]``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from prefjax.data.dataset import TokenizedDataset
from prefjax.data.errors import DropReport, Row
from prefjax.data.readers import read_records
from prefjax.data.schemas import detect_kind_of_rows, validate_rows
from prefjax.data.splits import check_leakage, group_key, grouped_split
from prefjax.data.tasks import ArithmeticTask, Bandit, RepeatTask
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


# Extra examples generated per requested one before the grouped split keeps each side's share.
_OVERSAMPLE = 1.3


@dataclasses.dataclass
class Splits:
    """The train and held-out datasets of a run (:func:`datasets_from_config`)."""

    train: TokenizedDataset
    eval: TokenizedDataset
    task: Any = None  # the built-in task (RepeatTask | Bandit) or None for files
    held_out: frozenset = frozenset()  # built-in task: its prompts never trained on

    def __iter__(self):  # ``train, eval, task = datasets_from_config(...)``
        return iter((self.train, self.eval, self.task))


def held_out_prompts(prompts, fraction: float, seed: int) -> frozenset:
    """A deterministic ``fraction`` (at least one, never all) of ``prompts`` to hold out."""
    prompts = sorted(set(prompts))
    if len(prompts) < 2:
        return frozenset()
    rng = np.random.default_rng([seed, 7919])
    count = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    return frozenset(np.asarray(prompts, dtype=object)[rng.permutation(len(prompts))[:count]])


def preferred_as_sft(row, kind: str):
    """The SFT example a normalised ``kind`` row prefers, or ``None``: a pair's chosen response,
    a ranking's best response, an unpaired example's completion if it is desirable.

    ``prompt_id`` is optional in every schema, so it is carried only when the row has one
    (otherwise splits group by prompt text); a file's row keeps its file and line for errors.
    """
    if kind == "pairwise":
        completion = row["chosen"]
    elif kind == "listwise":
        completion = row["responses"][row["ranking"][0]]
    elif row["label"] == 1:  # unpaired
        completion = row["completion"]
    else:
        return None  # an undesirable response is not imitated
    out = {"prompt": row["prompt"], "completion": completion}
    if row.get("prompt_id") is not None:
        out["prompt_id"] = row["prompt_id"]
    if isinstance(row, Row):
        return Row(out, row.source, row.index, row.index_kind)
    return out


def step_separator(data_config) -> str:
    """``config.data.step_separator`` (``"\\n"`` for configs written before it existed)."""
    return data_config.get("step_separator", "\n")


def task_from_config(data_config):
    """The built-in task of ``config.data`` (``task`` = ``"sequence"``, ``"bandit"`` or
    ``"arithmetic"``)."""
    noise = float(data_config.label_noise)
    if data_config.task == "bandit":
        return Bandit.make(seed=data_config.seed, flip_prob=noise)
    if data_config.task == "arithmetic":
        return ArithmeticTask(separator=step_separator(data_config), flip_prob=noise)
    return RepeatTask(
        letters=data_config.sequence_letters,
        max_count=data_config.sequence_max_count,
        flip_prob=noise,
    )


def _task_records(task, kind: str, num: int, seed: int, sft_responses: str) -> list[dict]:
    if kind == "step":
        if not isinstance(task, ArithmeticTask):
            raise ValueError(
                f"step-level data (a process reward model) needs per-step labels: the "
                f"{type(task).__name__} task has none; set config.data.task='arithmetic' "
                "(or 'files' with step-level rows)"
            )
        return task.step_records(num, seed=seed)
    if kind == "pairwise":
        return task.pairwise_records(num, seed=seed)
    if kind == "listwise":
        return task.listwise_records(num, seed=seed)
    if kind == "unpaired":
        return task.unpaired_records(num, seed=seed)
    if kind == "prompt":
        return task.prompt_records(num, seed=seed)
    if kind == "sft" and sft_responses == "base":
        return task.sft_records(num, seed=seed)
    if kind == "sft":
        # SFT imitates the preferred responses: the chosen side of the task's labelled pairs.
        return [preferred_as_sft(r, "pairwise") for r in task.pairwise_records(num, seed=seed)]
    raise ValueError(f"unknown batch kind {kind!r}")


def _task_split(d, task, kind: str):
    """Train and held-out records of a built-in task, grouped by prompt."""
    held_out = held_out_prompts(task.prompts, d.eval_fraction, d.seed)
    if not held_out:  # one prompt (the default bandit): fresh samples for the same prompt
        return (
            _task_records(task, kind, d.num_train, d.seed, d.sft_responses),
            _task_records(task, kind, d.num_eval, d.seed + 1_000_003, d.sft_responses),
            held_out,
        )
    frac = len(held_out) / len(task.prompts)
    train, evals, seed = [], [], d.seed
    while len(train) < d.num_train or len(evals) < d.num_eval:
        need = max((d.num_train - len(train)) / (1 - frac), (d.num_eval - len(evals)) / frac)
        for r in _task_records(task, kind, int(need * _OVERSAMPLE) + 8, seed, d.sft_responses):
            (evals if r["prompt"] in held_out else train).append(r)
        seed += 1_000_003
    return train[: d.num_train], evals[: d.num_eval], held_out


def _file_records(paths: str, kind: str, field: str) -> list:
    """Validated rows of ``kind``; for SFT, also what feedback files prefer (their chosen side).

    Duplicates are checked across all the files of one field together."""
    records = []
    if kind != "sft":
        records = load_rows(paths, kind=kind)[1]
    else:
        for path in _paths(paths):
            # The file's kind is its rows' majority, so one odd first row does not decide it.
            file_kind = detect_kind_of_rows(read_records(path))
            if file_kind in ("pairwise", "listwise", "unpaired"):
                # SFT (or the SFT warm-up before DPO) on a feedback file imitates what it prefers.
                rows = (preferred_as_sft(r, file_kind) for r in read_records(path, file_kind))
                records.extend(r for r in rows if r is not None)
            else:
                records.extend(read_records(path, kind))
    if not records:
        raise ValueError(f"config.data.{field}={paths!r}: no examples")
    return records


def datasets_from_config(data_config, tokenizer, kind: str = "pairwise") -> Splits:
    """Train and held-out datasets of ``kind`` described by a launcher's ``config.data``.

    The one place a run's data is built (the training loop, the launchers and a researcher's own
    script get the same splits), always split by prompt so no prompt is on both sides:

    * built-in tasks (``task="sequence"`` / ``"bandit"``): a deterministic ``eval_fraction`` of
      the task's prompts (from ``seed``) is held out and train/eval examples are drawn only from
      their side (``Splits.held_out``); the default bandit has one prompt, so its held-out
      examples are fresh samples for that prompt; SFT data is the chosen side of the task's pairs
      or, with ``sft_responses="base"``, samples of its base policy;
    * files (``task="files"``): ``train_files`` and ``eval_files`` (checked for shared prompts),
      or ``train_files`` split by prompt group with ``eval_fraction``; SFT reads feedback files
      as what they prefer. Bad rows raise a :class:`~prefjax.data.errors.DataError` naming the
      file, line and field.

    Returns:
      :class:`Splits` (``train, eval, task = datasets_from_config(...)`` unpacks it).
    """
    d = data_config
    task, held_out = None, frozenset()
    if d.task == "files":
        train_records = _file_records(d.train_files, kind, "train_files")
        if d.eval_files:
            eval_records = _file_records(d.eval_files, kind, "eval_files")
            leakage = check_leakage(train_records, eval_records)
            if leakage.leaks:
                raise ValueError(
                    f"config.data.eval_files={d.eval_files!r} shares prompts with "
                    f"config.data.train_files={d.train_files!r}:\n{leakage.summary()}"
                )
        else:
            if len({group_key(r) for r in train_records}) < 2:
                raise ValueError(
                    f"config.data.train_files={d.train_files!r}: one distinct prompt cannot be "
                    "split into train and eval; give config.data.eval_files"
                )
            train_records, eval_records = grouped_split(
                train_records, eval_fraction=d.eval_fraction, seed=d.seed
            )
        append_eos = True
    elif d.task in ("sequence", "bandit", "arithmetic"):
        task = task_from_config(d)
        train_records, eval_records, held_out = _task_split(d, task, kind)
        append_eos = not isinstance(task, Bandit)  # an arm is one token, no EOS
    else:
        raise ValueError(
            f"config.data.task={d.task!r}: expected 'sequence', 'bandit', 'arithmetic' or 'files'"
        )
    train, held = (
        tokenize(
            records,
            tokenizer,
            kind,
            max_len=d.max_len,
            max_prompt_len=d.max_prompt_len,
            append_eos=append_eos,
            step_separator=step_separator(d),
        )
        for records in (train_records, eval_records)
    )
    leak = set(train["prompt_id"]) & set(held["prompt_id"])
    if leak and (task is None or len(task.prompts) > 1):
        raise ValueError(f"config.data: {len(leak)} prompts are in both train and eval splits")
    return Splits(train, held, task, held_out)


def check_leakage_files(train_paths: Sequence[str] | str, eval_paths: Sequence[str] | str):
    """:func:`prefjax.data.splits.check_leakage` on two (sets of) files."""
    return check_leakage(load_rows(train_paths)[1], load_rows(eval_paths)[1])
