"""Packed batches: the layout, the bin packing, determinism and resumption, shards, padding.

* every sequence of a packed batch is recovered exactly from its segment (its tokens, positions
  0.., response tokens in the loss mask), segments are contiguous and never share a row slot;
* first-fit decreasing against a hand-worked case, and its invariants on random lengths;
* a packed iterator yields the padded iterator's examples batch for batch, is deterministic,
  and resumed mid-epoch from ``get_state`` yields what an uninterrupted run yields;
* the shards of a two-process job agree on the row count and carry disjoint segment ids;
* the padding fractions of a hand-sized case; errors name what is wrong.
"""

import numpy as np
import pytest

from prefjax import data
from prefjax.data import lengths, packing
from prefjax.data.dataset import TokenizedDataset, object_array


def make_dataset(kind: str, n: int = 20, seed: int = 0, max_len: int = 40) -> TokenizedDataset:
    """Examples with prompts of 1-10 and responses of 1-15 tokens (ids from 3)."""
    rng = np.random.default_rng(seed)
    toks = lambda lo, hi: rng.integers(3, 100, int(rng.integers(lo, hi)), dtype=np.int32)  # noqa: E731
    cols = {"prompt_ids": object_array([toks(1, 11) for _ in range(n)])}
    if kind == "pairwise":
        cols["chosen_ids"] = object_array([toks(1, 16) for _ in range(n)])
        cols["rejected_ids"] = object_array([toks(1, 16) for _ in range(n)])
        cols["margin"] = rng.normal(size=n)
    elif kind == "listwise":
        cols["responses_ids"] = object_array(
            [[toks(1, 16) for _ in range(2 + i % 2)] for i in range(n)]
        )
    else:
        cols["response_ids"] = object_array([toks(1, 16) for _ in range(n)])
    if kind == "unpaired":
        cols["label"] = rng.integers(0, 2, n).astype(bool)
    cols["prompt_id"] = object_array([f"p{i}" for i in range(n)])
    return TokenizedDataset(kind, cols, pad_id=0, max_len=max_len)


def unpack(batch: dict, k: int) -> dict:
    """``{(example, response): (tokens, positions, loss_mask)}`` read back from the segments."""
    out = {}
    seg = batch["attention_mask"]
    for s in np.unique(seg[seg > 0]):
        rows, cols = np.nonzero(seg == s)
        assert len(set(rows)) == 1, "a segment spans two rows"
        assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))), "not contiguous"
        r = rows[0]
        out[divmod(int(s) - 1, k)] = tuple(
            batch[n][r, cols] for n in ("input_ids", "positions", "loss_mask")
        )
    return out


@pytest.mark.parametrize("kind", ["sft", "unpaired", "pairwise", "listwise"])
def test_every_sequence_is_its_own_segment(kind):
    ds = make_dataset(kind)
    idx = np.array([4, 0, 7, -1, 12, 3])
    k = packing.num_segments_per_example(ds)
    rows = packing.rows_needed(ds, idx, 40, k)
    batch = data.collate_packed(ds, idx, 40, rows + 2)
    assert batch["input_ids"].shape == (rows + 2, 40)
    assert batch["example_mask"].tolist() == [1, 1, 1, 0, 1, 1]
    seqs = unpack(batch, k)
    expected = 0
    for e, j in enumerate(idx):
        for i, pr in enumerate(packing.example_sequences(ds, int(j), k)):
            assert batch["sequence_mask"][e, i] == (pr is not None)
            if pr is None:
                assert (e, i) not in seqs
                continue
            expected += 1
            tokens, positions, loss = seqs[(e, i)]
            prompt, response = pr
            assert tokens.tolist() == list(prompt) + list(response)
            assert positions.tolist() == list(range(len(tokens)))
            assert loss.tolist() == [0] * len(prompt) + [1] * len(response)
    assert len(seqs) == expected
    # Everything else is padding: pad id, no loss, position 0.
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()
    # Per-example columns as in a padded batch.
    padded = data.collate(ds, idx, 40)
    for name in padded:
        if name not in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(batch[name], padded[name], err_msg=name)


def test_first_fit_decreasing_by_hand_and_invariants():
    # Longest first: 7 -> row 0; 6 -> row 1 (7 + 6 > 10); 3 -> row 0 at 7 (full); 3 -> row 1
    # at 6; 2 -> row 2 (row 1 would hold 11); 1 -> row 1 at 9 (full).
    row, offset, n = packing.first_fit([3, 7, 2, 6, 3, 1], 10)
    assert n == 3
    assert row.tolist() == [0, 0, 2, 1, 1, 1]
    assert offset.tolist() == [7, 0, 0, 0, 6, 9]
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 33, rng.integers(1, 40))
        row, offset, n = packing.first_fit(lengths, 32)
        used = np.zeros((n, 32), int)
        for r, o, m in zip(row, offset, lengths, strict=True):
            used[r, o : o + m] += 1
        assert used.max() == 1 and used.sum() == lengths.sum()
        # First fit never leaves two rows that could be merged.
        fill = used.sum(1)
        assert n == 1 or np.sort(fill)[:2].sum() > 32


