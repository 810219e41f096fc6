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
    record index for JSON lists, Parquet and TFDS (``index_kind="record"``).
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
    """Rows removed by a loader running with ``on_error="drop"``, each with its error."""

    dropped: list[DataError] = dataclasses.field(default_factory=list)
    kept: int = 0
    # Filled by validation: (first_row, row) pairs whose reverse pair also occurs, and accepted
    # duplicates (with allow_duplicates=True).
    contradictions: list = dataclasses.field(default_factory=list)
    duplicates: list = dataclasses.field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.dropped.append(err)
        logger.warning("dropped row: %s", err)

    def extend(self, other: DropReport) -> None:
        self.dropped.extend(other.dropped)
        self.contradictions.extend(other.contradictions)
        self.duplicates.extend(other.duplicates)

    def counts(self) -> dict[str, int]:
        """Number of dropped rows per error code (``missing_field``, ``duplicate``, ...)."""
        out: dict[str, int] = {}
        for err in self.dropped:
            out[err.code] = out.get(err.code, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        lines = [f"kept {self.kept} rows, dropped {len(self.dropped)}"]
        lines += [f"  {err}" for err in self.dropped]
        return "\n".join(lines)


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
