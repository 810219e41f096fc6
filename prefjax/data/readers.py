"""Readers for local JSONL, JSON, Parquet and TFDS data.

Each reader returns a :class:`~prefjax.data.errors.RecordList` (a list) of
:class:`~prefjax.data.errors.Row` objects: the raw record plus its file and position, so later
validation errors point at the line (JSONL, 1-based) or the record index (JSON, Parquet, TFDS;
0-based). Files are read as bytes and decoded line by line, so a byte that is not UTF-8 is an
error naming its line and byte offset (in the decompressed stream for ``.gz`` files). Nothing
here downloads anything.

The TFDS reader imports ``tensorflow_datasets`` when it is called, not when this module is
imported; :mod:`prefjax.data.tfds_builder` writes the datasets it reads.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib

from prefjax.data.errors import DataError, DropReport, RecordList, Row, merge_reports
from prefjax.data.schemas import KINDS, validate_rows

JSON_LIST_KEYS = ("data", "rows", "examples", "records")
ON_ERROR = ("raise", "collect", "drop")
# What a broken gzip stream raises: a bad header, a truncated stream, corrupt deflate data.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
# The text features of a prefjax TFDS dataset, per example kind (the builder writes them).
TFDS_TEXT_FIELDS = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "listwise": ("prompt",),
    "unpaired": ("prompt", "completion"),
    "sft": ("prompt", "completion"),
    "prompt": ("prompt",),
    "step": ("prompt",),  # steps and labels travel in the JSON of the `extra` feature
}


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _fail(err: DataError, on_error: str, report: DropReport) -> None:
    """Raises ``err`` (``on_error="raise"``) or records it (``"drop"`` also logs it)."""
    if on_error == "raise":
        raise err
    if on_error == "drop":
        report.add(err)
    else:
        report.record(err)


def _utf8_error(path, data: bytes, pos: int, line_start: int, lineno: int) -> DataError:
    """``data`` is the line from its first byte; ``pos`` the bad byte's position in it."""
    column = len(data[:pos].decode("utf-8")) + 1  # in characters; the bytes before pos decode
    stream = " of the decompressed data" if path.endswith(".gz") else ""
    return DataError(
        f"not valid UTF-8: byte 0x{data[pos]:02x} at byte offset {line_start + pos}{stream} "
        f"(column {column})",
        source=path,
        index=lineno,
        index_kind="line",
        code="encoding",
    )


def _gzip_error(path: str, err: Exception, offset: int, lineno: int | None) -> DataError:
    where = f" after byte offset {offset} of the decompressed data" if offset else ""
    return DataError(
        f"not valid gzip data{where}: {err}",
        source=path,
        index=lineno,
        index_kind="line",
        code="gzip",
    )


def read_jsonl(
    path: str, *, on_error: str = "raise", max_stored_errors: int | None = None
) -> RecordList:
    """One JSON object per line; blank lines are skipped; rows are located by line number.

    With ``on_error="collect"`` (or ``"drop"``, which also logs) a line that is not UTF-8, not
    JSON or not an object becomes a :class:`DataError` in the result's ``errors`` (keeping at
    most ``max_stored_errors`` of them, counting the rest) and reading goes on with the next
    line; ``"raise"`` raises the first. A gzip stream that breaks off ends the reading.
    """
    _check_on_error(on_error)
    rows = RecordList(errors=DropReport(max_stored=max_stored_errors))
    offset = lineno = 0
    with _open_bytes(path) as f:
        try:
            for data in f:
                lineno += 1
                line_start, offset = offset, offset + len(data)
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    err = _utf8_error(path, data, e.start, line_start, lineno)
                    _fail(err, on_error, rows.errors)
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.rstrip("\r\n"))  # a fault at the end is on this line
                except json.JSONDecodeError as e:
                    err = DataError(
                        f"invalid JSON: {e.msg} (column {e.colno})",
                        source=path,
                        index=lineno,
                        index_kind="line",
                        code="json",
                    )
                    _fail(err, on_error, rows.errors)
                    continue
                if not isinstance(rec, dict):
                    err = DataError(
                        f"line must hold a JSON object, got {type(rec).__name__}",
                        source=path,
                        index=lineno,
                        index_kind="line",
                        code="wrong_type",
                    )
                    _fail(err, on_error, rows.errors)
                    continue
                rows.append(Row(rec, path, lineno, "line"))
        except _GZIP_ERRORS as e:  # only a .gz stream raises these
            if not offset:  # not gzip at all: nothing to locate or continue from
                raise _gzip_error(path, e, 0, None) from None
            _fail(_gzip_error(path, e, offset, lineno + 1), on_error, rows.errors)
    return rows


