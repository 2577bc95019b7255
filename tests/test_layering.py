"""The package's layering: which parts may import which (DESIGN.md section 2).

Every import statement of every module, at module level or inside a function, is read from the
source; the parts of the package must form an acyclic graph in the order below, so that the
per-layer knowledge (handlers) sits below graph, slim and flops and none of those knows a model or
a search method.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nasprune"

# each part may import only the parts listed before it (and itself)
ORDER = ["ops", "kernels", "handlers", "nn", "graph", "flops", "slim", "io", "scores", "models", "dist",
         "data", "train", "search", "env", "cli"]


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "nasprune" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _part_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        src = _part(module if rel.name != "__init__" else module + ".x")
        if src is None or src.startswith("__"):
            continue
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        for imported in _imports(path, package):
            dst = _part(imported)
            if dst and dst != src and ((ROOT / dst).is_dir() or (ROOT / f"{dst}.py").exists()):
                edges.setdefault(src, set()).add(dst)
    return edges


def test_parts_are_known():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts <= set(ORDER), f"add {sorted(parts - set(ORDER))} to ORDER"


@pytest.mark.parametrize("part", ORDER)
def test_imports_only_lower_parts(part):
    allowed = set(ORDER[: ORDER.index(part)])
    imported = _part_edges().get(part, set()) - {"__main__", "__init__"}
    upward = sorted(d for d in imported if d in ORDER and d not in allowed)
    assert not upward, f"nasprune.{part} imports {upward}, which sit above it in {ORDER}"


def test_no_cycle_between_graph_slim_flops():
    edges = _part_edges()
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for nxt in edges.get(node, ()):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for start in ("graph", "slim", "flops", "handlers"):
        visit(start)
