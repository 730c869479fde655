"""The Plan: the traced model as a list of steps, each with its layer, rule and implementation.

Built once per analyzer (trace → fold BatchNorms → assign rules). It is plain data that prints as
a table, so users see which rule hits which layer and which op runs it.
"""

from __future__ import annotations

import copy
import difflib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from relprop._native import native_available
from relprop.errors import RuleMappingError, UnknownLayerNameError, UnsupportedLayerError
from relprop.graph import layers as L
from relprop.graph.canonize import FoldedParameters, can_fold
from relprop.graph.trace import OPERATOR_NAMES, check_no_softmax_output, is_softmax, output_node
from relprop.ops._backend import forced_backend, layer_backend
from relprop.ops._layer_rules import DIVIDES_AT_WINNERS
from relprop.rules.base import Norm, Pass, Rule, WinnerTakesAll

ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.PReLU,
)
# Modules relprop maps whose output is shaped unlike their input: never a pass-through.
SHAPE_CHANGING_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Unflatten,
)
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
ACTIVATION_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu_,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
GATE_PRODUCERS_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
GATE_PRODUCERS_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
IDENTITY_METHODS = {"contiguous", "clone", "detach", "float", "to", "type_as"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten", "view_as", "reshape_as"}
MOVEMENT_FUNCTIONS = {
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.cat,
    torch.concat,
    torch.stack,
    operator.getitem,
    torch.movedim,
}
MOVEMENT_METHODS = {
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "movedim",
    "repeat",
}
# Ops that split a tensor into a tuple of views; each part the model takes (x.chunk(2, 1)[0], or
# `a, b = x.chunk(2, 1)`) becomes one movement step from the split's input.
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
MEAN_FUNCTIONS = {torch.mean, torch.sum}
MEAN_METHODS = {"mean", "sum"}
META_METHODS = {"size", "dim", "numel"}


@dataclass
class Step:
    """One node of the model: what it is, which rule applies, and the layer that runs it."""

    name: str
    op: str  # fx op: placeholder, get_attr, call_module, call_function, call_method, output
    target: Any
    args: tuple
    kwargs: dict
    leaves: list[str | None]  # node name per argument leaf (None for constants)
    path: str  # module path, or the innermost module the call sits in
    kind: str
    rule: Any = None
    impl: str = ""
    layer: L.Layer | None = None


@dataclass
class Plan:
    """The steps of one model in execution order."""

    steps: list[Step]
    input_name: str
    output_name: str
    first_layer: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("#", "node", "module / function", "kind", "rule", "op")]
        for i, s in enumerate(self.steps):
            if s.op in ("placeholder", "output") or s.kind in ("meta", "constant"):
                continue
            rule = s.rule.describe() if s.rule is not None else "-"
            impl = s.impl if s.layer is None else s.layer.describe_impl(s.impl)
            rows.append((str(i), s.name, s.path, s.kind, rule, impl or "-"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + self.notes)

    __repr__ = __str__

    def rules(self) -> dict[str, str]:
        """Module path → rule description, for every step with a rule."""
        return {s.path: s.rule.describe() for s in self.steps if s.rule is not None}


def _is_split(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SPLIT_METHODS
    return node.op == "call_function" and node.target in SPLIT_FUNCTIONS


def _split_of(node: fx.Node) -> fx.Node | None:
    """The split whose part ``node`` takes (``getitem(split, i)`` with a constant int ``i``)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    source, index = node.args
    if isinstance(source, fx.Node) and _is_split(source) and isinstance(index, int):
        return source
    return None


# Functional layers and their parameter names (F.linear, F.conv1d, F.conv2d).
FUNCTIONAL_LAYERS = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}


class FunctionalParameters:
    """``weight`` and ``bias`` of a functional layer, read from the model's attributes each time
    they are asked for, as a module's are."""

    def __init__(self, root: nn.Module, weight: str, bias: str | None) -> None:
        self._root, self._weight, self._bias = root, weight, bias

    @property
    def weight(self) -> Tensor:
        return attribute(self._root, self._weight)

    @property
    def bias(self) -> Tensor | None:
        return None if self._bias is None else attribute(self._root, self._bias)


def attribute(root: nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` node's dotted ``target`` names on ``root``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _attention_with_fixed_weights(module: nn.MultiheadAttention) -> Callable[..., Any]:
    """The attention ``module(query, key, value, ...)`` with its attention weights
    ``softmax(QKᵀ/√d)`` held fixed: query and key are cut from autograd, so the vector-Jacobian
    product (and the z-rule built on it) runs through the values alone."""

    def run(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        return module(query.detach(), key.detach(), value, *args, **kwargs)

    return run


def _sdpa_with_fixed_weights(query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
    """``F.scaled_dot_product_attention`` with its attention weights held fixed (see
    :func:`_attention_with_fixed_weights`)."""
    return F.scaled_dot_product_attention(query.detach(), key.detach(), value, *args, **kwargs)


def _part_of(split: Callable[..., Any], index: int) -> Callable[..., Any]:
    """``split(*args, **kwargs)[index]``: one part of a split as an op of the split's input."""

    def part(*args: Any, **kwargs: Any) -> Any:
        return split(*args, **kwargs)[index]

    return part


def _node_leaves(args: tuple, kwargs: dict) -> list[str | None]:
    return [v.name if isinstance(v, fx.Node) else None for v in L._flat_tensors(args, kwargs)]


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    inner = list(stack.values())[-1][0] if stack else ""
    name = OPERATOR_NAMES.get(node.target) or getattr(node.target, "__name__", str(node.target))
    return f"{inner}:{name}" if inner else str(name)


def _unsupported(
    node: fx.Node, gm: fx.GraphModule, what: str, way_out: str | None = None
) -> UnsupportedLayerError:
    """The error for ``node``, naming where it is, its type, ``what`` is wrong and the way out.

    ``way_out`` replaces the general advice (map an element-wise module to ``Pass``, or use a
    gradient analyzer) where that advice would lead to another refusal: a layer with weights, or
    a configuration relprop refuses whatever the composite says. In and around attention (by
    module type, or a product of two activations) the advice is always the attention one.
    """
    if _in_attention(node, gm) or _multiplies_two_activations(node):
        # Whatever failed there (a softmax, a product of two activations), the general advice
        # (Pass, a softmax mapped to Pass) would give a heatmap that ignores the token mixing.
        way_out = _ATTENTION_WAY_OUT
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        type_name = type(module).__name__
        if way_out is None:
            way_out = (
                "If it is element-wise (its output shaped like its input), map it to "
                f"relprop.rules.Pass() in a composite: relprop.create_analyzer('lrp', model, "
                f"composite=relprop.composites.Composite(layer_map=[({type_name}, "
                f"relprop.rules.Pass())])); otherwise {_GRADIENT_WAY_OUT}"
            )
        return UnsupportedLayerError(
            f"module {node.target!r} of type {type(module).__module__}.{type_name} has no "
            f"relevance mapping in relprop ({what}). {way_out}"
        )
    stack = node.meta.get("nn_module_stack") or {}
    where = ""
    if stack:
        path, module_type = list(stack.values())[-1]
        type_name = getattr(module_type, "__qualname__", str(module_type))
        where = (
            f" inside module {path!r} of type {getattr(module_type, '__module__', '')}.{type_name}"
        )
    if way_out is None:
        way_out = (
            "Rewrite it with supported layers; or, if it is element-wise, wrap it in a module of "
            "your own and map that module type to relprop.rules.Pass() in a composite; or "
            f"{_GRADIENT_WAY_OUT}"
        )
    return UnsupportedLayerError(
        f"{node.op} {getattr(node.target, '__name__', node.target)!r}{where} "
        f"has no relevance mapping in relprop ({what}). {way_out}"
    )


def _in_attention(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is an attention module or runs inside one (by type: ``nn.
    MultiheadAttention``, or a class named ``*Attention*`` as torchvision's and timm's are)."""
    types = [type(gm.get_submodule(node.target))] if node.op == "call_module" else []
    types += [t for _, t in (node.meta.get("nn_module_stack") or {}).values()]
    return any(
        isinstance(t, type)
        and (issubclass(t, nn.MultiheadAttention) or "attention" in t.__name__.lower())
        for t in types
    )


_PRODUCT_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm}
_PRODUCT_METHODS = {"matmul", "bmm", "__matmul__"}


def _multiplies_two_activations(node: fx.Node) -> bool:
    """A matrix product of two tensors computed from the input (attention's ``q kᵀ`` and
    ``softmax(·) v``), not of an activation and a constant."""
    if node.op == "call_method":
        is_product = node.target in _PRODUCT_METHODS
    else:
        is_product = node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS
    computed = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return is_product and len(computed) >= 2


_GRADIENT_WAY_OUT = (
    "explain with a gradient analyzer ('gradient', 'input_t_gradient', 'integrated_gradients', "
    "'smoothgrad'), which runs any differentiable layer"
)

_ATTENTION_WAY_OUT = (
    "Attention mixes tokens with weights computed from the input (softmax(QKᵀ)V). relprop explains "
    "nn.MultiheadAttention and F.scaled_dot_product_attention with those weights held fixed "
    "(relevance goes back through the values, as in CP-LRP); attention written out of other ops "
    "(matrix products of two activations, a softmax inside) has no rule, and mapping it to "
    "relprop.rules.Pass() would keep each token's relevance in place, which is not what the layer "
    "does. Compute it with F.scaled_dot_product_attention (or nn.MultiheadAttention); or "
    f"{_GRADIENT_WAY_OUT}"
)


# A module of the user's own mapped to Pass hands all relevance to its first tensor argument.
_TWO_OPERANDS_WAY_OUT = (
    "If all relevance should go to the first operand (the second one a normalisation or a gate), "
    "compute it in a module of your own, e.g. forward(self, a, b) returning a * b, and map that "
    "module type to relprop.rules.Pass() in a composite; or " + _GRADIENT_WAY_OUT
)


def _same_padding(module: nn.Module, dims: int) -> tuple[int, ...] | None:
    """The explicit zero padding equal to ``padding='same'``, or None where it is asymmetric.

    torch pads ``dilation·(k − 1)`` in total per dimension, the odd one on the far side; relprop's
    convolution takes one padding per dimension for both sides, so only even totals map.
    """
    totals = [
        d * (k - 1) for d, k in zip(_pair(module.dilation, dims), _pair(module.kernel_size, dims))
    ]
    if any(total % 2 for total in totals):
        return None
    return tuple(total // 2 for total in totals)


def _pair(value: int | Sequence[int], dims: int = 2) -> tuple[int, ...]:
    """A module's int-or-tuple geometry argument as a ``dims``-tuple."""
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


def _bind(node: fx.Node, names: list[str], defaults: dict) -> dict:
    values = dict(defaults)
    for name, value in zip(names, node.args[1:]):
        values[name] = value
    for name, value in node.kwargs.items():
        if name in values or name in names:
            values[name] = value
    return values


class PlanBuilder:
    """Turns a traced GraphModule and a composite into a :class:`Plan`."""

    def __init__(self, gm: fx.GraphModule, composite, model: nn.Module | None = None) -> None:
        self.gm = gm
        self.composite = composite
        # The traced model itself: its module paths name what a name_map key may have meant.
        self.model = model

    def build(self) -> Plan:
        gm = self.gm
        check_no_softmax_output(gm)
        self._check_name_map()
        out = output_node(gm.graph)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(
                f"the model's forward takes {len(placeholders)} inputs "
                f"({', '.join(p.name for p in placeholders)}); relprop explains models of one "
                "input tensor. Wrap the model so that forward(x) takes one tensor"
            )
        folded = self._fold_batch_norms()
        self._meta: set[str] = set()  # nodes whose values are sizes, not tensors
        # Nodes computed from the model's attributes alone (no input): no relevance reaches them.
        self._constants: set[str] = set()
        steps: list[Step] = []
        first_layer = None
        for node in gm.graph.nodes:
            step = Step(
                node.name,
                node.op,
                node.target,
                node.args,
                node.kwargs,
                _node_leaves(node.args, node.kwargs),
                _module_path(node),
                "",
            )
            split = _split_of(node)
            attention = self._attention_part(node)
            if self._attention_module(node) is not None:
                self._check_attention(node)
                # Its output (index 0) is a step of its own (below), computed from the
                # attention's arguments; the (output, weights) tuple carries no relevance.
                step.kind = "attention"
                step.layer = L.PassLayer(_nothing)
            elif attention is not None:
                source, index = attention
                step.args, step.kwargs = source.args, source.kwargs
                step.leaves = _node_leaves(source.args, source.kwargs)
                step.path = _module_path(source)
                if index == 0:
                    module = self._attention_module(source)
                    step.kind, step.rule = "attention (A fixed)", Norm(self.composite.stabilizer)
                    step.layer = L.NormLayer(
                        _part_of(_attention_with_fixed_weights(module), 0),
                        self.composite.stabilizer,
                    )
                else:
                    step.kind = "attention weights (unused)"
                    step.layer = L.PassLayer(_nothing)
            elif _is_split(node):
                self._check_split_users(node)
                # Its parts are steps of their own (below), each computed from the split's
                # input; the tuple itself is never needed.
                step.kind = "split"
                step.layer = L.PassLayer(_nothing)
            elif split is not None:
                # Part `index` of a split, taken straight from the split's input: relevance
                # moves back into that part of it.
                step.args, step.kwargs = split.args, split.kwargs
                step.leaves = _node_leaves(split.args, split.kwargs)
                step.kind = "movement"
                step.layer = L.MovementLayer(_part_of(self._callable(split), node.args[1]))
            elif node.op == "placeholder":
                step.kind = "input"
            elif node.op == "output":
                step.kind = "output"
            elif node.op == "get_attr":
                step.kind = "constant"
                self._constants.add(node.name)
            elif node.name in folded.get("absorbed", {}):
                self._check_no_rule_on_unweighted(node)
                step.kind = "batchnorm (folded)"
                step.layer = L.PassLayer(_identity)
                step.impl = f"folded into {folded['absorbed'][node.name]}"
            else:
                is_first = False
                if self._has_weights(node) and first_layer is None:
                    first_layer = node.name
                    is_first = True
                self._classify(node, step, folded, is_first)
            if step.kind == "meta":
                self._meta.add(node.name)
            steps.append(step)
        by_name = {s.name: s for s in steps}
        self._fuse_relus(by_name)
        self._divide_at_max_pools(by_name)
        return Plan(steps, placeholders[0].name, out.name, first_layer)

    def _attention_module(self, node: fx.Node) -> nn.MultiheadAttention | None:
        if node.op != "call_module":
            return None
        module = self.gm.get_submodule(node.target)
        return module if isinstance(module, nn.MultiheadAttention) else None

    def _attention_part(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """``(attention, i)`` where ``node`` is ``getitem(attention, i)`` of an
        ``nn.MultiheadAttention``'s (output, weights) pair."""
        if node.op != "call_function" or node.target is not operator.getitem:
            return None
        source, index = node.args
        if isinstance(source, fx.Node) and self._attention_module(source) is not None:
            return source, index
        return None

    def _check_attention(self, node: fx.Node) -> None:
        """The (output, weights) pair must be unpacked; the weights must go unused (they carry
        no relevance here)."""
        self._check_no_rule_on_unweighted(node)
        for user in node.users:
            part = self._attention_part(user)
            if part is None or part[1] not in (0, 1) or (part[1] == 1 and user.users):
                raise _unsupported(
                    node,
                    self.gm,
                    f"its (output, weights) pair goes on other than as `out, _ = attention(...)` "
                    f"(to {_module_path(user)!r})",
                    "Take its output by index (`out = attention(q, k, v)[0]`) and leave the "
                    f"attention weights unused; or {_GRADIENT_WAY_OUT}",
                )

    def _check_split_users(self, node: fx.Node) -> None:
        """A split's tuple must only be indexed by constants (``a, b = x.chunk(2, 1)``); a tuple
        passed on whole (``torch.cat(x.chunk(2, 1))``) has no relevance of its own to go back."""
        for user in node.users:
            if _split_of(user) is None:
                raise _unsupported(
                    node,
                    self.gm,
                    f"its parts go on as one tuple (to {_module_path(user)!r}), not each taken "
                    "by a constant index",
                    "Take the parts by index (`a, b = x.chunk(2, dim=1)`) and pass them on as "
                    f"tensors; or {_GRADIENT_WAY_OUT}",
                )

    def _check_name_map(self) -> None:
        """Refuse name_map keys that name no layer the plan will look up: silently ignored, a
        typo left its layer to the default rule."""
        names = getattr(self.composite, "name_map", None) or {}
        layers = [str(n.target) for n in self.gm.graph.nodes if n.op == "call_module"]
        unknown = [name for name in names if name not in layers]
        if not unknown:
            return
        modules = dict((self.model or self.gm).named_modules())
        problems = []
        for name in unknown:
            if name in modules:
                inner = [p for p in layers if p.startswith(f"{name}.")] if name else layers
                problem = (
                    f"{name!r} is a {type(modules[name]).__name__} that the traced forward does "
                    "not run as one layer"
                )
                if inner:
                    problem += f"; map its layers instead: {', '.join(map(repr, inner[:6]))}"
                    problem += ", ..." if len(inner) > 6 else ""
                problem += (
                    " (or map it to relprop.rules.Pass(), which keeps it whole, if it is "
                    "element-wise)"
                )
            else:
                problem = f"{name!r} names no module of the model"
                close = difflib.get_close_matches(name, layers, n=3, cutoff=0.5)
                if close:
                    problem += f" (did you mean {' or '.join(map(repr, close))}?)"
            problems.append(problem)
        raise UnknownLayerNameError(
            f"the composite's name_map has {len(unknown)} key(s) naming no layer of the model: "
            f"{'; '.join(problems)}. Keys are module paths as model.named_modules() gives them; "
            f"the model's layers are {', '.join(map(repr, layers[:12]))}"
            f"{', ...' if len(layers) > 12 else ''}"
        )

    # -- ReLU fusion ----------------------------------------------------------------------

    def _fuse_relus(self, steps: dict[str, Step]) -> None:
        """Let a dense/conv layer, or a residual sum, apply the ReLU after it, in place, and keep
        ``relu(z)``.

        The rules that read ``z`` (ε, αβ, γ, and the sum's z-rule) only need it where relevance
        arrives. When every path from the ReLU's output hands relevance only to non-zero
        activations, ``relu(z)`` equals ``z`` wherever it is read — and ``relu(z)`` is the next
        layer's input, held anyway. So the layer keeps no tensor of its own, as autograd keeps
        none with an in-place ReLU; a ResNet block's sum no longer holds its output beside the
        ReLU's, and its division reads one tensor where it read two (the relevance arrives as
        ``c · relu(z)``, and ``relu(z)`` is now the denominator too).
        """
        for node in self.gm.graph.nodes:
            step = steps.get(node.name)
            if step is None:
                continue
            if isinstance(step.layer, L.WeightLayer):
                if step.rule.ignore_bias:
                    continue  # ignore-bias rules divide by z without bias, not the layer's output
            elif not (isinstance(step.layer, L.NormLayer) and step.layer.is_sum):
                continue
            relu = self._single_user_through_folded_bn(node, steps)
            if relu is None or steps[relu.name].kind != "activation" or not self._is_relu(relu):
                continue
            if not self._zero_preserving(relu, steps, depth=0):
                continue
            step.layer.fused_relu = True
            step.kind += " + relu"
            relu_step = steps[relu.name]
            relu_step.kind = "relu (fused)"
            relu_step.layer = L.PassLayer(_identity)

    def _divide_at_max_pools(self, steps: dict[str, Step]) -> None:
        """Let the division of a convolution whose output (after a fused ReLU) a max pool
        alone reads run at the pool's output size: made by the pool under ε
        (``layers.Shares``), by the convolution at the pool's winners under z⁺ and γ
        (``layers.Unspread``).

        The convolution's division reads its relevance — zero but at the pool's winners — and
        a denominator at the pool's input size: under ε its output, which at each window's
        winner is the pool's output itself; under z⁺ and γ a product the layer makes in its
        relevance step, which it can read at the winners alone. Only where nothing else reads
        the output: relevance from another reader would have to be added before the division.
        The layer's forward checks what a plan cannot know (its input ≥ 0, the backend).
        """
        for node in self.gm.graph.nodes:
            step = steps.get(node.name)
            if step is None or not isinstance(step.layer, L.WeightLayer):
                continue
            layer = step.layer
            rule = step.rule.op()[0]
            if layer.geometry is None:  # a convolution, 1-D or 2-D
                continue
            if rule != "epsilon" and rule not in DIVIDES_AT_WINNERS:
                continue
            user = self._single_user_through_folded_bn(node, steps)
            if user is not None and steps[user.name].kind == "relu (fused)":
                user = self._single_user_through_folded_bn(user, steps)
            if user is not None and isinstance(steps[user.name].layer, L.MaxPoolLayer):
                layer.divides_at_max_pool = True

    def _single_user_through_folded_bn(self, node: fx.Node, steps) -> fx.Node | None:
        while len(node.users) == 1:
            (user,) = node.users
            if steps[user.name].kind != "batchnorm (folded)":
                return user
            node = user
        return None

    def _is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.gm.get_submodule(node.target)) is nn.ReLU
        if node.op == "call_function":
            return node.target in (F.relu, torch.relu, F.relu_, torch.relu_)
        return node.op == "call_method" and node.target in ("relu", "relu_")

    def _zero_preserving(self, node: fx.Node, steps, depth: int) -> bool:
        """True when the relevance reaching ``node`` is zero wherever its value is zero."""
        if depth > 64:
            return False
        for user in node.users:
            step = steps[user.name]
            if step.op == "output":
                continue  # the start relevance is the output value times a mask
            if isinstance(step.layer, L.WeightLayer):
                if step.rule.op()[0] not in INPUT_PROPORTIONAL_RULES:
                    return False
            elif step.kind in ("avg_pool", "sum", "mean"):
                continue  # z-rule: R_i = x_i · (...)
            elif step.kind in PASS_THROUGH_KINDS or (
                step.kind == "activation" and self._is_relu(user)
            ):
                if not self._zero_preserving(user, steps, depth + 1):
                    return False
            else:
                return False
        return True

    # -- BatchNorm folding ------------------------------------------------------------------

    def _fold_batch_norms(self) -> dict:
        """Map each foldable BatchNorm to the dense/conv layer right before it."""
        params: dict[str, list[nn.Module]] = {}
        absorbed: dict[str, str] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_module":
                continue
            bn = self.gm.get_submodule(node.target)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not can_fold(bn):
                continue
            prev = node.args[0] if node.args else None
            if not isinstance(prev, fx.Node) or len(prev.users) != 1:
                continue
            if not self._has_weights(prev):
                continue
            params.setdefault(prev.name, []).append(bn)
            absorbed[node.name] = prev.name
        return {"bns": params, "absorbed": absorbed}

    def _check_no_rule_on_unweighted(self, node: fx.Node) -> None:
        """Refuse a composite entry that gives module ``node`` (no Linear or convolution) a rule
        of those layers: it would be ignored, and the user would believe it applied."""
        module = self.gm.get_submodule(node.target)
        entry = self.composite.rule_entry_for_unweighted(str(node.target), module)
        if entry is None:
            return
        raise RuleMappingError(
            f"module {node.target!r} of type {type(module).__name__} is no Linear, Conv1d or "
            f"Conv2d, but {entry} gives it a rule of those layers, which it would ignore. "
            "relprop gives other modules their own rule (winner-takes-all for max pooling, the "
            "z-rule for average pooling and sums, BatchNorm folded into the layer before it, "
            "relevance passed through activations): remove the entry; for a block of your own, "
            "map the layers inside it (by their type, or by their paths); map "
            "relprop.rules.Pass() to hand relevance through an element-wise module of your own"
        )

    def _has_weights(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return self._functional_layer(node) is not None
        if node.op != "call_module":
            return False
        module = self.gm.get_submodule(node.target)
        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))

    def _functional_layer(self, node: fx.Node) -> tuple[nn.Module, FunctionalParameters] | None:
        """For ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` whose weight (and bias) are parameters
        or buffers of the model: an equivalent module on the meta device (its type and geometry
        choose the rule as a module's would) and the parameters read at every pass."""
        if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
            return None
        names = FUNCTIONAL_LAYERS[node.target]
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        weight, bias = bound.get("weight"), bound.get("bias")
        constant = [t for t in (weight, bias) if t is not None]
        if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in constant):
            return None
        shape = tuple(attribute(self.gm, weight.target).shape)
        has_bias = bias is not None
        if node.target is F.linear:
            module = nn.Linear(shape[1], shape[0], bias=has_bias, device="meta")
        else:
            conv = nn.Conv1d if node.target is F.conv1d else nn.Conv2d
            groups = bound.get("groups", 1)
            module = conv(
                shape[1] * groups, shape[0], tuple(shape[2:]), stride=bound.get("stride", 1),
                padding=bound.get("padding", 0), dilation=bound.get("dilation", 1),
                groups=groups, bias=has_bias, device="meta",
            )  # fmt: skip
        # Read from the model itself: a parameter it was given anew since the trace (model.w =
        # nn.Parameter(...)) is the one explained, as a module's would be.
        root = self.model if self.model is not None else self.gm
        params = FunctionalParameters(root, weight.target, bias.target if has_bias else None)
        return module, params

    # -- classification -----------------------------------------------------------------

    def _classify(self, node: fx.Node, step: Step, folded: dict, is_first: bool) -> None:
        gm = self.gm
        stabilizer = self.composite.stabilizer
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            mapped = self.composite.rule_for(str(node.target), module, is_first)
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                self._check_no_rule_on_unweighted(node)
            max_pools = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
            if isinstance(module, max_pools) and module.return_indices:
                # The step hands on the pooled tensor alone; the (output, indices) pair the model
                # unpacks would be indexed as if it were that tensor (its first sample).
                raise UnsupportedLayerError(
                    f"module {node.target!r} of type {type(module).__name__} returns its indices "
                    "(return_indices=True), which relprop does not map; build it with "
                    "return_indices=False if the model does not use them, or explain with a "
                    "gradient analyzer ('gradient', 'integrated_gradients')"
                )
            if isinstance(mapped, Pass) and isinstance(module, SHAPE_CHANGING_MODULES):
                raise UnsupportedLayerError(
                    f"module {node.target!r} of type {type(module).__name__} is mapped to "
                    "relprop.rules.Pass() in the composite, but it changes the shape of its input "
                    "(Pass hands relevance through unchanged, which needs an output shaped like "
                    "the input). Remove it from the composite's maps: relprop gives it its own "
                    "rule (winner-takes-all for max pooling, the z-rule for average pooling, "
                    "relevance moved with the values for a reshape)"
                )
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                self._weight_step(node, step, module, folded["bns"].get(node.name, []), mapped)
            elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
                dims = 1 if isinstance(module, nn.MaxPool1d) else 2
                pool = F.max_pool1d if dims == 1 else F.max_pool2d
                m = module
                step.kind, step.rule, step.impl = "max_pool", WinnerTakesAll(), _pool_impl()
                step.layer = L.MaxPoolLayer(
                    lambda x: pool(
                        x,
                        m.kernel_size,
                        m.stride,
                        m.padding,
                        m.dilation,
                        ceil_mode=m.ceil_mode,
                        return_indices=True,
                    ),
                    _max_pool_window(dims, m.kernel_size, m.stride, m.padding, m.dilation),
                )
            elif isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
                dims = 1 if isinstance(module, nn.AdaptiveMaxPool1d) else 2
                pool = F.adaptive_max_pool1d if dims == 1 else F.adaptive_max_pool2d
                size = module.output_size
                step.kind, step.rule, step.impl = "max_pool", WinnerTakesAll(), _pool_impl()
                step.layer = L.MaxPoolLayer(lambda x: pool(x, size, return_indices=True))
            elif isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
                dims = 1 if isinstance(module, nn.AvgPool1d) else 2
                options = {
                    "kernel_size": module.kernel_size,
                    "stride": module.stride,
                    "padding": module.padding,
                    "ceil_mode": module.ceil_mode,
                    "count_include_pad": module.count_include_pad,
                    "divisor_override": getattr(module, "divisor_override", None),
                }
                step.kind, step.rule, step.impl = "avg_pool", Norm(stabilizer), _pool_impl()
                step.layer = L.AvgPoolLayer(dims, options, stabilizer)
            elif isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
                dims = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
                step.kind, step.rule, step.impl = "avg_pool", Norm(stabilizer), _pool_impl()
                step.layer = L.AdaptiveAvgPoolLayer(dims, module.output_size, stabilizer)
            elif isinstance(module, ACTIVATION_MODULES):
                step.kind, step.rule = "activation", Pass()
                step.layer = L.PassLayer(
                    _out_of_place(module), nonnegative_output=type(module) is nn.ReLU
                )
            elif isinstance(module, IDENTITY_MODULES) or type(module).__name__ == "StochasticDepth":
                step.kind, step.rule = "identity", Pass()
                step.layer = L.PassLayer(_identity)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if can_fold(module):
                    # Not after a dense/conv layer: Zennit's choice, relevance passes through.
                    step.kind, step.rule = "batchnorm", Pass()
                    step.layer = L.PassLayer(_batch_norm_eval(module))
                elif isinstance(mapped, Pass):
                    # The user's choice: relevance passes through, and the forward normalises
                    # with the batch's own statistics, as the model does in eval mode.
                    step.kind, step.rule = "batchnorm (batch statistics)", mapped
                    step.layer = L.PassLayer(module)
                else:
                    raise _unsupported(
                        node,
                        gm,
                        "BatchNorm without running statistics: track_running_stats=False "
                        "normalises every batch with its own mean and variance, also in eval "
                        "mode, so it cannot be folded into the layer before it",
                        "Give it running statistics (build it with track_running_stats=True and "
                        "run training batches to estimate them); or pass relevance through it "
                        "unchanged, normalising with the batch's statistics as the model does: "
                        "relprop.create_analyzer('lrp', model, composite=relprop.composites."
                        f"Composite(name_map={{{str(node.target)!r}: relprop.rules.Pass()}})) "
                        "(a preset composite takes the same name_map); or "
                        f"{_GRADIENT_WAY_OUT}",
                    )
            elif isinstance(module, (nn.Flatten, nn.Unflatten)):
                step.kind = "reshape"
                step.layer = L.MovementLayer(module, reshape_only=True)
            elif isinstance(module, nn.LayerNorm) and not isinstance(mapped, Pass):
                step.kind, step.rule = "layer_norm (σ fixed)", Norm(stabilizer)
                step.layer = L.SigmaFixedNormLayer(_layer_norm_module_arguments(module), stabilizer)
            elif isinstance(module, nn.GroupNorm) and not isinstance(mapped, Pass):
                step.kind, step.rule = "group_norm (σ fixed)", Norm(stabilizer)
                step.layer = L.SigmaFixedNormLayer(_group_norm_module_arguments(module), stabilizer)
            elif isinstance(module, nn.modules.instancenorm._InstanceNorm) and not isinstance(
                mapped, Pass
            ):
                if module.track_running_stats:
                    # In eval mode a per-channel affine map with fixed statistics, as an
                    # unfolded BatchNorm: relevance passes through.
                    step.kind, step.rule = "instance_norm (running statistics)", Pass()
                    step.layer = L.PassLayer(module)
                else:
                    step.kind, step.rule = "instance_norm (σ fixed)", Norm(stabilizer)
                    step.layer = L.SigmaFixedNormLayer(
                        _instance_norm_module_arguments(module), stabilizer
                    )
            elif isinstance(mapped, Pass):
                step.kind, step.rule = "mapped", mapped
                step.layer = L.MappedPassLayer(module, str(node.target))
            elif is_softmax(node, gm):
                type_name = type(module).__name__
                raise _unsupported(
                    node,
                    gm,
                    "a softmax inside the network has no LRP rule",
                    "To pass relevance through it unchanged, map it in a composite: "
                    "relprop.create_analyzer('lrp', model, composite=relprop.composites."
                    f"Composite(layer_map=[({type_name}, relprop.rules.Pass())])); or "
                    f"{_GRADIENT_WAY_OUT}",
                )
            else:
                raise _unsupported(node, gm, "not a layer relprop knows")
            return
        target = node.target
        is_method = node.op == "call_method"
        inputs = node.all_input_nodes
        functional = self._functional_layer(node)
        if functional is not None:
            module, params = functional
            mapped = self.composite.rule_for(step.path, module, is_first)
            bns = folded["bns"].get(node.name, [])
            self._weight_step(node, step, module, bns, mapped, params)
            return
        if inputs and all(n.name in self._meta for n in inputs):
            # Arithmetic on sizes (h.size(1) * h.size(2), x.shape[1] // 2): Python numbers that
            # carry no relevance, whatever the operator.
            step.kind = "meta"
            step.layer = L.PassLayer(self._callable(node))
            return
        if inputs and all(n.name in self._constants or n.name in self._meta for n in inputs):
            # Computed from parameters and buffers alone (a standardised weight, a scaled
            # embedding): run as the model runs it, whatever the operator; relevance, which
            # flows from the input, never reaches it.
            step.kind = "constant"
            step.layer = L.PassLayer(self._callable(node))
            self._constants.add(node.name)
            return
        if not is_method and target in FUNCTIONAL_LAYERS:
            raise _unsupported(
                node,
                self.gm,
                "its weight is computed in the forward pass (from the input, or from parameters "
                "by other ops), not a parameter or buffer of the model that LRP's rules can read",
                "Give the layer its weight as a parameter (an nn.Linear/nn.Conv2d, or "
                f"F.{target.__name__}(x, self.weight, ...)); or {_GRADIENT_WAY_OUT}",
            )
        if (not is_method and target in ACTIVATION_FUNCTIONS) or (
            is_method and target in ACTIVATION_METHODS
        ):
            step.kind, step.rule = "activation", Pass()
            step.layer = L.PassLayer(self._callable(node), nonnegative_output=self._is_relu(node))
        elif (
            not is_method
            and (
                target in IDENTITY_FUNCTIONS
                or getattr(target, "__name__", "") == "stochastic_depth"
            )
        ) or (is_method and target in IDENTITY_METHODS):
            step.kind, step.rule = "identity", Pass()
            step.layer = L.PassLayer(self._callable(node))
        elif (not is_method and target in RESHAPE_FUNCTIONS) or (
            is_method and target in RESHAPE_METHODS
        ):
            step.kind = "reshape"
            step.layer = L.MovementLayer(self._callable(node), reshape_only=True)
        elif (not is_method and target in MOVEMENT_FUNCTIONS) or (
            is_method and target in MOVEMENT_METHODS
        ):
            step.kind = "movement"
            step.layer = L.MovementLayer(self._callable(node))
        elif is_method and target in META_METHODS:
            step.kind = "meta"
            step.layer = L.PassLayer(self._callable(node))
        elif (not is_method and target in ADD_FUNCTIONS) or (
            is_method and target in ("add", "add_", "sub", "sub_")
        ):
            self._sum_step(node, step, stabilizer)
        elif (not is_method and target in MUL_FUNCTIONS) or (
            is_method and target in ("mul", "mul_", "div", "div_")
        ):
            self._mul_step(node, step)
        elif not is_method and target is F.scaled_dot_product_attention:
            step.kind, step.rule = "attention (A fixed)", Norm(stabilizer)
            step.layer = L.NormLayer(_sdpa_with_fixed_weights, stabilizer)
        elif not is_method and target in (F.layer_norm, torch.layer_norm):
            step.kind, step.rule = "layer_norm (σ fixed)", Norm(stabilizer)
            step.layer = L.SigmaFixedNormLayer(_layer_norm_function_arguments, stabilizer)
        elif not is_method and target in (F.group_norm, torch.group_norm):
            step.kind, step.rule = "group_norm (σ fixed)", Norm(stabilizer)
            step.layer = L.SigmaFixedNormLayer(_group_norm_function_arguments, stabilizer)
        elif (not is_method and target in MEAN_FUNCTIONS) or (is_method and target in MEAN_METHODS):
            step.kind, step.rule = "mean", Norm(stabilizer)
            step.layer = L.NormLayer(self._callable(node), stabilizer)
        elif not is_method and target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool1d):
            dims = 2 if target is F.adaptive_avg_pool2d else 1
            size = _bind(node, ["output_size"], {"output_size": None})["output_size"]
            step.kind, step.rule, step.impl = "avg_pool", Norm(stabilizer), _pool_impl()
            step.layer = L.AdaptiveAvgPoolLayer(dims, size, stabilizer)
        elif not is_method and target in (F.avg_pool2d, F.avg_pool1d):
            dims = 2 if target is F.avg_pool2d else 1
            names = [
                "kernel_size",
                "stride",
                "padding",
                "ceil_mode",
                "count_include_pad",
                "divisor_override",
            ]
            o = _bind(
                node,
                names,
                {
                    "stride": None,
                    "padding": 0,
                    "ceil_mode": False,
                    "count_include_pad": True,
                    "divisor_override": None,
                },
            )
            if o["stride"] is None:
                o["stride"] = o["kernel_size"]
            step.kind, step.rule, step.impl = "avg_pool", Norm(stabilizer), _pool_impl()
            step.layer = L.AvgPoolLayer(dims, o, stabilizer)
        elif not is_method and target in (
            F.max_pool2d,
            F.max_pool1d,
            torch.max_pool2d,
            torch.max_pool1d,
        ):
            pool = F.max_pool2d if target in (F.max_pool2d, torch.max_pool2d) else F.max_pool1d
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            o = _bind(
                node, names, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
            )
            step.kind, step.rule, step.impl = "max_pool", WinnerTakesAll(), _pool_impl()
            step.layer = L.MaxPoolLayer(
                lambda x: pool(
                    x,
                    o["kernel_size"],
                    o["stride"],
                    o["padding"],
                    o["dilation"],
                    ceil_mode=o["ceil_mode"],
                    return_indices=True,
                ),
                _max_pool_window(
                    1 if pool is F.max_pool1d else 2,
                    o["kernel_size"],
                    o["stride"],
                    o["padding"],
                    o["dilation"],
                ),
            )
        elif not is_method and target in (F.adaptive_max_pool2d, F.adaptive_max_pool1d):
            pool = (
                F.adaptive_max_pool2d
                if target is F.adaptive_max_pool2d
                else (F.adaptive_max_pool1d)
            )
            size = _bind(node, ["output_size"], {"output_size": None})["output_size"]
            step.kind, step.rule, step.impl = "max_pool", WinnerTakesAll(), _pool_impl()
            step.layer = L.MaxPoolLayer(lambda x: pool(x, size, return_indices=True))
        elif not is_method and target is getattr:
            step.kind = "meta"
            step.layer = L.PassLayer(getattr)
        elif is_softmax(node, gm):
            raise _unsupported(
                node,
                gm,
                "a softmax inside the network has no LRP rule",
                "To pass relevance through it unchanged, call an nn.Softmax module instead and "
                "map it in a composite: relprop.composites.Composite(layer_map=[(nn.Softmax, "
                f"relprop.rules.Pass())]); or {_GRADIENT_WAY_OUT}",
            )
        else:
            raise _unsupported(node, gm, "an operation relprop does not map")

    def _callable(self, node: fx.Node):
        # In-place variants would overwrite tensors an earlier step saved for the relevance
        # pass (a ReLU(inplace=True) rewrites the conv output the ε-rule divides by).
        if node.op == "call_method":
            name = node.target.removesuffix("_")
            return lambda self_, *a, **k: getattr(self_, name)(*a, **k)
        target = IN_PLACE_FUNCTIONS.get(node.target, node.target)
        if node.kwargs.get("inplace"):
            return lambda *a, **k: target(*a, **{**k, "inplace": False})
        return target

    def _weight_step(self, node, step, module, bns, mapped, params=None) -> None:
        """``params``: where the weights are read (a functional layer's); the module's own by
        default."""
        rule = mapped if isinstance(mapped, Rule) else self.composite.default_rule()
        if isinstance(mapped, Pass):
            raise _unsupported(
                node,
                self.gm,
                "the composite maps it to Pass, but a layer with weights cannot pass relevance "
                "through",
                "Map it to an LRP rule instead, e.g. relprop.composites.Composite(name_map="
                f"{{{str(node.target)!r}: relprop.rules.Epsilon()}}) (or ZPlus, AlphaBeta, Gamma, "
                "Flat, WSquare, ZBox from relprop.rules), or drop it from the map to get the "
                "composite's default rule",
            )
        geometry = None
        dims = 2
        kind = "linear"
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            dims = 1 if isinstance(module, nn.Conv1d) else 2
            pad = module.padding
            if module.padding_mode != "zeros":
                raise _unsupported(
                    node,
                    self.gm,
                    f"padding_mode={module.padding_mode!r}: its border repeats input values, and "
                    "relprop's convolution rules take zero padding only",
                    "No composite maps it (a layer with weights needs an LRP rule, and the rules "
                    f"pad with zeros): {_GRADIENT_WAY_OUT}; or, if zero padding suits the model "
                    "(retrained, or as an approximation), build the layer with "
                    "padding_mode='zeros'",
                )
            if pad == "valid":
                pad = (0,) * dims
            elif pad == "same":
                pad = _same_padding(module, dims)
                if pad is None:
                    raise _unsupported(
                        node,
                        self.gm,
                        f"padding='same' with kernel_size={module.kernel_size} and dilation="
                        f"{module.dilation} pads one more on the far side than on the near one, "
                        "and relprop's convolution pads both sides alike",
                        "No composite maps it (a layer with weights needs an LRP rule). Use an "
                        "odd kernel size, where 'same' padding is symmetric and relprop maps it; "
                        f"or {_GRADIENT_WAY_OUT}",
                    )
            expand = (lambda v: (1, v[0])) if dims == 1 else (lambda v: tuple(v))
            geometry = {
                "stride": list(expand(_pair(module.stride, dims))),
                "padding": list((0, pad[0]) if dims == 1 else _pair(pad, 2)),
                "dilation": list(expand(_pair(module.dilation, dims))),
                "groups": module.groups,
            }
            kind = f"conv{dims}d"
        step.kind = kind
        step.rule = rule
        op = "linear" if geometry is None else "conv2d"
        # Under RELPROP_BACKEND=auto the backend is measured per input signature on first use;
        # the printed plan then names the ones chosen (WeightLayer.describe_impl).
        backend = "auto" if forced_backend() == "auto" else layer_backend()
        step.impl = f"relprop::{op} [{backend}]"
        if bns:
            step.kind += " + batchnorm"
        source = module if params is None else params
        step.layer = L.WeightLayer(FoldedParameters(source, bns), rule, geometry, dims)

    def _sum_step(self, node, step, stabilizer) -> None:
        live = [a for a in node.args[:2] if isinstance(a, fx.Node) and not self._is_constant(a)]
        if node.kwargs.get("alpha", 1) != 1:
            raise _unsupported(
                node,
                self.gm,
                "add/sub with alpha != 1",
                "Write it as a sum with a scaled operand, a + alpha * b (or a - alpha * b): "
                "relprop maps the product with a constant and the sum",
            )
        fn = self._callable(node)
        if len(live) < 2:
            # x + constant: the constant acts as a bias, relevance passes to x.
            index = step.leaves.index(live[0].name) if live else 0
            step.kind, step.rule = "add constant", Pass()
            step.layer = L.PassLayer(fn, index)
            return
        step.kind, step.rule = "sum", Norm(stabilizer)
        is_sum = node.target in (operator.add, operator.iadd, torch.add, "add", "add_")
        step.layer = L.NormLayer(fn, stabilizer, is_sum=is_sum)

    def _mul_step(self, node, step) -> None:
        operands = node.args[:2]
        live = [isinstance(a, fx.Node) and not self._is_constant(a) for a in operands]
        fn = self._callable(node)
        is_div = node.target in (operator.truediv, torch.div, "div", "div_")
        if sum(live) < 2:
            index = live.index(True) if any(live) else 0
            step.kind, step.rule = "scale", Pass()
            step.layer = L.PassLayer(fn, index)
            return
        if is_div:
            raise _unsupported(
                node, self.gm, "division of two tensors has no LRP rule", _TWO_OPERANDS_WAY_OUT
            )
        gates = [self._is_gate(a) for a in operands]
        if gates.count(True) != 1:
            raise _unsupported(
                node,
                self.gm,
                "a product of two tensors where neither (or both) is a sigmoid gate; relprop "
                "gives all relevance of 'signal * gate' to the signal",
                _TWO_OPERANDS_WAY_OUT,
            )
        step.kind, step.rule = "gate", Pass()
        step.layer = L.GateLayer(signal_index=gates.index(False))

    def _is_constant(self, node: fx.Node) -> bool:
        return node.op == "get_attr" or node.name in self._constants

    def _is_gate(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), GATE_PRODUCERS_MODULES)
        if node.op == "call_function":
            return node.target in GATE_PRODUCERS_FUNCTIONS
        return node.op == "call_method" and node.target in ("sigmoid", "sigmoid_")


IN_PLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    F.relu_: F.relu,
    torch.relu_: torch.relu,
}


