"""What the fused Triton kernels compile to on a GPU, read without one: registers, spills, shared memory.

For the launches relprop makes on VGG16 and ResNet50 layers (batch 64, every rule, float32,
bfloat16 and float16), this records each launch's specialization exactly as Triton's JIT would
make it on the GPU (``--arch 90``: H100/H200; ``80``: A100), compiles it ahead of time with
Triton's own compiler and ptxas, and reads the cubin's resource usage with ``cuobjdump``:

- ``regs``: registers per thread (255 is the ceiling: a kernel there is likely to spill);
- ``spill``: bytes per thread of stack and local memory; anything above 0 means ptxas ran out of
  registers and keeps values in (slow) local memory;
- ``smem``: shared memory per program, against the architecture's limit per block;
- ``blocks/SM``: programs resident per multiprocessor by registers, shared memory and threads
  (the occupancy that hides a kernel's memory latency).

No kernel runs: the launches are made by relprop's own host code on CPU tensors, with Triton's
driver replaced by one that reports the chosen GPU and a compile hook that records what would
be compiled instead of compiling it. So the table shows the block sizes, warps and
specializations the GPU would get, and a GPU-free machine (CI) can check that every kernel
compiles for the GPU and stays within its registers.

Run (any machine with Triton ≥ 3.0 and its bundled ptxas; no GPU needed)::

    python benchmarks/triton_resources.py                 # the table, sm_90
    python benchmarks/triton_resources.py --arch 80 --json out.json
    python benchmarks/triton_resources.py --quick --check # what the test suite runs

``--check`` exits 1 if a variant fails to compile, spills, or needs more shared memory than a
block may have (``--allow-spills``: spills do not count). Each variant compiles in a child process
of its own, so a compiler that aborts (Triton 3.0-3.2 did on some of these kernels) is reported
as that variant's error. Triton 3.0-3.3 record through ``JITFunction.cache_hook`` and compile
with their own ``JITFunction.preload``; ``scripts/triton_versions.sh`` runs this with each
release. ``TRITON_INTERPRET`` must be unset (the interpreter compiles nothing); the script
unsets it for itself when run as a program.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before triton is imported: under the interpreter there is no compiler to ask.
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops_triton import LAYERS, Layer  # the layer shapes of the GPU benchmark

# Every rule of the kernels with the numbers a composite gives it (α-β with β ≠ 0: both streams).
RULE_PARAMS = {
    "epsilon": [1e-7],
    "wsquare": [1e-7],
    "flat": [1e-7],
    "zplus": [1e-7, 1.0],
    "alphabeta": [2.0, 1.0, 1e-7, 1.0],
    "gamma": [0.25, 1e-7],
    "zbox": [-3.0, 3.0, 1e-7],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Per multiprocessor and per block, by compute capability (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): registers, shared memory per block (opt-in maximum),
# shared memory per SM, threads per SM, blocks per SM.
ARCH_LIMITS = {
    80: {"regs": 65536, "smem_block": 163 * 1024, "smem_sm": 164 * 1024, "threads": 2048,
         "blocks": 32},
    90: {"regs": 65536, "smem_block": 227 * 1024, "smem_sm": 228 * 1024, "threads": 2048,
         "blocks": 32},
}  # fmt: skip

# The quick set (the test suite's): the 3-channel first layer (mixed-sign input: every x⁻ product),
# a strided wide layer, a 1×1 layer and a dense layer, in float32 and bfloat16.
QUICK_LAYERS = ("vgg16.conv1_1", "resnet50.layer2.conv2", "resnet50.layer1.conv1", "vgg16.fc7")
QUICK_DTYPES = ("fp32", "bf16")


@dataclass
class Variant:
    """One compiled specialization of a kernel and what it costs the GPU."""

    kernel: str
    constants: str  # the kernel's constexpr arguments, as the JIT specialised them
    num_warps: int
    uses: list[str]  # layer/rule/dtype launches that compile to this variant
    regs: int = -1
    spill: int = -1  # bytes per thread, stack + local
    smem: int = -1
    blocks_per_sm: int = -1
    error: str = ""


class _ReportingDriver:
    """Stands in for Triton's CUDA driver: reports a GPU of the chosen architecture."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


