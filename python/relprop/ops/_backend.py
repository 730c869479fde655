"""Which implementation of an op runs: the reference, the native path, or Triton.

``RELPROP_BACKEND=reference|native|triton`` forces one path (tests and benchmarks use it);
unset, the path measured fastest is taken: native on CPU (MKL-DNN products, the C++ division)
and on CUDA (cuDNN/cuBLAS products, the CUDA division). ``RELPROP_BACKEND=auto`` measures instead,
per layer shape, as ``torch.backends.cudnn.benchmark`` does for convolutions: the first time a
layer meets an input signature, each implementation that can run it is timed on it, and the
fastest runs that signature from then on in this process (:func:`measured_choice`).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch

from relprop import _native
from relprop.errors import BackendError

BACKENDS = ("reference", "native", "triton", "auto")


def forced_backend() -> str | None:
    """The backend named by ``RELPROP_BACKEND``, or None when unset.

    Read afresh by every pass (a test or a benchmark may change it between two analyses), once
    (:func:`one_pass`); outside a pass on every call. The parse of each value seen is kept.
    """
    settings = _pass_settings.get()
    if settings is not None:
        return settings.backend
    return _parse_backend(os.environ.get("RELPROP_BACKEND", ""))


@functools.lru_cache(maxsize=16)
def _parse_backend(raw: str) -> str | None:
    value = raw.strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"RELPROP_BACKEND={value!r} is not one of {', '.join(BACKENDS)}; unset it to let "
            "relprop choose"
        )
    return value


# The backend a layer chose for the op calls it makes (RELPROP_BACKEND=auto), set around them.
_layer_choice: ContextVar[str | None] = ContextVar("relprop_layer_backend", default=None)


def layer_backend() -> str:
    """Backend for the linear and convolution relevance ops, on every device.

    A layer's measured choice (:func:`running_on`, ``RELPROP_BACKEND=auto``) wins, then
    ``RELPROP_BACKEND``. Otherwise the native path, on CPU and on CUDA alike: there it is
    cuDNN/cuBLAS for the products, the fused CUDA division and the lean saved tensors. The fused
    Triton kernels stay available as ``RELPROP_BACKEND=triton`` (or ``auto``); on an H100 they lost
    to that composition at every whole-model setting measured and at all but a few layer shapes
    (``benchmarks/results/gpu_h100.md``), so nothing picks them by default.
    """
    chosen = _layer_choice.get()
    if chosen is not None:
        return chosen
    forced = forced_backend()
    return "native" if forced in (None, "auto") else forced


def running_on(backend: str) -> ContextVarScope:
    """Run the layer ops called inside on ``backend`` (one of reference, native, triton)."""
    return ContextVarScope(_layer_choice, backend)


class ContextVarScope:
    """A context manager that sets a ``ContextVar`` for its block and restores it after.

    A class, not ``contextlib.contextmanager``: a generator-based one costs about 2 µs to enter
    and leave, this 0.4, and the engine enters one or two per layer step (host time a GPU waits
    for, ``benchmarks/test_bench_host.py``).
    """

    __slots__ = ("_token", "_value", "_variable")

    def __init__(self, variable: ContextVar, value: object) -> None:
        self._variable = variable
        self._value = value

    def __enter__(self) -> None:
        self._token = self._variable.set(self._value)

    def __exit__(self, *exc_info: object) -> None:
        self._variable.reset(self._token)


# RELPROP_BACKEND=auto: the choice per layer signature, and what it was based on (seconds).
_CHOICES: dict[Hashable, str] = {}
_MEASUREMENTS: dict[Hashable, dict[str, float]] = {}
# Timed runs per candidate after one untimed run (Triton compiles, cuDNN picks its algorithm).
_TIMED_RUNS = 5


def measured_choice(
    key: Hashable,
    candidates: Sequence[str],
    run: Callable[[str], object],
    device: torch.device,
) -> str:
    """The candidate whose ``run(candidate)`` took least time for ``key``, measured once.

    Each candidate runs once untimed and then :data:`_TIMED_RUNS` times; the median decides. A
    candidate that raises (a Triton kernel that cannot compile for the shape, say) is left out
    with a warning. The choice holds for the rest of the process: analyses stay bitwise
    repeatable after the first, though another process may measure differently where two
    candidates are close.

    Raises
    ------
    relprop.BackendError
        No candidate ran; the first error is chained.
    """
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    times: dict[str, float] = {}
    errors: dict[str, Exception] = {}
    for name in candidates:
        try:
            times[name] = _time_candidate(key, name, lambda name=name: run(name), device)
        except Exception as err:  # noqa: BLE001 — any failure disqualifies the candidate
            errors[name] = err
    if not times:
        first = next(iter(errors.values()))
        raise BackendError(
            f"RELPROP_BACKEND=auto: no implementation could run {key!r} "
            f"({', '.join(f'{n}: {e}' for n, e in errors.items())}); unset RELPROP_BACKEND"
        ) from first
    for name, err in errors.items():
        warnings.warn(
            f"RELPROP_BACKEND=auto: the {name} implementation failed on {key!r} and is not used "
            f"for it ({type(err).__name__}: {err})",
            RuntimeWarning,
            stacklevel=2,
        )
    choice = min(times, key=times.__getitem__)
    _CHOICES[key] = choice
    _MEASUREMENTS[key] = times
    return choice


def _time_candidate(
    key: Hashable, name: str, fn: Callable[[], object], device: torch.device
) -> float:
    """Median seconds of ``fn`` (``name`` run on ``key``) after one untimed call (CUDA: events
    on the current stream)."""
    fn()
    samples = []
    for _ in range(_TIMED_RUNS):
        if device.type == "cuda":
            with torch.cuda.device(device):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    median = statistics.median(samples)
    return median if math.isfinite(median) else math.inf


def measurements() -> dict[Hashable, dict[str, float]]:
    """What ``RELPROP_BACKEND=auto`` measured in this process: seconds per candidate, by layer
    signature (``benchmarks/`` prints them)."""
    return {key: dict(times) for key, times in _MEASUREMENTS.items()}


def forget_measurements() -> None:
    """Drop every measured choice, so the next analyses measure again."""
    _CHOICES.clear()
    _MEASUREMENTS.clear()


# Types whose tensors a kernel can take as they are; a subclass (FakeTensor, FunctionalTensor)
# means something is tracing and needs the op itself.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    # A TorchDispatchMode (fake tensors, FLOP counters, make_fx) must see the op.
    return torch._C._len_torch_dispatch_stack() > 0


def calls_kernels_directly(first: Any) -> bool:
    """Whether :func:`call_op` calls kernels as functions for an op whose first argument is
    ``first``: plain eager mode (no torch.compile, no dispatch mode, no autograd) on a plain tensor
    of a CPU or CUDA device.

    Inside a pass (:func:`one_pass`) the mode and the device were checked once, on the pass's
    input: every tensor of the pass derives from it and from weights on its device (the
    analyzers refuse others), under the pass's ``no_grad``, and a dispatch mode or torch.compile
    is entered around a pass, not inside it. Only the type is checked per call.
    """
    settings = _pass_settings.get()
    if settings is not None:
        return settings.direct and type(first) in _PLAIN_TENSOR_TYPES
    return _plain_eager(first)


def _plain_eager(first: Any) -> bool:
    if _tracing() or torch.is_grad_enabled():
        return False
    return type(first) in _PLAIN_TENSOR_TYPES and first.device.type in ("cpu", "cuda")


class PassSettings(NamedTuple):
    """What a pass reads once rather than at every op call (:func:`one_pass`)."""

    backend: str | None  # RELPROP_BACKEND, parsed
    direct: bool  # plain eager mode on the pass's input: kernels are called as functions


_pass_settings: ContextVar[PassSettings | None] = ContextVar("relprop_pass", default=None)


@contextmanager
def one_pass(x: Any) -> Iterator[None]:
    """Read ``RELPROP_BACKEND`` and the eager mode once for a pass over ``x`` (entered under the
    pass's ``no_grad``).

    Each op call asked both: about 2 µs of environment lookups and mode checks, a few times per
    layer — on ResNet50 several hundred times per analysis, host time a GPU waits for where its
    kernels are short (``benchmarks/test_bench_host.py``).
    """
    settings = PassSettings(_parse_backend(os.environ.get("RELPROP_BACKEND", "")), _plain_eager(x))
    token = _pass_settings.set(settings)
    launch_token = _native.pass_launch_args(x) if settings.direct else None
    # Under torch.autocast the pass computes in its input's dtype, autocast off: autocast would
    # cast the torch products inside some kernels (a convolution's forward) and not the
    # relevance ops beside them, which then met tensors of two dtypes ("expected scalar type
    # BFloat16 but found Float"). The analyzers say so (analyzers/lrp.py).
    device_type = getattr(getattr(x, "device", None), "type", None)
    autocast_off = (
        torch.autocast(device_type, enabled=False)
        if device_type is not None and autocast_dtype(device_type) is not None
        else None
    )
    try:
        if autocast_off is None:
            yield
        else:
            with autocast_off:
                yield
    finally:
        _native.end_pass_launch_args(launch_token)
        _pass_settings.reset(token)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type`` (``"cpu"``, ``"cuda"``), or
    None where it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    except (TypeError, AttributeError, RuntimeError):
        # A device type autocast does not know; torch < 2.4 asks per device.
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def call_op(op: Callable[..., Any], kernel: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)``, or, in plain eager mode, its ``cpu``/``cuda`` kernel called directly.

    A ``torch.library`` custom op costs about 50 µs of host time per call before its kernel
    runs (schema checks, dispatch keys, the autograd wrapper): with three such calls per layer,
    ResNet50 spent ~10 ms of host time per analysis in the dispatcher, which on a GPU is time the
    device may wait. Where nothing needs the dispatcher — no torch.compile, no dispatch mode, plain
    tensors on a CPU or CUDA device, no autograd (the engine runs under ``no_grad``) — the
    registered kernel is called as a function; otherwise the op is.
    """
    # The first argument (the layer input, the numerator) stands for the rest: an op's tensors
    # share one device, and a tracing subclass comes with a dispatch mode or torch.compile.
    if not calls_kernels_directly(args[0]):
        return op(*args)
    if torch.autograd.profiler._is_profiler_enabled:
        # The dispatcher is what names a custom op in a profile; called as a function, the
        # kernel gets the op's name from a record of its own so profiles still show it.
        with torch.profiler.record_function(_op_name(op)):
            return kernel(*args)
    return kernel(*args)


def _op_name(op: Callable[..., Any]) -> str:
    return getattr(op, "_qualname", None) or getattr(op, "__name__", None) or repr(op)
