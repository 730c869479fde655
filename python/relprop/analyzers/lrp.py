"""LRP and Deep Taylor analyzers: the plan of the model run by relprop's relevance engine."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from relprop.analyzers.base import Analyzer, NeuronSelection, model_lock, preserved_state
from relprop.composites import Composite
from relprop.graph.plan import Plan, PlanBuilder
from relprop.graph.program import Program
from relprop.graph.trace import (
    check_module_hooks,
    module_snapshot,
    same_modules,
    trace,
    unwrapped,
)
from relprop.ops._backend import autocast_dtype


class LRP(Analyzer):
    """Layer-wise Relevance Propagation with a composite of rules.

    The model is traced once (torch.fx) into a :attr:`plan`; every call of :meth:`analyze` runs
    it forward, saving what each rule needs, and hands relevance back layer by layer — no hooks,
    no autograd graph. Relevance starts from the selected output's value, so the input relevance
    sums to about that value (Bach et al., 2015, PLoS ONE 10(7); Montavon et al., 2019,
    *Layer-Wise Relevance Propagation: An Overview*).

    Parameters
    ----------
    model : nn.Module
        The model to explain (logits out).
    composite : Composite
        Which rule goes to which layer.
    neuron_selection_mode : {"max_activation", "index", "all"}
        See :class:`~relprop.analyzers.base.Analyzer`.
    """

    #: Deep Taylor starts from max(0, y): only evidence for the class is decomposed.
    start_from_positive_output = False

    def __init__(
        self, model: nn.Module, composite: Composite, neuron_selection_mode: str = "max_activation"
    ) -> None:
        super().__init__(model, neuron_selection_mode)
        if not isinstance(composite, Composite):
            raise TypeError(
                f"composite must be a relprop.composites.Composite, got {type(composite).__name__}"
            )
        self.composite = composite
        self._program: Program | None = None
        self._traced_modules: tuple | None = None

    @property
    def plan(self) -> Plan:
        """The model as steps with their rule and op (built on first use, then cached)."""
        return self._get_program().plan

    def _get_program(self) -> Program:
        # Under the model's lock: another thread's analysis must not see the program replaced
        # half-way (analyze holds the lock already; it is re-entrant).
        with model_lock(self.model):
            return self._current_program()

    def _current_program(self) -> Program:
        # Hooks may come and go between calls: checked every time (a walk over the modules).
        check_module_hooks(self.model)
        # A submodule replaced since the trace (a new head, a swapped block) makes the plan stale:
        # it would still run the old module's weights. Traced again then.
        modules = module_snapshot(self.model)
        if not same_modules(self._traced_modules, modules):
            self._program = None
        if self._program is None:
            # Traced as analyze runs the model, in eval mode: a `self.training` branch (an
            # auxiliary head, dropout) must not enter the plan when `plan` is read first.
            with preserved_state(self.model):
                gm = trace(self.model, self.composite.leaf_types(), self.composite.leaf_names())
                builder = PlanBuilder(gm, self.composite, unwrapped(self.model))
                self._program = Program(builder.build(), gm)
            self._traced_modules = modules
        return self._program

    def _analyze(self, x: Tensor, neuron_selection: NeuronSelection) -> Tensor:
        program = self._get_program()
        _warn_if_autocast(x)

        def start(output: Tensor) -> Tensor:
            mask = self._selection_mask(output, neuron_selection, x.shape[0])
            value = output.clamp(min=0) if self.start_from_positive_output else output
            return value * mask

        _, relevance = program.run(x, start)
        return relevance.to(dtype=x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The model's output computed by relprop's steps (folded BatchNorms included)."""
        with torch.no_grad(), preserved_state(self.model):
            return self._get_program().forward(x)


def _warn_if_autocast(x: Tensor) -> None:
    """Say once per call site that an analysis under ``torch.autocast`` computes in ``x``'s dtype
    (``ops._backend.one_pass`` turns autocast off for the pass), and how to get the other."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None or dtype == x.dtype:
        return
    warnings.warn(
        f"relprop: torch.autocast ({dtype}) is on; an LRP analysis does not follow it and "
        f"computes in {x.dtype}, the dtype of the model and the input (its kernels, not "
        f"autocast, set each op's precision). For a {dtype} analysis convert both: "
        f"model.to({dtype}), x.to({dtype})",
        UserWarning,
        stacklevel=4,
    )


class DeepTaylor(LRP):
    """Deep Taylor decomposition: z⁺ on every layer with weights, z^B on the input layer when
    bounds are given; relevance starts from max(0, y). Montavon et al., 2017, *Explaining
    nonlinear classification decisions with deep Taylor decomposition*, Pattern Recognition 65.
    """

    start_from_positive_output = True
