"""The package's structure: no import cycles between lmmarg's modules, no private names imported across modules.

Both rules read the source with ``ast`` (nothing is imported):

* the import graph has an edge a -> b for every import of lmmarg module b in module a, at module top or inside a
  function (a cycle through a function-level import is still a cycle of the design). ``from .pkg import name``
  is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). The root package
  ``lmmarg`` is left out: its ``__init__`` gathers the public names of every module and modules take only
  ``__version__`` from it. Importing a submodule runs its package's ``__init__`` first, so an edge to
  ``pkg.mod`` is an edge to ``pkg`` too (a package imported by one of its own modules is not counted).
* ``from x import _name`` (one underscore, not a dunder) is refused in lmmarg/ and tests/: a private name belongs
  to its module; use a public name from the module's documented list instead.
"""
from __future__ import annotations

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmmarg"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, name: str):
    """(line, imported module, [names]) for every import statement of the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod, [a.name for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """{lmmarg module: the lmmarg modules it imports} (root package left out, see the module docstring)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods if m != "lmmarg"}
    for name, path in mods.items():
        if name == "lmmarg":
            continue
        for _, mod, names in _imports(path, name):
            targets = [f"{mod}.{n}" if f"{mod}.{n}" in mods else mod for n in names] if names else [mod]
            for t in targets:
                while t and t not in ("lmmarg", name):
                    if t in mods and not name.startswith(t + "."):
                        graph[name].add(t)
                    t = t.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def private_imports() -> list[str]:
    """``path:line: from module import _name`` for every private name imported in lmmarg/ or tests/."""
    found = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    for path in files:
        name = _module_name(path)
        for line, mod, names in _imports(path, name):
            for n in names:
                if n.startswith("_") and not (n.startswith("__") and n.endswith("__")):
                    found.append(f"{path.relative_to(ROOT)}:{line}: from {mod} import {n}")
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between lmmarg modules: " + "; ".join(" <-> ".join(c) for c in found)


def private_attributes() -> list[str]:
    """``path:line: name._attr`` for every private attribute read through a name bound by an import of lmmarg
    (``kernels._x`` after ``from lmmarg.marginal import kernels``, ``lmmarg.model._y`` after ``import lmmarg``)."""
    found = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    for path in files:
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {(a.asname or a.name.split(".")[0]) for a in node.names if a.name.startswith("lmmarg")}
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lmmarg")):
                bound |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in bound and not name.endswith(root.id):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_names_imported_across_modules():
    found = private_imports() + private_attributes()
    assert not found, "private names imported across modules:\n" + "\n".join(found)


if __name__ == "__main__":
    g = import_graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges; cycles: {cycles(g) or 'none'}")
    print("\n".join(private_imports() + private_attributes()) or "no private imports")


def test_log_marginal_walks_through_the_primitive_and_one_block_type():
    """What a newcomer follows (``python -m benchmarks.walk``): Model.log_marginal for two crossed classes runs the
    engine primitive ``logdet_gram`` and the plan's block strategy (``schur`` of its level-1 fill, ``matrix`` of
    its dense form), not a route of its own."""
    import math

    from benchmarks import walk

    value, calls = walk.walk("penicillin")
    names = {(path, name) for path, name, _ in calls}
    assert math.isfinite(value)
    assert {("marginal/kernels.py", "logdet_gram"), ("marginal/blocks.py", "schur"),
            ("marginal/blocks.py", "matrix")} <= names
