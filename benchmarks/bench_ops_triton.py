"""GPU micro-benchmark: the fused Triton LRP kernels against the torch composition of the same op.

For layer shapes of VGG16 and ResNet50 (batch 64 by default), each rule and dtype, it times with
``triton.testing.do_bench`` (median, 20th and 80th percentile, CUDA-synchronised):

- ``gradient``: the layer's forward plus the gradient with respect to its input — the cost an
  LRP step is measured against (a plain gradient does exactly this much work per layer);
- ``triton``: ``relprop._kernels.triton`` forward + relevance (the fused kernels);
- ``native``: relprop's composition on cuBLAS/cuDNN with the fused CUDA division and the lean
  saved tensors (the relprop ops with ``RELPROP_BACKEND=native``);
- ``reference``: ``relprop.ops`` reference forward + relevance (plain torch, cuBLAS/cuDNN).

``layer_backend`` (``relprop/ops/_backend.py``) picks between ``triton`` and ``native`` by
these numbers.

It also records peak extra GPU memory per step and the largest relative deviation of the Triton
relevance from the reference, prints a table and writes long-format CSV rows (one per op,
provider, shape, rule, dtype and metric) in the format of the other benchmarks.

Then VGG16's max pools and ResNet50's: the relevance step between a pool and the γ convolution
under it — ``relprop::max_pool_divided_relevance`` (one kernel) against the three ops it replaces
and against the spread followed by the division at full size, beside the gradient's pool and
ReLU backward (:func:`pool_providers`).

Run on a GPU machine, unattended::

    python benchmarks/bench_ops_triton.py --out bench_ops_triton.csv

Without CUDA it prints why and exits 0. ``--device cpu --smoke`` runs the whole script on a few
tiny layer shapes under ``TRITON_INTERPRET=1`` instead (wall-clock medians, no memory column):
the test suite does so, so that the GPU run does not find the script broken.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANTILES = [0.5, 0.2, 0.8]
RULE_PARAMS = {
    "epsilon": [0.25],
    "zplus": [1e-9, 1.0],
    "alphabeta": [2.0, 1.0, 1e-9, 1.0],
    "gamma": [0.25, 1e-9],
    "zbox": [-3.0, 3.0, 1e-9],
    "flat": [1e-9],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Layer:
    """One layer shape; ``first`` layers see mixed-sign pixels, the others ReLU outputs."""

    name: str
    kind: str  # "conv" or "linear"
    in_features: int  # channels for conv
    out_features: int
    size: int = 1  # input height = width
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    first: bool = False


LAYERS = [
    Layer("vgg16.conv1_1", "conv", 3, 64, 224, 3, 1, 1, first=True),
    Layer("vgg16.conv2_1", "conv", 64, 128, 112, 3, 1, 1),
    Layer("vgg16.conv3_2", "conv", 256, 256, 56, 3, 1, 1),
    Layer("vgg16.conv4_2", "conv", 512, 512, 28, 3, 1, 1),
    Layer("vgg16.conv5_2", "conv", 512, 512, 14, 3, 1, 1),
    Layer("vgg16.fc6", "linear", 25088, 4096),
    Layer("vgg16.fc7", "linear", 4096, 4096),
    Layer("resnet50.conv1", "conv", 3, 64, 224, 7, 2, 3, first=True),
    Layer("resnet50.layer1.conv1", "conv", 64, 64, 56, 1),
    Layer("resnet50.layer1.conv2", "conv", 64, 64, 56, 3, 1, 1),
    Layer("resnet50.layer1.conv3", "conv", 64, 256, 56, 1),
    Layer("resnet50.layer2.conv2", "conv", 128, 128, 56, 3, 2, 1),
    Layer("resnet50.layer2.downsample", "conv", 256, 512, 56, 1, 2, 0),
    Layer("resnet50.layer4.conv2", "conv", 512, 512, 7, 3, 1, 1),
    Layer("resnet50.fc", "linear", 2048, 1000),
]


# Tiny shapes for --smoke (CPU, Triton's interpreter): odd sizes, a stride, a mixed-sign first
# layer, and both layer kinds.
SMOKE_LAYERS = [
    Layer("smoke.first_conv", "conv", 3, 5, 9, 3, 1, 1, first=True),
    Layer("smoke.strided_conv", "conv", 5, 6, 7, 3, 2, 1),
    Layer("smoke.pointwise_conv", "conv", 6, 4, 5, 1),
    Layer("smoke.linear", "linear", 33, 17),
]


@dataclass(frozen=True)
class Pool:
    """A max pool over a ReLU'd convolution output: its relevance step for the γ layer below."""

    name: str
    channels: int
    size: int
    kernel: int = 2
    stride: int = 2
    padding: int = 0


