"""A researcher's own files: every layout docs/data.md documents trains with every launcher it
suits (``--config.data.task=files``), in-process, from small local files written here.

Layouts: explicit pairs with and without ``prompt_id`` (an integer ``prompt_id`` in the JSON
array), Anthropic HH transcripts, UltraFeedback message lists (JSONL and Parquet), A/B labels;
listwise rankings and scores; unpaired (KTO) labels; SFT ``prompt``/``completion`` and
``messages``. Launchers: ``experiments.dpo`` with its default SFT warm-up (on a preference file
the warm-up imitates the chosen side), ``experiments.sft``, ``experiments.reward_model``
(Bradley-Terry on pairs, Plackett-Luce on rankings), DPO's ``listwise`` and ``kto`` losses.

Each run must show that it read the file: the data line it prints counts every row of the file
(train + held-out) and every distinct prompt, with some held out; its train and eval records
in ``metrics.jsonl`` are finite. DPO's first step (policy = reference) logs an accuracy of 0.5.
"""

import json
import math
import os
import re

import pytest

# Prompts "c*n=" ask for n copies of c (the sequence task's format), 12 distinct ones; each has a
# correct response and two wrong ones, so every file below is small, valid and duplicate-free.
PROMPTS = [f"{c}*{n}=" for c in "abcd" for n in (1, 2, 3)]
N_PROMPTS = len(PROMPTS)


def good(p):
    return p[0] * int(p[2])


def bad(p, j):
    return [p[0] * (int(p[2]) + 1), "z" * int(p[2])][j]


def turns(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def hh(prompt, response):
    return f"\n\nHuman: {prompt}\n\nAssistant: {response}"


# layout -> (file suffix, rows). Two pairs per prompt for preference data.
PAIRWISE = {
    "explicit_prompt_id": (
        "jsonl",
        [
            {"prompt_id": f"q{i}", "prompt": p, "chosen": good(p), "rejected": bad(p, j)}
            for i, p in enumerate(PROMPTS)
            for j in (0, 1)
        ],
    ),
    "explicit_no_prompt_id": (
        "jsonl",
        [{"prompt": p, "chosen": good(p), "rejected": bad(p, j)} for p in PROMPTS for j in (0, 1)],
    ),
    "json_array": (
        "json",
        [
            {"prompt_id": i, "prompt": p, "chosen": good(p), "rejected": bad(p, j)}
            for i, p in enumerate(PROMPTS)
            for j in (0, 1)
        ],
    ),
    "anthropic_hh": (
        "jsonl",
        [{"chosen": hh(p, good(p)), "rejected": hh(p, bad(p, j))} for p in PROMPTS for j in (0, 1)],
    ),
    "ultrafeedback": (
        "jsonl",
        [
            {
                "prompt": p,
                "chosen": turns(p, good(p)),
                "rejected": turns(p, bad(p, j)),
                "score_chosen": 8.0,
                "score_rejected": 3.0 - j,
            }
            for p in PROMPTS
            for j in (0, 1)
        ],
    ),
    "ultrafeedback_parquet": (
        "parquet",
        [
            {"prompt": p, "chosen": turns(p, good(p)), "rejected": turns(p, bad(p, j))}
            for p in PROMPTS
            for j in (0, 1)
        ],
    ),
    "a_b_label": (
        "jsonl",
        [
            {"prompt": p, "response_a": bad(p, j), "response_b": good(p), "label": "b"}
            if j
            else {"prompt": p, "response_a": good(p), "response_b": bad(p, j), "label": 0}
            for p in PROMPTS
            for j in (0, 1)
        ],
    ),
}
LISTWISE = {
    # Responses in any order, ranked best first by index.
    "ranking": [
        {"prompt": p, "responses": [bad(p, 0), good(p), bad(p, 1)], "ranking": [1, 0, 2]}
        for p in PROMPTS
    ],
    "scores": [
        {"prompt": p, "responses": [bad(p, 1), bad(p, 0), good(p)], "scores": [0.0, 0.5, 1.0]}
        for p in PROMPTS
    ],
}
# The documented label spellings (true/false, 1/0, "desirable"/"undesirable") and `response`.
UNPAIRED = [
    {"prompt": p, "completion": good(p), "label": [True, 1, "desirable"][i % 3]}
    for i, p in enumerate(PROMPTS)
] + [
    {"prompt": p, "response": bad(p, i % 2), "label": [False, 0, "undesirable"][i % 3]}
    for i, p in enumerate(PROMPTS)
]
SFT = {
    "prompt_completion": [{"prompt": p, "completion": good(p)} for p in PROMPTS],
    "messages": [
        {"messages": [{"role": "system", "content": "Repeat."}, *turns(p, good(p))]}
        for p in PROMPTS
    ],
}

# Tiny runs: 2 steps of batch 8, eval at steps 0 and 2, nothing written but metrics.jsonl.
SMALL = [
    "--config.data.task=files",
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.optimizer.warmup_steps=1",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=8",
    "--config.data.max_len=48",
    "--config.data.max_prompt_len=32",
    "--config.checkpoint.enabled=False",
    "--config.logging.tensorboard=False",
    "--config.logging.plot=False",
    "--config.logging.progress=False",
]
DPO_WARMUP = ["--config.sft_warmup.num_steps=2"]  # the launcher's default pipeline, shortened
DATA_LINE = re.compile(
    r"^(\[sft warm-up\] )?data: files \((\w+)\): (\d+) train / (\d+) held-out examples, "
    r"(\d+) / (\d+) distinct prompts$",
    re.M,
)


# One on-disk XLA cache for the session's launches, and a launcher's ``main`` with fresh flags.
from tests.experiments.test_launchers import _compilation_cache, launch  # noqa: E402, F401


def write(path, suffix, rows):
    if suffix == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif suffix == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)  # conversations: list<struct<...>>
    return str(path)