def _read_bytes(path: str) -> bytes:
    with _open_bytes(path) as f:
        try:
            return f.read()
        except _GZIP_ERRORS as e:
            raise _gzip_error(path, e, 0, None) from None


def read_json(
    path: str, *, on_error: str = "raise", max_stored_errors: int | None = None
) -> RecordList:
    """A JSON list of objects, or an object holding one under ``data``/``rows``/``examples``.

    A file that is not UTF-8 or not JSON as a whole raises one :class:`DataError` located at
    the line of the fault, whatever ``on_error`` says: nothing after it can be read. Records
    that are not objects follow ``on_error`` as in :func:`read_jsonl`.
    """
    _check_on_error(on_error)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        raise _utf8_error(
            path, data[line_start : e.start + 1], e.start - line_start, line_start, lineno
        ) from None
    if not text.strip():  # a blank file holds no records (read_records says so)
        return RecordList(errors=DropReport(max_stored=max_stored_errors))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"invalid JSON: {e.msg} (column {e.colno})",
            source=path,
            index=e.lineno,
            index_kind="line",
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
    rows = RecordList(errors=DropReport(max_stored=max_stored_errors))
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            err = DataError(
                f"record must be a JSON object, got {type(rec).__name__}",
                source=path,
                index=i,
                code="wrong_type",
            )
            _fail(err, on_error, rows.errors)
            continue
        rows.append(Row(rec, path, i, "record"))
    return rows


def read_parquet(path: str) -> RecordList:
    """A Parquet table (pyarrow); list<struct<role, content>> columns become conversations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        msg = " ".join(str(e).split())
        raise DataError(
            f"not a readable Parquet file: {msg}", source=path, code="parquet"
        ) from None
    return RecordList(Row(rec, path, i, "record") for i, rec in enumerate(table.to_pylist()))


def is_tfds_dir(path: str) -> bool:
    """True for a prepared TFDS dataset folder (holds ``dataset_info.json``)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json"))


def _dec(text, is_conv) -> str | list:
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return json.loads(text) if bool(is_conv) else text


def _from_example(kind: str, ex: dict) -> tuple[dict, str, int]:
    out = {}
    for name in TFDS_TEXT_FIELDS[kind]:
        out[name] = _dec(ex[name], ex[name + "_is_conversation"])
    if kind == "listwise":
        conv = bool(ex["responses_is_conversation"])
        out["responses"] = [_dec(y, conv) for y in ex["responses"]]
        out["ranking"] = [int(i) for i in ex["ranking"]]
    if kind == "unpaired":
        out["label"] = int(ex["label"])
    pid = _dec(ex["prompt_id"], False)
    if pid:
        out["prompt_id"] = pid
    out.update(json.loads(_dec(ex["extra"], False)))
    return out, _dec(ex["source_file"], False), int(ex["source_index"])


