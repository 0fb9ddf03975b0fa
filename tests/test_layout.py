"""The package's shape: the engine imports no GUI, and no module imports another in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_mobilesam"
GUI = ("napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def engine_modules() -> list[str]:
    """Every module outside the napari layer (``_napari/`` and ``_sample_data.py``)."""
    mods = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("_napari/") or rel == "_sample_data.py" or rel.endswith("__main__.py"):
            continue
        mods.append(_module_name(path))
    return mods


def test_engine_imports_with_gui_packages_blocked():
    """Importing every engine module works when napari, Qt and magicgui cannot be imported."""
    code = f"""
import importlib.abc, sys
BLOCKED = {GUI!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, Block())
import importlib
for m in {engine_modules()!r}:
    importlib.import_module(m)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
print('LOADED', loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout


def _imports(path: Path) -> set[str]:
    """Package modules that ``path`` imports at module level or inside functions."""
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = me.split(".") if is_pkg else me.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("napari_mobilesam"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` may name a submodule
                found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("napari_mobilesam"))
    return found


def test_no_import_cycles():
    """The module import graph (every import, also those inside functions) has no cycle.

    A package's ``__init__`` re-exporting its own modules is not a cycle of its modules, so
    imports of a package by its own submodules are not counted.
    """
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    if "napari_mobilesam" in graph:  # the lazy top-level API imports on attribute access only
        graph["napari_mobilesam"] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
