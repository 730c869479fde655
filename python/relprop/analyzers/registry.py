"""``create_analyzer(name, model, **kwargs)`` with iNNvestigate's analyzer names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from relprop import composites as C
from relprop.analyzers.base import Analyzer
from relprop.analyzers.baselines import Input, Random
from relprop.analyzers.gradient import (
    Deconvnet,
    Gradient,
    GuidedBackprop,
    InputTimesGradient,
    IntegratedGradients,
    SmoothGrad,
)
from relprop.analyzers.lrp import LRP, DeepTaylor
from relprop.errors import UnknownAnalyzerError
from relprop.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Rule,
    WSquare,
    Z,
    ZBox,
    ZPlus,
    ZPlusFast,
)
from relprop.rules.zbox import Bound

# iNNvestigate's default ε for its epsilon analyzers and for its sequential presets.
EPSILON_DEFAULT = 1e-7
PRESET_EPSILON_DEFAULT = 1e-1


def _lrp(composite_factory: Callable[..., C.Composite]):
    def make(model: nn.Module, neuron_selection_mode: str = "max_activation", **kwargs) -> LRP:
        return LRP(model, composite_factory(**kwargs), neuron_selection_mode)

    return make


def _uniform(rule_factory: Callable[..., Rule]):
    return _lrp(lambda **kw: C.uniform(rule_factory(**kw)))


def _generic_lrp(
    model: nn.Module,
    composite: C.Composite | None = None,
    rule: Rule | None = None,
    neuron_selection_mode: str = "max_activation",
) -> LRP:
    if (composite is None) == (rule is None):
        raise TypeError(
            "'lrp' takes exactly one of composite= (a relprop.composites.Composite) "
            "or rule= (a relprop.rules rule for every layer with weights)"
        )
    return LRP(
        model, composite if composite is not None else C.uniform(rule), neuron_selection_mode
    )


def _preset(conv_rule: Rule, flat_first: bool):
    def factory(epsilon: float = PRESET_EPSILON_DEFAULT) -> C.Composite:
        return C.by_kind(conv_rule, Epsilon(epsilon), Flat() if flat_first else None)

    return factory


def _preset_b_flat_until_idx(
    until_layer_idx: int | None = None, epsilon: float = PRESET_EPSILON_DEFAULT
) -> C.Composite:
    """Preset B, with Flat on the layers with weights numbered 0..until_layer_idx (None, as in
    iNNvestigate: the first layer only, i.e. ``lrp.sequential_preset_b_flat``)."""
    if until_layer_idx is None:
        until_layer_idx = 0
    return _IndexedComposite(
        until_layer_idx, Flat(), C.by_kind(AlphaBeta(2.0, 1.0), Epsilon(epsilon))
    )


class _IndexedComposite(C.Composite):
    """Flat (or another rule) on the first ``until + 1`` layers with weights, then ``rest``."""

    def __init__(self, until: int, rule: Rule, rest: C.Composite) -> None:
        super().__init__(layer_map=rest.layer_map, stabilizer=rest.stabilizer)
        self.until, self.rule, self.seen = int(until), rule, []

    def rule_for(self, path, module, is_first):
        if isinstance(module, C.WeightLayer):
            if path not in self.seen:
                self.seen.append(path)
            if self.seen.index(path) <= self.until:
                return self.rule
        return super().rule_for(path, module, is_first)


def _deep_taylor(model: nn.Module, neuron_selection_mode: str = "max_activation") -> DeepTaylor:
    return DeepTaylor(model, C.uniform(ZPlus(use_bias=False)), neuron_selection_mode)


def _deep_taylor_bounded(
    model: nn.Module, low: Bound, high: Bound, neuron_selection_mode: str = "max_activation"
) -> DeepTaylor:
    return DeepTaylor(
        model, C.uniform(ZPlus(use_bias=False), first=ZBox(low, high)), neuron_selection_mode
    )


def _bounded(low: Bound, high: Bound, epsilon: float = EPSILON_DEFAULT) -> C.Composite:
    return C.uniform(Epsilon(epsilon), first=ZBox(low, high))


def _alpha_beta(
    alpha: float | None = None,
    beta: float | None = None,
    use_bias: bool = True,
    bias: bool | None = None,
) -> C.Composite:
    """α-β on every layer; as in iNNvestigate, one of α and β is enough (α − β = 1), and α = 2,
    β = 1 when neither is given. ``bias`` is iNNvestigate's name for ``use_bias``."""
    if bias is not None:
        use_bias = bias
    if alpha is None and beta is None:
        alpha, beta = 2.0, 1.0
    elif beta is None:
        beta = alpha - 1.0
    elif alpha is None:
        alpha = beta + 1.0
    return C.uniform(AlphaBeta(alpha, beta, use_bias=use_bias))


