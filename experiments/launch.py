"""What every launcher does around ``prefjax.train.<algo>.run``: start-up, devices, validation,
errors as one line, and exit statuses a scheduler can read.

Exit statuses (docs/training.md, "Exit statuses"):

======  =========================================================================================
0       finished: the run reached ``train.num_steps`` (or had already)
1       failed: a non-finite step under ``train.nonfinite="stop"``, or an unexpected error (a bug:
        its traceback is printed)
2       refused: an invalid config field, a malformed data row, or a workdir that belongs to
        another run or would mix two configs; nothing was trained, and a workdir this
        invocation created is removed
75      preempted: SIGTERM/SIGINT, a checkpoint was written; run the same command to resume
        (75 is ``EX_TEMPFAIL`` of sysexits.h, "try again later")
======  =========================================================================================

Config, data and workdir errors print one line (``error: config.mesh.fsdp=3: ...``,
``error: prefs.jsonl:17: field 'rejected': missing``); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from prefjax import data as pdata
from prefjax import sharding
from prefjax.train import loop
from prefjax.train.errors import ConfigError
from prefjax.train.workdir import WorkdirError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_PREEMPTED = 75

flags.DEFINE_bool(
    "debug", False, "Print the full traceback of config, data and workdir errors too."
)

# The errors that mean "your input is wrong": one line each, exit status 2.
INPUT_ERRORS = (ConfigError, pdata.DataError, WorkdirError)


class LaunchError(SystemExit):
    """A launcher's exit with a status (``code``) and the one-line ``message`` it printed."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str, code: int) -> LaunchError:
    """Prints ``message`` to stderr and returns the :class:`LaunchError` to raise."""
    if message:
        print(message, file=sys.stderr, flush=True)
    return LaunchError(message, code)


def config_path(name: str) -> str:
    """The default ``--config`` of a launcher: ``experiments/configs/<name>.py``."""
    return os.path.join(CONFIG_DIR, f"{name}.py")


def _debug() -> bool:
    return "--debug" in sys.argv or (flags.FLAGS.is_parsed() and flags.FLAGS.debug)


def define_config_flag(name: str) -> None:
    """``--config`` (``experiments/configs/<name>.py`` by default) and its ``--config.*``
    overrides, locked. ml_collections reads the overrides while the flag is defined; a
    misspelt one becomes a one-line error naming the nearest valid field."""
    try:
        config_flags.DEFINE_config_file(
            "config", config_path(name), "Training config (file.py:preset).", lock_config=True
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        if _debug():
            raise
        raise fail(_override_message(name, err), EXIT_REFUSED) from None
    flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir_default).")


def _override_message(name: str, err: Exception) -> str:
    """``error: --config.train.num_stpes: ... (did you mean --config.train.num_steps?)``"""
    detail = str(err).strip("'\"").replace("\\n", " ").splitlines()[0]
    try:
        config = _load_config(name)
    except Exception:  # the config file itself is broken: the original message is all we have
        return f"error: --config: {detail}"
    fields = _field_paths(config.to_dict())
    for arg in sys.argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        if path in fields:
            continue
        near = difflib.get_close_matches(path, sorted(fields), n=1, cutoff=0.6)
        hint = f" (did you mean --config.{near[0]}?)" if near else ""
        return f"error: --config.{path}: the config has no such field{hint}"
    return f"error: --config: {detail}"


def _load_config(name: str):
    """The config the command line names (``--config=file.py:preset``), before overrides."""
    spec, arg = config_path(name), None
    for i, a in enumerate(sys.argv[1:], start=1):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(sys.argv):
            spec = sys.argv[i + 1]
    if ":" in spec:
        spec, arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_prefjax_cli_config", spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _field_paths(tree: dict, prefix: str = "") -> set[str]:
    """Every field and every block of a config, as dotted paths."""
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _field_paths(value, f"{prefix}{key}.")
    return out


def _is_input_error(err: BaseException) -> bool:
    # Errors raised with the "config.<field>" convention by the library (files, init_from, ...).
    return isinstance(err, INPUT_ERRORS) or (
        isinstance(err, (ValueError, OSError)) and str(err).startswith("config.")
    )


def main(config, workdir: str | None, run_fn):
    """Initialises (multi-host when asked), logs devices, validates, runs; returns the result.

    Raises :class:`LaunchError` (a ``SystemExit``) with the statuses in the module docstring:
    2 for config/data/workdir errors (one line; the traceback with ``--debug``), 1 for a run
    stopped on a non-finite loss, 75 for a preempted run.
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
        result = run_fn(config, workdir)  # validates the config first thing
    except loop.NonFiniteError as err:
        if _debug():
            raise
        raise fail(f"error: {err}", EXIT_FAILED) from None
    except Exception as err:
        if not _is_input_error(err) or _debug():
            raise
        hint = "" if isinstance(err, WorkdirError) else "  (--debug shows the traceback)"
        raise fail(f"error: {err}{hint}", EXIT_REFUSED) from None
    if result.status == "preempted":
        raise LaunchError("", EXIT_PREEMPTED)
    return result


def absl_main(run_fn):
    """A launcher's ``main(argv)`` for ``app.run``: refuses positional arguments, then runs
    ``run_fn(config, workdir)`` through :func:`main` with ``--config`` and ``--workdir``."""

    def launcher_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        main(flags.FLAGS.config, flags.FLAGS.workdir, run_fn)

    return launcher_main
