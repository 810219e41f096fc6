"""What every launcher does around ``prefjax.train.<algo>.run``: start-up, devices, validation."""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from experiments.configs import common
from prefjax import sharding
from prefjax.train import loop

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(name: str) -> str:
    """The default ``--config`` of a launcher: ``experiments/configs/<name>.py``."""
    return os.path.join(CONFIG_DIR, f"{name}.py")


def main(config, workdir: str | None, run_fn):
    """Initialises (multi-host when asked), logs devices, validates, runs; returns the result.

    Config errors become ``app.UsageError`` (the message names the field); a run stopped on a
    non-finite loss exits with status 1 and the step and metric in the message.
    """
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(
        "~/.cache/prefjax/jax_cache"
    )
    # Compiled steps are cached on disk: a resumed or repeated run skips most compilation.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sharding.initialize_distributed(config)
    workdir = os.path.abspath(workdir or config.workdir_default)
    if jax.process_index() == 0:
        devices = jax.devices()
        print(
            f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} devices "
            f"({devices[0].device_kind}), process {jax.process_index()} of "
            f"{jax.process_count()}",
            flush=True,
        )
        print(f"workdir: {workdir}", flush=True)
    logging.info("config:\n%s", config)
    try:
        common.validate(config, jax.device_count())
    except common.ConfigError as err:
        raise app.UsageError(str(err)) from err
    try:
        return run_fn(config, workdir)
    except loop.NonFiniteError as err:
        raise SystemExit(f"error: {err}") from err
