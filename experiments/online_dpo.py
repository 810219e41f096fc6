r"""Online DPO launcher: ``python -m experiments.online_dpo [--config=...:preset]``.

With no flags it runs the embedded default (SFT warm-up, then online DPO on the built-in sequence
task with its gold reward, on the CPU); see ``experiments/configs/online_dpo.py`` and
docs/online.md.
"""

from absl import app

from experiments import launch, pipelines
from prefjax.train import online_dpo

launch.define_config_flag("online_dpo")  # --config, --config.*, --workdir


main = launch.absl_main(pipelines.sft_then(online_dpo))


if __name__ == "__main__":
    app.run(main)
