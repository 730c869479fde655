"""The Program: runs a Plan forward (saving what each rule needs) and relevance backward.

No hooks and no autograd graph: each step's forward saves only what its rule needs, the
relevance pass walks the steps in reverse and frees each step's saved tensors as soon as it is
done with them. Steps that only hand on their input (a BatchNorm folded into the layer before
it, a ReLU fused into it, an identity) are in the plan but not run: their users read the input
itself, and relevance goes to it directly. Relevance reaching one node along several paths (residual branches) adds up.
Between layers relevance may travel unformed, as ``coefficient · factor``
(:class:`~relprop.graph.layers.InputProduct`): the layer below forms it inside its division; a
layer that cannot gets it formed first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from relprop.errors import AnalyzerInputError
from relprop.graph.canonize import fold_all
from relprop.graph.layers import InputProduct, PassLayer, Shares, Unspread, formed, join
from relprop.graph.plan import Plan, attribute
from relprop.ops._backend import one_pass
from relprop.ops._layer_rules import transient_budget


class Program:
    """An executable :class:`Plan` bound to the traced module (for constants)."""

    def __init__(self, plan: Plan, gm: fx.GraphModule) -> None:
        self.plan = plan
        self.gm = gm
        # Steps that hand on their input (folded BatchNorms, fused ReLUs, identities: 102 of
        # ResNet50's 177) are not run: their users read the input itself, and relevance goes to
        # it directly. Each skipped step spared about 5 µs of host time per pass and direction.
        self._source: dict[str, str] = {}
        for step in plan.steps:
            if _hands_on_its_input(step):
                self._source[step.name] = self._resolve(step.leaves[0])
        self._steps = [step for step in plan.steps if step.name not in self._source]
        self._leaves = [[self._resolve(name) for name in step.leaves] for step in self._steps]
        self._output_name = self._resolve(plan.output_name)
        self._last_use = self._last_uses()
        self._layers = {step.name: step.layer for step in self._steps if step.layer is not None}
        self._arguments = [
            _argument_reader(step.args, step.kwargs, self._resolve) for step in self._steps
        ]

    def _resolve(self, name: str | None) -> str | None:
        """The step whose value ``name`` is (``name`` itself unless that step is skipped)."""
        return None if name is None else self._source.get(name, name)

    def _last_uses(self) -> dict[int, list[str]]:
        last: dict[str, int] = {}
        for i, leaves in enumerate(self._leaves):
            for name in leaves:
                if name is not None:
                    last[name] = i
        by_step: dict[int, list[str]] = {}
        for name, i in last.items():
            by_step.setdefault(i, []).append(name)
        return by_step

    def run(self, x: Tensor, start: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Forward, then relevance from ``start(output)``.

        Returns
        -------
        (output, relevance)
            The model output and the relevance of ``x``.
        """
        with torch.no_grad(), one_pass(x):
            output, saved, live = self._forward(x)
            initial = start(output)
            scale = _float16_range_scale(initial)
            if scale is not None:
                initial = (initial.float() * scale).to(initial.dtype)
            relevance = self._relevance(initial, saved, live)
            if scale is not None and relevance is not None:
                per_sample = scale.reshape((-1,) + (1,) * (relevance.dim() - 1))
                relevance = (relevance.float() / per_sample).to(relevance.dtype)
        # An input no relevance reached (a constant output, say) gets zero relevance.
        return output, torch.zeros_like(x) if relevance is None else relevance

    def forward(self, x: Tensor) -> Tensor:
        """Only the forward pass (the model's output, through relprop's steps)."""
        with torch.no_grad(), one_pass(x):
            return self._forward(x)[0]

    def _forward(self, x: Tensor):
        env: dict[str, object] = {}
        saved: dict[str, object] = {}
        live: set[str] = set()
        output = None
        # Weights are read afresh in every pass (graph/canonize.py says why).
        fold_all([s.layer.params for s in self._steps if hasattr(s.layer, "params")])
        # The steps may keep marks (ops._layer_rules.stamp_mark) on their inputs: on an alias of
        # the user's x, never on x itself, and none outlives the pass.
        x_alias = x.detach()
        for i, step in enumerate(self._steps):
            if step.op == "placeholder":
                env[step.name] = x_alias
                live.add(step.name)
            elif step.op == "get_attr":
                env[step.name] = _fetch_attr(self.gm, step.target)
            elif step.op == "output":
                output = env[self._output_name]
            else:
                args, kwargs = self._arguments[i](env)
                try:
                    value, ctx = step.layer.forward(args, kwargs)
                except RuntimeError as err:
                    # Most often the input does not fit the model (a shape, a channel count);
                    # the message says which step failed and why, without presuming that.
                    raise AnalyzerInputError(
                        f"step {step.path!r} ({step.kind}) failed on an input of shape "
                        f"{tuple(x.shape)}: {str(err).splitlines()[0]}"
                    ) from err
                env[step.name] = value
                if isinstance(value, Tensor) and any(n in live for n in self._leaves[i] if n):
                    live.add(step.name)
                    saved[step.name] = ctx
            for name in self._last_use.get(i, ()):
                if name != self._output_name:
                    env.pop(name, None)
        return output, saved, live

    def _may_run_in_chunks(self, saved: dict) -> bool:
        layers = self._layers
        return any(layers[name].may_run_in_chunks(ctx) for name, ctx in saved.items())

    def _constants(self) -> list[Tensor]:
        """The tensors that outlive an analysis: the layers' weights and the module's
        attributes (a step's saved context may hold them; freeing it does not free them)."""
        tensors = []
        for step in self._steps:
            if step.op == "get_attr":
                tensors.append(_fetch_attr(self.gm, step.target))
            elif step.layer is not None:
                tensors.extend(step.layer.constants())
        return tensors

    def _relevance(self, start: Tensor, saved: dict, live: set[str]) -> Tensor | None:
        pending: dict[str, Tensor] = {self._output_name: start}
        # What the analysis holds as the pass begins (the forward's saved tensors and the start)
        # is the most it will hold: a step may allocate what the pass has freed since. Storages
        # are opaque to torch.compile's tracing, which gets the chunking of an op called alone.
        # Worked out only where a step may ask (α-β, or z⁺/γ on mixed-sign input): the walk
        # over the saved storages costs host time (0.5 ms on ResNet50) that ε, z⁺ and γ on
        # ReLU nets would spend for nothing.
        held = None
        if not torch.compiler.is_compiling() and self._may_run_in_chunks(saved):
            held = _HeldBytes(saved, self._constants())
        ceiling = None if held is None else held.total + held.outside(pending.values())
        for step, leaves in zip(reversed(self._steps), reversed(self._leaves)):
            if step.layer is None or step.name not in pending:
                continue
            incoming = pending.pop(step.name)
            if not step.layer.takes_input_product:
                incoming = formed(incoming)
            if held is None:
                outgoing = step.layer.relevance(saved.pop(step.name), incoming)
            else:
                # Asked for only by a step that could run in chunks, while it runs (before
                # `incoming` and `pending` change).
                def budget(incoming=incoming):
                    return ceiling - held.total - held.outside([incoming, *pending.values()])

                with transient_budget(budget):
                    outgoing = step.layer.relevance(saved.pop(step.name), incoming)
                held.release(step.name)
            for name, r in zip(leaves, outgoing):
                if name is None or r is None or name not in live:
                    continue
                pending[name] = join(pending[name], r) if name in pending else r
        result = pending.get(self.plan.input_name)
        return None if result is None else formed(result)


