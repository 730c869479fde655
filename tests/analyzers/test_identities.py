"""Identities that hold exactly, whatever the implementation: LRP-0 = gradient × input,
conservation, z⁺ = Deep Taylor, γ = 0 equals ε, linearity in the start relevance.

Each identity states the conditions under which it holds, and the nets are built to meet them
(float64 throughout; conservation to a relative 1e-5 as the issue asks, the rest to 1e-10).
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.nets import (
    DenseReLU,
    GroupNormNet,
    LayerNormNet,
    SmallCNN,
    SmallCNN1d,
    SplitShuffleCNN,
    TinyViT,
    seeded_normal,
    seeded_uniform,
)
from torch import Tensor, nn

import relprop

EXACT = 1e-10
CONSERVATION = 1e-5


def _relative(actual: Tensor, expected: Tensor) -> float:
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0, "degenerate case: the expected tensor is zero everywhere"
    return ((actual - expected).abs().max() / scale).item()


def _gradient_times_input(model: nn.Module, x: Tensor, selection: Tensor) -> Tensor:
    """``x ⊙ ∂f_c/∂x`` by plain autograd, the independent side of the LRP-0 identity."""
    x = x.detach().clone().requires_grad_(True)
    output = model(x)
    selected = output[torch.arange(x.shape[0]), selection].sum()
    (gradient,) = torch.autograd.grad(selected, x)
    return (x * gradient).detach()


def _amplified(model: nn.Module) -> nn.Module:
    """Parameters ×10: the identities hold for any parameters, but every denominator grows and the
    stabiliser's (1e-6) share of it drops well below the 1e-5 bound."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(10.0)
    return model


# ReLU nets with biases; max pool and average pool included. LRP-0 on a linear map gives
# x ⊙ Wᵀ(R / z); started from R = f_c this is the chain rule, so R = x ⊙ ∇f_c exactly, except the
# average pool's z-rule carries Zennit's stabiliser 1e-6 (hence the looser bound there, and
# parameters ×10 so that the pooled activations are far above it).
LRP0_NETS = [
    ("cnn2d_maxpool", lambda: SmallCNN(bias=True, avg_pool=False), (3, 8, 8), EXACT),
    ("cnn2d_avgpool", lambda: SmallCNN(bias=True, avg_pool=True), (3, 8, 8), 1e-5),
    ("cnn1d", lambda: SmallCNN1d(bias=True), (5, 123), 1e-5),
    ("dense", lambda: DenseReLU(bias=True), (24,), EXACT),
    # chunk, split, tensor_split, unbind and a channel shuffle: relevance moves with the values.
    ("splits", lambda: SplitShuffleCNN(bias=True), (3, 6, 6), EXACT),
]


@pytest.mark.parametrize(
    ("net_id", "build", "shape", "tolerance"), LRP0_NETS, ids=[c[0] for c in LRP0_NETS]
)
def test_lrp0_equals_gradient_times_input(net_id, build, shape, tolerance):
    model = _amplified(build().double().eval())
    x = seeded_normal((3, *shape), seed=11)
    with torch.no_grad():
        selection = model(x).argmax(dim=1)
    expected = _gradient_times_input(model, x, selection)
    lrp0 = relprop.create_analyzer("lrp.z", model).analyze(x)
    assert _relative(lrp0, expected) <= tolerance
    epsilon0 = relprop.create_analyzer("lrp", model, rule=relprop.rules.Epsilon(epsilon=0.0))
    assert _relative(epsilon0.analyze(x), expected) <= tolerance


@pytest.mark.parametrize(
    ("net_id", "build", "shape", "tolerance"), LRP0_NETS, ids=[c[0] for c in LRP0_NETS]
)
def test_input_times_gradient_analyzer(net_id, build, shape, tolerance):
    model = build().double().eval()
    x = seeded_normal((3, *shape), seed=11)
    with torch.no_grad():
        selection = model(x).argmax(dim=1)
    expected = _gradient_times_input(model, x, selection)
    actual = relprop.create_analyzer("input_t_gradient", model).analyze(x)
    assert _relative(actual, expected) <= EXACT


