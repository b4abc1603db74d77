"""Imports go one way (STYLE.md): types <- profiler <- cost_models <- planner <- backends <- cli, and the heavy
front-end/solver libraries stay in their one place."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "paraplan"
BASE = {"types", "errors", "units", "files", "models", "catalog", "__init__"}
ORDER = ["profiler", "cost_models", "planner", "backends", "report", "cli"]  # report: figures of a plan


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_paraplan_imports_only_flow_downstream():
    bad = []
    for path in PKG.rglob("*.py"):
        layer = _layer(path)
        if layer not in ORDER:
            continue
        allowed = BASE | set(ORDER[: ORDER.index(layer) + 1])
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "paraplan" and len(parts) > 1 and parts[1] not in allowed:
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_pulp_typer_rich_stay_in_their_modules():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        for mod in _imports(path):
            root = mod.split(".")[0]
            if root == "pulp" and rel != "planner/milp.py":
                bad.append(f"{rel} imports pulp")
            if root in ("typer", "rich") and not rel.startswith("cli/"):
                bad.append(f"{rel} imports {root}")
    assert not bad, bad
