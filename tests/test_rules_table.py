"""The README's "Where each rule lives" table (issue #19) names files that exist and, in backticks after each file,
functions, classes or tables defined in that file, so that the table cannot rot silently when code moves."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADING = "## Where each rule lives"
SOURCES = (".py", ".cc", ".h")


def rule_rows() -> list[list[str]]:
    """The cells of the section's first table, without its header and separator rows."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert HEADING in lines, f"README.md has no {HEADING!r} section"
    rows: list[list[str]] = []
    for line in lines[lines.index(HEADING) + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break  # the end of the first table
    return rows[2:]


def python_names(path: pathlib.Path) -> set[str]:
    """Module-level functions, classes and assigned names, and methods as Class.method."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def cpp_code(path: pathlib.Path) -> str:
    """The file without comments and string literals: a name mentioned only there does not count."""
    text = path.read_text()
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', " ", text, flags=re.DOTALL)


def problems(where: str) -> list[str]:
    found: list[str] = []
    current: pathlib.Path | None = None
    defined: set[str] = set()
    code = ""
    for span in re.findall(r"`([^`]+)`", where):
        if span.endswith(SOURCES) and "/" in span:
            current = ROOT / span
            if not current.is_file():
                found.append(f"{span}: no such file")
                current = None
                continue
            defined = python_names(current) if span.endswith(".py") else set()
            code = "" if span.endswith(".py") else cpp_code(current)
            continue
        if current is None:
            found.append(f"`{span}` comes before any existing file it could live in")
        elif current.suffix == ".py":
            if span not in defined:
                found.append(f"`{span}` is not defined in {current.relative_to(ROOT)}")
        elif not re.search(r"\b" + re.escape(span) + r"\b", code):
            found.append(f"`{span}` does not appear in the code of {current.relative_to(ROOT)}")
    return found


ROWS = rule_rows()


def test_the_table_covers_the_rules() -> None:
    assert len(ROWS) >= 15, f"only {len(ROWS)} rows in the README's table of rules"
    for row in ROWS:
        assert len(row) == 3 and all(row), f"a row needs a rule, a place and its copies: {row}"


@pytest.mark.parametrize("row", ROWS, ids=[r[0][:40] for r in ROWS])
def test_each_named_file_and_function_exists(row: list[str]) -> None:
    where = " ".join(row[1:])
    assert re.search(r"`[^`]+\.(py|cc|h)`", where), f"{row[0]!r} names no file"
    assert problems(where) == [], f"{row[0]!r}: {problems(where)}"


def test_the_checker_catches_rot() -> None:
    # Proves the checks above can fail: a moved file, a renamed function, a name only in a comment.
    assert problems("`gateway/gone.py` `x`")
    assert problems("`gateway/routing.py` `Workers.no_such_method`")
    assert problems("`worker/native/check.cc` `no_such_function`")
    assert problems("`no_file_yet`")
    assert not problems("`gateway/routing.py` `Workers.ready_on`; `worker/native/check.cc` `validate`")
