r"""DPO-family launcher: ``python -m experiments.dpo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (tiny model, built-in sequence task, CPU, about a
minute or two); see ``experiments/configs/dpo.py`` for what it prints and what "learned" means.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import launch
from prefjax.train import dpo

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", launch.config_path("dpo"), "Training config (file.py:preset).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir_default).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    launch.main(FLAGS.config, FLAGS.workdir, dpo.run)


if __name__ == "__main__":
    app.run(main)
