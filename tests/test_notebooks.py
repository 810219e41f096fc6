"""The notebooks run top to bottom, and each committed ``.ipynb`` matches its ``.py`` source.

Every notebook checks its derivations with ``assert``/``np.testing`` against prefjax's own
functions, so executing it is the test: a wrong sign in ``prefjax.losses`` fails a cell, which
fails here with the cell's traceback. Execution goes through ``notebooks/build.py`` (jupytext ->
nbclient, a fresh ``python3`` kernel of this interpreter), the same path that builds the
committed ``.ipynb`` files.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_BUILD = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "build.py"
_spec = importlib.util.spec_from_file_location("notebooks_build", _BUILD)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

SOURCES = build.sources()
# Each notebook is meant to run in under 30 s on 2 CPU cores; this limit only catches a runaway.
TIME_LIMIT_S = 120.0


def test_all_seven_notebooks_exist():
    names = [p.stem for p in SOURCES]
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06", "07"], names


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes(path):
    nb, seconds = build.execute(path)
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert seconds < TIME_LIMIT_S, f"{path.name} took {seconds:.1f} s"


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_in_sync_with_source(path):
    message = build.out_of_sync(path)
    assert message is None, message


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_committed_with_outputs(path):
    """The committed notebook was executed: every code cell ran, none raised."""
    nb = build.nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    not_run = [i for i, cell in enumerate(code) if cell.get("execution_count") is None]
    assert not not_run, f"{path.stem}.ipynb: code cells {not_run} were not executed"
    raised = [
        i
        for i, cell in enumerate(code)
        if any(out.get("output_type") == "error" for out in cell.get("outputs", []))
    ]
    assert not raised, f"{path.stem}.ipynb: code cells {raised} raised"
