"""The public API: every analyzer name exists and runs, neuron selection modes of the gradient
family against plain autograd, the plan names every layer with its rule, analyzers are reusable."""

from __future__ import annotations

import pytest
import torch
from tests.oracles.nets import FunctionalCNN, SmallCNN, seeded_normal, seeded_uniform
from torch import Tensor

import relprop

EXACT = 1e-12

# Every name the issue lists, with the arguments the name needs.
ANALYZER_NAMES = {
    "input": {},
    "random": {},
    "gradient": {},
    "gradient.baseline": {},
    "input_t_gradient": {},
    "smoothgrad": {"augment_by_n": 3, "noise_scale": 0.1, "seed": 0},
    "integrated_gradients": {"steps": 5},
    "deconvnet": {},
    "guided_backprop": {},
    "lrp": {"composite": "EpsilonPlusFlat"},
    "lrp.z": {},
    "lrp.z_IB": {},
    "lrp.epsilon": {"epsilon": 0.1},
    "lrp.epsilon_IB": {"epsilon": 0.1},
    "lrp.w_square": {},
    "lrp.flat": {},
    "lrp.alpha_beta": {"alpha": 3.0, "beta": 2.0},
    "lrp.alpha_2_beta_1": {},
    "lrp.alpha_2_beta_1_IB": {},
    "lrp.alpha_1_beta_0": {},
    "lrp.alpha_1_beta_0_IB": {},
    "lrp.z_plus": {},
    "lrp.z_plus_fast": {},
    "lrp.gamma": {"gamma": 0.25},
    "lrp.bounded": {"low": -3.0, "high": 3.0},
    "lrp.sequential_preset_a": {},
    "lrp.sequential_preset_b": {},
    "lrp.sequential_preset_a_flat": {},
    "lrp.sequential_preset_b_flat": {},
    "lrp.sequential_preset_b_flat_until_idx": {},
    "lrp.epsilon_plus": {},
    "lrp.epsilon_plus_flat": {},
    "lrp.epsilon_gamma_box": {"low": -3.0, "high": 3.0},
    "lrp.epsilon_alpha2_beta1": {},
    "lrp.epsilon_alpha2_beta1_flat": {},
    "deep_taylor": {},
    "deep_taylor.bounded": {"low": -3.0, "high": 3.0},
}


def test_analyzer_names_are_exactly_the_issue_list():
    names = relprop.analyzer_names()
    assert isinstance(names, tuple)
    assert set(names) == set(ANALYZER_NAMES)