POOLS = [
    Pool("vgg16.pool1", 64, 224),
    Pool("vgg16.pool2", 128, 112),
    Pool("vgg16.pool3", 256, 56),
    Pool("vgg16.pool4", 512, 28),
    Pool("vgg16.pool5", 512, 14),
    Pool("resnet50.maxpool", 64, 112, 3, 2, 1),
]
SMOKE_POOLS = [Pool("smoke.pool2x2", 5, 10), Pool("smoke.pool3x3s2", 6, 9, 3, 2, 1)]
POOL_PROVIDERS = ("gradient", "fused", "composed", "spread first")


def pool_providers(pool: Pool, batch: int, dtype: torch.dtype, device: str):
    """The relevance step between a max pool and the γ convolution under it, four ways:

    - ``gradient``: what autograd runs there (the pool's backward, the ReLU's);
    - ``fused``: ``relprop::max_pool_divided_relevance``, the division at the winners and the
      spread in one kernel (what the engine runs);
    - ``composed``: the three ops it replaces (the denominator gathered at the winners, the
      division at the pool's size, the spread);
    - ``spread first``: the spread, then the division at the pool's input size (the engine
      before the layer divided at the winners).
    """
    from relprop.ops import pool as pool_ops
    from relprop.ops._layer_rules import divide_fast

    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, pool.channels, pool.size, pool.size)
    x = torch.randn(shape, generator=generator, device=device).relu().to(dtype)
    geometry = ([pool.kernel] * 2, [pool.stride] * 2, [pool.padding] * 2)
    out, indices = F.max_pool2d(x, *geometry, return_indices=True)
    coefficient = torch.randn(out.shape, generator=generator, device=device).to(dtype)
    denominator = torch.randn(shape, generator=generator, device=device).to(dtype)
    window = (*geometry, [1, 1])

    def gradient():
        spread = torch.ops.aten.max_pool2d_with_indices_backward(
            coefficient, x, *geometry, [1, 1], False, indices
        )
        return torch.ops.aten.threshold_backward(spread, x, 0)

    def fused():
        return pool_ops.max_pool_divided_relevance(
            coefficient, indices, denominator, 1e-9, out, out, None, window
        )

    def composed():
        at_winners = pool_ops.gather_winners(denominator, indices)
        share = divide_fast(coefficient, at_winners, 1e-9, sign_reference=out, factor=out)
        return pool_ops.max_pool_relevance(share, indices, shape, window)

    def spread_first():
        spread = pool_ops.max_pool_relevance(coefficient, indices, shape, window)
        return divide_fast(spread, denominator, 1e-9, sign_reference=x, factor=x)

    return {
        "gradient": gradient,
        "fused": fused,
        "composed": composed,
        "spread first": spread_first,
    }


def rules_for(layer: Layer) -> list[str]:
    """The rules a composite would put on this layer (zB and flat only on the first one)."""
    if layer.first:
        return ["epsilon", "zbox", "flat", "gamma"]
    return ["epsilon", "zplus", "alphabeta", "gamma"]


