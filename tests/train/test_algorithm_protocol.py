"""An algorithm written only in this test trains through the unchanged loop.

``SLiC`` is SLiC-HF's calibration loss (Zhao et al., 2023, "SLiC-HF", Eq. 1 with the
cross-entropy regulariser on the chosen response), reference-free:

    L = max(0, delta - log pi(y_w | x) + log pi(y_l | x)) - reg_weight * log pi(y_w | x) / |y_w|

It fills the ``prefjax.train`` protocol (NAME, HEAD, batch_kind, uses_reference,
validate_config, setup) and nothing else; ``loop.run`` builds the model, the pairwise data, the
sharded state, checkpoints and metrics for it without knowing its name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.train import common, dpo, loop
from prefjax.train import config as train_config
from prefjax.train import setup as train_setup
from tests.train.test_loop import records, tiny_config


class SLiC:
    NAME, HEAD = "slic", "lm"

    @staticmethod
    def batch_kind(config):
        return "pairwise"

    @staticmethod
    def uses_reference(config):
        return False

    @staticmethod
    def validate_config(config):
        if not config.algorithm.delta > 0:
            raise ValueError(f"config.algorithm.delta={config.algorithm.delta}: must be > 0")

    @staticmethod
    def setup(config, model, mesh, key):
        delta, reg = float(config.algorithm.delta), float(config.algorithm.reg_weight)

        def loss_fn(params, batch, frozen, key, den):
            pair = lambda n: jnp.concatenate([batch[f"chosen_{n}"], batch[f"rejected_{n}"]])
            logps, counts = common.response_logps(
                model, params, pair("input_ids"), pair("attention_mask"), pair("loss_mask")
            )
            chosen, rejected = jnp.split(logps, 2)  # [2 * batch] -> 2 x [batch]
            w = batch.get("example_mask", jnp.ones_like(chosen)).astype(jnp.float32)
            hinge = jax.nn.relu(delta - chosen + rejected)
            nll = -chosen / jnp.maximum(jnp.split(counts, 2)[0], 1.0)
            sums = {
                "hinge": jnp.sum(w * hinge),
                "rewards/accuracy": jnp.sum(w * (chosen > rejected)),
            }
            return jnp.sum(w * (hinge + reg * nll)) / den["pairs"], sums

        def denominators(batch):
            rows = batch["chosen_input_ids"].shape[0]
            return {"pairs": jnp.maximum(batch.get("example_mask", jnp.ones(rows)).sum(), 1.0)}

        finalize = lambda sums, den: {k: v / den["pairs"] for k, v in sums.items()}

        def make_train(model, config, *, mesh=None, schedule=None):
            return common.make_update(
                loss_fn, denominators, finalize, num_micro=1, schedule=schedule
            )

        def make_eval(model, config):
            def eval_step(params, batch, frozen):
                den = denominators(batch)
                loss, sums = loss_fn(params, batch, frozen, None, {"pairs": 1.0})
                return {"loss": (loss, den["pairs"])} | {
                    k: (v, den["pairs"]) for k, v in sums.items()
                }

            return eval_step

        return train_setup.build_setup(
            config, model, mesh, key, make_train, make_eval, needs_frozen_copy=False
        )


def slic_config(**changes):
    config = tiny_config(**{"algorithm.reference": "none", "algorithm.rpo_alpha": 0.0, **changes})
    with config.unlocked():
        config.algorithm.name = "slic"
        config.algorithm.loss = "slic"
        config.algorithm.delta = 1.0  # the hinge's margin in nats of log-likelihood
        config.algorithm.reg_weight = 0.1  # weight of the chosen response's NLL per token
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
    assert (d.head, d.batch_kind, d.uses_reference) == ("lm", "pairwise", False)