def reporting_driver(arch: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, Triton's driver is one that reports an sm_``arch`` GPU."""
    from relprop._kernels.triton._common import stand_in_driver

    return stand_in_driver(_ReportingDriver(arch))


def _legacy_record(serialized: str, module: str, arg_names: list[str], arch: int) -> dict:
    """A Triton 3.0-3.3 specialization in the fields of Triton >= 3.4's (what the rest reads).

    The record keeps Triton's own serialisation, which ``JITFunction.preload`` of that version
    compiles.
    """
    spec = json.loads(serialized)
    if "constant_keys" not in spec:  # Triton < 3.3: constants keyed by name or position
        spec["constant_keys"] = [
            [int(k) if k.isdigit() else arg_names.index(k)] for k in spec["constants"]
        ]
        spec["constant_vals"] = list(spec["constants"].values())
        spec["attrs_vals"] = spec["attrs"]
    spec["name"] = f"{module}.{spec['name']}"
    spec["target"] = {"backend": "cuda", "arch": arch, "warp_size": 32}
    spec["serialized"] = serialized
    return spec


@contextlib.contextmanager
def recorded_launches(arch: int, fp32_products: str = "default") -> Iterator[list[dict]]:
    """Within the block, Triton launches are specialised for ``arch`` and recorded, not run.

    Yields the list the records go to: Triton's serialised specialization (what
    ``JITFunction.preload`` reads) of each launch. The kernels' host code is told its tensors are
    on a GPU (block sizes, warps). fp32 products follow ``fp32_products``: ``default`` as torch's
    default TF32 flags have them (on for convolutions, ``torch.backends.cudnn.allow_tf32``; off
    for dense layers), ``ieee`` or ``tf32`` everywhere (the GPU tests turn TF32 off).

    Triton >= 3.4 calls ``knobs.runtime.jit_cache_hook`` before it compiles; Triton 3.0-3.3 calls
    ``JITFunction.cache_hook`` with the same arguments.
    """
    import triton
    from triton.runtime.jit import JITFunction

    from relprop._kernels.triton import conv, linear

    try:
        from triton import knobs

        hooks, hook_name = knobs.runtime, "jit_cache_hook"
    except ImportError:
        hooks, hook_name = JITFunction, "cache_hook"
    if not hasattr(hooks, hook_name):
        raise RuntimeError(f"Triton {triton.__version__} has no compile hook to record launches")
    legacy = hooks is JITFunction
    records: list[dict] = []

    def record(*args, **kwargs) -> bool:
        serialized = kwargs["compile"]["specialization_data"]
        if legacy:
            function = kwargs["fn"]
            records.append(
                _legacy_record(serialized, function.module, function.jit_function.arg_names, arch)
            )
        else:
            spec = json.loads(serialized)
            # Triton < 3.7 leaves the target out of the record.
            spec.setdefault("target", {"backend": "cuda", "arch": arch, "warp_size": 32})
            records.append(spec)
        return True  # handled: the JIT neither compiles nor launches

    def precision(allow_tf32: bool):
        if fp32_products != "default":
            allow_tf32 = fp32_products == "tf32"
        return lambda x: "tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee"

    saved = {
        (conv, "is_interpreted"): conv.is_interpreted,
        (conv, "_precision"): conv._precision,
        (linear, "is_interpreted"): linear.is_interpreted,
        (linear, "_precision"): linear._precision,
        (hooks, hook_name): getattr(hooks, hook_name),
    }
    setattr(hooks, hook_name, record)
    conv.is_interpreted = linear.is_interpreted = lambda device: False
    conv._precision = precision(True)
    linear._precision = precision(False)
    try:
        with reporting_driver(arch):
            yield records
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def _layer_inputs(layer: Layer, batch: int, dtype: torch.dtype):
    """x, W, b, R of the layer's shape. Only x's sign pattern is read (the host's x⁻ test):
    mixed for a first layer, non-negative after a ReLU; the rest is never touched."""
    if layer.kind == "conv":
        x = torch.ones((batch, layer.in_features, layer.size, layer.size), dtype=dtype)
        w = torch.empty((layer.out_features, layer.in_features, layer.kernel, layer.kernel),
                        dtype=dtype)  # fmt: skip
    else:
        x = torch.ones((batch, layer.in_features), dtype=dtype)
        w = torch.empty((layer.out_features, layer.in_features), dtype=dtype)
    if layer.first:
        x.view(-1)[1] = -1.0
    return x, w, torch.empty(layer.out_features, dtype=dtype)


def record_layer(layer: Layer, rule: str, dtype: torch.dtype, batch: int) -> None:
    """Make the forward and relevance launches of one layer step (inside ``recorded_launches``)."""
    from relprop._kernels.triton import conv, linear

    x, w, b = _layer_inputs(layer, batch, dtype)
    params = RULE_PARAMS[rule]
    if layer.kind == "conv":
        geometry = ([layer.stride] * 2, [layer.padding] * 2, [1, 1], 1)
        saved = conv.conv2d_forward(x, w, b, *geometry, rule, params)
        conv.conv2d_relevance(x, w, b, saved, torch.empty_like(saved[0]), *geometry, rule, params)
    else:
        saved = linear.linear_forward(x, w, b, rule, params)
        linear.linear_relevance(x, w, b, saved, torch.empty_like(saved[0]), rule, params)


def _variant_key(spec: dict) -> str:
    return json.dumps([spec["name"], spec["signature"], spec["constant_vals"], spec["attrs_vals"],
                       spec["options"]["num_warps"], spec["options"]["num_stages"]])  # fmt: skip


def _constants(spec: dict) -> str:
    """The constexpr arguments by name (the block sizes and the rule's switches)."""
    import importlib

    module_name, function_name = spec["name"].rsplit(".", 1)
    names = getattr(importlib.import_module(module_name), function_name).arg_names
    values = dict(zip((names[k[0]] for k in spec["constant_keys"]), spec["constant_vals"]))
    shown = [f"{k}={v}" for k, v in values.items() if k.isupper() and not k.startswith(("STRIDE_",
             "PAD_", "DIL_", "N"))]  # fmt: skip
    return " ".join(shown)


def collect(
    layers, rules, dtypes, arch: int, batch: int, fp32_products: str = "default"
) -> tuple[list[Variant], list[dict]]:
    """Record the launches and group them into distinct compiled variants."""
    by_key: dict[str, tuple[Variant, dict]] = {}
    with recorded_launches(arch, fp32_products) as records:
        for layer in layers:
            for rule in rules:
                for dtype_name in dtypes:
                    first = len(records)
                    record_layer(layer, rule, DTYPES[dtype_name], batch)
                    for spec in records[first:]:
                        key = _variant_key(spec)
                        if key not in by_key:
                            kernel = spec["name"].rsplit(".", 1)[1].strip("_")
                            by_key[key] = (
                                Variant(kernel, _constants(spec), spec["options"]["num_warps"], []),
                                spec,
                            )
                        by_key[key][0].uses.append(f"{layer.name}/{rule}/{dtype_name}")
    return [v for v, _ in by_key.values()], [s for _, s in by_key.values()]


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of one cubin: REG, STACK, SHARED, LOCAL, ..."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    usage = dict(re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", text.split("Function", 1)[1]))
    return {k: int(v) for k, v in usage.items()}


