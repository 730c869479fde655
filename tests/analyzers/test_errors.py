"""Bad input and unsupported models: each case raises its own error type, and the message names
the problem (and, where there is one, the way out)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests.oracles.nets import SmallCNN, bn_sequential, seeded_normal
from torch import Tensor, nn

import relprop


@pytest.fixture
def model():
    return SmallCNN(bias=True).eval()


@pytest.fixture
def x():
    return seeded_normal((2, 3, 8, 8), seed=31, dtype=torch.float32)


ANALYZERS = ["lrp.epsilon", "gradient", "lrp.epsilon_plus_flat", "deep_taylor"]


def test_error_hierarchy():
    for error in (
        relprop.UnsupportedLayerError,
        relprop.SoftmaxOutputError,
        relprop.AnalyzerInputError,
        relprop.UnknownAnalyzerError,
    ):
        assert issubclass(error, relprop.RelpropError)
    assert issubclass(relprop.RelpropError, Exception)


@pytest.mark.parametrize("name", ANALYZERS)
@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((3, 8, 8), r"shape|batch|dimension"),
        ((2, 3, 8), r"shape|rank|dimension"),
        ((2, 4, 8, 8), r"shape|channel"),
        ((8,), r"shape|batch|dimension"),
    ],
    ids=["no_batch_dim", "rank_3", "wrong_channels", "rank_1"],
)
def test_wrong_rank_or_shape(model, name, shape, words):
    analyzer = relprop.create_analyzer(name, model)
    with pytest.raises(relprop.AnalyzerInputError, match=re.compile(words, re.IGNORECASE)):
        analyzer.analyze(seeded_normal(shape, seed=32, dtype=torch.float32))


def test_wrong_shape_after_a_good_call(model, x):
    """A cached plan must not hide a shape change."""
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    analyzer.analyze(x)
    with pytest.raises(
        relprop.AnalyzerInputError, match=re.compile(r"shape|channel", re.IGNORECASE)
    ):
        analyzer.analyze(seeded_normal((2, 4, 8, 8), seed=32, dtype=torch.float32))


@pytest.mark.parametrize("name", ANALYZERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bool])
def test_wrong_dtype(model, x, name, dtype):
    analyzer = relprop.create_analyzer(name, model)
    with pytest.raises(
        relprop.AnalyzerInputError, match=re.compile(r"dtype", re.IGNORECASE)
    ) as info:
        analyzer.analyze(x.to(dtype))
    assert str(dtype) in str(info.value)


@pytest.mark.parametrize("name", ANALYZERS)
def test_device_mismatch(model, x, name):
    """The meta device stands in for a second device on a machine without a GPU."""
    analyzer = relprop.create_analyzer(name, model)
    with pytest.raises(relprop.AnalyzerInputError) as info:
        analyzer.analyze(x.to("meta"))
    # Names both devices.
    assert "meta" in str(info.value) and "cpu" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_cuda(model, x):
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    with pytest.raises(relprop.AnalyzerInputError, match="cuda"):
        analyzer.analyze(x.cuda())


@pytest.mark.parametrize("name", ANALYZERS)
@pytest.mark.parametrize(
    ("bad", "word"), [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "inf")]
)
def test_non_finite_input(model, x, name, bad, word):
    x = x.clone()
    x[1, 2, 3, 4] = bad
    analyzer = relprop.create_analyzer(name, model)
    with pytest.raises(relprop.AnalyzerInputError, match=re.compile(word, re.IGNORECASE)):
        analyzer.analyze(x)


@pytest.mark.parametrize("name", ANALYZERS)
@pytest.mark.parametrize(
    "selection", [5, 100, [0, 5], torch.tensor([1, 7])], ids=["int_5", "int_100", "list", "tensor"]
)
def test_index_out_of_range(model, x, name, selection):
    """SmallCNN has 5 outputs: index 5 is one past the end."""
    analyzer = relprop.create_analyzer(name, model, neuron_selection_mode="index")
    with pytest.raises(
        relprop.AnalyzerInputError, match=re.compile(r"range|out of|outputs", re.IGNORECASE)
    ) as info:
        analyzer.analyze(x, neuron_selection=selection)
    assert "5" in str(info.value)


@pytest.mark.parametrize("name", ANALYZERS)
@pytest.mark.parametrize(
    "selection", [[0, 1, 2], [1], torch.tensor([0, 1, 2])], ids=["three", "one", "tensor_three"]
)
def test_per_sample_selection_of_wrong_length(model, x, name, selection):
    analyzer = relprop.create_analyzer(name, model, neuron_selection_mode="index")
    with pytest.raises(relprop.AnalyzerInputError) as info:
        analyzer.analyze(x, neuron_selection=selection)
    message = str(info.value)
    assert str(len(selection)) in message and "2" in message


def test_index_mode_without_selection(model, x):
    analyzer = relprop.create_analyzer("lrp.epsilon", model, neuron_selection_mode="index")
    with pytest.raises(relprop.AnalyzerInputError, match="neuron_selection"):
        analyzer.analyze(x)


def test_unknown_selection_mode(model):
    with pytest.raises(relprop.RelpropError, match="max_activation"):
        relprop.create_analyzer("lrp.epsilon", model, neuron_selection_mode="largest")


def test_unknown_analyzer_lists_the_valid_names(model):
    with pytest.raises(relprop.UnknownAnalyzerError) as info:
        relprop.create_analyzer("lrp.epsilom", model)
    message = str(info.value)
    assert "lrp.epsilom" in message
    for valid in ("lrp.epsilon", "gradient", "deep_taylor", "integrated_gradients"):
        assert valid in message


class SoftmaxModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = SmallCNN(bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.body(x), dim=1)


SOFTMAX_MODELS = [
    ("nn_softmax", lambda: nn.Sequential(SmallCNN(bias=True), nn.Softmax(dim=1))),
    ("functional_softmax", SoftmaxModule),
]


@pytest.mark.parametrize(("model_id", "build"), SOFTMAX_MODELS, ids=[c[0] for c in SOFTMAX_MODELS])
@pytest.mark.parametrize("name", ANALYZERS)
def test_softmax_output_points_to_model_wo_softmax(x, model_id, build, name):
    model = build().eval()
    with pytest.raises(relprop.SoftmaxOutputError, match="model_wo_softmax"):
        relprop.create_analyzer(name, model).analyze(x)


def test_model_wo_softmax_explains_the_logits(x):
    body = SmallCNN(bias=True).eval()
    stripped = relprop.model_wo_softmax(nn.Sequential(body, nn.Softmax(dim=1)))
    with torch.no_grad():
        assert torch.equal(stripped(x), body(x))
    expected = relprop.create_analyzer("lrp.epsilon", body).analyze(x)
    actual = relprop.create_analyzer("lrp.epsilon", stripped).analyze(x)
    assert torch.equal(actual, expected)


class Sorter(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sort(x, dim=1).values


class WithSorter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Sorter())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.encoder(x)
        return self.head(out[:, -1])


class WithPoolIndices(nn.Module):
    """Unpacks ``(output, indices)`` from a max pool: relprop once indexed that pair as if it
    were the pooled tensor, and explained the first sample's output for every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled, _ = self.pool(torch.relu(self.conv(x)))
        return self.head(pooled.mean((-2, -1)))


