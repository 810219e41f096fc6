"""Reward over-optimisation study: best-of-N's exact selection against sampling and against the
KL formula, the fits of Gao et al.'s forms, and the ``:tiny`` preset end to end."""

import importlib
import json
import os
import sys

import numpy as np
import pytest
from absl import flags

from experiments.studies import common
from prefjax import data
from tests.experiments.test_study_common import compilation_cache

MODULE = "experiments.studies.overoptimisation"


def _import_study(argv=()):
    """The study launcher with fresh flags (``--config.*`` overrides are read from ``sys.argv``
    when the flag is defined, as on the command line; see tests/experiments/test_launchers.py)."""
    sys.argv = ["prog", *argv]
    stale = [n for n in flags.FLAGS if n in ("config", "workdir") or n.startswith("config.")]
    flags.FLAGS.remove_flag_values(stale)
    flags.FLAGS.unparse_flags()
    if MODULE in sys.modules:
        return importlib.reload(sys.modules[MODULE])
    return importlib.import_module(MODULE)


@pytest.fixture(scope="module")
def study():
    argv = list(sys.argv)
    yield _import_study()
    sys.argv = argv


def _bandit_ref():
    bandit = data.Bandit.make(num_arms=8, seed=0)
    return bandit, np.exp(bandit.ref_logprobs[0])


def test_exact_selection_matches_sampled_best_of_n_on_the_bandit(study):
    bandit, ref = _bandit_ref()
    scores = bandit.rewards[0].copy()
    scores[3] = scores[5]  # a tie: broken at random, so arms 3 and 5 share in proportion to pi_ref
    rng = np.random.default_rng(0)
    draws = 40_000
    for n in (1, 3, 16):
        exact = study.best_of_n_probs(ref, scores, [n])[0]
        freq = np.bincount(study.sample_best_of_n(rng, ref, scores, n, draws), minlength=8) / draws
        # Multinomial frequencies: within 5 standard errors of the exact probabilities.
        se = np.sqrt(exact * (1 - exact) / draws) + 1e-12
        np.testing.assert_array_less(np.abs(freq - exact), 5 * se + 1e-9)
        # The tie: arm 3's and arm 5's shares of their level follow pi_ref.
        assert exact[3] / exact[5] == pytest.approx(ref[3] / ref[5], rel=1e-9)
        # The empirical KL of the sampled selection approaches the exact KL.
        assert study.kl_to(freq, ref) == pytest.approx(study.kl_to(exact, ref), abs=0.01)
    # Hand-computed: two arms of mass 1/2, N = 2 -> (1/4, 3/4); all arms tied -> pi_ref itself.
    assert study.best_of_n_probs([0.5, 0.5], [0.0, 1.0], [2]).tolist() == [[0.25, 0.75]]
    tied = study.best_of_n_probs(ref, np.zeros(8), [1, 7, 1024])
    np.testing.assert_allclose(tied, np.broadcast_to(ref, (3, 8)), atol=1e-12)
    np.testing.assert_allclose(study.kl_to(tied, ref), 0.0, atol=1e-12)


