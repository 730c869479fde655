"""A max pool divides for the ε convolution below it (``graph.layers.Shares``).

The convolution's ε division reads the relevance spread to the pool's winners and its own
output, both at the pool's input size; the pool has the same numbers at its output size (a
window's winner is the pool's output). Oracles: the same analysis with the division where it
was (the plan's ``_divide_at_max_pools`` off) — bitwise for pools whose windows do not overlap,
to rounding where an input wins two windows (its two shares are summed after the division, not
before) — the LRP-0 identity (gradient × input, float64), and the live-bytes ledger for the
memory it frees.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.live_bytes import LiveBytes
from tests.oracles.nets import pooled_vgg, seeded_normal
from torch import nn

import relprop
from relprop.graph import layers
from relprop.graph.plan import PlanBuilder


def _stem_like(dtype=torch.float32) -> nn.Module:
    """ResNet's stem: convolution, BatchNorm, ReLU, an overlapping 3×3 stride-2 pool."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).eval()  # fmt: skip
    model[1].running_mean.uniform_(-0.3, 0.3)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


def _analyze(monkeypatch, make, x, divided: bool, method="lrp.epsilon", **kwargs):
    """Relevance and how many convolutions went straight to their transposed product."""
    shares = []
    with monkeypatch.context() as patch:
        if not divided:
            patch.setattr(PlanBuilder, "_divide_at_max_pools", lambda self, steps: None)
        transposed = layers.WeightLayer._transposed_shares

        def counted(self, saved, relevance):
            shares.append(tuple(relevance.shape))
            return transposed(self, saved, relevance)

        patch.setattr(layers.WeightLayer, "_transposed_shares", counted)
        relevance = relprop.create_analyzer(method, make(x.dtype), **kwargs).analyze(x)
    return relevance, shares


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_overlapping_pools_give_the_same_bits(monkeypatch, dtype):
    x = seeded_normal((3, 3, 16, 16), seed=4, dtype=dtype)
    divided, shares = _analyze(monkeypatch, pooled_vgg, x, divided=True)
    kept, none = _analyze(monkeypatch, pooled_vgg, x, divided=False)
    assert torch.equal(divided, kept)
    # Every pool divides for the convolution below it: the first two receive c · out from the
    # ε convolution above them, the last one formed relevance through the flattening and the
    # dense layer.
    assert shares == [(3, 16, 4, 4), (3, 16, 8, 8), (3, 8, 16, 16)]
    assert none == []


def test_overlapping_pool_sums_the_shares_to_rounding(monkeypatch):
    x = seeded_normal((2, 3, 32, 32), seed=5, dtype=torch.float32)
    divided, shares = _analyze(monkeypatch, _stem_like, x, divided=True)
    kept, _ = _analyze(monkeypatch, _stem_like, x, divided=False)
    assert shares == [(2, 8, 16, 16)]
    torch.testing.assert_close(divided, kept, rtol=1e-5, atol=1e-6 * float(kept.abs().max()))


@pytest.mark.parametrize("make", [pooled_vgg, _stem_like], ids=["vgg_like", "stem"])
def test_lrp0_through_divided_pools_is_gradient_times_input(monkeypatch, make):
    x = seeded_normal((2, 3, 32, 32) if make is _stem_like else (2, 3, 16, 16), seed=6)
    model = make(torch.float64)
    selection = model(x).argmax(dim=1)
    relevance, shares = _analyze(monkeypatch, make, x, True, "lrp.epsilon", epsilon=0.0)
    assert shares
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf).gather(1, selection.view(-1, 1)).sum(), leaf)
    # Analyzed with max_activation, which is the argmax selection above.
    torch.testing.assert_close(relevance, grad * x, rtol=1e-10, atol=1e-12)


def test_the_layer_under_a_pool_keeps_nothing_of_its_output(monkeypatch):
    # The convolutions under the pools keep nothing of their outputs for the relevance pass (the
    # second's: 8 channels at 16×16, batch 32, 262144 bytes in float32; the others' a quarter
    # and a sixteenth of that); the pools keep their outputs, which the layers above them keep
    # anyway. The ledger's peak drops by more than the largest of them (458752 bytes).
    x = seeded_normal((32, 3, 16, 16), seed=7, dtype=torch.float32)

    def peak(divided: bool) -> int:
        memory = LiveBytes()
        with memory:
            _analyze(monkeypatch, pooled_vgg, x, divided)
        return memory.peak

    assert peak(True) <= peak(False) - 32 * 8 * 16 * 16 * 4


