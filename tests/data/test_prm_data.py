"""Step-level (process reward) data: schema, errors naming file/line/field, tokenisation with a
separator token per step, token-aligned labels in batches, and the built-in arithmetic task."""

import json

import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax.data import (
    ArithmeticTask,
    DataError,
    build_tfds,
    collate,
    datasets_from_config,
    detect_kind,
    normalize,
    read_records,
    read_tfds,
    tokenize,
)
from prefjax.data import validate as validate_cli
from prefjax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEP = 10  # "\n" in the byte tokenizer
GOOD = {"prompt": "1+1x2=", "steps": ["2", "4"], "labels": [1, 0]}

# (bad row, field named in the error, error code); each is put at line 2 of a JSONL file.
BAD_ROWS = [
    ({"prompt": "q", "steps": ["a"]}, "labels", "missing_field"),
    ({"prompt": "q", "labels": [1]}, "steps", "missing_field"),
    ({"steps": ["a"], "labels": [1]}, "prompt", "missing_field"),
    ({"prompt": "q", "steps": "a", "labels": [1]}, "steps", "wrong_type"),
    ({"prompt": "q", "steps": ["a"], "labels": 1}, "labels", "wrong_type"),
    ({"prompt": "q", "steps": [], "labels": []}, "steps", "empty"),
    ({"prompt": "q", "steps": ["a", " "], "labels": [1, 0]}, "steps[1]", "empty"),
    ({"prompt": "q", "steps": ["a", 3], "labels": [1, 0]}, "steps[1]", "wrong_type"),
    ({"prompt": "q", "steps": ["a", "b"], "labels": [1]}, "labels", "label"),
    ({"prompt": "q", "steps": ["a", "b"], "labels": [1, 0.5]}, "labels[1]", "label"),
    ({"prompt": "q", "steps": ["a"], "labels": ["maybe"]}, "labels[0]", "label"),
    ({"prompt": "q", "completions": ["a", "b"], "labels": [1, 2]}, "labels[1]", "label"),
]


def test_kind_detection_and_both_layouts_normalise_alike():
    trl = {"prompt": "1+1x2=", "completions": ["2", "4"], "labels": [True, False]}
    assert detect_kind(GOOD) == detect_kind(trl) == "step"
    assert detect_kind({"prompt": "q", "labels": [1]}) == "step"  # malformed, still a step row
    assert normalize(trl, "step").data == normalize(GOOD, "step").data == GOOD
    signs = normalize({"prompt": "q", "steps": ["a", "b"], "labels": ["+", "-"]}, "step")
    assert signs.data["labels"] == [1, 0]  # PRM800K-style ratings


@pytest.mark.parametrize(
    "row, field, code", BAD_ROWS, ids=[f"{f}-{c}-{i}" for i, (_, f, c) in enumerate(BAD_ROWS)]
)
def test_bad_step_rows_name_file_line_and_field(tmp_path, row, field, code):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        read_records(str(path), "step")
    assert err.value.code == code
    assert str(err.value).startswith(f"{path}:2: field '{field}':"), str(err.value)


def test_duplicate_step_rows_are_errors(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 2)
    with pytest.raises(DataError, match="duplicate of line 1") as err:
        read_records(str(path), "step")
    assert err.value.code == "duplicate"


def test_tokenisation_puts_a_separator_and_the_label_after_each_step():
    ds = tokenize([GOOD], TOK, "step", max_len=32)
    # [bos] "1+1x2=" | "2" sep "4" sep eos; labels at the separators, -1 elsewhere.
    assert ds["prompt_ids"][0].tolist() == [TOK.bos_id, *b"1+1x2="]
    assert ds["response_ids"][0].tolist() == [ord("2"), SEP, ord("4"), SEP, TOK.eos_id]
    assert ds["step_labels"][0].tolist() == [-1, 1, -1, 0, -1]
    for pad_side in ("right", "left"):
        b = collate(ds, [0, -1], 16, pad_side=pad_side)
        ids, mask, labels = b["input_ids"][0], b["step_mask"][0], b["step_labels"][0]
        start = 0 if pad_side == "right" else 16 - 12
        assert np.flatnonzero(mask).tolist() == [start + 8, start + 10]
        assert ids[mask > 0].tolist() == [SEP, SEP]
        assert labels.tolist() == [int(i == start + 8) for i in range(16)]
        assert b["loss_mask"][0].sum() == 5 and b["attention_mask"][0].sum() == 12
        assert b["step_mask"][1].sum() == 0 and b["example_mask"].tolist() == [1, 0]


