"""Build the notebooks: percent-format ``.py`` sources -> executed ``.ipynb`` with outputs.

The ``NN_topic.py`` files (jupytext percent format) are the source of truth; the ``.ipynb`` files
beside them are generated from them, executed top to bottom in a fresh ``python3`` kernel, and
committed with their outputs so they read well on GitHub. Usage, from the repository root::

    python notebooks/build.py              # convert + execute all, rewrite every .ipynb
    python notebooks/build.py 03 05        # only the notebooks whose names start with 03 / 05
    python notebooks/build.py --check      # no execution: fail if an .ipynb is out of sync

``tests/test_notebooks.py`` imports :func:`execute` and :func:`out_of_sync` from here, so the test
suite runs exactly what this script runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
# Per-cell limit; every notebook is meant to run in well under 30 s on 2 CPU cores.
CELL_TIMEOUT_S = 300


def sources() -> list[pathlib.Path]:
    """The notebook sources, ``NN_topic.py``, in order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def kernel_env() -> dict[str, str]:
    """Environment for the kernel: CPU JAX and the inline matplotlib backend (figures as PNG)."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def read_source(path: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook of a percent-format ``.py`` file (no outputs)."""
    nb = jupytext.read(path, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: a rebuild changes only what really changed
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def execute(path: pathlib.Path) -> tuple[nbformat.NotebookNode, float]:
    """Execute the notebook of ``path`` (a ``.py`` source) in a fresh kernel.

    Returns the executed notebook and the wall time in seconds, kernel start-up included. A cell
    that raises makes nbclient raise ``CellExecutionError`` naming the cell and the traceback.
    """
    nb = read_source(path)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute(env=kernel_env())
    return nb, time.perf_counter() - start


def cell_signature(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """What must agree between a ``.py`` source and its ``.ipynb``: cell types and sources."""
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def out_of_sync(path: pathlib.Path) -> str | None:
    """``None`` if ``path``'s ``.ipynb`` has the same cells as the ``.py``, else a message."""
    ipynb = path.with_suffix(".ipynb")
    if not ipynb.exists():
        return f"{ipynb.name} is missing: run `python notebooks/build.py {path.stem[:2]}`"
    want = cell_signature(read_source(path))
    have = cell_signature(nbformat.read(ipynb, as_version=4))
    if want == have:
        return None
    if len(want) != len(have):
        where = f"{len(have)} cells in {ipynb.name}, {len(want)} in {path.name}"
    else:
        first = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
        where = f"cell {first} differs"
    return f"{ipynb.name} is out of sync with {path.name} ({where}): run notebooks/build.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="name prefixes to build, e.g. 03")
    parser.add_argument("--check", action="store_true", help="only check .ipynb/.py sync")
    args = parser.parse_args(argv)
    paths = [p for p in sources() if not args.only or p.name.startswith(tuple(args.only))]
    if not paths:
        parser.error(f"no notebook source matches {args.only}")
    if args.check:
        problems = [msg for p in paths if (msg := out_of_sync(p))]
        print("\n".join(problems) or f"{len(paths)} notebooks in sync")
        return 1 if problems else 0
    total = 0.0
    for path in paths:
        nb, seconds = execute(path)
        total += seconds
        nbformat.write(nb, path.with_suffix(".ipynb"))
        print(f"{path.stem:32s} {seconds:6.1f} s", flush=True)
    print(f"{'total':32s} {total:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
