"""The import structure of `vocalign_hf` and `concept_generation`, read from the source with `ast` (nothing is
imported): no circle of imports, lower layers never import upper ones, and no subpackage reaches into another's
private names.

Every import counts, at the top of a file, inside a function or under `TYPE_CHECKING`: a deferred import is still
a dependency. Relative imports are resolved; `from package import name` is an import of `package.name` when that is
a module of the tree, else of `package` (its `__init__`).

The layers, from the bottom: `world/`, `data/`, `metrics/`, `models/` (and the top-level helpers); `adaptation/`;
the recipes (`recipes.py`, `recipe_checks.py`) and `demo/`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: (folder holding the package, package name) of the trees that are read.
TREES = ((ROOT / "src", "vocalign_hf"), (ROOT, "concept_generation"))

#: Layer rules: modules of the areas on the left never import from the areas on the right.
LOWER_LAYERS = ("world", "data", "metrics", "models")
RECIPES = ("recipes", "recipe_checks")
FORBIDDEN = {area: ("adaptation", *RECIPES, "demo") for area in LOWER_LAYERS}
FORBIDDEN["adaptation"] = (*RECIPES, "demo")


@dataclass(frozen=True)
class Import:
    """One imported thing: `importer` (module) imports `name` (None: the module itself) of module `target`."""

    importer: str
    target: str
    name: str | None
    file: str  # relative to the repository
    line: int

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.file}:{self.line} imports {what}"


def find_modules(trees: Iterable[tuple[Path, str]] = TREES) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's `__init__`)."""
    modules = {}
    for base, package in trees:
        for file in sorted((base / package).rglob("*.py")):
            parts = file.relative_to(base).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return modules


def _package_of(module: str, modules: Mapping[str, tuple[Path, bool]]) -> str:
    """The package a module belongs to: itself for a package's `__init__`, else its parent."""
    return module if modules[module][1] else module.rpartition(".")[0]


def _own_module(dotted: str, modules: Mapping[str, tuple[Path, bool]]) -> str | None:
    """The longest prefix of `dotted` that is a module of the tree (`import a.b.c` runs `a.b.c`)."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def module_imports(
    module: str, modules: Mapping[str, tuple[Path, bool]], root: Path = ROOT
) -> tuple[list[Import], list[str]]:
    """The imports of `module` that name modules of the tree, and its relative imports that resolve to none."""
    path = modules[module][0]
    file = path.relative_to(root).as_posix()
    package = _package_of(module, modules)
    found, unresolved = [], []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            pairs = [(source, alias.name) for alias in node.names]
        else:
            continue
        for source, name in pairs:
            if name and f"{source}.{name}" in modules:  # `from package import submodule`
                source, name = f"{source}.{name}", None
            target = source if source in modules else _own_module(source, modules)
            if target is None:
                if isinstance(node, ast.ImportFrom) and node.level:
                    unresolved.append(f"{file}:{node.lineno}: from {'.' * node.level}"
                                      f"{node.module or ''} import {name}")
                continue
            if target != source:  # `import a.b.c` where only `a.b` is ours (should not happen) names the module
                name = None
            found.append(Import(module, target, None if name == "*" else name, file, node.lineno))
    return found, unresolved


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, tuple[Path, bool]], list[Import]]:
    modules = find_modules()
    imports, unresolved = [], []
    for module in modules:
        found, bad = module_imports(module, modules)
        imports += found
        unresolved += bad
    assert not unresolved, "relative imports of no module of the tree:\n" + "\n".join(unresolved)
    return modules, imports


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def area(module: str) -> str:
    """`vocalign_hf.world.pretrain` -> `world`, `vocalign_hf.recipes` -> `recipes`, `concept_generation.x` ->
    `concept_generation`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "vocalign_hf" and len(parts) > 1 else parts[0]


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(imports: Iterable[Import], modules: Mapping[str, tuple[Path, bool]]) -> list[Import]:
    """Imports of a private name (`_x`), or of a name from a private module (`pkg._mod`), defined in another
    package than the importer's."""
    crossings = []
    for imp in imports:
        here = _package_of(imp.importer, modules)
        if imp.name and is_private(imp.name) and _package_of(imp.target, modules) != here:
            crossings.append(imp)
            continue
        parts = imp.target.split(".")
        for depth, part in enumerate(parts):
            if is_private(part) and ".".join(parts[:depth]) != here:
                crossings.append(imp)
                break
    return crossings


# ------------------------------------------------------------------------------------------- the checker itself
def test_the_cycle_finder_finds_circles_and_only_them():
    assert cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert sorted(cycles({"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]})) == [["a", "b"], ["c", "d"]]


def test_imports_are_read_everywhere_and_resolved(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .. import top\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .sub import thing\n"
        "def later():\n    from pkg.sub import _hidden  # deferred: still an import\n"
    )
    modules = find_modules([(tmp_path, "pkg")])
    found = [imp for module in modules for imp in module_imports(module, modules, root=tmp_path)[0]]
    assert {(i.importer, i.target, i.name, i.line) for i in found} == {
        ("pkg.sub", "pkg.top", None, 1), ("pkg.top", "pkg.sub", "thing", 3), ("pkg.top", "pkg.sub", "_hidden", 5)
    }
    assert cycles({m: [i.target for i in found if i.importer == m] for m in modules}) == [["pkg.sub", "pkg.top"]]
    assert [str(i) for i in private_crossings(found, modules)] == ["pkg/top.py:5 imports pkg.sub._hidden"]


# ----------------------------------------------------------------------------------------------- the real tree
def test_the_tree_is_read(graph):
    modules, imports = graph
    pairs = {(i.importer, i.target) for i in imports}
    assert ("vocalign_hf.world.pretrain", "vocalign_hf.world.shipped") in pairs
    assert ("vocalign_hf.adaptation.merge", "vocalign_hf.adaptation.adapters") in pairs
    assert ("vocalign_hf.recipes", "vocalign_hf.adaptation.lora") in pairs  # one inside a function too:
    assert ("vocalign_hf.recipes", "concept_generation") in pairs
    assert len(modules) > 80 and len(imports) > 300


def test_no_import_cycles(graph):
    modules, imports = graph
    edges = {module: sorted({i.target for i in imports if i.importer == module and i.target != module})
             for module in modules}
    found = cycles(edges)
    lines = [
        f"circle {' <-> '.join(component)}:\n"
        + "\n".join(f"  {i}" for i in imports if i.importer in component and i.target in component
                    and i.importer != i.target)
        for component in found
    ]
    assert not found, "imports run in a circle; make them point one way:\n" + "\n".join(lines)


def test_lower_layers_never_import_upper_ones(graph):
    _, imports = graph
    wrong = [f"{i}  ({area(i.importer)}/ must not import from {area(i.target)})" for i in imports
             if area(i.target) in FORBIDDEN.get(area(i.importer), ())]
    assert not wrong, "an import runs back up the layers:\n" + "\n".join(wrong)


def test_no_private_names_across_subpackages(graph):
    modules, imports = graph
    wrong = private_crossings(imports, modules)
    assert not wrong, (
        "private names (or private modules) imported from another package; make them public there, or move them:\n"
        + "\n".join(str(i) for i in wrong)
    )
