"""Whole analyzers on every backend agree; torch.compile and repeated runs change nothing."""

from __future__ import annotations

import pytest
import torch
from tests.oracles.nets import tiny_cnn

import relprop

COMPOSITES = {
    "epsilon": lambda: relprop.composites.uniform(relprop.rules.Epsilon(1e-3)),
    "EpsilonPlusFlat": relprop.composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
}


def _analyze(composite: str, backend: str, monkeypatch, x) -> torch.Tensor:
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES[composite]())
    return analyzer.analyze(x)


@pytest.mark.interpret
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_backends_agree(composite, monkeypatch):
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    reference = _analyze(composite, "reference", monkeypatch, x.double().float())
    scale = reference.abs().max()
    for backend in ("native", "triton"):
        got = _analyze(composite, backend, monkeypatch, x)
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


def test_plan_names_the_backend(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    text = str(relprop.create_analyzer("lrp.epsilon", tiny_cnn()).plan)
    assert "relprop::conv2d [reference]" in text
    assert "relprop::linear [reference]" in text
    assert "Epsilon(epsilon=1e-07" in text
