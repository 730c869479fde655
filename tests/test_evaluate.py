"""relprop.evaluate: region perturbation, AOPC and ABPC against hand-computed linear cases, and
the faithfulness of every method on the embedded model compared with random attributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import relprop
from relprop import evaluate, models


class LinearScore(nn.Module):
    """f(x) = Σ w·x, one output: contributions w·x are exact attributions."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).flatten(1).sum(1, keepdim=True)


def test_pixel_flipping_linear_model_hand_computed():
    # Contributions 1, 2, 3, 4. MoRF removes 4, 3, 2, 1: scores 10, 6, 3, 1, 0, drops 0, 4, 7, 9, 10
    # → AOPC 30/5 = 6. LeRF removes 1, 2, 3, 4: scores 10, 9, 7, 4, 0 → AOPC 20/5 = 4. ABPC 2.
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    model, x = LinearScore(weight), torch.ones(1, 1, 1, 4)
    morf = evaluate.region_perturbation(model, x, x * weight, 0, patch=1, order="morf")
    lerf = evaluate.region_perturbation(model, x, x * weight, 0, patch=1, order="lerf")
    torch.testing.assert_close(
        morf, torch.tensor([[10.0, 6.0, 3.0, 1.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        lerf, torch.tensor([[10.0, 9.0, 7.0, 4.0, 0.0]], dtype=torch.float64)
    )
    assert evaluate.aopc(morf).item() == pytest.approx(6.0)
    assert evaluate.aopc(lerf).item() == pytest.approx(4.0)
    assert evaluate.abpc(morf, lerf).item() == pytest.approx(2.0)


def test_region_perturbation_patches_sum_relevance_hand_computed():
    # 4×4 image of ones, 2×2 patches with weight sums 8, -2 (top row) and 5, 1 (bottom row).
    patch_sums = torch.tensor([[8.0, -2.0], [5.0, 1.0]])
    weight = patch_sums.repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4) / 4
    model, x = LinearScore(weight), torch.ones(1, 1, 4, 4)
    relevance = x * weight
    # MoRF removes 8, 5, 1, -2: scores 12, 4, -1, -2, 0 → drops 0, 8, 13, 14, 12 → AOPC 47/5.
    morf = evaluate.region_perturbation(model, x, relevance, 0, patch=2, order="morf")
    # LeRF removes -2, 1, 5, 8: scores 12, 14, 13, 8, 0 → drops 0, -2, -1, 4, 12 → AOPC 13/5.
    lerf = evaluate.region_perturbation(model, x, relevance, 0, patch=2, order="lerf")
    torch.testing.assert_close(
        morf[0], torch.tensor([12.0, 4.0, -1.0, -2.0, 0.0], dtype=torch.float64)
    )
    assert evaluate.aopc(morf).item() == pytest.approx(47 / 5)
    assert evaluate.aopc(lerf).item() == pytest.approx(13 / 5)
    assert evaluate.abpc(morf, lerf).item() == pytest.approx(34 / 5)
    # steps truncates the curve.
    assert evaluate.region_perturbation(model, x, relevance, 0, patch=2, steps=2).shape == (1, 3)


def test_mean_fill_hand_computed():
    # f = sum of pixels, x = 1, 2, 3, 6 (mean 3); relevance ranks pixels left to right.
    model = LinearScore(torch.ones(1, 1, 1, 4))
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 1, 4)
    relevance = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 1, 4)
    curve = evaluate.region_perturbation(model, x, relevance, 0, patch=1, fill="mean")
    # Each step swaps a pixel for 3: 12 → 14 → 15 → 15 → 12.
    torch.testing.assert_close(
        curve[0], torch.tensor([12.0, 14.0, 15.0, 15.0, 12.0], dtype=torch.float64)
    )


def test_uneven_patch_grid_and_targets_per_sample():
    rank, ids = evaluate.perturbation_order(torch.zeros(1, 1, 5, 5), patch=2)
    assert ids.max().item() == 8 and rank.shape == (1, 9)
    # Ties keep row-major order in both directions.
    assert rank[0].tolist() == list(range(9))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
    x = torch.ones(2, 1, 2, 2)
    curves = evaluate.region_perturbation(model, x, torch.ones_like(x), [0, 1], patch=1)
    assert curves[:, 0].tolist() == [1.0, 2.0]  # sample 0 reads output 0, sample 1 output 1


