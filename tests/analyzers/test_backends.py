"""Whole analyzers on every backend agree; torch.compile and repeated runs change nothing."""

from __future__ import annotations

import pytest
import torch
from tests.oracles.devices import TRITON_DEVICE, exact_fp32
from tests.oracles.nets import LayerNormNet, SmallCNN1d, TinyViT, tiny_cnn
from torch import nn

import relprop

COMPOSITES = {
    "epsilon": lambda: relprop.composites.uniform(relprop.rules.Epsilon(1e-3)),
    "EpsilonPlusFlat": relprop.composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    # Per-channel bounds: the first layer's relevance runs in the unit box (ZBox.unit_box).
    "EpsilonGammaBox per channel": lambda: relprop.composites.EpsilonGammaBox(
        low=torch.tensor([-3.0, -2.5, -2.0]).view(1, 3, 1, 1),
        high=torch.tensor([3.0, 2.0, 2.5]).view(1, 3, 1, 1),
    ),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
}


def _analyze(composite: str, backend: str, monkeypatch, x) -> torch.Tensor:
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    model = tiny_cnn().to(x.device)
    analyzer = relprop.create_analyzer("lrp", model, composite=COMPOSITES[composite]())
    return analyzer.analyze(x)


@pytest.mark.interpret
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_backends_agree(composite, monkeypatch):
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    reference = _analyze(composite, "reference", monkeypatch, x.double().float())
    scale = reference.abs().max()
    for backend in ("native", "triton"):
        device = TRITON_DEVICE if backend == "triton" else x.device
        with exact_fp32():
            got = _analyze(composite, backend, monkeypatch, x.to(device)).cpu()
        assert (got - reference).abs().max() <= 1e-5 * scale, backend


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_repeated_runs_are_bitwise_equal(composite):
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(2))
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES[composite]())
    assert torch.equal(analyzer.analyze(x), analyzer.analyze(x))


def test_torch_compile_gives_the_same_relevance():
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(3))
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES["EpsilonPlusFlat"]())
    eager = analyzer.analyze(x)
    compiled = torch.compile(analyzer.analyze, dynamic=False)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "shape"),
    [(lambda: LayerNormNet().eval(), (2, 3, 5, 5)), (lambda: TinyViT().eval(), (2, 3, 6, 6))],
    ids=["permute-layernorm", "attention"],
)
def test_torch_compile_of_layers_with_a_vector_jacobian_product(build, shape):
    """Permutes and attention take their relevance from autograd (graph/layers._vjp): traced by
    torch.compile, the leaves lost requires_grad ("element 0 of tensors does not require grad");
    the product now runs eagerly inside the compiled analysis."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    analyzer = relprop.create_analyzer("lrp.epsilon", build())
    eager = analyzer.analyze(x)
    compiled = torch.compile(analyzer.analyze, dynamic=False)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)


def test_plan_names_the_backend(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    text = str(relprop.create_analyzer("lrp.epsilon", tiny_cnn()).plan)
    assert "relprop::conv2d [reference]" in text
    assert "relprop::linear [reference]" in text
    assert "Epsilon(epsilon=1e-07" in text


def _depthwise_cnn() -> nn.Module:
    """A MobileNet-like stack: a depthwise 3×3 convolution (9 inputs per unit) between 1×1s."""
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip


FEW_INPUT_MODELS = {
    "grouped_1d": (SmallCNN1d, (2, 5, 123)),
    "depthwise": (_depthwise_cnn, (2, 3, 12, 12)),
}


@pytest.mark.parametrize("model_name", list(FEW_INPUT_MODELS))
def test_native_alpha_beta_is_as_close_to_float64_as_the_reference(model_name, monkeypatch):
    """α-β through layers with few inputs per unit (grouped and depthwise convolutions), where
    z⁻ formed as z − z⁺ keeps few digits: the native float32 analysis is at most twice as far
    from float64 as the reference's (it was up to 25× before it formed z⁻ as a product there)."""
    make, shape = FEW_INPUT_MODELS[model_name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def analyze(backend: str, dtype: torch.dtype) -> torch.Tensor:
        monkeypatch.setenv("RELPROP_BACKEND", backend)
        model = make().eval().to(dtype)
        composite = relprop.composites.EpsilonAlpha2Beta1()
        analyzer = relprop.create_analyzer("lrp", model, composite=composite)
        return analyzer.analyze(x.to(dtype), neuron_selection=[1, 3]).double()

    truth = analyze("reference", torch.float64)
    reference_error = torch.linalg.vector_norm(analyze("reference", torch.float32) - truth)
    native_error = torch.linalg.vector_norm(analyze("native", torch.float32) - truth)
    assert native_error <= 2 * reference_error, (native_error, reference_error)
