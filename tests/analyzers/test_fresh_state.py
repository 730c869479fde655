"""An analyzer explains the model as it is at each call, and keeps nothing on the user's tensors.

An analyzer is made once and called on many batches while the model may be trained in between.
Writes through ``.data`` or a NumPy view, fused optimizer kernels and the BatchNorm statistics a
training forward updates leave a parameter's version counter where it was, so nothing the
analyzer derives from the weights (BatchNorm folds, W⁺) may outlive a call. Oracles: on ReLU nets
ε-LRP with a vanishing ε and no biases is gradient × input of the current model (autograd); with
folded BatchNorms and for the other rules, an analyzer made after the change.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.nets import bn_sequential, seeded_normal
from torch import nn

import relprop

X = seeded_normal((2, 3, 8, 8), seed=41, dtype=torch.float64)


def _model() -> nn.Module:
    model = bn_sequential(seed=3).double()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-5  # torch's default: this test runs training forwards
    return model


def _bias_free_relu_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False),
    ).double().eval()  # fmt: skip


def _gradient_times_input(model: nn.Module, x: torch.Tensor, selection) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x)
    mask = torch.zeros_like(out)
    mask[torch.arange(out.shape[0]), torch.as_tensor(selection)] = 1
    (grad,) = torch.autograd.grad(out, x, mask)
    return grad * x.detach()


def _data_copy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p.data * 1.5 + 0.01)


def _numpy_view(model):
    for p in model.parameters():
        view = p.detach().numpy()
        view *= -0.75


def _batchnorm_statistics(model):
    # A training forward updates the running statistics (no version bump on them).
    model.train()
    with torch.no_grad():
        model(seeded_normal((16, 3, 8, 8), seed=42, dtype=torch.float64) * 3 + 1)
    model.eval()


def _fused_adam(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    model(X).sum().backward()
    optimizer.step()
    model.zero_grad()


CHANGES = {
    "data-copy": _data_copy,
    "numpy-view": _numpy_view,
    "batchnorm-statistics": _batchnorm_statistics,
    "fused-adam": _fused_adam,
}


@pytest.mark.parametrize("change", ["data-copy", "numpy-view", "fused-adam"])
def test_epsilon_follows_the_current_weights(change):
    # Without biases LRP-ε (ε → 0) is gradient × input of the model as it is now.
    model = _bias_free_relu_net()
    analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=1e-12)
    analyzer.analyze(X, neuron_selection=[1, 2])  # folds and keeps what it can
    CHANGES[change](model)
    expected = _gradient_times_input(model, X, [1, 2])
    actual = analyzer.analyze(X, neuron_selection=[1, 2])
    # ε = 1e-12 against units with z near 1e-4 after the step: agreement to about 1e-8.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize(
    "name", ["lrp.epsilon", "lrp.alpha_2_beta_1", "lrp.z_plus", "lrp.epsilon_gamma_box"]
)
def test_folds_and_derived_weights_follow_the_current_weights(change, name):
    model = _model()
    analyzer = relprop.create_analyzer(name, model)
    analyzer.analyze(X, neuron_selection=[1, 2])
    CHANGES[change](model)
    expected = relprop.create_analyzer(name, model).analyze(X, neuron_selection=[1, 2])
    assert torch.equal(analyzer.analyze(X, neuron_selection=[1, 2]), expected)


@pytest.mark.parametrize("name", ["lrp.alpha_2_beta_1", "lrp.z_plus", "lrp.epsilon_gamma_box"])
def test_the_input_is_not_marked(name):
    """relprop remembers facts about tensors it owns (x ≥ 0 spares half of α-β's products); the
    user's input gets no attribute, so a later in-place refill without a version bump (a NumPy
    view) cannot be mistaken for the old values."""
    model = _model()
    analyzer = relprop.create_analyzer(name, model)
    x = X.abs().clone()  # x ≥ 0: the case whose answer was kept
    before = set(vars(x))
    analyzer.analyze(x, neuron_selection=[1, 2])
    assert set(vars(x)) == before
    x.numpy()[:] = X.numpy()  # now mixed-sign, same version
    expected = analyzer.analyze(x.clone(), neuron_selection=[1, 2])
    assert torch.equal(analyzer.analyze(x, neuron_selection=[1, 2]), expected)


class TrainingBranch(nn.Module):
    """An auxiliary output in training mode only, as GoogLeNet's and Inception's heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 3)

    def forward(self, x):
        out = self.body(x)
        if self.training:
            out = out + self.aux(x)
        return out


def test_the_plan_is_traced_in_eval_mode():
    """Reading ``analyzer.plan`` before the first analysis, with the model in training mode,
    traces the model as ``analyze`` runs it: in eval mode."""
    model = TrainingBranch().double().train()
    analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=1e-12)
    assert "aux" not in str(analyzer.plan)
    assert model.training
    x = seeded_normal((2, 4), seed=43, dtype=torch.float64)
    relevance = analyzer.analyze(x, neuron_selection=[0, 2])
    eval_logits = model.eval()(x)[[0, 1], [0, 2]]
    # ε-LRP on a linear model without bias keeps the logit minus the bias.
    torch.testing.assert_close(relevance.sum(1), eval_logits - model.body.bias[[0, 2]])


@pytest.mark.parametrize("name", ["lrp.epsilon", "lrp.alpha_2_beta_1", "deep_taylor"])
def test_lrp_runs_under_inference_mode(name):
    """LRP needs no autograd: it runs inside ``torch.inference_mode()`` (where tensors have no
    version counter) and gives what it gives outside."""
    model = _model()
    expected = relprop.create_analyzer(name, model).analyze(X, neuron_selection=[1, 2])
    with torch.inference_mode():
        actual = relprop.create_analyzer(name, model).analyze(X, neuron_selection=[1, 2])
        again = relprop.create_analyzer(name, model).analyze(X, neuron_selection=[1, 2])
    assert torch.equal(actual, expected) and torch.equal(again, expected)


def test_gradients_take_inference_tensors_and_refuse_inference_mode():
    model = _model()
    analyzer = relprop.create_analyzer("gradient", model)
    expected = analyzer.analyze(X, neuron_selection=[1, 2])
    with torch.inference_mode():
        x = X.clone()  # an inference tensor, as preprocessing under inference_mode makes
        with pytest.raises(relprop.AnalyzerInputError, match="inference_mode"):
            analyzer.analyze(x, neuron_selection=[1, 2])
    assert torch.equal(analyzer.analyze(x, neuron_selection=[1, 2]), expected)


def test_gradients_of_a_model_that_writes_its_input_in_place():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)).double().eval()
    x = seeded_normal((2, 4), seed=44, dtype=torch.float64)
    original = x.clone()
    grad = relprop.create_analyzer("gradient", model).analyze(x, neuron_selection=[0, 1])
    assert torch.equal(x, original)
    expected = (original > 0) * model[1].weight[[0, 1]]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    "name", ["lrp.epsilon", "lrp.epsilon_plus_flat", "guided_backprop", "deconvnet"]
)
def test_a_replaced_submodule_is_explained_not_the_old_one(name):
    # Fine-tuning swaps the head after the analyzer was made: the traced plan must not keep
    # running the module it bound at the first call.
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).double().eval()  # fmt: skip
    analyzer = relprop.create_analyzer(name, model)
    analyzer.analyze(X)
    model[3] = nn.Linear(4 * 8 * 8, 5).double()
    expected = relprop.create_analyzer(name, model).analyze(X)
    torch.testing.assert_close(analyzer.analyze(X), expected)
