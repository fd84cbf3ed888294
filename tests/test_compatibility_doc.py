"""docs/compatibility.md stays true: every row marked supported ("yes" in the asgl column)
names at least one test as `tests/<file>.py::<test>`, and each named test exists (a
module-level `def` / `async def` of that name in that file); the other rows say "not yet"
or "no"."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "compatibility.md")
_TEST_REF = re.compile(r"`?(tests/[\w/]+\.py)::(\w+)`?")


def _rows() -> list[list[str]]:
    rows = []
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("|") or line.startswith("| ---") or \
                    line.startswith("| field or route"):
                continue
            # "\|" inside a cell is a literal bar
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
    return rows


def _functions(path: str) -> set[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_supported_row_names_an_existing_test():
    rows = _rows()
    assert len(rows) > 40
    supported = 0
    for cells in rows:
        assert len(cells) == 5, cells
        row, asgl, tests = cells[0], cells[3], cells[4]
        assert asgl.startswith(("yes", "not yet", "no")), (row, asgl)
        refs = _TEST_REF.findall(tests)
        if asgl.startswith("yes"):
            supported += 1
            assert refs, f"supported row without a test: {row}"
        for path, name in refs:
            assert os.path.exists(os.path.join(ROOT, path)), (row, path)
            assert name in _functions(path), f"{row}: {path}::{name} does not exist"
    assert supported > 30
