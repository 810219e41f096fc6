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
