"""The package's import graph, read from the source: no module imports another in a circle, and the top-level
parts import only downwards in README's Layout order (every import, also those inside functions)."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnunet_kd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Set[str]:
    """The nnunet_kd modules one file imports (``from X import name`` counts as X, or X.name if that is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "nnunet_kd"}


def import_graph() -> Dict[str, Set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _part(module: str) -> str:
    """The Layout entry a module belongs to: ``nnunet_kd/training/``, ``nnunet_kd/cli.py``, ..."""
    parts = module.split(".")
    return f"nnunet_kd/{parts[1]}/" if (PACKAGE / parts[1]).is_dir() else f"nnunet_kd/{parts[1]}.py"


def layout_order() -> list:
    """The package's parts in the order README's Layout section lists them."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1]
    return [m for m in re.findall(r"^- `(nnunet_kd/[^`]+)`", layout, flags=re.M)]


def test_no_import_circle():
    graph = import_graph()
    state: Dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_parts_import_only_down_the_layout_list():
    order = layout_order()
    parts = {_part(m) for m in import_graph() if m != "nnunet_kd"}
    assert parts <= set(order), f"parts missing from README's Layout: {sorted(parts - set(order))}"
    rank = {part: i for i, part in enumerate(order)}
    upward = sorted(f"{a} imports {b}" for a, targets in import_graph().items() if a != "nnunet_kd"
                    for b in targets if rank[_part(b)] > rank[_part(a)])
    assert not upward, "imports that run up README's Layout list:\n" + "\n".join(upward)
