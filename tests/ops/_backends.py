"""The implementations the op tests run: native, reference, and the CUDA kernels.

The CUDA kernels run on a GPU where there is one and, on every machine, compiled for the CPU
(tests/cuda_emulation): ``cuda-emulated`` sends the op through its CUDA branch with CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from tests.cuda_emulation import emulate_cuda

from relprop import _native

NATIVE = _native.native_available()
CUDA = torch.cuda.is_available()
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"relprop._C did not load ({_native.native_error()})"
)
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

# Every comparison runs through the forced native kernels (CPU twins), the references and the
# CUDA kernels' sources run on the CPU.
BACKENDS = [pytest.param("native", marks=needs_native), "reference", "cuda-emulated"]
# The compiled kernels only: the CPU twins and the CUDA kernels run on the CPU.
KERNELS = [pytest.param("native", marks=needs_native), "cuda-emulated"]
# Where the CUDA kernels run: the device, and their emulation on the CPU.
CUDA_KERNELS = [pytest.param("cuda", marks=needs_cuda), "cuda-emulated"]


# The instruction sets the CPU twins' element-wise loops are compiled for and this machine runs
# (csrc/include/relprop/cpu_isa.h): "baseline" everywhere, "avx2" on x86 machines that have it.
NATIVE_ISAS = list(_native.native().cpu_isas()) if NATIVE else []


class _CpuIsaSwitch:
    """``isa``: the loops' instruction set, as an attribute, so that ``monkeypatch.setattr``
    sets it for one test and puts the previous one back after it."""

    @property
    def isa(self) -> str:
        return _native.native().cpu_isa()

    @isa.setter
    def isa(self, name: str) -> None:
        _native.native().set_cpu_isa(name)


def use_cpu_isa(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CPU twins' element-wise loops with instruction set ``name`` for one test."""
    monkeypatch.setattr(_CpuIsaSwitch(), "isa", name)


def use_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Make the ops take implementation ``name`` for one test; the device its tensors go to."""
    if name == "cuda-emulated":
        emulate_cuda(monkeypatch)
        return torch.device("cpu")
    if name == "cuda" and not _native.cuda_compiled():
        pytest.fail("relprop._C was built without its CUDA kernels")
    monkeypatch.setenv("RELPROP_BACKEND", "native" if name == "cuda" else name)
    return torch.device("cuda" if name == "cuda" else "cpu")
