"""Process reward models: the step scorer against the reward head, the per-step loss and its
metrics against NumPy, the min / product aggregation by hand, config errors, and a PRM trained on
the built-in arithmetic task that judges held-out steps."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from experiments.configs import grpo as grpo_config
from experiments.configs import reward_model as reward_model_config
from prefjax import data, losses, models
from prefjax import rollout as rollout_lib
from prefjax import sharding as shd
from prefjax.rollout import prm, rewards
from prefjax.train import checkpointing, evaluation, online, reward
from prefjax.train import setup as train_setup
from prefjax.train.state import TrainState

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOK = models.ByteTokenizer()
SEQ = 32
SEP = 10  # "\n"


def make_config(**algorithm):
    config = config_common.base_config("reward")
    config.data.task = "arithmetic"
    config.data.batch_size = 8
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.algorithm.update(loss="prm", **algorithm)
    return config


@pytest.fixture(scope="module")
def model():
    return models.from_preset("tiny", key=jax.random.key(0), head="reward", **TINY)


@pytest.fixture(scope="module")
def batch():
    ds = data.ArithmeticTask().step_dataset(TOK, 8, seed=3)
    return data.collate(ds, [0, 1, 2, 3, 4, 5, 6, -1], SEQ)  # one padding row


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_step_logits_at_the_last_token_are_the_reward_models_score(model, batch):
    ids, attn = batch["input_ids"][:7], batch["attention_mask"][:7]
    logits = np.asarray(prm.step_logits(model, model.params, ids, attn), np.float64)
    last = attn.sum(1) - 1  # right padding: the last real token
    expected = np.asarray(model.apply(model.params, ids, attn), np.float64)
    np.testing.assert_allclose(logits[np.arange(7), last], expected, rtol=1e-5, atol=1e-6)
    # Causal: a token's score does not depend on what follows it.
    cut = np.where(np.arange(SEQ) < 10, attn, 0)
    short = np.asarray(prm.step_logits(model, model.params, ids, cut))
    np.testing.assert_allclose(short[:, :10], logits[:, :10], rtol=1e-5, atol=1e-6)


def test_prm_loss_and_metrics_match_numpy(model, batch):
    out = train_setup.make_eval_step(reward, model, make_config())(model.params, batch, None)
    z = np.asarray(
        prm.step_logits(model, model.params, batch["input_ids"], batch["attention_mask"])
    )
    mask = batch["step_mask"] * batch["example_mask"][:, None]
    y = batch["step_labels"].astype(np.float64)
    p = _sigmoid(z.astype(np.float64))
    # Binary cross-entropy of each labelled step, written out.
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(float(out["loss"][0]), (bce * mask).sum(), rtol=1e-5)
    assert float(out["loss"][1]) == mask.sum()  # mean over the labelled steps
    correct = ((p > 0.5) == (y > 0.5)) * mask
    np.testing.assert_allclose(float(out["steps/accuracy"][0]), correct.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(out["steps/positive_rate"][0]), (y * mask).sum())
    rows = mask.sum(1) > 0
    pred = np.array([p[i][mask[i] > 0].min() > 0.5 for i in np.flatnonzero(rows)])
    gold = np.array([y[i][mask[i] > 0].min() > 0.5 for i in np.flatnonzero(rows)])
    assert float(out["steps/outcome_accuracy"][0]) == (pred == gold).sum()
    assert float(out["steps/outcome_accuracy"][1]) == 7  # the padding row does not count
    # The per-example loss is the library's, which the docstring example derives by hand.
    per_example = losses.process_reward_loss(z, y, mask)
    np.testing.assert_allclose(np.asarray(per_example), (bce * mask).sum(1), rtol=1e-5)


@pytest.mark.slow
def test_prm_accumulation_is_exact_with_unequal_step_counts(model, batch):
    def one_step(accum):
        config = make_config()
        config.optimizer.grad_accum_steps = accum
        s = train_setup.build_setup(
            config, model, shd.single_device_mesh(), jax.random.key(1), reward
        )
        state = TrainState.create(params=jax.tree.map(jnp.copy, model.params), tx=s.state.tx)
        state, metrics = s.train_step(state, batch, None, jax.random.key(2))
        return jax.device_get(state.params), jax.device_get(metrics)

    p1, m1 = one_step(1)
    p2, m2 = one_step(2)
    for name in ("loss", "steps/accuracy", "steps/auc", "steps/outcome_accuracy"):
        np.testing.assert_allclose(m2[name], m1[name], rtol=1e-6, err_msg=name)
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True)
    )
    assert diff < 1e-6
    # The two halves hold different numbers of steps: a mean of per-half means would differ.
    steps = (batch["step_mask"] * batch["example_mask"][:, None]).reshape(2, -1).sum(1)
    assert steps[0] != steps[1]


def test_binned_auc_equals_the_rank_auc_when_bins_separate_scores():
    # Scores in distinct bins (1/32 apart): the binned AUC is the exact Mann-Whitney AUC.
    scores = (np.array([3, 9, 14, 20, 25, 30, 5, 17]) + 0.5) / reward.AUC_BINS
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    pos, neg = scores[labels == 1], scores[labels == 0]
    exact = np.mean([float(a > b) for a in pos for b in neg])
    stats = reward._auc_histogram(scores[None], labels[None].astype(np.float32), np.ones((1, 8)))
    auc = reward.finalize_prm({**stats, "loss": (0.0, 1.0)})["steps/auc"]
    np.testing.assert_allclose(float(auc), exact, rtol=1e-6)
    # Pairs in one bin count one half; only one class: 0.5.
    np.testing.assert_allclose(float(reward.binned_auc([1.0, 0.0], [1.0, 0.0])), 0.5)
    np.testing.assert_allclose(float(reward.binned_auc([0.0, 2.0], [0.0, 0.0])), 0.5)
    np.testing.assert_allclose(float(reward.binned_auc([0.0, 1.0], [1.0, 0.0])), 1.0)


def test_aggregation_min_and_product_by_hand():
    probs = np.array([[0.9, 0.3, 0.5, 0.8], [0.6, 0.7, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    mask = np.array([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    mins = prm.aggregate_step_scores(probs, mask, aggregation="min")
    prods = prm.aggregate_step_scores(probs, mask, aggregation="product", empty=-1.0)
    np.testing.assert_allclose(np.asarray(mins), [0.5, 0.6, 0.0], rtol=1e-6)  # no step: empty
    np.testing.assert_allclose(np.asarray(prods), [0.9 * 0.5 * 0.8, 0.6 * 0.7, -1.0], rtol=1e-6)
    # A masked probability of 0 neither zeroes the product nor gives a NaN gradient.
    grad = jax.grad(lambda q: prm.aggregate_step_scores(q, mask, aggregation="product").sum())(
        jax.numpy.asarray(probs, jax.numpy.float32)
    )
    assert np.isfinite(np.asarray(grad)).all() and float(grad[1, 2]) == 0.0
    # Many steps: the product stays representable (log space) and equals exp(sum log p).
    many = np.full((1, 100), 0.6)
    np.testing.assert_allclose(
        float(prm.aggregate_step_scores(many, np.ones((1, 100)), aggregation="product")[0]),
        np.exp(100 * np.log(0.6)),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="aggregation='mean'"):
        prm.aggregate_step_scores(probs, mask, aggregation="mean")


def test_prm_rewards_read_separators_of_the_response_only(model):
    # Left-padded prompt "a\nb" (it contains the separator) + response "1\n2\n" + EOS.
    prompt, response = [257, 97, SEP, 98], [49, SEP, 50, SEP, TOK.eos_id]
    ids = np.array([[256, 256, *prompt, *response]])
    attn = (ids != 256).astype(np.int32)
    resp = np.zeros_like(ids)
    resp[0, 6:] = 1
    mask = prm.separator_mask(ids, resp, SEP)
    assert np.flatnonzero(np.asarray(mask[0])).tolist() == [7, 9]  # not the prompt's one at 4
    z = np.asarray(prm.step_logits(model, model.params, ids, attn))[0]
    for aggregation, expected in (
        ("min", _sigmoid(z[[7, 9]]).min()),
        ("product", _sigmoid(z[[7, 9]]).prod()),
    ):
        got = prm.prm_rewards(
            model, model.params, ids, attn, resp, separator_id=SEP, aggregation=aggregation
        )
        np.testing.assert_allclose(float(got[0]), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(margin=True), "config.algorithm.margin"),
        (dict(label_smoothing=0.1), "config.algorithm.label_smoothing"),
        (dict(task="sequence"), "config.data.task='sequence'"),
        (dict(task="bandit"), "config.data.task='bandit'"),
    ],
    ids=["margin", "label_smoothing", "sequence-task", "bandit-task"],
)
def test_invalid_prm_configs_name_the_field(overrides, field):
    task = overrides.pop("task", None)
    config = make_config(**overrides)
    if task:
        config.data.task = task
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        config_common.validate(config, num_devices=1)
    assert reward.batch_kind(make_config()) == "step"


# --------------------------------------------------------------------------------------------
# Training on the built-in arithmetic task, then PRM-scored best-of-N
# --------------------------------------------------------------------------------------------
TRAIN_STEPS = 300
TRAIN_SEQ = 24  # prompt (7) + at most 6 steps of 2 tokens + EOS
TRAIN_BATCH = 64
WARMUP = 10


@pytest.fixture(scope="module")
def trained():
    """A PRM trained on held-in prompts of the arithmetic task (held-out prompts never seen)."""
    task = data.ArithmeticTask()
    rng = np.random.default_rng(0)
    held_out = set(rng.choice(task.prompts, len(task.prompts) // 5, replace=False))  # 10 of 50
    records = task.step_records(12_000, seed=1)
    train = [r for r in records if r["prompt"] not in held_out][:4096]
    held = [r for r in records if r["prompt"] in held_out][:256]
    train_ds, held_ds = (data.tokenize(r, TOK, "step", max_len=TRAIN_SEQ) for r in (train, held))
    config = make_config()
    config.data.batch_size = TRAIN_BATCH
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = WARMUP
    model = models.from_preset(
        "tiny", key=jax.random.key(0), head="reward", **dict(TINY, hidden_size=64, mlp_dim=128)
    )
    s = train_setup.build_setup(config, model, shd.single_device_mesh(), jax.random.key(1), reward)
    evaluate = lambda params: evaluation.evaluate_batches(
        s.eval_step,
        params,
        [data.collate(held_ds, np.arange(len(held_ds)), TRAIN_SEQ)],
        s.frozen,
        finalize=s.objective.finalize,
    )
    before = evaluate(s.state.params)
    it = data.BatchIterator(train_ds, TRAIN_BATCH, seed=0, buckets=(TRAIN_SEQ,))
    state = s.state
    for _ in range(TRAIN_STEPS):
        state, _ = s.train_step(state, next(it), s.frozen, jax.random.key(2))
    return dict(
        task=task,
        prompts=sorted(held_out),
        model=model,
        params=jax.device_get(state.params),
        before=before,
        after=evaluate(state.params),
    )


@pytest.mark.slow
def test_training_raises_held_out_step_accuracy_and_auc(trained):
    before, after = trained["before"], trained["after"]
    base = after["steps/positive_rate"]  # what a constant "correct" guess scores
    assert before["steps/accuracy"] <= max(base, 1 - base) + 0.02
    # Measured after 150 steps, seed 0 (seed 1): accuracy 0.81 (0.92), AUC 0.88 (0.94), outcome
    # accuracy 0.76 (0.93), loss 0.73 -> 0.53 (0.93 -> 0.26); untrained: accuracy 0.59 = base,
    # AUC 0.42, outcome 0.46. The fixture trains 300 steps (for the best-of-N test below), which
    # only moves these further past the thresholds.
    assert after["steps/accuracy"] > base + 0.12, after
    assert after["steps/auc"] > 0.8, after
    assert after["steps/outcome_accuracy"] > before["steps/outcome_accuracy"] + 0.15, after
    assert after["loss"] < 0.85 * before["loss"]


@pytest.mark.slow
def test_prm_scored_best_of_n_beats_the_average_sample(trained):
    """Best-of-8 by the PRM source (min and product aggregation) over the task's base responses
    to held-out prompts: the picked responses' gold reward is well above the mean sample's, near
    the oracle's."""
    task, model, params = (trained[k] for k in ("task", "model", "params"))
    # Four independent candidate sets per held-out prompt: 40 best-of-8 picks, not 10, so the
    # mean over picks is not one unlucky prompt's.
    prompts = list(trained["prompts"]) * 4
    n, rng = 8, np.random.default_rng(5)
    candidates = [[task.sample_steps(rng, p) for _ in range(n)] for p in prompts]
    # A Rollout as the sampler returns it: prompts left-padded, responses right-padded.
    p_ds = data.tokenize(
        [{"prompt": p} for p in prompts], TOK, "prompt", max_len=8, append_eos=False
    )
    pb = data.collate(p_ds, np.arange(len(prompts)), 8, pad_side="left")
    resp = np.full((len(prompts) * n, 16), TOK.pad_id, np.int32)
    for i, steps in enumerate(c for per_prompt in candidates for c in per_prompt):
        ids = [*task.join_steps(steps).encode(), TOK.eos_id]
        resp[i, : len(ids)] = ids
    rmask = (resp != TOK.pad_id).astype(np.int32)
    rows = np.repeat(np.arange(len(prompts)), n)
    rollout = rollout_lib.Rollout(
        prompt_ids=pb["prompt_input_ids"][rows],
        prompt_mask=pb["prompt_attention_mask"][rows],
        tokens=resp,
        response_mask=rmask,
        logprobs=np.zeros(resp.shape, np.float32),
        finish_reason=np.zeros(len(rows), np.int32),
        lengths=rmask.sum(1),
        prompt_index=rows.astype(np.int32),
    )
    gold = np.asarray(rewards.GoldReward(task, TOK)(rollout)).reshape(len(prompts), n)
    for aggregation in ("min", "product"):
        source = rewards.ProcessRewardModel(model, params, SEP, aggregation=aggregation)
        sampler = lambda *a, **k: rollout
        picked = rewards.sample_best_of_n(sampler, source, None, None, None, None, n)
        best = gold[np.arange(len(prompts)), np.asarray(picked.index) % n]
        np.testing.assert_allclose(np.asarray(rewards.GoldReward(task, TOK)(picked.rollout)), best)
        # Measured after the fixture's 300 steps: picked 0.88 (min) / 0.86 (product) vs the mean
        # sample 0.61, the oracle 1.0. (After 150 steps the picks were 0.69-0.81 depending on the
        # installed versions' rounding: too close to the threshold, hence 300.)
        assert best.mean() > gold.mean() + 0.1, (aggregation, best.mean(), gold.mean())
        assert best.mean() > 0.7 * gold.max(1).mean(), (aggregation, gold.max(1).mean())