def test_separator_inside_a_step_and_multi_token_separators_are_refused():
    row = {"prompt": "q", "steps": ["a\nb", "c"], "labels": [1, 1]}
    with pytest.raises(DataError, match="step separator token 10") as err:
        tokenize([row], TOK, "step", max_len=32, source="x.jsonl")
    assert err.value.code == "separator" and err.value.field == "steps[0]"
    with pytest.raises(ValueError, match="step_separator=' ;' encodes to 2 tokens"):
        tokenize([GOOD], TOK, "step", max_len=32, step_separator=" ;")
    # Another one-token separator works and moves the label positions with it.
    ds = tokenize([GOOD], TOK, "step", max_len=32, step_separator=";")
    assert ds["response_ids"][0].tolist() == [ord("2"), ord(";"), ord("4"), ord(";"), 258]


def test_truncation_keeps_the_labels_of_surviving_steps():
    # Prompt: 7 tokens; max_len 10 leaves 3 response tokens: "2" sep "4" -> one labelled step.
    ds = tokenize([GOOD], TOK, "step", max_len=10)
    assert ds["response_ids"][0].tolist() == [ord("2"), SEP, ord("4")]
    assert ds["step_labels"][0].tolist() == [-1, 1, -1]
    with pytest.raises(DataError, match="no step's separator survives") as err:
        tokenize([GOOD], TOK, "step", max_len=8)
    assert err.value.code == "response_truncated"
    dropped = tokenize([GOOD], TOK, "step", max_len=8, on_error="drop")
    assert len(dropped) == 0 and len(dropped.info["dropped"]) == 1


def test_arithmetic_task_labels_follow_the_first_error_rule():
    task = ArithmeticTask()
    assert task.solution("8+3x3=") == ["1", "4", "7"]  # (8 + 3k) mod 10
    assert task.step_labels("8+3x3=", ["1", "4", "7"]) == [1, 1, 1]
    assert task.step_labels("8+3x3=", ["1", "5", "8"]) == [1, 0, 0]  # consistent after a slip
    assert task.step_labels("8+3x3=", ["1", "4", "7", "0"]) == [1, 1, 1, 0]  # an extra step
    assert task.gold_reward("8+3x3=", "1\n4\n7\n") == 1.0
    assert task.gold_reward("8+3x3=", "1\n5\n8\n") == pytest.approx(1 / 3)
    assert task.gold_reward("8+3x3=", "1\n4\n7\n0\n") == pytest.approx(3 / 4)
    assert task.gold_reward("8+3x3=", "") == 0.0
    recs = ArithmeticTask(p_correct=1.0).step_records(20, seed=0)
    assert all(r["labels"] == [1] * len(r["steps"]) and r["gold_reward"] == 1.0 for r in recs)
    recs = task.step_records(400, seed=0)
    for r in recs:  # labels are the task's own, and the base writes n steps
        assert r["labels"] == task.step_labels(r["prompt"], r["steps"])
        assert len(r["steps"]) == task.parse_prompt(r["prompt"])[2]
    first = np.mean([r["labels"][0] for r in recs])
    assert abs(first - task.p_correct) < 0.06  # step 1 is right with probability p_correct


def test_datasets_from_config_builds_step_splits_by_prompt():
    d = config_common.base_config("reward").data
    d.update(task="arithmetic", num_train=64, num_eval=16)
    splits = datasets_from_config(d, TOK, "step")
    assert splits.train.kind == "step" and (len(splits.train), len(splits.eval)) == (64, 16)
    assert not set(splits.train["prompt_id"]) & set(splits.eval["prompt_id"])
    assert set(splits.eval["prompt_id"]) <= splits.held_out
    d.task = "sequence"
    with pytest.raises(ValueError, match="config.data.task='arithmetic'"):
        datasets_from_config(d, TOK, "step")


def test_validator_reports_step_files(tmp_path, capsys):
    path = tmp_path / "steps.jsonl"
    rows = [GOOD, {"prompt": "2+1x2=", "steps": ["3", "4"], "labels": [1, 1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validate_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "(step)" in out and "75.0% labelled correct" in out and "50.0% of examples" in out


def test_step_rows_round_trip_through_tfds(tmp_path):
    path = tmp_path / "steps.jsonl"
    trl = {"prompt": "2+1x2=", "completions": ["3", "4"], "labels": [True, True], "prompt_id": "p"}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(trl) + "\n")
    builder = build_tfds({"train": [str(path)]}, data_dir=str(tmp_path / "tfds"), kind="step")
    back = [r.data for r in read_tfds(builder.data_dir, split="train")]
    assert back == [
        GOOD,
        {"prompt": "2+1x2=", "steps": ["3", "4"], "labels": [1, 1], "prompt_id": "p"},
    ]
