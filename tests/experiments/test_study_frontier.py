"""Study 1 (reward-KL frontiers): the exact bandit frontier, and the ``:tiny`` preset end to end
through the launcher with every method's points on or below it."""

import os

import numpy as np
import pytest

from experiments.configs.studies import frontier as study_config
from experiments.studies import bandit_frontier as frontier
from experiments.studies import common, gate
from prefjax import data as pdata
from prefjax.train import evaluation
from tests.experiments.test_launchers import launch
from tests.experiments.test_study_common import compilation_cache

# The frontier bound is a theorem, not an approximation: F(k) is the maximum of E_pi[r] over
# every distribution on the arms with KL(pi || pi_ref) <= k, reached by pi*_beta (the maximiser of
# the Lagrangian E[r] - beta KL). A point's gold reward and KL are both computed in float64 from
# the same arm distribution (float32 logits renormalised), and F by bisection on log beta to far
# below float64 resolution; what remains is float64 rounding of a few sums, well under 1e-9. The
# tolerance 1e-6 leaves room for that and nothing else.
TOL = 1e-6


def _bandit(seed=0, num_prompts=1):
    bandit = pdata.Bandit.make(num_arms=8, num_prompts=num_prompts, seed=seed)
    ref = np.log(np.random.default_rng(seed + 7).dirichlet(np.ones(8), size=num_prompts))
    return bandit, ref


@pytest.mark.parametrize("num_prompts", [1, 3], ids=["one_prompt", "three_prompts"])
def test_no_policy_beats_the_exact_frontier(num_prompts):
    bandit, ref = _bandit(num_prompts=num_prompts)
    # Limits: F(0) is the reference's reward, beyond the greedy policy's KL the best arm's.
    pi_ref = np.exp(ref)
    assert frontier.frontier_reward_at(bandit, ref, 0.0) == pytest.approx(
        bandit.expected_reward(pi_ref).mean()
    )
    top = bandit.rewards.max(-1).mean()
    assert frontier.frontier_reward_at(bandit, ref, frontier.greedy_kl(bandit, ref) + 1) == top
    # On the curve: pi*_beta's own (KL, reward) is a frontier point.
    for beta in (0.1, 0.5, 3.0):
        kl, reward = frontier.frontier_curve(bandit, ref, [beta])
        assert frontier.frontier_reward_at(bandit, ref, kl[0]) == pytest.approx(reward[0], 1e-9)
    # Random policies (Dirichlet, some near-deterministic) never lie above F at their own KL,
    # and neither do optima perturbed towards them -- which come within 0.01 of it (the bound is
    # tight where it should be).
    rng = np.random.default_rng(1)
    gaps, near = [], []
    for concentration in (0.05, 0.3, 1.0, 5.0):
        for _ in range(25):
            pi = rng.dirichlet(np.full(8, concentration), size=num_prompts)
            star = bandit.optimal_policy(float(rng.choice([0.2, 1.0])), ref)
            for policy, out in ((pi, gaps), (0.99 * star + 0.01 * pi, near)):
                kl = bandit.kl_to_reference(policy, ref).mean()
                reward = bandit.expected_reward(policy).mean()
                out.append(frontier.frontier_reward_at(bandit, ref, kl) - reward)
    assert min(gaps) >= -1e-9 and min(near) >= -1e-9
    assert max(near) < 0.01


# The :tiny preset through the launcher, both sections in one call, with fewer runs than the
# preset (every run costs its own compilations): the bandit at one beta (every method), the
# sequence task with DPO (one sweep), PPO and RLOO at both betas.
BANDIT_BETAS = (0.25,)
SEQUENCE_METHODS = ("dpo", "ppo", "rloo")
ARGV = [f"--config.betas={BANDIT_BETAS}", f"--config.sequence.methods={SEQUENCE_METHODS}"]
# How much more KL the smaller beta spends than the larger one after the :tiny budget (nats per
# response; measured at seeds 0 / 1 / 2: DPO 8.2 / 5.2 / 2.8, PPO 1.76 / 0.95 / 0.57, RLOO
# 0.46 / 0.56 / 1.35), and the least gold gain over the reference at the smaller beta of the
# methods trained on the gold reward (PPO +0.051 / +0.078 / +0.093, RLOO +0.092 / +0.093 / +0.040;
# 128 samples: a standard error of about 0.025 each). Plain DPO does not gain at this budget: it
# spends 4-8.5 nats and its samples' gold reward falls or stays (docs/studies.md, section 1).
KL_GAP = {"dpo": 1.0, "ppo": 0.3, "rloo": 0.2}
GOLD_GAIN = {"ppo": 0.02, "rloo": 0.02}