def compile_variant(spec: dict) -> dict:
    """Compile one recorded specialization for its GPU; return its resource usage or the error.

    The compile runs in a child process of its own: a compiler that aborts (an assertion in
    Triton's MLIR passes or LLVM, as Triton 3.0 does on some sm_90 kernels) takes only the child
    down, and is reported with the last line it printed.
    """
    with tempfile.TemporaryFile() as log:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compile, send the result, never return into the caller
            try:
                os.close(reader)
                os.dup2(log.fileno(), 2)
                os.write(writer, json.dumps(_compile(spec)).encode())
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            sent = pipe.read()
        _, status = os.waitpid(pid, 0)
        if sent:
            return json.loads(sent)
        log.seek(0)
        printed = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
        last = next((line for line in reversed(printed) if line), "")
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {status}"
        return {"error": f"compiler crashed ({how}): {last[:300]}"}


def _compile(spec: dict) -> dict:
    """Compile one specialization, as ``JITFunction.preload`` does, for the record's target."""
    import importlib

    import triton

    try:
        module_name, function_name = spec["name"].rsplit(".", 1)
        kernel = getattr(importlib.import_module(module_name), function_name)
        if "serialized" in spec:  # Triton 3.0-3.3: its own preload, for the reported GPU
            with reporting_driver(spec["target"]["arch"]):
                compiled = kernel.preload(spec["serialized"])
        else:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource, make_backend

            target = GPUTarget(**spec["target"])
            backend = make_backend(target)
            options = backend.parse_options(
                {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()}
            )
            constants = {tuple(k): v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
            attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
            source = ASTSource(kernel, spec["signature"], constants, attrs)
            compiled = triton.compile(source, target=target, options=options.__dict__)
        usage = _resource_usage(compiled.asm["cubin"])
        return {
            "regs": usage["REG"],
            "spill": usage.get("STACK", 0) + usage.get("LOCAL", 0),
            # Triton's dynamic shared memory (its pipelining buffers and layout conversions) plus
            # what ptxas placed statically.
            "smem": compiled.metadata.shared + usage.get("SHARED", 0),
            "arch": spec["target"]["arch"],
        }
    except Exception as error:  # noqa: BLE001 - reported per variant, the others go on
        # Triton's compile errors end in the source line and a caret; the cause is above them.
        cause = error.__cause__ or error
        lines = [line.strip() for line in str(cause).splitlines() if line.strip(" ^")]
        reason = lines[-1] if lines else ""
        return {"error": f"{type(cause).__name__}: {reason[:300]}"}


def blocks_per_sm(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Programs resident per multiprocessor: the least of the register, shared-memory, thread and
    block limits (registers are allocated per warp in units of 256)."""
    limits = ARCH_LIMITS[arch]
    threads = 32 * num_warps
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = limits["regs"] // (regs_per_warp * num_warps) if regs > 0 else limits["blocks"]
    by_smem = limits["smem_sm"] // smem if smem > 0 else limits["blocks"]
    return min(by_regs, by_smem, limits["threads"] // threads, limits["blocks"])


def problems(variants: list[Variant], arch: int, allow_spills: bool = False) -> list[str]:
    """What ``--check`` fails on: a variant that does not compile, spills (unless
    ``allow_spills``), or over-asks shared memory."""
    found = []
    for v in variants:
        where = f"{v.kernel} [{v.constants} num_warps={v.num_warps}] ({', '.join(v.uses[:3])}…)"
        if v.error:
            found.append(f"does not compile for sm_{arch}: {where}: {v.error}")
        elif v.spill > 0 and not allow_spills:
            found.append(f"spills {v.spill} B/thread at {v.regs} registers: {where}")
        elif v.smem > ARCH_LIMITS[arch]["smem_block"]:
            found.append(f"needs {v.smem} B of shared memory per block: {where}")
    return found


def table(variants: list[Variant], arch: int) -> str:
    lines = [
        f"Triton kernels compiled for sm_{arch} (no GPU used): one row per distinct specialization",
        "",
        "| kernel | constexprs | warps | regs | spill B | smem KiB | blocks/SM | launches |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in sorted(variants, key=lambda v: (v.kernel, -max(v.spill, 0), -v.regs)):
        uses = ", ".join(v.uses[:4]) + (f" and {len(v.uses) - 4} more" if len(v.uses) > 4 else "")
        if v.error:
            lines.append(f"| {v.kernel} | {v.constants} | {v.num_warps} | error: {v.error} "
                         f"| | | | {uses} |")  # fmt: skip
            continue
        lines.append(
            f"| {v.kernel} | {v.constants} | {v.num_warps} | {v.regs} | {v.spill} | "
            f"{v.smem / 1024:.1f} | {v.blocks_per_sm} | {uses} |"
        )
    spilling = sum(v.spill > 0 for v in variants)
    failing = sum(bool(v.error) for v in variants)
    lines += ["", f"{len(variants)} variants, {spilling} spilling, {failing} not compiling"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_LIMITS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="the test suite's subset")
    parser.add_argument("--layers", default="", help="comma-separated layer names (default all)")
    parser.add_argument("--rules", default=",".join(RULE_PARAMS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--fp32-products", default="default", choices=("default", "ieee", "tf32"),
                        help="fp32 dot precision: torch's default TF32 flags, or one for all")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the variants here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a variant that fails to compile, spills or over-asks "
                        "shared memory")  # fmt: skip
    parser.add_argument("--allow-spills", action="store_true",
                        help="with --check: spills do not fail (older Tritons, whose register "
                        "allocation the tiles were not sized for)")  # fmt: skip
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it")
    names = args.layers.split(",") if args.layers else QUICK_LAYERS if args.quick else None
    layers = [layer for layer in LAYERS if names is None or layer.name in names]
    dtypes = QUICK_DTYPES if args.quick else args.dtypes.split(",")
    variants, specs = collect(
        layers, args.rules.split(","), dtypes, args.arch, args.batch, args.fp32_products
    )
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = list(pool.map(compile_variant, specs))
    for variant, result in zip(variants, results):
        if "error" in result:
            variant.error = result["error"]
            continue
        variant.regs, variant.spill, variant.smem = result["regs"], result["spill"], result["smem"]
        variant.blocks_per_sm = blocks_per_sm(variant.regs, variant.smem, variant.num_warps,
                                              args.arch)  # fmt: skip
    text = table(variants, args.arch)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(text + "\n")
    if args.json:
        with open(args.json, "w") as file:
            json.dump([asdict(v) for v in variants], file, indent=1)
    found = problems(variants, args.arch, allow_spills=args.allow_spills)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
