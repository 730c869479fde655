"""``benchmarks/peak_steps.py`` finds where a call's memory peaks.

On the CPU it reads the tests' storage ledger, so its numbers are exact and repeatable: the
highest step's peak must be the whole call's peak measured in a run of its own, for a gradient
(every allocation happens inside an aten op, each one a step) and for an LRP analysis on
VGG16/ResNet50 (whose peak falls inside a plan step); a recorder that missed allocations, or
measured from the wrong baseline, would report a lower or higher number than the call's.
"""

from __future__ import annotations

import pytest
from tests._benchmarks import load_benchmark


@pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
@pytest.mark.parametrize("method", ["gradient", "lrp.epsilon"])
def test_the_highest_step_peak_is_the_calls_peak(model_name, method):
    peak_steps = load_benchmark("peak_steps.py")
    peak, steps = peak_steps.measure(model_name, method, "cpu", 2, 32, "float32")
    assert peak > 0
    assert max(s.peak for s in steps) == peak
    assert all(0 <= s.before <= s.peak for s in steps)
    names = " ".join(s.name for s in steps)
    if method == "gradient":
        assert "convolution_backward #1" in names
    else:
        # Named by the plan's module paths, forward and relevance apart.
        first = "features.0" if model_name == "vgg16" else "conv1"
        assert f"{first} (forward)" in names and f"{first} (relevance)" in names
    report = peak_steps.report(model_name, method, peak, steps, top=3)
    assert report.count("\n| ") == 2 + 3  # header, rule, three steps