UNSUPPORTED = [
    ("sort", WithSorter, (2, 6), "block.2", "Sorter"),
    ("lstm", WithLSTM, (2, 5, 6), "encoder", "LSTM"),
    ("pool-indices", WithPoolIndices, (3, 3, 8, 8), "pool", "MaxPool2d"),
]


@pytest.mark.parametrize(
    ("case", "build", "shape", "path", "type_name"), UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED]
)
@pytest.mark.parametrize("name", ["lrp.epsilon", "lrp.epsilon_plus_flat", "deep_taylor"])
def test_unsupported_layer_names_path_and_type(case, build, shape, path, type_name, name):
    torch.manual_seed(0)
    model = build().eval()
    x = seeded_normal(shape, seed=33, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer(name, model).analyze(x)
    message = str(info.value)
    assert path in message and type_name in message
    # The way out: a rule in a composite, or the gradient fallback.
    assert re.search(r"composite|rule|gradient", message, re.IGNORECASE)


class SwappedHalves(nn.Module):
    """Takes a split's parts by a slice, not each by a constant index."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(x.chunk(2, dim=1)[::-1], dim=1)


def test_split_parts_not_taken_by_index_are_refused_with_the_way_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), SwappedHalves(), nn.Linear(8, 3)).eval()
    x = seeded_normal((2, 6), seed=33, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    message = str(info.value)
    assert "'2'" in message and "SwappedHalves" in message and "chunk" in message
    assert "a, b = x.chunk(2, dim=1)" in message

    class ByIndex(nn.Module):  # the way out the message gives
        def forward(self, x: Tensor) -> Tensor:
            a, b = x.chunk(2, dim=1)
            return torch.cat([b, a], dim=1)

    fixed = nn.Sequential(model[0], model[1], ByIndex(), model[3]).eval()
    assert torch.equal(fixed(x), model(x))
    relevance = relprop.create_analyzer("lrp.epsilon", fixed).analyze(x)
    assert relevance.shape == x.shape and bool(torch.isfinite(relevance).all())


class TokenMixer(nn.Module):
    """Self-attention written out (q, k, v projections, softmax of q kᵀ, times v)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2) / 6**0.5, dim=-1) @ v


