"""``python -m prefjax.data.validate FILE [FILE ...]``: check preference data and report on it.

Runs the loaders' checks on every row (without stopping at the first error) and prints:

* counts: rows read, valid rows, errors by kind (missing fields, wrong types, empty strings,
  identical chosen/rejected, non-binary labels, ties, bad rankings, duplicates), the first
  errors with file, line and field;
* prompts: unique prompt groups, examples per prompt, contradictory pairs (both orders seen);
* token lengths (min / mean / median / p95 / max) of prompts and responses under the tokenizer
  (the built-in byte tokenizer unless ``--tokenizer`` names a Hugging Face folder);
* for pairwise data, the length difference chosen - rejected (mean, median, and how often the
  chosen response is longer: the usual source of length bias in preference training);
* with ``--against EVAL_FILE``, prompt leakage between the two sets.

``--task sequence|bandit|arithmetic`` reports on a built-in task's generated data instead of a file.

Reading goes on past a broken line (not JSON, not UTF-8, not an object), which is reported with
the rows' errors; all errors are counted, the first ``--max-errors`` printed, and at most
10,000 kept per file (``--json`` lists those). A file that cannot be read at all (missing,
unreadable, empty, not JSON as a whole) is one ``ERROR`` line on stderr. The exit status is 1
when any file or row has an error (or leakage is found), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from prefjax.data.errors import DataError, DropReport, as_rows, merge_reports
from prefjax.data.readers import read_records
from prefjax.data.schemas import KINDS, validate_rows
from prefjax.data.splits import check_leakage, group_key
from prefjax.data.tasks import make_task
from prefjax.data.tokenize import render_prompt, render_response
from prefjax.tokenizer import ByteTokenizer, load_tokenizer

# Error objects kept per file (all errors are counted): a file of bad rows can be huge.
MAX_STORED_ERRORS = 10_000


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"count": 0}
    return {
        "count": int(v.size),
        "min": float(v.min()),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
    }


def report_rows(kind, rows, errors: DropReport, tokenizer, num_read: int) -> dict:
    """The validation report of normalised ``rows`` (dict, JSON-able)."""
    codes = errors.counts()
    groups = Counter(group_key(r) for r in rows)
    rep = {
        "kind": kind,
        "rows_read": num_read,
        "valid_rows": len(rows),
        "errors": len(errors),
        "errors_by_code": dict(sorted(codes.items())),
        "error_messages": [str(e) for e in errors.dropped],
        "errors_not_stored": errors.num_not_stored,
        "max_stored_errors": errors.max_stored,
        "duplicates": codes.get("duplicate", 0) + len(errors.duplicates),
        "duplicates_allowed": len(errors.duplicates),
        "ties": codes.get("tie", 0),
        "identical_pairs": codes.get("identical", 0),
        "contradictory_pairs": len(getattr(errors, "contradictions", [])),
        "unique_prompts": len(groups),
        "examples_per_prompt": _stats(list(groups.values())),
    }
    lengths: dict[str, list[int]] = {"prompt": []}

    def ntok(text):
        return len(tokenizer.encode(text))

    for r in rows:
        d = r.data
        lengths["prompt"].append(ntok(render_prompt(d["prompt"], tokenizer)))
        if kind == "pairwise":
            for f in ("chosen", "rejected"):
                lengths.setdefault(f, []).append(
                    ntok(render_response(d["prompt"], d[f], tokenizer))
                )
        elif kind in ("sft", "unpaired"):
            lengths.setdefault("completion", []).append(
                ntok(render_response(d["prompt"], d["completion"], tokenizer))
            )
        elif kind == "step":
            lengths.setdefault("steps", []).append(
                ntok("".join(d["steps"])) + len(d["steps"])  # + one separator per step
            )
        elif kind == "listwise":
            for y in d["responses"]:
                lengths.setdefault("responses", []).append(
                    ntok(render_response(d["prompt"], y, tokenizer))
                )
    rep["token_lengths"] = {k: _stats(v) for k, v in lengths.items()}
    if kind == "pairwise" and rows:
        diff = np.asarray(lengths["chosen"]) - np.asarray(lengths["rejected"])
        rep["chosen_minus_rejected_tokens"] = {
            "mean": float(diff.mean()),
            "median": float(np.median(diff)),
            "frac_chosen_longer": float((diff > 0).mean()),
            "frac_equal_length": float((diff == 0).mean()),
            "frac_chosen_shorter": float((diff < 0).mean()),
        }
    if kind == "unpaired" and rows:
        rep["frac_desirable"] = float(np.mean([r.data["label"] for r in rows]))
    if kind == "step" and rows:
        labels = [x for r in rows for x in r.data["labels"]]
        rep["steps_per_example"] = _stats([len(r.data["steps"]) for r in rows])
        rep["frac_correct_steps"] = float(np.mean(labels))
        rep["frac_all_steps_correct"] = float(np.mean([min(r.data["labels"]) for r in rows]))
    return rep


def format_report(rep: dict, errors: DropReport, max_errors: int = 20) -> str:
    """Human-readable text of a :func:`report_rows` report."""
    out = [
        f"== {rep.get('source', '<records>')} ({rep['kind'] or 'kind unknown'})",
        f"rows: {rep['rows_read']} read, {rep['valid_rows']} valid, {rep['errors']} with errors",
    ]
    if rep["errors_by_code"]:
        out.append(
            "errors by kind: " + ", ".join(f"{k}={v}" for k, v in rep["errors_by_code"].items())
        )
    allowed = f" ({rep['duplicates_allowed']} allowed)" if rep["duplicates_allowed"] else ""
    out.append(
        f"duplicates: {rep['duplicates']}{allowed}, ties: {rep['ties']}, identical "
        f"chosen/rejected: {rep['identical_pairs']}, contradictory pairs: "
        f"{rep['contradictory_pairs']}"
    )
    e = rep["examples_per_prompt"]
    if e["count"]:
        out.append(
            f"prompts: {rep['unique_prompts']} unique, examples per prompt "
            f"mean {e['mean']:.2f} max {e['max']:.0f}"
        )
    out.append("token lengths:      count    min    mean  median     p95     max")
    for name, s in rep["token_lengths"].items():
        if s["count"]:
            out.append(
                f"  {name:<14} {s['count']:>7} {s['min']:>6.0f} {s['mean']:>7.1f} "
                f"{s['median']:>7.1f} {s['p95']:>7.1f} {s['max']:>7.0f}"
            )
    if "chosen_minus_rejected_tokens" in rep:
        d = rep["chosen_minus_rejected_tokens"]
        out.append(
            f"chosen - rejected tokens: mean {d['mean']:+.2f}, median "
            f"{d['median']:+.1f}; chosen longer {d['frac_chosen_longer']:.1%}, equal "
            f"{d['frac_equal_length']:.1%}, shorter {d['frac_chosen_shorter']:.1%}"
        )
    if "frac_desirable" in rep:
        out.append(f"desirable: {rep['frac_desirable']:.1%}")
    if "frac_correct_steps" in rep:
        out.append(
            f"steps: {rep['steps_per_example']['mean']:.2f} per example, "
            f"{rep['frac_correct_steps']:.1%} labelled correct, "
            f"{rep['frac_all_steps_correct']:.1%} of examples correct at every step"
        )
    shown = errors.dropped[: max(max_errors, 0)]
    out.extend(f"ERROR {err}" for err in shown)
    if len(errors.dropped) > len(shown):
        out.append(
            f"... and {len(errors.dropped) - len(shown)} more errors (--max-errors N prints "
            f"more, --json lists all {len(errors.dropped)} kept)"
        )
    if errors.num_not_stored:
        out.append(
            f"... and {errors.num_not_stored} more errors were counted but not kept (at most "
            f"{errors.max_stored} per file)"
        )
    return "\n".join(out)


def _tokenizer(path: str):
    """The ``--tokenizer`` Hugging Face folder, or the byte tokenizer when none is given."""
    return load_tokenizer(path) if path else ByteTokenizer()


def _task_rows(task_name: str, kind: str, num: int, seed: int):
    task = make_task(task_name)
    recs = getattr(task, f"{kind}_records")(num, seed=seed)
    return as_rows(recs, source=f"task:{task_name}")


def _check_source(name, rows, args, tokenizer):
    """Reads (unless ``rows`` are given) and validates one source: ``(report, good, errors)``.

    Raises the error of a source that cannot be read at all."""
    cap = MAX_STORED_ERRORS
    generated = rows is not None  # a task's i.i.d. samples repeat: duplicates are allowed
    if rows is None:
        rows = read_records(name, split=args.split, on_error="collect", max_stored_errors=cap)
    read_errors = getattr(rows, "errors", DropReport())
    kind, good, errors = args.kind, [], DropReport()
    if rows:  # else every line was broken: nothing to detect or validate
        kind, good, errors = validate_rows(
            rows,
            args.kind,
            on_error="collect",
            allow_duplicates=args.allow_duplicates or generated,
            max_stored_errors=cap,
        )
    errors = merge_reports(read_errors, errors, max_stored=cap)
    rep = report_rows(kind, good, errors, tokenizer, len(rows) + len(read_errors))
    rep["source"] = name
    return rep, good, errors


def _one_line(err: Exception, name: str) -> str:
    """An error as one line that names its file."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        msg = f"{err.filename}: {err.strerror}"
    else:
        msg = " ".join(line.strip() for line in str(err).splitlines()) or type(err).__name__
    return msg if name in msg else f"{name}: {msg}"


