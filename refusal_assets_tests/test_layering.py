"""The layering rule: only the Dagster layer imports Dagster. The science core (everything in
``refusal_assets/`` outside ``defs/``, ``definitions.py`` and the app modules that drive Dagster)
runs, and is tested, without it. Imports are read with ``ast``, so an import inside a function
counts as much as one at the top; a core module that imports the Dagster layer itself (which
imports Dagster) breaks the rule too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from refusal_assets_tests.conftest import ROOT

PACKAGE = ROOT / "refusal_assets"
# Paths relative to the package folder; a folder entry covers everything under it. The app
# modules listed drive Dagster: the CLI, the runner, the run planner (Dagster's stale status) and
# prune (the instance's records of removed partitions).
DAGSTER_LAYER = (
    "defs/",
    "definitions.py",
    "app/cli.py",
    "app/runner.py",
    "app/plan.py",
    "app/prune.py",
)


def in_dagster_layer(relative: str) -> bool:
    folders = tuple(entry for entry in DAGSTER_LAYER if entry.endswith("/"))
    return relative in DAGSTER_LAYER or relative.startswith(folders)


def layer_module_names() -> set[str]:
    """Dotted names of the Dagster layer's modules and packages (``refusal_assets.defs``, ...)."""
    names = set()
    for entry in DAGSTER_LAYER:
        dotted = "refusal_assets." + entry.rstrip("/").removesuffix(".py").replace("/", ".")
        names.add(dotted)
    return names


def containing_package(relative: str) -> str:
    """The package a relative import starts from: ``lm/hooks.py`` and ``lm/__init__.py`` both
    -> ``refusal_assets.lm``."""
    return ".".join(["refusal_assets", *Path(relative).parent.parts])


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names anywhere in ``source`` (functions,
    classes and ``if TYPE_CHECKING`` blocks included); relative imports are resolved against
    ``package`` (the dotted package of the module being read), and ``from package import name``
    also yields ``package.name`` (the name may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def is_dagster(module: str) -> bool:
    """Dagster itself and its integration packages (``dagster_k8s``, ``dagster_postgres``, ...)."""
    top = module.split(".")[0]
    return top == "dagster" or top.startswith("dagster_")


def is_dagster_layer(module: str, layer: set[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layer)


def forbidden_imports(source: str, package: str) -> set[str]:
    layer = layer_module_names()
    imported = imported_modules(source, package)
    return {m for m in imported if is_dagster(m) or is_dagster_layer(m, layer)}


def package_modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def test_no_module_outside_the_dagster_layer_imports_dagster():
    offenders = {}
    for relative in package_modules():
        if in_dagster_layer(relative):
            continue
        source = (PACKAGE / relative).read_text(encoding="utf-8")
        if bad := forbidden_imports(source, containing_package(relative)):
            offenders[relative] = sorted(bad)
    assert not offenders, f"core modules that import Dagster or the Dagster layer: {offenders}"


def test_the_scan_sees_the_dagster_layers_own_imports():
    """The rule is not vacuous: the layer's modules are found, and their Dagster imports seen
    (the CLI imports Dagster only inside functions, so a top-level-only scan would miss it)."""
    modules = package_modules()
    assert "definitions.py" in modules and any(m.startswith("defs/") for m in modules)
    for relative in ("app/cli.py", "app/runner.py", "defs/build.py"):
        source = (PACKAGE / relative).read_text(encoding="utf-8")
        imported = imported_modules(source, containing_package(relative))
        assert any(is_dagster(m) for m in imported), relative
    # every layer entry still exists: a renamed file must not silently widen the core
    for entry in DAGSTER_LAYER:
        assert (PACKAGE / entry).exists(), entry


@pytest.mark.parametrize(
    "source, package, expected",
    [
        ("import dagster as dg", "refusal_assets.lm", {"dagster"}),
        (
            "def f():\n    from dagster import asset\n",
            "refusal_assets.sae",
            {"dagster", "dagster.asset"},
        ),
        ("class C:\n    import dagster_k8s\n", "refusal_assets", {"dagster_k8s"}),
        (
            "from refusal_assets.defs import build",
            "refusal_assets.report",
            {"refusal_assets.defs", "refusal_assets.defs.build"},
        ),
        (
            "from ..defs.build import build_defs",
            "refusal_assets.analysis",
            {"refusal_assets.defs.build", "refusal_assets.defs.build.build_defs"},
        ),
        ("from . import definitions", "refusal_assets", {"refusal_assets.definitions"}),
        ("from refusal_assets.app import runner", "refusal_assets", {"refusal_assets.app.runner"}),
        ("import dagsterish\nfrom refusal_assets.app import settings", "refusal_assets", set()),
        ("from .autoencoder import TopKSAE", "refusal_assets.sae", set()),
    ],
)
def test_forbidden_imports_are_found_wherever_they_are_written(source, package, expected):
    assert forbidden_imports(source, package) == expected


def test_relative_imports_resolve_against_the_importing_package():
    sae = "refusal_assets.sae"
    assert containing_package("sae/__init__.py") == containing_package("sae/rows.py") == sae
    assert "refusal_assets.sae.autoencoder" in imported_modules("from .autoencoder import x", sae)
    assert "refusal_assets.lm.hooks" in imported_modules("from ..lm import hooks", sae)
    assert "refusal_assets.config" in imported_modules("from .config import x", "refusal_assets")
