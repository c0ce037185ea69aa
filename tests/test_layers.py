"""The package's layers (docs/architecture.md): every module imports only from its own package or from below.

Bottom to top: errors; the pure math (objectives/) and the network probe; data/, runtime and cli; models/ (loads and
runs models, knows no objective); one home per stage (rollout, teachers, evaluation, scoring); the Lightning
pieces (parallel, loggers, callbacks, then module) and the reports; the entry points (train, then sweep and zoo).
Function-level imports count too: a lazy import that climbs is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "grpokd"

RANKS = {  # module (or package) -> layer; an import must go to a lower layer or stay inside its own package
    "errors": 0,
    "objectives": 1, "network": 1,
    "data": 2, "runtime": 2, "cli": 2,
    "models": 3,
    "rollout": 4,
    "teachers": 5, "evaluation": 5,
    "scoring": 6,
    "parallel": 7, "loggers": 7, "callbacks": 7,
    "module": 8, "report": 8,
    "train": 9,
    "sweep": 10, "zoo": 10,
}


def unit(module: str) -> str:
    """The layer unit of a dotted grpokd module: its top-level package or module (grpokd.models.lm -> models)."""
    return module.split(".")[1]


def grpokd_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every grpokd import in `path`, at any depth (function-level ones included)."""
    package = "grpokd." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("grpokd.")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(package.split(".")[: -node.level] + [node.module])
            if base == "grpokd":  # from grpokd import rollout, parallel
                found += [(node.lineno, f"grpokd.{alias.name}") for alias in node.names]
            elif base.startswith("grpokd."):
                found.append((node.lineno, base))
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if p != SRC / "__init__.py")


def test_every_module_has_a_layer():
    units = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.iterdir() if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(RANKS), f"give every top-level module a layer: missing {sorted(units - set(RANKS))}, stale {sorted(set(RANKS) - units)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_upward(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    upward = [
        f"line {line}: {module} (layer {RANKS[unit(module)]})"
        for line, module in grpokd_imports(path)
        if unit(module) != own and RANKS[unit(module)] >= RANKS[own]
    ]
    assert not upward, f"{path.relative_to(SRC)} (layer {RANKS[own]}) imports from its layer or above: {upward}"


def test_models_know_no_objective_and_objectives_know_only_errors():
    for path in (SRC / "models").glob("*.py"):
        assert not [m for _, m in grpokd_imports(path) if unit(m) == "objectives"], path.name
    for path in (SRC / "objectives").rglob("*.py"):
        assert {unit(m) for _, m in grpokd_imports(path)} <= {"objectives", "errors"}, path.name
