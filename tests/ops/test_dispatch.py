"""Which implementation ``layer_backend`` picks: native by default, ``RELPROP_BACKEND`` forces."""

from __future__ import annotations

import pytest
import torch

from relprop.ops import _backend


def test_native_by_default(monkeypatch):
    # Also on CUDA: the fused Triton kernels lost to the cuDNN composition (gpu_h100.md).
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    assert _backend.layer_backend() == "native"


@pytest.mark.parametrize("forced", _backend.BACKENDS)
def test_environment_overrides_the_choice(monkeypatch, forced):
    monkeypatch.setenv("RELPROP_BACKEND", f" {forced.upper()} ")
    assert _backend.layer_backend() == forced


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="RELPROP_BACKEND='cudnn' is not one of"):
        _backend.layer_backend()


def test_plan_names_the_backend_of_each_layer(monkeypatch):
    import relprop

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    for forced, shown in [(None, "native"), ("reference", "reference")]:
        if forced is None:
            monkeypatch.delenv("RELPROP_BACKEND", raising=False)
        else:
            monkeypatch.setenv("RELPROP_BACKEND", forced)
        plan = str(relprop.create_analyzer("lrp.epsilon", model).plan)
        assert plan.count(f"relprop::linear [{shown}]") == 2, plan