class _HeldBytes:
    """The bytes of the storages the forward pass saved for the relevance pass, as its steps
    release them (a storage several steps saved is freed with the last of them; ``constants``,
    which outlive the pass, are not counted)."""

    # Where torch.compile runs the pass eagerly, it need not try to trace storages.
    @torch.compiler.disable
    def __init__(self, saved: dict, constants: list[Tensor]) -> None:
        self._sizes: dict[int, int] = {}
        self._holders: dict[int, int] = {}
        self._keys: dict[str, set[int]] = {}
        persistent = _storages(constants, {})
        for name, ctx in saved.items():
            keys = _storages(_tensors_in(ctx), self._sizes) - persistent
            self._keys[name] = keys
            for key in keys:
                self._holders[key] = self._holders.get(key, 0) + 1
        for key in persistent:
            self._sizes.pop(key, None)
        self.total = sum(self._sizes.values())

    def release(self, name: str) -> None:
        for key in self._keys.pop(name, ()):
            self._holders[key] -= 1
            if not self._holders[key]:
                del self._holders[key]
                self.total -= self._sizes.pop(key)

    @torch.compiler.disable
    def outside(self, relevances) -> int:
        """Bytes of the relevances' storages not among the saved ones."""
        tensors = []
        for r in relevances:
            if isinstance(r, Unspread):  # a max pool's, at its output size
                r = r.relevance
            if isinstance(r, InputProduct):
                tensors.extend(t for t in (r.coefficient, r.addend, r.factor) if t is not None)
            elif isinstance(r, Shares):
                tensors.append(r.shares)
            else:
                tensors.append(r)
        sizes: dict[int, int] = {}
        _storages(tensors, sizes)
        return sum(size for key, size in sizes.items() if key not in self._sizes)


