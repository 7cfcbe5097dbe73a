"""No import cycle inside the ``unionfs`` package.

Every module under ``unionfs/`` is parsed with :mod:`ast` (nothing is imported) and every import of a unionfs
module found anywhere in it counts: at the top, inside functions, and under ``if TYPE_CHECKING:``. The rule:

* ``import unionfs.a.b`` and ``from unionfs.a import b`` (relative forms resolved against the importing
  module's package) import the module ``unionfs.a.b`` when it exists; ``from unionfs.a import name`` where
  ``name`` is not a submodule imports ``unionfs.a`` (its ``__init__``).
* Importing ``unionfs.a.b`` does not count as importing the package ``unionfs.a`` too, although Python runs its
  ``__init__`` first: a package whose ``__init__`` imports its own submodules is no cycle by that alone. A
  submodule that takes names from its package's ``__init__`` (``from . import name``) does depend on it, and
  when that ``__init__`` imports the submodule, the cycle is reported: it is one.

Run as a script (``python tests/test_import_cycles.py``) it prints the cycles, one per line.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unionfs"


def modules(package_dir: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``package_dir`` (a package's name for its __init__)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = alias.name
            while target and target not in known:  # `import unionfs.a.b.c` where c is a name: the deepest module
                target = target.rpartition(".")[0]
            if target:
                yield target
        return
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base_parts = package[: len(package) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in known:
            yield submodule
        elif base in known:
            yield base


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself left out)."""
    files = modules(package_dir)
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_bytes(), filename=str(path))
        edges = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(_imported(node, name, path.name == "__init__.py", known))
        edges.discard(name)
    return graph


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest way from ``start`` back to it among ``members`` (breadth first): ``[start, ..., start]``."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every module on a cycle, a shortest cycle through it (``[a, b, a]``), each cycle once, sorted."""
    found = set()
    for component in _components(graph):
        for start in component:
            ring = _shortest_cycle(graph, start, component)[:-1]
            first = ring.index(min(ring))
            found.add(tuple(ring[first:] + ring[:first + 1]))
    return sorted(map(list, found))


def test_no_import_cycle_inside_unionfs() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles inside unionfs/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_snapshot_command_does_not_import_the_unionfs_command() -> None:
    graph = import_graph()
    assert "unionfs.cli" not in graph["unionfs.snapshots.cli"]
    assert "unionfs.fuse.server" in graph["unionfs.snapshots.cli"]  # the one mount API


# -- the checker itself, on a made-up package ------------------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_counts_every_kind_of_import(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {
        "__init__.py": "from .a import A\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import C\nA = 1\n",
        "b.py": "def f():\n    import pkg.sub.c\n    from . import a\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import b\nfrom ..a import A\nfrom . import d\nimport os\n",
        "sub/d.py": "from pkg.sub import c\n",
    })
    graph = import_graph(pkg)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.c"},
        "pkg.b": {"pkg.sub.c", "pkg.a"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.b", "pkg.a", "pkg.sub.d"},
        "pkg.sub.d": {"pkg.sub.c"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.sub.c", "pkg.a"], ["pkg.b", "pkg.sub.c", "pkg.b"],
                             ["pkg.sub.c", "pkg.sub.d", "pkg.sub.c"]]


def test_checker_rule_for_a_package_init(tmp_path: Path) -> None:
    # an __init__ importing its submodules, and a submodule importing a sibling: no cycle
    pkg = _package(tmp_path, {"__init__.py": "from .a import A\nfrom .b import B\n",
                              "a.py": "from .b import B\nA = B\n", "b.py": "B = 1\n"})
    assert cycles(import_graph(pkg)) == []
    # a submodule taking a name re-exported by its package's __init__, which imports that submodule: a cycle
    (pkg / "b.py").write_text("from . import A as B\n")
    assert cycles(import_graph(pkg)) == [["pkg", "pkg.a", "pkg.b", "pkg"], ["pkg", "pkg.b", "pkg"]]


if __name__ == "__main__":
    found = cycles(import_graph())
    for cycle in found:
        print(" -> ".join(cycle))
    sys.exit(1 if found else 0)
