"""The package's import graph has no circles.

Every module under adaml_kernels/ is parsed with `ast` (nothing is imported), and each import
statement that names a module of the package, at the top of a module or inside a function or class,
relative (`from .x import y`, `from . import x`) or absolute (`import adaml_kernels.x`,
`from adaml_kernels.x import y`), is an edge from the importing module to the imported one:

- `from P import n` is an edge to the module P.n when P/n.py or the package P/n/ exists, else an
  edge to P (the package's __init__.py when P is a package);
- so a submodule that imports the package itself (`from adaml_kernels import AdamL`) has an edge
  to adaml_kernels/__init__.py, while the package's __init__.py importing its submodules is an
  ordinary edge downwards.

Imports made with `importlib.import_module(...)` are strings, not import statements, and are not
seen.
"""

from __future__ import annotations

import ast
import os

PACKAGE = "adaml_kernels"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def find_modules(package_dir: str, package: str) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (path, is_package)} for every .py file under package_dir."""
    modules = {}
    root = os.path.dirname(package_dir)
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        if "__init__.py" not in filenames:
            dirnames[:] = []  # not a package: nothing below it is importable as our module
            continue
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)[: -len(".py")]
            parts = rel.split(os.sep)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = (os.path.join(dirpath, fn), is_package)
    assert package in modules, f"{package_dir} has no __init__.py"
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name `from <level dots><name> import ...` refers to, inside `module`."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    if name:
        parts = parts + name.split(".")
    return ".".join(parts)


def _existing(name: str, modules: dict) -> str | None:
    """`name` if it is a module of the package, else its longest prefix that is one."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: str, is_package: bool, modules: dict, package: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its body."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    target = _existing(alias.name, modules)
                    if target:
                        out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                base = node.module
            else:
                continue
            if not base:
                continue  # a relative import above the top package: not ours
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                else:
                    target = _existing(base, modules)
                    if target:
                        out.add(target)
    out.discard(module)
    return out


def import_graph(package_dir: str = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = find_modules(package_dir, package)
    return {m: imports_of(m, path, is_pkg, modules, package)
            for m, (path, is_pkg) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected component of more than one module (Tarjan),
    written as a path that ends where it starts."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def connect(v):
        # iterative Tarjan: (node, iterator over its successors)
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle_in(comp, graph) for comp in comps]


def _circle_in(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first search)."""
    start = min(comp)
    parent = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for w in sorted(graph[node] & comp):
            if w == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return list(reversed(path)) + [start]
            if w not in parent:
                parent[w] = node
                queue.append(w)
    raise AssertionError(f"no circle in the component {sorted(comp)}")


def _describe(circles: list[list[str]]) -> str:
    return "\n".join("  " + " -> ".join(c) for c in circles)


def test_package_import_graph_has_no_circles():
    graph = import_graph()
    assert len(graph) > 10 and graph[PACKAGE], "the package's modules were not found"
    found = cycles(graph)
    assert not found, "import circles in adaml_kernels:\n" + _describe(found)


# ------------------------------------------------------------------- the checker's own checks

def _write_package(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root / "pkg")


def test_checker_sees_every_kind_of_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": "from .a import A\nfrom . import sub\n",
        "pkg/a.py": "import os\nfrom pkg.b import B\nA = 1\n",
        "pkg/b.py": "def f():\n    import pkg.c\nB = 1\n",
        "pkg/c.py": "from . import a, b\nfrom pkg import A\n",
        "pkg/sub/__init__.py": "from .. import c\nfrom .inner import X\n",
        "pkg/sub/inner.py": "from ..a import A\nfrom . import something_else\nX = 1\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.a", "pkg.sub"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},  # a function-level import counts
        "pkg.c": {"pkg.a", "pkg.b", "pkg"},  # `from pkg import A` is an edge to pkg/__init__.py
        "pkg.sub": {"pkg.c", "pkg.sub.inner"},
        "pkg.sub.inner": {"pkg.a", "pkg.sub"},  # a name that is no module: the package itself
    }
    found = cycles(graph)
    assert len(found) == 1
    circle = found[0]
    assert circle[0] == circle[-1] and set(circle) <= set(graph)
    assert all(b in graph[a] for a, b in zip(circle, circle[1:]))


def test_checker_passes_a_graph_without_circles(tmp_path):
    pkg = _write_package(tmp_path, {
        "pkg/__init__.py": "from .top import T\n",
        "pkg/top.py": "from .low import L\nT = L\n",
        "pkg/low.py": "L = 1\n",
    })
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": {"pkg.top"}, "pkg.top": {"pkg.low"}, "pkg.low": set()}
    assert cycles(graph) == []
