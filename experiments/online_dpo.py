r"""Online DPO launcher: ``python -m experiments.online_dpo [--config=...:preset]``.

With no flags it runs the embedded default (SFT warm-up, then online DPO on the built-in sequence
task with its gold reward, on the CPU); see ``experiments/configs/online_dpo.py`` and
docs/online.md.
"""

from absl import app, flags

from experiments import launch, pipelines
from prefjax.train import online_dpo

FLAGS = flags.FLAGS
launch.define_config_flag("online_dpo")  # --config, --config.*, --workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    launch.main(FLAGS.config, FLAGS.workdir, pipelines.sft_then(online_dpo))


if __name__ == "__main__":
    app.run(main)