def train_on(tmp_path, capsys, module_name, rows, suffix="jsonl", extra=()):
    """Writes ``rows`` to a file, trains on it; returns the data lines and metrics records."""
    path = write(tmp_path / f"data.{suffix}", suffix, rows)
    workdir = str(tmp_path / "run")  # fresh per test: never a resumed run
    argv = [f"--workdir={workdir}", *SMALL, f"--config.data.train_files={path}", *extra]
    assert launch(module_name, argv) is None  # exit status 0
    lines = DATA_LINE.findall(capsys.readouterr().out)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return lines, records, workdir


def check_run(lines, records, stages, num_prompts=N_PROMPTS):
    """The file was read whole and the run trained.

    ``stages`` lists ``(batch kind, examples the file holds of it)`` per data line printed (the
    SFT warm-up's first): train + held-out must count them all, and every distinct prompt.
    """
    assert [kind for _, kind, *_ in lines] == [kind for kind, _ in stages]
    for line, (kind, num) in zip(lines, stages, strict=True):
        train, held, train_prompts, held_prompts = (int(x) for x in line[2:])
        assert train + held == num, kind
        assert train_prompts + held_prompts == num_prompts, kind
        assert held_prompts > 0 and train >= 8, kind  # a held-out split, at least one batch
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals] == [0, 2]
    assert all(math.isfinite(r["eval/loss"]) for r in evals)
    return train, evals


def check_dpo_starts_at_ties(train, evals):
    """Policy = reference (the warm-up's result) at step 0 and during step 1: accuracy 0.5."""
    assert evals[0]["eval/rewards/accuracy"] == 0.5
    assert train[0]["rewards/accuracy"] == 0.5
    assert evals[0]["eval/kl/logratio"] == 0.0


PAIRWISE_IDS = sorted(PAIRWISE)
# Every layout x launcher pair builds and checks its data without training
# (test_every_pairwise_layout_becomes_the_data_each_launcher_reads); end to end, each launcher
# trains on layouts that differ in how the prompt is found (no prompt_id, HH conversations,
# Parquet message lists), DPO's default (SFT warm-up on the file, then DPO) on a JSON array too.
TRAINED_LAYOUTS = ["anthropic_hh", "explicit_no_prompt_id", "ultrafeedback_parquet"]


def sft_completions(config, tok):
    """The decoded responses of the SFT data (train and held-out) ``config`` reads."""
    from prefjax.train import inputs

    data = inputs.build_data(config, tok, "sft")
    ids = [*data.train["response_ids"], *data.eval.dataset["response_ids"]]
    return sorted(tok.decode([int(t) for t in x], skip_special_tokens=True).strip() for x in ids)


def files_config(module, path):
    config = module.get_config()
    config.data.task, config.data.train_files = "files", path
    config.data.max_len, config.data.max_prompt_len = 48, 32
    return config


@pytest.mark.parametrize("layout", PAIRWISE_IDS)
@pytest.mark.parametrize("config_name", ["dpo", "sft", "reward_model"])
def test_every_pairwise_layout_becomes_the_data_each_launcher_reads(layout, config_name, tmp_path):
    """Fast, no training: read + validate + split + tokenise as the launcher's config asks."""
    from experiments.configs import dpo, reward_model, sft
    from prefjax.models import ByteTokenizer
    from prefjax.train import inputs

    suffix, rows = PAIRWISE[layout]
    module = {"dpo": dpo, "sft": sft, "reward_model": reward_model}[config_name]
    config = files_config(module, write(tmp_path / f"data.{suffix}", suffix, rows))
    tok = ByteTokenizer()
    # DPO reads SFT examples for its warm-up, then the pairs.
    kinds = {"dpo": ["sft", "pairwise"], "sft": ["sft"], "reward_model": ["pairwise"]}
    for kind in kinds[config_name]:
        data = inputs.build_data(config, tok, kind)
        assert len(data.train) + len(data.eval.dataset) == len(rows)
        prompt_ids = {*data.train["prompt_id"], *data.eval.dataset["prompt_id"]}
        assert len(prompt_ids) == N_PROMPTS
        assert not set(data.train["prompt_id"]) & set(data.eval.dataset["prompt_id"])
    if "sft" in kinds[config_name]:  # SFT imitates exactly the chosen side, once per pair
        assert sft_completions(config, tok) == sorted(good(p) for p in PROMPTS for _ in (0, 1))


