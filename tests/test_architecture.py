"""The package's shape: imports run one way, subsystems meet through their packages only.

The layers, lowest first (docs/explanation/architecture.md draws them):

0. ``events``, ``_version``: plain data.
1. ``_core``: frames, patches, attribution, loop kinds.
2. ``sinks``, ``metrics``: where events and numbers go.
3. subsystems ``_blocking``, ``_watchdog``, ``_offload``.
4. the API: ``__init__``, ``_api``, ``_boot``.
5. entry points: ``testing``, ``pytest_plugin`` (and its ``_plugin_rules``), ``cli``,
   ``__main__``, ``_demo``.

A module may import from its own layer or below, never above. Across subsystems only
the subsystem's package is imported (``from .._blocking import X``), never one of its
modules, and never a name starting with ``_``. ``loopguard_integrations`` uses
loopguard's public API only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loopguard"
INTEGRATIONS = ROOT / "integrations" / "loopguard_integrations"

LAYERS = {
    "events": 0,
    "_version": 0,
    "_core": 1,
    "sinks": 2,
    "metrics": 2,
    "_blocking": 3,
    "_watchdog": 3,
    "_offload": 3,
    "__init__": 4,
    "_api": 4,
    "_boot": 4,
    "testing": 5,
    "pytest_plugin": 5,
    "_plugin_rules": 5,
    "cli": 5,
    "__main__": 5,
    "_demo": 5,
    "_bootstrap": 5,
    "otel": 5,
}
SUBSYSTEMS = {"_blocking", "_watchdog", "_offload"}
# Which subsystem may use which (through its package): the watchdog starts a blocking
# guard and reads its modes; offload reports to the running watchdogs.
SIDEWAYS = {("_watchdog", "_blocking"), ("_offload", "_watchdog")}
PUBLIC = {"loopguard", "loopguard.events", "loopguard.sinks", "loopguard.metrics", "loopguard.otel"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in a file."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not node.module:  # from . import a, b: each is a module
                found.extend((f"{module}.{n}", [], node.lineno) for n in names)
            else:
                found.append((module, names, node.lineno))
    return found


def _part(module: str) -> str:
    """The top-level part of loopguard a module belongs to (``_watchdog``, ``sinks``...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer() -> None:
    parts = {_part(_module_name(p)) for p in _package_files()}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    here = _part(_module_name(path))
    problems = []
    for module, names, line in _imports(path):
        if module != "loopguard" and not module.startswith("loopguard."):
            continue
        there = _part(module)
        where = f"{path.relative_to(ROOT)}:{line} imports {module}"
        if there == here:
            continue
        if LAYERS[there] > LAYERS[here]:
            problems.append(f"{where}: layer {LAYERS[there]} above {LAYERS[here]}")
        if there in SUBSYSTEMS:
            if here in SUBSYSTEMS and (here, there) not in SIDEWAYS:
                problems.append(f"{where}: subsystem {here} may not use {there}")
            if module != f"loopguard.{there}":
                problems.append(f"{where}: another subsystem's module, not its package")
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}: private names {private}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", sorted(INTEGRATIONS.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_integrations_use_the_public_api_only(path: Path) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for module, names, line in _imports(path)
        if (module == "loopguard" or module.startswith("loopguard."))
        and (module not in PUBLIC or any(n.startswith("_") for n in names))
    ]
    assert not bad, "\n".join(bad)


def test_the_layering_check_catches_an_upward_import() -> None:
    """The checker itself: a relative import of the API layer from ``_core`` is found."""
    frames = PACKAGE / "_core" / "frames.py"
    source = frames.read_text() + "\nfrom .._api import install\n"
    found = [m for m, _, _ in _imports(frames, source)]
    assert "loopguard._api" in found
    assert LAYERS[_part("loopguard._api")] > LAYERS[_part("loopguard._core.frames")]
