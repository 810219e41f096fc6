"""Built-in tasks: the bandit's closed-form optimum and Bradley-Terry label rates."""

import numpy as np
import pytest
import scipy.optimize

from prefjax.data import Bandit, BatchIterator, RepeatTask, preference_probability


def _brute_force_optimum(bandit, beta):
    """Maximise E_pi[r] - beta KL(pi || ref) over unconstrained logits with BFGS (the
    objective written out here, independently of ``Bandit.objective``)."""
    out = []
    for p in range(len(bandit.prompts)):
        r, ref = bandit.rewards[p], bandit.ref_logprobs[p]

        def neg_objective(logits, r=r, ref=ref):
            z = logits - logits.max()
            logq = z - np.log(np.exp(z).sum())
            q = np.exp(logq)
            return -(q @ r - beta * q @ (logq - ref))

        res = scipy.optimize.minimize(
            neg_objective, np.zeros(bandit.num_arms), method="BFGS", options={"gtol": 1e-10}
        )
        z = res.x - res.x.max()
        out.append(np.exp(z) / np.exp(z).sum())
    return np.stack(out)


@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0], ids=lambda b: f"beta={b}")
def test_bandit_closed_form_matches_brute_force(beta):
    bandit = Bandit.make(num_arms=5, num_prompts=2, seed=3)
    closed = bandit.optimal_policy(beta)
    brute = _brute_force_optimum(bandit, beta)
    np.testing.assert_allclose(closed, brute, atol=2e-4)
    # The optimum's value is beta * log E_ref[exp(r / beta)] (the log-partition function).
    value = beta * np.log((np.exp(bandit.ref_logprobs) * np.exp(bandit.rewards / beta)).sum(-1))
    np.testing.assert_allclose(bandit.objective(closed, beta), value, rtol=1e-9)


def test_bandit_optimum_limits():
    bandit = Bandit.make(num_arms=6, seed=1)
    # beta -> 0: all mass on the best arm; beta -> inf: the reference.
    greedy = bandit.optimal_policy(1e-4)
    assert greedy[0].argmax() == bandit.rewards[0].argmax() and greedy[0].max() > 0.999
    np.testing.assert_allclose(bandit.optimal_policy(1e7), np.exp(bandit.ref_logprobs), atol=1e-6)


def test_bandit_reference_from_model_logits(byte_tok):
    bandit = Bandit.make(num_arms=4, seed=0)
    logits = np.random.default_rng(0).normal(size=(1, byte_tok.vocab_size))
    ref = bandit.arm_logprobs(logits, byte_tok)
    ids = [byte_tok.encode(a)[0] for a in bandit.arms]
    expected = logits[0, ids] - np.log(np.exp(logits[0, ids]).sum())
    np.testing.assert_allclose(ref[0], expected)
    unnorm = np.exp(expected + bandit.rewards[0] / 0.5)
    np.testing.assert_allclose(
        bandit.with_reference(ref).optimal_policy(0.5)[0], unnorm / unnorm.sum()
    )


def test_bandit_pairs_are_single_tokens(byte_tok):
    bandit = Bandit.make(num_arms=4, seed=0)
    ds = bandit.pairwise_dataset(byte_tok, 64, seed=1)
    batch = next(BatchIterator(ds, 8, process_index=0, process_count=1))
    # Exactly one response token (the arm, no EOS) per row, and it is an arm token.
    np.testing.assert_array_equal(batch["loss_mask"].sum(-1), 1)
    arm_ids = set(bandit.arm_token_ids(byte_tok).tolist())
    chosen = batch["input_ids"][:, 0]  # [batch, (chosen, rejected), seq]
    chosen_tok = chosen[batch["loss_mask"][:, 0] == 1]
    assert set(chosen_tok.tolist()) <= arm_ids
    gold = [bandit.rewards[0, bandit.arms.index(byte_tok.decode([t]))] for t in chosen_tok]
    np.testing.assert_allclose(batch["chosen_gold_reward"], gold, rtol=1e-6)


def _agreement_check(records, temperature, flip_prob):
    rc = np.array([r["chosen_gold_reward"] for r in records])
    rr = np.array([r["rejected_gold_reward"] for r in records])
    agree = np.mean(rc > rr)
    # Each pair agrees with the gold reward with probability P(higher reward wins).
    p = preference_probability(
        np.maximum(rc, rr), np.minimum(rc, rr), temperature=temperature, flip_prob=flip_prob
    )
    p = np.where(rc == rr, 0.0, p)  # equal rewards never count as agreement
    expected = p.mean()
    sd = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(agree - expected) < 4 * sd + 1e-9, (agree, expected, sd)
    return agree, expected