def _out_of_place(module: nn.Module) -> nn.Module:
    """The module itself, or a shallow copy with ``inplace=False`` (the user's stays as it is)."""
    if not getattr(module, "inplace", False):
        return module
    clone = copy.copy(module)
    clone.inplace = False
    return clone


# Rules whose input relevance is x ⊙ (...): zero wherever the input is zero.
INPUT_PROPORTIONAL_RULES = {"epsilon", "zplus", "alphabeta", "gamma"}
# Steps that move relevance along with values, so zeros stay where they were.
PASS_THROUGH_KINDS = {
    "max_pool",
    "reshape",
    "movement",
    "identity",
    "batchnorm (folded)",
    "relu (fused)",
    "gate",
    "scale",
}


def _layer_norm_module_arguments(module: nn.LayerNorm):
    """An ``nn.LayerNorm`` step's ``F.layer_norm`` arguments (its parameters read at each run)."""

    def arguments(args: tuple, kwargs: dict) -> L.LayerNormArguments:
        weight = None if module.weight is None else module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        return L.LayerNormArguments(
            args[0], tuple(module.normalized_shape), weight, bias, module.eps
        )

    return arguments


def _layer_norm_function_arguments(args: tuple, kwargs: dict) -> L.LayerNormArguments:
    """``F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)``'s arguments
    as the traced call gave them."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    shape = bound["normalized_shape"]
    return L.LayerNormArguments(
        bound["input"],
        (shape,) if isinstance(shape, int) else tuple(shape),
        bound.get("weight"),
        bound.get("bias"),
        bound.get("eps", 1e-5),
    )


def _group_norm_module_arguments(module: nn.GroupNorm):
    """An ``nn.GroupNorm`` step's ``F.group_norm`` arguments (its parameters read at each run)."""

    def arguments(args: tuple, kwargs: dict) -> L.GroupNormArguments:
        weight = None if module.weight is None else module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        return L.GroupNormArguments(args[0], module.num_groups, weight, bias, module.eps)

    return arguments