def tiny_config():
    config = study_config.get_config("tiny")
    config.betas = BANDIT_BETAS
    config.sequence.methods = SEQUENCE_METHODS
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study through the launcher (:data:`ARGV`), once for the module's tests."""
    workdir = str(tmp_path_factory.mktemp("frontier") / "study")
    with compilation_cache(tmp_path_factory):
        argv = [f"--workdir={workdir}", *ARGV]
        assert launch("experiments.studies.frontier", argv) is None  # exit status 0
    return workdir


@pytest.mark.slow
def test_tiny_study_puts_every_method_on_or_below_the_frontier(study):
    workdir = study
    for name in ("points.jsonl", "points.csv", "frontier.jsonl", "frontier.csv", "summary.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert os.path.getsize(os.path.join(workdir, "frontier.png")) > 10_000
    config = tiny_config()
    points = common.read_table(os.path.join(workdir, "points.jsonl"))
    curve = common.read_table(os.path.join(workdir, "frontier.jsonl"))
    n = len(config.betas) * len(config.seeds)
    for method in config.methods:
        assert sum(p["method"] == method for p in points) == n, method

    for seed in config.seeds:
        rows = sorted((r for r in curve if r["seed"] == seed), key=lambda r: -r["beta"])
        kl, gold = np.array([r["kl"] for r in rows]), np.array([r["gold"] for r in rows])
        # Exact frontier: smaller beta, more KL and more reward (monotone), from the reference
        # (KL ~ 0) up to the best arm.
        assert np.all(np.diff(kl) >= -1e-12) and np.all(np.diff(gold) >= -1e-12)
        assert kl[0] < 1e-3 and kl[-1] > 1.0
        ref_gold = gold[0]  # beta = 1e3: the reference itself, to 1e-3
        for p in (p for p in points if p["seed"] == seed):
            label = f"{p['method']} beta={p['beta']} seed={seed}"
            # The key direction: on or below the exact frontier at the KL the point spent.
            assert p["gold"] <= p["frontier_gold"] + TOL, label
            # The study's frontier value agrees with its dense curve (linear interpolation of a
            # concave curve lies below it, by at most the grid's step in reward).
            interp = np.interp(p["kl"], kl, gold)
            assert interp - 1e-9 <= p["frontier_gold"] <= interp + 0.02, label
            # The run's own closed-form optimum pi*_beta (its reference, its beta) is a point of
            # the study's curve: both compare against the same reference.
            on_curve = np.interp(p["optimum_kl"], kl, gold)
            assert on_curve - 1e-9 <= p["optimum_gold"] <= on_curve + 0.02, label
            # Every method moved up from the reference (whose reward is F(0)) at this seed.
            assert p["gold"] > ref_gold + 0.02, label
            assert p["wall_s"] > 0 and p["tokens"] > 0 and p["peak_rss_mib"] > 0, label


@pytest.mark.slow
def test_tiny_study_traces_every_sequence_method_by_its_beta(study):
    workdir = study
    for name in ("sequence_points.jsonl", "sequence_points.csv", "sequence_references.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert "## Sequence task" in open(os.path.join(workdir, "summary.md")).read()
    config = tiny_config()
    s = config.sequence
    points = common.read_table(os.path.join(workdir, "sequence_points.jsonl"))
    refs = common.read_table(os.path.join(workdir, "sequence_references.jsonl"))
    refs = {r["seed"]: r for r in refs}
    small, large = min(s.betas), max(s.betas)
    for seed in config.seeds:
        for method in s.methods:
            pts = {p["beta"]: p for p in points if p["method"] == method and p["seed"] == seed}
            assert sorted(pts) == sorted(s.betas), method
            label = f"{method} seed={seed}"
            for p in pts.values():
                # Every run starts from the seed's SFT reference: its step-0 evaluation is the
                # reference's (KL 0, the SFT run's own held-out gold reward, the same samples).
                assert p["ref_kl"] == pytest.approx(0.0, abs=1e-4), label
                assert p["ref_gold"] == pytest.approx(refs[seed]["gold"], abs=1e-4), label
                assert p["wall_s"] > 0 and p["tokens"] > 0 and p["peak_rss_mib"] > 0, label
            # The key direction: the weaker the KL regularisation, the farther from the
            # reference each method's sweep goes.
            assert pts[small]["kl"] > pts[large]["kl"] + KL_GAP[method], label
            # ... and what that KL buys the methods trained on the gold reward: more of it.
            if method in GOLD_GAIN:
                assert pts[small]["gold"] > pts[small]["ref_gold"] + GOLD_GAIN[method], label
        # The release gate's entropy check runs on a DPO-family run and an RLOO run (the DPO
        # eval records and the RLOO train records carry the policy entropy), not "n/a".
        for method in ("dpo", "rloo"):
            run = next(p["run"] for p in points if p["method"] == method and p["seed"] == seed)
            report = evaluation.release_gate(gate.read_run(os.path.join(workdir, run)))
            assert report.check("entropy").status != "n/a", method
