"""An algorithm written only in this test trains through the unchanged loop.

``SLiC`` is SLiC-HF's calibration loss (Zhao et al., 2023, "SLiC-HF", Eq. 1 with the
cross-entropy regulariser on the chosen response), reference-free:

    L = max(0, delta - log pi(y_w | x) + log pi(y_l | x)) - reg_weight * log pi(y_w | x) / |y_w|

It fills the ``prefjax.train`` protocol (NAME, HEAD, default_config, batch_kind, reference,
validate_config, objective) and nothing else; ``loop.run`` builds the model, the pairwise data,
the sharded state, checkpoints and metrics for it without knowing its name.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from prefjax.train import common, dpo, loop
from prefjax.train import config as train_config
from tests.train.test_loop import records, tiny_config


class SLiC:
    NAME, HEAD = "slic", "lm"

    @staticmethod
    def default_config():
        algo = ml_collections.ConfigDict()
        algo.name, algo.loss = "slic", "slic"
        algo.delta = 1.0  # the hinge's margin, in nats of log-likelihood
        algo.reg_weight = 0.1  # weight of the chosen response's NLL per token
        return algo

    @staticmethod
    def batch_kind(config):
        return "pairwise"

    @staticmethod
    def reference(config):
        return "none"

    @staticmethod
    def validate_config(config):
        if not config.algorithm.delta > 0:
            raise ValueError(f"config.algorithm.delta={config.algorithm.delta}: must be > 0")

    @staticmethod
    def objective(model, config):
        delta, reg = config.algorithm.delta, config.algorithm.reg_weight

        def loss(params, batch, frozen, key, denominators):
            tokens = (common.flatten_responses(batch[n]) for n in common.TOKENS)
            logps, counts = common.response_logps(model, params, *tokens)  # [2 * batch]
            logps, counts = (
                common.unflatten_responses(logps, 2),
                common.unflatten_responses(counts, 2),
            )
            chosen, rejected = logps[:, 0], logps[:, 1]
            w = common.example_weights(batch)
            hinge = jax.nn.relu(delta - chosen + rejected)
            nll = -chosen / jnp.maximum(counts[:, 0], 1.0)
            stats = {
                "hinge": (jnp.sum(w * hinge), jnp.sum(w)),
                "rewards/accuracy": (jnp.sum(w * (chosen > rejected)), jnp.sum(w)),
            }
            return jnp.sum(w * (hinge + reg * nll)) / denominators["loss"], stats

        denominators = lambda batch: {"loss": jnp.maximum(common.example_weights(batch).sum(), 1.0)}
        return common.Objective(loss, denominators)


def slic_config(**changes):
    config = tiny_config(**changes)
    with config.unlocked():
        config.algorithm = SLiC.default_config()
    return config


def test_slic_trains_through_the_unchanged_loop(tmp_path):
    config = slic_config(**{"train.num_steps": 30, "train.log_every": 10, "train.eval_every": 30})
    result = loop.run(config, str(tmp_path), SLiC)
    assert result.status == "finished" and result.step == 30
    evals = [r for r in records(str(tmp_path)) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30]
    # It learns on held-out pairs: the objective falls by more than half a nat (4.45 -> 3.15
    # measured), the hinge with it, and chosen responses are ranked above rejected no less often.
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5
    assert evals[-1]["eval/hinge"] < evals[0]["eval/hinge"] - 0.2
    assert evals[-1]["eval/rewards/accuracy"] >= evals[0]["eval/rewards/accuracy"]
    train = [r for r in records(str(tmp_path)) if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) for r in train) and len(train) == 3
    # Resuming and the workdir identity work for it as for the built-in algorithms.
    assert loop.run(config, str(tmp_path), SLiC).step == 30


def test_the_protocol_validates_the_algorithm_fields():
    config = slic_config()
    config.algorithm.delta = -1.0
    with pytest.raises(train_config.ConfigError, match=r"config\.algorithm\.delta=-1\.0: must be"):
        train_config.validate(config, 8, algorithm=SLiC)
    with pytest.raises(train_config.ConfigError, match=r"config\.algorithm\.name='slic'"):
        train_config.validate(slic_config(), 8, algorithm=dpo)


def test_derived_values_come_from_the_algorithm():
    d = train_config.derived(slic_config(), 8, "/tmp/x", algorithm=SLiC)
    assert (d.head, d.batch_kind, d.reference, d.uses_reference) == (
        "lm",
        "pairwise",
        "none",
        False,
    )


def test_the_algorithm_config_is_validated_once_per_run(tmp_path, monkeypatch):
    calls = []
    real = dpo.validate_config
    monkeypatch.setattr(dpo, "validate_config", lambda config: calls.append(1) or real(config))
    config = tiny_config(**{"train.num_steps": 1, "train.log_every": 1})
    assert loop.run(config, str(tmp_path), dpo).step == 1
    assert len(calls) == 1
