"""The shape of the code: no import circle between our modules, and imports inside functions only for the optional
heavy dependencies. Read from the source with `ast` (nothing is imported), so a circle hidden behind a
function-level import cannot pass either."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it is installed as (pyproject's package-dir mapping).
PACKAGES = {"mlx_internvl": "mlx_internvl", "convert": "mlx_internvl.convert", "cli": "mlx_internvl.cli"}
# What may be imported inside a function: optional extras (torch path, video, PEFT checks) and the reference
# package, which imports torch at its top.
LAZY_OK = ("torch", "torch_npu", "transformers", "peft", "av", "mlx_internvl.reference")


def modules() -> dict:
    """{module name: parsed source} for every library module."""
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package] + parts)
            out[name] = (ast.parse(f.read_text(encoding="utf-8")), f.name == "__init__.py")
    return out


def targets(node, name: str, is_package: bool, known) -> list:
    """Our modules an import statement in module `name` brings in (the most specific one for each name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = name if is_package else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    found = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
    return found or ([mod] if mod in known else [])


def top_level_imports(tree):
    """Import statements that run when the module is imported (not those inside a function)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def function_level_imports(tree):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def graph() -> dict:
    mods = modules()
    return {name: {t for node in top_level_imports(tree) for t in targets(node, name, pkg, mods)} - {name}
            for name, (tree, pkg) in mods.items()}


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    edges = graph()
    assert "mlx_internvl.loading" in edges and edges["mlx_internvl.loading"], "the graph reader found no imports"
    assert cycles(edges) == []


def test_no_import_circle_even_through_imports_inside_functions():
    mods = modules()
    edges = {name: {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for t in targets(node, name, pkg, mods)} - {name}
             for name, (tree, pkg) in mods.items()}
    assert cycles(edges) == []


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_function_level_imports_only_for_optional_heavy_dependencies():
    mods = modules()
    bad = []
    for name, (tree, pkg) in mods.items():
        if name.startswith("mlx_internvl.reference"):
            continue  # the torch path: it imports torch at its top, and its own parts lazily
        for node in function_level_imports(tree):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                found = targets(node, name, pkg, mods) or [node.module or "."]
            bad += [f"{name}:{node.lineno} {t}" for t in found if not t.startswith(LAZY_OK)]
    assert bad == []


def test_modules_and_functions_stay_short():
    """About 400 lines a module and 60 a function, outside the tests (the limits the project holds itself to)."""
    long = []
    for folder in list(PACKAGES) + ["benchmarks"]:
        for f in sorted((ROOT / folder).rglob("*.py")):
            src = f.read_text(encoding="utf-8")
            if len(src.splitlines()) > 400:
                long.append(f"{f.relative_to(ROOT)}: {len(src.splitlines())} lines")
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert long == []