def test_kl_formula_bounds_the_bandit_and_equals_the_fine_arm_limit(study):
    ns = np.asarray([1, 2, 4, 16, 64, 256, 1024])
    formula = study.kl_formula(ns)
    assert formula[0] == 0.0 and formula[1] == pytest.approx(np.log(2) - 0.5)
    # The 8-arm bandit, distinct scores: the pick is the quantisation of a continuous best-of-N
    # (sort the arms by score, cut a uniform variable into cells of the arms' masses), so by the
    # data-processing inequality its KL is at most the formula; it saturates at
    # -log pi_ref(top arm) while the formula grows as log N.
    bandit, ref = _bandit_ref()
    exact = study.kl_to(study.best_of_n_probs(ref, bandit.rewards[0], ns), ref)
    assert exact[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(exact <= formula + 1e-12)
    top = np.argmax(bandit.rewards[0])
    assert exact[-1] == pytest.approx(-np.log(ref[top]), rel=1e-6)
    # Many arms of small mass (4096, uniform): the quantisation loses almost nothing. The
    # selection density N u^(N-1) varies by a factor (i / (i - 1))^(N-1) across cell i, a
    # within-cell KL of order ((N - 1) / i)^2 / 24: below 1e-3 in all for N <= 64.
    k = 4096
    fine = study.best_of_n_probs(np.full(k, 1.0 / k), np.arange(k), ns[:5])
    np.testing.assert_allclose(study.kl_to(fine, np.full(k, 1.0 / k)), formula[:5], atol=1e-3)


def test_proxy_reward_is_non_decreasing_in_n(study):
    rng = np.random.default_rng(1)
    ns = np.arange(1, 200)
    for _ in range(20):
        k = int(rng.integers(2, 12))
        ref = rng.dirichlet(np.ones(k))
        scores = np.round(rng.normal(size=k), 1)  # rounding makes ties
        expected = study.best_of_n_probs(ref, scores, ns) @ scores  # [M]
        assert expected[0] == pytest.approx(ref @ scores)
        assert np.all(np.diff(expected) >= -1e-12)
        assert expected[-1] <= scores.max() + 1e-12


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_recovers_known_coefficients(study, form):
    rng = np.random.default_rng(2)
    d = np.linspace(0.0, 3.0, 40)
    alpha, beta = 0.8, 0.3
    clean = d * (alpha - beta * d) if form == "bon" else d * (alpha - beta * np.log(d + 1e-300))
    clean[0] = 0.0
    np.testing.assert_allclose(study.predict(d, alpha, beta, form), clean, atol=1e-12)
    assert study.fit_form(d, clean, form) == pytest.approx((alpha, beta), abs=1e-9)
    noisy = clean + 0.01 * rng.standard_normal(d.size)
    assert study.fit_form(d, noisy, form) == pytest.approx((alpha, beta), abs=0.03)


SHORTER = ["--config.reward_model.num_steps=30", "--config.ppo.num_steps=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("overopt") / "run")
    with compilation_cache(tmp_path_factory):
        # The :tiny preset with shorter proxies and PPO runs (what the test asserts holds at any
        # length; the file's CPU time 92 s instead of 99 s on 2 loaded cores).
        argv = [f"--workdir={workdir}", "--config.logging.progress=False", *SHORTER]
        study = _import_study(argv)
        flags.FLAGS(sys.argv)
        assert study.main(["prog"]) is None  # exit status 0
        yield study, workdir


@pytest.mark.slow
def test_tiny_preset_runs_end_to_end(tiny_run):
    study, workdir = tiny_run
    for name in ("bon.jsonl", "bon.csv", "rl.jsonl", "rl.csv", "fits.json", "summary.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    png = os.path.join(workdir, "overoptimisation.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    config = study.FLAGS.config
    sizes, seeds, ns = (
        tuple(config.reward_model.num_train),
        tuple(config.seeds),
        tuple(config.best_of_n.ns),
    )
    bon = common.read_table(os.path.join(workdir, "bon.jsonl"))
    assert len(bon) == len(sizes) * len(seeds) * len(ns)
    for size in sizes:
        for seed in seeds:
            rows = [r for r in bon if r["num_train"] == size and r["seed"] == seed]
            assert [r["n"] for r in rows] == list(ns)
            proxy = np.asarray([r["proxy"] for r in rows])
            assert np.all(np.diff(proxy) >= -1e-9)  # exact expectation: non-decreasing in N
            assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-12) and rows[0]["gold_gain"] == 0.0
            for r in rows:
                assert r["kl"] <= r["kl_formula"] + 1e-9
                # The sampled selection agrees with the exact one: within 5 standard errors, plus
                # one draw's worth (a gold range of about 4 over num_draws) where every draw
                # picked the same arm and the sample spread is 0.
                slack = 4.0 / config.best_of_n.num_draws
                assert abs(r["gold_sampled"] - r["gold"]) <= 5 * r["gold_sampled_stderr"] + slack
    rl = common.read_table(os.path.join(workdir, "rl.jsonl"))
    steps = list(range(0, config.ppo.num_steps + 1, config.ppo.eval_every))
    for size in sizes:
        for seed in seeds:
            rows = [r for r in rl if r["num_train"] == size and r["seed"] == seed]
            assert [r["step"] for r in rows] == steps
            assert rows[0]["kl"] == 0.0
            # PPO against the proxy raises it and moves away from pi_ref.
            assert rows[-1]["proxy_gain"] > 0.0 and rows[-1]["kl"] > 0.01
    with open(os.path.join(workdir, "fits.json")) as f:
        fits = json.load(f)
    for form in ("bon", "rl"):
        assert sorted(fits[form]) == sorted(str(s) for s in sizes)
        for fit in fits[form].values():
            assert np.isfinite(fit["gold_alpha"]) and np.isfinite(fit["proxy_beta"])
    assert "## Best-of-N" in open(os.path.join(workdir, "summary.md")).read()


def test_a_directory_of_another_run_is_refused_before_anything_runs(tmp_path):
    workdir = tmp_path / "dpo_run"
    workdir.mkdir()
    record = {"format": 1, "algorithm": "dpo", "config": {}, "invocations": []}
    (workdir / "run.json").write_text(json.dumps(record))
    argv = list(sys.argv)
    try:
        study = _import_study([f"--workdir={workdir}"])
        flags.FLAGS(sys.argv)
        with pytest.raises(SystemExit) as exit_info:
            study.main(["prog"])
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2  # refused, naming the other run's algorithm
    assert "dpo" in str(exit_info.value)
    # Nothing written: no study files, no sub-runs, the other run's record unchanged.
    assert [n for n in os.listdir(workdir) if not n.startswith(".")] == ["run.json"]
    assert json.loads((workdir / "run.json").read_text()) == record
