"""The package's shape: no import cycles, and the import contracts bite.

`lint-imports` (run by scripts/test) checks the layers and the core's allow-list; these
tests show that a cycle or a forbidden import would be caught, not just that none is
there today.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def cycles(graph: grimp.ImportGraph, package: str) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or a module
    importing itself: every import cycle, functions' own imports included."""
    modules = sorted(graph.find_descendants(package) | {package})
    edges = {
        m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d in modules)
        for m in modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in edges[module]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules)))
    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_module_of_the_relay_takes_part_in_an_import_cycle() -> None:
    graph = grimp.build_graph("vpsrelay", cache_dir=None)
    assert cycles(graph, "vpsrelay") == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / "looped"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from looped import b\n")
    (package / "b.py").write_text("def late() -> None:\n    from looped import a\n")
    (package / "c.py").write_text("from looped import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("looped", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert cycles(graph, "looped") == [["looped.a", "looped.b"]]


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "vpsrelay", tree / "vpsrelay", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        ROOT / "scripts", tree / "scripts", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_contracts_hold_for_the_tree_as_it_is(tmp_path: Path) -> None:
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        # An IO module in the core: the allow-list names what the core may import.
        ("core/flow.py", "import sqlite3", ("vpsrelay.core.flow", "sqlite3")),
        # A shell module in the core.
        ("core/digest.py", "from vpsrelay.cache import index", ("vpsrelay.cache",)),
        # An upward import: the layers.
        ("cache/store.py", "from vpsrelay import app", ("vpsrelay.cache.store -> vpsrelay.app",)),
    ],
)
def test_a_forbidden_import_breaks_the_contracts(
    tmp_path: Path, module: str, added: str, expected: tuple[str, ...]
) -> None:
    tree = _copy_tree(tmp_path)
    with (tree / "vpsrelay" / module).open("a") as source:
        source.write(f"\n{added}  # noqa\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    for fragment in expected:
        assert fragment in result.stdout
