"""No function body in src/ runs over MAX_LINES lines unless it says why it must be one piece.

The body is counted from the line after the signature (the docstring included): the formatter
puts each parameter of a long signature on its own line, which adds lines but no logic.

A long function is split where that is simple; where it is not (a training loop whose closures
share the state a checkpoint saves, ...), a comment line starting with `# one piece:` and giving the
reason sits at its top: between the `def` line and its first statement after the docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80
MARK = "# one piece:"
MIN_REASON_CHARS = 20  # the mark alone, or a word after it, is no reason


def _top_end(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The last line (1-based) where the mark may sit: the line before the first statement after the
    docstring (the function's last line when the docstring is all there is)."""
    body = node.body
    has_docstring = (
        isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    )
    first = body[1] if has_docstring and len(body) > 1 else (None if has_docstring else body[0])
    return (first.lineno - 1) if first is not None else node.end_lineno


def _says_why(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for line in lines[node.lineno - 1 : _top_end(node)]:
        text = line.strip()
        if text.startswith(MARK) and len(text[len(MARK) :].strip()) >= MIN_REASON_CHARS:
            return True
    return False


def long_functions(source: str, filename: str = "<source>") -> list[str]:
    """'file:line name (N lines)' of every function over MAX_LINES lines without the mark at its top."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        n_lines = node.end_lineno - node.body[0].lineno + 1  # the body, docstring included
        if n_lines > MAX_LINES and not _says_why(lines, node):
            found.append(f"{filename}:{node.lineno} {node.name} ({n_lines} lines)")
    return found


def test_no_function_in_src_is_long_without_saying_why():
    offenders = [f for p in sorted(SRC.rglob("*.py")) for f in long_functions(p.read_text(), str(p.relative_to(SRC)))]
    assert not offenders, (
        f"functions over {MAX_LINES} lines: split them, or put a `{MARK} <why>` comment at the top:\n"
        + "\n".join(offenders)
    )


def _function(
    body_lines: int,
    docstring: bool = True,
    mark_at: int | None = None,
    reason: str = "the loop shares the checkpointed state",
) -> str:
    """A function of 1 (def) + body_lines lines (its body); the mark replaces body line `mark_at` (0-based)."""
    body = ['    """Doc."""'] if docstring else []
    body += [f"    x{i} = {i}" for i in range(body_lines - len(body))]
    if mark_at is not None:
        body.insert(mark_at, f"    {MARK} {reason}")
        body.pop()
    return "def f():\n" + "\n".join(body) + "\n"


@pytest.mark.parametrize(
    "source, flagged",
    [
        (_function(MAX_LINES), False),  # a body of exactly MAX_LINES lines
        (_function(MAX_LINES + 1), True),
        ("def f(\n" + "".join(f"    a{i},\n" for i in range(30)) + "):\n    return 0\n", False),  # long signature
        (_function(MAX_LINES + 20, mark_at=1), False),  # right after the docstring
        (_function(MAX_LINES + 20, docstring=False, mark_at=0), False),
        (_function(MAX_LINES + 20, mark_at=5), True),  # buried in the body: not at the top
        (_function(MAX_LINES + 20, mark_at=1, reason="yes"), True),  # no reason given
        ("class C:\n    def m(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(MAX_LINES + 1)) + "\n", True),
        (
            "def outer():\n    def inner():\n" + "\n".join(f"        y{i} = {i}" for i in range(MAX_LINES + 1)) + "\n"
            f"    {MARK} the outer function is long only because of inner\n",
            True,
        ),
    ],
)
def test_the_check_flags_long_functions_without_the_mark(source, flagged):
    assert bool(long_functions(source)) is flagged, long_functions(source)
