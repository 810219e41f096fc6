"""The built-in tasks' gold-reward metrics: one decode path for greedy and sampled responses.

``inputs.task_metrics`` scores the greedy responses to the held-out prompts and to the train
prompts from one decode of one prompt batch (held-out rows first, then train rows, then padding
rows up to a multiple of 8), through ``evaluation.score_generations``, the function the sampled
gold reward uses too. The decoder is replaced by a scripted one whose responses have known,
varied gold rewards, and the expected metrics are computed here from the prompt strings and the
scripted responses with ``RepeatTask.gold_reward`` (the formula on text), not with the
token-level path under test.
"""

import types

import numpy as np
import pytest

from prefjax import data as pdata
from prefjax.models import ByteTokenizer
from prefjax.train import evaluation, inputs
from tests.train.test_loop import tiny_config

MAX_NEW = 12


def test_unpad_keeps_exactly_the_unmasked_tokens():
    ids = np.array([[0, 0, 5, 6], [7, 8, 0, 0], [1, 0, 2, 0]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]])
    assert evaluation.unpad(ids, mask) == [[5, 6], [7, 8], [1, 2]]
    assert all(type(t) is int for row in evaluation.unpad(ids, mask) for t in row)


def _prompt_text(tokenizer, ids, mask):
    """A left-padded prompt row back to its text: the last ``mask.sum()`` tokens, without BOS."""
    tokens = [int(t) for t in ids[len(ids) - int(mask.sum()) :]]
    assert ids[: len(ids) - int(mask.sum())].tolist() == [tokenizer.pad_id] * (
        len(ids) - len(tokens)
    )
    return tokenizer.decode([t for t in tokens if t != tokenizer.bos_id])


def _scripted_response(task, prompt: str, row: int) -> tuple[str, bool]:
    """Row-dependent responses with varied gold rewards; every fourth row never ends (no EOS)."""
    c, n = task.parse_prompt(prompt)
    if row % 4 == 3:
        return c * MAX_NEW, False
    return c * max(0, n - row % 3) + "x" * (row % 2), True


