"""The layering of DESIGN.md's one direction of flow, checked on the source so that a back-edge fails
`make test` where it is written, not when someone later wonders why serving pulls in the compiler.

Every `import` and `from ... import` of lcc's modules and of backends/ (installed as `lcc.backends`, the
package-dir of pyproject.toml) is read with `ast`, including those inside functions: lcc imports lazily to
keep `import lcc` and the CLI fast, so a check of module-level imports alone would miss most back-edges.
Each rule says which parts of lcc a package may not import. One more check follows module-level imports
transitively: importing any module of the runtime or of serving must not load the compiler through a
module in between. docs/architecture.md states the same rules, and the last test keeps the modules and
names it cites in step with the code."""

from __future__ import annotations

import ast
import re
import tomllib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module name."""

    importer: str
    target: str
    where: str  # file:line, the file relative to the tree's root
    eager: bool  # runs when the importer is imported: not inside a function, not under `if TYPE_CHECKING:`


@dataclass(frozen=True)
class Rule:
    """Modules under `importers` import none of `forbidden`; with `only` set, they import no part of lcc
    outside `only` and themselves."""

    importers: tuple[str, ...]
    why: str
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None

    def covers(self, module: str) -> bool:
        return any(within(module, package) for package in self.importers)

    def forbids(self, target: str) -> bool:
        if any(within(target, package) for package in self.forbidden):
            return True
        if self.only is None or not within(target, "lcc"):
            return False
        return not any(within(target, package) for package in (*self.importers, *self.only))


RULES = (
    Rule(("lcc.runtime", "lcc.serve", "lcc.ops"), forbidden=("lcc.compiler",),
         why="the runtime and serving read plans and never import the compiler (lcc.ops: what their programs call)"),
    Rule(("lcc.plan",), only=("lcc.spec",),
         why="the plan is the data compiler and runtime share: besides itself it imports only lcc.spec"),
    Rule(("lcc.spec",), only=(), why="the spec knows nothing downstream"),
    Rule(("lcc.model",), forbidden=("lcc.compiler", "lcc.plan", "lcc.ops", "lcc.runtime", "lcc.serve"),
         why="the model knows nothing of how it is compiled or run"),
    Rule(("lcc.backends",), forbidden=("lcc.compiler", "lcc.plan", "lcc.runtime", "lcc.serve"),
         why="kernels know nothing of plans"),
    Rule(("lcc.compiler",), forbidden=("lcc.runtime", "lcc.serve"),
         why="the compiler emits plans as data and never executes them"),
)

def why(package: str) -> str:
    return next(rule.why for rule in RULES if rule.importers[0] == package)


# importing these, at any depth of module-level imports, must not load the compiler
COMPILER_FREE = ("lcc.runtime", "lcc.serve", "lcc.ops", "lcc.plan")


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def package_roots(root: Path) -> dict[str, Path]:
    """Each top-level package's folder: `lcc`, and the package-dir entries of pyproject.toml."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {"lcc": root / "lcc", **{name: root / folder for name, folder in setuptools["package-dir"].items()}}


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name and its file."""
    found: dict[str, Path] = {}
    for name, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def statements(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every statement (imports are statements, so expressions are not entered), and whether it runs when
    its module is imported."""
    stack: list[tuple[ast.AST, bool]] = [(tree, True)]
    while stack:
        node, eager = stack.pop()
        yield node, eager
        inside = eager and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                deferred = field == "body" and isinstance(node, ast.If) and is_type_checking(node.test)
                stack.extend((child, inside and not deferred) for child in children)


def imports(found: dict[str, Path], base: Path) -> list[Import]:
    """Every import of every module in `found`, its target resolved: `from lcc import compiler` imports the
    module lcc.compiler, `from lcc.plan import Plan` the module lcc.plan, `from ..spec import x` is made
    absolute."""
    out: list[Import] = []
    for module, path in found.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, eager in statements(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    parts = package.split(".")
                    source = ".".join([*parts[:len(parts) - node.level + 1], *([source] if source else [])])
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in found else source for a in node.names]
            else:
                continue
            where = f"{path.relative_to(base)}:{node.lineno}"
            out.extend(Import(module, target, where, eager) for target in targets)
    return out


def violations(found_imports: list[Import], rules: tuple[Rule, ...]) -> list[str]:
    return [f"{imp.where}: {imp.importer} imports {imp.target}: {rule.why}"
            for imp in found_imports for rule in rules if rule.covers(imp.importer) and rule.forbids(imp.target)]


