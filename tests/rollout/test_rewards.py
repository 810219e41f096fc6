"""Reward sources, their post-processing and best-of-N, on hand-made rollouts.

The rollout below has what breaks naive scorers: left-padded prompts of different lengths,
responses of different lengths, one response that never emits EOS (it hit the length limit), one
prompt that contains the EOS id.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import data, models, rollout

PAD, BOS, EOS = 256, 257, 258
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
A, B = ord("a"), ord("b")


def hand_rollout():
    prompt_ids = np.array(
        [
            [PAD, PAD, BOS, A, ord("*"), ord("2"), ord("=")],
            [PAD, PAD, BOS, B, ord("*"), ord("3"), ord("=")],
            [PAD, BOS, A, EOS, ord("*"), ord("1"), ord("=")],  # EOS inside the prompt
        ],
        np.int32,
    )
    tokens = np.array(
        [
            [A, A, EOS, PAD, PAD],  # eos
            [B, B, B, B, B],  # never ends: length
            [A, EOS, PAD, PAD, PAD],  # eos
        ],
        np.int32,
    )
    mask = (tokens != PAD).astype(np.int32)
    return rollout.Rollout(
        prompt_ids=jnp.asarray(prompt_ids),
        prompt_mask=jnp.asarray((prompt_ids != PAD).astype(np.int32)),
        tokens=jnp.asarray(tokens),
        response_mask=jnp.asarray(mask),
        logprobs=jnp.zeros(tokens.shape),
        finish_reason=jnp.array([rollout.FINISH_EOS, rollout.FINISH_LENGTH, rollout.FINISH_EOS]),
        lengths=jnp.asarray(mask.sum(-1)),
        prompt_index=jnp.arange(3),
    )


@pytest.fixture(scope="module")
def reward_model():
    cfg = models.preset("tiny", **TINY).replace(init_std=0.3)
    return models.Model.init(cfg, jax.random.key(0), head="reward")


def test_reward_model_scores_the_last_real_response_token(reward_model):
    r = hand_rollout()
    scores = np.asarray(rollout.RewardModel(reward_model, reward_model.params)(r))
    # Each row without its prompt padding (right-padded instead: another layout), and the
    # prompt alone: the score is the response's, not a pad's or the prompt's last token's.
    alone, prompt_only = np.full((3, 12), PAD), np.full((3, 12), PAD)
    for i in range(3):
        p = np.asarray(r.prompt_ids[i])[np.asarray(r.prompt_mask[i]) > 0]
        y = np.asarray(r.tokens[i])[np.asarray(r.response_mask[i]) > 0]
        alone[i, : len(p) + len(y)] = np.concatenate([p, y])
        prompt_only[i, : len(p)] = p
    apply = jax.jit(reward_model.apply)
    both = np.concatenate([alone, prompt_only])
    ref = np.asarray(apply(reward_model.params, both, (both != PAD).astype(np.int32)))
    np.testing.assert_allclose(scores, ref[:3], atol=1e-5)
    assert np.all(np.abs(scores - ref[3:]) > 1e-4)
    with pytest.raises(ValueError, match="'reward' head"):
        rollout.RewardModel(models.Model(reward_model.config, reward_model.params), None)


def test_on_last_token_places_scores_and_zeros_padding():
    r = hand_rollout()
    out = np.asarray(rollout.on_last_token(jnp.array([1.0, 2.0, 3.0]), r.response_mask))
    expected = np.zeros((3, 5))
    expected[0, 2], expected[1, 4], expected[2, 1] = 1.0, 2.0, 3.0
    assert np.array_equal(out, expected)
    assert np.all(out[np.asarray(r.response_mask) == 0] == 0)


def test_gold_reward_reads_the_response_only():
    task = data.RepeatTask()
    tok = models.ByteTokenizer()
    r = hand_rollout()
    r = r._replace(prompt_ids=r.prompt_ids.at[2].set(r.prompt_ids[1]))  # a parsable prompt
    gold = rollout.GoldReward(task, tok)(r)
    # "aa" for a*2 = 1; "bbbbb" for b*3 = 1 - 2/3; "a" for b*3 = 0.
    np.testing.assert_allclose(gold, [1.0, 1 / 3, 0.0], atol=1e-6)
    bandit = data.Bandit.make(num_arms=3, seed=0)
    prompt = np.array([tok.encode(bandit.prompts[0], add_special_tokens=True)] * 2)
    arms = rollout.Rollout(
        prompt_ids=jnp.asarray(prompt),
        prompt_mask=jnp.ones(prompt.shape, jnp.int32),
        tokens=jnp.array([[ord("A"), PAD], [ord("z"), PAD]]),  # an arm, not an arm
        response_mask=jnp.array([[1, 0], [1, 0]]),
        logprobs=jnp.zeros((2, 2)),
        finish_reason=jnp.array([rollout.FINISH_LENGTH] * 2),
        lengths=jnp.array([1, 1]),
        prompt_index=jnp.arange(2),
    )
    out = rollout.GoldReward(bandit, tok, invalid_reward=-5.0)(arms)
    np.testing.assert_allclose(out, [bandit.rewards[0, 0], -5.0], atol=1e-6)


def test_verifiers_on_strings_and_on_arrays():
    r = hand_rollout()
    seen = {}

    def count_a(prompts, responses):
        seen["responses"] = responses
        return [y.count("a") for y in responses]

    out = rollout.score(rollout.Verifier(count_a, models.ByteTokenizer()), r)
    assert seen["responses"] == ["aa", "bbbbb", "a"]  # EOS stripped, pads never decoded
    np.testing.assert_array_equal(out.raw, [2.0, 0.0, 1.0])
    arrays = rollout.Verifier(lambda ro: ro.lengths.astype(jnp.float32))
    np.testing.assert_array_equal(rollout.score(arrays, r).raw, [3.0, 5.0, 2.0])
    bad = rollout.Verifier(lambda p, y: [1.0], models.ByteTokenizer())
    with pytest.raises(ValueError, match="one score per response"):
        rollout.score(bad, r)


def test_transform_penalises_length_hits_then_clips_then_whitens():
    r = hand_rollout()
    raw = rollout.Verifier(lambda ro: jnp.array([3.0, 0.5, -0.2]))
    t = rollout.RewardTransform(length_penalty=1.0, clip=1.0)
    out = rollout.score(raw, r, t)
    np.testing.assert_allclose(out.scores, [1.0, -0.5, -0.2], atol=1e-6)  # 3 -> 1, 0.5 - 1
    np.testing.assert_allclose(out.raw, [3.0, 0.5, -0.2], atol=1e-6)
    w = rollout.score(raw, r, rollout.RewardTransform(whiten=True)).scores
    x = np.array([3.0, 0.5, -0.2])
    np.testing.assert_allclose(w, (x - x.mean()) / x.std(ddof=1), atol=1e-5)


def test_best_of_n_keeps_each_prompts_highest_score():
    r = hand_rollout()
    six = rollout.Rollout(*(jnp.concatenate([x, x]) for x in r))  # 2 prompts x 3 samples
    scores = jnp.array([0.1, 0.9, 0.5, 0.7, 0.7, 0.2])
    best = rollout.best_of_n(six, scores, 3)
    assert best.index.tolist() == [1, 3]  # the first of a tie
    np.testing.assert_allclose(best.scores, [0.9, 0.7])
    assert np.array_equal(best.rollout.tokens, six.tokens[np.array([1, 3])])


@pytest.mark.slow
def test_best_of_n_with_a_sampler_and_any_source():
    model = models.Model.init(models.preset("tiny", **TINY), jax.random.key(1))
    cfg = rollout.SamplingConfig(max_new_tokens=3, num_samples=4, pad_id=PAD)
    sampler = rollout.make_sampler(model, cfg)
    ids = jnp.array([[BOS, A], [BOS, B]])
    source = rollout.Verifier(lambda ro: jnp.sum(ro.tokens == A, -1).astype(jnp.float32))
    best = rollout.sample_best_of_n(
        sampler, source, model.params, ids, jnp.ones_like(ids), jax.random.key(2), 4
    )
    full = sampler(model.params, ids, jnp.ones_like(ids), jax.random.key(2))
    counts = np.asarray(jnp.sum(full.tokens == A, -1)).reshape(2, 4)
    np.testing.assert_array_equal(best.scores, counts.max(-1))
