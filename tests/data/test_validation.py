"""Validation: every malformed case names the right file, line/record and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefjax.data import DataError, load_dataset, load_rows, normalize, read_records, validate_rows

GOOD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "prompt_id": "greet-1"},
    {"prompt": "Colour of the sky?", "chosen": "blue", "rejected": "green"},
]

# (bad row, field named in the error, error code); each is put at line 3 of a JSONL file.
PAIRWISE_CASES = [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing_field"),
    ({"prompt": "q", "chosen": 7, "rejected": "b"}, "chosen", "wrong_type"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "rejected[0]", "wrong_type"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    (
        {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"},
        "chosen[0]",
        "missing_field",
    ),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": "tie"}, "label", "tie"),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": 0.5}, "label", "tie"),
    ({"prompt": "q", "response_a": "x", "response_b": "y", "label": 2}, "label", "label"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": "rejected"}, "label", "label"),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": 3},
        "score_rejected",
        "tie",
    ),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "prompt_id": 1.5}, "prompt_id", "wrong_type"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "wrong_type"),
    (dict(GOOD[0]), "prompt, chosen, rejected", "duplicate"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "bad,field,code", PAIRWISE_CASES, ids=[f"{c}-{f}" for _, f, c in PAIRWISE_CASES]
)
def test_bad_row_among_good_names_line_and_field(tmp_path, bad, field, code, byte_tok):
    rows = GOOD[:2] + [bad] + GOOD[2:]
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_rows(path, kind="pairwise")
    err = exc.value
    assert (err.source, err.index, err.field, err.code) == (path, 3, field, code)
    assert str(err).startswith(f"{path}:3: field '{field}'")
    # The loaders call the same checks...
    with pytest.raises(DataError, match=f"{path}:3"):
        load_dataset(path, byte_tok, kind="pairwise", max_len=64)
    # ... and dropping reports the row and the reason, keeping the good rows.
    ds = load_dataset(path, byte_tok, kind="pairwise", max_len=64, on_error="drop")
    assert len(ds) == len(GOOD)
    (dropped,) = ds.info["dropped"].dropped
    assert (dropped.index, dropped.field, dropped.code) == (3, field, code)


@pytest.mark.parametrize(
    "kind,good,bad,field,code",
    [
        (
            "unpaired",
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": "maybe"},
            "label",
            "label",
        ),
        (
            "unpaired",
            {"prompt": "q", "completion": "a", "label": 1},
            {"prompt": "q", "completion": "b", "label": 0.3},
            "label",
            "label",
        ),
        (
            "unpaired",
            {"prompt": "q", "completion": "a", "label": 0},
            {"prompt": "q", "label": 1},
            "completion",
            "missing_field",
        ),
        (
            "listwise",
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
            "ranking",
            "ranking",
        ),
        (
            "listwise",
            {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]},
            {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1, 2]},
            "ranking",
            "ranking",
        ),
        (
            "listwise",
            {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]},
            {"prompt": "q", "responses": ["a", "a"], "ranking": [1, 0]},
            "responses[1]",
            "identical",
        ),
        (
            "listwise",
            {"prompt": "q", "responses": ["a", "b"], "scores": [1, 2]},
            {"prompt": "q", "responses": ["a", "b"], "scores": [2, 2]},
            "scores",
            "tie",
        ),
        (
            "sft",
            {"prompt": "q", "completion": "a"},
            {"prompt": "q", "completion": None},
            "completion",
            "missing_field",
        ),
        ("prompt", {"prompt": "q"}, {"prompt": ""}, "prompt", "empty"),
    ],
    ids=[
        "kto-label",
        "kto-frac",
        "kto-missing",
        "rank-dup",
        "rank-len",
        "rank-same",
        "score-tie",
        "sft-null",
        "prompt-empty",
    ],
)
def test_other_kinds(tmp_path, kind, good, bad, field, code):
    goods = [dict(good, prompt=f"{good['prompt']}{i}") for i in range(3)]
    path = _write_jsonl(tmp_path / "d.jsonl", goods[:1] + [bad] + goods[1:])
    with pytest.raises(DataError) as exc:
        load_rows(path, kind=kind)
    assert (exc.value.index, exc.value.field, exc.value.code) == (2, field, code)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"x.jsonl:2: invalid JSON"):
        read_records(str(path))


def test_json_and_parquet_name_record_index(tmp_path):
    rows = GOOD[:1] + [{"prompt": "q", "chosen": "a", "rejected": "a"}] + GOOD[1:]
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError) as exc:
        load_rows(str(jpath))
    assert (exc.value.index, exc.value.field) == (1, "rejected")
    assert "[record 1]" in str(exc.value)
    ppath = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        ppath,
    )
    with pytest.raises(DataError) as exc:
        load_rows(str(ppath))
    assert (exc.value.source, exc.value.index, exc.value.field) == (str(ppath), 1, "rejected")


def test_parquet_conversations_round_trip(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    rows = [
        {
            "prompt": conv,
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go"}],
        }
    ]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    kind, good, _ = load_rows(str(path))
    assert kind == "pairwise" and good[0].data == rows[0]


def test_hh_prefix_split_recovers_prompt():
    prompts = [
        "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:",
    ]
    responses = [
        (" Paris is the capital.", " Paris? Maybe Lyon."),  # share " Paris"
        (" Why did the chicken cross?", " No."),
    ]
    for prompt, (c, r) in zip(prompts, responses, strict=True):
        norm = normalize({"chosen": prompt + c, "rejected": prompt + r}, "pairwise").data
        assert (norm["prompt"], norm["chosen"], norm["rejected"]) == (prompt, c, r)


def test_common_prefix_without_marker_keeps_words_whole():
    norm = normalize(
        {"chosen": "Q: pick A: dogs bark", "rejected": "Q: pick A: dolphins"}, "pairwise"
    ).data
    assert norm["prompt"] == "Q: pick A: "
    assert (norm["chosen"], norm["rejected"]) == ("dogs bark", "dolphins")


def test_conversation_prefix_split():
    user = {"role": "user", "content": "hi"}
    a1 = {"role": "assistant", "content": "hello"}
    a2 = {"role": "assistant", "content": "go away"}
    norm = normalize({"chosen": [user, a1], "rejected": [user, a2]}, "pairwise").data
    assert norm == {"prompt": [user], "chosen": [a1], "rejected": [a2]}


def test_ultrafeedback_layout():
    row = {
        "prompt": "hi",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }
    norm = normalize(row, "pairwise").data
    assert norm["prompt"] == [{"role": "user", "content": "hi"}]
    assert norm["chosen"] == [{"role": "assistant", "content": "hello"}]
    assert norm["score_chosen"] == 8.0
    bad = dict(row, prompt="something else")
    with pytest.raises(DataError, match="field 'prompt'"):
        normalize(bad, "pairwise")


def test_ab_layout_orders_chosen_by_label():
    row = {"prompt": "q", "response_a": "x", "response_b": "y", "label": "b"}
    norm = normalize(row, "pairwise").data
    assert (norm["chosen"], norm["rejected"]) == ("y", "x")
    assert normalize(dict(row, label=0), "pairwise").data["chosen"] == "x"


def test_messages_sft_and_chat_template_tokenisation(byte_tok):
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    norm = normalize(row, "sft")
    assert norm.data["prompt"] == row["messages"][:1]
    from prefjax.data import tokenize

    ds = tokenize([norm], byte_tok, "sft", max_len=64)
    prompt_text = byte_tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
    assert ds["prompt_ids"][0].tolist() == [byte_tok.bos_id] + byte_tok.encode(prompt_text)
    full = byte_tok.apply_chat_template(row["messages"])
    assert byte_tok.decode(ds["response_ids"][0][:-1]) == full[len(prompt_text) :]
    assert ds["response_ids"][0][-1] == byte_tok.eos_id


def test_contradictions_are_counted_not_errors():
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "b", "rejected": "a"},
    ]
    _, good, report = validate_rows(rows, "pairwise")
    assert len(good) == 2 and len(report.contradictions) == 1


def test_detect_kind_error_names_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "k.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match=r"k.jsonl:1: cannot tell the kind"):
        load_rows(path)


def test_read_records_with_kind_validates_and_rows_read_like_dicts(tmp_path):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = _write_jsonl(
        tmp_path / "hh.jsonl", [hh, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    )
    assert read_records(path)[0]["chosen"] == hh["chosen"]  # raw without a kind
    with pytest.raises(DataError, match=r"hh.jsonl:2: field 'rejected'"):
        read_records(path, "pairwise")
    (row,) = read_records(path, "pairwise", on_error="drop")
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant:" and row.get("prompt_id") is None
    assert dict(row) == {
        "prompt": "\n\nHuman: hi\n\nAssistant:",
        "chosen": " yo",
        "rejected": " no",
    }
    assert (row.source, row.index) == (path, 1)
