"""The gradient family, run by autograd on the model itself (any differentiable layer works)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from relprop.analyzers.base import Analyzer, NeuronSelection
from relprop.errors import (
    AnalyzerInputError,
    TraceError,
    UnsupportedLayerError,
    caller_stacklevel,
)
from relprop.graph.trace import check_no_softmax_output, module_snapshot, same_modules, trace

POSTPROCESS = (None, "abs", "square")
INTEGRATION_RULES = (
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "gausslegendre",
)


def whole_number(name: str, value: object, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``; ``ValueError`` naming ``name`` for a
    fraction (2.5 steps would silently become 2), a bool or anything below."""
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not is_number or value != int(value) or int(value) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _postprocessed(grad: Tensor, postprocess: str | None) -> Tensor:
    if postprocess == "abs":
        return grad.abs()
    if postprocess == "square":
        return grad * grad
    return grad


class Gradient(Analyzer):
    """∂y_c/∂x: the saliency map of Simonyan et al., 2014, *Deep Inside Convolutional Networks*.

    Parameters
    ----------
    postprocess : {None, "abs", "square"}
        Applied to the gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        postprocess: str | None = None,
        neuron_selection_mode: str = "max_activation",
    ) -> None:
        super().__init__(model, neuron_selection_mode)
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess={postprocess!r} is not one of {POSTPROCESS}")
        self.postprocess = postprocess

    def _forward_fn(self) -> Callable[[Tensor], Tensor]:
        return self.model

    def _check_model(self) -> None:
        """Refuse a model that ends in a softmax, as the LRP analyzers do (checked once)."""
        if getattr(self, "_checked", False):
            return
        try:
            gm = trace(self.model)
        except TraceError:
            # Gradients run any model; one torch.fx cannot trace just goes unchecked.
            gm = None
        if gm is not None:
            check_no_softmax_output(gm)
        self._checked = True

    def _gradient(
        self, x: Tensor, neuron_selection: NeuronSelection, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gradient of the selected outputs at ``x``; returns (gradient, selection mask)."""
        self._check_model()
        if torch.is_inference_mode_enabled():
            raise AnalyzerInputError(
                f"{type(self).__name__} differentiates the model, which autograd cannot do under "
                "torch.inference_mode(); call analyze outside it (torch.no_grad() is fine)"
            )
        forward = self._forward_fn()
        # The model sees a copy of the leaf it is differentiated at: a model whose first op works
        # in place on its input (nn.ReLU(inplace=True)) must not write into the leaf, and an
        # inference tensor x cannot be made to require grad itself.
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            output = self._run_model(forward, leaf.clone())
            if mask is None:
                mask = self._selection_mask(output.detach(), neuron_selection, x.shape[0])
            (grad,) = torch.autograd.grad(output, leaf, grad_outputs=mask)
        return grad, mask

    def _analyze(self, x, neuron_selection):
        grad, _ = self._gradient(x, neuron_selection)
        return _postprocessed(grad, self.postprocess)


class InputTimesGradient(Gradient):
    """x ⊙ ∂y_c/∂x (Shrikumar et al., 2016, *Not Just a Black Box*).

    Parameters
    ----------
    postprocess : {None, "abs", "square"}
        Applied to the gradient before the product with x (iNNvestigate's keyword).
    """

    def _analyze(self, x, neuron_selection):
        grad, _ = self._gradient(x, neuron_selection)
        return x * _postprocessed(grad, self.postprocess)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


