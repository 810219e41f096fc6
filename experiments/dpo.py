r"""DPO-family launcher: ``python -m experiments.dpo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (tiny model, built-in sequence task, CPU, about a
minute or two); see ``experiments/configs/dpo.py`` for what it prints and what "learned" means.
"""

from absl import app, flags

from experiments import launch, pipelines

FLAGS = flags.FLAGS
launch.define_config_flag("dpo")  # --config, --config.*, --workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    launch.main(FLAGS.config, FLAGS.workdir, pipelines.sft_then_dpo)


if __name__ == "__main__":
    app.run(main)
