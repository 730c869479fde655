"""relprop's gradient family and LRP-ε against Captum 0.9 (float64, tolerance 1e-10)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from tests.oracles.captum_runner import captum_lrp_epsilon, captum_smoothgrad
from tests.oracles.nets import SmallCNN, seeded_normal
from torch import Tensor

import relprop

TOLERANCE = 1e-10
TARGET = [3, 1, 4]


def _relative(actual: Tensor, expected: Tensor) -> float:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = expected.abs().max()
    assert scale > 0, "degenerate case: Captum's attribution is zero everywhere"
    return ((actual - expected).abs().max() / scale).item()


@pytest.fixture
def model():
    return SmallCNN(bias=True, avg_pool=True).double().eval()


@pytest.fixture
def x():
    return seeded_normal((3, 3, 8, 8), seed=21)


def _relprop(name: str, model, x: Tensor, **kwargs) -> Tensor:
    analyzer = relprop.create_analyzer(name, model, neuron_selection_mode="index", **kwargs)
    return analyzer.analyze(x, neuron_selection=TARGET)


def _target() -> Tensor:
    return torch.tensor(TARGET)


def test_gradient_is_saliency_without_abs(model, x):
    expected = Saliency(model).attribute(x.clone(), target=_target(), abs=False)
    assert _relative(_relprop("gradient", model, x), expected) <= TOLERANCE
    assert _relative(_relprop("gradient.baseline", model, x), expected) <= TOLERANCE


@pytest.mark.parametrize("postprocess", ["abs", "square"])
def test_gradient_postprocess(model, x, postprocess):
    signed = Saliency(model).attribute(x.clone(), target=_target(), abs=False)
    expected = signed.abs() if postprocess == "abs" else signed**2
    if postprocess == "abs":
        captum_abs = Saliency(model).attribute(x.clone(), target=_target(), abs=True)
        assert torch.equal(captum_abs, expected)
    actual = _relprop("gradient", model, x, postprocess=postprocess)
    assert _relative(actual, expected) <= TOLERANCE


def test_input_times_gradient(model, x):
    expected = InputXGradient(model).attribute(x.clone(), target=_target())
    assert _relative(_relprop("input_t_gradient", model, x), expected) <= TOLERANCE


# Captum builds its integration weights as a float32 tensor, so its float64 results carry a
# relative rounding of about 4e-9.
IG_TOLERANCE = 1e-8


def _captum_integrated_gradients(model, x: Tensor, steps: int, method: str, **kwargs) -> Tensor:
    """Captum's IG, with its trapezoid rule corrected: Captum weights the trapezoid's points by
    1/n (ends 1/2n), which sums to (n−1)/n instead of 1; the trapezoid rule on n points spaced
    1/(n−1) apart weights them 1/(n−1), so the correct value is Captum's × n/(n−1)."""
    result = IntegratedGradients(model).attribute(
        x.clone(), target=_target(), n_steps=steps, method=method, **kwargs
    )
    return result * steps / (steps - 1) if method == "riemann_trapezoid" else result


@pytest.mark.parametrize(
    "integration", ["riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients(model, x, integration):
    baseline = seeded_normal(tuple(x.shape), seed=22) * 0.1
    expected = _captum_integrated_gradients(model, x, 17, integration, baselines=baseline)
    actual = _relprop(
        "integrated_gradients",
        model,
        x,
        steps=17,
        reference_inputs=baseline,
        integration=integration,
    )
    assert _relative(actual, expected) <= IG_TOLERANCE


def test_integrated_gradients_defaults(model, x):
    """Defaults: 64 steps, trapezoid rule, zero baseline."""
    expected = _captum_integrated_gradients(model, x, 64, "riemann_trapezoid")
    assert _relative(_relprop("integrated_gradients", model, x), expected) <= IG_TOLERANCE


def test_integrated_gradients_completeness_on_a_linear_path():
    """On a model linear in x every quadrature is exact: Σ IG = f_c(x) − f_c(x̄)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5).double()
    x = seeded_normal((3, 12), seed=23)
    baseline = seeded_normal((3, 12), seed=24)
    analyzer = relprop.create_analyzer(
        "integrated_gradients",
        linear,
        neuron_selection_mode="index",
        steps=3,
        reference_inputs=baseline,
    )
    attribution = analyzer.analyze(x, neuron_selection=TARGET)
    with torch.no_grad():
        index = torch.arange(3), _target()
        expected = linear(x)[index] - linear(baseline)[index]
    assert torch.allclose(attribution.sum(dim=1), expected, rtol=1e-12, atol=0)


def test_guided_backprop(model, x):
    expected = GuidedBackprop(model).attribute(x.clone(), target=_target())
    assert _relative(_relprop("guided_backprop", model, x), expected) <= TOLERANCE


def test_deconvnet(model, x):
    expected = Deconvolution(model).attribute(x.clone(), target=_target())
    assert _relative(_relprop("deconvnet", model, x), expected) <= TOLERANCE


@pytest.mark.parametrize("epsilon", [0.1, 1e-3])
def test_lrp_epsilon(model, x, epsilon):
    expected = captum_lrp_epsilon(model, x, _target(), epsilon=epsilon)
    actual = _relprop("lrp.epsilon", model, x, epsilon=epsilon)
    # The max pool differs from winner-takes-all by Captum's 1e-15 stabiliser.
    assert _relative(actual, expected) <= 1e-9


def smoothgrad_noise(x: Tensor, augment_by_n: int, noise_scale: float, seed: int) -> Tensor:
    """The noise relprop's smoothgrad draws for ``seed`` (its reproducibility contract): a
    generator on ``x``'s device seeded with ``seed`` draws ``randn(x.shape)`` once per copy, one
    copy after another, scaled by ``noise_scale``."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    draws = [
        torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        for _ in range(augment_by_n)
    ]
    return noise_scale * torch.stack(draws)


def test_smoothgrad_is_noise_tunnel_with_the_same_noise(model, x):
    n, scale, seed = 6, 0.3, 1234
    noise = smoothgrad_noise(x, n, scale, seed)
    expected = captum_smoothgrad(model, x, _target(), noise)
    actual = _relprop("smoothgrad", model, x, augment_by_n=n, noise_scale=scale, seed=seed)
    assert _relative(actual, expected) <= TOLERANCE


def test_smoothgrad_honours_noise_scale(model, x):
    """noise_scale is the absolute standard deviation: 0 gives the plain gradient, and a larger
    scale moves the result further from it (iNNvestigate ignored the argument)."""
    gradient = _relprop("gradient", model, x)
    silent = _relprop("smoothgrad", model, x, augment_by_n=4, noise_scale=0.0, seed=1)
    assert _relative(silent, gradient) <= TOLERANCE
    distances = [
        (_relprop("smoothgrad", model, x, augment_by_n=8, noise_scale=s, seed=1) - gradient).norm()
        for s in (0.01, 1.0)
    ]
    assert 0 < distances[0] < distances[1]


def test_smoothgrad_seed_reproducible(model, x):
    first = _relprop("smoothgrad", model, x, augment_by_n=4, noise_scale=0.5, seed=7)
    again = _relprop("smoothgrad", model, x, augment_by_n=4, noise_scale=0.5, seed=7)
    other = _relprop("smoothgrad", model, x, augment_by_n=4, noise_scale=0.5, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