class SmoothGrad(Gradient):
    """Mean gradient over noisy copies of the input (Smilkov et al., 2017, *SmoothGrad*).

    The selected neuron is fixed on the clean input, then ``augment_by_n`` gradients are taken
    at ``x + noise_scale · ε_k``. The noise contract (tests rebuild it to feed Captum the same
    noise): with ``seed`` given, one ``torch.Generator`` on ``x``'s device seeded with it, and
    ``ε_k = torch.randn(x.shape, generator=g, dtype=x.dtype)`` drawn for k = 1..n in order.

    Parameters
    ----------
    augment_by_n : int
        Number of noisy copies.
    noise_scale : float
        Standard deviation of the Gaussian noise, in input units.
    seed : int, optional
        Seeds the noise for reproducible maps.
    postprocess : {None, "abs", "square"}
        Applied to each gradient before averaging.
    """

    def __init__(
        self,
        model: nn.Module,
        augment_by_n: int = 64,
        noise_scale: float = 1.0,
        seed: int | None = None,
        postprocess: str | None = None,
        neuron_selection_mode: str = "max_activation",
    ) -> None:
        super().__init__(model, postprocess, neuron_selection_mode)
        augment_by_n = whole_number("augment_by_n", augment_by_n, 1)
        if not noise_scale >= 0 or math.isinf(noise_scale):  # NaN fails the comparison
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale}")
        self.augment_by_n = augment_by_n
        self.noise_scale = float(noise_scale)
        self.seed = seed

    def _analyze(self, x, neuron_selection):
        _, mask = self._gradient(x, neuron_selection)
        generator = _generator(self.seed, x.device)
        total = torch.zeros_like(x)
        for _ in range(self.augment_by_n):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            grad, _ = self._gradient(x + self.noise_scale * noise, None, mask)
            total += _postprocessed(grad, self.postprocess)
        return total / self.augment_by_n


def integration_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Points α_k in [0, 1] and weights w_k of the path integral ∫₀¹ g(α) dα ≈ Σ w_k g(α_k).

    Riemann sums (left, right, middle, trapezoid) as in Captum; ``gausslegendre`` is
    Gauss–Legendre quadrature mapped to [0, 1].
    """
    if rule not in INTEGRATION_RULES:
        raise ValueError(f"integration={rule!r} is not one of {', '.join(INTEGRATION_RULES)}")
    n = whole_number("steps", steps, 1)
    if n < 2 and rule == "riemann_trapezoid":
        raise ValueError("riemann_trapezoid needs at least 2 steps")
    if rule == "riemann_left":
        return np.linspace(0, 1 - 1 / n, n), np.full(n, 1 / n)
    if rule == "riemann_right":
        return np.linspace(1 / n, 1, n), np.full(n, 1 / n)
    if rule == "riemann_middle":
        return np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n), np.full(n, 1 / n)
    if rule == "riemann_trapezoid":
        weights = np.full(n, 1 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, n), weights
    points, weights = np.polynomial.legendre.leggauss(n)
    return (points + 1) / 2, weights / 2


class IntegratedGradients(Gradient):
    """(x − x̄) ⊙ ∫₀¹ ∂y_c/∂x(x̄ + α(x − x̄)) dα (Sundararajan et al., 2017, *Axiomatic
    Attribution for Deep Networks*).

    Parameters
    ----------
    steps : int
        Number of points on the path.
    reference_inputs : float or Tensor
        The baseline x̄ (broadcast to x); zero by default.
    integration : str
        The quadrature: ``riemann_trapezoid`` (default; exact for a path linear in α),
        ``riemann_left``, ``riemann_right``, ``riemann_middle`` or ``gausslegendre``.
    postprocess : {None, "abs", "square"}
        Applied to each gradient on the path before it is integrated (iNNvestigate's keyword).
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 64,
        reference_inputs: float | Tensor = 0.0,
        integration: str = "riemann_trapezoid",
        postprocess: str | None = None,
        neuron_selection_mode: str = "max_activation",
    ) -> None:
        super().__init__(model, postprocess, neuron_selection_mode)
        if not bool(torch.isfinite(torch.as_tensor(reference_inputs)).all()):
            # A NaN baseline made every relevance NaN without a word (a NaN x is refused).
            raise ValueError(
                "reference_inputs must be finite (a baseline input such as 0 or a blurred "
                "image); it holds NaN or inf"
            )
        self.points, self.weights = integration_points(steps, integration)
        self.steps = int(steps)
        self.integration = integration
        self.reference_inputs = reference_inputs

    def _analyze(self, x, neuron_selection):
        baseline = torch.as_tensor(self.reference_inputs, dtype=x.dtype, device=x.device)
        baseline = baseline.expand_as(x)
        _, mask = self._gradient(x, neuron_selection)
        delta = x - baseline
        total = torch.zeros_like(x)
        for alpha, weight in zip(self.points, self.weights):
            grad, _ = self._gradient(baseline + float(alpha) * delta, None, mask)
            total += float(weight) * _postprocessed(grad, self.postprocess)
        return delta * total


