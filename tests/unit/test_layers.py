"""The package's layout is its architecture: a module's layer is the package it lives in.

Every module under src/handoff is parsed with ``ast`` (nothing is imported). Imports point
one way, down this list: formats (pure parsers of what crosses a boundary), core (the
decisions), system (one kernel facility each), master (the event loop and what it
delegates to), cli (the commands and the control client), demo (tools the master never
imports). A module may import its own package and the packages below it. formats and core
touch no OS, clock or logging. The size limits keep each file one thing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

PACKAGE: Final = Path(__file__).resolve().parents[2] / "src" / "handoff"

# The layers, bottom first. The package's own flat modules: __init__ (the map and the
# version) and errors (HandoffError) sit below everything; __main__ is the cli.
LAYER_ORDER: Final = ("formats", "core", "system", "master", "cli", "demo")
FLAT_MODULES: Final = {"__init__": -1, "errors": -1, "__main__": LAYER_ORDER.index("cli")}
PURE_LAYERS: Final = frozenset({"formats", "core"})
MAX_MODULE_LINES: Final = 420
MAX_CLASS_LINES: Final = 300

# Standard-library and third-party modules that mean OS access, a clock, threads or I/O.
FORBIDDEN_IN_PURE: Final = frozenset(
    {
        "os",
        "socket",
        "subprocess",
        "selectors",
        "select",
        "fcntl",
        "ctypes",
        "resource",
        "time",
        "threading",
        "asyncio",
        "psutil",
        "structlog",
        "setproctitle",
        "click",
        "logging",
    }
)
# Imports allowed against the direction, each inside a function only, with its reason:
# `handoff demo` loads the demo (and asyncio) only when that command runs.
ALLOWED_LOCAL_UPWARD: Final = frozenset({("cli.main", "demo.run")})


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # "handoff.<pkg>.<module>" (or "handoff.<flat>") or a top-level name
    line: int
    local: bool  # inside a function or method body


def handoff_modules() -> list[str]:
    """Every module as a dotted name relative to the package: 'core.machine', 'errors'."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.append(".".join(parts))
    return names


def layer_of(name: str) -> int:
    """The layer index of a module: its package's place in LAYER_ORDER."""
    head, dot, _ = name.partition(".")
    if not dot:
        return FLAT_MODULES[head]
    return LAYER_ORDER.index(head)


def package_of(name: str) -> str:
    head, dot, _ = name.partition(".")
    return head if dot else ""


def _path(name: str) -> Path:
    return PACKAGE.joinpath(*name.split(".")).with_suffix(".py")


def imports_of(name: str) -> list[Import]:
    tree = ast.parse(_path(name).read_text(encoding="utf-8"), filename=name)
    package = package_of(name)
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            match child:
                case ast.Import(names=aliases):
                    for alias in aliases:
                        found.append(Import(_resolve(alias.name, None), child.lineno, local))
                case ast.ImportFrom(module=module, names=aliases, level=level):
                    if level:  # relative: from the module's own package (or its parent)
                        base = ["handoff", *([package] if package and level == 1 else [])]
                        target = ".".join([*base, *([module] if module else [])])
                    else:
                        target = module or ""
                    for alias in aliases:
                        found.append(Import(_resolve(target, alias.name), child.lineno, local))
            visit(child, inner)

    visit(tree, local=False)
    return found


def _resolve(module: str, name: str | None) -> str:
    """Map an import to the handoff module file it loads, or to a top-level name."""
    parts = module.split(".")
    if parts[0] != "handoff":
        return parts[0]
    inner = parts[1:]
    if name is not None and _path(".".join([*inner, name])).exists():
        inner = [*inner, name]  # from handoff.core import machine
    if not inner:
        return "handoff.__init__"  # import handoff / from handoff import __version__
    return "handoff." + ".".join(inner)