class SelfAttentionBlock(nn.Module):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.attention = mixer
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.attention(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.mean(dim=1))


@pytest.mark.parametrize("name", ["lrp.epsilon", "lrp.epsilon_plus_flat"])
def test_attention_written_out_is_refused_with_the_way_out_not_pass(name):
    """Pass (or a softmax mapped to Pass) would keep each token's relevance in place: the advice
    for attention written out of matrix products is scaled_dot_product_attention or a gradient
    analyzer."""
    torch.manual_seed(0)
    model = SelfAttentionBlock(TokenMixer()).eval()
    x = seeded_normal((2, 4, 6), seed=33, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer(name, model).analyze(x)
    message = str(info.value)
    assert "'attention'" in message and "Attention mixes tokens" in message
    assert "scaled_dot_product_attention" in message and "gradient analyzer" in message
    assert "Pass())" not in message
    gradient = relprop.create_analyzer("gradient", model).analyze(x)  # the way out works
    assert gradient.shape == x.shape and gradient.abs().max() > 0


class AttentionWeightsUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        _, weights = self.mha(x, x, x)
        return self.head(weights.mean(dim=1))


def test_attention_weights_used_downstream_are_refused():
    torch.manual_seed(0)
    x = seeded_normal((2, 4, 6), seed=33, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError, match="'mha'.*out, _ = attention"):
        relprop.create_analyzer("lrp.epsilon", AttentionWeightsUsed().eval()).analyze(x)


def test_box_bounds_that_vary_within_a_channel_are_refused_naming_the_shape(model, x):
    """z^B bounds per pixel cannot be folded into a convolution's shared weights: refused with
    the shape to give instead (per-channel bounds work: test_zennit.py)."""
    low, high = torch.full((1, 3, 8, 8), -2.0), torch.full((1, 3, 8, 8), 2.0)
    composite = relprop.composites.EpsilonGammaBox(low=low, high=high)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 8, 8\).*\(1, 3, 1, 1\)"):
        relprop.create_analyzer("lrp", model, composite=composite).analyze(x)
    with pytest.raises(ValueError, match="low < high"):
        relprop.composites.EpsilonGammaBox(low=torch.tensor([0.0, 1.0]), high=0.5)


