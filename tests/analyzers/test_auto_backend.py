"""``RELPROP_BACKEND=auto``: each weight layer runs on the implementation measured fastest for its
input signature, measured once per process; the relevance is the float64 reference's whatever
the mix. A fake timer decides the race where the test needs a given winner."""

from __future__ import annotations

import math

import pytest
import torch
from tests.oracles.nets import tiny_cnn

import relprop
from relprop.ops import _backend, _layer_rules

COMPOSITES = {
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
}


@pytest.fixture(autouse=True)
def _fresh_measurements(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "auto")
    _backend.forget_measurements()
    yield
    _backend.forget_measurements()


def _fake_timer(monkeypatch, seconds):
    """Replace the stopwatch: ``seconds(layer kind, candidate)`` is what each run "took"; every
    candidate still runs once, as the real timer's warm-up does. Returns the list of timings."""
    timed = []

    def fake(key, name, fn, device):
        fn()
        timed.append((key.kind, name))
        return seconds(key.kind, name)

    monkeypatch.setattr(_backend, "_time_candidate", fake)
    return timed


def _reference(composite: str, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The float64 reference composition's relevance (RELPROP_BACKEND=reference)."""
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    analyzer = relprop.create_analyzer(
        "lrp", tiny_cnn().double(), composite=COMPOSITES[composite]()
    )
    result = analyzer.analyze(x.double())
    monkeypatch.setenv("RELPROP_BACKEND", "auto")
    return result


def _assert_close(got: torch.Tensor, reference: torch.Tensor) -> None:
    scale = reference.abs().max()
    assert (got.double() - reference).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_each_layer_runs_on_its_fastest_implementation(monkeypatch, composite):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # The reference "wins" for convolutions, the native path for the dense layer.
    _fake_timer(monkeypatch, lambda kind, name: {"reference": 1.0, "native": 2.0}.get(name, 9.0)
                if kind.startswith("conv") else {"native": 1.0}.get(name, 9.0))  # fmt: skip
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES[composite]())
    first = analyzer.analyze(x)

    calls = []
    real = _layer_rules.relevance_reference
    monkeypatch.setattr(
        _layer_rules, "relevance_reference", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    second = analyzer.analyze(x)  # nothing left to measure: only the chosen paths run
    assert len(calls) == 2  # the two convolutions' relevance, and not the dense layer's
    assert torch.equal(first, second)
    plan = str(analyzer.plan)
    assert plan.count("relprop::conv2d [auto: reference]") == 2, plan
    assert plan.count("relprop::linear [auto: native]") == 1, plan
    _assert_close(second, _reference(composite, x, monkeypatch))


def test_each_signature_is_measured_once(monkeypatch):
    timed = _fake_timer(monkeypatch, lambda kind, name: 1.0 if name == "native" else 2.0)
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    layers = 3
    assert len(timed) % layers == 0 and len(timed) >= 2 * layers  # every candidate, every layer
    count = len(timed)
    relprop.create_analyzer("lrp.epsilon", model).analyze(x)  # a new analyzer, same signatures
    assert len(timed) == count
    relprop.create_analyzer("lrp.epsilon", model).analyze(torch.randn(3, 3, 8, 8))  # new batch
    assert len(timed) == 2 * count
    assert all(choice == "native" for choice in _backend._CHOICES.values())


def test_a_failing_implementation_is_left_out_with_a_warning(monkeypatch):
    def fake(key, name, fn, device):
        if name == "native":
            raise RuntimeError("no kernel for this shape")
        fn()
        return 1.0

    monkeypatch.setattr(_backend, "_time_candidate", fake)
    x = torch.randn(2, 3, 8, 8)
    analyzer = relprop.create_analyzer("lrp.epsilon", tiny_cnn())
    with pytest.warns(RuntimeWarning, match="the native implementation failed on"):
        got = analyzer.analyze(x)
    assert "native" not in set(_backend._CHOICES.values())
    torch.testing.assert_close(got, analyzer.analyze(x))


def test_no_runnable_implementation_is_an_error_that_says_what_to_do(monkeypatch):
    def fake(key, name, fn, device):
        raise RuntimeError(f"{name} broke")

    monkeypatch.setattr(_backend, "_time_candidate", fake)
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        relprop.BackendError, match="no implementation could run .*unset RELPROP_BACKEND"
    ):
        relprop.create_analyzer("lrp.epsilon", model).analyze(torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_the_real_stopwatch_times_every_candidate(monkeypatch):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES["EpsilonGammaBox"]())
    got = analyzer.analyze(x)
    measured = _backend.measurements()
    assert len(measured) == 3
    for times in measured.values():
        assert {"native", "reference"} <= set(times)
        assert all(0 < t < math.inf for t in times.values())
    _assert_close(got, _reference("EpsilonGammaBox", x, monkeypatch))


@pytest.mark.interpret
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_triton_and_native_layers_mix(monkeypatch, composite):
    """Triton for the convolutions, the native path for the dense layer: relevance crosses
    between them in both forms (formed after a Triton layer, an unformed product from a native
    one) and still equals the float64 reference."""
    if _backend.forced_backend() == "auto" and not _triton_interpreted_or_gpu():
        pytest.skip("needs Triton (under TRITON_INTERPRET=1 on CPU)")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    _fake_timer(monkeypatch, lambda kind, name: {"triton": 1.0, "native": 2.0}.get(name, 9.0)
                if kind.startswith("conv") else {"native": 1.0}.get(name, 9.0))  # fmt: skip
    analyzer = relprop.create_analyzer("lrp", tiny_cnn(), composite=COMPOSITES[composite]())
    got = analyzer.analyze(x)
    plan = str(analyzer.plan)
    assert plan.count("relprop::conv2d [auto: triton]") == 2, plan
    assert plan.count("relprop::linear [auto: native]") == 1, plan
    _assert_close(got, _reference(composite, x, monkeypatch))


def _triton_interpreted_or_gpu() -> bool:
    from relprop.graph.layers import _triton_runs_on

    return _triton_runs_on(torch.device("cpu"))
