"""Tracing a PyTorch model into a torch.fx graph, once per analyzer."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from relprop.errors import SoftmaxOutputError, TraceError

SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)
SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}

# Modules outside torch.nn that must stay whole: in eval mode they are identities.
_LEAF_CLASS_NAMES = {"StochasticDepth"}


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.extra_leaf_types = extra_leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ in _LEAF_CLASS_NAMES or isinstance(m, self.extra_leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, extra_leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares the model's submodules (no copy).

    Parameters
    ----------
    model : nn.Module
        The user's model. It is not modified.
    extra_leaf_types : tuple of type
        Module types to keep whole (those a composite maps to a rule by type).
    """
    tracer = _Tracer(extra_leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds of errors on untraceable Python
        raise TraceError(
            f"relprop could not trace {type(model).__name__} with torch.fx: {err}. relprop builds "
            "its plan from a traced graph; data-dependent Python control flow (if/for on tensor "
            "values) cannot be traced. Move it out of forward(), or explain with a gradient "
            "analyzer ('gradient', 'integrated_gradients', ...) which runs the model as it is."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def output_node(graph: fx.Graph) -> fx.Node:
    """The node the model returns (a single tensor)."""
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise TraceError(
            f"the model returns {type(value).__name__}, not a single tensor; wrap it so that "
            "forward() returns the logits tensor to explain"
        )
    return value


def is_softmax(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` computes a softmax or log-softmax."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), SOFTMAX_MODULES)
    if node.op == "call_function":
        return node.target in SOFTMAX_FUNCTIONS
    if node.op == "call_method":
        return node.target in SOFTMAX_METHODS
    return False


def check_no_softmax_output(gm: fx.GraphModule) -> None:
    """Raise :class:`SoftmaxOutputError` when the model ends in a softmax."""
    last = output_node(gm.graph)
    if is_softmax(last, gm):
        raise SoftmaxOutputError(
            f"the model ends in a softmax ({_describe(last, gm)}); relevance of a probability is "
            "not what LRP explains. Analyze the logits: "
            "relprop.create_analyzer(name, relprop.model_wo_softmax(model))"
        )


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} of type {type(gm.get_submodule(node.target)).__name__}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def model_wo_softmax(model: nn.Module) -> nn.Module:
    """The model without its final softmax (or log-softmax), sharing all weights.

    A ``Sequential`` whose last module is a softmax loses that module; any other model is traced
    and the softmax is cut from the graph. The given model is not modified.

    Parameters
    ----------
    model : nn.Module
        A model whose output is a softmax over logits.

    Returns
    -------
    nn.Module
        A model returning the logits. A model without a final softmax is returned as it is.
    """
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], SOFTMAX_MODULES):
        return nn.Sequential(*list(model)[:-1])
    gm = trace(model)
    last = output_node(gm.graph)
    if not is_softmax(last, gm):
        return model
    logits = last.args[0]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (logits,)
    gm.graph.erase_node(last)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return gm


# fx targets that are plain Python operators, for readable plan entries.
OPERATOR_NAMES = {
    operator.add: "add",
    operator.iadd: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.getitem: "getitem",
    operator.truediv: "truediv",
    operator.sub: "sub",
}