def reaches(found: dict[str, Path], found_imports: list[Import], starts: tuple[str, ...], forbidden: str) -> list[str]:
    """The chains of module-level imports by which importing a module of `found` under `starts` loads
    `forbidden` (importing a module also runs its packages' __init__)."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for imp in found_imports:
        if imp.eager and imp.target.startswith("lcc"):
            edges.setdefault(imp.importer, []).append((imp.target, imp.where))
    came_from: dict[str, tuple[str, str] | None] = {m: None for m in sorted(found) if any(within(m, s) for s in starts)}
    queue = deque(came_from)
    while queue:
        module = queue.popleft()
        parents = [(module.rpartition(".")[0], "its package")] if "." in module else []
        for target, where in edges.get(module, []) + parents:
            if target not in came_from:
                came_from[target] = (module, where)
                queue.append(target)
    chains = []
    for module in sorted(m for m in came_from if within(m, forbidden)):
        chain, step = [module], came_from[module]
        while step is not None:
            chain.append(f"{step[0]} ({step[1]})")
            step = came_from[step[0]]
        chains.append(" <- ".join(chain))
    return chains


@pytest.fixture(scope="module")
def lcc_modules() -> dict[str, Path]:
    return modules(package_roots(ROOT))


@pytest.fixture(scope="module")
def lcc_imports(lcc_modules) -> list[Import]:
    return imports(lcc_modules, ROOT)


def test_the_checker_sees_every_package(lcc_imports):
    importers = {imp.importer for imp in lcc_imports}
    for rule in RULES:
        for package in rule.importers:
            assert any(within(m, package) for m in importers), f"no imports read under {package}"


@pytest.mark.parametrize("rule", RULES, ids=[rule.importers[0] for rule in RULES])
def test_no_package_imports_what_its_layer_forbids(rule, lcc_imports):
    found = violations(lcc_imports, (rule,))
    assert not found, "imports against the layering (DESIGN.md, docs/architecture.md):\n" + "\n".join(found)


def test_importing_the_runtime_or_serving_never_loads_the_compiler(lcc_modules, lcc_imports):
    chains = reaches(lcc_modules, lcc_imports, COMPILER_FREE, "lcc.compiler")
    assert not chains, "module-level imports that load the compiler:\n" + "\n".join(chains)


def tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return modules({"lcc": root / "lcc", "lcc.backends": root / "backends"})


def test_a_forbidden_import_is_named_with_its_file_and_line(tmp_path):
    found = tree(tmp_path, {
        "lcc/__init__.py": "",
        "lcc/compiler/__init__.py": "",
        "lcc/compiler/plan.py": "",
        "lcc/spec/__init__.py": "",
        "lcc/runtime/__init__.py": "",
        "lcc/runtime/engine.py": "import os\n\n\ndef run():\n    from lcc.compiler.plan import compile_plan\n",
        "lcc/serve/__init__.py": "from .. import compiler\n",
        "lcc/plan/__init__.py": "from lcc.spec import Spec\nfrom lcc import runtime\n",
        "backends/__init__.py": "from lcc.plan import Plan\n",
    })
    found_imports = imports(found, tmp_path)
    assert sorted(violations(found_imports, RULES)) == [
        f"backends/__init__.py:1: lcc.backends imports lcc.plan: {why('lcc.backends')}",
        f"lcc/plan/__init__.py:2: lcc.plan imports lcc.runtime: {why('lcc.plan')}",
        f"lcc/runtime/engine.py:5: lcc.runtime.engine imports lcc.compiler.plan: {why('lcc.runtime')}",
        f"lcc/serve/__init__.py:1: lcc.serve imports lcc.compiler: {why('lcc.runtime')}",
    ]


def test_a_compiler_reached_through_another_module_is_named_with_the_chain(tmp_path):
    found = tree(tmp_path, {
        "lcc/__init__.py": "",
        "lcc/compiler/__init__.py": "",
        "lcc/helpers.py": "import lcc.compiler\n",
        "lcc/runtime/__init__.py": "",
        "lcc/runtime/engine.py": "from typing import TYPE_CHECKING\n\nfrom lcc import helpers\n",
        "lcc/runtime/lazy.py": "def f():\n    import lcc.helpers\n\nif TYPE_CHECKING:\n    import lcc.compiler\n",
    })
    found_imports = imports(found, tmp_path)
    assert violations(found_imports, RULES) == [
        f"lcc/runtime/lazy.py:5: lcc.runtime.lazy imports lcc.compiler: {why('lcc.runtime')}"]
    assert reaches(found, found_imports, COMPILER_FREE, "lcc.compiler") == [
        "lcc.compiler <- lcc.helpers (lcc/helpers.py:1) <- lcc.runtime.engine (lcc/runtime/engine.py:3)"]


def top_level_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_the_architecture_page_names_what_exists(lcc_modules):
    """docs/architecture.md is the map newcomers follow: every module, `module.name` and path it names
    exists, so a module split or renamed without the page failing here."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for dotted in sorted(set(re.findall(r"\blcc(?:\.\w+)+", text))):
        parts = dotted.split(".")
        known = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in lcc_modules), 0)
        module = ".".join(parts[:known])
        if not known or (known < len(parts) and parts[known] not in top_level_names(lcc_modules[module])):
            missing.append(dotted)
    for path in sorted(set(re.findall(r"\b(?:lcc|backends|tests|docs)/[\w/.]*\w", text))):
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"docs/architecture.md names what does not exist: {', '.join(missing)}"


MAX_LINES = 450  # a module longer than this says in its docstring why it is "one piece"


def oversized(found: dict[str, Path]) -> list[str]:
    """Modules over MAX_LINES lines whose docstring does not say why they must stay one piece."""
    found_big = []
    for _, path in sorted(found.items()):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and "one piece" not in (ast.get_docstring(ast.parse(text)) or ""):
            found_big.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {lines} lines")
    return found_big


def test_no_module_is_over_the_size_limit_without_saying_why(lcc_modules):
    found = oversized(lcc_modules)
    assert not found, (f"modules over {MAX_LINES} lines; split them by concern, or say in the docstring why "
                       "each must be one piece:\n" + "\n".join(found))


def test_an_oversized_module_is_named_unless_it_says_why(tmp_path):
    body = "x = 1\n" * (MAX_LINES + 1)
    found = tree(tmp_path, {"lcc/big.py": '"""Many things."""\n' + body,
                            "lcc/kept.py": '"""A table that is one piece: split, it would be read in two."""\n' + body,
                            "lcc/small.py": '"""Small."""\nx = 1\n'})
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in oversized(found)] == ["big.py"]
