"""Errors and drop reports shared by every reader, validator and tokeniser in ``prefjax.data``.

Every problem with an input row is a :class:`DataError` that says where it is (file, line or
record index, field) and what is wrong, so a message reads like a compiler error::

    prefs.jsonl:17: field 'rejected': identical to 'chosen'

Loaders either raise the first error (the default) or, with ``on_error="drop"``, drop the bad rows
and return a :class:`DropReport` listing every dropped row and its reason; the report is also
logged, so nothing is ever dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

logger = logging.getLogger("prefjax.data")


class DataError(ValueError):
    """A malformed input row, located by ``source`` (a file), ``index`` and ``field``.

    ``index`` is a 1-based line number for JSONL files (``index_kind="line"``) and a 0-based
    record index for JSON lists, Parquet and TFDS (``index_kind="record"``); a fault that breaks
    a whole ``.json`` file (not JSON, not UTF-8) is located by its line. ``code`` says what kind
    of fault it is (``missing_field``, ``json``, ``encoding``, ``empty``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        index: int | None = None,
        field: str | None = None,
        index_kind: str = "record",
        code: str = "invalid",
    ):
        self.message = message
        self.source = source
        self.index = index
        self.field = field
        self.index_kind = index_kind
        self.code = code
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.location()
        what = f"field '{self.field}': {self.message}" if self.field else self.message
        return f"{where}: {what}" if where else what

    def location(self) -> str:
        """``file:line`` for JSONL, ``file[record]`` otherwise; empty if unknown."""
        src = self.source or "<records>"
        if self.index is None:
            return src if self.source else ""
        if self.index_kind == "line":
            return f"{src}:{self.index}"
        return f"{src}[record {self.index}]"

    def with_location(self, source, index, index_kind) -> DataError:
        """A copy of this error located at ``source``/``index`` (keeps field and code)."""
        return DataError(
            self.message,
            source=source,
            index=index,
            field=self.field,
            index_kind=index_kind,
            code=self.code,
        )


@dataclasses.dataclass
class DropReport:
    """Rows removed by a loader running with ``on_error="drop"``, each with its error.

    With ``max_stored`` set, only the first ``max_stored`` errors are kept as objects in
    ``dropped``; later ones are only counted (``not_stored``, by code), so a file with millions
    of bad rows does not hold millions of errors. ``len(report)`` and :meth:`counts` include
    them.
    """

    dropped: list[DataError] = dataclasses.field(default_factory=list)
    kept: int = 0
    # Filled by validation: (first_row, row) pairs whose reverse pair also occurs, and accepted
    # duplicates (with allow_duplicates=True).
    contradictions: list = dataclasses.field(default_factory=list)
    duplicates: list = dataclasses.field(default_factory=list)
    max_stored: int | None = None
    not_stored: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, err: DataError) -> None:
        """Records a dropped row and logs it."""
        logger.warning("dropped row: %s", err)
        self.record(err)

    def record(self, err: DataError) -> None:
        """Records a dropped row without logging it (kept, or counted past ``max_stored``)."""
        if self.max_stored is not None and len(self.dropped) >= self.max_stored:
            self.not_stored[err.code] = self.not_stored.get(err.code, 0) + 1
        else:
            self.dropped.append(err)

    def extend(self, other: DropReport) -> None:
        for err in other.dropped:
            self.record(err)
        for code, n in other.not_stored.items():
            self.not_stored[code] = self.not_stored.get(code, 0) + n
        self.contradictions.extend(other.contradictions)
        self.duplicates.extend(other.duplicates)

    def counts(self) -> dict[str, int]:
        """Number of dropped rows per error code (``missing_field``, ``duplicate``, ...)."""
        out: dict[str, int] = dict(self.not_stored)
        for err in self.dropped:
            out[err.code] = out.get(err.code, 0) + 1
        return out

    @property
    def num_not_stored(self) -> int:
        """Dropped rows counted past ``max_stored`` (their errors were not kept)."""
        return sum(self.not_stored.values())

    def __len__(self) -> int:
        return len(self.dropped) + self.num_not_stored

    def summary(self) -> str:
        lines = [f"kept {self.kept} rows, dropped {len(self)}"]
        lines += [f"  {err}" for err in self.dropped]
        if self.not_stored:
            n, cap = self.num_not_stored, self.max_stored
            lines.append(f"  ... and {n} more, counted but not kept (max_stored={cap})")
        return "\n".join(lines)


def merge_reports(*reports: DropReport, max_stored: int | None = None) -> DropReport:
    """One report of several (say a file's read errors and its validation errors): errors in
    file order, then line/record order, at most ``max_stored`` kept; the last report's
    ``kept``, everyone's contradictions, duplicates and uncounted errors."""
    out = DropReport(max_stored=max_stored, kept=reports[-1].kept if reports else 0)
    order: dict = {}

    def position(err):
        return (order.setdefault(err.source, len(order)), -1 if err.index is None else err.index)

    for err in sorted((e for r in reports for e in r.dropped), key=position):
        out.record(err)
    for r in reports:
        for code, n in r.not_stored.items():
            out.not_stored[code] = out.not_stored.get(code, 0) + n
        out.contradictions.extend(r.contradictions)
        out.duplicates.extend(r.duplicates)
    return out


class RecordList(list):
    """The rows a reader returns (a plain ``list`` of :class:`Row`), plus ``errors``: a
    :class:`DropReport` of the lines or records that could not be read or validated, filled
    when the reader runs with ``on_error="collect"`` or ``"drop"`` (empty with ``"raise"``)."""

    def __init__(self, rows=(), errors: DropReport | None = None):
        super().__init__(rows)
        self.errors = errors if errors is not None else DropReport()


@dataclasses.dataclass
class Row(Mapping):
    """One input record and where it came from (for error messages).

    ``data`` is the record's dict; ``source`` its file, ``index`` its line (JSONL, 1-based) or
    record index (JSON list, Parquet, TFDS, in-memory lists; 0-based). A row reads like its
    dict (``row["prompt"]``, ``row.get("prompt_id")``), so code written for plain records
    accepts rows and keeps their locations.
    """

    data: dict
    source: str | None = None
    index: int | None = None
    index_kind: str = "record"

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)

    def error(self, message: str, *, field: str | None = None, code: str = "invalid"):
        """A :class:`DataError` located at this row."""
        return DataError(
            message,
            source=self.source,
            index=self.index,
            field=field,
            index_kind=self.index_kind,
            code=code,
        )


def as_rows(records, source: str | None = None) -> list[Row]:
    """Wraps plain dicts as :class:`Row` objects indexed 0..n-1 (rows pass through)."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, Row):
            out.append(rec)
        else:
            out.append(Row(rec, source=source, index=i, index_kind="record"))
    return out
