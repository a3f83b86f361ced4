"""The test suite itself: no test module depends on another, and none changes the environment for those after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SOURCES = sorted(TESTS.glob("*.py"))
TEST_MODULES = {path.stem for path in TESTS.glob("test_*.py")}


def imported_test_modules(tree: ast.Module) -> set[str]:
    """The tests/test_*.py modules that the imports of the tree name, however they are spelled."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):  # import tests.test_x, import test_x
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(parts[1] if parts[0] == "tests" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "tests":
                continue
            if node.level == 0:
                parts = parts[1:]  # from tests.test_x import ..., from tests import test_x
            if parts and parts[0]:
                found.add(parts[0])  # from .test_x import ...
            else:
                found.update(alias.name for alias in node.names)  # from . import test_x
    return found & TEST_MODULES


def environment_writes(tree: ast.Module) -> list[int]:
    """Lines that change os.environ in place rather than through monkeypatch (which undoes it after the test)."""
    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
            and node.value.id == "os"

    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if (is_environ(func.value) and func.attr in {"update", "setdefault", "pop", "popitem", "clear"}) or (
                    isinstance(func.value, ast.Name) and func.value.id == "os" and func.attr in {"putenv", "unsetenv"}):
                lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_no_module_of_the_suite_imports_a_test_module(path):
    """Shared helpers live in conftest.py or a helper module (support.py, gguf_writer.py), never in a test module:
    importing one runs it twice under two names and ties its tests to another's."""
    imported = imported_test_modules(ast.parse(path.read_text(), filename=str(path)))
    assert not imported, f"{path.name} imports from {', '.join(sorted(imported))}: move what it uses to tests/conftest.py " \
                         "or tests/support.py"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_no_module_of_the_suite_changes_os_environ_in_place(path):
    lines = environment_writes(ast.parse(path.read_text(), filename=str(path)))
    assert not lines, f"{path.name} changes os.environ on line(s) {lines}: use monkeypatch.setenv (or the state_dir " \
                      "fixture), so the next test finds the environment as it was"


@pytest.mark.parametrize("source, offenders", [
    ("from tests.test_cli import assert_one_line_error", {"test_cli"}),
    ("import tests.test_launcher", {"test_launcher"}),
    ("from tests import test_export, conftest", {"test_export"}),
    ("from . import test_node_service", {"test_node_service"}),
    ("from .test_hostile_input import DEMO", {"test_hostile_input"}),
    ("from tests.conftest import run_speed\nfrom tests.support import steps\nimport json", set()),
])
def test_the_import_check_sees_every_spelling(source, offenders):
    assert imported_test_modules(ast.parse(source)) == offenders


@pytest.mark.parametrize("source, lines", [
    ('import os\nos.environ["SPEED_STATE_DIR"] = "/tmp/x"', [2]),
    ('import os\nos.environ.update(A="1")\ndel os.environ["A"]\nos.environ.pop("B", None)', [2, 3, 4]),
    ('import os\nos.putenv("A", "1")', [2]),
    ('import os\nenv = {**os.environ, "A": "1"}\nvalue = os.environ.get("A")', []),
])
def test_the_environment_check_sees_writes_and_not_reads(source, lines):
    assert environment_writes(ast.parse(source)) == lines
