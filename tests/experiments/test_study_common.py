import contextlib
import csv
import os
import sys

import jax
import numpy as np
import pytest

from experiments.studies import common


@contextlib.contextmanager
def compilation_cache(tmp_path_factory):
    """The session's persistent compilation cache (as ``tests/experiments/test_launchers.py``'s
    ``_compilation_cache`` fixture sets it) for a module-scoped study run: later launcher and
    study tests reuse what it compiled."""
    old_dir, old_argv = jax.config.jax_compilation_cache_dir, list(sys.argv)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "xla_cache")
    try:
        yield
    finally:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
        jax.config.update("jax_compilation_cache_dir", old_dir)
        sys.argv = old_argv


def test_table_round_trips_and_csv_has_the_union_of_columns(tmp_path):
    rows = [{"method": "dpo", "kl": np.float32(0.5)}, {"method": "ppo", "gold": 0.25}]
    jsonl, path = common.write_table(str(tmp_path), "points", rows)
    assert common.read_table(jsonl) == [
        {"method": "dpo", "kl": 0.5},
        {"method": "ppo", "gold": 0.25},
    ]
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert got == [
        {"method": "dpo", "kl": "0.5", "gold": ""},
        {"method": "ppo", "kl": "", "gold": "0.25"},
    ]


def test_mean_stderr_by_hand():
    mean, se = common.mean_stderr([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    # std(ddof=1) = sqrt(((−2)² + (−1)² + 3²) / 2) = sqrt(7); / sqrt(3)
    assert se == pytest.approx(np.sqrt(7.0) / np.sqrt(3.0))
    assert common.mean_stderr([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        common.mean_stderr([])


def test_summary_has_title_and_sections(tmp_path):
    path = common.write_summary(
        str(tmp_path), "T", [("A", common.markdown_table([{"x": 0.5}], ["x"]))]
    )
    text = open(path).read()
    assert text.startswith("# T\n") and "## A" in text and "| 0.500 |" in text