def _lrp0_and_gradient_times_input(
    model: nn.Module, oracle: nn.Module, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(LRP-0 of model, gradient × input of oracle, gradient × input of model)`` for the
    selected outputs; ``oracle`` (given model's parameters here) computes the same values with
    some quantities detached, and LRP-0 runs with a zero stabiliser everywhere."""
    oracle.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(oracle(x), model(x), rtol=1e-12, atol=1e-12)
        selection = model(x).argmax(dim=1)
    composite = relprop.composites.Composite(
        default=relprop.rules.Epsilon(epsilon=0.0), stabilizer=0.0
    )
    lrp0 = relprop.create_analyzer("lrp", model, composite=composite).analyze(x)
    return (
        lrp0,
        _gradient_times_input(oracle, x, selection),
        _gradient_times_input(model, x, selection),
    )


@pytest.mark.parametrize("net", [LayerNormNet, GroupNormNet], ids=["layer_norm", "group_norm"])
def test_normalisation_lrp0_is_gradient_times_input_with_sigma_fixed(net):
    """LRP-0 through LayerNorms (a functional one over NHWC channels, an ``nn.LayerNorm`` over
    features) and GroupNorms (``nn.GroupNorm``, a functional one with a channel per group, an
    ``nn.InstanceNorm2d``) is
    gradient × input of the same net with each σ detached (the LN-rule, Ali et al., 2022), and
    measurably not the plain gradient × input, which differentiates σ."""
    model = _amplified(net(bias=True).double().eval())
    oracle = net(bias=True, sigma_fixed=True).double().eval()
    x = seeded_normal((3, 3, 5, 5), seed=11)
    lrp0, expected, plain = _lrp0_and_gradient_times_input(model, oracle, x)
    assert _relative(lrp0, expected) <= EXACT
    assert _relative(lrp0, plain) > 1e-2
    # The normalisations' z-rule carries the composite's stabiliser, as sums and pools do (0 in
    # the helper for the exact identity): the default 1e-6 moves it by ~1e-5 where an output
    # is near 0.
    default = relprop.create_analyzer("lrp.z", model).analyze(x)
    assert _relative(default, expected) <= 1e-4


@pytest.mark.parametrize("sdpa", [False, True], ids=["MultiheadAttention", "sdpa"])
def test_transformer_lrp0_is_gradient_times_input_with_attention_weights_fixed(sdpa):
    """A transformer block (``nn.MultiheadAttention``, or ``F.scaled_dot_product_attention``
    of q/k/v projections): LRP-0 equals gradient × input of the same net with the attention
    weights held fixed (query and key detached; CP-LRP, Ali et al., 2022), each LayerNorm's σ
    detached, and the GELU's gradient the identity rule's (``fn(x)/x``: relevance passes
    through it). The plain gradient × input is far from it."""
    model = TinyViT(sdpa=sdpa).double().eval()
    oracle = TinyViT(sdpa=sdpa, oracle=True).double().eval()
    lrp0, expected, plain = _lrp0_and_gradient_times_input(
        model, oracle, seeded_normal((3, 3, 6, 6), seed=11)
    )
    assert _relative(lrp0, expected) <= EXACT
    assert _relative(lrp0, plain) > 1e-1


def test_layer_norm_mapped_to_pass_hands_relevance_through(monkeypatch):
    """``Pass`` for ``nn.LayerNorm`` (AttnLRP's identity rule) replaces the LN-rule there: the
    relevance leaving the LayerNorm is the relevance that reached it."""
    model = _amplified(LayerNormNet(bias=True).double().eval())
    x = seeded_normal((2, 3, 5, 5), seed=13)
    composite = relprop.composites.Composite(
        default=relprop.rules.Epsilon(epsilon=0.0),
        layer_map=[(nn.LayerNorm, relprop.rules.Pass())],
    )
    analyzer = relprop.create_analyzer("lrp", model, composite=composite)
    step = next(s for s in analyzer.plan.steps if s.name == "norm")
    assert isinstance(step.rule, relprop.rules.Pass)
    seen = []
    original = step.layer.relevance

    def spy(saved, relevance):
        out = original(saved, relevance)
        seen.append((relevance, out[0]))
        return out

    monkeypatch.setattr(step.layer, "relevance", spy)
    analyzer.analyze(x)
    assert len(seen) == 1 and seen[0][1] is seen[0][0]


# Conservation Σ_i R_i = f_c(x) on bias-free ReLU nets with max pooling (winner takes all conserves).
# Why each rule conserves layer by layer, given every denominator is far from zero:
# - z, ε→0, γ: Σ_i q_ij = z_j (γ: z_j + γΣz_ij^±, the denominator itself) when there is no bias;
#   an output j with R_j ≠ 0 sits after a live ReLU, so z_j > 0 is not near zero.
# - z⁺: Σ_i (z_ij)⁺ = z_j⁺ > 0 for every live neuron (z_j > 0 needs a positive contribution).
# - α-β: α − β = 1 needs both a positive and a negative contribution at every live neuron: wide
#   fan-in with weights of both signs (DenseReLU, the conv nets) makes both present.
# - flat, w²: the denominator is the sum of the numerators by construction (no bias).
# zB belongs on the input layer only (x inside the box keeps its denominator positive): it is
# checked in the composites below.
CONSERVING_RULES = [
    ("z", lambda r: r.Epsilon(epsilon=0.0)),
    ("epsilon_small", lambda r: r.Epsilon(epsilon=1e-9)),
    ("zplus", lambda r: r.ZPlus()),
    ("alpha2beta1", lambda r: r.AlphaBeta(alpha=2.0, beta=1.0)),
    ("alpha1beta0", lambda r: r.AlphaBeta(alpha=1.0, beta=0.0)),
    ("gamma", lambda r: r.Gamma(gamma=0.25)),
    ("flat", lambda r: r.Flat()),
    ("wsquare", lambda r: r.WSquare()),
]

CONSERVING_NETS = [
    ("cnn2d", lambda: SmallCNN(bias=False, avg_pool=False), (3, 8, 8)),
    ("dense", lambda: DenseReLU(bias=False), (24,)),
    # Layer/GroupNorms with σ held fixed: Σ R_x = Σ R_y without a bias (graph/layers.py).
    ("layernorm", lambda: LayerNormNet(bias=False), (3, 5, 5)),
    # Without its InstanceNorm: that hands relevance to every position of a channel, also to
    # units before it with no positive contribution, which z⁺ and α-β drop (0.5 % here, with a
    # zero stabiliser too), and its outputs near 0 meet the stabiliser (w²: 3e-5; 2e-14 at 0).
    ("groupnorm", lambda: GroupNormNet(bias=False, instance_norm=False), (3, 5, 5)),
]


def _check_conservation(model: nn.Module, analyzer, x: Tensor) -> None:
    with torch.no_grad():
        selected = model(x).amax(dim=1)
    assert (selected.abs() > 1e-3).all(), "the identity needs outputs away from zero"
    relevance = analyzer.analyze(x)
    totals = relevance.reshape(x.shape[0], -1).sum(dim=1)
    error = ((totals - selected).abs() / selected.abs()).max().item()
    assert error <= CONSERVATION, f"Σ R = {totals.tolist()}, f_c(x) = {selected.tolist()}"


@pytest.mark.parametrize(
    ("net_id", "build", "shape"), CONSERVING_NETS, ids=[c[0] for c in CONSERVING_NETS]
)
@pytest.mark.parametrize(
    ("rule_id", "rule"), CONSERVING_RULES, ids=[c[0] for c in CONSERVING_RULES]
)
def test_conservation_bias_free(rule_id, rule, net_id, build, shape):
    model = _amplified(build().double().eval())
    # Signed, so the first layer sees x⁻ terms.
    x = seeded_uniform((3, *shape), seed=12, low=-2.0, high=2.0)
    analyzer = relprop.create_analyzer("lrp", model, rule=rule(relprop.rules))
    _check_conservation(model, analyzer, x)


FIRST_LAYER_COMPOSITES = [
    ("EpsilonGammaBox", lambda c: c.EpsilonGammaBox(low=-3.0, high=3.0, epsilon=1e-12)),
    ("EpsilonPlusFlat", lambda c: c.EpsilonPlusFlat(epsilon=1e-12)),
    ("EpsilonAlpha2Beta1Flat", lambda c: c.EpsilonAlpha2Beta1Flat(epsilon=1e-12)),
]


@pytest.mark.parametrize(
    ("comp_id", "composite"), FIRST_LAYER_COMPOSITES, ids=[c[0] for c in FIRST_LAYER_COMPOSITES]
)
def test_conservation_of_first_layer_composites(comp_id, composite):
    """zB / flat on the input layer with z⁺, α-β, γ and ε above all conserve without biases."""
    model = _amplified(SmallCNN(bias=False, avg_pool=False).double().eval())
    x = seeded_uniform((3, 3, 8, 8), seed=12, low=-2.0, high=2.0)
    analyzer = relprop.create_analyzer("lrp", model, composite=composite(relprop.composites))
    _check_conservation(model, analyzer, x)


def test_conservation_of_deep_taylor_bounded():
    model = _amplified(SmallCNN(bias=False, avg_pool=False).double().eval())
    x = seeded_uniform((3, 3, 8, 8), seed=12, low=-2.0, high=2.0)
    with torch.no_grad():
        assert (model(x).amax(dim=1) > 0).all(), "Deep Taylor conserves max(0, y)"
    analyzer = relprop.create_analyzer("deep_taylor.bounded", model, low=-3.0, high=3.0)
    _check_conservation(model, analyzer, x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_zplus_equals_deep_taylor_for_nonnegative_input(bias):
    """Deep Taylor is z⁺ without bias on every layer; started from max(0, y) = y for y > 0."""
    model = SmallCNN(bias=bias, avg_pool=False).double().eval()
    x = seeded_uniform((3, 3, 8, 8), seed=13, low=0.0, high=1.0)
    with torch.no_grad():
        assert (model(x).amax(dim=1) > 0).all(), "identity needs a positive selected output"
    deep_taylor = relprop.create_analyzer("deep_taylor", model).analyze(x)
    for name in ("lrp.z_plus", "lrp.z_plus_fast", "lrp.alpha_1_beta_0_IB"):
        other = relprop.create_analyzer(name, model).analyze(x)
        assert _relative(other, deep_taylor) <= EXACT, name
    rule = relprop.rules.ZPlus(use_bias=False)
    other = relprop.create_analyzer("lrp", model, rule=rule).analyze(x)
    assert _relative(other, deep_taylor) <= EXACT


def test_deep_taylor_of_negative_output_is_zero():
    model = SmallCNN(bias=True).double().eval()
    x = seeded_uniform((2, 3, 8, 8), seed=13, low=0.0, high=1.0)
    with torch.no_grad():
        lowest = model(x).argmin(dim=1)
        assert (model(x)[torch.arange(2), lowest] < 0).all()
    analyzer = relprop.create_analyzer("deep_taylor", model, neuron_selection_mode="index")
    relevance = analyzer.analyze(x, neuron_selection=lowest.tolist())
    assert torch.equal(relevance, torch.zeros_like(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_gamma_zero_equals_epsilon_at_the_stabilizer(bias):
    """γ = 0: both denominators are z itself, so γ is ε with ε = the stabiliser (they differ only
    where z = 0 exactly, which carries no relevance after a ReLU)."""
    model = SmallCNN1d(bias=bias).double().eval()
    x = seeded_normal((3, 5, 123), seed=14)
    stabilizer = 1e-3
    gamma = relprop.rules.Gamma(gamma=0.0, stabilizer=stabilizer)
    epsilon = relprop.rules.Epsilon(epsilon=stabilizer)
    via_gamma = relprop.create_analyzer("lrp", model, rule=gamma).analyze(x)
    via_epsilon = relprop.create_analyzer("lrp", model, rule=epsilon).analyze(x)
    assert _relative(via_gamma, via_epsilon) <= EXACT
    named = relprop.create_analyzer("lrp.gamma", model, gamma=0.0).analyze(x)
    default_epsilon = relprop.create_analyzer(
        "lrp", model, rule=relprop.rules.Epsilon(epsilon=1e-6)
    )
    assert _relative(named, default_epsilon.analyze(x)) <= EXACT


def test_alpha1_beta0_equals_zplus():
    """Zennit's identity ZPlus = AlphaBeta(1, 0), bias kept in both."""
    model = SmallCNN(bias=True).double().eval()
    x = seeded_normal((3, 3, 8, 8), seed=15)
    zplus = relprop.create_analyzer("lrp", model, rule=relprop.rules.ZPlus()).analyze(x)
    ab = relprop.create_analyzer("lrp", model, rule=relprop.rules.AlphaBeta(alpha=1.0, beta=0.0))
    assert _relative(ab.analyze(x), zplus) <= EXACT
    named = relprop.create_analyzer("lrp.alpha_1_beta_0", model).analyze(x)
    assert _relative(named, zplus) <= EXACT


@pytest.mark.parametrize("name", ["lrp.epsilon", "gradient"])
def test_all_outputs_is_the_sum_over_single_outputs(name):
    """The ε-rule and the gradient are linear in the start relevance, so starting from every
    output equals the sum of the per-class analyses."""
    model = SmallCNN(bias=True).double().eval()
    x = seeded_normal((2, 3, 8, 8), seed=16)
    everything = relprop.create_analyzer(name, model, neuron_selection_mode="all").analyze(x)
    single = relprop.create_analyzer(name, model, neuron_selection_mode="index")
    summed = sum(single.analyze(x, neuron_selection=c) for c in range(5))
    assert _relative(everything, summed) <= EXACT


def test_batch_is_per_sample():
    """Each sample's relevance depends on that sample only."""
    model = SmallCNN(bias=True).double().eval()
    x = seeded_normal((3, 3, 8, 8), seed=17)
    analyzer = relprop.create_analyzer("lrp.epsilon_plus_flat", model)
    together = analyzer.analyze(x)
    for i in range(3):
        alone = analyzer.analyze(x[i : i + 1])
        assert _relative(together[i : i + 1], alone) <= EXACT


def _record_max_pool_relevance(monkeypatch) -> list[str]:
    """The type of each relevance max pools hand down (``Tensor``, ``InputProduct`` or
    ``Shares``)."""
    from relprop.graph import layers

    kinds: list[str] = []
    relevance_of = layers.MaxPoolLayer.relevance

    def spy(self, saved, relevance):
        out = relevance_of(self, saved, relevance)
        kinds.append(type(out[0]).__name__)
        return out

    monkeypatch.setattr(layers.MaxPoolLayer, "relevance", spy)
    return kinds


@pytest.mark.parametrize("divided_at_pool", [True, False], ids=["shares", "unformed"])
def test_max_pool_hands_relevance_down_unformed_and_lrp0_still_equals_gradient_times_input(
    monkeypatch, divided_at_pool
):
    """Relevance arriving at a max pool as an unformed product ``c · out`` leaves it either
    divided for the ε layer below, ``c · out / stab(out)`` spread to the winners (``Shares``:
    a winner of the pool's input *is* the pool's output), or as ``x · (winner-takes-all of c)``
    (x the pool input, alive as the layer below's output) for that layer to form in its
    division — the latter where the plan does not let the pool divide. The LRP-0 identity is the
    oracle that both are exact."""
    from relprop.graph.plan import PlanBuilder

    if not divided_at_pool:
        monkeypatch.setattr(PlanBuilder, "_divide_at_max_pools", lambda self, steps: None)
    kinds = _record_max_pool_relevance(monkeypatch)
    model = SmallCNN(bias=True, avg_pool=False).double().eval()
    x = seeded_normal((4, 3, 8, 8), seed=3)
    selection = model(x).argmax(dim=1)
    analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.0)
    relevance = analyzer.analyze(x, neuron_selection=selection)
    expected = _gradient_times_input(model, x, selection)
    assert _relative(relevance, expected) < EXACT
    # pool1 feeds conv2 (unformed relevance arrives, conv1's output is alive); pool2 feeds the
    # flattening, which hands formed relevance: divided for conv2 all the same, or spread.
    expected = ["Shares", "Shares"] if divided_at_pool else ["InputProduct", "Tensor"]
    assert sorted(kinds) == expected, kinds


@pytest.mark.parametrize(
    "composite",
    [
        # α-β on the mixed-sign first layer could form c · x in its divisions, but it has two:
        # the factor would be read twice at x's size, more than the pool forming c · out at its
        # own, four times smaller size.
        relprop.composites.EpsilonAlpha2Beta1,
        # zB's one division could form it, but zB keeps nothing of its output (its denominator
        # is recomputed from x), so the pool's input is gone by then.
        lambda: relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0),
        # flat divides by one receptive-field count broadcast over the batch, nothing of x's
        # size: it would multiply c · x itself.
        relprop.composites.EpsilonPlusFlat,
    ],
    ids=["alpha-beta", "zbox", "flat"],
)
def test_max_pool_forms_the_product_where_the_layer_below_would_not_gain(monkeypatch, composite):
    """A max pool hands relevance down unformed only to a layer that forms it in one division
    and keeps the pool's input alive; otherwise it forms ``c · out`` at its own size. Oracle:
    the same analysis on the float64 reference backend (every product formed)."""
    model = SmallCNN(bias=True, avg_pool=False).double().eval()
    x = seeded_normal((4, 3, 8, 8), seed=5)
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    expected = relprop.create_analyzer("lrp", model, composite=composite()).analyze(x)
    monkeypatch.delenv("RELPROP_BACKEND")
    kinds = _record_max_pool_relevance(monkeypatch)
    relevance = relprop.create_analyzer("lrp", model, composite=composite()).analyze(x)
    assert _relative(relevance, expected) < EXACT
    # pool1 sits on the first layer: formed. pool2 feeds the flattening (formed relevance) and
    # sits on conv2, which divides at its winners under z⁺ and γ (test_divided_at_winners.py).
    pool2 = "Tensor" if composite is relprop.composites.EpsilonAlpha2Beta1 else "Unspread"
    assert kinds == [pool2, "Tensor"], kinds