def read_tfds(name_or_dir: str, *, split: str = "train", data_dir: str | None = None) -> list[Row]:
    """Reads a prepared dataset back as normalised rows (through ``tfds.data_source``).

    ``name_or_dir`` is either a prepared dataset folder (``.../prefjax_preferences/pairwise/
    1.0.0``) or a registered name such as ``"prefjax_preferences/pairwise"`` with ``data_dir``.
    Rows are located as ``<dataset>:<split>[record i]``; the original file and line are kept in
    each row's ``source_file`` / ``source_index`` TFDS features.
    """
    # tensorflow_datasets is an optional heavy dependency: imported only when TFDS data is read.
    import tensorflow_datasets as tfds

    if os.path.isdir(name_or_dir):
        builder = tfds.builder_from_directory(name_or_dir)
        source = builder.as_data_source(split=split)
        label = f"{name_or_dir}:{split}"
        kind = builder.builder_config.name if builder.builder_config else None
    else:
        source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir)
        label = f"tfds:{name_or_dir}:{split}"
        kind = name_or_dir.split("/")[1] if "/" in name_or_dir else None
    if kind not in KINDS:
        raise ValueError(f"cannot tell the example kind of TFDS dataset {name_or_dir!r}")
    rows = []
    for i in range(len(source)):
        data, _, _ = _from_example(kind, source[i])
        rows.append(Row(data, label, i, "record"))
    return rows


def read_records(
    path: str,
    kind: str | None = None,
    *,
    split: str = "train",
    on_error: str = "raise",
    max_stored_errors: int | None = None,
) -> RecordList:
    """Reads a local file by extension (``.jsonl``, ``.json``, ``.parquet``, optionally
    ``.gz``), or a prepared TFDS dataset folder (its ``split``).

    With ``kind`` (``pairwise``, ``listwise``, ``unpaired``, ``sft``, ``prompt``) the rows are
    also validated and normalised to that kind (HH / UltraFeedback / A-B layouts recognised);
    without ``kind`` they are the raw records. Rows read like dicts.

    ``on_error`` covers both reading and validation: ``"raise"`` the first
    :class:`DataError`; ``"collect"`` the bad lines and rows into the result's ``errors`` (a
    :class:`DropReport`, in line order, at most ``max_stored_errors`` kept, the rest counted) and
    go on; ``"drop"`` likewise, also logging each one. A file with no records at all (0 bytes,
    blank lines, ``[]``, an empty table) raises ``DataError("<file>: holds no records ...")``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.jsonl")
    >>> _ = open(p, "w").write('{"prompt": "a"}\\n\\n{"prompt": "b"}\\n{"prompt": \\n')
    >>> rows = read_records(p, on_error="collect")
    >>> [(r.index, r.data["prompt"]) for r in rows]
    [(1, 'a'), (3, 'b')]
    >>> print(rows.errors.dropped[0])  # doctest: +ELLIPSIS
    /.../x.jsonl:4: invalid JSON: Expecting value (column 12)
    """
    _check_on_error(on_error)
    path = os.fspath(path)
    rows = _read_raw(path, split, on_error, max_stored_errors)
    if not rows and not rows.errors:
        raise DataError(f"holds no records ({_nothing(path, split)})", source=path, code="empty")
    if kind is None or not rows:
        return rows
    _, good, report = validate_rows(
        rows, kind, on_error=on_error, max_stored_errors=max_stored_errors
    )
    return RecordList(good, merge_reports(rows.errors, report, max_stored=max_stored_errors))


def _nothing(path: str, split: str) -> str:
    """Says what an empty input holds, for the "holds no records" message."""
    if is_tfds_dir(path):
        return f"split {split!r} has no examples"
    if not path.endswith(".gz") and os.path.getsize(path) == 0:
        return "0 bytes"
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".parquet") or base.endswith(".pq"):
        return "a table with 0 rows"
    if base.endswith(".json"):
        return "an empty JSON list" if _read_bytes(path).strip() else "only blanks"
    return "only blank lines"


def _read_raw(path: str, split: str, on_error: str, max_stored_errors: int | None) -> RecordList:
    if is_tfds_dir(path):
        return RecordList(read_tfds(path, split=split))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data file: {path}")
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".jsonl") or base.endswith(".ndjson"):
        return read_jsonl(path, on_error=on_error, max_stored_errors=max_stored_errors)
    if base.endswith(".json"):
        return read_json(path, on_error=on_error, max_stored_errors=max_stored_errors)
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
