"""Input edge cases: kind detection of malformed rows, non-UTF-8 bytes, empty files, and a
validator that reports every bad row (issue 12, data-input items 4-7)."""

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefjax.data
from prefjax.data import DataError, detect_kind, detect_kind_of_rows, load_rows, read_records
from prefjax.data import validate as validate_mod

PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]


def _lines(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------- 4. kind detection
@pytest.mark.parametrize(
    "record,kind",
    [
        ({"prompt": "q", "chosen": "a"}, "pairwise"),
        ({"prompt": "q", "rejected": "b"}, "pairwise"),
        ({"prompt": "q", "response_a": "x"}, "pairwise"),
        ({"prompt": "q", "response_b": "y", "label": 0}, "pairwise"),
        ({"prompt": "q", "ranking": [0, 1]}, "listwise"),
        ({"prompt": "q", "scores": [1, 2]}, "listwise"),
        ({"prompt": "q", "label": 1}, "unpaired"),
        ({"prompt": "q", "completion": "a", "label": 1}, "unpaired"),
        ({"prompt": "q", "completion": "a"}, "sft"),
        ({"prompt": "q"}, "prompt"),
    ],
)
def test_detect_kind_reads_a_malformed_row_as_its_own_kind(record, kind):
    assert detect_kind(record) == kind


def test_file_of_rows_missing_rejected_is_pairwise_and_fails(tmp_path, capsys):
    path = _write(tmp_path / "f.jsonl", _lines([{"prompt": "q1", "chosen": "a"}] * 2))
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'rejected': missing"):
        load_rows(path)
    assert validate_mod.main([path]) == 1
    out = capsys.readouterr().out
    assert "f.jsonl (pairwise)" in out
    assert f"{path}:1: field 'rejected': missing" in out and f"{path}:2: field 'rejected'" in out


def test_kind_is_detected_over_all_rows_not_the_first(tmp_path):
    rows = [{"prompt": "q"}] + PAIRS[:3]  # a malformed first row (chosen/rejected lost)
    assert detect_kind_of_rows(rows) == "pairwise"
    path = _write(tmp_path / "d.jsonl", _lines(rows))
    kind, good, report = load_rows(path, on_error="drop")
    assert kind == "pairwise" and len(good) == 3
    (err,) = report.dropped
    assert str(err).startswith(f"{path}:1: field 'chosen': missing")


def test_detect_kind_of_rows_breaks_ties_by_first_seen_and_is_exported():
    assert prefjax.data.detect_kind_of_rows is detect_kind_of_rows
    sft = {"prompt": "q", "completion": "a"}
    assert detect_kind_of_rows([sft, PAIRS[0], PAIRS[1], sft]) == "sft"
    assert detect_kind_of_rows([PAIRS[0], sft, sft, PAIRS[1]]) == "pairwise"
    # rows whose kind cannot be told do not vote
    assert detect_kind_of_rows([{"foo": 1}, sft]) == "sft"
    with pytest.raises(DataError, match=r"x.jsonl:4: cannot tell the kind"):
        detect_kind_of_rows([prefjax.data.Row({"foo": 1}, "x.jsonl", 4, "line")])


def test_rows_of_another_kind_fail_with_their_own_location(tmp_path):
    prompts = [{"prompt": f"p{i}"} for i in range(3)]
    rows = prompts[:1] + [PAIRS[0]] + prompts[1:]
    path = _write(tmp_path / "p.jsonl", _lines(rows))
    kind, good, report = load_rows(path, on_error="drop")
    assert kind == "prompt" and len(good) == 3
    (err,) = report.dropped
    assert (err.index, err.code) == (2, "kind")
    assert str(err).startswith(f"{path}:2: a pairwise row in data detected as prompt")
    # an explicit kind takes the prompts of pairwise rows, as before
    assert len(load_rows(path, kind="prompt")[1]) == 4


# ------------------------------------------------------------------------ 5. non-UTF-8
def _with_bad_byte():
    """Two good lines, then a line holding byte 0xe9 (a Latin-1 e-acute) at column 17."""
    head = _lines(PAIRS[:2])
    bad = b'{"prompt": "caf\xe9 au lait", "chosen": "a", "rejected": "b"}\n'
    data = head + bad + _lines(PAIRS[2:4])
    offset = len(head) + bad.index(b"\xe9")
    return data, offset, bad.index(b"\xe9") + 1


def test_non_utf8_jsonl_names_file_line_and_byte_offset(tmp_path):
    data, offset, col = _with_bad_byte()
    path = _write(tmp_path / "bad.jsonl", data)
    msg = f"{path}:3: not valid UTF-8: byte 0xe9 at byte offset {offset} (column {col})"
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert str(exc.value) == msg
    assert (exc.value.index, exc.value.code) == (3, "encoding")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_records(path, "pairwise")


def test_non_utf8_column_counts_characters_before_the_byte(tmp_path):
    path = _write(tmp_path / "u.jsonl", '{"prompt": "é'.encode() + b'\xff"}\n')
    with pytest.raises(DataError, match=r"u.jsonl:1: .* byte 0xff at byte offset 14 \(column 14\)"):
        read_records(path)


def test_non_utf8_json_names_the_line_from_the_byte_position(tmp_path):
    data = b'[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "caf\xe9"}\n]\n'
    path = _write(tmp_path / "bad.json", data)
    offset = data.index(b"\xe9")
    col = offset - data.rindex(b"\n", 0, offset)  # 1-based; the line is ASCII before the byte
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert str(exc.value) == (
        f"{path}:3: not valid UTF-8: byte 0xe9 at byte offset {offset} (column {col})"
    )


def test_non_utf8_gzip_offset_is_in_the_decompressed_stream(tmp_path):
    data, offset, col = _with_bad_byte()
    path = str(tmp_path / "bad.jsonl.gz")
    with gzip.open(path, "wb") as f:
        f.write(data)
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert str(exc.value) == (
        f"{path}:3: not valid UTF-8: byte 0xe9 at byte offset {offset} of the decompressed "
        f"data (column {col})"
    )


# ----------------------------------------------------------------------- 6. empty files
def _empty_files(tmp_path):
    pq.write_table(
        pa.table({k: pa.array([], pa.string()) for k in ("prompt", "chosen", "rejected")}),
        tmp_path / "e.parquet",
    )
    with gzip.open(tmp_path / "e.jsonl.gz", "wb"):
        pass
    return {
        "zero-bytes": _write(tmp_path / "zero.jsonl", b""),
        "blank-lines": _write(tmp_path / "blank.jsonl", b"\n  \n\r\n"),
        "gzip": str(tmp_path / "e.jsonl.gz"),
        "json-list": _write(tmp_path / "e.json", b"[]"),
        "json-object": _write(tmp_path / "o.json", b'{"data": []}'),
        "parquet": str(tmp_path / "e.parquet"),
    }


EMPTY = ["zero-bytes", "blank-lines", "gzip", "json-list", "json-object", "parquet"]


@pytest.mark.parametrize("case", EMPTY)
@pytest.mark.parametrize("kind", [None, "pairwise"])
def test_empty_file_is_a_data_error_naming_it(tmp_path, case, kind):
    path = _empty_files(tmp_path)[case]
    with pytest.raises(DataError, match="holds no records") as exc:
        read_records(path, kind)
    assert str(exc.value).startswith(f"{path}: holds no records")
    with pytest.raises(DataError, match="holds no records"):
        load_rows(path, kind=kind)


@pytest.mark.parametrize("case", EMPTY)
@pytest.mark.parametrize("kind_args", [[], ["--kind", "pairwise"]])
def test_validator_empty_file_is_one_error_line(tmp_path, capsys, case, kind_args):
    path = _empty_files(tmp_path)[case]
    assert validate_mod.main([path, *kind_args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"ERROR {path}: holds no records")
    assert captured.err.count("\n") == 1 and "rows: 0 read" not in captured.out


# ---------------------------------------------------------------- 7. report every bad row
def _messy(tmp_path):
    """Good rows with, at lines 2-5: broken JSON, a non-UTF-8 byte, a schema error, a list."""
    data = (
        _lines(PAIRS[:1])
        + b'{"prompt": "q", "chosen": \n'
        + b'{"prompt": "\xe9t\xe9", "chosen": "a", "rejected": "b"}\n'
        + _lines([{"prompt": "q9", "chosen": "same", "rejected": "same"}])
        + b"[1, 2]\n"
        + _lines(PAIRS[1:3])
    )
    return _write(tmp_path / "messy.jsonl", data)


def test_collect_mode_reads_past_broken_lines(tmp_path):
    path = _messy(tmp_path)
    with pytest.raises(DataError, match=r"messy.jsonl:2: invalid JSON"):
        read_records(path)
    rows = read_records(path, on_error="collect")
    assert [r.index for r in rows] == [1, 4, 6, 7]
    assert [(e.index, e.code) for e in rows.errors.dropped] == [
        (2, "json"),
        (3, "encoding"),
        (5, "wrong_type"),
    ]
    good = read_records(path, "pairwise", on_error="collect")
    assert [r.index for r in good] == [1, 6, 7]
    assert [e.index for e in good.errors.dropped] == [2, 3, 4, 5]


def test_validator_reports_every_bad_row_after_a_broken_line(tmp_path, capsys):
    path = _messy(tmp_path)
    assert validate_mod.main([path]) == 1
    out = capsys.readouterr().out
    assert "rows: 7 read, 3 valid, 4 with errors" in out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert [e.split(":")[1] for e in errors] == ["2", "3", "4", "5"]
    assert validate_mod.main([path, "--json"]) == 1
    (rep,) = json.loads(capsys.readouterr().out)
    assert (rep["rows_read"], rep["valid_rows"], rep["errors"]) == (7, 3, 4)
    assert rep["error_messages"][0].startswith(f"{path}:2: invalid JSON")
    assert rep["error_messages"][1].startswith(f"{path}:3: not valid UTF-8: byte 0xe9")
    assert rep["errors_by_code"] == {"encoding": 1, "identical": 1, "json": 1, "wrong_type": 1}


def test_validator_prints_max_errors_and_says_how_many_more(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a"} for i in range(30)]
    path = _write(tmp_path / "many.jsonl", _lines(rows))
    assert validate_mod.main([path, "--max-errors", "5"]) == 1
    out = capsys.readouterr().out
    assert sum(line.startswith("ERROR") for line in out.splitlines()) == 5
    assert "... and 25 more errors (--max-errors N prints more, --json lists" in out


def test_validator_keeps_at_most_the_cap_of_error_objects(tmp_path, capsys, monkeypatch):
    assert validate_mod.MAX_STORED_ERRORS == 10_000
    monkeypatch.setattr(validate_mod, "MAX_STORED_ERRORS", 10)
    # 25 broken lines (2, 4, ..., 50) between 25 good rows, then 4 rows missing 'rejected'
    good = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(25)]
    data = b"".join(_lines([r]) + b'{"prompt": \n' for r in good)
    path = _write(tmp_path / "cap.jsonl", data + _lines([{"prompt": "q0", "chosen": "a"}] * 4))
    assert validate_mod.main([path, "--json"]) == 1
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["errors"] == 25 + 4 and len(rep["error_messages"]) == 10
    assert rep["max_stored_errors"] == 10 and rep["errors_not_stored"] == 19
    assert rep["error_messages"][0].startswith(f"{path}:2: ")  # the first ones, in line order
    assert validate_mod.main([path, "--max-errors", "50"]) == 1
    out = capsys.readouterr().out
    assert sum(line.startswith("ERROR") for line in out.splitlines()) == 10
    assert "19 more errors were counted but not kept (at most 10 per file)" in out


def test_whole_json_file_invalid_is_one_located_error(tmp_path, capsys):
    data = b'[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": \n]\n'
    path = _write(tmp_path / "broken.json", data)
    with pytest.raises(DataError, match=r"broken.json:4: invalid JSON: Expecting value"):
        read_records(path, on_error="collect")
    assert validate_mod.main([path, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"ERROR {path}:4: invalid JSON: Expecting value (column 1)\n"
    (rep,) = json.loads(captured.out)
    assert rep["errors"] == 1 and rep["error_messages"] == [captured.err[6:-1]]


def test_validator_unreadable_or_missing_files_are_one_line_each(tmp_path):
    good = _write(tmp_path / "good.jsonl", _lines(PAIRS[:2]))
    (tmp_path / "folder.jsonl").mkdir()
    files = [
        str(tmp_path / "missing.jsonl"),
        str(tmp_path / "folder.jsonl"),
        _write(tmp_path / "notgz.jsonl.gz", b"not gzip data"),
        _write(tmp_path / "truncated.jsonl.gz", gzip.compress(_lines(PAIRS))[:-12]),
        _write(tmp_path / "data.csv", b"a,b\n"),
        _write(tmp_path / "zero.jsonl", b""),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "prefjax.data.validate", good, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    err_lines = proc.stderr.splitlines()
    assert len(err_lines) == len(files) - 1, proc.stderr  # the truncated gzip reports its rows
    assert all(line.startswith("ERROR ") for line in err_lines)
    for path, line in zip([f for f in files if "truncated" not in f], err_lines, strict=True):
        assert path in line
    assert "good.jsonl (pairwise)" in proc.stdout
    assert "truncated.jsonl.gz" in proc.stdout and "gzip" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "prefjax.data.validate", good, "--against", files[0]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"ERROR no such data file: {files[0]}\n"
