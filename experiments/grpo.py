r"""GRPO / RLOO launcher: ``python -m experiments.grpo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (SFT warm-up, then GRPO on the built-in sequence task
with its gold reward, on the CPU); see ``experiments/configs/grpo.py`` and docs/online.md.
"""

from absl import app

from experiments import launch, pipelines
from prefjax.train import grpo

launch.define_config_flag("grpo")  # --config, --config.*, --workdir


main = launch.absl_main(pipelines.sft_then(grpo))


if __name__ == "__main__":
    app.run(main)
