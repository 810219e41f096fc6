"""Packed batches give the padded batches' objectives: losses, gradients and metrics to 1e-5.

On the same examples (varied prompt and response lengths, a padding row), each objective is
evaluated on the padded batch (``collate``: one row per sequence, padded to the bucket) and on the
packed one (``collate_packed``: the sequences side by side in rows with segment ids and
per-segment positions), in float32:

* SFT (token-mean NLL), the Bradley-Terry and Plackett-Luce reward models, DPO (sigmoid, frozen
  reference), listwise DPO and the reference-free SimPO: loss, every stat and every gradient leaf
  agree to ``1e-5``;
* the whole jitted train step (``build_setup``: AdamW, clipping, norms) on a packed batch equals
  the padded step: the same metrics and the same updated parameters.

A wrong segment mask (a sequence attending to its neighbour), positions that do not restart, a
shifted loss mask crossing a boundary, or a reward read at the wrong token each change these
numbers well beyond the tolerance (``test_cross_segment_attention_would_be_caught``).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import common as config_common
from prefjax import data, models
from prefjax import sharding as shd
from prefjax.data.dataset import TokenizedDataset, object_array
from prefjax.train import common, dpo, reward, sft
from prefjax.train import config as train_config
from prefjax.train import setup as train_setup
from prefjax.train.errors import ConfigError

TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64, vocab_size=64)
MAX_LEN = 24
TOL = dict(rtol=1e-5, atol=1e-5)
# Example indices of one batch: every example once, in a shuffled order, plus a padding row.
INDICES = np.array([3, 0, 5, 1, 4, 2, -1, 6])


def random_dataset(kind: str, n: int = 7, seed: int = 0, k: int = 3) -> TokenizedDataset:
    """Examples of ``kind`` with prompts of 1-8 and responses of 1-12 tokens (ids 3..63)."""
    rng = np.random.default_rng(seed)
    toks = lambda lo, hi: rng.integers(3, 64, int(rng.integers(lo, hi)), dtype=np.int32)  # noqa: E731
    cols = {"prompt_ids": object_array([toks(1, 9) for _ in range(n)])}
    if kind == "pairwise":
        cols["chosen_ids"] = object_array([toks(1, 13) for _ in range(n)])
        cols["rejected_ids"] = object_array([toks(1, 13) for _ in range(n)])
    elif kind == "listwise":
        # Rankings of 2 or 3 responses (a missing slot exercises response_mask).
        cols["responses_ids"] = object_array(
            [[toks(1, 13) for _ in range(2 + i % 2)] for i in range(n)]
        )
    else:
        cols["response_ids"] = object_array([toks(1, 13) for _ in range(n)])
    cols["prompt_id"] = object_array([f"p{i}" for i in range(n)])
    return TokenizedDataset(kind, cols, pad_id=0, max_len=MAX_LEN)


def make_config(algorithm, **changes):
    config = config_common.base_config(algorithm.NAME)
    config.data.batch_size = len(INDICES)
    config.optimizer.warmup_steps = 0
    config.train.num_steps = 10
    config.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, rules=shd.DEFAULT_RULES, distributed=False)
    )
    config.algorithm.update(changes)
    return config


def batches(ds: TokenizedDataset) -> tuple[dict, dict]:
    """The padded and the packed batch of ``INDICES`` (rows of 32 tokens, one spare row)."""
    lengths = ds.lengths()[INDICES[INDICES >= 0]]
    padded = data.collate(ds, INDICES, int(lengths.max()), with_example_mask=True)
    k = data.packing.num_segments_per_example(ds)
    rows = data.packing.rows_needed(ds, INDICES, 32, k) + 1
    packed = data.collate_packed(ds, INDICES, 32, rows)
    return padded, packed


@pytest.fixture(scope="module")
def tiny_models():
    return {
        head: models.from_preset("tiny", key=jax.random.key(0), head=head, **TINY)
        for head in ("lm", "reward")
    }


CASES = {
    "sft": (sft, {}, "sft"),
    "reward_bradley_terry": (reward, {}, "pairwise"),
    "reward_plackett_luce": (reward, {"loss": "plackett_luce"}, "listwise"),
    "dpo_sigmoid": (dpo, {}, "pairwise"),
    "dpo_listwise": (dpo, {"loss": "listwise"}, "listwise"),
    "simpo": (dpo, {"loss": "simpo", "reference": "none"}, "pairwise"),
    # Vocabulary-chunked log-probs (config.model.logps_chunk_size = 8): hidden states, not logits.
    "dpo_chunked_logps": (dpo, {}, "pairwise"),
}
# Paths the fast cases already cover (the packed reward read, the policy log-probs): CI's slow run.
SLOW_CASES = ("reward_plackett_luce", "simpo", "dpo_chunked_logps")


def loss_and_grads(objective, params, frozen, batch):
    def fn(p):
        den = objective.denominators(batch)
        return objective.loss(p, batch, frozen, None, den)

    (loss, stats), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return loss, stats, grads


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES]
)
def test_packed_objective_equals_padded(name, tiny_models):
    algorithm, changes, kind = CASES[name]
    config = make_config(algorithm, **changes)
    config.model.logps_chunk_size = 8 if "chunked" in name else 0
    model = tiny_models[algorithm.HEAD]
    ds = random_dataset(kind, seed=len(name))
    padded, packed = batches(ds)
    # Packing saves slots: fewer token positions than the padded batch.
    assert packed["input_ids"].size < padded["input_ids"].size
    objective = algorithm.objective(model, config)
    # A perturbed reference, so DPO's log-ratios are not all zero.
    frozen = jax.tree.map(lambda x: x * 1.01, model.params)
    want = loss_and_grads(objective, model.params, frozen, padded)
    got = loss_and_grads(objective, model.params, frozen, packed)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    assert set(got[1]) == set(want[1])
    for key in want[1]:
        np.testing.assert_allclose(got[1][key], want[1][key], **TOL, err_msg=key)
    for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(g, w, **TOL)
    assert float(jnp.abs(jnp.concatenate([x.ravel() for x in jax.tree.leaves(want[2])])).max()) > 0


@pytest.mark.slow
def test_cross_segment_attention_would_be_caught(tiny_models):
    """The same packed rows with every segment id set to 1 (one long sequence, attention and
    positions crossing boundaries) give log-probs far from the padded ones."""
    model = tiny_models["lm"]
    ds = random_dataset("pairwise", seed=3)
    padded, packed = batches(ds)
    tokens = common.batch_tokens(packed)
    want, _, _ = dpo._logps(model, model.params, common.batch_tokens(padded))
    got, _ = common.packed_response_logps(model, model.params, tokens)
    np.testing.assert_allclose(got, want, **TOL)
    merged = tokens._replace(attention_mask=(tokens.attention_mask > 0).astype(jnp.int32))
    # Token counts and log-probs must then be read by the true segments: only attention changes.
    logits = model.apply(model.params, merged.input_ids, merged.attention_mask)
    token_logps = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(token_logps, merged.input_ids[:, 1:, None], -1)[..., 0]
    mask = common._packed_shifted_mask(tokens)
    b, k = tokens.sequence_mask.shape
    wrong = common.segment_totals(picked * mask, tokens.attention_mask[:, 1:], b * k)
    assert np.abs(np.asarray(wrong).reshape(b, k) - np.asarray(want)).max() > 1e-2


@pytest.mark.slow
def test_packed_train_step_equals_padded(tiny_models):
    """One jitted DPO train step (AdamW, clipping, norms) from the same state on both layouts,
    and the packed step on 8 devices (rows and examples split over data x fsdp = 2 x 4)."""
    config = make_config(dpo)
    model = tiny_models["lm"]
    ds = random_dataset("pairwise", seed=5)
    padded, packed = batches(ds)
    rows8 = data.packing.round_rows(data.packing.rows_needed(ds, INDICES, 32, 2), 8)
    sharded = data.collate_packed(ds, INDICES, 32, rows8)
    mesh8 = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1, rules=shd.DEFAULT_RULES))
    out = {}
    for name, batch, mesh in (
        ("padded", padded, shd.single_device_mesh()),
        ("packed", packed, shd.single_device_mesh()),
        ("packed on 8 devices", sharded, shd.make_mesh(mesh8)),
    ):
        setup = train_setup.build_setup(config, model, mesh, jax.random.key(1), dpo)
        state, metrics = setup.train_step(
            setup.state, setup.shard_batch(batch), setup.frozen, jax.random.key(0)
        )
        out[name] = (jax.device_get(state.params), jax.device_get(metrics))
    p_pad, m_pad = out.pop("padded")
    for name, (p_pack, m_pack) in out.items():
        for key in m_pad:
            np.testing.assert_allclose(m_pack[key], m_pad[key], **TOL, err_msg=f"{name}: {key}")
        for x, y in zip(jax.tree.leaves(p_pack), jax.tree.leaves(p_pad), strict=True):
            np.testing.assert_allclose(x, y, **TOL, err_msg=name)


@pytest.mark.slow
def test_packing_trains_through_the_loop_and_is_validated(tmp_path, capsys):
    """``data.packing=True``: a DPO run of the built-in task trains on packed batches (finite
    loss, the padding report printed); combinations that cannot pack are refused by name."""
    config = make_config(dpo)
    config.mesh.fsdp = -1  # every device: packed rows rounded to the batch's device split
    config.data.packing = True
    config.data.pad_to_max_len = False
    config.data.num_train, config.data.num_eval = 64, 16
    config.train.num_steps, config.train.eval_every, config.train.log_every = 2, 0, 1
    config.eval.generate = False
    config.checkpoint.enabled = False
    config.logging.tensorboard = config.logging.plot = config.logging.progress = False
    if "sft_warmup" in config:
        config.sft_warmup.num_steps = 0
    result = dpo.run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "data padding:" in out and "data.packing=True" in out
    assert result is not None
    metrics = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(np.isfinite(losses))
    for algo, changes, message in (
        (dpo, {"loss": "kto"}, "not packed"),
        (sft, {}, "grad_accum_steps"),
    ):
        bad = make_config(algo, **changes)
        bad.data.packing = True
        if algo is sft:
            bad.optimizer.grad_accum_steps = 2
        with pytest.raises(ConfigError, match=f"config.data.packing=True: .*{message}"):
            train_config.validate(bad, 1, algo)
