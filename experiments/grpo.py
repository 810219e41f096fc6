r"""GRPO / RLOO launcher: ``python -m experiments.grpo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (SFT warm-up, then GRPO on the built-in sequence task
with its gold reward, on the CPU); see ``experiments/configs/grpo.py`` and docs/online.md.
"""

from absl import app, flags

from experiments import launch, pipelines
from prefjax.train import grpo

FLAGS = flags.FLAGS
launch.define_config_flag("grpo")  # --config, --config.*, --workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    launch.main(FLAGS.config, FLAGS.workdir, pipelines.sft_then(grpo))


if __name__ == "__main__":
    app.run(main)