ANALYZERS: dict[str, Callable[..., Analyzer]] = {
    "input": Input,
    "random": Random,
    "gradient": Gradient,
    "gradient.baseline": Gradient,
    "input_t_gradient": InputTimesGradient,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "deconvnet": Deconvnet,
    "guided_backprop": GuidedBackprop,
    "lrp": _generic_lrp,
    # bias=: iNNvestigate's keyword for relprop's use_bias (False: the _IB variant).
    "lrp.z": _uniform(lambda bias=True: Z(use_bias=bias)),
    "lrp.z_IB": _uniform(lambda: Z(use_bias=False)),
    "lrp.epsilon": _uniform(
        lambda epsilon=EPSILON_DEFAULT, bias=True: Epsilon(epsilon, use_bias=bias)
    ),
    "lrp.epsilon_IB": _uniform(lambda epsilon=EPSILON_DEFAULT: Epsilon(epsilon, use_bias=False)),
    "lrp.w_square": _uniform(lambda: WSquare()),
    "lrp.flat": _uniform(lambda: Flat()),
    "lrp.alpha_beta": _lrp(_alpha_beta),
    "lrp.alpha_2_beta_1": _uniform(lambda: AlphaBeta(2.0, 1.0)),
    "lrp.alpha_2_beta_1_IB": _uniform(lambda: AlphaBeta(2.0, 1.0, use_bias=False)),
    "lrp.alpha_1_beta_0": _uniform(lambda: AlphaBeta(1.0, 0.0)),
    "lrp.alpha_1_beta_0_IB": _uniform(lambda: AlphaBeta(1.0, 0.0, use_bias=False)),
    "lrp.z_plus": _uniform(lambda: ZPlus(use_bias=False)),
    "lrp.z_plus_fast": _uniform(lambda: ZPlusFast()),
    "lrp.gamma": _uniform(lambda gamma=0.25: Gamma(gamma)),
    "lrp.bounded": _lrp(_bounded),
    "lrp.sequential_preset_a": _lrp(_preset(AlphaBeta(1.0, 0.0), flat_first=False)),
    "lrp.sequential_preset_b": _lrp(_preset(AlphaBeta(2.0, 1.0), flat_first=False)),
    "lrp.sequential_preset_a_flat": _lrp(_preset(AlphaBeta(1.0, 0.0), flat_first=True)),
    "lrp.sequential_preset_b_flat": _lrp(_preset(AlphaBeta(2.0, 1.0), flat_first=True)),
    "lrp.sequential_preset_b_flat_until_idx": _lrp(_preset_b_flat_until_idx),
    "lrp.epsilon_plus": _lrp(C.EpsilonPlus),
    "lrp.epsilon_plus_flat": _lrp(C.EpsilonPlusFlat),
    "lrp.epsilon_gamma_box": _lrp(C.EpsilonGammaBox),
    "lrp.epsilon_alpha2_beta1": _lrp(C.EpsilonAlpha2Beta1),
    "lrp.epsilon_alpha2_beta1_flat": _lrp(C.EpsilonAlpha2Beta1Flat),
    "deep_taylor": _deep_taylor,
    "deep_taylor.bounded": _deep_taylor_bounded,
}


def analyzer_names() -> tuple[str, ...]:
    """Every name :func:`create_analyzer` accepts."""
    return tuple(ANALYZERS)


def create_analyzer(name: str, model: nn.Module, **kwargs: Any) -> Analyzer:
    """Create the analyzer called ``name`` (iNNvestigate's names) for ``model``.

    Parameters
    ----------
    name : str
        One of :func:`analyzer_names`, e.g. ``"lrp.epsilon"``, ``"gradient"``, ``"deep_taylor"``.
    model : nn.Module
        The model to explain; it must return logits (see :func:`relprop.model_wo_softmax`).
    **kwargs
        The analyzer's options (``epsilon``, ``low``/``high``, ``neuron_selection_mode``, ...).

    Returns
    -------
    Analyzer
        Call ``analyze(x, neuron_selection=...)`` on it.
    """
    try:
        factory = ANALYZERS[name]
    except (KeyError, TypeError):
        raise UnknownAnalyzerError(
            f"unknown analyzer {name!r}; valid names: {', '.join(ANALYZERS)}"
        ) from None
    try:
        return factory(model, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err) or "missing" in str(err):
            raise TypeError(f"create_analyzer({name!r}, ...): {err}") from err
        raise
