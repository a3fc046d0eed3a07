"""Sizes a person can hold: the code folders' files and functions, and the README."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("toolchain", "ops", "exporters", "runtime")
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_README_LINES = 500, 80, 200


def _sources():
    return sorted(p for folder in CODE for p in (ROOT / folder).rglob("*.py"))


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_limit():
    long = {}
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES
