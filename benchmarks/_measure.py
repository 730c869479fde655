"""Measuring helpers of the benchmark runner: interleaved timing, quantiles, peak memory.

Timing runs every method once per round, in an order rotated by one each round, so that slow
drift of a shared machine (other processes, thermal state, page cache) spreads evenly over all
methods instead of landing on whichever ran last. The first rounds are warm-up and are dropped.

Peak memory on CPU is the growth of the resident set during one call, sampled from
``/proc/self/statm`` by a thread (torch releases the GIL inside its kernels, so the sampler keeps
running). It is only meaningful when freed buffers go back to the kernel: :data:`MALLOC_ENV`
pins glibc's mmap threshold low, so every tensor buffer is its own mapping and ``free`` unmaps
it; without that, glibc's dynamic threshold keeps freed buffers of up to 32 MiB in the heap and the
growth of a second call under-counts. On CUDA it is ``torch.cuda.max_memory_allocated`` above what
was allocated before the call.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# glibc reads these at process start: the memory probe subprocesses are started with them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` by linear interpolation between order statistics.

    Parameters
    ----------
    values : sequence of float
        At least one value.
    q : float
        In [0, 1]; 0.5 is the median.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentile of one method's round times, in seconds."""

    median: float
    p20: float
    p80: float
    rounds: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        return cls(
            quantile(seconds, 0.5), quantile(seconds, 0.2), quantile(seconds, 0.8), len(seconds)
        )


def interleaved_times(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each call over ``rounds`` rotated rounds after ``warmup`` rounds.

    Parameters
    ----------
    calls : dict of str to callable
        The methods, each a call without arguments doing one full attribution.
    rounds : int
        Timed rounds; each runs every call once.
    warmup : int
        Untimed rounds first (tracing, autotuning, allocator and cache warm-up).
    synchronize : callable, optional
        Called before starting and before stopping each clock (``torch.cuda.synchronize``).
    on_error : callable, optional
        Told ``(name, error)`` when a call raises; the call is dropped from later rounds.
        Without it the error propagates.

    Returns
    -------
    dict of str to list of float
        Timed seconds per call that never failed, in round order.
    """
    sync = synchronize or (lambda: None)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    failed: set[str] = set()
    for round_index in range(warmup + rounds):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                sync()
                start = time.perf_counter()
                calls[name]()
                sync()
                elapsed = time.perf_counter() - start
            except Exception as err:  # a method that cannot run is reported, not fatal
                if on_error is None:
                    raise
                on_error(name, err)
                failed.add(name)
                continue
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: seconds for name, seconds in times.items() if name not in failed}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


class _RssSampler(threading.Thread):
    """Samples the resident set size every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _resident_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _resident_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _resident_bytes())
        return self.peak


def cpu_peak_growth(call: Callable[[], object], interval: float = 5e-4) -> int:
    """Bytes by which the resident set grew at its peak during one ``call()``.

    Uses a ``/proc/self/statm`` sampling thread; where that file is missing, falls back to
    ``ru_maxrss``, which only sees growth above the process's earlier peak.
    """
    gc.collect()
    if not os.path.exists("/proc/self/statm"):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) * 1024  # ru_maxrss is in KiB on Linux
    baseline = _resident_bytes()
    sampler = _RssSampler(interval)
    sampler.start()
    try:
        result = call()
        del result
    finally:
        peak = sampler.stop()
    return max(peak - baseline, 0)


def cuda_peak_growth(call: Callable[[], object], device: torch.device) -> int:
    """Bytes of CUDA memory allocated at the peak of one ``call()`` above what was held before."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    del result
    return max(torch.cuda.max_memory_allocated(device) - baseline, 0)


def load_average() -> str:
    """The 1/5/15-minute load average and the CPU count, for the record of a noisy machine."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def profile_summary(call: Callable[[], object], cuda: bool, rows: int = 12) -> str:
    """Markdown table of where one ``call()`` spends its time, by op, from ``torch.profiler``.

    Lists the ``rows`` ops with the most self time (CPU time on CPU, kernel time on CUDA) and,
    separately, the inclusive time of every ``relprop::`` op, so a slow rule shows both which
    layer op and which aten kernel under it pays.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()

    def self_us(event) -> float:
        if cuda:
            return getattr(event, "self_device_time_total", None) or getattr(
                event, "self_cuda_time_total", 0.0
            )
        return event.self_cpu_time_total

    def total_us(event) -> float:
        if cuda:
            return getattr(event, "device_time_total", None) or getattr(
                event, "cuda_time_total", 0.0
            )
        return event.cpu_time_total

    grand = sum(self_us(e) for e in events) or 1.0
    clock = "GPU" if cuda else "CPU"
    lines = [f"| op | calls | self {clock} ms | share |", "| --- | ---: | ---: | ---: |"]
    for event in sorted(events, key=self_us, reverse=True)[:rows]:
        lines.append(
            f"| {event.key} | {event.count} | {self_us(event) / 1e3:.1f} "
            f"| {100 * self_us(event) / grand:.0f}% |"
        )
    ours = sorted((e for e in events if e.key.startswith("relprop::")), key=total_us, reverse=True)
    if ours:
        lines += ["", f"| relprop op | calls | total {clock} ms (inclusive) | share |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for event in ours:
            lines.append(
                f"| {event.key} | {event.count} | {total_us(event) / 1e3:.1f} "
                f"| {100 * total_us(event) / grand:.0f}% |"
            )
    lines.append(f"\nself time of all ops: {grand / 1e3:.1f} ms")
    if cuda:
        busy_us = device_busy_us(prof.events())
        lines.append(
            f"wall time of the profiled call: {wall_us / 1e3:.1f} ms; GPU busy {busy_us / 1e3:.1f}"
            f" ms ({100 * busy_us / wall_us:.0f}%): the rest the GPU waited for the host "
            "(launches, syncs; the profiler adds host time per launch)"
        )
    else:
        lines.append(f"wall time of the profiled call: {wall_us / 1e3:.1f} ms")
    return "\n".join(lines)


def device_busy_us(events) -> float:
    """Microseconds in which at least one GPU kernel or copy ran: the union of the device
    events' intervals (kernels on several streams may overlap, so their sum could exceed it)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy
