"""Tokenisation (loss masks, truncation, padding) and the resumable, sharded batch iterator."""

import json

import numpy as np
import pytest

from prefjax.data import (
    BatchIterator,
    DataError,
    RepeatTask,
    TruncationPolicy,
    collate,
    default_buckets,
    tokenize,
)


def _pair(prompt, chosen, rejected, **kw):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **kw}


def test_loss_mask_covers_exactly_response_tokens(byte_tok):
    recs = [_pair("ab", "xyz", "q"), _pair("long prompt", "r", "st")]
    ds = tokenize(recs, byte_tok, "pairwise", max_len=32)
    for side in ("right", "left"):
        b = collate(ds, [0, 1], 24, pad_side=side)
        assert b["input_ids"].shape == (2, 2, 24)  # [batch, (chosen, rejected), seq]
        for i, rec in enumerate(recs):
            for k, name in enumerate(("chosen", "rejected")):
                ids, mask = b["input_ids"][i, k], b["loss_mask"][i, k]
                expected = byte_tok.encode(rec[name]) + [byte_tok.eos_id]
                assert ids[mask == 1].tolist() == expected
                attn = b["attention_mask"][i, k]
                full = [byte_tok.bos_id] + byte_tok.encode(rec["prompt"]) + expected
                assert ids[attn == 1].tolist() == full
                # loss mask is inside the attention mask and padding is the pad id
                assert np.all(mask <= attn) and np.all(ids[attn == 0] == byte_tok.pad_id)


def test_padding_side(byte_tok):
    ds = tokenize([{"prompt": "abc"}, {"prompt": "a"}], byte_tok, "prompt", max_len=8)
    left = collate(ds, [0, 1], 8, pad_side="left")
    right = collate(ds, [0, 1], 8, pad_side="right")
    # left: real tokens end at the last column; right: start at the first.
    assert left["prompt_attention_mask"][:, -1].tolist() == [1, 1]
    assert left["prompt_attention_mask"][1].tolist() == [0] * 6 + [1, 1]
    assert right["prompt_attention_mask"][1].tolist() == [1, 1] + [0] * 6
    np.testing.assert_array_equal(
        left["prompt_input_ids"][0][-4:], [byte_tok.bos_id] + byte_tok.encode("abc")
    )
    it = BatchIterator(
        ds, 2, shuffle=False, pad_side="left", process_index=0, process_count=1, with_positions=True
    )
    b = next(it)
    assert b["prompt_positions"][1].tolist()[-2:] == [0, 1]


def test_truncation_keeps_prompt_end_and_response_start(word_tok):
    rec = _pair("p1 p2 p3 p4 p5 p6", "c1 c2 c3 c4 c5", "r1 r2")
    ds = tokenize([rec], word_tok, "pairwise", max_len=8, max_prompt_len=4, add_bos=False)
    dec = word_tok.decode
    assert dec(ds["prompt_ids"][0]) == "p3 p4 p5 p6"  # end of the prompt
    assert dec(ds["chosen_ids"][0]) == "c1 c2 c3 c4"  # start of the response, EOS cut off
    assert ds["rejected_ids"][0].tolist()[-1] == word_tok.eos_id  # short one keeps its EOS
    assert ds.info["num_prompt_truncated"] == 1 and ds.info["num_response_truncated"] == 1


def test_truncation_policy_other_sides(word_tok):
    rec = _pair("p1 p2 p3 p4 p5 p6", "c1 c2 c3 c4 c5", "r1 r2")
    pol = TruncationPolicy(prompt="keep_start", response="keep_end")
    ds = tokenize(
        [rec], word_tok, "pairwise", max_len=8, max_prompt_len=4, add_bos=False, truncation=pol
    )
    assert word_tok.decode(ds["prompt_ids"][0]) == "p1 p2 p3 p4"
    assert ds["chosen_ids"][0].tolist()[-1] == word_tok.eos_id
    assert word_tok.decode(ds["chosen_ids"][0][:-1]) == "c3 c4 c5"


def test_untruncated_rows_are_unchanged(word_tok):
    ds = tokenize([_pair("a b", "c", "d e")], word_tok, "pairwise", max_len=8, max_prompt_len=4)
    assert len(ds["prompt_ids"][0]) == 3 and len(ds["rejected_ids"][0]) == 3
    assert ds.info["num_prompt_truncated"] == 0 and ds.info["num_response_truncated"] == 0


def test_vanishing_response_is_reported(word_tok):
    recs = [_pair("a b", "c", "d"), _pair("w " * 10, "c", "d"), _pair("x", "y", "z")]
    with pytest.raises(DataError, match=r"\[record 1\].*response truncated to 0") as exc:
        tokenize(recs, word_tok, "pairwise", max_len=6, source="f.jsonl")
    assert exc.value.index == 1 and exc.value.code == "response_truncated"
    ds = tokenize(recs, word_tok, "pairwise", max_len=6, on_error="drop")
    assert len(ds) == 2 and ds["source_index"].tolist() == [0, 2]
    assert [e.index for e in ds.info["dropped"].dropped] == [1]


