"""The import graph keeps DESIGN.md's one-way layers (the import-linter contract in pyproject.toml):
experiments -> prefjax.train -> prefjax.rollout -> prefjax.models | data | losses | sharding ->
prefjax.tokenizer, the siblings of a layer independent of each other."""

import os
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
