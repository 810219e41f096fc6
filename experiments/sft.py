r"""SFT launcher: ``python -m experiments.sft [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (tiny model, built-in sequence task, CPU, about a
minute); see ``experiments/configs/sft.py`` for what it prints and what "learned" means.
"""

from absl import app, flags

from experiments import launch
from prefjax.train import sft

FLAGS = flags.FLAGS
launch.define_config_flag("sft")  # --config, --config.*, --workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    launch.main(FLAGS.config, FLAGS.workdir, sft.run)


if __name__ == "__main__":
    app.run(main)