def test_packed_iterator_has_the_padded_examples_and_resumes():
    ds = make_dataset("pairwise", n=30)
    kw = dict(seed=3, process_index=0, process_count=1, drop_remainder=False)
    padded = data.BatchIterator(ds, 4, **kw)
    packed = data.BatchIterator(ds, 4, packing=True, row_multiple=2, **kw)
    uninterrupted = [next(packed) for _ in range(12)]  # more than one epoch of 8 batches
    for b in uninterrupted:
        assert b["input_ids"].shape[0] % 2 == 0 and b["input_ids"].shape[1] == ds.max_len
    # Same examples in the same order as the padded batches (the chosen side decides).
    for b in uninterrupted[:8]:
        p = next(padded)
        seqs = unpack(b, 2)
        for e in range(4):
            if not p["example_mask"][e]:
                assert not b["sequence_mask"][e].any()
                continue
            n = int(p["attention_mask"][e, 0].sum())
            assert seqs[(e, 0)][0].tolist() == p["input_ids"][e, 0, :n].tolist()
    again = data.BatchIterator(ds, 4, packing=True, row_multiple=2, **kw)
    for _ in range(5):
        next(again)
    state = again.get_state()
    resumed = data.BatchIterator(ds, 4, packing=True, row_multiple=2, **kw)
    resumed.set_state(state)
    for want in uninterrupted[5:]:
        got = next(resumed)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_two_process_shards_agree_on_rows_and_own_their_segments():
    ds = make_dataset("sft", n=40)
    shards = [
        data.BatchIterator(ds, 8, seed=1, packing=True, process_index=p, process_count=2)
        for p in range(2)
    ]
    for _ in range(4):
        a, b = (next(it) for it in shards)
        assert a["input_ids"].shape == b["input_ids"].shape
        ids_a, ids_b = (set(np.unique(x["attention_mask"])) - {0} for x in (a, b))
        assert max(ids_a) <= 4 < min(ids_b) and max(ids_b) <= 8  # examples 0-3 | 4-7, k = 1


def test_padding_fractions_by_hand():
    # Two examples per batch, sft, lengths (prompt + response) 3+5=8 and 2+2=4; buckets (8,):
    # padded: 2 rows x 8 slots, 12 real -> 4/16 padding; packed into rows of 16: one row,
    # 12 real -> 4/16 padding; into rows of 12: one full row, no padding.
    p = lambda n: np.arange(3, 3 + n, dtype=np.int32)  # noqa: E731
    cols = {
        "prompt_ids": object_array([p(3), p(2)]),
        "response_ids": object_array([p(5), p(2)]),
        "prompt_id": object_array(["a", "b"]),
    }
    ds = TokenizedDataset("sft", cols, pad_id=0, max_len=16)
    it = data.BatchIterator(ds, 2, buckets=(8, 16), process_index=0, process_count=1)
    assert data.padding_fractions(it) == {"padded": 0.25, "packed": 1 - 12 / 16}
    it = data.BatchIterator(ds, 2, buckets=(8, 16), row_length=12, process_index=0, process_count=1)
    assert data.padding_fractions(it)["packed"] == 0.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="packing needs one of"):
        packing.num_segments_per_example(
            TokenizedDataset(
                "prompt", {"prompt_ids": object_array([np.arange(3)])}, pad_id=0, max_len=4
            )
        )
    with pytest.raises(ValueError, match="does not fit a packed row of 4"):
        packing.first_fit([5], 4)
    ds = make_dataset("sft")
    with pytest.raises(ValueError, match="row_length=8 must hold the longest sequence"):
        data.BatchIterator(ds, 4, packing=True, row_length=8, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="needs .* packed rows"):
        data.collate_packed(ds, np.arange(8), 40, 1)


def test_length_profile_matches_its_published_means_and_packs_better_than_it_pads():
    profile = lengths.PROFILES["hh_helpful"]
    prompt, chosen, rejected = lengths.sample_pair_lengths(profile, 20000, seed=1)
    # Llama 2 Table 6, Anthropic Helpful: 251.5 tokens per example, 88.4 per response.
    np.testing.assert_allclose(prompt.mean() + chosen.mean(), 251.5, rtol=0.03)
    np.testing.assert_allclose([chosen.mean(), rejected.mean()], 88.4, rtol=0.03)
    q = lengths.quantiles(profile)
    np.testing.assert_allclose(np.percentile(chosen, [10, 50, 90]), q["response"][:3], rtol=0.08)
    # Truncation: prompts within max_prompt_len, whole sequences within max_len.
    p, c, r = lengths.sample_pair_lengths(profile, 2000, max_len=512, max_prompt_len=256)
    assert p.max() <= 256 and (p + c).max() <= 512 and (p + r).max() <= 512 and c.min() >= 1
    # On these lengths a padded batch of 8 pairs is mostly padding; packed rows are not.
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(3, 100, n, dtype=np.int32)  # noqa: E731
    cols = {
        "prompt_ids": object_array([tok(n) for n in p[:256]]),
        "chosen_ids": object_array([tok(n) for n in c[:256]]),
        "rejected_ids": object_array([tok(n) for n in r[:256]]),
        "prompt_id": object_array([str(i) for i in range(256)]),
    }
    ds = TokenizedDataset("pairwise", cols, pad_id=0, max_len=512)
    it = data.BatchIterator(ds, 8, process_index=0, process_count=1)
    pad = data.padding_fractions(it)
    assert pad["padded"] > 0.5 > 0.15 > pad["packed"]
