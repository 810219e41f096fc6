"""The import graph keeps DESIGN.md's one-way layers (the import-linter contract in pyproject.toml):
experiments -> prefjax.train -> prefjax.rollout -> prefjax.models | data | losses | sharding ->
prefjax.tokenizer, the siblings of a layer independent of each other."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports(*args, cwd=ROOT):
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or "lint-imports"
    return subprocess.run(
        [exe, "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_layering_contract_is_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_contract_catches_an_upward_import(tmp_path):
    # The same contract on a copy of the tree with one upward import added must break.
    for name in ("prefjax", "experiments"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    with open(tmp_path / "prefjax" / "losses" / "kl.py", "a") as f:
        f.write("\nimport prefjax.train.loop  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or "lint-imports"
    result = subprocess.run(
        [exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert "prefjax.losses.kl -> prefjax.train.loop" in result.stdout


# Imports allowed inside functions in prefjax/: optional or heavy dependencies that only some runs
# use, each imported where it is used. Anything else goes at the top of its module.
LAZY_IMPORTS = {
    "tensorflow_datasets": "TFDS folders only; importing it loads much of TensorFlow's tooling",
    "matplotlib": "the end-of-run curves only (logging.plot); slow to import",
    "tensorboardX": "TensorBoard event files only (logging.tensorboard); imports protobuf",
    "pyarrow": "Parquet files only; a large native library",
}


def _imports_inside_functions(path):
    import ast

    tree = ast.parse(open(path).read(), path)
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_no_imports_inside_functions_but_the_listed_lazy_ones():
    bad, used = [], set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "prefjax")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            for lineno, module in _imports_inside_functions(path):
                top = module.split(".")[0]
                if top in LAZY_IMPORTS:
                    used.add(top)
                else:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{lineno}: import {module}")
    assert not bad, "imports inside functions (move them to the top):\n" + "\n".join(bad)
    assert used == set(LAZY_IMPORTS), (
        f"listed but never imported lazily: {set(LAZY_IMPORTS) - used}"
    )


def test_configs_are_read_as_attributes_not_string_paths():
    """No ``get(config, "a.b", default)`` getters: a default there could disagree with the
    field's one definition (``default_config()`` / ``base_config``)."""
    pattern = re.compile(r"\bget\(\s*config\s*,\s*[\"']")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "prefjax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{number}")
    assert not offenders, offenders
