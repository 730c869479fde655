"""relprop imports on every Python it claims (pyproject: ``requires-python = ">=3.9"``).

CI runs one Python (3.11), where ``int | None`` is a type. On 3.9 ``X | Y`` between two types
raises TypeError wherever it is evaluated: in a module-level alias, and in annotations of a
module without ``from __future__ import annotations`` (the Triton kernel modules keep theirs
evaluated for Triton 3.0's interpreter). This test finds such unions in the source, without a 3.9
interpreter; it found ``Relevance = Tensor | InputProduct`` in graph/layers.py, which made
``import relprop`` fail on 3.9.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "python" / "relprop").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
BUILTIN_TYPES = {"int", "float", "complex", "str", "bytes", "bool", "tuple", "list", "dict", "set"}


def _is_type(node: ast.expr) -> bool:
    """Whether ``node`` reads as a type: None, a builtin type, a capitalised (non-constant) name or
    attribute, a subscripted one (``tuple[int, ...]``), or a union of those."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return _is_type(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left) and _is_type(node.right)
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    if name is None:
        return False
    return name in BUILTIN_TYPES or (name[:1].isupper() and not name.isupper())


def _annotations(tree: ast.Module) -> set[int]:
    """ids of the annotation nodes of ``tree`` (not evaluated under the __future__ import)."""
    found = set()
    for node in ast.walk(tree):
        for annotation in (
            getattr(node, "annotation", None),
            getattr(node, "returns", None),
        ):
            if annotation is not None:
                found.update(id(n) for n in ast.walk(annotation))
    return found


def _postponed(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def evaluated_type_unions(source: str) -> list[int]:
    """Line numbers of ``type | type`` expressions Python evaluates when it runs ``source``."""
    tree = ast.parse(source)
    skipped = _annotations(tree) if _postponed(tree) else set()
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitOr)
        and id(node) not in skipped
        and _is_type(node)
    )


def test_the_scan_finds_evaluated_unions_and_only_those():
    assert evaluated_type_unions("Relevance = Tensor | InputProduct\n") == [1]
    assert evaluated_type_unions("def f(x: int | None) -> tuple[int, ...] | None: ...\n") == [1, 1]
    postponed = "from __future__ import annotations\ndef f(x: int | None) -> Tensor | None: ...\n"
    assert evaluated_type_unions(postponed) == []
    assert evaluated_type_unions("mask = keep | (z > 0)\nFLAGS = READ | WRITE\n") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_type_union_is_evaluated(path):
    lines = evaluated_type_unions(path.read_text())
    assert not lines, (
        f"{path.relative_to(REPO)}: `X | Y` of types evaluated at lines {lines} fails on Python "
        "3.9; write typing.Union[X, Y] (or Optional[X])"
    )