def _file_error_report(name: str, kind, err: Exception, msg: str) -> dict:
    code = err.code if isinstance(err, DataError) else "io"
    return {
        "source": name,
        "kind": kind,
        "rows_read": 0,
        "valid_rows": 0,
        "errors": 1,
        "errors_by_code": {code: 1},
        "error_messages": [msg],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m prefjax.data.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="*", help="JSONL / JSON / Parquet files or TFDS folders")
    p.add_argument(
        "--kind",
        default=None,
        help="pairwise | listwise | unpaired | sft | prompt | step (default: detect)",
    )
    p.add_argument(
        "--tokenizer",
        default="",
        help="Hugging Face tokenizer folder (default: the byte tokenizer)",
    )
    p.add_argument("--against", default=None, help="an eval file to check for prompt leakage")
    p.add_argument("--split", default="train", help="split of a TFDS folder")
    p.add_argument(
        "--task",
        default=None,
        choices=("sequence", "bandit", "arithmetic"),
        help="report on a built-in task instead of files",
    )
    p.add_argument("--num", type=int, default=2000, help="examples to generate with --task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="count duplicate examples without failing (default with --task: "
        "sampled synthetic data repeats i.i.d. draws)",
    )
    p.add_argument("--max-errors", type=int, default=20, help="errors to print per file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if not args.files and not args.task:
        p.error("give FILE(s) or --task")
    if args.kind is not None and args.kind not in KINDS:
        p.error(f"--kind must be one of {', '.join(KINDS)}")
    tok = _tokenizer(args.tokenizer)
    status = 0
    sources = [(f, None) for f in args.files]
    if args.task:
        sources.append(
            (
                f"task:{args.task}",
                _task_rows(args.task, args.kind or "pairwise", args.num, args.seed),
            )
        )
    all_rows = []
    reports = []
    for name, rows in sources:
        try:
            rep, good, errors = _check_source(name, rows, args, tok)
        except (OSError, ValueError, EOFError) as err:  # missing, unreadable, empty, not JSON
            msg = _one_line(err, name)
            print(f"ERROR {msg}", file=sys.stderr)
            status = 1
            reports.append(_file_error_report(name, args.kind, err, msg))
            continue
        reports.append(rep)
        all_rows.extend(good)
        if not args.json:
            print(format_report(rep, errors, args.max_errors))
        if len(errors):
            status = 1
    if args.against:
        try:
            eval_rows = read_records(args.against, split=args.split)
            _, ev, ev_err = validate_rows(eval_rows, args.kind, on_error="collect")
        except (OSError, ValueError, EOFError) as err:
            print(f"ERROR {_one_line(err, args.against)}", file=sys.stderr)
            return 1
        leak = check_leakage(all_rows, ev)
        if not args.json:
            print(leak.summary())
            if len(ev_err):
                print(f"{args.against}: {len(ev_err)} rows with errors (validate it for the list)")
        reports.append(
            {
                "leakage": {
                    "shared_groups": len(leak.shared_groups),
                    "shared_examples": leak.shared_examples,
                    "eval_rows_leaking": leak.eval_rows_leaking,
                }
            }
        )
        if leak.leaks or len(ev_err):
            status = 1
    if args.json:
        print(json.dumps(reports, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