def layer_violations(name: str) -> list[str]:
    layer = layer_of(name)
    problems: list[str] = []
    for imp in imports_of(name):
        where = f"{name}:{imp.line}"
        if imp.module.startswith("handoff."):
            target = imp.module.removeprefix("handoff.")
            try:
                target_layer = layer_of(target)
            except (KeyError, ValueError):
                problems.append(f"{where} imports {target}, which is in no layer")
                continue
            if target_layer > layer and not (imp.local and (name, target) in ALLOWED_LOCAL_UPWARD):
                problems.append(
                    f"{where}: {package_of(name) or name} module imports {target} "
                    f"({package_of(target)})"
                )
        elif (package_of(name) in PURE_LAYERS or layer < 0) and imp.module in FORBIDDEN_IN_PURE:
            problems.append(f"{where}: pure module imports {imp.module}")
    return problems


def test_every_module_lives_in_a_layer_package() -> None:
    flat = [name for name in handoff_modules() if "." not in name]
    nested = {name.split(".")[0] for name in handoff_modules() if "." in name}

    assert sorted(flat) == sorted(FLAT_MODULES)
    assert nested == set(LAYER_ORDER)


@pytest.mark.parametrize("name", handoff_modules())
def test_imports_point_only_downward(name: str) -> None:
    assert layer_violations(name) == []


@pytest.mark.parametrize("name", handoff_modules())
def test_modules_stay_small(name: str) -> None:
    source = _path(name).read_text(encoding="utf-8")
    classes = [
        (node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
    ]

    assert len(source.splitlines()) <= MAX_MODULE_LINES
    assert [c for c in classes if c[1] > MAX_CLASS_LINES] == []


@pytest.mark.parametrize("package", LAYER_ORDER)
def test_each_layer_package_says_what_it_is(package: str) -> None:
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))

    assert docstring, f"{package}/__init__.py needs a docstring saying what the layer holds"


def test_the_package_opens_with_its_map() -> None:
    docstring = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""

    for package in LAYER_ORDER:
        assert f"{package}/" in docstring


# -- the checker itself ---------------------------------------------------------------------


def _check_source(
    name: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> list[str]:
    for other in handoff_modules():
        target = tmp_path.joinpath(*other.split(".")).with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("", encoding="utf-8")
    tmp_path.joinpath(*name.split(".")).with_suffix(".py").write_text(source, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    return layer_violations(name)


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("core.machine", "from handoff.master import loop\n", ["imports master.loop (master)"]),
        (
            "core.machine",
            "from handoff.system.children import spawn\n",
            ["imports system.children (system)"],
        ),
        ("core.timers", "import handoff.system.process_tree\n", ["system.process_tree"]),
        ("formats.options", "from handoff.core import model\n", ["imports core.model (core)"]),
        ("core.events", "from . import machine\n", []),
        ("core.events", "from .machine import Supervisor\n", []),
        ("core.events", "from ..system import children\n", ["imports system.children"]),
        ("system.children", "from handoff.master.logs import emit\n", ["master.logs (master)"]),
        ("core.model", "import os\n", ["pure module imports os"]),
        ("core.machine", "def f():\n    import os\n", ["pure module imports os"]),
        ("formats.worker_contract", "import os.path\n", ["pure module imports os"]),
        ("errors", "from time import monotonic\n", ["pure module imports time"]),
        ("core.events", "from handoff import __version__, errors\n", []),
        ("master.loop", "import os, psutil\nfrom handoff.system import children\n", []),
        ("master.loop", "from handoff.cli import main\n", ["imports cli.main (cli)"]),
        ("cli.main", "from handoff.demo import run\n", ["imports demo.run (demo)"]),
        ("cli.main", "def f():\n    from handoff.demo.run import run_demo\n", []),
        ("system.children", "from handoff.nowhere import x\n", ["which is in no layer"]),
    ],
)
def test_the_checker_catches_upward_imports(
    name: str, source: str, expected: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    problems = _check_source(name, source, monkeypatch, tmp_path)

    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem
