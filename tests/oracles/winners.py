"""One set of max-pool winners for the runs that a whole-model test compares.

A max pool hands all of a window's relevance to its largest input. Two entries of a window that
are equal to within fp32 rounding can swap places between a float32 and a float64 forward, and the
window's relevance then lands on the other entry: on VGG16 at 224² (ImageNet-normalised uniform
input, EpsilonPlusFlat, CPU reference path) one to three such swaps across the five pools put the
input relevance 7e-5 to 2.8e-3 off float64, depending only on the order in which the convolutions
sum (their output channels permuted, the function unchanged). Which fp32 path swaps which windows
is chance, so a fp32-against-float64 comparison of two paths measures that chance, not their
arithmetic. The runs compared share the winners of the run under test: it records them, the
float64 truth and the fp32 reference replay them (their forward is otherwise their own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from torch import Tensor

from relprop.graph.layers import MaxPoolLayer


class Winners:
    """The indices of each max pool of one analysis, in the order its forward ran them."""

    def __init__(self) -> None:
        self.indices: list[Tensor] = []

    @contextlib.contextmanager
    def recorded(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Inside the block the analyses' max pools keep their indices here (the last analysis's
        are kept)."""
        original = MaxPoolLayer.forward
        self.indices = []

        def forward(layer, args, kwargs):
            out, saved = original(layer, args, kwargs)
            self.indices.append(saved[0])
            return out, saved

        with monkeypatch.context() as patch:
            patch.setattr(MaxPoolLayer, "forward", forward)
            yield

    @contextlib.contextmanager
    def replayed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Inside the block each analysis's max pools pick the recorded winners: the output is the
        input at those positions (per plane, as ``return_indices`` numbers them). A model without
        max pools runs as it is."""
        original = MaxPoolLayer.forward
        position = [0]

        def forward(layer, args, kwargs):
            assert self.indices, "a max pool that the recorded analysis did not have"
            indices = self.indices[position[0] % len(self.indices)]
            position[0] += 1

            def pool(x: Tensor) -> tuple[Tensor, Tensor]:
                assert x.shape[:2] == indices.shape[:2], "replayed on another model"
                index = indices.to(x.device).flatten(2)
                return x.flatten(2).gather(2, index).view(indices.shape), indices.to(x.device)

            saved_pool = layer.pool
            layer.pool = pool
            try:
                return original(layer, args, kwargs)
            finally:
                layer.pool = saved_pool

        with monkeypatch.context() as patch:
            patch.setattr(MaxPoolLayer, "forward", forward)
            yield
