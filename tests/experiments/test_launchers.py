"""Launcher smoke tests: each ``experiments/<algo>.py`` runs its ``:tiny`` preset end to end
in-process with absl flags, and bad flags fail naming the field."""

import importlib
import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import flags

from experiments import launch as launch_module
from experiments.configs import common, dpo, reward_model, sft
from prefjax import models
from prefjax.train import evaluation

# Small enough to run in seconds; everything else is the launcher's own default.
SMALL = [
    "--config.train.num_steps=4",
    "--config.train.log_every=2",
    "--config.train.eval_every=2",
    "--config.optimizer.warmup_steps=1",
    "--config.data.num_train=64",
    "--config.data.num_eval=16",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=16",
    "--config.eval.num_prompts=8",
    "--config.eval.num_samples=8",
    "--config.eval.max_new_tokens=4",
    "--config.checkpoint.every=2",
    "--config.logging.progress=False",
]


@pytest.fixture(autouse=True)
def _compilation_cache(tmp_path_factory):
    old_dir, old_argv = jax.config.jax_compilation_cache_dir, list(sys.argv)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "xla_cache")
    yield
    os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    jax.config.update("jax_compilation_cache_dir", old_dir)
    sys.argv = old_argv


def launch(module_name, argv):
    """Imports a launcher with fresh flags, parses ``argv`` and calls its ``main``.

    ``DEFINE_config_file`` discovers ``--config.*`` overrides in ``sys.argv`` when the flag is
    defined, so ``sys.argv`` is set before (re)importing the launcher, as on the command line.
    """
    sys.argv = ["prog", *argv]
    stale = [n for n in flags.FLAGS if n in ("config", "workdir") or n.startswith("config.")]
    flags.FLAGS.remove_flag_values(stale)
    flags.FLAGS.unparse_flags()  # flags an earlier call set (--debug) return to their defaults
    if module_name in sys.modules:
        module = importlib.reload(sys.modules[module_name])  # defines --config / --workdir again
    else:
        module = importlib.import_module(module_name)
    remaining = flags.FLAGS(sys.argv)
    return module.main(remaining)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module_name, extra",
    [
        ("experiments.dpo", ["--config.sft_warmup.num_steps=2"]),
        ("experiments.sft", ["--config.export.hf=True"]),
        ("experiments.reward_model", []),
    ],
    ids=["dpo", "sft", "reward_model"],
)
def test_launcher_runs_tiny_preset_end_to_end(module_name, extra, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    argv = [f"--workdir={workdir}", *SMALL, *extra]
    assert launch(module_name, argv) is None  # exit status 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert "eval/loss" in evals[-1]
    if module_name != "experiments.sft":
        assert 0.0 <= evals[-1]["eval/rewards/accuracy"] <= 1.0
    if module_name != "experiments.reward_model":  # policies are scored by the gold reward
        assert 0.0 <= evals[-1]["eval/gold_reward"] <= 1.0
    if module_name == "experiments.dpo":
        assert os.path.exists(os.path.join(workdir, "sft_warmup", "checkpoints", "2"))
        assert evals[0]["eval/kl"] == 0.0  # policy == reference before the first step
        assert abs(evals[-1]["eval/kl"]) < 1.0  # sampled KL after 4 small steps
        # The entropy is an eval metric (algorithm.train_entropy is off), which the release
        # gate's entropy check reads.
        vocab = models.preset("tiny").vocab_size
        assert all(0.0 < r["eval/entropy/response"] < np.log(vocab) for r in evals)
        assert not any("entropy/response" in r for r in recs if r["split"] == "train")
        check = evaluation.release_gate(recs).check("entropy")
        assert check.keys == ("eval/entropy/response",) and check.status != "n/a"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    if "--config.export.hf=True" in extra:  # the policy as a Hugging Face folder
        exported = json.load(open(os.path.join(workdir, "hf_model", "config.json")))
        assert exported["hidden_size"] == 64  # the tiny preset
        assert os.path.exists(os.path.join(workdir, "hf_model", "model.safetensors"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["num_steps"] == 4
    if module_name == "experiments.dpo":
        assert_taken_workdir_refused_and_finished_run_rerun(workdir, argv, capsys)


def assert_taken_workdir_refused_and_finished_run_rerun(workdir, argv, capsys):
    """On the finished DPO run: another launcher, or the same one with another config, is refused
    (exit 2); the same command again trains nothing and exits 0."""
    with pytest.raises(launch_module.LaunchError, match=r"holds a 'dpo' run") as err:
        launch("experiments.reward_model", [f"--workdir={workdir}", *SMALL])
    assert err.value.code == launch_module.EXIT_REFUSED
    with pytest.raises(launch_module.LaunchError, match=r"'sigmoid' -> 'ipo'") as err:
        launch("experiments.dpo", [*argv, "--config.algorithm.loss=ipo"])
    assert err.value.code == launch_module.EXIT_REFUSED
    capsys.readouterr()
    assert launch("experiments.dpo", argv) is None  # the same command: finished, exit 0
    assert "already finished at step 4" in capsys.readouterr().out


def test_misspelt_override_is_an_error():
    # ml_collections rejects it while reading the command line; the launcher names the nearest
    # field in one line and exits 2.
    with pytest.raises(
        launch_module.LaunchError, match=r"did you mean --config\.train\.num_steps"
    ) as e:
        launch("experiments.dpo", ["--config.train.num_stpes=3"])
    assert e.value.code == launch_module.EXIT_REFUSED


def test_invalid_mesh_names_the_field(tmp_path):
    # 8 simulated devices: fsdp=3 cannot divide them.
    with pytest.raises(launch_module.LaunchError, match=r"config\.mesh\.fsdp=3") as e:
        launch("experiments.dpo", [f"--workdir={tmp_path}", "--config.mesh.fsdp=3"])
    assert e.value.code == launch_module.EXIT_REFUSED


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mesh.tensor", 0, r"config\.mesh\.tensor=0: mesh sizes must be positive"),
        ("algorithm.loss", "dpoo", r"config\.algorithm\.loss='dpoo': expected one of"),
        ("algorithm.reference", "lora_base", r"config\.algorithm\.reference='lora_base'"),
        ("data.max_prompt_len", 40, r"config\.data\.max_prompt_len=40: must be < data\.max_len"),
        ("optimizer.grad_accum_steps", 3, r"config\.optimizer\.grad_accum_steps=3: must divide"),
        ("train.nonfinite", "ignore", r"config\.train\.nonfinite='ignore'"),
        ("data.task", "files", r"config\.data\.train_files='': is required"),
        ("data.batch_size", 12, r"config\.data\.batch_size=12: the micro-batch of 12"),
        # The default is RPO (rpo_alpha=1), a pairwise-loss term: KTO must turn it off.
        ("algorithm.loss", "kto", r"config\.algorithm\.rpo_alpha=1\.0: .*rpo_alpha=0"),
    ],
    ids=lambda x: x if isinstance(x, str) and "." in x and " " not in x and "\\" not in x else "",
)
def test_validation_names_the_field(field, value, message):
    config = dpo.get_config()
    parent, leaf = field.rsplit(".", 1)
    config[parent.split(".")[0]][leaf] = value
    with pytest.raises(common.ConfigError, match=message):
        common.validate(config, num_devices=8)


def test_presets_and_derived_values():
    for module in (dpo, sft, reward_model):
        config = module.get_config()
        common.validate(config, num_devices=8)
        d = common.derived(config, num_devices=8, workdir="/tmp/x")
        assert d.mesh_shape == (8, 1, 1) and d.batch_shards == 8
        assert config.mesh.data == -1  # derived values never written back
        big = module.get_config("llama1b")
        assert big.model.preset == "llama1b" and big.data.task == "files"
        assert common.derived(big, num_devices=8).mesh_shape == (1, 8, 1)
    assert common.derived(reward_model.get_config(), 8).head == "reward"
    with pytest.raises(common.ConfigError, match="preset 'huge'"):
        dpo.get_config("huge")


@pytest.mark.slow
def test_dpo_launcher_trains_from_local_jsonl_files(tmp_path):
    """The ``files`` task: JSONL -> validation -> prompt-grouped split -> SFT warm-up -> DPO."""
    from prefjax.data import RepeatTask, read_records, write_jsonl

    path = tmp_path / "prefs.jsonl"
    unique = {}  # sampled pairs repeat; a file with duplicate pairs fails validation
    for r in RepeatTask().pairwise_records(200, seed=0):
        unique.setdefault((r["prompt"], r["chosen"], r["rejected"]), r)
    write_jsonl(str(path), list(unique.values())[:96])
    workdir = str(tmp_path / "run")
    argv = [f"--workdir={workdir}", *SMALL, "--config.data.task=files"]
    # A short SFT warm-up on the file's chosen responses, then DPO.
    argv += [f"--config.data.train_files={path}", "--config.sft_warmup.num_steps=2"]
    assert launch("experiments.dpo", argv) is None
    assert os.path.isdir(os.path.join(workdir, "sft_warmup"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if '"eval"' in line]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert 0.0 <= evals[-1]["eval/rewards/accuracy"] <= 1.0

    # Eval files that share a prompt with the train files are refused, naming both fields.
    rows = [dict(r.data) if hasattr(r, "data") else dict(r) for r in read_records(str(path))]
    leaky = tmp_path / "eval.jsonl"
    write_jsonl(str(leaky), rows[:8])
    argv = [f"--workdir={tmp_path / 'run2'}", *SMALL, "--config.data.task=files"]
    argv += [f"--config.data.train_files={path}", f"--config.data.eval_files={leaky}"]
    argv += ["--config.sft_warmup.num_steps=0"]
    with pytest.raises(
        launch_module.LaunchError, match=r"config\.data\.eval_files=.*shares prompts"
    ):
        launch("experiments.dpo", argv)