@pytest.mark.parametrize("name", sorted(ANALYZER_NAMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_analyzer_runs(name, dtype):
    model = SmallCNN(bias=True).to(dtype).eval()
    x = seeded_uniform((2, 3, 8, 8), seed=61, low=-2.0, high=2.0, dtype=dtype)
    kwargs = dict(ANALYZER_NAMES[name])
    if "composite" in kwargs:
        kwargs["composite"] = getattr(relprop.composites, kwargs["composite"])()
    analyzer = relprop.create_analyzer(name, model, **kwargs)
    relevance = analyzer.analyze(x)
    assert isinstance(relevance, Tensor)
    assert relevance.shape == x.shape
    assert relevance.dtype == x.dtype and relevance.device == x.device
    assert bool(torch.isfinite(relevance).all())
    if name != "input":
        assert not relevance.requires_grad
    assert relevance.abs().max() > 0


def test_input_analyzer_returns_the_input():
    model = SmallCNN().eval()
    x = seeded_normal((2, 3, 8, 8), seed=62, dtype=torch.float32)
    assert torch.equal(relprop.create_analyzer("input", model).analyze(x), x)


def _autograd(model, x: Tensor, start: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x), x, grad_outputs=start)
    return gradient


def _start(output: Tensor, index) -> Tensor:
    one_hot = torch.zeros_like(output)
    one_hot[torch.arange(output.shape[0]), torch.as_tensor(index)] = 1
    return one_hot


@pytest.mark.parametrize(
    ("mode", "selection"),
    [
        ("max_activation", None),
        ("index", 2),
        ("index", [4, 0, 1]),
        ("index", torch.tensor([1, 1, 3])),
        ("all", None),
    ],
    ids=["max", "index_int", "index_list", "index_tensor", "all"],
)
def test_gradient_neuron_selection(mode, selection):
    model = SmallCNN(bias=True).double().eval()
    x = seeded_normal((3, 3, 8, 8), seed=63)
    with torch.no_grad():
        output = model(x)
    if mode == "all":
        start = torch.ones_like(output)
    elif selection is None:
        start = _start(output, output.argmax(dim=1))
    elif isinstance(selection, int):
        start = _start(output, [selection] * 3)
    else:
        start = _start(output, selection)
    expected = _autograd(model, x, start)
    analyzer = relprop.create_analyzer("gradient", model, neuron_selection_mode=mode)
    actual = analyzer.analyze(x) if selection is None else analyzer.analyze(x, selection)
    assert (actual - expected).abs().max() <= EXACT * expected.abs().max()


def test_lrp_index_selection_start_value():
    """LRP starts from the selected output's value: with LRP-0 on a ReLU net the relevance is
    gradient × input for that output, whichever index is chosen."""
    model = SmallCNN(bias=True, avg_pool=False).double().eval()
    x = seeded_normal((3, 3, 8, 8), seed=64)
    selection = [4, 0, 2]
    with torch.no_grad():
        output = model(x)
    expected = x * _autograd(model, x, _start(output, selection))
    analyzer = relprop.create_analyzer("lrp.z", model, neuron_selection_mode="index")
    actual = analyzer.analyze(x, neuron_selection=selection)
    assert (actual - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_analyzer_is_reusable_across_batches():
    """One analyzer, several batches and batch sizes: each result equals a fresh analyzer's."""
    model = SmallCNN(bias=True).double().eval()
    analyzer = relprop.create_analyzer("lrp.epsilon_plus_flat", model)
    for batch, seed in ((2, 65), (5, 66), (1, 67), (2, 68)):
        x = seeded_normal((batch, 3, 8, 8), seed=seed)
        fresh = relprop.create_analyzer("lrp.epsilon_plus_flat", model).analyze(x)
        assert torch.equal(analyzer.analyze(x), fresh)


def test_analyzer_sees_weight_updates():
    """The model may be trained between analyses; the analysis uses the current weights."""
    model = SmallCNN(bias=True).double().eval()
    x = seeded_normal((2, 3, 8, 8), seed=69)
    analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.1)
    first = analyzer.analyze(x)
    with torch.no_grad():
        model.fc2.weight.mul_(-1.0)
    fresh = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.1).analyze(x)
    second = analyzer.analyze(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


def _plan_line(plan: str, layer: str) -> str:
    lines = [line for line in plan.splitlines() if layer in line.split()]
    lines = lines or [line for line in plan.splitlines() if layer in line]
    assert lines, f"{layer} is not in the plan:\n{plan}"
    return lines[0].lower()


def test_innvestigate_defaults_of_alpha_beta_and_flat_until_idx():
    model = SmallCNN(bias=True).double().eval()
    x = seeded_uniform((2, 3, 8, 8), seed=61, low=-2.0, high=2.0, dtype=torch.float64)

    def run(name, **kwargs):
        return relprop.create_analyzer(name, model, **kwargs).analyze(x)

    # One of α and β is enough, the other follows from α − β = 1 (iNNvestigate infers it).
    torch.testing.assert_close(
        run("lrp.alpha_beta", alpha=3), run("lrp.alpha_beta", alpha=3, beta=2)
    )
    torch.testing.assert_close(run("lrp.alpha_beta", beta=0), run("lrp.alpha_1_beta_0"))
    # iNNvestigate's default until_layer_idx=None: Flat on the first layer only.
    torch.testing.assert_close(
        run("lrp.sequential_preset_b_flat_until_idx", until_layer_idx=None),
        run("lrp.sequential_preset_b_flat"),
    )


def test_plan_names_every_layer_with_its_rule():
    model = SmallCNN(bias=True).eval()
    analyzer = relprop.create_analyzer("lrp", model, composite=relprop.composites.EpsilonPlusFlat())
    analyzer.analyze(seeded_normal((1, 3, 8, 8), seed=70, dtype=torch.float32))
    plan = str(analyzer.plan)
    assert "flat" in _plan_line(plan, "conv1")
    assert "zplus" in _plan_line(plan, "conv2").replace("_", "").replace("+", "plus")
    assert "epsilon" in _plan_line(plan, "fc1")
    assert "epsilon" in _plan_line(plan, "fc2")
    for layer in ("pool1", "pool2", "relu1", "relu2", "relu3"):
        _plan_line(plan, layer)


def test_plan_shows_custom_name_map():
    model = SmallCNN(bias=True).eval()
    composite = relprop.composites.Composite(
        layer_map=[
            (torch.nn.Conv2d, relprop.rules.ZPlus()),
            (torch.nn.Linear, relprop.rules.Epsilon(epsilon=0.5)),
        ],
        name_map={"conv2": relprop.rules.Gamma(gamma=0.25)},
    )
    analyzer = relprop.create_analyzer("lrp", model, composite=composite)
    analyzer.analyze(seeded_normal((1, 3, 8, 8), seed=71, dtype=torch.float32))
    plan = str(analyzer.plan)
    assert "gamma" in _plan_line(plan, "conv2")
    assert "gamma" not in _plan_line(plan, "conv1")
    assert "epsilon" in _plan_line(plan, "fc1")


def test_random_analyzer_is_random_noise_of_the_input_shape():
    model = SmallCNN().eval()
    x = seeded_normal((2, 3, 8, 8), seed=72, dtype=torch.float32)
    relevance = relprop.create_analyzer("random", model).analyze(x)
    assert relevance.shape == x.shape
    assert relevance.std() > 0 and not torch.equal(relevance, x)


class SizeArithmetic(torch.nn.Module):
    """Sizes computed in forward: ``view(n, c * h * w)`` and a channel half ``shape[1] // 2``."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 36, 3)
        self.flatten = flatten

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        if self.flatten:
            return self.fc(torch.flatten(h[:, :2], 1))
        h = h[:, : h.shape[1] // 2]
        return self.fc(h.view(h.size(0), h.size(1) * h.size(2) * h.size(3)))


def test_arithmetic_on_sizes_is_not_taken_for_a_tensor_op():
    """``h.size(1) * h.size(2)`` multiplies Python ints; it was refused as a product of two
    tensors. Oracle: the same model written with ``flatten`` and a constant slice."""
    x = seeded_normal((2, 3, 6, 6), seed=45, dtype=torch.float32)
    expected = relprop.create_analyzer("lrp.epsilon", SizeArithmetic(flatten=True)).analyze(x)
    actual = relprop.create_analyzer("lrp.epsilon", SizeArithmetic()).analyze(x)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet"])
def test_modified_relu_gradients_refuse_a_model_without_relus(name):
    # iNNvestigate refuses these methods on non-ReLU networks; silently returning the plain
    # gradient under the method's name would mislabel the result.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 3)
    ).double()
    with pytest.raises(relprop.UnsupportedLayerError, match="no ReLU"):
        relprop.create_analyzer(name, net).analyze(seeded_normal((2, 6), 3, torch.float64))


def test_modified_relu_gradients_warn_about_other_nonlinearities():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).double()  # fmt: skip
    with pytest.warns(UserWarning, match="Tanh"):
        relprop.create_analyzer("guided_backprop", net).analyze(
            seeded_normal((2, 6), 3, torch.float64)
        )


def _small_mlp() -> torch.nn.Sequential:
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize(
    ("name", "ib_name"),
    [("lrp.z", "lrp.z_IB"), ("lrp.epsilon", "lrp.epsilon_IB"),
     ("lrp.alpha_beta", "lrp.alpha_2_beta_1_IB")],
)  # fmt: skip
def test_innvestigate_bias_keyword_selects_the_ib_variant(name, ib_name):
    model, x = _small_mlp(), seeded_normal((3, 6), 8)
    with_bias = relprop.create_analyzer(name, model, bias=True).analyze(x)
    without = relprop.create_analyzer(name, model, bias=False).analyze(x)
    assert torch.equal(without, relprop.create_analyzer(ib_name, model).analyze(x))
    assert torch.equal(with_bias, relprop.create_analyzer(name, model).analyze(x))
    assert not torch.equal(with_bias, without)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("smoothgrad", {"augment_by_n": 2.7}), ("smoothgrad", {"augment_by_n": True}),
     ("integrated_gradients", {"steps": 2.5}), ("integrated_gradients", {"steps": 0})],
)  # fmt: skip
def test_counts_that_are_not_whole_numbers_are_refused(name, kwargs):
    ((key, value),) = kwargs.items()
    with pytest.raises(ValueError, match=f"{key} must be a whole number >= 1, got {value!r}"):
        relprop.create_analyzer(name, _small_mlp(), **kwargs)
    assert relprop.create_analyzer("integrated_gradients", _small_mlp(), steps=4.0).steps == 4


@pytest.mark.parametrize("baseline", [float("nan"), torch.tensor([0.0, float("inf")] * 3)])
def test_a_non_finite_baseline_is_refused(baseline):
    with pytest.raises(ValueError, match="reference_inputs must be finite"):
        relprop.create_analyzer("integrated_gradients", _small_mlp(), reference_inputs=baseline)


def test_random_stddev_scales_the_noise():
    model, x = _small_mlp(), seeded_normal((3, 6), 8)
    unit = relprop.create_analyzer("random", model, seed=4).analyze(x)
    scaled = relprop.create_analyzer("random", model, seed=4, stddev=0.25).analyze(x)
    torch.testing.assert_close(scaled, 0.25 * unit, rtol=0, atol=0)


def _autograd_gradient(model, x: Tensor, selection: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[torch.arange(len(x)), selection].sum(), x)
    return grad


def test_postprocess_of_input_times_gradient_and_integrated_gradients():
    """iNNvestigate's postprocess= on the gradients: x ⊙ |∇| and, for a two-point trapezoid,
    (x − x̄) ⊙ (|∇(x̄)| + |∇(x)|)/2, against plain autograd."""
    model, x = _small_mlp(), seeded_normal((3, 6), 8)
    selection = model(x).argmax(dim=1)
    grad = _autograd_gradient(model, x, selection)
    itg = relprop.create_analyzer("input_t_gradient", model, postprocess="abs").analyze(x)
    torch.testing.assert_close(itg, x * grad.abs())
    baseline = torch.full_like(x, 0.5)
    ig = relprop.create_analyzer(
        "integrated_gradients", model, steps=2, reference_inputs=0.5, postprocess="square"
    ).analyze(x, neuron_selection=selection)
    at_baseline = _autograd_gradient(model, baseline, selection)
    expected = (x - baseline) * (at_baseline**2 + grad**2) / 2
    torch.testing.assert_close(ig, expected)


def test_warnings_point_at_the_callers_line():
    model = _small_mlp()
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="forward hooks") as record:
        relprop.create_analyzer("lrp.epsilon", model).analyze(seeded_normal((2, 6), 8))
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    "name",
    ["lrp.epsilon", "lrp.epsilon_gamma_box", "lrp.epsilon_plus_flat", "lrp.epsilon_alpha2_beta1",
     "deep_taylor"],
)  # fmt: skip
def test_functional_layers_are_explained_as_their_modules(name):
    """F.conv2d / F.conv1d / F.linear on the model's parameters: the same relevance as the same
    network of nn modules (a BatchNorm after a functional convolution folded, the first layer's
    rule on the first functional layer), and a parameter given anew is the one explained."""
    model = FunctionalCNN().double().eval()
    x = seeded_uniform((3, 4, 8, 8), seed=2, low=-2.5, high=2.5)
    analyzer = relprop.create_analyzer(name, model)
    expected = relprop.create_analyzer(name, model.as_modules().eval()).analyze(x)
    torch.testing.assert_close(analyzer.analyze(x), expected, rtol=1e-12, atol=1e-12)
    assert "batchnorm (folded)" in str(analyzer.plan)
    model.w4 = torch.nn.Parameter(torch.randn_like(model.w4))
    expected = relprop.create_analyzer(name, model.as_modules().eval()).analyze(x)
    torch.testing.assert_close(analyzer.analyze(x), expected, rtol=1e-12, atol=1e-12)


class _Offset(torch.nn.Module):
    """``fc(relu(x + offset))``, the offset given as a parameter or computed from one."""

    def __init__(self, computed: bool) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.computed = computed
        self.raw = torch.nn.Parameter(torch.randn(6))
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        offset = (self.raw * 2.0).tanh() if self.computed else self.raw
        return self.fc(torch.relu(x + offset))


def test_values_computed_from_parameters_alone_are_constants():
    """An offset computed from a parameter by any ops (here tanh, which relprop maps nowhere
    else) runs as the model runs it and is an added constant, as a stored one is."""
    model, stored = _Offset(computed=True).double().eval(), _Offset(computed=False).double()
    with torch.no_grad():
        stored.raw.copy_((model.raw * 2.0).tanh())
    x = seeded_normal((3, 6), 8)
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    expected = relprop.create_analyzer("lrp.epsilon", stored.eval()).analyze(x)
    torch.testing.assert_close(analyzer.analyze(x), expected, rtol=0, atol=0)
    assert "constant" in str(analyzer.plan)
