"""Tracing a PyTorch model into a torch.fx graph, once per analyzer."""

from __future__ import annotations

import operator
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from relprop.errors import (
    SoftmaxOutputError,
    TraceError,
    UnsupportedLayerError,
    caller_stacklevel,
)

SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)
SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}

# Modules outside torch.nn that must stay whole: in eval mode they are identities.
_LEAF_CLASS_NAMES = {"StochasticDepth"}


class _Tracer(fx.Tracer):
    def __init__(
        self, extra_leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.extra_leaf_types = extra_leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ in _LEAF_CLASS_NAMES or isinstance(m, self.extra_leaf_types):
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a wrapper runs, which is what relprop traces: ``nn.DataParallel``'s,
    ``DistributedDataParallel``'s and ``swa_utils.AveragedModel``'s ``.module``, a
    ``torch.compile``d module's ``_orig_mod`` (none of them can be traced themselves)."""
    wrappers = (
        nn.DataParallel,
        nn.parallel.DistributedDataParallel,
        torch.optim.swa_utils.AveragedModel,
    )
    while True:
        inner = getattr(model, "module" if isinstance(model, wrappers) else "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def named_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: every module once with its path, ``model`` first (path
    ``""``), depth first in the same order, a recursive function rather than nested generators:
    85 µs against 115 on a ResNet50's 151 modules (one CPU thread). Within :class:`OneWalk`
    of ``model`` (an analysis: its train/eval flags, hooks and the trace's modules each asked for
    one) the walk made on entry; the list is not to be changed."""
    shared = getattr(_shared_walks, "by_model", None)
    if shared:
        entry = shared.get(id(model))
        if entry is not None and entry[0] is model:
            return entry[1]
    found: list[tuple[str, nn.Module]] = []
    seen: set[nn.Module] = set()  # as named_modules' memo: by the modules' own hash

    def visit(prefix: str, module: nn.Module) -> None:
        found.append((prefix, module))
        seen.add(module)
        for name, child in module._modules.items():
            if child is not None and child not in seen:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


_shared_walks = threading.local()


class OneWalk:
    """Within, :func:`named_submodules` of ``model`` in this thread returns the walk made on
    entry: an analysis asked for three walks of the same modules (train/eval flags, hooks, the
    trace's modules), 0.6 ms of host time on a ResNet50 before its first kernel (one CPU
    thread). Held while the model's lock is (``analyzers.base.preserved_state``), so no other
    relprop call changes the modules meanwhile; nested ones keep the outer walk. A slotted
    class: ``contextlib``'s generators cost host time per call."""

    __slots__ = ("_model", "_previous", "walk")

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._previous = None
        self.walk: list[tuple[str, nn.Module]] = []

    def __enter__(self) -> list[tuple[str, nn.Module]]:
        shared = getattr(_shared_walks, "by_model", None)
        if shared is None:
            shared = _shared_walks.by_model = {}
        self.walk = named_submodules(self._model)  # the outer walk, if one is shared
        self._previous = shared.get(id(self._model))
        shared[id(self._model)] = (self._model, self.walk)
        return self.walk

    def __exit__(self, *exc) -> None:
        shared = _shared_walks.by_model
        if self._previous is None:
            del shared[id(self._model)]
        else:
            shared[id(self._model)] = self._previous


def submodules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``, by :func:`named_submodules`."""
    return [module for _, module in named_submodules(model)]


def module_snapshot(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The submodules a trace of ``model`` binds, by path: a graph traced from them is stale once
    one is replaced (``model.fc = nn.Linear(...)``), which no weight read can notice."""
    return tuple(named_submodules(unwrapped(model)))


def same_modules(
    a: tuple[tuple[str, nn.Module], ...] | None, b: tuple[tuple[str, nn.Module], ...]
) -> bool:
    """Whether two :func:`module_snapshot` s hold the same module objects at the same paths."""
    return (
        a is not None
        and len(a) == len(b)
        and all(pa == pb and ma is mb for (pa, ma), (pb, mb) in zip(a, b))
    )


def trace(
    model: nn.Module,
    extra_leaf_types: tuple[type, ...] = (),
    leaf_names: frozenset[str] = frozenset(),
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares the model's submodules (no copy).

    Parameters
    ----------
    model : nn.Module
        The user's model. It is not modified.
    extra_leaf_types : tuple of type
        Module types to keep whole (those a composite maps to a rule by type).
    leaf_names : frozenset of str
        Module paths to keep whole (those a composite's ``name_map`` maps to ``Pass``).
    """
    model = unwrapped(model)
    tracer = _Tracer(extra_leaf_types, leaf_names)
    _refuse_torchscript(model, tracer)
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


def _refuse_torchscript(model: nn.Module, tracer: _Tracer) -> None:
    """A TorchScript module (``torch.jit.script``/``torch.jit.trace``) keeps compiled code, no
    Python ``forward`` for torch.fx to follow: say which module it is and what to pass instead
    (fx's own error, "traced_func_name=forward doesn't exist", names neither). One the tracer
    keeps whole (a leaf: mapped by name or type in the composite) is not traced into and may
    stay."""
    kept: list[str] = []
    for path, module in named_submodules(model):
        if any(path.startswith(k + ".") for k in kept):
            continue
        if path and tracer.is_leaf_module(module, path):
            kept.append(path)
            continue
        if isinstance(module, torch.jit.ScriptModule):
            where = "the model" if not path else f"module {path!r}"
            keep = (
                ""
                if not path
                else f", or keep it whole with name_map={{{path!r}: relprop.rules.Pass()}} "
                "(relevance passes through it unchanged; its output must have its input's shape)"
            )
            raise TraceError(
                f"{where} is a TorchScript module ({type(module).__name__}); relprop traces "
                "Python forward() code with torch.fx and cannot see into TorchScript. Pass the "
                f"nn.Module it was scripted or traced from{keep}, or explain with a gradient "
                "analyzer ('gradient', 'integrated_gradients', ...), which runs the model as it is."
            )


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


def _reparametrization(hook: object) -> str | None:
    """The name of the weight reparametrization ``hook`` computes, or None for any other hook:
    the legacy ones recompute ``module.weight`` in a forward pre-hook."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(hook, SpectralNorm):
        return "torch.nn.utils.spectral_norm"
    if isinstance(hook, WeightNorm):
        return "torch.nn.utils.weight_norm"
    if isinstance(hook, prune.BasePruningMethod):
        return "torch.nn.utils.prune"
    return None


def check_module_hooks(model: nn.Module) -> None:
    """Refuse weights that only a forward hook brings up to date; warn about other hooks.

    LRP runs relprop's own steps, not the modules' ``__call__``, so no module hook runs. A
    reparametrization by pre-hook (legacy spectral or weight norm, pruning) leaves
    ``module.weight`` as the last forward computed it, which would be explained instead of the
    weight the model uses now. Other forward hooks may change what a module returns; relprop
    explains the model without them.
    """
    if not any(m._forward_pre_hooks or m._forward_hooks for m in submodules(model)):
        return  # the usual case, found without building the modules' paths
    others = []
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            kind = _reparametrization(hook)
            if kind is not None:
                raise UnsupportedLayerError(
                    f"module {path or type(model).__name__!r} of type {type(module).__name__} is "
                    f"reparametrized by {kind}, which recomputes its weight in a forward hook; "
                    "relprop runs no module hooks and would read a stale weight. Use the "
                    "parametrization API instead (torch.nn.utils.parametrizations.spectral_norm "
                    "or .weight_norm; relprop reads those weights as they are now), or remove the "
                    "hook first (torch.nn.utils.remove_spectral_norm, remove_weight_norm, "
                    "prune.remove)"
                )
        if module._forward_pre_hooks or module._forward_hooks:
            others.append(path or type(model).__name__)
    if others:
        warnings.warn(
            f"relprop: modules {', '.join(repr(p) for p in others[:5])}"
            f"{' and more' if len(others) > 5 else ''} have forward hooks; LRP runs relprop's "
            "own steps, not the modules, so these hooks do not run and what they change in a "
            "module's output is not explained",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