@pytest.mark.parametrize(
    "temperature,flip_prob", [(0.05, 0.0), (0.2, 0.0), (0.1, 0.2)], ids=["t0.05", "t0.2", "flip"]
)
def test_sequence_labels_follow_bradley_terry(temperature, flip_prob):
    task = RepeatTask(temperature=temperature, flip_prob=flip_prob)
    records = task.pairwise_records(4000, seed=7)
    for r in records[:50]:
        assert r["chosen_gold_reward"] == task.gold_reward(r["prompt"], r["chosen"])
    agree, expected = _agreement_check(records, temperature, flip_prob)
    assert 0.55 < expected < 1.0  # noisy but informative labels


def test_bandit_labels_follow_bradley_terry():
    bandit = Bandit.make(num_arms=6, num_prompts=2, seed=2, temperature=0.5)
    _agreement_check(bandit.pairwise_records(4000, seed=0), 0.5, 0.0)


def test_noiseless_labels_always_agree():
    task = RepeatTask(temperature=0.0)
    recs = task.pairwise_records(500, seed=0)
    assert all(r["chosen_gold_reward"] >= r["rejected_gold_reward"] for r in recs)


def test_gold_reward_is_graded():
    task = RepeatTask()
    assert task.gold_reward("c*4=", "cccc") == 1.0
    assert task.gold_reward("c*4=", "ccc") == pytest.approx(0.75)  # one missing
    assert task.gold_reward("c*4=", "ccccc") == pytest.approx(0.75)  # one extra
    assert task.gold_reward("c*4=", "ccxc") == pytest.approx(0.5)  # one missing, one wrong
    assert task.gold_reward("c*4=", "") == 0.0
    assert task.gold_reward("c*2=", "zzzzzz") == 0.0
    with pytest.raises(ValueError, match="not a RepeatTask prompt"):
        task.gold_reward("hello", "x")


def test_tasks_are_deterministic_and_seed_dependent():
    task = RepeatTask()
    assert task.pairwise_records(50, seed=1) == task.pairwise_records(50, seed=1)
    assert task.pairwise_records(50, seed=1) != task.pairwise_records(50, seed=2)
    bandit = Bandit.make(seed=0)
    assert bandit.pairwise_records(20, seed=4) == bandit.pairwise_records(20, seed=4)


def test_listwise_rankings_follow_reward_at_zero_temperature():
    task = RepeatTask(temperature=0.0)
    for rec in task.listwise_records(50, num_responses=4, seed=0):
        assert sorted(rec["ranking"]) == [0, 1, 2, 3]
        r = [task.gold_reward(rec["prompt"], rec["responses"][i]) for i in rec["ranking"]]
        assert r == sorted(r, reverse=True)


def test_plackett_luce_top_choice_rate():
    # With 2 responses, Plackett-Luce reduces to Bradley-Terry: P(best first) = sigma(dr / tau).
    task = RepeatTask(temperature=0.2)
    recs = task.listwise_records(3000, num_responses=2, seed=3)
    r = np.array(
        [[task.gold_reward(x["prompt"], x["responses"][i]) for i in x["ranking"]] for x in recs]
    )
    first_better = np.mean(r[:, 0] > r[:, 1])
    p = preference_probability(r.max(1), r.min(1), temperature=0.2)
    p = np.where(r[:, 0] == r[:, 1], 0.0, p)
    assert abs(first_better - p.mean()) < 4 * np.sqrt((p * (1 - p)).sum()) / len(p)


def test_unpaired_labels_rate():
    task = RepeatTask(temperature=0.1)
    recs = task.unpaired_records(3000, seed=0, threshold=0.75)
    r = np.array([x["gold_reward"] for x in recs])
    lab = np.array([x["label"] for x in recs])
    p = preference_probability(r, 0.75, temperature=0.1)
    assert set(lab) == {0, 1}
    assert abs(lab.mean() - p.mean()) < 4 * np.sqrt((p * (1 - p)).sum()) / len(p)


def test_gold_rewards_from_tokens(byte_tok):
    task = RepeatTask()
    p = [byte_tok.bos_id] + byte_tok.encode("a*3=")
    r = byte_tok.encode("aa") + [byte_tok.eos_id] + byte_tok.encode("aaaa")
    got = task.gold_rewards_from_tokens(byte_tok, [p], [r + [byte_tok.pad_id]])
    np.testing.assert_allclose(got, [task.gold_reward("a*3=", "aa")])
