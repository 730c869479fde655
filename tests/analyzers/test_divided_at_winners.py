"""A z⁺ or γ convolution under a max pool divides at the pool's winners (``graph.layers.Unspread``).

The convolution's one division reads the relevance spread to the pool's winners and a product it
makes itself (``W⁺x``, ``(W + γW⁺)x``), at the pool's input size; relevance is zero but at the
winners, so the layer reads its product there alone and divides at the pool's output size — γ's
sign test reads the pool's output, which is ``z`` at a winner, and the layer keeps nothing of
its output from the forward. Oracles: the same analysis with the division where it was (the
plan's ``_divide_at_max_pools`` off) — bitwise for pools whose windows do not overlap, to rounding
where an input wins two windows — the reference backend in float64, Zennit's γ and z⁺ rules
(``tests/analyzers/test_zennit.py``'s VGG16 rows run EpsilonPlusFlat and EpsilonGammaBox through
this path at every pool), and the live-bytes ledger for the memory it frees.
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
from relprop.ops import pool as pool_ops

METHODS = {
    "z_plus": ("lrp.z_plus", {}),
    "gamma": ("lrp.gamma", {}),
    "EpsilonPlusFlat": ("lrp.epsilon_plus_flat", {}),
    "EpsilonGammaBox": ("lrp.epsilon_gamma_box", {"low": -3.0, "high": 3.0}),
}


def _overlapping(dtype=torch.float32) -> nn.Module:
    """A ResNet-like stem after a first layer: convolution on a ReLU's output, BatchNorm, ReLU,
    an overlapping 3×3 stride-2 pool (an input may win two windows)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).eval()  # fmt: skip
    model[3].running_mean.uniform_(-0.3, 0.3)
    model[3].running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


def _analyze(monkeypatch, make, x, divided: bool, method="gamma", composite=None):
    """Relevance and the pool outputs' shapes at which a layer divided."""
    calls = []
    name, kwargs = METHODS[method]
    with monkeypatch.context() as patch:
        if not divided:
            patch.setattr(PlanBuilder, "_divide_at_max_pools", lambda self, steps: None)
        at_winners = layers.WeightLayer._relevance_at_winners

        def counted(self, saved, pooled):
            calls.append(tuple(pooled.output.shape))
            return at_winners(self, saved, pooled)

        patch.setattr(layers.WeightLayer, "_relevance_at_winners", counted)
        if composite is not None:
            analyzer = relprop.create_analyzer("lrp", make(x.dtype), composite=composite)
        else:
            analyzer = relprop.create_analyzer(name, make(x.dtype), **kwargs)
        relevance = analyzer.analyze(x)
    return relevance, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", list(METHODS))
def test_non_overlapping_pools_give_the_same_bits(monkeypatch, method, dtype):
    x = seeded_normal((3, 3, 16, 16), seed=4, dtype=dtype)
    divided, calls = _analyze(monkeypatch, pooled_vgg, x, True, method)
    kept, none = _analyze(monkeypatch, pooled_vgg, x, False, method)
    assert torch.equal(divided, kept)
    # Every pool's layer divides at its winners (its input is a ReLU's output): the first two
    # pools get c · out from the layer above them, the last one formed relevance through the
    # flattening and the dense layer. The first convolution's input is the image: not there.
    assert calls == [(3, 16, 2, 2), (3, 16, 4, 4), (3, 8, 8, 8)]
    assert none == []


@pytest.mark.parametrize("method", ["z_plus", "gamma"])
def test_overlapping_pool_sums_the_shares_to_rounding(monkeypatch, method):
    x = seeded_normal((2, 3, 16, 16), seed=5, dtype=torch.float32)
    divided, calls = _analyze(monkeypatch, _overlapping, x, True, method)
    kept, _ = _analyze(monkeypatch, _overlapping, x, False, method)
    assert calls == [(2, 8, 8, 8)]
    torch.testing.assert_close(divided, kept, rtol=1e-5, atol=1e-6 * float(kept.abs().max()))


@pytest.mark.parametrize("make", [pooled_vgg, _overlapping], ids=["vgg_like", "overlapping"])
@pytest.mark.parametrize("method", list(METHODS))
def test_float64_matches_the_reference_backend(monkeypatch, make, method):
    # The reference backend runs each rule's formula as written, the division in the layer at its
    # output size (its forward sets no mark).
    x = seeded_normal((2, 3, 16, 16), seed=6, dtype=torch.float64)
    divided, calls = _analyze(monkeypatch, make, x, True, method)
    assert calls
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    reference, none = _analyze(monkeypatch, make, x, True, method)
    assert none == []
    torch.testing.assert_close(divided, reference, rtol=1e-10, atol=1e-13)


