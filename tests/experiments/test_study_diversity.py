"""``python -m experiments.studies.diversity`` at its ``:tiny`` preset, end to end: the tables,
figure and summary it writes, and the direction of the effect it exists to show."""

import os

import pytest

from experiments import launch as launch_module
from experiments.studies import common
from tests.experiments.test_launchers import launch
from tests.experiments.test_study_common import compilation_cache


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("diversity") / "study")
    argv = [f"--workdir={workdir}", "--config=experiments/configs/studies/diversity.py:tiny"]
    with compilation_cache(tmp_path_factory):  # the session's: shared with the other studies
        assert launch("experiments.studies.diversity", argv) is None
    return workdir


@pytest.mark.slow
def test_diversity_tiny_writes_its_outputs_and_low_beta_dpo_gets_longer(study):
    for name in ("diversity.jsonl", "diversity.csv", "diversity.png", "summary.md"):
        assert os.path.getsize(os.path.join(study, name)) > 0, name
    rows = common.read_table(os.path.join(study, "diversity.jsonl"))
    # The SFT reference, then plain DPO at two betas (one seed, one sweep).
    assert [(r["method"], r["beta"]) for r in rows] == [("sft", None), ("dpo", 0.1), ("dpo", 1.0)]
    sft_row, weak, strong = rows  # beta 0.1: weakly regularised; beta 1: strongly
    # The SFT policy is the reference: KL exactly 0, and reweighting its gold reward to its own
    # length distribution changes nothing.
    assert sft_row["kl"] == 0.0 and sft_row["length_coverage"] == 1.0
    assert sft_row["gold_length_matched"] == pytest.approx(sft_row["gold"])
    for r in rows:
        assert 0 < r["distinct_1"] <= 1 and 0 < r["distinct_2"] <= 1 and 0 <= r["self_bleu"] <= 1
    # The effect (seed 0; measured on one CPU device: KL 0 / 3.0 / 9.1 nats, length 4.6 / 7.6 /
    # 8.9 tokens, entropy 1.49 / 1.79 / 2.60 nats per token for SFT / beta 1 / beta 0.1): plain
    # DPO moves its samples away from the SFT policy's -- longer and higher-entropy, not
    # collapsed -- and the more so the weaker the KL regularisation.
    for name in ("kl", "length", "entropy/token"):
        assert sft_row[name] < strong[name] < weak[name], name
    # The length drift costs gold reward: reweighted to the SFT policy's lengths, the weak-beta
    # policy's gold reward is higher than as sampled (0.23 against 0.16; seeds 1 and 2 of
    # docs/studies.md, section 4, agree).
    assert weak["gold_length_matched"] > weak["gold"]
    summary = open(os.path.join(study, "summary.md")).read()
    assert "| sft |" in summary and "| dpo | 0.1 |" in summary


def test_diversity_refuses_a_bad_field_before_writing_anything(tmp_path):
    workdir = tmp_path / "study"
    with pytest.raises(launch_module.LaunchError) as err:
        launch(
            "experiments.studies.diversity",
            [f"--workdir={workdir}", "--config.sample.num_samples=1"],
        )
    assert err.value.code == 2 and "config.sample.num_samples=1" in err.value.message
    with pytest.raises(launch_module.LaunchError, match=r"config.methods=.*'sft'"):
        launch(
            "experiments.studies.diversity", [f"--workdir={workdir}", "--config.methods=('sft',)"]
        )
    assert not workdir.exists()
