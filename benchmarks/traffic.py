"""Counted work of each method: FLOPs, bytes moved and kernels launched, as multiples of a gradient.

Timing needs the machine the numbers are for; counting does not. This runner executes every
method of ``run.py`` once on the CPU under a ``TorchDispatchMode`` that sees each kernel-level
operator (aten ops, and relprop's leaf ops, whose native kernels torch cannot look into) and
records:

- **FLOPs** of the products (convolutions and matrix products, by ``torch.utils.flop_counter``'s
  formulas; composite ops such as ``conv2d`` are decomposed so their convolution is seen);
- **bytes** each op reads and writes: every distinct element of its tensor arguments and results
  (zero-stride dimensions count once, a tensor passed twice counts once — an in-place result is
  read and written in one pass; views, ``empty`` and metadata ops move nothing). This is the
  traffic of a machine without caches between kernels, which is what a GPU's HBM sees for
  tensors of these sizes;
- **launches**: ops that move bytes or do FLOPs (one kernel each, roughly; cuDNN may run two);
- **peak**: the most bytes of tensor storage alive at once during the call, above what existed
  before it (every storage an op allocates, taken off again when it is freed): what a GPU's
  caching allocator would need with its cache emptied, without its rounding and fragmentation.
  Weights and the input are not counted, as in ``run.py``'s CUDA column.

Counts grow linearly with the batch except for the weights, which each product reads once:
every op class is counted at two batches and extrapolated to ``--batch``. Not quite for the
launches of batch-chunked relevance steps (α-β, and z⁺/α-β/γ on a first layer): how many chunks a
step runs in follows the memory its pass has freed, which depends on the batch, so the counted
batches chunk differently from the target batch and their bytes are off a little.
``--count-batches 32,64`` counts the target batch itself, exactly, at minutes per model and
method (ResNet50 EpsilonAlpha2Beta1 at 64: 445 launches, not the 391 extrapolated from 8 and 16;
bytes 58.0 GB, not 57.6).

The **roofline** column turns the counts into a lower bound of time on a machine with the given
peak product rate and memory bandwidth (defaults: an H100 SXM in TF32 and HBM3, derated to what
cuDNN and a streaming kernel reach): for each op class ``max(FLOPs / peak, bytes / bandwidth)``.
It is a model, not a measurement; its ratios show where a method's extra time must come from.

Usage::

    python benchmarks/traffic.py                            # vgg16, resnet50; batch 64 by count
    python benchmarks/traffic.py --models vgg16 --by-op     # and where each method's bytes go
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import run  # the benchmark's models, inputs and methods
from tests.oracles.live_bytes import StorageLedger  # the memory oracle the tests use

# relprop ops whose CPU kernels are native code (relprop._C): counted as one kernel each, since
# the mode cannot see inside them. The layer ops (conv2d_*, linear_*) are compositions of aten
# ops and are descended into.
LEAF_OPS = {
    "stabilized_divide",
    "paired_shares",
    "max_pool_relevance",
    "max_pool_divided_relevance",
    "avg_pool2d_relevance",
    "adaptive_avg_pool2d_relevance",
}
# Ops that allocate or relabel without touching memory.
NO_TRAFFIC = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach",
              "lift_fresh", "_to_copy_meta", "set_", "resize_", "_local_scalar_dense"}  # fmt: skip


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a zero stride repeats one element)."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            count *= size
    return count * t.element_size() if t.numel() else 0


@dataclass
class OpCount:
    calls: int = 0
    flops: int = 0
    bytes: int = 0


@dataclass
class Counts:
    """Per op name: calls, FLOPs and bytes; and the peak of the bytes allocated at once."""

    ops: dict[str, OpCount] = field(default_factory=lambda: defaultdict(OpCount))
    peak_bytes: int = 0

    def total(self, attr: str) -> float:
        return float(sum(getattr(c, attr) for c in self.ops.values()))


class CountingMode(TorchDispatchMode):
    """Records :class:`Counts` of every kernel-level op run under it (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.memory = StorageLedger()

    def _record(self, name: str, args, kwargs, out, flops: int = 0) -> None:
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        # A tensor passed twice (a division by the factor it multiplies, an in-place result) is
        # read once.
        unique = {(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype): t for t in tensors}
        moved = sum(distinct_bytes(t) for t in unique.values())
        if moved or flops:
            entry = self.counts.ops[name]
            entry.calls += 1
            entry.bytes += moved
            entry.flops += flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._dispatch(func, args, kwargs)
        self.memory.track(func, args, kwargs, out)
        return out

    def _dispatch(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        if func.namespace == "relprop":
            if name in LEAF_OPS:
                out = func(*args, **kwargs)
                self._record(f"relprop::{name}", args, kwargs, out)
                return out
            # Run the CPU kernel with this mode active, so its aten ops are seen.
            with self:
                return func.redispatch(
                    torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs
                )
        if func.is_view or name in NO_TRAFFIC:
            return func(*args, **kwargs)
        if func.overloadpacket not in flop_registry:
            # conv2d, linear, matmul...: decompose so the product underneath is counted.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        flops = 0
        if func.overloadpacket in flop_registry:
            flops = int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        self._record(name, args, kwargs, out, flops)
        return out


def count(call: Callable[[], object]) -> Counts:
    """Counts of one ``call()``."""
    mode = CountingMode()
    with mode:
        call()
    mode.counts.peak_bytes = mode.memory.peak
    return mode.counts


def extrapolate(small: Counts, large: Counts, n_small: int, n_large: int, n: int) -> Counts:
    """Counts at batch ``n`` from counts at two batches, linear in the batch per op name."""
    out = Counts()
    for name in set(small.ops) | set(large.ops):
        a, b = small.ops.get(name, OpCount()), large.ops.get(name, OpCount())

        def line(u: float, v: float) -> int:
            slope = (v - u) / (n_large - n_small)
            return max(round(v + slope * (n - n_large)), 0)

        out.ops[name] = OpCount(b.calls, line(a.flops, b.flops), line(a.bytes, b.bytes))
    slope = (large.peak_bytes - small.peak_bytes) / (n_large - n_small)
    out.peak_bytes = max(round(large.peak_bytes + slope * (n - n_large)), 0)
    return out


def count_batches_of_methods(
    model_name: str,
    methods: list[str],
    providers: list[str],
    count_batches: tuple[int, int],
    size: int,
) -> list[tuple[str, Counts, Counts]]:
    """``(case key, counts at the smaller batch, counts at the larger)`` of each method and
    provider on ``model_name`` (float32, CPU), the gradient first."""
    device, dtype = torch.device("cpu"), torch.float32
    model = run.make_model(model_name, device, dtype)
    results: list[tuple[str, Counts, Counts]] = []
    for case in run.plan_cases(methods, providers, ["default"]):
        try:
            per_batch = []
            for n in count_batches:
                x = run.make_input(n, size, device, dtype)
                call = run.build_call(case, model_name, model, x)
                call()  # warm-up: tracing is not the method's steady work
                per_batch.append(count(call))
                del call, x
        except run.NotApplicable as err:
            print(f"{case.key}: n/a ({err})")
            continue
        results.append((case.key, *per_batch))
    return results


def count_methods(
    model_name: str,
    methods: list[str],
    providers: list[str],
    count_batches: tuple[int, int],
    batch: int,
    size: int,
) -> list[tuple[str, Counts]]:
    """``(case key, counts at batch)`` of each method and provider on ``model_name`` (float32,
    CPU), the gradient first; counted at ``count_batches`` and extrapolated to ``batch``."""
    n_small, n_large = count_batches
    counted = count_batches_of_methods(model_name, methods, providers, count_batches, size)
    return [
        (key, extrapolate(small, large, n_small, n_large, batch)) for key, small, large in counted
    ]


def roofline_seconds(counts: Counts, peak_flops: float, bandwidth: float) -> float:
    """Σ over op classes of max(FLOPs / peak, bytes / bandwidth)."""
    return sum(max(c.flops / peak_flops, c.bytes / bandwidth) for c in counts.ops.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--methods", default=",".join(run.METHODS))
    parser.add_argument("--providers", default="relprop", help="relprop,zennit")
    parser.add_argument("--batch", type=int, default=64, help="batch the counts are scaled to")
    parser.add_argument(
        "--count-batches",
        default="8,16",
        help="two batches actually run; 32,64 counts the launches of chunked steps at 64 exactly",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--peak-tflops", type=float, default=400.0, help="product rate of the roofline (TF32)"
    )
    parser.add_argument(
        "--bandwidth-tbs", type=float, default=3.0, help="memory bandwidth of the roofline"
    )
    parser.add_argument("--by-op", action="store_true", help="also list each method's top ops")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_small, n_large = (int(v) for v in args.count_batches.split(","))
    methods = [m for m in args.methods.split(",") if m]
    providers = [p for p in args.providers.split(",") if p]
    peak, bandwidth = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    print(
        f"# Counted work, batch {args.batch} (counted at {n_small} and {n_large}), "
        f"3×{args.size}×{args.size}, float32; roofline at {args.peak_tflops:g} TFLOP/s and "
        f"{args.bandwidth_tbs:g} TB/s\n"
    )
    for model_name in args.models.split(","):
        results = count_methods(
            model_name, methods, providers, (n_small, n_large), args.batch, args.size
        )
        base = results[0][1]
        base_time = roofline_seconds(base, peak, bandwidth)
        print(f"## {model_name}\n")
        print(
            "| method | GFLOP | × gradient | floor × | FLOP-floor fraction | GB moved | × gradient "
            "| launches | roofline ms | × gradient | peak GB | × gradient |"
        )
        print("| --- |" + " ---: |" * 11)
        for key, counts in results:
            flops, moved = counts.total("flops"), counts.total("bytes")
            floor = run.FLOOR[key.split(" / ")[0]]
            flop_ratio = flops / base.total("flops")
            seconds = roofline_seconds(counts, peak, bandwidth)
            print(
                f"| {key} | {flops / 1e9:.0f} | {flop_ratio:.2f} | {floor:.1f} | "
                f"{floor / flop_ratio:.2f} | {moved / 1e9:.1f} | "
                f"{moved / base.total('bytes'):.2f} | {counts.total('calls'):.0f} | "
                f"{seconds * 1e3:.1f} | {seconds / base_time:.2f} | "
                f"{counts.peak_bytes / 1e9:.2f} | {counts.peak_bytes / base.peak_bytes:.2f} |"
            )
        if args.by_op:
            for key, counts in results:
                print(f"\n{model_name}, {key}: bytes by op")
                ranked = sorted(counts.ops.items(), key=lambda item: -item[1].bytes)
                for name, c in ranked[:12]:
                    print(
                        f"  {name:40s} {c.calls:5d} calls {c.bytes / 1e9:8.2f} GB "
                        f"{c.flops / 1e9:8.0f} GFLOP"
                    )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
