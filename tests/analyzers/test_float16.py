"""float16 relevance keeps its digits: the start is scaled by a power of two per sample.

Per input element, relevance is about the explained logit over the number of elements; for
small logits that is below float16's normal range, and without scaling every layer rounds it to
a few subnormal digits. Oracle: the float64 reference analysis of the same model.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.devices import TRITON_DEVICE
from torch import nn

import relprop
from relprop.graph import program


def _model(logit_scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 14 * 14, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[-1].weight.mul_(logit_scale)
        model[-1].bias.mul_(logit_scale)
    return model


def _relevance(model, x, dtype, composite, monkeypatch, backend):
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    analyzer = relprop.create_analyzer("lrp", model.to(dtype), composite=composite())
    return analyzer.analyze(x.to(dtype), neuron_selection=[3, 7]).double()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


COMPOSITES = [relprop.composites.EpsilonPlusFlat, relprop.composites.EpsilonAlpha2Beta1]


@pytest.mark.parametrize("composite", COMPOSITES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_small_logits_keep_their_digits(composite, backend, monkeypatch):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model(1e-2)
    truth = _relevance(model, x, torch.float64, composite, monkeypatch, "reference")
    assert truth.abs().max() < 2.0**-14  # float16's smallest normal: the case is a real one
    half = _relevance(model, x, torch.float16, composite, monkeypatch, backend)
    assert half.dtype == torch.float64 and torch.isfinite(half).all()
    assert _cosine(half, truth) > 0.9995
    # Each sample is scaled back by its own factor: the totals match the float64 ones.
    # (Against the sum of magnitudes: α-β totals are differences of large parts.)
    total_error = (half.sum((1, 2, 3)) - truth.sum((1, 2, 3))).abs()
    assert (total_error <= 1e-2 * truth.abs().sum((1, 2, 3))).all()


def test_without_the_scaling_float16_loses_digits(monkeypatch):
    """The comparison above can fail: with the scale switched off the same case drifts (an
    untrained VGG16 at 224×224 drifts to cosine 0.81; scaled it keeps 0.9999)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model(1e-2)
    composite = relprop.composites.EpsilonPlusFlat
    truth = _relevance(model, x, torch.float64, composite, monkeypatch, "reference")
    monkeypatch.setattr(program, "_float16_range_scale", lambda initial: None)
    half = _relevance(model, x, torch.float16, composite, monkeypatch, "native")
    assert _cosine(half, truth) < 0.999


def test_large_logits_do_not_overflow(monkeypatch):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model(3e3)
    composite = relprop.composites.EpsilonAlpha2Beta1
    truth = _relevance(model, x, torch.float64, composite, monkeypatch, "reference")
    half = _relevance(model, x, torch.float16, composite, monkeypatch, "native")
    assert torch.isfinite(half).all()
    assert _cosine(half, truth) > 0.999


def test_other_dtypes_are_not_scaled():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert program._float16_range_scale(torch.ones(2, 3, dtype=dtype)) is None
    scale = program._float16_range_scale(torch.tensor([[0.0, 3.0], [0.0, 0.0]]).half())
    assert scale.flatten().tolist() == [2.0**8 / 4, 1.0]  # ceil(log2 3) = 2; a zero row keeps 1
    tiny = program._float16_range_scale(torch.tensor([[1e-5]]).half())
    assert tiny.item() == 2.0**10  # capped: the output layer's R / z is the factor itself


def _dead_inhibitor_model() -> nn.Module:
    """Channel 0 of the first convolution never fires (zero weights, negative bias), and unit 0
    of the second has its only negative weights on that channel and a positive bias: its ``z⁻``
    is exactly 0, so α-β's share ``R / stab(z⁻, 1e-6)`` is ~1e6·R, past float16's range. The
    weights on the dead channel are large (×16, as folded batch norms make them), so even the
    saturated share times them overflows ``c = Wᵀs`` there, where ``x = 0``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0
        model[2].weight[0] = model[2].weight[0].abs()
        model[2].weight[0, 0] = -model[2].weight[0, 0]
        model[2].bias[0] = model[2].bias[0].abs() + 0.1
        model[2].weight[:, 0] *= 16.0
    return model


@pytest.mark.parametrize(
    "backend", ["native", "reference", pytest.param("triton", marks=pytest.mark.interpret)]
)
def test_float16_share_past_the_range_is_not_nan(backend, monkeypatch):
    """An infinite share would make ``inf · 0 = NaN`` in the transposed product, and the NaN
    would spread over the whole heatmap; saturated at 65504, and with ``x · c`` taken as 0 where
    ``x = 0``, the zero inputs and weights zero it, as in float64 (the oracle)."""
    model = _dead_inhibitor_model()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    composite = relprop.composites.EpsilonAlpha2Beta1
    truth = _relevance(model, x, torch.float64, composite, monkeypatch, "reference")
    if backend == "triton":
        model, x = model.to(TRITON_DEVICE), x.to(TRITON_DEVICE)
    half = _relevance(model, x, torch.float16, composite, monkeypatch, backend).cpu()
    assert torch.isfinite(half).all()
    assert _cosine(half, truth) > 0.999
