"""Readers for local JSONL, JSON, Parquet and TFDS data.

Each reader returns a list of :class:`~prefjax.data.errors.Row` objects: the raw record plus
its file and position, so later validation errors point at the line (JSONL, 1-based) or the
record index (JSON, Parquet, TFDS; 0-based). Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import json
import os

from prefjax.data.errors import DataError, Row

JSON_LIST_KEYS = ("data", "rows", "examples", "records")


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str) -> list[Row]:
    """One JSON object per line; blank lines are skipped; rows are located by line number."""
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"invalid JSON: {e.msg} (column {e.colno})",
                    source=path,
                    index=lineno,
                    index_kind="line",
                    code="json",
                ) from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"line must hold a JSON object, got {type(rec).__name__}",
                    source=path,
                    index=lineno,
                    index_kind="line",
                    code="wrong_type",
                )
            rows.append(Row(rec, path, lineno, "line"))
    return rows


def read_json(path: str) -> list[Row]:
    """A JSON list of objects, or an object holding one under ``data``/``rows``/``examples``."""
    with _open_text(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                source=path,
                code="json",
            ) from None
    if isinstance(obj, dict):
        key = next((k for k in JSON_LIST_KEYS if isinstance(obj.get(k), list)), None)
        if key is None:
            raise DataError(
                f"JSON object must hold a list under one of {JSON_LIST_KEYS}",
                source=path,
                code="layout",
            )
        obj = obj[key]
    if not isinstance(obj, list):
        raise DataError(
            f"JSON must be a list of records, got {type(obj).__name__}", source=path, code="layout"
        )
    rows = []
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise DataError(
                f"record must be a JSON object, got {type(rec).__name__}",
                source=path,
                index=i,
                code="wrong_type",
            )
        rows.append(Row(rec, path, i, "record"))
    return rows


def read_parquet(path: str) -> list[Row]:
    """A Parquet table (pyarrow); list<struct<role, content>> columns become conversations."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [Row(rec, path, i, "record") for i, rec in enumerate(table.to_pylist())]


def is_tfds_dir(path: str) -> bool:
    """True for a prepared TFDS dataset folder (holds ``dataset_info.json``)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json"))


def read_records(
    path: str, kind: str | None = None, *, split: str = "train", on_error: str = "raise"
) -> list[Row]:
    """Reads a local file by extension (``.jsonl``, ``.json``, ``.parquet``, optionally
    ``.gz``), or a prepared TFDS dataset folder (its ``split``).

    With ``kind`` (``pairwise``, ``listwise``, ``unpaired``, ``sft``, ``prompt``) the rows are
    also validated and normalised to that kind (HH / UltraFeedback / A-B layouts recognised),
    raising the first :class:`DataError` or, with ``on_error="drop"``, dropping and logging bad
    rows; without ``kind`` they are the raw records. Rows read like dicts.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
    >>> _ = open(p, "w").write('{"prompt": "a"}\\n\\n{"prompt": "b"}\\n')
    >>> [(r.index, r.data["prompt"]) for r in read_records(p)]
    [(1, 'a'), (3, 'b')]
    """
    path = os.fspath(path)
    rows = _read_raw(path, split)
    if kind is None:
        return rows
    from prefjax.data.schemas import validate_rows

    return validate_rows(rows, kind, on_error=on_error)[1]


def _read_raw(path: str, split: str) -> list[Row]:
    if is_tfds_dir(path):
        from prefjax.data.tfds_builder import read_tfds

        return read_tfds(path, split=split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl") or base.endswith(".ndjson"):
        return read_jsonl(path)
    if base.endswith(".json"):
        return read_json(path)
    if base.endswith(".parquet") or base.endswith(".pq"):
        return read_parquet(path)
    raise ValueError(
        f"unknown data file type: {path} (expected .jsonl, .json, .parquet or a TFDS folder)"
    )


def write_jsonl(path: str, records) -> None:
    """Writes plain dicts (or rows' data) as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            rec = rec.data if isinstance(rec, Row) else rec
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