@pytest.mark.slow
def test_prm_preset_runs_end_to_end(tmp_path):
    config = reward_model_config.get_config("prm")
    assert (config.algorithm.loss, config.data.task) == ("prm", "arithmetic")
    config.train.update(num_steps=2, log_every=2, eval_every=2)
    config.data.update(num_train=128, num_eval=32, batch_size=16, eval_batch_size=32)
    config.optimizer.warmup_steps = 1
    config.checkpoint.every = 0  # only the final checkpoint
    config.logging.update(progress=False, tensorboard=False, plot=False)
    workdir = tmp_path / "run"
    reward.run(config, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    for name in ("steps/accuracy", "steps/auc", "steps/outcome_accuracy", "steps/positive_rate"):
        assert 0.0 <= evals[-1][f"eval/{name}"] <= 1.0, name
    assert os.listdir(workdir / "checkpoints") == ["2"]
    # The run is a reward source of the online algorithms: reward.source="prm".
    config = grpo_config.get_config("tiny")
    config.data.task = "arithmetic"
    config.algorithm.reward.update(source="prm", model_dir=str(workdir), prm_aggregation="product")
    online.validate_rollout_fields(config)
    source = online.reward_source(config, TOK)
    assert isinstance(source, rewards.ProcessRewardModel) and source.separator_id == SEP
    params = checkpointing.restore_params(str(workdir))
    prompt = np.array([[TOK.pad_id, TOK.bos_id, *b"3+1x2="]] * 2, np.int32)
    tokens = np.array([[*b"4\n5\n", TOK.eos_id], [*b"4\n7\n", TOK.eos_id]], np.int32)
    r = rollout_lib.Rollout(
        prompt,
        (prompt != TOK.pad_id).astype(np.int32),
        tokens,
        np.ones_like(tokens),
        np.zeros(tokens.shape, np.float32),
        np.zeros(2, np.int32),
        np.full(2, 5, np.int32),
        np.arange(2, dtype=np.int32),
    )
    ids, attn, resp = rollout_lib.sequences(r)
    expected = prm.prm_rewards(
        source.model, params, ids, attn, resp, separator_id=SEP, aggregation="product"
    )
    np.testing.assert_allclose(np.asarray(source(r)), np.asarray(expected), rtol=1e-6)
    config.algorithm.reward.prm_aggregation = "mean"
    with pytest.raises(ValueError, match="config.algorithm.reward.prm_aggregation='mean'"):
        online.validate_rollout_fields(config)
