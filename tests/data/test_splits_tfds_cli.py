"""Prompt-grouped splits, leakage checks, the TFDS builder, and the validate command."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefjax.data import (
    RepeatTask,
    build_tfds,
    check_leakage,
    grouped_split,
    load_dataset,
    read_records,
    read_tfds,
    write_jsonl,
)
from prefjax.data import validate as validate_mod

_row = st.fixed_dictionaries(
    {
        "prompt": st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5", "p6"]),
        "chosen": st.text(min_size=1, max_size=3),
        "rejected": st.text(min_size=1, max_size=3),
    },
    optional={"prompt_id": st.sampled_from(["a", "b", "c"])},
)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(_row, max_size=25), frac=st.floats(0.05, 0.95), seed=st.integers(0, 99))
def test_grouped_split_never_shares_a_prompt(rows, frac, seed):
    train, ev = grouped_split(rows, eval_fraction=frac, seed=seed)
    assert len(train) + len(ev) == len(rows)
    key = lambda r: r.get("prompt_id") or "prompt:" + r["prompt"]  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in ev}
    groups = {key(r) for r in rows}
    if len(groups) >= 2:
        assert train and ev
    # deterministic, and independent of row order
    assert grouped_split(rows, eval_fraction=frac, seed=seed) == (train, ev)
    t2, e2 = grouped_split(rows[::-1], eval_fraction=frac, seed=seed)
    assert {key(r) for r in e2} == {key(r) for r in ev}


def test_split_groups_by_prompt_id_over_text():
    rows = [
        {"prompt": "x", "prompt_id": "g1"},
        {"prompt": "y", "prompt_id": "g1"},
        {"prompt": "z", "prompt_id": "g2"},
    ]
    train, ev = grouped_split(rows, eval_fraction=0.5, seed=0)
    assert {r["prompt_id"] for r in train}.isdisjoint({r["prompt_id"] for r in ev})


def test_leakage_check_on_files(tmp_path):
    task = RepeatTask()
    rows = task.pairwise_records(200, seed=0)
    train, ev = grouped_split(rows, eval_fraction=0.2, seed=1)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", ev)
    write_jsonl(tmp_path / "leaky.jsonl", ev + train[:3])
    clean = check_leakage(
        read_records(str(tmp_path / "train.jsonl")), read_records(str(tmp_path / "eval.jsonl"))
    )
    assert not clean.leaks
    leaky = check_leakage(
        [r.data for r in read_records(str(tmp_path / "train.jsonl"))],
        [r.data for r in read_records(str(tmp_path / "leaky.jsonl"))],
    )
    leaked_prompts = {r["prompt"] for r in train[:3]}
    assert leaky.leaks and len(leaky.shared_groups) == len(leaked_prompts)
    assert leaky.shared_examples == 3


def test_leakage_by_text_even_with_different_ids():
    a = [{"prompt": "same text", "prompt_id": "1", "chosen": "x", "rejected": "y"}]
    b = [{"prompt": "same text", "prompt_id": "2", "chosen": "u", "rejected": "v"}]
    assert check_leakage(a, b).leaks


def test_tfds_round_trip_without_tensorflow(tmp_path, byte_tok):
    records = RepeatTask().pairwise_records(25, seed=0)
    conv = [{"role": "user", "content": "héllo"}]
    records[3] = {
        "prompt": conv,
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
        "prompt_id": "conv",
        "chosen_gold_reward": 1.0,
        "rejected_gold_reward": 0.0,
    }
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "eval.jsonl", records[:5][::-1])
    builder = build_tfds(
        {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        data_dir=str(tmp_path / "tfds"),
    )
    assert "tensorflow" not in sys.modules
    # Read back through tfds.data_source by name, and from the folder.
    by_name = read_tfds("prefjax_preferences/pairwise", data_dir=str(tmp_path / "tfds"))
    by_dir = read_tfds(builder.data_dir, split="eval")
    assert [r.data for r in by_name] == records
    assert [r.data for r in by_dir] == records[:5][::-1]
    # The folder is a data source for the loaders too, and tokenises like the JSONL.
    a = load_dataset(builder.data_dir, byte_tok, max_len=32)
    b = load_dataset(str(tmp_path / "train.jsonl"), byte_tok, max_len=32)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert all((x == y).all() for x, y in zip(a[col], b[col], strict=True))
    assert "tensorflow" not in sys.modules


def test_tfds_builder_validates(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
    ]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    from prefjax.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        build_tfds(str(tmp_path / "bad.jsonl"), data_dir=str(tmp_path / "t1"))
    b = build_tfds(str(tmp_path / "bad.jsonl"), data_dir=str(tmp_path / "t2"), on_error="drop")
    assert len(read_tfds(b.data_dir)) == 1 and len(b.drop_reports["train"]) == 1


def test_validate_cli_report_and_exit_status(tmp_path, capsys):
    good = [
        {"prompt": "q1", "chosen": "long answer", "rejected": "no"},
        {"prompt": "q2", "chosen": "yes", "rejected": "nope!"},
    ]
    write_jsonl(tmp_path / "good.jsonl", good)
    assert validate_mod.main([str(tmp_path / "good.jsonl"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)[0]
    assert rep["valid_rows"] == 2 and rep["errors"] == 0
    # byte lengths: chosen 11 and 3, rejected 2 and 5 -> differences +9 and -2
    assert rep["token_lengths"]["chosen"]["mean"] == 7.0
    assert rep["chosen_minus_rejected_tokens"]["mean"] == 3.5
    assert rep["chosen_minus_rejected_tokens"]["frac_chosen_longer"] == 0.5
    write_jsonl(tmp_path / "bad.jsonl", good + [good[0], {"prompt": "q3", "chosen": "x"}])
    assert validate_mod.main([str(tmp_path / "bad.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl:3: field 'prompt, chosen, rejected': duplicate of line 1" in out
    assert "bad.jsonl:4: field 'rejected': missing" in out
    # leakage against an eval file
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "q2", "chosen": "a", "rejected": "b"}])
    assert (
        validate_mod.main([str(tmp_path / "good.jsonl"), "--against", str(tmp_path / "eval.jsonl")])
        == 1
    )
    assert "1 of 1 eval prompt groups also in train" in capsys.readouterr().out


def test_validate_module_runs_as_a_command(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    proc = subprocess.run(
        [sys.executable, "-m", "prefjax.data.validate", str(tmp_path / "d.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "d.jsonl:1: field 'rejected': identical to 'chosen'" in proc.stdout


def test_validate_builtin_task(capsys):
    assert validate_mod.main(["--task", "sequence", "--num", "300", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)[0]
    assert rep["valid_rows"] == 300 and rep["unique_prompts"] == 30


@pytest.mark.parametrize("kind", ["listwise", "unpaired", "sft", "prompt"])
def test_tfds_round_trip_other_kinds(tmp_path, kind):
    task = RepeatTask()
    records = getattr(task, f"{kind}_records")(12, seed=1)
    # distinct rows only: a file with duplicates would (rightly) fail validation
    records = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    write_jsonl(tmp_path / "d.jsonl", records)
    builder = build_tfds(str(tmp_path / "d.jsonl"), data_dir=str(tmp_path / "tfds"), kind=kind)
    assert [r.data for r in read_tfds(builder.data_dir)] == records
