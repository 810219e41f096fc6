"""``python -m prefjax.data.benchmark``: loader throughput (examples/s) on this machine.

Times, for pairwise data and the byte tokenizer:

1. ``read+validate``: JSONL file -> validated rows;
2. ``tokenise``: rows -> :class:`~prefjax.data.dataset.TokenizedDataset`;
3. ``batch``: fixed-shape batches from :class:`~prefjax.data.batching.BatchIterator`;
4. ``end to end``: all three, examples / total seconds;

on two workloads: the built-in sequence task (prompts of 4 tokens, responses of 1-8) and
"chat-sized" synthetic pairs (prompts of 200-1000 bytes, responses of 50-600 bytes, truncated to
``max_len=512``). Prints one line per workload and stage, plus a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from prefjax.data.batching import BatchIterator
from prefjax.data.loaders import load_rows
from prefjax.data.readers import write_jsonl
from prefjax.data.tasks import RepeatTask
from prefjax.data.tokenize import tokenize
from prefjax.tokenizer import ByteTokenizer

_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had "
    "by word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now "
    "find"
).split()


def _text(rng, lo, hi):
    n = int(rng.integers(lo, hi))
    words = rng.choice(_WORDS, size=n // 4 + 1)
    return " ".join(words)[:n] or "x"


def chat_records(num: int, seed: int = 0) -> list[dict]:
    """Synthetic chat-sized pairs (random English words)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        out.append(
            {
                "prompt": f"[{i}] " + _text(rng, 200, 1000),
                "chosen": _text(rng, 50, 600),
                "rejected": "no. " + _text(rng, 50, 600),
            }
        )
    return out


def run(num: int, batch_size: int, tokenizer, workload: str, records, max_len: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pairs.jsonl")
        write_jsonl(path, records)
        t0 = time.perf_counter()
        _, rows, _ = load_rows(path, kind="pairwise", allow_duplicates=True)
        t1 = time.perf_counter()
    ds = tokenize(rows, tokenizer, "pairwise", max_len=max_len, max_prompt_len=max_len // 2)
    t2 = time.perf_counter()
    it = BatchIterator(ds, batch_size, seed=0, num_epochs=1, process_index=0, process_count=1)
    n_batched = sum(b["input_ids"].shape[0] for b in it)
    t3 = time.perf_counter()
    return {
        "workload": workload,
        "examples": num,
        "batch_size": batch_size,
        "max_len": max_len,
        "read_validate_per_s": num / (t1 - t0),
        "tokenise_per_s": num / (t2 - t1),
        "batch_per_s": n_batched / (t3 - t2),
        "end_to_end_per_s": num / (t3 - t0),
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m prefjax.data.benchmark")
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    tok = ByteTokenizer()
    results = [
        run(
            args.num,
            args.batch_size,
            tok,
            "sequence task",
            RepeatTask().pairwise_records(args.num, seed=0),
            32,
        ),
        run(args.num, args.batch_size, tok, "chat-sized", chat_records(args.num), 512),
    ]
    print(f"cpus available: {len(os.sched_getaffinity(0))}")
    for r in results:
        print(
            f"{r['workload']:>14}: read+validate {r['read_validate_per_s']:>9,.0f}/s  "
            f"tokenise {r['tokenise_per_s']:>9,.0f}/s  batch {r['batch_per_s']:>9,.0f}/s  "
            f"end to end {r['end_to_end_per_s']:>9,.0f} pairs/s"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
