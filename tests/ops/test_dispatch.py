"""Which implementation ``layer_backend`` picks: native by default, ``RELPROP_BACKEND`` forces."""

from __future__ import annotations

import contextlib

import pytest
import torch

from relprop.ops import _backend


def test_native_by_default(monkeypatch):
    # Also on CUDA: the fused Triton kernels lost to the cuDNN composition (gpu_h100.md).
    monkeypatch.delenv("RELPROP_BACKEND", raising=False)
    assert _backend.layer_backend() == "native"


@pytest.mark.parametrize("forced", [b for b in _backend.BACKENDS if b != "auto"])
def test_environment_overrides_the_choice(monkeypatch, forced):
    monkeypatch.setenv("RELPROP_BACKEND", f" {forced.upper()} ")
    assert _backend.layer_backend() == forced


def test_a_layers_measured_choice_overrides_the_environment(monkeypatch):
    """Under auto each layer names its measured backend around its op calls
    (tests/analyzers/test_auto_backend.py); outside them an op runs natively."""
    monkeypatch.setenv("RELPROP_BACKEND", "auto")
    assert _backend.forced_backend() == "auto"
    assert _backend.layer_backend() == "native"
    with _backend.running_on("triton"):
        assert _backend.layer_backend() == "triton"
        with _backend.running_on("reference"):
            assert _backend.layer_backend() == "reference"
        assert _backend.layer_backend() == "triton"
    assert _backend.layer_backend() == "native"


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


def _recorders():
    calls = []

    def op(*args):
        calls.append("op")
        return args[0] * 2

    def kernel(*args):
        calls.append("kernel")
        return args[0] * 2

    return calls, op, kernel


def test_eager_calls_skip_the_dispatcher():
    """In eager mode without autograd the registered kernel is called as a function."""
    calls, op, kernel = _recorders()
    with torch.no_grad():
        _backend.call_op(op, kernel, torch.ones(3), [torch.ones(2)], "epsilon")
    assert calls == ["kernel"]


def test_tracing_and_autograd_go_through_the_op():
    """A dispatch mode (fake tensors, FLOP counters), autograd or a tensor subclass needs the op;
    torch.compile is covered by tests/analyzers/test_backends.py."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls, op, kernel = _recorders()
    _backend.call_op(op, kernel, torch.ones(3))  # grad mode is on here
    with torch.no_grad(), Passthrough():
        _backend.call_op(op, kernel, torch.ones(3))
    with torch.no_grad():
        _backend.call_op(op, kernel, torch.ones(3).as_subclass(_Marked))
    assert calls == ["op", "op", "op"]


class _Marked(torch.Tensor):
    pass


def test_direct_kernel_call_equals_the_op():
    from relprop.ops import conv

    torch.manual_seed(5)
    x = torch.randn(2, 3, 9, 7).relu()
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    geometry = ([1, 2], [1, 1], [1, 1], 1)
    with torch.no_grad():
        saved = conv.conv2d_forward(x, w, b, *geometry, "gamma", [0.25, 1e-6])
        relevance = torch.randn_like(saved[0])
        args = (x, w, b, saved, relevance, *geometry, "gamma", [0.25, 1e-6], None, True)
        direct = _backend.call_op(conv.conv2d_relevance, conv.relevance_kernel, *args)
        through_op = conv.conv2d_relevance(*args)
    assert torch.equal(direct, through_op)


def test_profiles_name_the_op_called_as_a_function():
    """Skipping the dispatcher must not hide relprop's ops from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from relprop.ops import conv as conv_ops

    x, weight = torch.rand(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    args = (x, weight, None, [1, 1], [1, 1], [1, 1], 1, "epsilon", [1e-6])
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        _backend.call_op(conv_ops.conv2d_forward, conv_ops.forward_kernel, *args)
    keys = [event.key for event in prof.key_averages()]
    assert "relprop::conv2d_forward" in keys, keys


class _GpuDriverStandIn:
    """Named as Triton's own CUDA driver is: what a GPU machine has active."""

    __module__ = "triton.backends.nvidia.driver"


@pytest.mark.parametrize("machine", ["no GPU", "beside a GPU"])
def test_triton_on_the_cpu_without_the_interpreter_says_what_to_do(monkeypatch, machine):
    """Forced onto Triton with CPU tensors outside the interpreter, an analysis fails with what
    the kernels need and the way out, not Triton's "0 active drivers ([]). There should only be
    one." (no GPU) or "Pointer argument (at 0) cannot be accessed from Triton" (a GPU machine,
    where Triton's CUDA driver is active). The suite itself runs Triton interpreted on a CPU, so
    that mode is patched out."""
    from tests.oracles.nets import tiny_cnn

    import relprop
    from relprop._kernels.triton import _common

    monkeypatch.setattr(_common, "INTERPRETED", False)
    monkeypatch.setenv("RELPROP_BACKEND", "triton")
    analyzer = relprop.create_analyzer("lrp.epsilon", tiny_cnn())
    beside_a_gpu = machine == "beside a GPU"
    driver = (
        _common.stand_in_driver(_GpuDriverStandIn()) if beside_a_gpu else contextlib.nullcontext()
    )
    with driver, pytest.raises(ValueError) as raised:
        analyzer.analyze(torch.randn(1, 3, 8, 7))
    message = str(raised.value)
    assert "CUDA tensors" in message and "TRITON_INTERPRET=1" in message, message
    assert "native" in message and "cpu" in message, message
