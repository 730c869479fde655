"""The Triton kernels keep to what Triton 3.0 (torch 2.4's) accepts, checked with CI's Triton.

relprop supports Triton >= 3.0. CI runs one release, so what the older ones reject is checked
here in the kernels' source. ``scripts/triton_versions.sh`` compiles every launch of the quick set
with each release from 3.0 on for sm_80 and sm_90 (``benchmarks/triton_resources.py``); the two
rules below are what it found that CI's Triton would not:

- Triton 3.0's JIT parses ``A and B and C`` as an error ("chained boolean operators are not
  supported").
- Triton 3.0-3.3's interpreter finds a ``tl.constexpr`` parameter only by its evaluated
  annotation: under ``from __future__ import annotations`` the annotation is the string
  ``"tl.constexpr"``, the block sizes arrive as tensors, and ``tl.arange`` fails.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import triton.language as tl
from triton.runtime.jit import KernelInterface

from relprop._kernels.triton import _common, conv, linear


def _jit_functions():
    for module in (_common, conv, linear):
        for name, value in vars(module).items():
            # A JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction: both wrap ``fn``.
            function = getattr(value, "fn", None)
            if isinstance(value, KernelInterface) and function.__module__ == module.__name__:
                yield f"{module.__name__.rsplit('.', 1)[1]}.{name}", value


JIT_FUNCTIONS = dict(_jit_functions())


def test_the_kernels_are_found():
    # Each module's kernels and helpers; a rename that hid them would empty the checks below.
    names = set(JIT_FUNCTIONS)
    assert {"conv._conv2d_forward_kernel", "conv._conv2d_relevance_kernel",
            "linear._linear_forward_kernel", "linear._linear_relevance_kernel",
            "_common._relevance_accumulate"} <= names  # fmt: skip


@pytest.mark.parametrize("name", sorted(JIT_FUNCTIONS))
def test_constexpr_annotations_are_evaluated(name):
    function = JIT_FUNCTIONS[name].fn
    constexprs = {
        parameter: annotation
        for parameter, annotation in function.__annotations__.items()
        if "constexpr" in str(annotation)
    }
    for parameter, annotation in constexprs.items():
        assert annotation is tl.constexpr, (
            f"{name}: parameter {parameter} is annotated {annotation!r}, not tl.constexpr itself "
            "(is there a `from __future__ import annotations` in its module?)"
        )


@pytest.mark.parametrize("name", sorted(JIT_FUNCTIONS))
def test_no_chain_of_three_boolean_operands(name):
    tree = ast.parse(textwrap.dedent(inspect.getsource(JIT_FUNCTIONS[name].fn)))
    chains = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.BoolOp) and len(node.values) > 2
    ]
    assert not chains, (
        f"{name}: Triton 3.0 rejects these; pair the operands with parentheses: {chains}"
    )
