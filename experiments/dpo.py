r"""DPO-family launcher: ``python -m experiments.dpo [--config=...:preset] [--workdir=...]``.

With no flags it runs the embedded default (tiny model, built-in sequence task, CPU, about a
minute or two); see ``experiments/configs/dpo.py`` for what it prints and what "learned" means.
"""

from absl import app

from experiments import launch, pipelines

launch.define_config_flag("dpo")  # --config, --config.*, --workdir


main = launch.absl_main(pipelines.sft_then_dpo)


if __name__ == "__main__":
    app.run(main)