class StandardisedConv(nn.Module):
    """A convolution whose weight is standardised in forward (BiT's StdConv2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std()
        return self.head(torch.relu(F.conv2d(x, w, padding=1)).mean((2, 3)))


def test_functional_layer_with_a_computed_weight_is_refused_with_the_way_out(x):
    torch.manual_seed(0)
    with pytest.raises(relprop.UnsupportedLayerError, match="weight is computed in the forward"):
        relprop.create_analyzer("lrp.epsilon", StandardisedConv().eval()).analyze(x[:, :3])


def _mlp() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize(
    ("reparametrize", "kind"),
    [
        (lambda m: nn.utils.spectral_norm(m[0]), "spectral_norm"),
        (lambda m: torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5), "prune"),
    ],
    ids=["spectral-norm", "prune"],
)
def test_weights_kept_up_to_date_by_a_hook_are_refused(reparametrize, kind):
    """Legacy reparametrizations recompute ``module.weight`` in a forward pre-hook, which relprop
    does not run: the weight it would read is the one of the last forward."""
    model = _mlp()
    reparametrize(model)
    with pytest.raises(relprop.UnsupportedLayerError, match=kind) as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(torch.randn(2, 6).double())
    assert "'0'" in str(info.value) and "parametrizations" in str(info.value)


def test_parametrized_weights_are_read_as_they_are_now():
    # The parametrization API computes the weight on access: relprop explains that weight.
    model = _mlp()
    nn.utils.parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(2.0)  # a training step, say
    plain = _mlp()
    with torch.no_grad():
        plain[0].weight.copy_(model[0].weight)
    x = seeded_normal((2, 6), seed=34, dtype=torch.float64)
    expected = relprop.create_analyzer("lrp.epsilon", plain).analyze(x)
    actual = relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def test_other_forward_hooks_are_named_in_a_warning():
    model = _mlp()
    model[2].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.warns(UserWarning, match=r"'2'.*forward hooks"):
        relprop.create_analyzer("lrp.epsilon", model).analyze(torch.randn(2, 6).double())


@pytest.mark.parametrize(
    "selection",
    [[2.7, 2.7], 2.0, torch.tensor([True, False]), "2", [True, False], torch.tensor([0.0, 1.0])],
    ids=["float-list", "float", "bool-tensor", "string", "bool-list", "float-tensor"],
)
def test_selection_that_is_not_an_integer_is_refused(model, x, selection):
    # Once taken as int(v): 2.7 → 2, True → 1, '2' → index 2 (by its characters).
    analyzer = relprop.create_analyzer("lrp.epsilon", model, neuron_selection_mode="index")
    with pytest.raises(relprop.AnalyzerInputError, match="neuron_selection"):
        analyzer.analyze(x, neuron_selection=selection)


def test_numpy_integers_select_as_ints_do(model, x):
    import numpy as np

    analyzer = relprop.create_analyzer("lrp.epsilon", model, neuron_selection_mode="index")
    expected = analyzer.analyze(x, neuron_selection=[3, 1])
    for selection in (np.array([3, 1]), [np.int64(3), np.int32(1)], torch.tensor([3, 1])):
        assert torch.equal(analyzer.analyze(x, neuron_selection=selection), expected)
    single = analyzer.analyze(x, neuron_selection=3)
    assert torch.equal(analyzer.analyze(x, neuron_selection=np.int64(3)), single)
    assert torch.equal(analyzer.analyze(x, neuron_selection=np.array(3)), single)


@pytest.mark.parametrize("wrap", ["DataParallel", "compiled", "AveragedModel"])
def test_wrapped_models_are_explained_as_the_model_they_run(model, x, wrap):
    """A wrapper cannot be traced itself; relprop traces the module it runs."""
    wrapped = {
        "DataParallel": nn.DataParallel,
        "compiled": torch.compile,
        "AveragedModel": torch.optim.swa_utils.AveragedModel,
    }[wrap](model)
    # With one GPU visible, DataParallel moves the model onto it.
    x = x.to(next(model.parameters()).device)
    expected = relprop.create_analyzer("lrp.epsilon_plus", model).analyze(x)
    assert torch.equal(relprop.create_analyzer("lrp.epsilon_plus", wrapped).analyze(x), expected)


# -- advice that works: following the way out of a refusal never leads to another refusal ------


def _conv_model(conv: nn.Module, between: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(5)
    layers = [conv] + ([between] if between is not None else []) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_batchnorm_without_running_statistics_says_why_and_its_advice_works(x):
    model = _conv_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    message = str(info.value)
    assert "'1'" in message and "BatchNorm2d" in message and "track_running_stats" in message
    # The advice: pass relevance through it by name, as the message spells it.
    assert "name_map={'1': relprop.rules.Pass()}" in message
    composite = relprop.composites.Composite(name_map={"1": relprop.rules.Pass()})
    analyzer = relprop.create_analyzer("lrp", model, composite=composite)
    relevance = analyzer.analyze(x)
    assert relevance.shape == x.shape and bool(torch.isfinite(relevance).all())
    # The plan runs the model as it is: the batch's own statistics.
    with torch.no_grad():
        torch.testing.assert_close(analyzer.forward(x), model(x))
    assert analyzer.plan.rules()["1"] == "Pass"


@pytest.mark.parametrize(
    ("conv", "explicit"),
    [
        (nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(3, 4, 3, padding=1)),
        (
            nn.Conv2d(3, 4, (3, 5), padding="same", dilation=2),
            nn.Conv2d(3, 4, (3, 5), padding=(2, 4), dilation=2),
        ),
        (nn.Conv2d(3, 4, 2, padding="same", dilation=2), nn.Conv2d(3, 4, 2, padding=1, dilation=2)),
    ],
    ids=["3x3", "3x5-dilated", "2x2-dilation-2"],
)
def test_symmetric_same_padding_is_the_explicit_padding(x, conv, explicit):
    """'same' padding was refused with advice to map the convolution to Pass, which a layer with
    weights cannot take: where 'same' pads both sides alike it is that explicit padding."""
    same = _conv_model(conv)
    plain = _conv_model(explicit)
    plain.load_state_dict(same.state_dict())
    x = x.double()
    expected = relprop.create_analyzer("lrp.epsilon_plus_flat", plain.double()).analyze(x)
    actual = relprop.create_analyzer("lrp.epsilon_plus_flat", same.double()).analyze(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def test_same_padding_of_a_1d_convolution():
    torch.manual_seed(6)
    same = nn.Sequential(
        nn.Conv1d(2, 4, 5, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(28, 3)
    )
    plain = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(28, 3))
    plain.load_state_dict(same.state_dict())
    x = seeded_normal((2, 2, 7), seed=35, dtype=torch.float64)
    expected = relprop.create_analyzer("lrp.epsilon", plain.double().eval()).analyze(x)
    actual = relprop.create_analyzer("lrp.epsilon", same.double().eval()).analyze(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("conv", "words"),
    [
        (nn.Conv2d(3, 4, 4, padding="same"), "padding='same'"),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
    ],
    ids=["same-even-kernel", "reflect", "circular"],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_refused_convolution_padding_offers_no_pass_mapping(x, conv, words):
    """The advice was to map the convolution to Pass, which is refused in turn (a layer with
    weights has no pass-through); now it names what does work."""
    model = _conv_model(conv)
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    message = str(info.value)
    assert "'0'" in message and "Conv2d" in message and words in message
    assert "Pass" not in message
    assert "'gradient'" in message
    relevance = relprop.create_analyzer("gradient", model).analyze(x)
    assert relevance.shape == x.shape


def test_layer_with_weights_mapped_to_pass_is_told_to_map_a_rule(x):
    model = _conv_model(nn.Conv2d(3, 4, 3, padding=1))
    composite = relprop.composites.Composite(name_map={"0": relprop.rules.Pass()})
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp", model, composite=composite).analyze(x)
    message = str(info.value)
    assert "'0'" in message and "Conv2d" in message and "cannot pass relevance" in message
    # Not the advice to map it to Pass, which is what was refused.
    assert "Pass())" not in message
    assert "name_map={'0': relprop.rules.Epsilon()}" in message
    composite = relprop.composites.Composite(name_map={"0": relprop.rules.Epsilon()})
    assert relprop.create_analyzer("lrp", model, composite=composite).analyze(x).shape == x.shape


class _InnerSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(6, 8)
        self.attention = nn.Softmax(dim=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dense(x) * 2.0 + self.attention(self.dense(x)))


def test_softmax_inside_the_network_advice_works():
    torch.manual_seed(7)
    model = _InnerSoftmax().eval()
    x = seeded_normal((2, 6), seed=36, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    message = str(info.value)
    assert "'attention'" in message and "Softmax" in message
    assert "layer_map=[(Softmax, relprop.rules.Pass())]" in message
    composite = relprop.composites.Composite(layer_map=[(nn.Softmax, relprop.rules.Pass())])
    assert relprop.create_analyzer("lrp", model, composite=composite).analyze(x).shape == x.shape


class _ScaledAdd(nn.Module):
    def __init__(self, rewritten: bool) -> None:
        super().__init__()
        self.left, self.right, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.rewritten = rewritten

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.left(x), self.right(x)
        return self.head(a + 0.5 * b if self.rewritten else torch.add(a, b, alpha=0.5))


def test_add_with_alpha_advice_works():
    torch.manual_seed(8)
    model = _ScaledAdd(rewritten=False).eval()
    x = seeded_normal((2, 6), seed=37, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError, match=r"alpha != 1") as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    assert "a + alpha * b" in str(info.value)
    rewritten = _ScaledAdd(rewritten=True).eval()
    rewritten.load_state_dict(model.state_dict())
    assert relprop.create_analyzer("lrp.epsilon", rewritten).analyze(x).shape == x.shape


# -- Pass mapped onto a module that changes the shape -------------------------------------------


def _pooled_model() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()


@pytest.mark.parametrize(
    ("path", "type_name"),
    [("2", "MaxPool2d"), ("3", "AvgPool2d"), ("4", "Flatten")],
    ids=["max-pool", "avg-pool", "flatten"],
)
def test_pass_on_a_shape_changing_layer_is_refused_by_name(x, path, type_name):
    """Was silently ignored: the module kept its own rule whatever the map said."""
    composite = relprop.composites.Composite(name_map={path: relprop.rules.Pass()})
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp", _pooled_model(), composite=composite).analyze(x)
    message = str(info.value)
    assert f"'{path}'" in message and type_name in message and "Pass" in message
    assert "shape" in message and "Remove it from the composite" in message


class _Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grow = nn.Upsample(scale_factor=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.grow(torch.relu(self.conv(x)))).mean((-2, -1)))


@pytest.mark.parametrize("by", ["name", "type"])
def test_pass_on_an_unknown_module_that_changes_the_shape_names_it(x, by):
    """Crashed in the max pool below it, with a shape error naming no module of the model."""
    torch.manual_seed(10)
    model = _Upsampled().eval()
    composite = relprop.composites.Composite(
        name_map={"grow": relprop.rules.Pass()} if by == "name" else None,
        layer_map=[(nn.Upsample, relprop.rules.Pass())] if by == "type" else (),
    )
    with pytest.raises(relprop.UnsupportedLayerError) as info:
        relprop.create_analyzer("lrp", model, composite=composite).analyze(x)
    message = str(info.value)
    assert "'grow'" in message and "Upsample" in message and "Pass" in message
    assert "(2, 4, 8, 8)" in message and "(2, 4, 16, 16)" in message
    assert "gradient" in message


def test_pass_on_an_element_wise_module_of_ones_own_still_runs(x):
    class Scale(nn.Module):
        def forward(self, t: Tensor) -> Tensor:
            return 2.0 * t

    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(), nn.Flatten(), nn.Linear(144, 3)).eval()
    composite = relprop.composites.Composite(layer_map=[(Scale, relprop.rules.Pass())])
    assert relprop.create_analyzer("lrp", model, composite=composite).analyze(x).shape == x.shape


# -- an output without a batch dimension ---------------------------------------------------------


class _Reduced(nn.Module):
    def __init__(self, keep_batch_axis: bool) -> None:
        super().__init__()
        self.body = SmallCNN(bias=True)
        self.keep_batch_axis = keep_batch_axis

    def forward(self, x: Tensor) -> Tensor:
        logits = self.body(x)
        return logits.sum(0, keepdim=True) if self.keep_batch_axis else logits.sum()


@pytest.mark.parametrize("name", [*ANALYZERS, "integrated_gradients"])
@pytest.mark.parametrize(
    ("keep_batch_axis", "shape"), [(False, "()"), (True, "(1, 5)")], ids=["scalar", "batch-summed"]
)
def test_output_without_one_row_per_sample_is_refused(x, name, keep_batch_axis, shape):
    """A scalar output raised a bare IndexError; one summed over the batch was explained as if
    its single row were the first sample's."""
    torch.manual_seed(12)
    model = _Reduced(keep_batch_axis).train()
    with pytest.raises(relprop.AnalyzerInputError) as info:
        relprop.create_analyzer(name, model).analyze(x)
    message = str(info.value)
    assert shape in message and "batch of 2" in message and "per sample" in message
    assert all(m.training for m in model.modules())