def test_gamma_under_a_pool_keeps_nothing_of_its_output(monkeypatch):
    # γ read z for its sign test; at a winner z is the pool's output, which the layer above keeps
    # anyway. The second convolution's output (8 channels at 16×16, batch 32: 262144 bytes in
    # float32) and the others' (a quarter, a sixteenth of that) are no longer held from the
    # forward to the relevance pass; the ledger's peak drops by more than the largest of them
    # (1423796 → 1139188 bytes). EpsilonGammaBox, as on VGG16: with γ on the image too, the
    # peak is the first layer's (two divisions for x⁺ and x⁻), which this does not change.
    x = seeded_normal((32, 3, 16, 16), seed=7, dtype=torch.float32)

    def peak(divided: bool) -> int:
        memory = LiveBytes()
        with memory:
            _analyze(monkeypatch, pooled_vgg, x, divided, "EpsilonGammaBox")
        return memory.peak

    assert peak(True) <= peak(False) - 32 * 8 * 16 * 16 * 4


@pytest.mark.parametrize("method", ["z_plus", "gamma"])
def test_a_layer_whose_pool_did_not_hand_it_unspread_relevance_gets_the_same(monkeypatch, method):
    # The layer drops z where its mark took; should the pool above spread its relevance all the
    # same (its forward made to miss the mark), γ computes z again from its input — without the
    # ReLU the forward fused, but relevance is zero wherever the ReLU zeroed z (plan.py fuses it
    # only then) — and the relevance is the same.
    x = seeded_normal((2, 3, 16, 16), seed=10, dtype=torch.float32)
    expected, _ = _analyze(monkeypatch, pooled_vgg, x, False, method)
    forward = layers.MaxPoolLayer.forward

    def blind(self, args, kwargs):
        out, saved = forward(self, args, kwargs)
        return out, (*saved[:-1], None)

    monkeypatch.setattr(layers.MaxPoolLayer, "forward", blind)
    relevance, calls = _analyze(monkeypatch, pooled_vgg, x, True, method)
    assert calls == []
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-7)


def test_the_plan_flags_z_plus_and_gamma_but_not_alpha_beta():
    def flagged(composite):
        plan = relprop.create_analyzer("lrp", pooled_vgg(), composite=composite).plan
        return [
            s.path for s in plan.steps
            if isinstance(s.layer, layers.WeightLayer) and s.layer.divides_at_max_pool
        ]  # fmt: skip

    assert flagged(relprop.composites.EpsilonPlus()) == ["2", "7", "10"]
    assert flagged(relprop.composites.EpsilonGammaBox(low=-3.0, high=3.0)) == ["2", "7", "10"]
    # α-β divides twice, by W⁺x and W⁻x: no single product to read at the winners.
    assert flagged(relprop.composites.EpsilonAlpha2Beta1()) == []


def test_a_layer_on_mixed_sign_input_keeps_its_division(monkeypatch):
    # A pool on the first layer: the plan flags the layer (it cannot know its input's signs),
    # but the image has both signs (x⁺ and x⁻ terms, two divisions), so the forward leaves the
    # division in the layer.
    def first_layer_pool(dtype):
        torch.manual_seed(2)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 5),
        ).eval().to(dtype)  # fmt: skip

    x = seeded_normal((2, 3, 8, 8), seed=11, dtype=torch.float64)
    plan = relprop.create_analyzer("lrp.gamma", first_layer_pool(x.dtype)).plan
    (first,) = [s for s in plan.steps if s.path == "0"]
    assert first.layer.divides_at_max_pool
    divided, calls = _analyze(monkeypatch, first_layer_pool, x, True, "gamma")
    kept, _ = _analyze(monkeypatch, first_layer_pool, x, False, "gamma")
    assert calls == []
    assert torch.equal(divided, kept)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_backends_keep_the_division_in_the_layer(monkeypatch, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    x = seeded_normal((2, 3, 16, 16), seed=8, dtype=torch.float32)
    relevance, calls = _analyze(monkeypatch, pooled_vgg, x, True, "EpsilonGammaBox")
    assert calls == []
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    native, _ = _analyze(monkeypatch, pooled_vgg, x, True, "EpsilonGammaBox")
    torch.testing.assert_close(relevance, native, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (lambda t: nn.functional.max_pool2d(t, 2, return_indices=True), (2, 3, 8, 10)),
        (lambda t: nn.functional.max_pool2d(t, 3, 2, 1, return_indices=True), (2, 3, 9, 7)),
        (lambda t: nn.functional.adaptive_max_pool2d(t, (3, 2), return_indices=True), (1, 4, 7, 9)),
        (lambda t: nn.functional.max_pool1d(t, 3, 2, return_indices=True), (2, 3, 11)),
    ],
    ids=["2x2", "3x3-stride2-pad1", "adaptive", "1d"],
)
def test_gather_winners_reads_the_pools_own_values(pool, shape):
    # The values at the winners are what the pool picked: gathering the pool's input at its
    # indices gives its output, and a spread followed by a gather gives back each winner's value
    # (each window's value once, for a window whose winner no other window shares).
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    out, indices = pool(x)
    assert torch.equal(pool_ops.gather_winners(x, indices), out)
    with pytest.raises(ValueError, match="not of one pool's input and output"):
        pool_ops.gather_winners(x[:, :1], indices)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["EpsilonPlusFlat", "EpsilonGammaBox"])
