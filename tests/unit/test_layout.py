"""The package's shape: no import cycles, modules and functions of a readable size.

Read with ``ast`` from the source files (nothing is imported). Imports inside functions count:
a cycle hidden in a function still ties two modules together; imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "tracekit"

MAX_MODULE_LINES = 800

MAX_FUNCTION_LINES = 80
"""Lines of a function's body (signatures and docstrings not counted, see :func:`_body_lines`)."""

LONG_FUNCTIONS = {
    # Triton kernel bodies: one kernel is one scheduling unit; splitting it into helper
    # functions changes what Triton can overlap, and each was measured as written
    "engines/cuda/ops/_attention_kernel.py:decode_attention_kernel",
    "engines/cuda/ops/_block_kernel.py:block_gemv_kernel",
    "engines/cuda/ops/_gemv_kernel.py:gemv_kernel",
}
"""``path:function`` allowed past :data:`MAX_FUNCTION_LINES`, each with its reason."""

TO_SPLIT: set[str] = set()
"""Modules and functions still past the limits, to be split: this set only shrinks (a test
fails when an entry is no longer too long, so that it is taken out)."""


def _signature_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node``'s decorators, signature and docstring."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return (body[0].lineno if body else node.end_lineno + 1) - start  # type: ignore[operator]


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node``'s body without its signature and docstring, nor those of the functions
    defined inside it (a typer command's signature is its table of options)."""
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    total = node.end_lineno - start + 1  # type: ignore[operator]
    inner = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return total - sum(_signature_lines(n) for n in inner)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The tracekit modules ``path`` (module ``name``) imports at run time."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # ``from pkg import module`` imports the module; ``from pkg import name``, pkg
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    # the checker itself: a cycle, and one broken by TYPE_CHECKING
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tracekit.errors import InputError\n"
        "def f():\n    from tracekit.console import console\n"
    )
    modules = {"tracekit.errors": src, "tracekit.console": src, "tracekit.m": src}
    assert _imports(src, "tracekit.m", modules) == {"tracekit.console"}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def _too_long() -> dict[str, int]:
    """``path`` or ``path:function`` -> lines, for every module and function past the limits."""
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            found[rel] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _body_lines(node)
                if lines > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    found[f"{rel}:{node.name}"] = lines
    return found


def test_modules_and_functions_stay_readable():
    too_long = _too_long()
    assert sorted(set(too_long) - TO_SPLIT) == []  # new ones: split them
    assert sorted(TO_SPLIT - set(too_long)) == []  # split already: take them off the list