@pytest.mark.parametrize("layout", ["listwise_ranking", "listwise_scores", "unpaired"])
def test_sft_on_a_feedback_file_imitates_what_it_prefers(layout, tmp_path):
    """A ranking's best response; an unpaired file's desirable completions only."""
    from experiments.configs import dpo
    from prefjax.models import ByteTokenizer

    rows = UNPAIRED if layout == "unpaired" else LISTWISE[layout.split("_")[1]]
    config = files_config(dpo, write(tmp_path / "data.jsonl", "jsonl", rows))
    assert sft_completions(config, ByteTokenizer()) == sorted(good(p) for p in PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", TRAINED_LAYOUTS + ["json_array"])
def test_pairwise_file_trains_dpo_with_its_sft_warmup(layout, tmp_path, capsys):
    suffix, rows = PAIRWISE[layout]
    lines, records, workdir = train_on(
        tmp_path, capsys, "experiments.dpo", rows, suffix, DPO_WARMUP
    )
    # The warm-up imitates the chosen side (one SFT example per pair), then DPO on the pairs.
    train, evals = check_run(lines, records, [("sft", len(rows)), ("pairwise", len(rows))])
    assert os.path.isdir(os.path.join(workdir, "sft_warmup"))
    check_dpo_starts_at_ties(train, evals)


@pytest.mark.slow
@pytest.mark.parametrize("layout", TRAINED_LAYOUTS)
def test_pairwise_file_trains_sft_on_its_chosen_responses(layout, tmp_path, capsys):
    suffix, rows = PAIRWISE[layout]
    lines, records, _ = train_on(tmp_path, capsys, "experiments.sft", rows, suffix)
    check_run(lines, records, [("sft", len(rows))])


@pytest.mark.slow
@pytest.mark.parametrize("layout", TRAINED_LAYOUTS)
def test_pairwise_file_trains_a_bradley_terry_reward_model(layout, tmp_path, capsys):
    suffix, rows = PAIRWISE[layout]
    lines, records, _ = train_on(tmp_path, capsys, "experiments.reward_model", rows, suffix)
    _, evals = check_run(lines, records, [("pairwise", len(rows))])
    assert 0.0 <= evals[-1]["eval/rewards/accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LISTWISE))
def test_listwise_file_trains_listwise_dpo_with_its_sft_warmup(layout, tmp_path, capsys):
    # The warm-up imitates each ranking's best response; RPO is a pairwise-loss term.
    extra = [*DPO_WARMUP, "--config.algorithm.loss=listwise", "--config.algorithm.rpo_alpha=0"]
    rows = LISTWISE[layout]
    lines, records, _ = train_on(tmp_path, capsys, "experiments.dpo", rows, extra=extra)
    train, evals = check_run(lines, records, [("sft", len(rows)), ("listwise", len(rows))])
    check_dpo_starts_at_ties(train, evals)  # every ordered pair of responses a tie


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LISTWISE))
def test_listwise_file_trains_a_plackett_luce_reward_model(layout, tmp_path, capsys):
    extra = ["--config.algorithm.loss=plackett_luce"]
    rows = LISTWISE[layout]
    lines, records, _ = train_on(tmp_path, capsys, "experiments.reward_model", rows, extra=extra)
    _, evals = check_run(lines, records, [("listwise", len(rows))])
    assert 0.0 <= evals[-1]["eval/rewards/accuracy"] <= 1.0


@pytest.mark.slow
def test_unpaired_file_trains_kto_with_its_sft_warmup(tmp_path, capsys):
    extra = [*DPO_WARMUP, "--config.algorithm.loss=kto", "--config.algorithm.rpo_alpha=0"]
    lines, records, _ = train_on(tmp_path, capsys, "experiments.dpo", UNPAIRED, extra=extra)
    # The warm-up imitates the desirable half only.
    desirable = len(UNPAIRED) // 2
    train, evals = check_run(lines, records, [("sft", desirable), ("unpaired", len(UNPAIRED))])
    check_dpo_starts_at_ties(train, evals)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(SFT))
def test_sft_file_trains_sft(layout, tmp_path, capsys):
    lines, records, _ = train_on(tmp_path, capsys, "experiments.sft", SFT[layout])
    check_run(lines, records, [("sft", len(SFT[layout]))])