def test_uniform_fill_is_seeded_bounded_and_shared_by_both_orders():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x = torch.rand(3, 2, 6, 6)
    relevance = torch.randn_like(x)
    filled = evaluate.fill_values(x, "uniform", generator=torch.Generator().manual_seed(5))
    lows, highs = x.flatten(1).min(1).values, x.flatten(1).max(1).values
    assert (filled.flatten(1) >= lows[:, None]).all() and (
        filled.flatten(1) <= highs[:, None]
    ).all()
    bounded = evaluate.fill_values(x, "uniform", generator=torch.Generator(), low=-1.0, high=-0.5)
    assert bounded.min() >= -1.0 and bounded.max() <= -0.5
    run = {"patch": 3, "fill": "uniform", "seed": 7}
    morf = evaluate.region_perturbation(model, x, relevance, 1, order="morf", **run)
    torch.testing.assert_close(morf, evaluate.region_perturbation(model, x, relevance, 1, **run))
    lerf = evaluate.region_perturbation(model, x, relevance, 1, order="lerf", **run)
    # All patches replaced: both orders end on the same fully noised input.
    torch.testing.assert_close(morf[:, -1], lerf[:, -1])
    other = evaluate.region_perturbation(
        model, x, relevance, 1, order="morf", patch=3, fill="uniform", seed=8
    )
    assert not torch.allclose(morf[:, 1:], other[:, 1:])


def test_blur_fill_keeps_constants_and_mass():
    constant = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(evaluate.fill_values(constant, "blur"), constant)
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    blurred = evaluate.fill_values(impulse, "blur", blur_sigma=2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)
    # A Gaussian of σ = 2: the centre weight is 1 / (2π σ²) up to discretisation.
    assert blurred[0, 0, 15, 15].item() == pytest.approx(1 / (2 * math.pi * 4), rel=0.02)
    with pytest.raises(ValueError, match="unknown fill"):
        evaluate.fill_values(constant, "noise")


def test_quantus_adapter_returns_the_gradient_as_numpy():
    model = models.load_default_model()
    images, labels = models.default_inputs()
    explain = evaluate.quantus_explain_func("gradient")
    targets = labels[:4].numpy()
    attributions = explain(model=model, inputs=images[:4].numpy(), targets=targets, device="cpu")
    assert isinstance(attributions, np.ndarray) and attributions.shape == (4, 1, 28, 28)
    # Oracle: plain autograd on the selected logits.
    x = images[:4].clone().requires_grad_(True)
    model(x).gather(1, torch.from_numpy(targets).view(-1, 1)).sum().backward()
    np.testing.assert_allclose(attributions, x.grad.numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(relprop.UnknownAnalyzerError, match="lrp.epsilon"):
        evaluate.quantus_explain_func("lrp.nonexistent")


# Cheaper settings for the noisy/path methods keep this under a minute on two cores.
_FAITHFULNESS_METHODS = {
    "gradient": {},
    "input_t_gradient": {},
    "smoothgrad": {"augment_by_n": 16, "noise_scale": 0.1, "seed": 0},
    "integrated_gradients": {"steps": 16},
    "guided_backprop": {},
    "lrp.epsilon": {},
    "lrp.epsilon_plus_flat": {},
    "lrp.epsilon_gamma_box": {"low": 0.0, "high": 1.0},
    "deep_taylor": {},
}


def _abpc_per_sample(model, x, target, relevance) -> torch.Tensor:
    curves = {
        order: evaluate.region_perturbation(
            model, x, relevance, target, patch=4, steps=20, order=order
        )
        for order in evaluate.ORDERS
    }
    return evaluate.abpc(curves["morf"], curves["lerf"])


def test_every_method_beats_random_on_abpc_on_the_embedded_model():
    model = models.load_default_model()
    images, _ = models.heldout_data()
    x = images[::50]  # 20 digits, 2 of each class
    with torch.no_grad():
        target = model(x).argmax(1)
    random = relprop.create_analyzer("random", model, neuron_selection_mode="index", seed=0)
    baseline = _abpc_per_sample(model, x, target, random.analyze(x, neuron_selection=target))
    for method, options in _FAITHFULNESS_METHODS.items():
        analyzer = relprop.create_analyzer(method, model, neuron_selection_mode="index", **options)
        scores = _abpc_per_sample(model, x, target, analyzer.analyze(x, neuron_selection=target))
        # Paired over the same digits: the mean gain must exceed three standard errors.
        gain = scores - baseline
        standard_error = gain.std() / math.sqrt(len(gain))
        assert gain.mean() > 3 * standard_error, (method, gain.mean().item(), standard_error.item())


def test_region_perturbation_runs_a_model_in_train_mode_as_in_eval_and_leaves_it_so():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(3 * 8 * 8, 4),
    ).train()  # fmt: skip
    x = torch.rand(2, 1, 8, 8)
    relevance = torch.rand_like(x)
    stats = model[1].running_mean.clone()
    curves = evaluate.region_perturbation(model, x, relevance, [0, 1], patch=4)
    assert torch.equal(model[1].running_mean, stats), "BatchNorm statistics were updated"
    assert model.training and model[1].training and model[3].training
    model.eval()
    torch.testing.assert_close(
        curves, evaluate.region_perturbation(model, x, relevance, [0, 1], patch=4)
    )