def test_a_layer_whose_pool_did_not_divide_computes_its_output_again(monkeypatch):
    # The layer drops its output where its mark took; should the pool above not divide for it
    # all the same (here: the pool's forward made to miss the mark), its ε relevance op computes
    # the output again from its input, and the relevance is the same.
    x = seeded_normal((2, 3, 16, 16), seed=10, dtype=torch.float32)
    expected, _ = _analyze(monkeypatch, pooled_vgg, x, divided=False)
    forward = layers.MaxPoolLayer.forward

    def blind(self, args, kwargs):
        out, saved = forward(self, args, kwargs)
        return out, (*saved[:-1], None)

    monkeypatch.setattr(layers.MaxPoolLayer, "forward", blind)
    relevance, shares = _analyze(monkeypatch, pooled_vgg, x, divided=True)
    assert shares == []
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-7)


def test_the_plan_lets_a_pool_divide_only_for_a_layer_it_alone_reads():
    class TwoReaders(nn.Module):
        """The ReLU's output goes to the pool and to a strided convolution beside it."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.side = nn.Conv2d(4, 4, 2, stride=2)
            self.head = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            a = torch.relu(self.conv(x))
            return self.head((self.pool(a) + self.side(a)).flatten(1))

    def flagged(model, **kwargs):
        plan = relprop.create_analyzer("lrp.epsilon", model, **kwargs).plan
        return [
            s.path for s in plan.steps
            if isinstance(s.layer, layers.WeightLayer) and s.layer.divides_at_max_pool
        ]  # fmt: skip

    # Each convolution a pool reads (the first does not feed one).
    assert flagged(pooled_vgg()) == ["2", "7", "10"]
    assert flagged(_stem_like()) == ["0"]  # through the folded BatchNorm
    assert flagged(TwoReaders().eval()) == []
    # z⁺ and γ convolutions are flagged too, and divide at the winners themselves
    # (test_divided_at_winners.py); α-β's are not.
    alpha_beta = relprop.create_analyzer(
        "lrp", pooled_vgg(), composite=relprop.composites.EpsilonAlpha2Beta1()
    ).plan
    assert not any(
        isinstance(s.layer, layers.WeightLayer) and s.layer.divides_at_max_pool
        for s in alpha_beta.steps
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_backends_keep_the_division_in_the_layer(monkeypatch, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    x = seeded_normal((2, 3, 16, 16), seed=8, dtype=torch.float32)
    relevance, shares = _analyze(monkeypatch, pooled_vgg, x, divided=True)
    assert shares == []
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    native, _ = _analyze(monkeypatch, pooled_vgg, x, divided=True)
    torch.testing.assert_close(relevance, native, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_non_overlapping_pools_give_the_same_bits(monkeypatch, dtype):
    # On CUDA the convolution's bias goes into its fused ReLU (relprop::bias_relu_), whose
    # output is still the saved z the pool divides by.
    x = seeded_normal((3, 3, 16, 16), seed=4, dtype=torch.float32).to("cuda", dtype)

    def make(dtype):
        return pooled_vgg(dtype).cuda()

    divided, shares = _analyze(monkeypatch, make, x, divided=True)
    kept, _ = _analyze(monkeypatch, make, x, divided=False)
    assert shares == [(3, 16, 4, 4), (3, 16, 8, 8), (3, 8, 16, 16)]
    assert torch.equal(divided, kept)


def test_torch_compile_gives_the_same_relevance(monkeypatch):
    x = seeded_normal((2, 3, 16, 16), seed=9, dtype=torch.float32)
    shares = []
    transposed = layers.WeightLayer._transposed_shares

    def counted(self, saved, relevance):
        shares.append(tuple(relevance.shape))
        return transposed(self, saved, relevance)

    monkeypatch.setattr(layers.WeightLayer, "_transposed_shares", counted)
    analyzer = relprop.create_analyzer("lrp.epsilon", pooled_vgg())
    eager = analyzer.analyze(x)
    eager_shares = len(shares)
    compiled = torch.compile(analyzer.analyze, dynamic=False)(x)
    assert eager_shares == 3 and len(shares) == 6  # traced through the same path
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