def _argument_reader(
    args: tuple, kwargs: dict, resolve: Callable[[str], str] = lambda name: name
) -> Callable[[dict], tuple[tuple, dict]]:
    """A function of the values so far (by node name, each read under ``resolve(name)``) that
    gives a step's ``(args, kwargs)``.

    A step's arguments are mostly a flat tuple of nodes and constants and no keywords; for those
    the nodes' positions are found once here. (``fx.node.map_arg`` walks the structure anew at
    every call: 0.4 ms per ResNet50 pass.) Nested or keyword arguments go through ``map_arg``.
    """
    if kwargs or any(isinstance(a, (tuple, list, dict, slice)) for a in args):

        def read(env: dict) -> tuple[tuple, dict]:
            def value(n: fx.Node):
                return env[resolve(n.name)]

            return fx.node.map_arg(args, value), fx.node.map_arg(kwargs, value)

        return read
    template = list(args)
    nodes = [(i, resolve(a.name)) for i, a in enumerate(args) if isinstance(a, fx.Node)]

    def read_flat(env: dict) -> tuple[tuple, dict]:
        values = template.copy()
        for i, name in nodes:
            values[i] = env[name]
        return tuple(values), {}

    return read_flat


def _hands_on_its_input(step) -> bool:
    """Whether ``step``'s value is its first argument, a node, which receives its relevance."""
    layer = step.layer
    return (
        isinstance(layer, PassLayer)
        and layer.hands_on_its_input
        and bool(step.args)
        and isinstance(step.args[0], fx.Node)
        and bool(step.leaves)
        and step.leaves[0] == step.args[0].name
    )


def _tensors_in(obj) -> list[Tensor]:
    """The tensors in a saved context: nested tuples, lists and dicts of tensors and plain
    values. (``torch.utils._pytree.tree_flatten`` does the same at ten times the cost, about
    1 ms per ResNet50 analysis.)"""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


def _storages(objects, sizes: dict[int, int]) -> set[int]:
    """The storage keys of the tensors among ``objects``, recording each one's bytes."""
    keys = set()
    for t in objects:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            keys.add(key)
            sizes[key] = storage.nbytes()
    return keys


def _fetch_attr(gm: fx.GraphModule, target: str):
    value = attribute(gm, target)
    return value.detach() if isinstance(value, Tensor) else value


# float16 relevance is scaled so that each sample's largest starting value is 2**8: every rule is
# linear in the relevance it redistributes, so a power of two passes through exactly, and 2**8
# leaves 2**8 of headroom below float16's largest value (65504) for the growth α-β allows. The
# factor is at most 2**10: the first division R / z of the output layer returns the factor itself
# (R is z there), and 2**10 keeps that and its products with the weights finite.
_FLOAT16_START_EXPONENT = 8.0
_FLOAT16_MAX_EXPONENT = 10.0


def _float16_range_scale(initial: Tensor) -> Tensor | None:
    """Per-sample power of two for float16 relevance, or None for other dtypes.

    Relevance is roughly conserved, so per input element it is about the explained logit over the
    number of elements: 0.2 / 150528 for an untrained VGG16 on 224×224 images, 1e-6, where
    float16 has only subnormal numbers and each layer's rounding loses digits (cosine 0.81 to the
    float32 result). Scaled, every layer computes in the normal range and only the final division
    rounds. bfloat16 has float32's exponent range and needs none of this.
    """
    if initial.dtype != torch.float16 or initial.dim() == 0:
        return None
    magnitude = initial.detach().float().abs()
    per_sample = tuple(range(1, initial.dim()))
    peak = magnitude.amax(dim=per_sample) if per_sample else magnitude
    exponent = torch.where(
        peak > 0, _FLOAT16_START_EXPONENT - torch.ceil(torch.log2(peak)), torch.zeros_like(peak)
    ).clamp(max=_FLOAT16_MAX_EXPONENT)
    return torch.exp2(exponent).reshape((-1,) + (1,) * (initial.dim() - 1))