# -- rule parameters out of range -------------------------------------------------------------

R = relprop.rules


@pytest.mark.parametrize(
    ("build", "name", "value"),
    [
        (lambda: R.Epsilon(epsilon=-1e-6), "epsilon", "-1e-06"),
        (lambda: R.Epsilon(epsilon=float("nan")), "epsilon", "nan"),
        (lambda: R.Epsilon(epsilon=float("inf")), "epsilon", "inf"),
        (lambda: R.Gamma(gamma=-0.25), "gamma", "-0.25"),
        (lambda: R.Gamma(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: R.ZPlus(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: R.ZPlusFast(stabilizer=float("nan")), "stabilizer", "nan"),
        (lambda: R.Flat(stabilizer=-1.0), "stabilizer", "-1.0"),
        (lambda: R.WSquare(stabilizer=-1.0), "stabilizer", "-1.0"),
        (lambda: R.AlphaBeta(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: R.ZBox(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: R.Norm(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: relprop.composites.Composite(stabilizer=-1e-6), "stabilizer", "-1e-06"),
        (lambda: relprop.composites.EpsilonGammaBox(gamma=-1.0), "gamma", "-1.0"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_negative_or_non_finite_rule_parameter_is_refused(build, name, value):
    """Were accepted: a negative ε or stabiliser pulls denominators towards zero (one of −ε
    becomes an exact zero), a NaN makes every relevance NaN."""
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert f"{name}={value}" in message and f"{name} >= 0" in message


@pytest.mark.parametrize(
    ("analyzer", "kwargs", "words"),
    [
        ("lrp.epsilon", {"epsilon": -0.1}, "epsilon=-0.1"),
        ("lrp.epsilon_IB", {"epsilon": -0.1}, "epsilon=-0.1"),
        ("lrp.gamma", {"gamma": -0.5}, "gamma=-0.5"),
        ("lrp.sequential_preset_a", {"epsilon": -0.1}, "epsilon=-0.1"),
        ("lrp.alpha_beta", {"alpha": float("nan"), "beta": 1.0}, "alpha=nan"),
        ("lrp.bounded", {"low": 0.0, "high": float("inf")}, "high=inf"),
        ("smoothgrad", {"noise_scale": float("nan")}, "nan"),
    ],
)
def test_analyzer_parameter_out_of_range_is_refused(model, analyzer, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        relprop.create_analyzer(analyzer, model, **kwargs)


def test_zero_epsilon_and_gamma_stay_valid(model, x):
    """ε = 0 is LRP-0 (the Z rule), γ = 0 is LRP-ε: the boundary is allowed."""
    z = relprop.create_analyzer("lrp.z", model).analyze(x)
    assert torch.equal(relprop.create_analyzer("lrp.epsilon", model, epsilon=0.0).analyze(x), z)
    assert relprop.create_analyzer("lrp.gamma", model, gamma=0.0).analyze(x).shape == x.shape


# -- name_map keys that name no layer -----------------------------------------------------------


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.classifier = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def test_name_map_typo_is_refused_with_close_names(x):
    """Was silently ignored: the misspelt layer got the default rule."""
    torch.manual_seed(13)
    composite = relprop.composites.Composite(
        name_map={"featurs.0": relprop.rules.Flat(), "features.2": relprop.rules.ZPlus()}
    )
    with pytest.raises(relprop.UnknownLayerNameError) as info:
        relprop.create_analyzer("lrp", _Named().eval(), composite=composite).analyze(x)
    message = str(info.value)
    assert "'featurs.0'" in message and "did you mean 'features.0'" in message
    assert "'features.2'" not in message.split("did you mean")[0]  # the valid key is not blamed
    assert isinstance(info.value, ValueError)


def test_name_map_key_naming_a_container_lists_its_layers(x):
    torch.manual_seed(14)
    composite = relprop.composites.Composite(name_map={"features": relprop.rules.ZPlus()})
    with pytest.raises(relprop.UnknownLayerNameError) as info:
        relprop.create_analyzer("lrp", _Named().eval(), composite=composite).analyze(x)
    message = str(info.value)
    assert "'features' is a Sequential" in message and "'features.0', 'features.1'" in message


def test_name_map_of_existing_layers_runs(x):
    torch.manual_seed(15)
    model = _Named().eval()
    composite = relprop.composites.EpsilonPlus(name_map={"features.0": relprop.rules.Flat()})
    analyzer = relprop.create_analyzer("lrp", model, composite=composite)
    assert analyzer.analyze(x).shape == x.shape
    assert analyzer.plan.rules()["features.0"].startswith("Flat")


@pytest.mark.parametrize(
    "make, maps, names",
    [
        (SmallCNN, {"name_map": {"pool1": relprop.rules.Epsilon()}}, ["'pool1'", "name_map"]),
        (SmallCNN, {"name_map": {"relu2": relprop.rules.ZPlus()}}, ["'relu2'", "name_map"]),
        (
            SmallCNN,
            {"layer_map": [(nn.AvgPool2d, relprop.rules.Epsilon(0.1))]},
            ["'pool2'", "layer_map entry (AvgPool2d"],
        ),
        # A BatchNorm folded into the conv before it.
        (bn_sequential, {"name_map": {"1": relprop.rules.Gamma(0.25)}}, ["'1'", "BatchNorm2d"]),
    ],
    ids=["max-pool-by-name", "relu-by-name", "avg-pool-by-type", "folded-batchnorm"],
)
def test_a_weight_rule_on_a_module_without_weights_is_refused(make, maps, names):
    """The rule would be ignored (the module keeps relprop's own rule), and the user would
    believe it applied: refused with the module, the entry and what to do."""
    composite = relprop.composites.Composite(**maps)
    analyzer = relprop.create_analyzer("lrp", make(), composite=composite)
    with pytest.raises(relprop.RuleMappingError) as raised:
        analyzer.analyze(seeded_normal((2, 3, 8, 8), seed=1, dtype=torch.float32))
    message = str(raised.value)
    for name in names:
        assert name in message, message
    assert "remove the entry" in message and "Pass()" in message, message


def test_a_broad_type_entry_applies_where_it_can():
    """An entry for nn.Module means every module that can take the rule: the layers with weights
    get it and nothing is refused (the same relevance as the rule on every such layer)."""
    x = seeded_normal((2, 3, 8, 8), seed=2, dtype=torch.float32)
    rule = relprop.rules.Epsilon(0.01)
    broad = relprop.composites.Composite(layer_map=[(nn.Module, rule)])
    got = relprop.create_analyzer("lrp", SmallCNN(), composite=broad).analyze(x)
    expected = relprop.create_analyzer(
        "lrp", SmallCNN(), composite=relprop.composites.uniform(rule)
    ).analyze(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _ErfGate(nn.Module):
    """An element-wise block of one's own whose inside relprop does not map (erf)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.5 * torch.erf(x)


def _gated_net() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _ErfGate(), nn.Flatten(), nn.Linear(256, 3)
    )


def test_a_block_mapped_to_pass_by_name_is_kept_whole():
    """name_map={'2': Pass()} on a block of one's own: the trace keeps it whole, as a type entry
    does, instead of decomposing it (which left the key naming no traced layer and the erf
    inside unmapped). Oracle: the same block mapped to Pass by its type."""
    x = seeded_normal((2, 3, 8, 8), seed=6, dtype=torch.float32)
    with pytest.raises(relprop.UnsupportedLayerError, match="erf"):
        relprop.create_analyzer("lrp.epsilon", _gated_net()).analyze(x)
    by_name = relprop.composites.EpsilonPlus(name_map={"2": relprop.rules.Pass()})
    by_type = relprop.composites.EpsilonPlus(layer_map=[(_ErfGate, relprop.rules.Pass())])
    got = relprop.create_analyzer("lrp", _gated_net(), composite=by_name).analyze(x)
    expected = relprop.create_analyzer("lrp", _gated_net(), composite=by_type).analyze(x)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _scripted(module: nn.Module, how: str, example: Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in newer torch
        return torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_model_is_refused_naming_it_and_the_way_out(how):
    model = bn_sequential().eval()
    x = seeded_normal((2, 3, 8, 8), seed=5, dtype=torch.float32)
    scripted = _scripted(model, how, x)
    with pytest.raises(relprop.TraceError, match=r"the model is a TorchScript module") as info:
        relprop.create_analyzer("lrp.epsilon", scripted).analyze(x)
    assert "nn.Module it was scripted or traced from" in str(info.value)
    # The way out it names: the gradient family runs the TorchScript model as it is.
    torch.testing.assert_close(
        relprop.create_analyzer("gradient", scripted).analyze(x),
        relprop.create_analyzer("gradient", model).analyze(x),
    )


def test_torchscript_block_is_refused_by_path_unless_kept_whole():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()
    x = seeded_normal((2, 3, 8, 8), seed=6, dtype=torch.float32)
    plain = nn.Sequential(*model)
    model[1] = _scripted(nn.ReLU(), "script", x)
    with pytest.raises(relprop.TraceError, match=r"module '1' is a TorchScript module") as info:
        relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    assert "name_map={'1': relprop.rules.Pass()}" in str(info.value)
    # Kept whole as the message says, it passes relevance on as the ReLU would: LRP-ε equals
    # the plain model's.
    epsilon = [(nn.Conv2d, relprop.rules.Epsilon()), (nn.Linear, relprop.rules.Epsilon())]
    Composite = relprop.composites.Composite
    kept = relprop.create_analyzer(
        "lrp", model, composite=Composite(layer_map=epsilon, name_map={"1": relprop.rules.Pass()})
    ).analyze(x)
    expected = relprop.create_analyzer(
        "lrp", plain, composite=Composite(layer_map=epsilon)
    ).analyze(x)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