def test_min_response_len(word_tok):
    recs = [_pair("a b c d", "e f g h", "i")]
    with pytest.raises(DataError, match="response truncated to 2"):
        tokenize(
            recs,
            word_tok,
            "pairwise",
            max_len=6,
            add_bos=False,
            truncation=TruncationPolicy(min_response_len=3),
        )


def test_buckets_bound_the_number_of_shapes(byte_tok):
    ds = RepeatTask(max_count=30).pairwise_dataset(byte_tok, 300, seed=0, max_len=64)
    it = BatchIterator(ds, 16, seed=0, num_epochs=1, process_index=0, process_count=1)
    shapes = {b["input_ids"].shape for b in it}
    assert shapes <= {(16, 2, L) for L in default_buckets(64)}  # [batch, (chosen, rejected), seq]
    assert len(shapes) >= 2  # lengths vary, so more than one bucket is used
    for b in BatchIterator(ds, 16, num_epochs=1, process_index=0, process_count=1):
        assert b["attention_mask"].shape == b["loss_mask"].shape == b["input_ids"].shape
        # The bucket fits the longest sequence of either side, and no shorter bucket would.
        longest = b["attention_mask"].sum(-1).max()
        assert longest <= b["input_ids"].shape[-1]


def _all(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resumed_iterator_matches_uninterrupted(byte_tok):
    ds = RepeatTask().pairwise_dataset(byte_tok, 50, seed=0)
    kw = dict(seed=5, group_by_length=2, process_index=0, process_count=1)
    ref = _all(BatchIterator(ds, 8, **kw), 20)  # crosses several epochs (6 batches each)
    it = BatchIterator(ds, 8, **kw)
    _all(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    fresh = BatchIterator(ds, 8, **kw)
    fresh.set_state(state)
    rest = _all(fresh, 13)
    assert all(_same(a, b) for a, b in zip(ref[7:], rest, strict=True))
    # and a different seed gives a different order
    other = _all(BatchIterator(ds, 8, **{**kw, "seed": 6}), 1)[0]
    assert not _same(other, ref[0])


def test_set_state_rejects_a_different_configuration(byte_tok):
    ds = RepeatTask().pairwise_dataset(byte_tok, 50, seed=0)
    state = BatchIterator(ds, 8, seed=1, process_index=0, process_count=1).get_state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, 8, seed=2, process_index=0, process_count=1).set_state(state)


def test_epochs_are_permutations(byte_tok):
    ds = RepeatTask().sft_dataset(byte_tok, 40, seed=0)
    it = BatchIterator(ds, 8, seed=0, process_index=0, process_count=1)
    e0, e1 = np.concatenate(it.epoch_indices(0)), np.concatenate(it.epoch_indices(1))
    assert sorted(e0) == list(range(40)) and sorted(e1) == list(range(40))
    assert not np.array_equal(e0, e1)


@pytest.mark.parametrize("drop_remainder", [True, False], ids=["drop", "pad"])
def test_process_shards_are_disjoint_and_cover(byte_tok, drop_remainder):
    n = 45
    ds = RepeatTask().pairwise_dataset(byte_tok, n, seed=0)
    its = [
        BatchIterator(
            ds, 8, seed=3, drop_remainder=drop_remainder, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    seen = [np.concatenate(it.epoch_indices(0)) for it in its]
    seen = [s[s >= 0] for s in seen]
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert len(union) == (40 if drop_remainder else n)
    # Each process's batch is its half of the single-process global batch, with the same length.
    single = next(
        BatchIterator(
            ds, 8, seed=3, drop_remainder=drop_remainder, process_index=0, process_count=1
        )
    )
    halves = [next(it) for it in its]
    for k in single:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), single[k])


def test_padding_rows_when_not_dropping(byte_tok):
    ds = RepeatTask().sft_dataset(byte_tok, 10, seed=0)
    batches = list(
        BatchIterator(ds, 4, num_epochs=1, drop_remainder=False, process_index=0, process_count=1)
    )
    assert len(batches) == 3
    last = batches[-1]
    assert last["example_mask"].tolist() == [1, 1, 0, 0]
    assert last["loss_mask"][2:].sum() == 0 and last["attention_mask"][2:].sum() == 0
    assert batches[0]["example_mask"].tolist() == [1, 1, 1, 1]  # same structure every step
    plain = next(BatchIterator(ds, 4, process_index=0, process_count=1))
    assert "example_mask" not in plain


def test_added_columns_flow_into_batches(byte_tok):
    ds = RepeatTask().pairwise_dataset(byte_tok, 12, seed=0)
    ref_c = np.arange(12, dtype=np.float32) * 0.5
    ds.add_columns(ref_logps=np.stack([ref_c, -ref_c], axis=1))  # [N, 2]: chosen, rejected
    it = BatchIterator(ds, 4, seed=0, process_index=0, process_count=1)
    idx = it.epoch_indices(0)[0]
    b = next(it)
    np.testing.assert_array_equal(b["ref_logps"][:, 0], ref_c[idx])
    np.testing.assert_array_equal(b["ref_logps"][:, 1], -ref_c[idx])
    np.testing.assert_allclose(b["chosen_gold_reward"], ds["chosen_gold_reward"][idx])
    with pytest.raises(ValueError, match="leading size"):
        ds.add_columns(bad=np.zeros(3))


def test_listwise_batch_is_best_first(byte_tok):
    task = RepeatTask(temperature=0.0)
    ds = task.listwise_dataset(byte_tok, 8, num_responses=3, seed=0)
    b = next(BatchIterator(ds, 4, shuffle=False, process_index=0, process_count=1))
    assert b["input_ids"].shape[:2] == (4, 3) and b["response_mask"].tolist() == [[1, 1, 1]] * 4
    recs = task.listwise_records(8, num_responses=3, seed=0)
    for i in range(4):
        got = []
        for k in range(3):
            ids = b["input_ids"][i, k][b["loss_mask"][i, k] == 1].tolist()
            got.append(task.gold_reward(recs[i]["prompt"], byte_tok.decode(ids[:-1])))
        assert got == sorted(got, reverse=True)


def test_unpaired_batch_has_labels(byte_tok):
    ds = RepeatTask().unpaired_dataset(byte_tok, 16, seed=0)
    b = next(BatchIterator(ds, 16, shuffle=False, process_index=0, process_count=1))
    np.testing.assert_array_equal(b["label"], ds["label"])
    assert b["label"].dtype == np.int32 and b["input_ids"].shape[0] == 16


def test_prompt_batches_default_to_left_padding(byte_tok):
    ds = RepeatTask().prompt_dataset(byte_tok, 8, seed=0)
    b = next(BatchIterator(ds, 4, process_index=0, process_count=1))
    assert set(b) == {"prompt_input_ids", "prompt_attention_mask"}
    assert b["prompt_attention_mask"][:, -1].tolist() == [1] * 4


def test_eval_batches_cover_every_example_once(byte_tok):
    from prefjax.data.batching import eval_batches

    ds = RepeatTask().pairwise_dataset(byte_tok, 11, seed=0)
    batches = list(eval_batches(ds, 4, process_index=0, process_count=1))
    assert len(batches) == 3 and batches[-1]["example_mask"].tolist() == [1, 1, 1, 0]
    got = np.concatenate(
        [b["chosen_gold_reward"][b.get("example_mask", np.ones(4, np.int32)) == 1] for b in batches]
    )
    np.testing.assert_array_equal(got, ds["chosen_gold_reward"])


@pytest.mark.parametrize("task", ["sequence", "bandit", "files"])
def test_datasets_from_config(byte_tok, tmp_path, task):
    from experiments.configs.common import base_config
    from prefjax.data import datasets_from_config, write_jsonl

    cfg = base_config("dpo").data  # the launchers' data block: the same function builds theirs
    cfg.update(dict(task=task, num_train=40, num_eval=8, label_noise=0.1, seed=3))
    if task == "files":
        recs = RepeatTask().pairwise_records(30, seed=0)
        cfg.train_files = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
        write_jsonl(tmp_path / "a.jsonl", recs[:20])
        write_jsonl(tmp_path / "b.jsonl", recs[:1])  # a duplicate across the two files
        with pytest.raises(DataError, match=r"b.jsonl:1.*duplicate of .*a.jsonl:1"):
            datasets_from_config(cfg, byte_tok)
        recs = list({(r["prompt"], r["chosen"], r["rejected"]): r for r in recs}.values())
        write_jsonl(tmp_path / "a.jsonl", recs[:15])
        write_jsonl(tmp_path / "b.jsonl", recs[15:])
    splits = datasets_from_config(cfg, byte_tok)
    train, ev, task_obj = splits
    assert train.kind == ev.kind == "pairwise" and train.max_len == 32
    # Split by prompt: no prompt on both sides (but the bandit's single prompt).
    assert bool(set(train["prompt_id"]) & set(ev["prompt_id"])) == (task == "bandit")
    if task == "files":
        assert task_obj is None and len(train) + len(ev) == len(recs) and len(ev) > 0
    else:
        assert len(train) == 40 and len(ev) == 8 and task_obj.flip_prob == 0.1
        if task == "sequence":  # held-out prompts are never trained on
            assert splits.held_out and set(ev["prompt_id"]) <= set(splits.held_out)
        else:  # the bandit's one prompt: fresh samples of it
            assert not splits.held_out
    b = next(BatchIterator(train, 8, process_index=0, process_count=1))
    assert b["input_ids"].shape[:2] == (8, 2)


def test_margin_column_is_float32_and_ints_are_int32(byte_tok):
    recs = [_pair(f"q{i}", "a", "b", margin=i, annotator=i % 2) for i in range(4)]
    ds = tokenize(recs, byte_tok, "pairwise", max_len=16)
    b = next(BatchIterator(ds, 4, shuffle=False, process_index=0, process_count=1))
    assert b["margin"].dtype == np.float32 and b["margin"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert b["annotator"].dtype == np.int32 and b["annotator"].tolist() == [0, 1, 0, 1]
