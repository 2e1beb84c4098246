"""The code stays small enough to read: no module over 500 lines, no function over 80.

Cyclomatic complexity (at most 15 per function) is ruff's C901 in `make lint`; lengths are
checked here because ruff has no rule for them. Migration revisions are left out: each is a
list of DDL statements read top to bottom, and splitting one would only scatter it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "kessai",
    "kessai_cli",
    "command_service",
    "query_service",
    "projector",
    "reconciler",
    "rewards",
    "migrations",
    "bench",
)
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    found = [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "versions" not in path.relative_to(ROOT).parts
    ]
    assert len(found) > 50, "the packages moved: update PACKAGES"
    return found


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_is_over_80_lines() -> None:
    long: dict[str, int] = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert long == {}
