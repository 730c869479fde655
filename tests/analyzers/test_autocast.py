"""Analyses under ``torch.autocast``.

An LRP analysis runs relprop's own kernels: under autocast it computes in the dtype of the model
and the input, autocast off for its pass, and says so once; before, autocast cast the torch
products inside some kernels and not the relevance ops beside them, and the analysis failed on
tensors of two dtypes. The oracle is the same analysis outside autocast (bitwise), and for the
gradient family, which runs the model through autograd and so follows autocast, torch's autograd
under the same autocast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import relprop
from relprop.ops._backend import autocast_dtype


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval().to(dtype)


LRP_METHODS = [
    "lrp.epsilon",
    "lrp.z_plus",
    "lrp.epsilon_gamma_box",
    "lrp.epsilon_alpha2_beta1",
    "deep_taylor",
]


@pytest.mark.parametrize("method", LRP_METHODS)
@pytest.mark.parametrize("autocast_to", [torch.bfloat16, torch.float16])
def test_lrp_under_autocast_computes_in_the_model_dtype_and_says_so(method, autocast_to):
    model = _model()
    kwargs = {"low": -3.0, "high": 3.0} if method == "lrp.epsilon_gamma_box" else {}
    analyzer = relprop.create_analyzer(method, model, **kwargs)
    x = torch.randn(3, 3, 8, 8)
    expected = analyzer.analyze(x)
    with torch.autocast("cpu", dtype=autocast_to):
        with pytest.warns(UserWarning, match=rf"autocast \({autocast_to}\).*computes in "):
            relevance = analyzer.analyze(x)
        # The caller's autocast is on again after the analysis.
        assert autocast_dtype("cpu") == autocast_to
    assert relevance.dtype == torch.float32
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
    assert autocast_dtype("cpu") is None


def test_lrp_forward_under_autocast_is_the_model_output_in_its_dtype():
    model = _model()
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = analyzer.forward(x)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


def test_no_warning_where_autocast_computes_in_the_model_dtype_anyway():
    model = _model(torch.bfloat16)
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    expected = analyzer.analyze(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        relevance = analyzer.analyze(x)
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)


def test_the_warning_points_at_the_callers_line():
    analyzer = relprop.create_analyzer("lrp.epsilon", _model())
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        analyzer.analyze(torch.randn(1, 3, 8, 8))
    assert [entry.filename for entry in w] == [__file__]


def test_gradient_under_autocast_follows_it_as_autograd_does():
    model = _model()
    analyzer = relprop.create_analyzer("gradient", model, neuron_selection_mode="index")
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        relevance = analyzer.analyze(x, neuron_selection=1)
        leaf = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    plain = analyzer.analyze(x, neuron_selection=1)
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
    # It did follow autocast: bfloat16 products differ from float32 ones.
    assert not torch.equal(relevance, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lrp.epsilon", "lrp.epsilon_gamma_box"])
def test_lrp_under_cuda_autocast_computes_in_the_model_dtype(method):
    model = _model().cuda()
    kwargs = {"low": -3.0, "high": 3.0} if method == "lrp.epsilon_gamma_box" else {}
    analyzer = relprop.create_analyzer(method, model, **kwargs)
    x = torch.randn(3, 3, 8, 8, device="cuda")
    expected = analyzer.analyze(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast"):
            relevance = analyzer.analyze(x)
        assert autocast_dtype("cuda") == torch.bfloat16
    torch.testing.assert_close(relevance, expected, rtol=0, atol=0)
