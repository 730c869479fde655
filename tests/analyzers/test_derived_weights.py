"""What the rules derive from a layer's weights (W⁺, [W⁺; W⁻], W + γW⁺, ...) is computed once per
analysis: the next analysis derives anew (a model can change between calls in ways no version
counter sees: tests/analyzers/test_fresh_state.py), into the memory of the previous one's (fresh
memory costs page faults on a CPU), a model changed in place is explained with its new weights,
and the user's parameters carry nothing of it."""

from __future__ import annotations

import pytest
import torch
from tests.oracles.nets import bn_sequential, seeded_normal, tiny_cnn

import relprop
from relprop.ops import _layer_rules, conv
from relprop.ops._layer_rules import DERIVED_WEIGHTS_MARK

COMPOSITES = {
    "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": relprop.composites.EpsilonAlpha2Beta1,
    "EpsilonPlusFlat": relprop.composites.EpsilonPlusFlat,
}
MODELS = {"plain": lambda: tiny_cnn().double(), "batchnorm": lambda: bn_sequential().double()}


def _stores(analyzer) -> list[dict]:
    """The derived-weight stores of the analyzer's weight layers (those in use)."""
    stores = []
    for step in analyzer.plan.steps:
        params = getattr(step.layer, "params", None)
        if params is not None:
            store = _layer_rules.read_mark(params.get()[0], DERIVED_WEIGHTS_MARK)
            if store:
                stores.append(store)
    return stores


def _addresses(analyzer) -> list[int]:
    """Where the derived and the folded weights of the analyzer's layers live."""
    derived = [v.data_ptr() for store in _stores(analyzer) for v in store.values()]
    folded = [
        step.layer.params.get()[0].data_ptr()
        for step in analyzer.plan.steps
        if getattr(step.layer, "params", None) is not None and step.layer.params.batch_norms
    ]
    return sorted(derived + folded)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_each_analysis_derives_once_and_anew(monkeypatch, composite, model):
    net = MODELS[model]()
    x = seeded_normal((2, 3, 8, 8), seed=1)
    analyzer = relprop.create_analyzer("lrp", net, composite=COMPOSITES[composite]())
    derived = []
    make = _layer_rules._derived

    def counting(weight, key, shape, build):
        return make(weight, key, shape, lambda out: derived.append(key) or build(out))

    monkeypatch.setattr(_layer_rules, "_derived", counting)
    first = analyzer.analyze(x)
    kept = {key: value for store in _stores(analyzer) for key, value in store.items()}
    assert kept, "α-β, γ, z⁺ and zB layers derive weights"
    # Once per layer and weight set within the analysis (the stores hold each key once).
    assert len(derived) == sum(len(store) for store in _stores(analyzer))
    first_addresses = _addresses(analyzer)
    derived.clear()
    second = analyzer.analyze(x)
    assert torch.equal(first, second)
    again = {key: value for store in _stores(analyzer) for key, value in store.items()}
    assert again.keys() == kept.keys()
    # Derived anew, once per layer and weight set, into the first analysis's memory.
    assert len(derived) == sum(len(store) for store in _stores(analyzer))
    assert _addresses(analyzer) == first_addresses


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_a_model_changed_in_place_is_explained_with_its_new_weights(composite, model):
    net = MODELS[model]()
    x = seeded_normal((2, 3, 8, 8), seed=2)
    analyzer = relprop.create_analyzer("lrp", net, composite=COMPOSITES[composite]())
    before = analyzer.analyze(x)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for parameter in net.parameters():
            parameter.add_(
                0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            )
    after = analyzer.analyze(x)
    fresh = relprop.create_analyzer("lrp", net, composite=COMPOSITES[composite]()).analyze(x)
    torch.testing.assert_close(after, fresh, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after, before)


def test_the_users_tensors_carry_nothing():
    """Kept on the analyzer's own weight tensors (detached aliases or folded copies), never on
    the model's parameters; an op called directly on the user's tensors keeps nothing."""
    net = tiny_cnn().double()
    analyzer = relprop.create_analyzer("lrp", net, composite=COMPOSITES["EpsilonAlpha2Beta1"]())
    analyzer.analyze(seeded_normal((2, 3, 8, 8), seed=4))
    assert _stores(analyzer)
    assert not any(hasattr(p, DERIVED_WEIGHTS_MARK) for p in net.parameters())

    x = seeded_normal((2, 3, 7, 9), seed=5).relu()
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    with torch.no_grad():
        saved = conv.conv2d_forward(x, w, b, *geometry, "alphabeta", [2.0, 1.0, 1e-6, 1.0])
        conv.conv2d_relevance(
            x, w, b, saved[:1], torch.randn_like(saved[0]), *geometry, "alphabeta",
            [2.0, 1.0, 1e-6, 1.0],
        )  # fmt: skip
    assert not hasattr(w, DERIVED_WEIGHTS_MARK)