def test_task_metrics_score_held_out_and_train_prompts_from_one_decode(monkeypatch):
    config = tiny_config(**{"eval.generate": True, "eval.num_prompts": 5, "eval.num_samples": 8})
    config.eval.max_new_tokens = MAX_NEW
    tokenizer = ByteTokenizer()
    data = inputs.build_data(config, tokenizer, "pairwise")
    eval_data, task = data.eval, data.eval.task
    n, m = eval_data.num_eval_prompts, eval_data.num_train_prompts
    rows = len(eval_data.prompts["prompt_input_ids"])
    assert (n, m) == (5, 5) and rows == 16  # padding rows follow, which must not count

    calls = []

    def scripted_generate(model, params, ids, mask, *, max_new_tokens, eos_id, greedy=True, **kw):
        calls.append((greedy, len(ids)))
        tokens = np.full((len(ids), max_new_tokens), eos_id, np.int32)
        response_mask = np.zeros((len(ids), max_new_tokens), np.int32)
        for i in range(len(ids)):
            text, ends = _scripted_response(task, _prompt_text(tokenizer, ids[i], mask[i]), i)
            row = tokenizer.encode(text) + ([eos_id] if ends else [])
            tokens[i, : len(row)] = row
            response_mask[i, : len(row)] = 1
        return tokens, response_mask

    monkeypatch.setattr(evaluation, "generate", scripted_generate)
    setup = types.SimpleNamespace(
        model=types.SimpleNamespace(head="lm"),
        frozen=None,
        reference=None,  # no reference in memory: no KL decode
        objective=types.SimpleNamespace(kl_coefficient=None),
    )
    out = inputs.task_metrics(setup, {"w": 0}, eval_data, config)

    # One greedy decode of every row (held-out and train prompts together), one sampled decode.
    assert calls == [(True, rows), (False, len(eval_data.sample_prompts["prompt_input_ids"]))]
    batch = eval_data.prompts
    prompts = [
        _prompt_text(tokenizer, batch["prompt_input_ids"][i], batch["prompt_attention_mask"][i])
        for i in range(rows)
    ]
    held_out = pdata.datasets_from_config(config.data, tokenizer, "pairwise").held_out
    assert set(prompts[:n]) <= held_out and not set(prompts[n : n + m]) & held_out
    responses = [_scripted_response(task, p, i) for i, p in enumerate(prompts)]
    rewards = np.array(
        [task.gold_reward(p, r) for p, (r, _) in zip(prompts, responses, strict=True)]
    )
    assert len(set(rewards[: n + m].round(6))) > 2  # varied, so a wrong slice would show
    lengths = np.array([len(r) + e for r, e in responses])
    ends = np.array([e for _, e in responses])
    np.testing.assert_allclose(out["eval/gold_reward"], rewards[:n].mean(), rtol=1e-6)
    np.testing.assert_allclose(
        out["eval/gold_reward_train_prompts"], rewards[n : n + m].mean(), rtol=1e-6
    )
    assert out["eval/length/generated"] == lengths[:n].mean()
    assert out["eval/eos_fraction"] == ends[:n].mean()
    # The sampled responses went through the same scoring: the held-out prompts repeated.
    sample = eval_data.sample_prompts
    sampled = [
        _prompt_text(tokenizer, sample["prompt_input_ids"][i], sample["prompt_attention_mask"][i])
        for i in range(len(sample["prompt_input_ids"]))
    ]
    expected = [
        task.gold_reward(p, _scripted_response(task, p, i)[0]) for i, p in enumerate(sampled)
    ]
    np.testing.assert_allclose(out["eval/gold_reward_sampled"], np.mean(expected), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The release gate on constructed runs
# ----------------------------------------------------------------------------------------------

EVAL_STEPS = (0, 20, 40, 60, 80, 100, 120)


def _run(**series):
    """Eval records at ``EVAL_STEPS`` with the given metric series, as the loop writes them."""
    return [
        {"step": s, "split": "eval", **{k.replace("__", "/"): v[i] for k, v in series.items()}}
        for i, s in enumerate(EVAL_STEPS)
    ]


# Proxy (a reward model's score of held-out samples) rises at every evaluation.
PROXY = [0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3]
# Gold peaks at step 60 (0.8), then falls: 0.8 - 0.76 = 0.04 is within the default 0.05, the
# first fall beyond it is 0.8 - 0.70 = 0.10 at step 100.
OVEROPTIMISED_GOLD = [0.5, 0.6, 0.7, 0.8, 0.76, 0.70, 0.6]
# Healthy: dips of at most 0.04 below the running maximum.
HEALTHY_GOLD = [0.5, 0.6, 0.7, 0.66, 0.74, 0.78, 0.75]


def test_gate_flags_an_overoptimised_run_at_the_gold_peak():
    records = _run(eval__rollout__score_raw=PROXY, eval__gold_reward_sampled=OVEROPTIMISED_GOLD)
    report = evaluation.release_gate(records)
    check = report.check("overoptimisation")
    assert report.flagged and check.status == "flag"
    peak = EVAL_STEPS[int(np.argmax(OVEROPTIMISED_GOLD))]
    assert (check.began, check.detected) == (peak, 100) == (60, 100)
    assert check.keys == ("eval/rollout/score_raw", "eval/gold_reward_sampled")
    assert "0.8 (step 60) to 0.7 (step 100)" in check.detail
    # patience=2: the fall must hold at two consecutive evaluations (100 and 120).
    two = evaluation.release_gate(records, evaluation.GateConfig(patience=2))
    assert (two.check("overoptimisation").began, two.check("overoptimisation").detected) == (
        60,
        120,
    )
    # A larger margin than the whole fall (0.8 - 0.6 = 0.2): no flag.
    wide = evaluation.release_gate(records, evaluation.GateConfig(gold_drop=0.25))
    assert wide.check("overoptimisation").status == "pass" and not wide.flagged


def test_gate_passes_a_healthy_run_and_a_run_whose_proxy_falls_with_its_gold():
    healthy = _run(eval__rollout__score_raw=PROXY, eval__gold_reward_sampled=HEALTHY_GOLD)
    report = evaluation.release_gate(healthy)
    assert not report.flagged
    assert [c.status for c in report.checks] == ["pass", "n/a", "n/a", "n/a"]
    # Gold falls by 0.3 but so does the proxy: a bad run, not over-optimisation of the proxy.
    gold = [0.5, 0.6, 0.7, 0.8, 0.7, 0.6, 0.5]
    falling = _run(eval__rollout__score_raw=[g + 0.1 for g in gold], eval__gold_reward=gold)
    assert evaluation.release_gate(falling).check("overoptimisation").status == "pass"


def test_gate_reads_dpo_records_and_aligns_a_train_proxy_with_eval_gold():
    # DPO: the proxy is the implicit reward margin on held-out pairs.
    records = _run(eval__rewards__margin=PROXY, eval__gold_reward=OVEROPTIMISED_GOLD)
    check = evaluation.release_gate(records).check("overoptimisation")
    assert check.keys == ("eval/rewards/margin", "eval/gold_reward")
    assert (check.began, check.detected) == (60, 100)
    # A proxy recorded on train records only (steps 10, 30, ...): each gold record is compared
    # with the last proxy before it, and step 0 (no proxy yet) is left out.
    gold = [
        {"step": s, "eval/gold_reward": g}
        for s, g in zip(EVAL_STEPS, OVEROPTIMISED_GOLD, strict=True)
    ]
    train = [{"step": s + 10, "rollout/score": p} for s, p in zip(EVAL_STEPS, PROXY, strict=True)]
    check = evaluation.release_gate(gold + train).check("overoptimisation")
    assert check.keys == ("rollout/score", "eval/gold_reward")
    assert (check.began, check.detected) == (60, 100)
    # Proxy falling after the gold peak (recorded at 50, read at 60; then lower): no flag.
    train = [
        {"step": s + 10, "rollout/score": p}
        for s, p in zip(EVAL_STEPS, [0, 1, 2, 3, 0, 0, 0], strict=True)
    ]
    assert evaluation.release_gate(gold + train).check("overoptimisation").status == "pass"


def test_gate_prefers_the_first_recorded_key_and_skips_non_finite_values():
    records = _run(
        eval__gold_reward_sampled=[0.5, 0.6, np.nan, 0.8, 0.76, 0.70, 0.6],
        eval__gold_reward=HEALTHY_GOLD,  # the greedy gold is read only when no sampled one is
        eval__rollout__score=PROXY,
    )
    check = evaluation.release_gate(records).check("overoptimisation")
    assert check.keys == ("eval/rollout/score", "eval/gold_reward_sampled")
    assert (check.status, check.began, check.detected) == ("flag", 60, 100)
    greedy = evaluation.GateConfig(keys={"gold": ("eval/gold_reward",)})
    assert evaluation.release_gate(records, greedy).check("overoptimisation").status == "pass"


@pytest.mark.parametrize(
    "name, key, values, config, expected",
    [
        # Length 4 at the first record; 1.5 x 4 = 6 is exceeded first by 6.5 at step 60.
        ("length", "eval/length/sampled", [4, 4.5, 5, 6.5, 7, 7, 7], {}, (60, 60)),
        ("length", "eval/length/generated", [4, 4.5, 5, 5.6, 5.9, 6, 5], {}, None),
        (
            "length",
            "eval/rollout/length",
            [4, 4.5, 5, 5.6, 5.9, 6, 5],
            {"max_length_ratio": 1.3},
            (60, 60),
        ),
        # KL over the budget of 10 nats first at step 60; with patience 2 the lone 11 at step 20
        # does not count and the run of 12, 13 from step 80 does.
        ("kl", "eval/kl", [0, 2, 5, 11, 12, 13, 14], {}, (60, 60)),
        ("kl", "eval/kl/sampled", [0, 11, 5, 9, 12, 13, 14], {"patience": 2}, (80, 100)),
        ("kl", "rollout/kl", [0, 2, 5, 9, 9.5, 9.9, 10], {}, None),  # 10 is not over 10
        ("kl", "eval/kl/logratio", [0, 2, 5, 9, 9.5, 9.9, 10], {"kl_budget": 5.0}, (60, 60)),
        # Entropy 2.0 at the first record: the floor 0.5 x 2 = 1 is crossed at step 80 (0.9).
        ("entropy", "rollout/entropy", [2.0, 1.8, 1.5, 1.2, 0.9, 0.8, 0.7], {}, (80, 80)),
        ("entropy", "ppo/entropy", [2.0, 1.8, 1.5, 1.2, 1.1, 1.0, 1.05], {}, None),
        # The DPO family's held-out entropy: 3.0 first, under 1.5 first at step 60.
        ("entropy", "eval/entropy/response", [3.0, 2.5, 2.0, 1.4, 1.2, 1.0, 0.9], {}, (60, 60)),
    ],
    ids=[
        "length",
        "length-pass",
        "length-ratio",
        "kl",
        "kl-patience",
        "kl-pass",
        "kl-budget",
        "entropy",
        "entropy-pass",
        "entropy-dpo-eval",
    ],
)
def test_gate_threshold_checks(name, key, values, config, expected):
    records = [{"step": s, key: v} for s, v in zip(EVAL_STEPS, values, strict=True)]
    report = evaluation.release_gate(records, evaluation.GateConfig(**config))
    check = report.check(name)
    assert check.keys == (key,)
    if expected is None:
        assert check.status == "pass" and (check.began, check.detected) == (None, None)
        assert not report.flagged
    else:
        assert check.status == "flag" and (check.began, check.detected) == expected
        assert report.flagged
    others = [c.status for c in report.checks if c.name != name]
    assert others == ["n/a"] * 3  # each flag type alone: the other checks have no metrics


def test_gate_reads_the_dpo_entropy_of_held_out_pairs_before_the_train_batches():
    # DPO with algorithm.train_entropy records both; the held-out value is read (it collapses
    # here, the train batches' does not), and the train value alone when there is no eval one.
    falling, flat = [3.0, 2.5, 2.0, 1.4, 1.2, 1.0, 0.9], [3.0] * 7
    evals = [
        {"step": s, "eval/entropy/response": v} for s, v in zip(EVAL_STEPS, falling, strict=True)
    ]
    train = [{"step": s + 10, "entropy/response": v} for s, v in zip(EVAL_STEPS, flat, strict=True)]
    check = evaluation.release_gate(evals + train).check("entropy")
    assert check.keys == ("eval/entropy/response",)
    assert (check.status, check.began) == ("flag", 60)
    check = evaluation.release_gate(train).check("entropy")
    assert (check.keys, check.status) == (("entropy/response",), "pass")


def test_gate_without_metrics_says_what_it_looked_for():
    report = evaluation.release_gate([{"step": 0, "loss": 0.7}, {"step": 10, "loss": 0.5}])
    assert [c.status for c in report.checks] == ["n/a"] * 4 and not report.flagged
    assert "eval/gold_reward_sampled" in report.check("overoptimisation").detail
    assert "rollout/entropy" in report.check("entropy").detail


@pytest.mark.parametrize(
    "field, value",
    [("gold_drop", -0.1), ("max_length_ratio", 0.0), ("kl_budget", -1.0), ("patience", 0)],
)
def test_gate_config_names_a_bad_threshold(field, value):
    with pytest.raises(ValueError, match=field):
        evaluation.GateConfig(**{field: value})
    with pytest.raises(ValueError, match="keys"):
        evaluation.GateConfig(keys={"reward": ("x",)})


# ----------------------------------------------------------------------------------------------
# Diversity metrics on hand-made token lists
# ----------------------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    samples = [[1, 2, 3], [1, 2, 4], [5]]
    # Unigrams 1 2 3 1 2 4 5: 5 distinct of 7. Bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4
    # ([5] has none).
    assert evaluation.distinct_n(samples, 1) == pytest.approx(5 / 7)
    assert evaluation.distinct_n(samples, 2) == pytest.approx(3 / 4)
    assert np.isnan(evaluation.distinct_n(samples, 4))  # no sample has 4 tokens
    # Identical samples: one sample's distinct n-grams over k times as many: the minimum, 1 / k.
    for k in (2, 5):
        assert evaluation.distinct_n([[1, 2, 3]] * k, 1) == pytest.approx(1 / k)
        assert evaluation.distinct_n([[1, 2, 3]] * k, 2) == pytest.approx(1 / k)
    assert evaluation.distinct_n([[1, 2], [3, 4], [5]], 1) == 1.0  # nothing repeats
    # Repeats within one sample count too: "aaaa" has one distinct unigram of 4.
    assert evaluation.distinct_n([[7, 7, 7, 7]], 1) == pytest.approx(1 / 4)


def test_self_bleu_by_hand():
    samples = [[1, 2, 3], [1, 2, 4], [5]]
    # Sample 0 against [1,2,4] and [5]: unigrams 1, 2 found, 3 not: 2/3; bigrams (1,2) found,
    # (2,3) not: 1/2; overlap (2/3 + 1/2) / 2 = 7/12. Sample 1 likewise 7/12. Sample 2: unigram
    # 5 found nowhere: 0 (it has no bigram, so only the unigram order counts).
    assert evaluation.self_bleu(samples, max_n=2) == pytest.approx((7 / 12 + 7 / 12 + 0) / 3)
    # Clipping: [1,1,1] against [1]: unigram 1 counted min(3, 1) = 1 of 3; bigrams (1,1) x2 not
    # in [1]: 0; overlap (1/3 + 0) / 2. [1] against [1,1,1]: min(1, 3) / 1 = 1.
    assert evaluation.self_bleu([[1, 1, 1], [1]], max_n=2) == pytest.approx((1 / 6 + 1) / 2)
    # Identical samples overlap fully; samples sharing no token not at all.
    assert evaluation.self_bleu([[3, 1, 4, 1, 5]] * 3) == pytest.approx(1.0)
    assert evaluation.self_bleu([[1, 2], [3, 4], [5, 6]]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.self_bleu([[1, 2]])


def test_length_matched_mean_by_hand():
    # Bins of 1 token: the sample means are 0.5 at length 1 and 4 at length 3; the reference puts
    # 1/4 of its mass at length 1 and 3/4 at length 3.
    got = evaluation.length_matched_mean([1, 1, 3], [0.0, 1.0, 4.0], [1, 3, 3, 3])
    assert got == pytest.approx((0.25 * 0.5 + 0.75 * 4.0, 1.0))
    # Length 5 of the reference has no sample: left out, weights renormalised, coverage 1/2.
    got = evaluation.length_matched_mean([1, 3], [2.0, 4.0], [1, 5])
    assert got == pytest.approx((2.0, 0.5))
    # Bins of 2 tokens: lengths 2 and 3 share bin 1.
    got = evaluation.length_matched_mean([2, 3, 4], [1.0, 3.0, 10.0], [3, 3, 5], bin_width=2)
    assert got == pytest.approx(((2 / 3) * 2.0 + (1 / 3) * 10.0, 1.0))
    # A policy that only got longer: its reweighted mean is the reference's own.
    ref_len, ref_gold = np.array([2, 4]), np.array([0.2, 0.8])
    longer_len, longer_gold = np.array([2, 4, 4, 4]), np.array([0.2, 0.8, 0.8, 0.8])
    assert longer_gold.mean() > ref_gold.mean()
    got, _ = evaluation.length_matched_mean(longer_len, longer_gold, ref_len)
    assert got == pytest.approx(ref_gold.mean())
    assert np.isnan(evaluation.length_matched_mean([1], [1.0], [2])[0])


def test_diversity_metrics_of_constructed_samples():
    tokens = [[1, 2, 3], [1, 2, 3], [4, 5], [6, 7]]  # prompt 0: identical pair; prompt 1: disjoint
    samples = evaluation.Samples(
        prompt_index=np.array([0, 0, 1, 1]),
        tokens=tokens,
        lengths=np.array([3, 3, 2, 2]),
        gold=np.array([1.0, 1.0, np.nan, 0.5]),
        logps=np.array([-1.0, -1.0, -2.0, -4.0]),
        ref_logps=np.array([-2.0, -2.0, -2.0, -3.0]),
        entropy=np.array([1.5, 1.5, 2.0, 3.0]),
    )
    m = evaluation.diversity_metrics(samples, max_n=2)
    assert m["entropy/token"] == pytest.approx(8.0 / 10)
    assert m["entropy/nll"] == pytest.approx(2.0)
    # distinct-1 per prompt: 3/6 and 4/4; self-BLEU: 1 and 0 (groups, not pooled: pooled over
    # prompts distinct-1 would be 7/10).
    assert m["distinct_1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["distinct_2"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert m["self_bleu"] == pytest.approx(0.5)
    assert m["length"] == pytest.approx(2.5)
    assert m["gold"] == pytest.approx(2.5 / 3)  # the unscorable response left out
    assert m["kl"] == pytest.approx((1 + 1 + 0 - 1) / 4)