# Non-linearities whose backward deconvnet and guided backprop leave as the plain gradient.
_OTHER_ACTIVATION_MODULES = (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Tanh, nn.Sigmoid,
)  # fmt: skip
_OTHER_ACTIVATION_FUNCTIONS = frozenset({
    F.leaky_relu, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, torch.tanh, torch.sigmoid, F.prelu, torch.clamp,
    torch.clamp_min,
})  # fmt: skip
_OTHER_ACTIVATION_METHODS = frozenset({"tanh", "sigmoid", "clamp", "clamp_min", "clamp_"})


def _activations(gm: fx.GraphModule) -> tuple[int, list[str]]:
    """(number of ReLUs, descriptions of the other non-linearities) of a traced model."""
    relus, others = 0, []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.ReLU):
                relus += 1
            elif isinstance(module, _OTHER_ACTIVATION_MODULES):
                others.append(f"{node.target} ({type(module).__name__})")
        elif node.op == "call_function":
            if node.target in _ReLUReplaced.RELU_FUNCTIONS:
                relus += 1
            elif node.target in _OTHER_ACTIVATION_FUNCTIONS:
                others.append(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_method":
            if node.target in ("relu", "relu_"):
                relus += 1
            elif node.target in _OTHER_ACTIVATION_METHODS:
                others.append(f".{node.target}()")
    return relus, others


class _ReLUReplaced(fx.Interpreter):
    """Runs the traced model with every ReLU's backward replaced (deconvnet, guided backprop)."""

    RELU_FUNCTIONS = frozenset({F.relu, torch.relu, F.relu_, torch.relu_})

    def __init__(self, gm: fx.GraphModule, relu: Callable[[Tensor], Tensor]) -> None:
        super().__init__(gm)
        self.relu = relu

    def call_module(self, target, args, kwargs):
        if isinstance(self.fetch_attr(target), nn.ReLU):
            return self.relu(args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target in self.RELU_FUNCTIONS:
            return self.relu(args[0])
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in ("relu", "relu_"):
            return self.relu(args[0])
        return super().call_method(target, args, kwargs)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _ModifiedReLUGradient(Gradient):
    relu_function: type[torch.autograd.Function]

    def __init__(self, model: nn.Module, neuron_selection_mode: str = "max_activation") -> None:
        super().__init__(model, None, neuron_selection_mode)
        self._gm: fx.GraphModule | None = None
        self._traced_modules: tuple | None = None

    def _forward_fn(self):
        # Traced again when a submodule was replaced since (the graph binds the old one).
        modules = module_snapshot(self.model)
        if self._gm is None or not same_modules(self._traced_modules, modules):
            gm = trace(self.model)
            relus, others = _activations(gm)
            if relus == 0:
                raise UnsupportedLayerError(
                    f"{type(self).__name__} changes how ReLUs pass the gradient back, but "
                    f"{type(self.model).__name__} has no ReLU (nn.ReLU, F.relu, torch.relu, "
                    ".relu())"
                    + (f"; its non-linearities are {', '.join(others[:5])}" if others else "")
                    + ". The result would be the plain gradient: use 'gradient' for that"
                )
            if others:
                warnings.warn(
                    f"relprop: {type(self).__name__} modifies the backward pass of ReLUs only; "
                    f"{', '.join(others[:5])}{' and more' if len(others) > 5 else ''} pass the "
                    "plain gradient back",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
            self._gm = gm
            self._traced_modules = modules
        interpreter = _ReLUReplaced(self._gm, self.relu_function.apply)
        return lambda x: interpreter.run(x)


class Deconvnet(_ModifiedReLUGradient):
    """Deconvnet: ReLUs pass back the positive part of the signal, ignoring the forward mask
    (Zeiler & Fergus, 2014, *Visualizing and Understanding Convolutional Networks*)."""

    relu_function = _DeconvReLU


class GuidedBackprop(_ModifiedReLUGradient):
    """Guided backpropagation: ReLUs pass back positive gradients where the input was positive
    (Springenberg et al., 2015, *Striving for Simplicity: The All Convolutional Net*)."""

    relu_function = _GuidedReLU
