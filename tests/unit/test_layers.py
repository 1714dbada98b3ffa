"""Imports point only downward (design: layer 0 pure, layer 1 OS mechanics, layer 2 shell).

Every module under src/handoff is parsed with ``ast`` (nothing is imported). A module may
import handoff modules of its own layer or lower; layer 0 may not touch the OS at all.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

PACKAGE: Final = Path(__file__).resolve().parents[2] / "src" / "handoff"

LAYERS: Final[dict[str, int]] = {
    # Layer 0: pure, no syscalls; the machine and what it reads and returns.
    "__init__": 0,  # the package itself: only __version__
    "errors": 0,
    "config": 0,
    "model": 0,
    "events": 0,
    "actions": 0,
    "timers": 0,
    "policy": 0,
    "readiness": 0,
    "machine": 0,
    "protocol": 0,
    "procfs": 0,
    "controlwire": 0,
    "systemdstate": 0,
    # Layer 1: OS mechanics, one kernel facility each.
    "sockets": 1,
    "signals": 1,
    "children": 1,
    "notify": 1,
    "proc": 1,
    "warden": 1,
    "scan": 1,
    "detach": 1,
    "activation": 1,
    "sdnotify": 1,
    # Layer 2: the shell, and the tools around it.
    "loop": 2,
    "cli": 2,
    "master": 2,
    "control": 2,
    "status": 2,
    "client": 2,
    "commands": 2,
    "logs": 2,
    "demo": 2,
    "demoapp": 2,
    "drill": 2,
    "loadgen": 2,
    "httpwire": 2,
    "__main__": 2,
}

# Standard-library and third-party modules that mean OS access, a clock, threads or I/O.
FORBIDDEN_IN_LAYER_0: Final = frozenset(
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
# Function-local imports allowed in layer 0, each with its reason. model.py decodes wait
# statuses with os.WIFSIGNALED/WTERMSIG/waitstatus_to_exitcode: pure bit operations, no
# syscall. It stays allowed only as a local import inside a function, so a module-level
# 'import os' in model.py still fails this test.
ALLOWED_LOCAL_IN_LAYER_0: Final = frozenset({("model", "os")})


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the top-level name for non-handoff imports, else "handoff.<module>"
    line: int
    local: bool  # inside a function or method body


def handoff_modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def imports_of(name: str) -> list[Import]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"), filename=name)
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            match child:
                case ast.Import(names=aliases):
                    for alias in aliases:
                        found.append(Import(_resolve(alias.name, None), child.lineno, local))
                case ast.ImportFrom(module=module, names=aliases, level=level):
                    base = "handoff" if level else None
                    target = f"{base}.{module}" if base and module else (module or base or "")
                    for alias in aliases:
                        found.append(Import(_resolve(target, alias.name), child.lineno, local))
            visit(child, inner)

    visit(tree, local=False)
    return found


def _resolve(module: str, name: str | None) -> str:
    """Map an import to 'handoff.<module>' (the module file it loads) or a top-level name."""
    parts = module.split(".")
    if parts[0] != "handoff":
        return parts[0]
    if len(parts) > 1:
        return f"handoff.{parts[1]}"
    if name is not None and (PACKAGE / f"{name}.py").exists():
        return f"handoff.{name}"  # from handoff import machine
    return "handoff.__init__"  # import handoff / from handoff import __version__


def layer_violations(name: str) -> list[str]:
    layer = LAYERS[name]
    problems: list[str] = []
    for imp in imports_of(name):
        where = f"{name}.py:{imp.line}"
        if imp.module.startswith("handoff."):
            target = imp.module.removeprefix("handoff.")
            if target not in LAYERS:
                problems.append(f"{where} imports {target}, which is not in LAYERS")
            elif LAYERS[target] > layer:
                problems.append(
                    f"{where}: layer {layer} module imports {target} (layer {LAYERS[target]})"
                )
        elif layer == 0 and imp.module in FORBIDDEN_IN_LAYER_0:
            if imp.local and (name, imp.module) in ALLOWED_LOCAL_IN_LAYER_0:
                continue
            problems.append(f"{where}: layer 0 module imports {imp.module}")
    return problems


def test_every_module_has_a_layer() -> None:
    missing = [name for name in handoff_modules() if name not in LAYERS]

    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("name", handoff_modules())
def test_imports_point_only_downward(name: str) -> None:
    if name not in LAYERS:
        pytest.fail(f"{name} has no layer (see test_every_module_has_a_layer)")

    assert layer_violations(name) == []


@pytest.mark.parametrize("name", handoff_modules())
def test_docstring_names_the_same_layer(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree) or ""

    for layer in range(3):
        if f"Layer {layer}" in docstring and name in LAYERS:
            assert LAYERS[name] == layer, f"{name}.py says Layer {layer}, LAYERS says otherwise"


# -- the checker itself ---------------------------------------------------------------------


def _check_source(
    name: str, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> list[str]:
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    for other in LAYERS:
        if other != name:
            (tmp_path / f"{other}.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    return layer_violations(name)


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("machine", "from handoff import loop\n", ["layer 0 module imports loop (layer 2)"]),
        ("machine", "from handoff.children import spawn\n", ["layer 0 module imports children"]),
        ("timers", "import handoff.proc\n", ["layer 0 module imports proc (layer 1)"]),
        ("config", "from . import sockets\n", ["layer 0 module imports sockets (layer 1)"]),
        ("events", "from .notify import x\n", ["layer 0 module imports notify (layer 1)"]),
        ("proc", "from handoff.logs import emit\n", ["layer 1 module imports logs (layer 2)"]),
        ("model", "import os\n", ["layer 0 module imports os"]),
        ("model", "def f():\n    import os\n", []),
        ("machine", "def f():\n    import os\n", ["layer 0 module imports os"]),
        ("protocol", "import os.path\n", ["layer 0 module imports os"]),
        ("errors", "from time import monotonic\n", ["layer 0 module imports time"]),
        ("events", "from handoff import __version__, model\n", []),
        ("loop", "import os, psutil\nfrom handoff import cli\n", []),
        ("children", "from handoff import signals, model\nimport os\n", []),
    ],
)
def test_the_checker_catches_upward_imports(
    name: str, source: str, expected: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    problems = _check_source(name, source, monkeypatch, tmp_path)

    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem
