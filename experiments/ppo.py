r"""PPO launcher: ``python -m experiments.ppo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (SFT warm-up, then PPO on the built-in sequence task
with its gold reward, on the CPU); see ``experiments/configs/ppo.py`` and docs/online.md. The
``:rm`` preset (``config.pipeline.name="sft_rm_ppo"``) runs SFT -> reward model -> PPO instead
(:func:`experiments.pipelines.sft_rm_ppo`).
"""

from absl import app, flags

from experiments import launch, pipelines
from prefjax.train import ppo

FLAGS = flags.FLAGS
launch.define_config_flag("ppo")  # --config, --config.*, --workdir
# config.pipeline.name -> what the launcher runs.
PIPELINES = {"sft_ppo": pipelines.sft_then(ppo), "sft_rm_ppo": pipelines.sft_rm_ppo}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    name = FLAGS.config.pipeline.name
    if name not in PIPELINES:
        raise launch.fail(
            f"error: config.pipeline.name={name!r}: expected one of {sorted(PIPELINES)}",
            launch.EXIT_REFUSED,
        )
    launch.main(FLAGS.config, FLAGS.workdir, PIPELINES[name])


if __name__ == "__main__":
    app.run(main)
