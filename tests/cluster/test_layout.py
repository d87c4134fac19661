"""The package layout's dependency direction (ARCHITECTURE.md): cluster.serve -> cluster.selector,
never the reverse; replicas and kvmanager never import cluster."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("cluster/selector", "cluster.serve"), ("replicas", "cluster"), ("kvmanager", "cluster")],
)
def test_dependency_direction(package: str, forbidden: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {
        f"{f.relative_to(ROOT)}: {name}"
        for f in files
        for name in _imports(f)
        if name == forbidden or name.startswith(forbidden + ".")
    }
    assert not bad, sorted(bad)


def test_every_cluster_module_lives_in_one_of_the_two_packages() -> None:
    assert sorted(p.name for p in (ROOT / "cluster").glob("*.py")) == ["__init__.py"]
