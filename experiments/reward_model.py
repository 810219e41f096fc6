r"""Reward-model launcher: ``python -m experiments.reward_model [--config=...] [--workdir=...]``.

With no flags it runs the embedded default (tiny model, built-in sequence task, CPU, about a
minute); see ``experiments/configs/reward_model.py`` for what it prints and what "learned" means.
"""

from absl import app

from experiments import launch
from prefjax.train import reward

launch.define_config_flag("reward_model")  # --config, --config.*, --workdir


main = launch.absl_main(reward.run)


if __name__ == "__main__":
    app.run(main)
