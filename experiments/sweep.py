r"""Sweep launcher: ``python -m experiments.sweep [--config=...:preset] [--workdir=...]``.

Trains the members of ``config.sweep`` (betas, label smoothings, learning rates, seeds) in one
compiled step after one shared SFT warm-up; see ``experiments/configs/sweep.py``.
"""

from absl import app

from experiments import launch, pipelines
from prefjax.train import sweep

launch.define_config_flag("sweep")  # --config, --config.*, --workdir


def run(config, workdir: str, **kwargs) -> sweep.SweepResult:
    """The SFT warm-up once (when ``config.sft_warmup.num_steps > 0``), then every member."""
    warm = "sft_warmup" in config and config.sft_warmup.num_steps > 0
    init = pipelines.sft_warmup(config) if warm else None
    return sweep.run(config, workdir, init_params=init, **kwargs)


main = launch.absl_main(run)


if __name__ == "__main__":
    app.run(main)