def make_inputs(layer: Layer, batch: int, dtype: torch.dtype, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(0)
    if layer.kind == "conv":
        x_shape = (batch, layer.in_features, layer.size, layer.size)
        w_shape = (layer.out_features, layer.in_features, layer.kernel, layer.kernel)
    else:
        x_shape = (batch, layer.in_features)
        w_shape = (layer.out_features, layer.in_features)
    fan_in = w_shape[1] * layer.kernel * layer.kernel
    x = torch.randn(x_shape, device=device, generator=gen)
    if not layer.first:
        x = x.clamp_(min=0)
    w = torch.randn(w_shape, device=device, generator=gen) / fan_in**0.5
    b = torch.randn(layer.out_features, device=device, generator=gen) * 0.1
    return x.to(dtype), w.to(dtype), b.to(dtype)


def providers(layer: Layer, rule: str):
    """``{name: step}``, each step mapping (x, W, b, R) to the input relevance (or gradient)."""
    from relprop._kernels.triton import conv as triton_conv
    from relprop._kernels.triton import linear as triton_linear
    from relprop.ops import conv as conv_ops
    from relprop.ops import linear as linear_ops
    from relprop.ops.conv import conv2d_forward_reference, conv2d_relevance_reference
    from relprop.ops.linear import linear_forward_reference, linear_relevance_reference

    params = RULE_PARAMS[rule]
    geometry = ([layer.stride] * 2, [layer.padding] * 2, [1, 1], 1)
    if layer.kind == "conv":

        def gradient(x, w, b, r):
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(F.conv2d(x, w, b, *geometry), x, r)
            return grad

        def triton_step(x, w, b, r):
            saved = triton_conv.conv2d_forward(x, w, b, *geometry, rule, params)
            return triton_conv.conv2d_relevance(x, w, b, saved, r, *geometry, rule, params)

        def reference_step(x, w, b, r):
            saved = conv2d_forward_reference(x, w, b, *geometry, rule, params)
            return conv2d_relevance_reference(x, w, b, saved, r, *geometry, rule, params)

    else:

        def gradient(x, w, b, r):
            x = x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(F.linear(x, w, b), x, r)
            return grad

        def triton_step(x, w, b, r):
            saved = triton_linear.linear_forward(x, w, b, rule, params)
            return triton_linear.linear_relevance(x, w, b, saved, r, rule, params)

        def reference_step(x, w, b, r):
            saved = linear_forward_reference(x, w, b, rule, params)
            return linear_relevance_reference(x, w, b, saved, r, rule, params)

    def native_step(x, w, b, r):
        # The custom ops read RELPROP_BACKEND at each call.
        previous = os.environ.get("RELPROP_BACKEND")
        os.environ["RELPROP_BACKEND"] = "native"
        try:
            if layer.kind == "conv":
                saved = conv_ops.conv2d_forward(x, w, b, *geometry, rule, params)
                return conv_ops.conv2d_relevance(x, w, b, saved, r, *geometry, rule, params)
            saved = linear_ops.linear_forward(x, w, b, rule, params)
            return linear_ops.linear_relevance(x, w, b, saved, r, rule, params)
        finally:
            if previous is None:
                del os.environ["RELPROP_BACKEND"]
            else:
                os.environ["RELPROP_BACKEND"] = previous

    return {
        "gradient": gradient,
        "triton": triton_step,
        "native": native_step,
        "reference": reference_step,
    }


def cpu_bench(step: Callable[[], torch.Tensor], rounds: int = 3) -> list[float]:
    """Median, 20th and 80th percentile in ms of ``rounds`` calls after one: ``do_bench``'s
    quantiles on a CPU, where it cannot run."""
    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), cuts[1], cuts[7]]