def test_cuda_non_overlapping_pools_give_the_same_bits(monkeypatch, method, dtype):
    # On CUDA a convolution's bias goes into the division that reads its product (the division's
    # denominator_bias, here at the pool's output size).
    x = seeded_normal((3, 3, 16, 16), seed=4, dtype=torch.float32).to("cuda", dtype)

    def make(dtype):
        return pooled_vgg(dtype).cuda()

    divided, calls = _analyze(monkeypatch, make, x, True, method)
    kept, _ = _analyze(monkeypatch, make, x, False, method)
    assert calls == [(3, 16, 2, 2), (3, 16, 4, 4), (3, 8, 8, 8)]
    assert torch.equal(divided, kept)


def test_torch_compile_gives_the_same_relevance(monkeypatch):
    x = seeded_normal((2, 3, 16, 16), seed=9, dtype=torch.float32)
    calls = []
    at_winners = layers.WeightLayer._relevance_at_winners

    def counted(self, saved, pooled):
        calls.append(tuple(pooled.output.shape))
        return at_winners(self, saved, pooled)

    monkeypatch.setattr(layers.WeightLayer, "_relevance_at_winners", counted)
    analyzer = relprop.create_analyzer("lrp.gamma", pooled_vgg())
    eager = analyzer.analyze(x)
    eager_calls = len(calls)
    compiled = torch.compile(analyzer.analyze, dynamic=False)(x)
    assert eager_calls == 3 and len(calls) == 6  # traced through the same path
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_the_memory_budget_counts_relevance_held_at_a_pools_size():
    # A step that may run in chunks asks what the pass holds outside the forward's saved
    # tensors (graph/program._HeldBytes): relevance waiting unspread (or as a pool's shares) is
    # counted by its tensors, at the pool's output size.
    from relprop.graph.program import _HeldBytes

    out, indices = nn.functional.max_pool2d(torch.rand(2, 4, 8, 8), 2, return_indices=True)
    coefficient = torch.rand(2, 4, 4, 4)
    held = _HeldBytes({}, [])
    unspread = layers.Unspread(
        layers.InputProduct(coefficient, out), out, indices, torch.Size((2, 4, 8, 8)), None
    )
    assert held.outside([unspread]) == 2 * coefficient.nbytes
    assert held.outside([layers.Unspread(coefficient, out, indices, out.shape, None)]) == (
        coefficient.nbytes
    )
    shares = layers.Shares(coefficient, lambda: None, 0.0)
    assert held.outside([shares]) == coefficient.nbytes


def _one_d(dtype=torch.float32, overlapping=False) -> nn.Module:
    """A 1-D VGG (a signal, not an image): the same steps with Conv1d and MaxPool1d."""
    torch.manual_seed(0)
    last = nn.MaxPool1d(3, 2, 1) if overlapping else nn.MaxPool1d(2)
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool1d(2), nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), last, nn.Flatten(),
        nn.Linear(16 * 8, 5),
    ).eval().to(dtype)  # fmt: skip


@pytest.mark.parametrize("overlapping", [False, True], ids=["2", "3-stride2-pad1"])
@pytest.mark.parametrize("method", ["epsilon", *METHODS])
def test_one_d_convolutions_divide_at_their_pools_too(monkeypatch, method, overlapping):
    # ε's pool divides for it (layers.Shares), z⁺'s and γ's layers divide at the winners: the
    # same bits as the division in the layer where windows do not overlap, to rounding where
    # they do.
    x = seeded_normal((3, 3, 32), seed=12, dtype=torch.float64)
    shares = []
    transposed = layers.WeightLayer._transposed_shares

    def counted(self, saved, relevance):
        shares.append(tuple(relevance.shape))
        return transposed(self, saved, relevance)

    monkeypatch.setattr(layers.WeightLayer, "_transposed_shares", counted)

    def make(dtype):
        return _one_d(dtype, overlapping)

    if method == "epsilon":
        monkeypatch.setitem(METHODS, "epsilon", ("lrp.epsilon", {}))
    divided, calls = _analyze(monkeypatch, make, x, True, method)
    kept, _ = _analyze(monkeypatch, make, x, False, method)
    if method == "epsilon":  # the pools' shares, spread to their convolutions' outputs
        assert shares == [(3, 16, 16), (3, 8, 32)] and calls == []
    else:  # the pools' outputs
        assert calls == [(3, 16, 8), (3, 8, 16)] and shares == []
    if overlapping:
        torch.testing.assert_close(divided, kept, rtol=1e-10, atol=1e-14)
    else:
        assert torch.equal(divided, kept)
