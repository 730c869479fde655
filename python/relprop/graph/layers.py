"""Executable steps: each maps one graph node's forward and hands relevance back to its inputs.

A layer gets its resolved arguments in forward and returns ``(output, saved)``; in
``relevance(saved, R)`` it returns one relevance tensor (or None) per node occurrence in its
arguments, in ``torch.fx.node.map_arg`` order. Layers with weights call the ``relprop::`` ops;
the rest are small enough to stay in plain PyTorch.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from relprop import _native
from relprop.errors import UnsupportedLayerError
from relprop.graph.canonize import FoldedParameters
from relprop.ops import conv as conv_ops
from relprop.ops import linear as linear_ops
from relprop.ops import pool as pool_ops
from relprop.ops._backend import (
    call_op,
    forced_backend,
    layer_backend,
    measured_choice,
    running_on,
)
from relprop.ops._layer_rules import (
    COMPUTE_DTYPES,
    DIVIDES_AT_WINNERS,
    INPUT_PRODUCT_RULES,
    TRITON_DTYPES,
    _is_nonnegative,
    divide,
    divide_fast,
    donate,
    is_marked_nonnegative,
    mark_nonnegative,
    may_run_in_chunks,
    prefers_factor,
    read_mark,
    stabilize,
    stamp_mark,
    times_factor,
    winner_division_terms,
)
from relprop.ops.add_relu import add_relu_fast
from relprop.ops.bias_relu import bias_relu_fast
from relprop.rules.base import Rule
from relprop.rules.zbox import ZBox


@dataclass(frozen=True)
class InputProduct:
    """A relevance ``(coefficient + addend) · factor`` not yet formed.

    ε, and z⁺, α-β and γ on non-negative input, give their input the relevance ``x · c``; the
    layer that produced ``x`` divides it by its pre-activation next. Handing ``(c, x)`` down lets
    that division form the product itself (``relprop::stabilized_divide``'s ``factor``) instead of
    a pass that writes ``x · c`` and another that reads it back: on a ReLU network the relevance
    pass then makes the gradient's passes. Relevance reaching one tensor along two paths with the
    same ``factor`` (a residual block's input) adds coefficients, and that sum is left to the
    division too (its ``numerator_addend``) where the layer below is a residual sum; other layers
    get it summed (:meth:`coefficient_sum`). Layers that do not take this form
    (:attr:`Layer.takes_input_product`) get :meth:`formed` relevance.
    """

    coefficient: Tensor
    factor: Tensor
    addend: Tensor | None = None

    def coefficient_sum(self) -> Tensor:
        """``coefficient + addend`` (the coefficient itself without an addend)."""
        return self.coefficient if self.addend is None else self.coefficient + self.addend

    def formed(self) -> Tensor:
        """``(coefficient + addend) · factor`` as a new tensor (the coefficient may be shared); in
        float16 0 where the factor is (:func:`~relprop.ops._layer_rules.times_factor`)."""
        return times_factor(self.coefficient_sum(), self.factor)


@dataclass(frozen=True)
class Shares:
    """A relevance already divided by the ε-stabilised output of the layer it is handed to:
    ``R = shares · stab(output, ε)``, ``shares = R / stab(output, ε)``.

    A max pool above an ε layer whose output it pools (``WeightLayer.divides_at_max_pool``)
    divides there, at the pool's output size — a window's winner is the pool's output itself —
    and spreads the shares to the winners; the layer then goes straight to its transposed
    product. That spares the layer's division at the (four times larger) input size: a pass
    writing the spread relevance, one reading it back with the layer's output, and holding that
    output until the transposed product (docs/ops.md, "Divided above the max pool").
    """

    shares: Tensor
    # Weakly: the layer lets its output go before its transposed product (the one step where
    # holding it costs memory); the reference only says whose output the shares are of.
    output: weakref.ReferenceType
    epsilon: float

    def formed(self) -> Tensor:
        """``shares · stab(output, ε)`` as a new tensor, for a step that does not take shares
        (none does in a plan: the layer's output goes to the pool alone)."""
        output = self.output()
        if output is None:
            raise RuntimeError("relprop: shares formed after their layer's output was freed")
        return self.shares * stabilize(output, self.epsilon)


@dataclass(frozen=True)
class Unspread:
    """A max pool's relevance not yet spread to its winners, handed to the z⁺ or γ layer whose
    output the pool alone reads (``WeightLayer.divides_at_max_pool``).

    That layer divides by a product it makes in its own relevance step (``W⁺x``,
    ``(W + γW⁺)x``), so the pool cannot divide for it as it does for ε (:class:`Shares`); but
    the relevance is zero except at the winners, so the layer reads its product there alone and
    divides at the pool's output size as it spreads the shares, in one pass
    (``relprop::max_pool_divided_relevance``). That spares the layer's division at the (four
    times larger) input size — the spread relevance written and read back, γ's ``z`` read for its
    sign — and γ keeps nothing of its output from the forward: at a winner ``z`` is the pool's
    output (docs/ops.md, "Divided at the max pool's winners").
    """

    # The relevance of the pool's output, as it reached the pool (InputProduct or tensor).
    relevance: Tensor | InputProduct
    # The pool's output: each window's winner, z at the winners (held by the layer above too).
    output: Tensor
    indices: Tensor
    input_shape: torch.Size
    window: tuple[list[int], ...] | None

    def formed(self) -> Tensor:
        """The relevance of the pool's input, as the pool hands it to any other step."""
        return pool_ops.max_pool_relevance(
            formed(self.relevance), self.indices, self.input_shape, self.window
        )


# typing.Union, not `|`: a module-level alias is evaluated, and Python 3.9 has no `type | type`.
Relevance = Union[Tensor, InputProduct, Shares, Unspread]


def formed(relevance: Relevance) -> Tensor:
    """The relevance as a tensor."""
    if isinstance(relevance, (InputProduct, Shares, Unspread)):
        return relevance.formed()
    return relevance


def unformed(relevance: Relevance) -> tuple[Tensor, Tensor | None]:
    """``(coefficient, factor)`` of a relevance (the coefficients summed); ``factor`` is None for
    a formed one."""
    if isinstance(relevance, InputProduct):
        return relevance.coefficient_sum(), relevance.factor
    return formed(relevance), None


def unformed_parts(relevance: Relevance) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(coefficient, addend, factor)`` of a relevance, for a division that sums the two
    itself; ``addend`` and ``factor`` are None where it has none."""
    if isinstance(relevance, InputProduct):
        return relevance.coefficient, relevance.addend, relevance.factor
    return formed(relevance), None, None


def join(first: Relevance, second: Relevance) -> Relevance:
    """The sum of two relevances reaching one tensor."""
    if (
        isinstance(first, InputProduct)
        and isinstance(second, InputProduct)
        and first.factor is second.factor
    ):
        # Two coefficients are kept apart for the division below to sum; a third joins their
        # sum (no residual network hands one tensor more than two relevances).
        return InputProduct(first.coefficient_sum(), first.factor, second.coefficient_sum())
    return formed(first) + formed(second)


class Layer:
    """Base: forward with the original semantics, relevance passed to the first argument."""

    # Whether relevance() accepts an InputProduct (otherwise the program forms it first).
    takes_input_product = False

    def forward(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        raise NotImplementedError

    def relevance(self, saved: Any, relevance: Tensor) -> list[Tensor | None]:
        raise NotImplementedError

    def constants(self) -> list[Tensor]:
        """Tensors the layer holds from one analysis to the next (its weights): the ones of its
        saved context that the relevance pass does not free."""
        return []

    def may_run_in_chunks(self, saved: Any) -> bool:
        """Whether the relevance step of this saved context may ask how much memory it can use
        (``ops._layer_rules.transient_budget``)."""
        return False

    def describe_impl(self, planned: str) -> str:
        """The plan's ``op`` column for this layer (``planned`` when the plan was made)."""
        return planned


# The ε rule's forward is the plain layer: it returns just [z].
PLAIN_FORWARD = ("epsilon", [0.0])
# Rules whose relevance reads z itself (the others only read their aux pre-activations).
READS_Z = {"epsilon", "alphabeta", "gamma"}


class LayerSignature(NamedTuple):
    """What ``RELPROP_BACKEND=auto`` measures a weight layer's implementations for, once."""

    kind: str  # linear, conv1d, conv2d
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    has_bias: bool
    geometry: str | None
    rule: str
    rule_params: tuple[float, ...]
    ignore_bias: bool
    fused_relu: bool
    input_nonnegative: bool
    dtype: torch.dtype
    device: str


class WeightLayer(Layer):
    """A dense layer or a 1-D/2-D convolution under an LRP rule (``relprop::`` ops).

    On the native (CPU) backend the forward runs the plain layer and keeps only what the rule's
    relevance reads; the relevance op recomputes the one extra product ``W⁺x`` that z⁺, αβ and γ
    need (docs/ops.md, lean ``saved``): the same arithmetic, without an aux tensor per layer held
    from the forward to the relevance pass. Triton and the reference keep the fused forward.
    """

    def __init__(self, params: FoldedParameters, rule: Rule, geometry: dict | None, dims: int):
        self.params = params
        self.rule = rule
        self.geometry = geometry  # None for dense layers
        self.dims = dims
        # Set by the plan when the ReLU after this layer may run here, in place (plan.py).
        self.fused_relu = False
        # Set by the plan when the layer's output (after a fused ReLU) goes to a max pool alone:
        # the layer's division may then run at the pool's output size — made by the pool under
        # ε (Shares), by the layer at the pool's winners under z⁺ and γ (Unspread); plan.py
        # `_divide_at_max_pools`.
        self.divides_at_max_pool = False
        # RELPROP_BACKEND=auto: the backend measured fastest for each input signature met.
        self.chosen: dict[LayerSignature, str] = {}

    def forward(self, args, kwargs):
        backend = self._measured_backend(args, kwargs)
        if backend is None:
            return self._forward(args, kwargs)
        with running_on(backend):  # the context records it for the relevance pass
            return self._forward(args, kwargs)

    def _measured_backend(self, args, kwargs) -> str | None:
        """Under ``RELPROP_BACKEND=auto``, the backend measured fastest for this layer on inputs
        like ``args[0]`` (its forward and relevance together, timed once per signature and
        process; ``ops._backend.measured_choice``); None otherwise. Under tracing nothing can
        be timed: a signature not yet measured runs natively there."""
        if forced_backend() != "auto":
            return None
        x = args[0]
        weight, bias = self.params.get()
        name, rule_params = self.rule.op()
        key = LayerSignature(
            "linear" if self.geometry is None else f"conv{self.dims}d",
            tuple(x.shape), tuple(weight.shape), bias is not None,
            None if self.geometry is None else repr(sorted(self.geometry.items())),
            name, tuple(rule_params), self.rule.ignore_bias, self.fused_relu,
            is_marked_nonnegative(x), x.dtype, str(x.device),
        )  # fmt: skip
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
            return self.chosen.get(key, "native")

        def trial(backend: str) -> None:
            # The relevance arriving is the layer's own output: shapes and signs as in a pass.
            with running_on(backend):
                out, ctx = self._forward(args, kwargs)
                self._relevance(ctx, out)

        candidates = ["native", "reference"]
        if x.dtype in TRITON_DTYPES and _triton_runs_on(x.device):
            candidates.append("triton")
        self.chosen[key] = measured_choice(key, candidates, trial, x.device)
        return self.chosen[key]

    def _forward(self, args, kwargs):
        x = args[0]
        weight, bias = self.params.get()
        name, rule_params = self.rule.op()
        backend = layer_backend()
        lean = backend == "native"
        # Per-channel z^B bounds: the relevance pass runs in the unit box (ZBox.unit_box) and
        # computes its denominator there; the forward is the layer's own.
        boxed = self._per_channel_box() is not None
        fwd_name, fwd_params = PLAIN_FORWARD if lean or boxed else (name, rule_params)
        op_bias = None if self.rule.ignore_bias else bias
        # On CUDA torch adds a convolution's bias in a pass of its own after cuDNN's product;
        # a fused ReLU then takes the bias with it (relprop::bias_relu_, one pass for two).
        bias_with_relu = (
            self.fused_relu
            and lean
            and op_bias is not None
            and self.geometry is not None
            and _native.on_cuda(x)
        )
        if self.geometry is None:
            lead = x.shape[:-1]
            x_op, w_op = x.reshape(-1, x.shape[-1]), weight
            saved = call_op(
                linear_ops.linear_forward, linear_ops.forward_kernel,
                x_op, w_op, op_bias, fwd_name, fwd_params,
            )  # fmt: skip
        else:
            g = self.geometry
            lead = None
            x_op, w_op = (x.unsqueeze(2), weight.unsqueeze(2)) if self.dims == 1 else (x, weight)
            saved = call_op(
                conv_ops.conv2d_forward,
                conv_ops.forward_kernel,
                x_op,
                w_op,
                None if bias_with_relu else op_bias,
                g["stride"],
                g["padding"],
                g["dilation"],
                g["groups"],
                fwd_name,
                fwd_params,
            )
        # x_op is a view of x (flattened or unsqueezed): it is as non-negative as x.
        _keep_nonnegative_mark(x, x_op)
        z = saved[0]
        if (lean and name not in READS_Z) or boxed:
            saved = []
        if op_bias is None and bias is not None:
            z = z + (bias if self.geometry is None else bias.view(1, -1, 1, 1))
        if bias_with_relu:
            mark_nonnegative(bias_relu_fast(z, op_bias))
        elif self.fused_relu:
            # In place, so relu(z) also replaces z in saved: equal wherever relevance will
            # arrive (plan.py), and it is the next layer's input, held anyway.
            mark_nonnegative(z.relu_())
        if self.geometry is None:
            out = z.reshape(*lead, z.shape[-1])
        else:
            out = z.squeeze(2) if self.dims == 1 else z
        _keep_nonnegative_mark(z, out)  # out is a view of z
        stacks = self.geometry is None or self.geometry["groups"] == 1
        nonnegative = is_marked_nonnegative(x)
        if (
            self.divides_at_max_pool
            and lean
            and name == "epsilon"
            and self.geometry is not None
            and saved
            and saved[0] is z  # out is z (a 1-D layer's: a view of it), the fused ReLU's output
        ):
            # The division of its relevance pass is R / stab(out, ε) with ``out`` itself: the max
            # pool above does it at its own output's size (Shares), whatever form the relevance
            # reaches it in, so this step keeps nothing of its output for the relevance pass —
            # where its mark took (an inference tensor takes none; a relevance op given no z
            # would compute it again).
            try:
                stamp_mark(out, DIVIDED_AT_MAX_POOL_MARK, float(rule_params[0]))
            except (AttributeError, RuntimeError):  # tensor subclasses under tracing may refuse
                pass
            if read_mark(out, DIVIDED_AT_MAX_POOL_MARK) is not None:
                saved = []
        elif (
            self.divides_at_max_pool
            and lean
            and name in DIVIDES_AT_WINNERS
            and not boxed
            and self.geometry is not None
            and (name == "zplus" or (saved and saved[0] is z and is_marked_nonnegative(out)))
            and _is_nonnegative(x_op)
        ):
            # Its one division reads a product it makes in its relevance step; the max pool
            # above hands its relevance unspread (Unspread), and the step divides at the
            # winners, where γ's z is the pool's output: nothing of the output is kept here.
            # (γ's other branch, z < 0, has no entry after a ReLU; z⁺ keeps nothing anyway.)
            try:
                stamp_mark(out, SPREAD_BY_LAYER_MARK, True)
            except (AttributeError, RuntimeError):  # tensor subclasses under tracing may refuse
                pass
            if read_mark(out, SPREAD_BY_LAYER_MARK) is not None:
                saved = []
        if lean and prefers_factor(name, stacks, nonnegative):
            # Its relevance pass will divide an unformed c · out at no extra cost (the factor is
            # read by the division): a max pool above may hand its relevance down that way.
            try:
                stamp_mark(out, FORMS_PRODUCT_MARK)
            except (AttributeError, RuntimeError):  # tensor subclasses under tracing may refuse
                pass
        return out, (x_op, w_op, op_bias, saved, lead, backend)

    takes_input_product = True

    def constants(self):
        return [t for t in self.params.get() if t is not None]

    def may_run_in_chunks(self, saved) -> bool:
        name, rule_params = self.rule.op()
        return may_run_in_chunks(name, rule_params, is_marked_nonnegative(saved[0]))

    def describe_impl(self, planned: str) -> str:
        if not self.chosen:
            return planned
        picks = "/".join(sorted(set(self.chosen.values())))
        return planned.replace("[auto]", f"[auto: {picks}]")

    def relevance(self, saved, relevance):
        # On the backend whose forward saved the context (the lean native forward keeps less).
        with running_on(saved[-1]):
            return self._relevance(saved, relevance)

    def _per_channel_box(self) -> ZBox | None:
        rule = self.rule
        return rule if isinstance(rule, ZBox) and rule.per_channel else None

    def _relevance(self, saved, relevance):
        x_op, w_op, op_bias, fwd, lead, _ = saved
        name, rule_params = self.rule.op()
        box = self._per_channel_box()
        if box is not None:
            # Every z^B term in the unit box equals the term in x's box (ZBox), and so does
            # the relevance of u = (x − l)/(h − l) that of x.
            groups = 1 if self.geometry is None else self.geometry["groups"]
            x_op, w_op = box.unit_box(x_op, w_op, groups)
        if isinstance(relevance, Shares):
            # Only the max pool that alone reads this layer's output makes them (plan.py).
            return self._transposed_shares(saved, relevance.shares)
        if isinstance(relevance, Unspread):
            # Only that pool hands them, where this layer's forward marked its output.
            return self._relevance_at_winners(saved, relevance)
        relevance, factor = unformed(relevance)
        # Leave the product with x to the layer below where the rule's relevance is x · c (on
        # the native path: the fused kernels end with the product).
        times_input = not (
            layer_backend() == "native"
            and (name == "epsilon" or (name in INPUT_PRODUCT_RULES and _is_nonnegative(x_op)))
        )
        if self.geometry is None:

            def flat(t):
                return None if t is None else t.reshape(-1, t.shape[-1])

            r = call_op(
                linear_ops.linear_relevance, linear_ops.relevance_kernel,
                x_op, w_op, op_bias, fwd, flat(relevance), name, rule_params, flat(factor),
                times_input,
            )  # fmt: skip
            r = r.reshape(*lead, r.shape[-1])
            x = x_op.reshape(*lead, x_op.shape[-1])
        else:
            g = self.geometry

            def as_2d(t):
                return t.unsqueeze(2) if t is not None and self.dims == 1 else t

            r = call_op(
                conv_ops.conv2d_relevance, conv_ops.relevance_kernel,
                x_op, w_op, op_bias, fwd, as_2d(relevance), g["stride"], g["padding"],
                g["dilation"], g["groups"], name, rule_params, as_2d(factor), times_input,
            )  # fmt: skip
            r = r.squeeze(2) if self.dims == 1 else r
            x = x_op.squeeze(2) if self.dims == 1 else x_op
        # r is the fresh output of this step's op, read by the layer below alone: it may take
        # the result of that layer's division (ops._layer_rules.DONATED_MARK).
        return [r if times_input else InputProduct(donate(r), x)]

    def _relevance_at_winners(self, saved, pooled: Unspread):
        """z⁺'s or γ's relevance ``x · Tᵀ spread(R / stab(d[idx], ε))`` from a max pool's
        relevance ``R`` not yet spread (Unspread): the denominator's product ``d`` made at the
        layer's output size and read at the winners ``idx`` only, divided at the pool's output
        size and spread in one op; handed down as ``c · x``, as the native path does on
        non-negative input.

        Bitwise the division the layer made at its output size where windows do not overlap:
        elsewhere the relevance is zero, and at a winner γ's sign test reads ``z``, which is the
        pool's output there.
        """
        x_op, w_op, op_bias = saved[:3]
        name, rule_params = self.rule.op()
        g = self.geometry
        lin = conv_ops.geometry_map(g["stride"], g["padding"], g["dilation"], g["groups"])
        product, product_bias, epsilon, transposed_weight = winner_division_terms(
            lin, x_op, w_op, op_bias, name, rule_params
        )
        if self.dims == 1:  # the map's (N, C, 1, L) as the pool's (N, C, L)
            product = product.squeeze(2)
        relevance = pooled.relevance
        if isinstance(relevance, InputProduct) and _same_view(relevance.factor, pooled.output):
            # c · out, formed by the division (two paths' coefficients summed first, at the
            # pool's size: no pool output in these networks has two readers).
            numerator, factor = relevance.coefficient_sum(), pooled.output
        else:
            numerator, factor = formed(relevance), None
        # The gather, the division and the spread in one pass (relprop::max_pool_divided_relevance).
        spread = pool_ops.max_pool_divided_relevance(
            numerator, pooled.indices, product, epsilon, factor,
            pooled.output if name == "gamma" else None, product_bias, pooled.window,
        )  # fmt: skip
        del product, numerator
        return self._transposed_product(lin, spread, transposed_weight, x_op)

    def _transposed_product(self, lin, shares: Tensor, weight: Tensor, x_op: Tensor):
        """``[c · x]`` with ``c = Tᵀ shares`` for shares at the layer's output size, as the pool
        spread them (a 1-D layer's without the map's height)."""
        if self.dims == 1:
            c = lin.transpose(shares.unsqueeze(2), weight, x_op).squeeze(2)
            return [InputProduct(donate(c), x_op.squeeze(2))]
        return [InputProduct(donate(lin.transpose(shares, weight, x_op)), x_op)]

    def _transposed_shares(self, saved, shares: Tensor):
        """ε's relevance ``x · Wᵀ shares`` from shares a max pool above divided (Shares): the
        transposed product only, handed down as ``c · x`` as the native ε path does."""
        x_op, w_op = saved[:2]
        g = self.geometry
        lin = conv_ops.geometry_map(g["stride"], g["padding"], g["dilation"], g["groups"])
        return self._transposed_product(lin, shares, w_op, x_op)


def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """A step that hands on its first argument: a BatchNorm folded into the layer before it, a
    ReLU fused into it, an identity module."""
    return x


class PassLayer(Layer):
    """Element-wise layers (activations, dropout, identities, unfoldable BatchNorm, scaling by a
    constant): relevance goes through unchanged to the one tensor argument."""

    def __init__(
        self, fn: Callable[..., Any], live_index: int = 0, nonnegative_output: bool = False
    ) -> None:
        self.fn = fn
        self.live_index = live_index
        # A ReLU: its output is marked ≥ 0, so the next layer's rule skips its x⁻ terms without
        # a reduction and a host sync to find out (relprop.ops._layer_rules).
        self.nonnegative_output = nonnegative_output

    # Relevance passes through untouched, whatever its form.
    takes_input_product = True

    @property
    def hands_on_its_input(self) -> bool:
        """Whether the step's value is its first argument and its relevance goes there whole:
        a program can skip it and let its users read its input (``graph/program.py``)."""
        return (
            type(self) is PassLayer
            and self.fn is identity
            and self.live_index == 0
            and not self.nonnegative_output
        )

    def forward(self, args, kwargs):
        out = self.fn(*args, **kwargs)
        if self.nonnegative_output and isinstance(out, Tensor):
            mark_nonnegative(out)
        return out, None

    def relevance(self, saved, relevance):
        out: list[Tensor | None] = [None] * (self.live_index + 1)
        out[self.live_index] = relevance
        return out


class MappedPassLayer(PassLayer):
    """A module the user's composite maps to ``Pass``: relevance goes through unchanged, which
    only makes sense where the output has the input's shape (an element-wise module)."""

    def __init__(self, module: Callable[..., Any], path: str) -> None:
        super().__init__(module)
        self.path = path

    def forward(self, args, kwargs):
        out, saved = super().forward(args, kwargs)
        x = args[0] if args else None
        # Checked on every pass (a tuple comparison): the shapes are only known as inputs come.
        if not isinstance(out, Tensor) or not isinstance(x, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            given = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise UnsupportedLayerError(
                f"module {self.path!r} of type {type(self.fn).__name__} is mapped to "
                f"relprop.rules.Pass() in the composite, but it turns an input of shape {given} "
                f"into {got}: Pass hands relevance through unchanged and needs an output shaped "
                "like the input (an element-wise module). Remove it from the composite's maps "
                "and rewrite it with layers relprop maps, or explain with a gradient analyzer "
                "('gradient', 'input_t_gradient', 'integrated_gradients', 'smoothgrad')"
            )
        return out, saved


class MovementLayer(Layer):
    """Ops that only move values (reshape, permute, cat, indexing, ...): relevance moves with
    them, which is exactly the vector-Jacobian product of the op (a 0/1 matrix)."""

    def __init__(self, fn: Callable[..., Any], reshape_only: bool = False) -> None:
        self.fn = fn
        self.reshape_only = reshape_only

    def forward(self, args, kwargs):
        out = self.fn(*args, **kwargs)
        if self.reshape_only:
            _keep_nonnegative_mark(args[0], out)
            return out, args[0].shape
        return out, (args, kwargs)

    def relevance(self, saved, relevance):
        if self.reshape_only:
            return [relevance.reshape(saved)]
        return _vjp(self.fn, saved[0], saved[1], relevance)


class NormLayer(Layer):
    """Linear maps without weights — sums, differences, means — under the z-rule (``Norm``).

    ``R_k = (x_k ⊙ ∂y/∂x_k)ᵀ (R / stab(y))``: each operand gets the share it contributed.
    """

    def __init__(self, fn: Callable[..., Any], stabilizer: float, is_sum: bool = False) -> None:
        self.fn = fn
        self.stabilizer = stabilizer
        self.is_sum = is_sum  # a plain a + b: its Jacobian is known, no autograd needed
        # Set by the plan for a sum whose ReLU may run here, in place (plan.py): the division
        # then reads relu(a + b), equal to a + b wherever relevance arrives.
        self.fused_relu = False

    def forward(self, args, kwargs):
        if self.fused_relu and _two_like_tensors(args, kwargs) and _native.on_cuda(args[0]):
            # On CUDA the sum and its ReLU in one pass (relprop::add_relu), where torch's add
            # writes the sum and the ReLU reads and writes it again.
            out = add_relu_fast(*args)
        else:
            out = self.fn(*args, **kwargs)
            if self.fused_relu:
                # fn made a new tensor (the plan maps in-place sums to out-of-place ones).
                out.relu_()
        if self.fused_relu:
            mark_nonnegative(out)
        return out, (args, kwargs, out)

    takes_input_product = True

    def relevance(self, saved, relevance):
        args, kwargs, out = saved
        if (
            self.is_sum
            and not kwargs
            and len(args) == 2
            and all(isinstance(a, Tensor) and a.shape == out.shape for a in args)
        ):
            # The residual addition of every ResNet block: R_k = x_k · R / stab(a + b), handed
            # down unformed; a relevance arriving unformed is formed by the division, its two
            # coefficients (the next block's two paths to this output) summed there too.
            relevance, addend, factor = unformed_parts(relevance)
            share = divide_fast(
                relevance, out, self.stabilizer, factor=factor, numerator_addend=addend
            )
            return [InputProduct(share, args[0]), InputProduct(share, args[1])]
        relevance = formed(relevance)
        share = divide(relevance, out, self.stabilizer)
        grads = _vjp(self.fn, args, kwargs, share)
        tensors = _flat_tensors(args, kwargs)
        return [None if g is None else g * t for g, t in zip(grads, tensors)]


def _two_like_tensors(args: tuple, kwargs: dict) -> bool:
    """Whether a sum's operands are two tensors of one shape, dtype and device (no broadcast)."""
    if kwargs or len(args) != 2:
        return False
    a, b = args
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _per_channel(weight: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel affine weight shaped to broadcast against ``x`` ``(N, C, ...)`` along dim 1,
    so that a group view of the product can be taken."""
    return None if weight is None else weight.reshape(1, -1, *([1] * (x.dim() - 2)))


class LayerNormArguments(NamedTuple):
    """What ``F.layer_norm`` takes: the input, the normalised trailing shape, the affine weight
    and bias (or None) and the variance's ε."""

    x: Tensor
    normalized_shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def normalise(self) -> Tensor:
        return F.layer_norm(self.x, self.normalized_shape, self.weight, self.bias, self.eps)

    def groups(self) -> tuple[int, ...]:
        """The view of ``x`` with each normalised group in a row."""
        return (*self.x.shape[: -len(self.normalized_shape)], -1)

    def scale(self) -> Tensor | None:
        """The affine weight, broadcasting against ``x``."""
        return self.weight


class GroupNormArguments(NamedTuple):
    """What ``F.group_norm`` takes: the input ``(N, C, ...)``, the number of groups, the
    per-channel affine weight and bias (or None) and the variance's ε."""

    x: Tensor
    num_groups: int
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def normalise(self) -> Tensor:
        return F.group_norm(self.x, self.num_groups, self.weight, self.bias, self.eps)

    def groups(self) -> tuple[int, ...]:
        return (self.x.shape[0], self.num_groups, -1)

    def scale(self) -> Tensor | None:
        return _per_channel(self.weight, self.x)


class InstanceNormArguments(NamedTuple):
    """An InstanceNorm normalising with each sample's own statistics (GroupNorm's with a
    channel per group), run as ``F.instance_norm``."""

    x: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    def normalise(self) -> Tensor:
        return F.instance_norm(
            self.x, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps
        )

    def groups(self) -> tuple[int, ...]:
        return (self.x.shape[0], self.x.shape[1], -1)

    def scale(self) -> Tensor | None:
        return _per_channel(self.weight, self.x)


class SigmaFixedNormLayer(Layer):
    """LayerNorm, GroupNorm and InstanceNorm under the z-rule with their scale ``1/σ`` held
    fixed: the LN-rule.

    ``y = γ ⊙ (x − μ(x)) / σ + β``, normalised over each group (LayerNorm: the trailing
    ``normalized_shape``; GroupNorm: each sample's ``C/G`` channels, InstanceNorm's statistics
    for ``G = C``). With σ taken as a constant of the input (not differentiated), ``y`` is linear
    in ``x`` plus ``β``, and the z-rule on it, ``R_x = x ⊙ Jᵀ(R / stab(y))``, is in closed form
    ``x ⊙ (g − mean(g))`` per group with ``g = γ ⊙ s / σ`` and ``s = R / stab(y)``: relevance is
    conserved up to the bias's share, ``Σ R_x = Σ s ⊙ (y − β)``. Differentiating through σ
    instead (plain gradient × input) breaks conservation (Ali et al., 2022, *XAI for Transformers:
    Better Explanations through Conservative Propagation*, ICML, which proposes holding σ fixed;
    AttnLRP, Achtibat et al., 2024, ICML, does the same). Map the module to ``Pass()`` in a
    composite to hand relevance through unchanged instead (the identity rule).
    """

    def __init__(
        self,
        arguments: Callable[
            [tuple, dict], LayerNormArguments | GroupNormArguments | InstanceNormArguments
        ],
        stabilizer: float,
    ) -> None:
        self.arguments = arguments
        self.stabilizer = stabilizer
        self._weights: list[Tensor] = []

    def forward(self, args, kwargs):
        a = self.arguments(args, kwargs)
        self._weights = [t for t in (a.weight, a.bias) if t is not None]
        out = a.normalise()
        return out, (a.x, a.scale(), a.eps, a.groups(), out)

    def constants(self) -> list[Tensor]:
        return list(self._weights)

    def relevance(self, saved, relevance):
        x, scale, eps, groups, out = saved
        share = divide(formed(relevance), out, self.stabilizer)
        return [_sigma_fixed_relevance(x, share, scale, eps, groups)]


def _sigma_fixed_relevance(
    x: Tensor, share: Tensor, weight: Tensor | None, eps: float, groups: tuple[int, ...]
) -> Tensor:
    """``x ⊙ (g − mean(g))`` with ``g = γ ⊙ share / σ``, mean and σ over the last dim of the
    view ``groups`` (each normalised group in a row): the z-rule of a normalisation whose σ is
    held fixed (:class:`SigmaFixedNormLayer`). ``weight`` is None or broadcasts to ``x``."""
    # Statistics and shares of 16-bit tensors in float32, as the ops compute them.
    compute = COMPUTE_DTYPES.get(x.dtype, x.dtype)
    xc, g = x.to(compute), share.to(compute)
    if weight is not None:
        g = g * weight.to(compute)
    rows, g_rows = xc.reshape(groups), g.reshape(groups)
    sigma = torch.sqrt(rows.var(dim=-1, unbiased=False, keepdim=True) + eps)
    g_rows = g_rows / sigma
    g_rows = g_rows - g_rows.mean(dim=-1, keepdim=True)
    return (rows * g_rows).reshape(x.shape).to(x.dtype)


class GateLayer(Layer):
    """``signal * gate`` (squeeze-excitation): all relevance to the signal, none to the gate."""

    takes_input_product = True  # relevance passes to the signal untouched

    def __init__(self, signal_index: int) -> None:
        self.signal_index = signal_index

    def forward(self, args, kwargs):
        return args[0] * args[1], None

    def relevance(self, saved, relevance):
        out: list[Tensor | None] = [None, None]
        out[self.signal_index] = relevance
        return out


class MaxPoolLayer(Layer):
    """Max pooling (1-D/2-D, plain or adaptive): winner takes all."""

    def __init__(
        self,
        pool: Callable[[Tensor], tuple[Tensor, Tensor]],
        window: tuple[list[int], ...] | None = None,
    ) -> None:
        self.pool = pool
        # (kernel_size, stride, padding, dilation) of a regular pool, None for an adaptive one:
        # where the winners can lie follows from it, which spares the CUDA gather a pass.
        self.window = window

    def forward(self, args, kwargs):
        x = args[0]
        out, indices = self.pool(x)
        _keep_nonnegative_mark(x, out)
        # Weak references: the input and output are only looked at if something else keeps
        # them (the layer below saved its output, the layer above its input), never kept alive
        # for this layer's sake — except the output where this pool divides for the ε layer
        # below (its mark on x): then the output is the denominator, and a quarter of the x that
        # layer no longer keeps.
        epsilon = read_mark(x, DIVIDED_AT_MAX_POOL_MARK)
        divides = None if epsilon is None else (epsilon, out)
        if divides is None and read_mark(x, SPREAD_BY_LAYER_MARK):
            # The z⁺/γ layer below divides at this pool's winners: its relevance goes there
            # unspread, with the output (z at the winners) it reads (Unspread).
            divides = (None, out)
        return out, (indices, x.shape, weakref.ref(x), weakref.ref(out), divides)

    takes_input_product = True

    def relevance(self, saved, relevance):
        indices, shape, input_ref, output_ref, divides = saved
        if divides is not None and divides[0] is None:
            relevance = relevance if isinstance(relevance, InputProduct) else formed(relevance)
            return [Unspread(relevance, divides[1], indices, shape, self.window)]
        first, addend, factor = unformed_parts(relevance)
        if divides is not None:
            # R reaches the winners, where the ε layer below divides it by its own output x:
            # x[idx[o]] = out[o], so each winner's share is R[o] / stab(out[o]) — divided at the
            # pool's output size as it is spread, in one op (docs/ops.md). Relevance c · out
            # arriving unformed is formed by the division, two paths' coefficients (a ResNet's
            # stem pool feeds a block and its shortcut) summed by it.
            epsilon, out = divides
            if factor is not None and _same_view(factor, out):
                numerator, factor = first, out
            else:
                numerator, factor, addend = formed(relevance), None, None
            winners = pool_ops.max_pool_divided_relevance(
                numerator, indices, out, epsilon, factor, None, None, self.window, addend,
                input_size=shape[2:],
            )  # fmt: skip
            return [Shares(winners, input_ref, epsilon)]
        x, out = input_ref(), output_ref()
        # The mark is stamped with x's version: it also says x is unchanged since the pool read
        # it.
        unformed_out = factor is not None and out is not None and _same_view(factor, out)
        if unformed_out and x is not None and read_mark(x, FORMS_PRODUCT_MARK):
            # R = c · out with out[o] = x[idx[o]]: each window's winner receives c[o] · x[idx[o]],
            # so R_in = x · (winner-takes-all of c). Handed down unformed, the product is formed
            # by the division of the layer below (which produced x and marked it so) instead of
            # by a pass here; a layer that would form it itself, at x's size, gets it formed.
            coefficient = relevance.coefficient_sum()  # an InputProduct: it has a factor
            winners = pool_ops.max_pool_relevance(coefficient, indices, shape, self.window)
            return [InputProduct(donate(winners), x)]
        return [pool_ops.max_pool_relevance(formed(relevance), indices, shape, self.window)]


# Set on a weight layer's output whose relevance pass takes an unformed product in its division.
FORMS_PRODUCT_MARK = "_relprop_forms_product"
# Set on an ε layer's output that a max pool alone reads: the value is the layer's ε, and the pool
# may divide by it for the layer (Shares).
DIVIDED_AT_MAX_POOL_MARK = "_relprop_divided_at_max_pool"
# Set on a z⁺/γ layer's output that a max pool alone reads: the pool hands its relevance down
# unspread, and the layer divides at the winners (Unspread).
SPREAD_BY_LAYER_MARK = "_relprop_spread_by_layer"


def _same_view(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are the same elements: one object, or views of one storage with the
    same offset, shape and strides."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class AvgPoolLayer(Layer):
    """Average pooling (1-D/2-D) under the z-rule."""

    def __init__(self, dims: int, options: dict, stabilizer: float) -> None:
        self.dims = dims
        self.options = options
        self.stabilizer = stabilizer

    def forward(self, args, kwargs):
        x = args[0]
        o = self.options
        pool = F.avg_pool1d if self.dims == 1 else F.avg_pool2d
        extra = {} if self.dims == 1 else {"divisor_override": o["divisor_override"]}
        out = pool(
            x,
            o["kernel_size"],
            o["stride"],
            o["padding"],
            o["ceil_mode"],
            o["count_include_pad"],
            **extra,
        )
        _keep_nonnegative_mark(x, out)
        return out, x

    def relevance(self, saved, relevance):
        o = self.options
        return [
            pool_ops.avg_pool_relevance(
                saved,
                relevance,
                o["kernel_size"],
                o["stride"],
                o["padding"],
                o["ceil_mode"],
                o["count_include_pad"],
                o["divisor_override"],
                self.stabilizer,
            )
        ]


class AdaptiveAvgPoolLayer(Layer):
    """Adaptive average pooling (1-D/2-D) under the z-rule."""

    def __init__(self, dims: int, output_size, stabilizer: float) -> None:
        self.dims = dims
        self.output_size = output_size
        self.stabilizer = stabilizer

    def forward(self, args, kwargs):
        x = args[0]
        pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
        out = pool(x, self.output_size)
        _keep_nonnegative_mark(x, out)
        return out, x

    def relevance(self, saved, relevance):
        # The op resolves the size as torch does (an int for every axis, None keeps the input's).
        return [
            pool_ops.adaptive_avg_pool_relevance(
                saved, relevance, self.output_size, self.stabilizer
            )
        ]


def _triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: a GPU, or the CPU under
    ``TRITON_INTERPRET=1`` (the interpreter; far slower, but then a candidate like any other)
    where that interpreter works with this NumPy (Triton 3.0's needs NumPy 1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from relprop._kernels.triton._common import interpreter_failure

    return interpreter_failure() is None


def _keep_nonnegative_mark(x: Any, out: Any) -> None:
    # Pooling and reshaping a tensor known to be ≥ 0 give one that is ≥ 0. (A layer that hands
    # on its input object itself has nothing to mark.)
    if out is x:
        return
    if isinstance(x, Tensor) and isinstance(out, Tensor) and is_marked_nonnegative(x):
        mark_nonnegative(out)


def _flat_tensors(args: tuple, kwargs: dict) -> list[Any]:
    flat: list[Any] = []

    def visit(value):
        if isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        else:
            flat.append(value)

    visit(args)
    visit(kwargs)
    return flat


# Eager under torch.compile: traced, the fresh leaves' requires_grad_ was lost after a graph
# break inside (a permute's relevance failed with "element 0 of tensors does not require grad").
@torch.compiler.disable
def _vjp(fn: Callable[..., Any], args: tuple, kwargs: dict, cotangent: Tensor) -> list:
    """Vector-Jacobian product of ``fn`` at ``(args, kwargs)`` for every tensor leaf."""
    leaves = _flat_tensors(args, kwargs)
    inputs = [
        v.detach().requires_grad_(True) if isinstance(v, Tensor) and v.is_floating_point() else None
        for v in leaves
    ]
    iterator = iter(inputs)

    def rebuild(value):
        if isinstance(value, list):
            return [rebuild(v) for v in value]
        if isinstance(value, tuple):
            return tuple(rebuild(v) for v in value)
        if isinstance(value, dict):
            return {k: rebuild(v) for k, v in value.items()}
        replaced = next(iterator)
        return value if replaced is None else replaced

    new_args = rebuild(args)
    new_kwargs = rebuild(kwargs)
    wanted = [t for t in inputs if t is not None]
    with torch.enable_grad():
        out = fn(*new_args, **new_kwargs)
        grads = torch.autograd.grad(out, wanted, cotangent, allow_unused=True)
    by_leaf = iter(grads)
    return [None if t is None else next(by_leaf) for t in inputs]
