"""The package's shape (docs/architecture.md): no file-level import cycle, imports only down the layers
ui → platform → models → data, no platform library in models/, modules under 450 lines, few flat modules."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

PACKAGE = Path(__file__).resolve().parents[1] / "anomaly_discovery"
LAYERS = {"config": 0, "data": 0, "models": 1, "platform": 2, "ui": 3, "cli": 4}
PLATFORM_LIBRARIES = ("ray", "sqlalchemy", "alembic", "streamlit", "fastapi", "starlette", "uvicorn")
MAX_LINES = 450
MAX_FLAT_MODULES = 8


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in root.rglob("*.py") if "migrations" not in p.parts}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, top-level names of other packages it imports), every import counted:
    module level, inside functions and under TYPE_CHECKING alike."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name in modules else outside).add(
                    alias.name if alias.name in modules else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if not target.startswith("anomaly_discovery"):
                outside.add(target.split(".")[0])
                continue
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
            inside.update(submodules or [target])
    inside.discard(name)
    return inside, outside


def import_graph(root: Path = PACKAGE) -> tuple[list[str], dict[str, set[str]], dict[str, set[str]]]:
    modules = package_modules(root)
    names = sorted(modules)
    inside, outside = {}, {}
    for name in names:
        inside[name], outside[name] = imports_of(name, modules[name], modules)
    return names, inside, outside


def import_cycles(names: list[str], inside: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module."""
    position = {name: i for i, name in enumerate(names)}
    rows = [position[a] for a in names for b in inside[a] if b in position]
    cols = [position[b] for a in names for b in inside[a] if b in position]
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=True, connection="strong")
    return [sorted(names[i] for i in np.flatnonzero(component == c))
            for c in np.unique(component) if (component == c).sum() > 1]


def upward_imports(names: list[str], inside: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a in names if a != "anomaly_discovery" for b in inside[a]
                  if b != "anomaly_discovery" and layer(b) > layer(a))


def layer(name: str) -> int:
    return LAYERS[name.split(".")[1]]


def test_no_file_level_import_cycle():
    assert import_cycles(*import_graph()[:2]) == []


def test_imports_only_go_down_the_layers():
    assert upward_imports(*import_graph()[:2]) == []


def test_models_and_data_import_no_platform_library():
    names, _, outside = import_graph()
    offending = sorted(f"{name} imports {lib}" for name in names if name.split(".")[1:2] in (["models"], ["data"])
                       for lib in outside[name] if lib in PLATFORM_LIBRARIES)
    assert offending == []


def test_no_module_is_over_450_lines():
    long = sorted(f"{name}: {len(path.read_text().splitlines())}" for name, path in package_modules().items()
                  if len(path.read_text().splitlines()) > MAX_LINES)
    assert long == []


def test_models_and_platform_keep_at_most_eight_flat_modules():
    for folder in ("models", "platform"):
        flat = sorted(p.name for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py")
        assert len(flat) <= MAX_FLAT_MODULES, f"{folder}/ has {len(flat)} flat modules: {flat}"


def test_the_checker_finds_a_cycle_an_upward_import_and_a_platform_library(tmp_path):
    """On a package written for this test: a cycle through a function-local import, models importing platform,
    and models importing Ray."""
    package = tmp_path / "anomaly_discovery"
    for relative, text in {"__init__.py": "", "models/__init__.py": "", "platform/__init__.py": "",
                           "models/a.py": "from . import b\n", "models/b.py": "def f():\n    from .a import x\n",
                           "models/c.py": "import ray\nfrom anomaly_discovery.platform.d import y\n",
                           "platform/d.py": "X = 1\n"}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    names, inside, outside = import_graph(package)
    assert import_cycles(names, inside) == [["anomaly_discovery.models.a", "anomaly_discovery.models.b"]]
    assert upward_imports(names, inside) == ["anomaly_discovery.models.c -> anomaly_discovery.platform.d"]
    assert outside["anomaly_discovery.models.c"] == {"ray"}
