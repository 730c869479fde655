"""Batch chunking of large relevance steps: as far as the memory asks, no further.

α-β (and z⁺/α-β/γ on a first layer) hold several transients of a step's size at once; above
``_CHUNK_MIN_BYTES`` such a step may run chunk by chunk. Each chunk costs a launch per op and
makes its products smaller, so a Program lets a step use the memory its relevance pass has
already freed (the saved tensors of the layers above) and chunks only what does not fit. The
memory is measured by an independent oracle: every storage allocated under a dispatch mode.
"""

from __future__ import annotations

import pytest
import torch
from tests.oracles.live_bytes import LiveBytes
from torch import nn

import relprop
from relprop.graph import program as program_module
from relprop.ops import _layer_rules


def _deep_net() -> nn.Module:
    """Equal convolutions: each step of the pass frees one activation (its input, which the
    step below saved as its pre-activation), so the steps near the output have little freed
    memory to run in and must chunk, and the ones further down have more with every step. The
    dense layer's weight is larger than any activation: the pass does not free it, and a
    budget that counted it would let the steps near the output run unchunked."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(8):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 64 * 64, 64)).eval()


def _analysis(monkeypatch, chunking: str):
    """Relevance, peak bytes of the relevance pass above what it began with, and the chunk
    count of each chunkable step (output side first): ``budget`` as the engine runs,
    ``always`` with every large step at the most chunks, ``never`` unchunked."""
    monkeypatch.setattr(_layer_rules, "_CHUNK_MIN_BYTES", 1 << 62 if chunking == "never" else 1024)
    if chunking == "always":
        monkeypatch.setattr(
            program_module, "transient_budget", lambda _: _layer_rules.transient_budget(None)
        )
    counts = []
    batch_chunks = _layer_rules._batch_chunks

    def recorded(x, relevance):
        chunks = batch_chunks(x, relevance)
        counts.append(len(chunks))
        return chunks

    monkeypatch.setattr(_layer_rules, "_batch_chunks", recorded)
    analyzer = relprop.create_analyzer(
        "lrp", _deep_net(), composite=relprop.composites.EpsilonAlpha2Beta1()
    )
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    analyzer.analyze(x)  # planning and first-call caches are not the pass's memory
    counts.clear()
    memory = LiveBytes()
    relevance_pass = program_module.Program._relevance
    start = {}

    def measured(self, *args):
        start["live"] = memory.live
        memory.reset_peak()
        return relevance_pass(self, *args)

    monkeypatch.setattr(program_module.Program, "_relevance", measured)
    with memory:
        relevance = analyzer.analyze(x)
    return relevance, memory.peak - start["live"], counts


def test_steps_are_chunked_only_where_the_pass_has_not_freed_their_memory(monkeypatch):
    with monkeypatch.context() as patch:
        always, always_peak, always_counts = _analysis(patch, "always")
    with monkeypatch.context() as patch:
        never, never_peak, never_counts = _analysis(patch, "never")
    budget, budget_peak, budget_counts = _analysis(monkeypatch, "budget")
    assert always_counts == [8] * 9 and never_counts == [1] * 9
    # The layer below the dense one gets the most chunks (nothing freed yet), the first layers
    # none (the pass above them freed more than they need), and the count falls in between
    # (8, 8, 8, 4, 2, 2, 1, 1, 1 here).
    assert budget_counts == sorted(budget_counts, reverse=True)
    assert budget_counts[0] == 8 and budget_counts[-1] == 1
    assert any(1 < count < 8 for count in budget_counts)
    # Chunking matters here (unchunked, the pass needs far more), and chunking by the budget
    # needs no more than chunking everything.
    assert never_peak > 1.5 * always_peak
    assert budget_peak <= always_peak
    # Same numbers, up to float32 products over other batch sizes (the chunks' sums are exact;
    # rules/ops tests hold chunked steps to the float64 reference).
    atol = 1e-4 * never.abs().max().item()
    torch.testing.assert_close(budget, never, rtol=1e-4, atol=atol)
    torch.testing.assert_close(always, never, rtol=1e-4, atol=atol)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (None, 8),
        (1 << 40, 1),
        ((64 << 20) + 2048, 1),
        (64 << 20, 2),
        (48 << 20, 2),
        (3 << 20, 4),
        (0, 4),
        (-5, 4),
    ],
)
def test_chunk_count_follows_the_budget(budget, expected):
    # A 64-sample step with a 16 MiB output, holding 4 transients of that size (64 MiB) and its
    # 2 KiB result against the budget, which is never taken below the 16 MiB from which steps
    # chunk at all. No budget: the most chunks.
    x = torch.empty(64, 2**16)
    with _layer_rules.transient_budget(budget):
        assert len(_layer_rules._batch_chunks(x[:, :8], x)) == expected
    assert _layer_rules._transient_budget.get() is None
