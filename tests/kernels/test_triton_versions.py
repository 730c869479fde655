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
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface

from relprop._kernels.triton import _common, conv, linear
from relprop.errors import BackendError
from relprop.graph.layers import _triton_runs_on


def _jit_functions():
    for module in (_common, conv, linear):
        for name, value in vars(module).items():
            # A JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction: both wrap ``fn``.
            # (Triton 3.0's InterpretedFunction is no KernelInterface; later ones are.)
            function = getattr(value, "fn", None)
            if (
                isinstance(value, (KernelInterface, InterpretedFunction))
                and function.__module__ == module.__name__
            ):
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


def test_a_broken_interpreter_is_refused_with_the_way_out(monkeypatch):
    # Triton 3.0's interpreter beside NumPy 2 returns garbage without an error; whichever
    # environment runs this, the kernels must refuse to run on such an interpreter and
    # RELPROP_BACKEND=auto must not measure them there.
    reason = "Triton 3.0.0's interpreter cannot run the kernels beside NumPy 2.2.6 (a copy ...)"
    monkeypatch.setattr(_common, "interpreter_failure", lambda: reason)
    x, weight = torch.ones(2, 3), torch.ones(4, 3)
    with pytest.raises(BackendError, match=r"NumPy 2\.2\.6 .*numpy<2 .*unset RELPROP_BACKEND"):
        linear.linear_forward(x, weight, None, "epsilon", [0.1])
    assert not _triton_runs_on(torch.device("cpu"))
