"""Declared dependencies are exactly the third-party modules prefjax and its launchers import.

``[project].dependencies`` in pyproject.toml is what ``pip install prefjax`` brings. A module
imported under ``prefjax/`` or ``experiments/`` but not declared works here by accident (some other
package pulled it in) and fails for a user; a declared dependency nothing imports is weight every
user installs for nothing. Imports are collected with ``ast`` from every file, at any depth (imports
inside functions count: ``jinja2`` is imported only when a chat template is compiled).

Distribution names and import names differ (``absl-py`` is imported as ``absl``), so
``IMPORT_NAMES`` spells out, for every declared distribution, the modules it provides;
``test_import_names_match_installed_metadata`` checks that table against the installed packages'
own metadata.
"""

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("prefjax", "experiments")
FIRST_PARTY = {"prefjax", "experiments"}

# Declared distribution (PEP 503 normalised name) -> the module(s) prefjax imports from it. Dotted
# where the top level is a namespace shared with other distributions (``orbax``).
IMPORT_NAMES = {
    "absl-py": ("absl",),
    "chex": ("chex",),
    "einops": ("einops",),
    "flax": ("flax",),
    "grain": ("grain",),
    "jax": ("jax",),
    "jinja2": ("jinja2",),
    "matplotlib": ("matplotlib",),
    "ml-collections": ("ml_collections",),
    "numpy": ("numpy",),
    "optax": ("optax",),
    "orbax-checkpoint": ("orbax.checkpoint",),
    "pyarrow": ("pyarrow",),
    "safetensors": ("safetensors",),
    "tensorboardx": ("tensorboardX",),
    "tensorflow-datasets": ("tensorflow_datasets",),
    "tokenizers": ("tokenizers",),
    "tqdm": ("tqdm",),
}

# Third-party modules that may be imported under prefjax/ or experiments/ without being a
# required dependency: module -> why. Each must be declared in an optional extra of
# pyproject.toml (``[project.optional-dependencies]``), so ``pip install prefjax[extra]`` gets it.
# Empty today: torch and transformers (the ``parity`` extra) are imported only by tests.
ALLOWED_UNDECLARED: dict[str, str] = {}


def _normalise(name: str) -> str:
    """PEP 503 normalised distribution name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement string (``"jax>=0.5,<0.13"`` -> ``jax``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    return _normalise(match.group(1))


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def declared() -> list[str]:
    """Normalised names of ``[project].dependencies``."""
    return [_distribution(r) for r in _pyproject()["project"]["dependencies"]]


def optional_declared() -> set[str]:
    """Normalised names of every ``[project.optional-dependencies]`` extra."""
    extras = _pyproject()["project"].get("optional-dependencies", {})
    return {_distribution(r) for reqs in extras.values() for r in reqs}


def imports_of(source: str) -> list[tuple[int, tuple[str, ...]]]:
    """Absolute imports of a module's source as ``(line, candidates)``, one per imported name.

    ``import a.b`` gives ``("a.b",)``; ``from a import b`` gives ``("a", "a.b")``, since ``b`` may
    be a submodule (``from orbax import checkpoint``) or an attribute of ``a``. Relative imports
    are first-party and skipped.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, (alias.name,)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, (node.module, f"{node.module}.{a.name}")) for a in node.names]
    return found


def third_party_imports() -> list[tuple[str, tuple[str, ...]]]:
    """``(file:line, candidates)`` of every non-stdlib, non-first-party import in SCANNED."""
    out = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, candidates in imports_of(path.read_text()):
                top = candidates[0].split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY:
                    continue
                out.append((f"{path.relative_to(ROOT)}:{line}", candidates))
    return out


def _provides(import_name: str, module: str) -> bool:
    """Whether ``module`` is ``import_name`` or inside it (``jax.numpy`` is inside ``jax``)."""
    return module == import_name or module.startswith(import_name + ".")


def _covered(candidates, import_names) -> bool:
    return any(_provides(n, c) for c in candidates for n in import_names)


def test_every_declared_dependency_has_import_names():
    missing = sorted(set(declared()) - set(IMPORT_NAMES))
    assert not missing, f"add the module(s) each provides to IMPORT_NAMES: {missing}"


def test_every_declared_dependency_is_imported():
    found = third_party_imports()
    unused = [
        dist
        for dist in declared()
        if not any(_covered(c, IMPORT_NAMES.get(dist, ())) for _, c in found)
    ]
    assert not unused, (
        f"declared in pyproject.toml but imported nowhere under {SCANNED}: {unused}; "
        "use them or drop them"
    )


def test_every_third_party_import_is_declared():
    names = [n for dist in declared() for n in IMPORT_NAMES.get(dist, ())]
    undeclared = [
        f"{where} imports {candidates[0]}"
        for where, candidates in third_party_imports()
        if not _covered(candidates, names) and not _covered(candidates, ALLOWED_UNDECLARED)
    ]
    assert not undeclared, (
        "third-party imports missing from pyproject.toml [project].dependencies:\n  "
        + "\n  ".join(undeclared)
    )


def test_allowed_undeclared_are_optional_extras_and_still_imported():
    found = third_party_imports()
    optional = optional_declared()
    packages = importlib.metadata.packages_distributions()
    for module, reason in ALLOWED_UNDECLARED.items():
        assert reason, f"ALLOWED_UNDECLARED[{module!r}] needs a reason"
        assert any(_covered(c, (module,)) for _, c in found), (
            f"ALLOWED_UNDECLARED[{module!r}] is imported nowhere under {SCANNED}; remove it"
        )
        dists = {_normalise(d) for d in packages.get(module.split(".")[0], [module])}
        assert dists & optional, f"{module} is in no [project.optional-dependencies] extra"


def test_import_names_match_installed_metadata():
    """``IMPORT_NAMES`` agrees with what each installed distribution says it provides."""
    packages = importlib.metadata.packages_distributions()  # top-level module -> distributions
    checked = 0
    for dist in declared():
        for name in IMPORT_NAMES.get(dist, ()):
            providers = packages.get(name.split(".")[0])
            if providers is None:
                continue  # not installed here (or a distribution without file metadata)
            assert dist in {_normalise(p) for p in providers}, (
                f"IMPORT_NAMES[{dist!r}] has {name!r}, which is provided by {providers}"
            )
            checked += 1
    if not checked:
        pytest.skip("no declared dependency is installed")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import a.b as c", [(1, ("a.b",))]),
        ("from orbax import checkpoint", [(1, ("orbax", "orbax.checkpoint"))]),
        ("def f():\n    import jinja2\n", [(2, ("jinja2",))]),
        ("try:\n    import x\nexcept ImportError:\n    pass\n", [(2, ("x",))]),
        ("from . import sibling\nfrom .pkg import y", []),
    ],
    ids=["dotted", "from-submodule", "inside-function", "inside-try", "relative"],
)
def test_imports_of(source, expected):
    assert imports_of(source) == expected


def test_coverage_rules():
    assert _covered(("jax.numpy",), ("jax",))
    assert not _covered(("jaxtyping",), ("jax",))  # a prefix of the name is not a parent module
    assert _covered(("orbax", "orbax.checkpoint"), ("orbax.checkpoint",))
    assert not _covered(("orbax", "orbax.export"), ("orbax.checkpoint",))
    assert _distribution("tensorboardX>=2.6") == "tensorboardx"
    assert _distribution("ml_collections ; python_version>'3'") == "ml-collections"
