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

``--task sequence|bandit`` reports on a built-in task's generated data instead of a file. The
exit status is 1 when any row has an error (or leakage is found), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from prefjax.data.errors import DropReport
from prefjax.data.readers import read_records
from prefjax.data.schemas import validate_rows
from prefjax.data.splits import check_leakage, group_key
from prefjax.data.tokenize import render_prompt, render_response


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
    codes = Counter(e.code for e in errors.dropped)
    groups = Counter(group_key(r) for r in rows)
    rep = {
        "kind": kind,
        "rows_read": num_read,
        "valid_rows": len(rows),
        "errors": len(errors.dropped),
        "errors_by_code": dict(sorted(codes.items())),
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
    return rep


def format_report(rep: dict, errors: DropReport, max_errors: int = 20) -> str:
    """Human-readable text of a :func:`report_rows` report."""
    out = [
        f"== {rep.get('source', '<records>')} ({rep['kind']})",
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
    for err in errors.dropped[:max_errors]:
        out.append(f"ERROR {err}")
    if len(errors.dropped) > max_errors:
        out.append(f"... and {len(errors.dropped) - max_errors} more errors")
    return "\n".join(out)


def _tokenizer(path):
    if path:
        from prefjax.models import load_tokenizer

        return load_tokenizer(path)
    try:
        from prefjax.models import ByteTokenizer
    except ImportError:
        from prefjax.models.tokenizer import ByteTokenizer
    return ByteTokenizer()


def _task_rows(task_name: str, kind: str, num: int, seed: int):
    from prefjax.data.errors import as_rows
    from prefjax.data.tasks import make_task

    task = make_task(task_name)
    recs = getattr(task, f"{kind}_records")(num, seed=seed)
    return as_rows(recs, source=f"task:{task_name}")


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
        help="pairwise | listwise | unpaired | sft | prompt (default: detect)",
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
        choices=("sequence", "bandit"),
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
            raw = rows if rows is not None else read_records(name, split=args.split)
        except (OSError, ValueError) as err:  # unreadable file, invalid JSON
            print(f"ERROR {err}", file=sys.stderr)
            status = 1
            continue
        kind, good, errors = validate_rows(
            raw,
            args.kind,
            on_error="collect",
            allow_duplicates=args.allow_duplicates or rows is not None,
        )
        rep = report_rows(kind, good, errors, tok, len(raw))
        rep["source"] = name
        reports.append(rep)
        all_rows.extend(good)
        if not args.json:
            print(format_report(rep, errors, args.max_errors))
        if errors.dropped:
            status = 1
    if args.against:
        _, ev, ev_err = validate_rows(
            read_records(args.against, split=args.split), args.kind, on_error="collect"
        )
        leak = check_leakage(all_rows, ev)
        if not args.json:
            print(leak.summary())
        reports.append(
            {
                "leakage": {
                    "shared_groups": len(leak.shared_groups),
                    "shared_examples": leak.shared_examples,
                    "eval_rows_leaking": leak.eval_rows_leaking,
                }
            }
        )
        if leak.leaks or ev_err.dropped:
            status = 1
    if args.json:
        print(json.dumps(reports, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