def peak_extra_memory(step: Callable[[], torch.Tensor]) -> int:
    """Bytes allocated at peak during one call, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def describe(layer: Layer, batch: int) -> str:
    if layer.kind == "conv":
        return (f"{batch}x{layer.in_features}x{layer.size}x{layer.size}->{layer.out_features}"
                f" k{layer.kernel}s{layer.stride}p{layer.padding}")  # fmt: skip
    return f"{batch}x{layer.in_features}->{layer.out_features}"


def run(args: argparse.Namespace) -> list[dict]:
    import triton

    cuda = args.device == "cuda"
    if cuda:
        from triton.testing import do_bench

        device_name = torch.cuda.get_device_name()
    else:
        device_name = "cpu (Triton interpreter)"
    version = f"torch {torch.__version__}, triton {triton.__version__}"
    rows = []
    for layer in SMOKE_LAYERS if args.smoke else LAYERS:
        if args.filter and args.filter not in layer.name:
            continue
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            x, w, b = make_inputs(layer, args.batch, dtype, args.device)
            if layer.kind == "conv":
                z = F.conv2d(x, w, b, layer.stride, layer.padding)
            else:
                z = F.linear(x, w, b)
            # Relevance as it arrives after a ReLU: zero where the unit is off.
            r = torch.randn_like(z) * (z > 0)
            for rule in rules_for(layer):
                steps = providers(layer, rule)
                relevance = {name: steps[name](x, w, b, r) for name in ("triton", "reference")}
                scale = relevance["reference"].float().abs().max().clamp(min=1e-30)
                deviation = ((relevance["triton"].float() - relevance["reference"].float()).abs()
                             .max() / scale).item()  # fmt: skip
                if cuda:
                    torch.cuda.synchronize()  # a faulting kernel is named here, not in a timing
                del relevance
                times = {}
                for name, step in steps.items():
                    call = functools.partial(step, x, w, b, r)
                    if cuda:
                        p50, p20, p80 = do_bench(call, quantiles=QUANTILES)
                    else:
                        p50, p20, p80 = cpu_bench(call)
                    times[name] = p50
                    # A CPU has no peak counter to read: no memory row there.
                    memory = peak_extra_memory(call) if cuda else None
                    base = {
                        "op": f"{layer.kind}_relevance", "provider": name, "layer": layer.name,
                        "shape": describe(layer, args.batch), "rule": rule, "dtype": dtype_name,
                        "device": device_name, "version": version,
                    }  # fmt: skip
                    rows.append({**base, "metric": "time_ms", "p50": p50, "p20": p20, "p80": p80})
                    if memory is not None:
                        rows.append({**base, "metric": "peak_extra_mib", "p50": memory / 2**20,
                                     "p20": "", "p80": ""})  # fmt: skip
                print(
                    f"{layer.name:28s} {dtype_name:4s} {rule:9s} "
                    f"grad {times['gradient']:7.3f} ms  triton {times['triton']:7.3f} "
                    f"({times['triton'] / times['gradient']:5.2f}x)  native {times['native']:7.3f} "
                    f"({times['native'] / times['gradient']:5.2f}x)  reference "
                    f"{times['reference']:7.3f} ({times['reference'] / times['gradient']:5.2f}x)  "
                    f"max rel dev {deviation:.1e}",
                    flush=True,
                )
                rows.append({**base, "provider": "triton-vs-reference", "metric": "max_rel_dev",
                             "p50": deviation, "p20": "", "p80": ""})  # fmt: skip
            del x, w, b, z, r
            if cuda:
                torch.cuda.empty_cache()
    for pool in SMOKE_POOLS if args.smoke else POOLS:
        if args.filter and args.filter not in pool.name:
            continue
        for dtype_name in args.dtypes.split(","):
            steps = pool_providers(pool, args.batch, DTYPES[dtype_name], args.device)
            fused, composed = steps["fused"](), steps["composed"]()
            scale = composed.float().abs().max().clamp(min=1e-30)
            deviation = ((fused.float() - composed.float()).abs().max() / scale).item()
            del fused, composed
            times = {}
            base = {
                "op": "max_pool_divided_relevance", "layer": pool.name,
                "shape": f"{args.batch}x{pool.channels}x{pool.size}x{pool.size} "
                         f"k{pool.kernel}s{pool.stride}p{pool.padding}",
                "rule": "gamma", "dtype": dtype_name, "device": device_name, "version": version,
            }  # fmt: skip
            for name, step in steps.items():
                if cuda:
                    p50, p20, p80 = do_bench(step, quantiles=QUANTILES)
                else:
                    p50, p20, p80 = cpu_bench(step)
                times[name] = p50
                row = {**base, "provider": name}
                rows.append({**row, "metric": "time_ms", "p50": p50, "p20": p20, "p80": p80})
                if cuda:
                    rows.append({**row, "metric": "peak_extra_mib",
                                 "p50": peak_extra_memory(step) / 2**20, "p20": "", "p80": ""})  # fmt: skip
            rows.append({**base, "provider": "fused-vs-composed", "metric": "max_rel_dev",
                         "p50": deviation, "p20": "", "p80": ""})  # fmt: skip
            print(
                f"{pool.name:28s} {dtype_name:4s} pool      grad {times['gradient']:7.3f} ms  "
                f"fused {times['fused']:7.3f} ({times['fused'] / times['gradient']:5.2f}x)  "
                f"composed {times['composed']:7.3f}  spread first {times['spread first']:7.3f}  "
                f"max rel dev {deviation:.1e}",
                flush=True,
            )
            del steps
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--filter", default="", help="only layers whose name contains this")
    parser.add_argument("--out", default="bench_ops_triton.csv", help="CSV file to write")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the kernels under TRITON_INTERPRET=1, a check of the script, not a measurement",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few tiny layer shapes instead of VGG16's/ResNet50's"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error(
                "--device cpu runs the Triton kernels in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before starting Python"
            )
    elif not torch.cuda.is_available():
        print("bench_ops_triton: no CUDA device; nothing to measure (run it on a GPU machine).")
        return 0
    rows = run(args)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