def _instance_norm_module_arguments(module: nn.Module):
    """An InstanceNorm step's arguments (its affine parameters read at each run)."""

    def arguments(args: tuple, kwargs: dict) -> L.InstanceNormArguments:
        weight = None if module.weight is None else module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        return L.InstanceNormArguments(args[0], weight, bias, module.eps)

    return arguments


def _group_norm_function_arguments(args: tuple, kwargs: dict) -> L.GroupNormArguments:
    """``F.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5)``'s arguments as the
    traced call gave them."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    bound = {**dict(zip(names, args)), **kwargs}
    return L.GroupNormArguments(
        bound["input"],
        bound["num_groups"],
        bound.get("weight"),
        bound.get("bias"),
        bound.get("eps", 1e-5),
    )


_identity = L.identity


def _batch_norm_eval(bn: nn.Module):
    def run(x):
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )

    return run


def _max_pool_window(dims: int, kernel_size, stride, padding, dilation) -> tuple[list[int], ...]:
    """A max pool's ``(kernel_size, stride, padding, dilation)``, one entry per pooled side (an
    int repeated; ``stride`` None or empty is the kernel's, as torch reads it): where its winners
    can lie (``ops.pool.max_pool_offset_bounds``)."""

    def sides(value) -> list[int]:
        values = [int(value)] if isinstance(value, int) else [int(v) for v in value]
        return values * dims if len(values) == 1 else values

    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = kernel_size
    return tuple(sides(v) for v in (kernel_size, stride, padding, dilation))


def _pool_impl() -> str:
    backend = forced_backend()
    if backend == "reference" or not native_available():
        return "relprop::pool [reference]"
    return "relprop::pool [native]"
