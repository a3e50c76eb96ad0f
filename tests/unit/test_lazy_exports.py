"""The lazily exported names (tracekit._lazy): each package's lazy table, ``__all__`` and
``if TYPE_CHECKING:`` imports list the same names from the same modules, and every name
resolves to the object its module defines (a typo in a table only shows on first access)."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

PACKAGES = ["tracekit", "tracekit.config", "tracekit.features", "tracekit.judge"]


def _type_checking_imports(package: object) -> dict[str, str]:
    """name -> module of the ``from module import name`` under ``if TYPE_CHECKING:``."""
    tree = ast.parse(inspect.getsource(package))  # type: ignore[arg-type]
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for child in node.body:
                assert isinstance(child, ast.ImportFrom) and child.module
                found.update({alias.name: child.module for alias in child.names})
    return found


@pytest.mark.parametrize("name", PACKAGES)
def test_lazy_names_agree_and_resolve(name):
    package = importlib.import_module(name)
    table: dict[str, str] = package._LAZY
    assert set(package.__all__) - {"__version__"} == set(table)
    assert set(table) <= set(dir(package))
    hinted = _type_checking_imports(package)
    if hinted:  # the names type checkers see come from the modules the table imports
        assert hinted == table
    for public, module in table.items():
        assert getattr(package, public) is getattr(importlib.import_module(module), public)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018
