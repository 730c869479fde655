"""Every LRP rule against its float64 re-implementation from the paper's formula.

Each case is one layer under test followed by a dense head: ``head(flatten(layer(x)))``. The head
(ε = 0.5) turns the selected output value into a signed, non-trivial relevance at the layer's
output; the oracle (tests/oracles/formulas.py) computes both steps from explicit contributions
``z_ij`` on the layer's dense matrix. Shapes are odd on purpose (length 123, 7×9 images, stride 2,
padding, dilation, groups), with and without bias.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles import formulas
from tests.oracles.nets import seeded_normal, seeded_uniform
from torch import Tensor, nn

import relprop

TOLERANCE = 1e-10
HEAD_EPSILON = 0.5
BATCH = 2


class LayerThenHead(nn.Module):
    """``head(flatten(layer(x)))`` with a 3-class dense head."""

    def __init__(self, layer: nn.Module, in_shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            features = layer(torch.zeros(1, *in_shape)).numel()
        torch.manual_seed(seed)
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.layer(x), 1))


# (id, module builder taking bias, input shape without batch)
WEIGHTED_LAYERS = [
    ("linear_37x23", lambda bias: nn.Linear(37, 23, bias=bias), (37,)),
    (
        "conv1d_5x123_s2p1d2",
        lambda bias: nn.Conv1d(5, 6, 4, stride=2, padding=1, dilation=2, bias=bias),
        (5, 123),
    ),
    (
        "conv1d_6x17_groups2",
        lambda bias: nn.Conv1d(6, 4, 3, padding=2, groups=2, bias=bias),
        (6, 17),
    ),
    (
        "conv2d_4x7x9_s2p1g2",
        lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias),
        (4, 7, 9),
    ),
    (
        "conv2d_3x7x9_rect_d2",
        lambda bias: nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, bias=bias),
        (3, 7, 9),
    ),
]

# (id, relprop rule builder, oracle rule name, oracle parameters)
RULES = [
    ("epsilon", lambda r: r.Epsilon(epsilon=0.25), "epsilon", {"epsilon": 0.25}),
    ("lrp0", lambda r: r.Epsilon(epsilon=0.0), "epsilon", {"epsilon": 0.0}),
    ("zplus", lambda r: r.ZPlus(), "zplus", {}),
    ("zplus_no_bias", lambda r: r.ZPlus(use_bias=False), "zplus", {"use_bias": False}),
    (
        "alpha2beta1",
        lambda r: r.AlphaBeta(alpha=2.0, beta=1.0),
        "alphabeta",
        {"alpha": 2.0, "beta": 1.0},
    ),
    (
        "alpha1beta0_no_bias",
        lambda r: r.AlphaBeta(alpha=1.0, beta=0.0, use_bias=False),
        "alphabeta",
        {"alpha": 1.0, "beta": 0.0, "use_bias": False},
    ),
    ("gamma", lambda r: r.Gamma(gamma=0.25), "gamma", {"gamma": 0.25}),
    ("flat", lambda r: r.Flat(), "flat", {}),
    ("wsquare", lambda r: r.WSquare(), "wsquare", {}),
    ("zbox", lambda r: r.ZBox(low=-2.0, high=2.0), "zbox", {"low": -2.0, "high": 2.0}),
]


def _head_relevance(model: LayerThenHead, features: Tensor, selection: Tensor | None):
    """Oracle of the head: start from the selected output value, ε-rule onto the features."""
    head = formulas.dense_layer(model.head, (features.shape[1],))
    logits = head.forward(features)
    index = logits.argmax(dim=1) if selection is None else selection
    start = torch.zeros_like(logits)
    start[torch.arange(logits.shape[0]), index] = logits[torch.arange(logits.shape[0]), index]
    return formulas.epsilon_rule(head, features, start, HEAD_EPSILON)


def _relprop_relevance(model: nn.Module, layer_rule, x: Tensor, **selection) -> Tensor:
    name_map = {"head": relprop.rules.Epsilon(epsilon=HEAD_EPSILON)}
    if layer_rule is not None:
        name_map["layer"] = layer_rule
    composite = relprop.composites.Composite(name_map=name_map)
    mode = "index" if selection else "max_activation"
    analyzer = relprop.create_analyzer(
        "lrp", model, composite=composite, neuron_selection_mode=mode
    )
    return analyzer.analyze(x, **selection)


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0, "degenerate case: the oracle's relevance is zero everywhere"
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= TOLERANCE, f"max|Δ|/max|R| = {error:.3e}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    ("layer_id", "build", "in_shape"), WEIGHTED_LAYERS, ids=[c[0] for c in WEIGHTED_LAYERS]
)
@pytest.mark.parametrize(
    ("rule_id", "relprop_rule", "oracle_rule", "params"), RULES, ids=[c[0] for c in RULES]
)
def test_weighted_layer_rule_matches_formula(
    rule_id, relprop_rule, oracle_rule, params, layer_id, build, in_shape, bias
):
    torch.manual_seed(1)
    layer = build(bias)
    if bias:
        with torch.no_grad():
            layer.bias.normal_(0.0, 0.5)
    model = LayerThenHead(layer, in_shape, seed=2).double().eval()
    if oracle_rule == "zbox":
        x = seeded_uniform((BATCH, *in_shape), seed=3, low=-2.0, high=2.0)
    else:
        x = seeded_normal((BATCH, *in_shape), seed=3)

    dense = formulas.dense_layer(model.layer, in_shape)
    flat_x = x.reshape(BATCH, -1)
    features = dense.forward(flat_x)
    at_features = _head_relevance(model, features, None)
    expected = formulas.apply_rule(oracle_rule, params, dense, flat_x, at_features)

    actual = _relprop_relevance(model, relprop_rule(relprop.rules), x)
    _assert_close(actual.reshape(BATCH, -1), expected)


def test_per_sample_index_selection_matches_formula():
    torch.manual_seed(1)
    in_shape = (4, 7, 9)
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    model = LayerThenHead(layer, in_shape, seed=2).double().eval()
    x = seeded_normal((BATCH, *in_shape), seed=3)
    selection = torch.tensor([2, 0])

    dense = formulas.dense_layer(model.layer, in_shape)
    flat_x = x.reshape(BATCH, -1)
    features = dense.forward(flat_x)
    expected = formulas.gamma_rule(dense, flat_x, _head_relevance(model, features, selection), 0.25)

    actual = _relprop_relevance(
        model, relprop.rules.Gamma(gamma=0.25), x, neuron_selection=selection.tolist()
    )
    _assert_close(actual.reshape(BATCH, -1), expected)


# (id, pooling module, input shape without batch)
POOLS = [
    ("maxpool2d_k3s2p1", nn.MaxPool2d(3, stride=2, padding=1), (3, 7, 9)),
    ("maxpool2d_k2s1d2", nn.MaxPool2d(2, stride=1, dilation=2), (3, 7, 9)),
    ("maxpool1d_k3s2p1", nn.MaxPool1d(3, stride=2, padding=1), (5, 123)),
    ("adaptive_maxpool2d_3x4", nn.AdaptiveMaxPool2d((3, 4)), (3, 7, 9)),
    ("adaptive_maxpool1d_10", nn.AdaptiveMaxPool1d(10), (5, 123)),
    ("avgpool2d_k3s2p1", nn.AvgPool2d(3, stride=2, padding=1), (3, 7, 9)),
    (
        "avgpool2d_k3s2p1_exclude_pad",
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        (3, 7, 9),
    ),
    ("avgpool1d_k3s2p1", nn.AvgPool1d(3, stride=2, padding=1), (5, 123)),
    ("adaptive_avgpool2d_3x4", nn.AdaptiveAvgPool2d((3, 4)), (3, 7, 9)),
    ("adaptive_avgpool1d_10", nn.AdaptiveAvgPool1d(10), (5, 123)),
]


@pytest.mark.parametrize(("pool_id", "pool", "in_shape"), POOLS, ids=[c[0] for c in POOLS])
def test_pool_rule_matches_formula(pool_id, pool, in_shape):
    model = LayerThenHead(pool, in_shape, seed=2).double().eval()
    x = seeded_normal((BATCH, *in_shape), seed=3)
    flat_x = x.reshape(BATCH, -1)
    if "max" in pool_id:
        windows = formulas.max_pool_windows(pool, in_shape)
        features = formulas.max_pool_forward(windows, flat_x)
        expected = formulas.max_pool_rule(windows, flat_x, _head_relevance(model, features, None))
    else:
        dense = formulas.dense_layer(pool, in_shape)
        features = dense.forward(flat_x)
        expected = formulas.epsilon_rule(
            dense, flat_x, _head_relevance(model, features, None), formulas.DEFAULT_STABILIZER
        )
    with torch.no_grad():
        assert torch.allclose(features, torch.flatten(pool(x), 1), rtol=0, atol=1e-12)

    actual = _relprop_relevance(model, None, x)
    _assert_close(actual.reshape(BATCH, -1), expected)


def test_oracle_dense_matrix_reproduces_the_convolution():
    """The oracle's own premise: its dense matrix is the convolution (else every case above is
    moot)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2).double()
    x = seeded_normal((BATCH, 3, 7, 9), seed=3)
    dense = formulas.dense_layer(conv, (3, 7, 9))
    with torch.no_grad():
        expected = conv(x).reshape(BATCH, -1)
    assert torch.allclose(dense.forward(x.reshape(BATCH, -1)), expected, rtol=0, atol=1e-12)
