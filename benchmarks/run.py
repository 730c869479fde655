"""Benchmark runner: relprop against a plain gradient, Zennit and Captum on torchvision models.

For each model (and dtype) it builds every method once, times them in interleaved rounds (each
round runs every method once, in an order rotated by one per round, after warm-up rounds), and
measures each method's peak memory: on CPU in a fresh subprocess per method (the resident-set
growth of one call after one warm-up call), on CUDA with ``torch.cuda.max_memory_allocated``.
It prints one markdown table per model and dtype and appends long-format rows to a CSV.

Methods (``--methods``) and their FLOP floor, in gradients (forward F + input-backward B ≈ 2F):

- ``gradient``: ``torch.autograd.grad`` of the max logit's one-hot times its value, input only;
- ``lrp.epsilon`` (floor 1.0×): relprop's analyzer, Zennit's ε on every layer, Captum's LRP;
- ``EpsilonPlusFlat`` (1.5×), ``EpsilonGammaBox`` (1.5×, low=-3, high=3),
  ``EpsilonAlpha2Beta1`` (2.0×): relprop's and Zennit's composites (Zennit with its VGG/ResNet
  canonizer), both explaining the max logit and starting from its value.

Usage::

    python benchmarks/run.py                       # CPU: vgg16, resnet50, batch 4, fp32
    python benchmarks/run.py --quick               # smoke test: resnet18 at 64×64, 2 rounds
    python benchmarks/run.py --device cuda         # GPU: batch 64, fp32 and bf16

See benchmarks/README.md for the GPU machine (Zennit/Captum carried as wheels).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "results.csv"

# FLOP floor of each method in gradients (issue 3): ε needs no more than the gradient, z⁺ and γ
# one extra modified forward per layer, α-β that plus a second transposed product.
FLOOR = {
    "gradient": 1.0,
    "lrp.epsilon": 1.0,
    "EpsilonPlusFlat": 1.5,
    "EpsilonGammaBox": 1.5,
    "EpsilonAlpha2Beta1": 2.0,
}
METHODS = tuple(FLOOR)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CSV_COLUMNS = [
    "date", "device", "torch_version", "model", "batch", "dtype", "method", "provider",
    "median_s", "p20_s", "p80_s", "ratio_to_gradient", "images_per_s", "peak_mem_mb",
    "mem_ratio", "floor_ratio", "floor_fraction", "note",
]  # fmt: skip
EPSILON = 1e-7  # relprop's lrp.epsilon default (iNNvestigate's); Zennit's ε row uses it too
BOX_LOW, BOX_HIGH = -3.0, 3.0


class NotApplicable(Exception):
    """A method a provider cannot run on this model; the message is the reason for the table."""


@dataclass
class Case:
    """One row of the table: a method run by one provider."""

    method: str
    provider: str
    backend: str | None = None  # RELPROP_BACKEND for relprop rows; None = relprop's own choice
    call: Callable[[], object] | None = None
    reason: str = ""  # why the row is n/a
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def key(self) -> str:
        return f"{self.method} / {self.provider}"


# -- models and inputs ------------------------------------------------------------------------


def make_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A torchvision classifier with seeded random weights (no download), eval, frozen."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def make_input(batch: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seeded normalised-image-like input inside the EpsilonGammaBox bounds."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator).clamp_(BOX_LOW, BOX_HIGH)
    return x.to(device=device, dtype=dtype)


def max_logit_output(output: torch.Tensor) -> torch.Tensor:
    """One-hot of each sample's largest logit, times its value: where relprop's LRP starts."""
    index = output.argmax(dim=1, keepdim=True)
    return torch.zeros_like(output).scatter_(1, index, output.gather(1, index))


@contextlib.contextmanager
def relprop_backend(backend: str | None) -> Iterator[None]:
    """Set relprop's switches for the block: ``RELPROP_BACKEND`` (read at every op call), or for
    the ``nondeterministic`` row ``RELPROP_DETERMINISTIC=0`` (cuDNN's fastest algorithms)."""
    if backend == "nondeterministic":
        settings = {"RELPROP_BACKEND": None, "RELPROP_DETERMINISTIC": "0"}
    else:
        settings = {"RELPROP_BACKEND": backend, "RELPROP_DETERMINISTIC": None}
    previous = {name: os.environ.pop(name, None) for name in settings}
    os.environ.update({name: value for name, value in settings.items() if value is not None})
    try:
        yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


# -- the methods ------------------------------------------------------------------------------


def _gradient(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call():
        leaf = x.detach().requires_grad_()
        output = model(leaf)
        (gradient,) = torch.autograd.grad(output, leaf, max_logit_output(output.detach()))
        return gradient

    return call


def _relprop(method: str, model: torch.nn.Module, x: torch.Tensor, backend: str | None):
    import relprop

    with relprop_backend(backend):
        if method == "lrp.epsilon":
            analyzer = relprop.create_analyzer("lrp.epsilon", model)
        else:
            composite = {
                "EpsilonPlusFlat": lambda: relprop.composites.EpsilonPlusFlat(),
                "EpsilonGammaBox": lambda: relprop.composites.EpsilonGammaBox(
                    low=BOX_LOW, high=BOX_HIGH
                ),
                "EpsilonAlpha2Beta1": lambda: relprop.composites.EpsilonAlpha2Beta1(),
            }[method]()
            analyzer = relprop.create_analyzer("lrp", model, composite=composite)

    def call():
        with relprop_backend(backend):
            return analyzer.analyze(x)

    return call


def _zennit_canonizers(model_name: str) -> list:
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if model_name.startswith("vgg"):
        return [VGGCanonizer()]
    if model_name.startswith("resnet"):
        return [ResNetCanonizer()]
    raise NotApplicable(f"no Zennit canonizer chosen for {model_name}")


def _zennit(method: str, model_name: str, model: torch.nn.Module, x: torch.Tensor):
    import zennit.composites as zc
    import zennit.rules as zr
    import zennit.types as zt
    from zennit.attribution import Gradient

    canonizers = _zennit_canonizers(model_name)
    if method == "lrp.epsilon":
        layer_map = zc.layer_map_base() + [
            (zt.Convolution, zr.Epsilon(epsilon=EPSILON)),
            (torch.nn.Linear, zr.Epsilon(epsilon=EPSILON)),
        ]
        composite = zc.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    elif method == "EpsilonPlusFlat":
        composite = zc.EpsilonPlusFlat(canonizers=canonizers)
    elif method == "EpsilonGammaBox":
        composite = zc.EpsilonGammaBox(low=BOX_LOW, high=BOX_HIGH, canonizers=canonizers)
    elif method == "EpsilonAlpha2Beta1":
        composite = zc.EpsilonAlpha2Beta1(canonizers=canonizers)
    else:
        raise NotApplicable(f"Zennit has no {method}")
    # Zennit hooks and canonizes the module in place: it gets its own copy, registered once for
    # the whole benchmark, as a user would keep one `with Gradient(...)` block over a data set.
    own_model = copy.deepcopy(model)
    attributor = Gradient(model=own_model, composite=composite)
    attributor.__enter__()
    own_x = x.clone()

    def call():
        _, relevance = attributor(own_x, max_logit_output)
        return relevance

    return call


def _captum(method: str, model_name: str, model: torch.nn.Module, x: torch.Tensor):
    if method != "lrp.epsilon":
        raise NotApplicable(f"Captum's LRP has no {method} composite")
    if model_name.startswith("resnet"):
        raise NotApplicable(
            "Captum LRP: residual adds are functional (no rule; relevance passes them as a "
            "gradient) and each Bottleneck reuses one ReLU module, which its hooks do not allow"
        )
    from captum.attr import LRP

    own_model = copy.deepcopy(model)  # Captum attaches rules and hooks to the modules
    for module in own_model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # Captum's backward hooks reject in-place activations
    with torch.no_grad():
        target = own_model(x).argmax(dim=1)
    lrp = LRP(own_model)
    own_x = x.clone().requires_grad_()

    def call():
        return lrp.attribute(own_x, target=target)

    return call


def build_call(case: Case, model_name: str, model: torch.nn.Module, x: torch.Tensor):
    """The no-argument callable that runs ``case`` once; raises :class:`NotApplicable`."""
    if case.provider == "torch":
        return _gradient(model, x)
    if case.provider.startswith("relprop"):
        return _relprop(case.method, model, x, case.backend)
    if case.provider == "zennit":
        return _zennit(case.method, model_name, model, x)
    if case.provider == "captum":
        return _captum(case.method, model_name, model, x)
    raise NotApplicable(f"unknown provider {case.provider}")


def plan_cases(methods: list[str], providers: list[str], backends: list[str]) -> list[Case]:
    """Every (method, provider) row to run, the gradient first."""
    cases = [Case("gradient", "torch")]
    for method in methods:
        if method == "gradient":
            continue
        if "relprop" in providers:
            for backend in backends:
                label = "relprop" if backend == "default" else f"relprop[{backend}]"
                cases.append(Case(method, label, None if backend == "default" else backend))
        if "zennit" in providers:
            cases.append(Case(method, "zennit"))
        if "captum" in providers and method == "lrp.epsilon":
            cases.append(Case(method, "captum"))
    return cases


# -- memory on CPU: one fresh process per method ------------------------------------------------


def probe_memory(spec: dict) -> dict:
    """Run in a fresh process: build model and method, one warm-up call, then one measured call."""
    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    device = torch.device("cpu")
    model = make_model(spec["model"], device, dtype)
    x = make_input(spec["batch"], spec["size"], device, dtype)
    case = Case(spec["method"], spec["provider"], spec["backend"])
    try:
        call = build_call(case, spec["model"], model, x)
        call()
        return {"peak_bytes": _measure.cpu_peak_growth(call)}
    except NotApplicable as err:
        return {"reason": str(err)}
    except Exception as err:  # noqa: BLE001  (any failure of a third-party method is a table note)
        return {"reason": _first_line(err)}


def cpu_memory(case: Case, args: argparse.Namespace, model_name: str, dtype: str) -> None:
    spec = {
        "model": model_name, "batch": args.batch, "size": args.size, "dtype": dtype,
        "method": case.method, "provider": case.provider, "backend": case.backend,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    env = {**os.environ, **_measure.MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, __file__, "--probe-memory", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  memory probe of {case.key} failed: {tail}", file=sys.stderr)
        return
    result = json.loads(lines[-1])
    case.peak_bytes = result.get("peak_bytes")


# -- running one model ------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def run_model(model_name: str, dtype_name: str, args: argparse.Namespace) -> list[Case]:
    device = torch.device(args.device)
    dtype = DTYPES[dtype_name]
    model = make_model(model_name, device, dtype)
    x = make_input(args.batch, args.size, device, dtype)
    cases = plan_cases(args.methods, args.providers, args.relprop_backends)
    for case in cases:
        try:
            case.call = build_call(case, model_name, model, x)
        except NotApplicable as err:
            case.reason = str(err)
        except Exception as err:  # noqa: BLE001  (a method that cannot be built is a table note)
            case.reason = _first_line(err)

    if any(case.backend == "auto" for case in cases):
        from relprop.ops import _backend

        _backend.forget_measurements()  # each model and dtype measures its own layers
    runnable = {case.key: case for case in cases if case.call is not None}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def failed(key: str, err: BaseException) -> None:
        runnable[key].reason = _first_line(err)
        runnable[key].call = None

    times = _measure.interleaved_times(
        {key: case.call for key, case in runnable.items()},
        rounds=args.rounds, warmup=args.warmup, synchronize=sync, on_error=failed,
    )  # fmt: skip
    for key, seconds in times.items():
        runnable[key].seconds = seconds
    if any(case.backend == "auto" and case.call is not None for case in cases):
        print(auto_choices(model_name, dtype_name))

    if not args.no_memory:
        for case in cases:
            if device.type == "cuda":
                if case.call is not None:
                    case.peak_bytes = _measure.cuda_peak_growth(case.call, device)
            elif case.call is not None:
                cpu_memory(case, args, model_name, dtype_name)
    if args.profile:
        for case in cases:
            if case.call is not None and case.provider in ("torch", "relprop"):
                summary = _measure.profile_summary(case.call, device.type == "cuda", args.profile)
                print(f"\n### profile: {model_name} {dtype_name} {case.key}\n\n{summary}")
    for case in cases:
        case.call = None  # drop models, hooks and cached programs before the next model
    return cases


# -- reporting --------------------------------------------------------------------------------


def auto_choices(model_name: str, dtype_name: str) -> str:
    """What ``RELPROP_BACKEND=auto`` picked for each layer signature of the run, fastest first."""
    from relprop.ops import _backend

    lines = [f"\n### relprop[auto]: {model_name} {dtype_name}, backend per layer signature\n"]
    lines.append("| layer | input | rule | chosen | times µs |")
    lines.append("| --- | --- | --- | --- | --- |")
    for key, times in _backend.measurements().items():
        kind, shape, weight_shape, rule = key.kind, key.input_shape, key.weight_shape, key.rule
        ranked = sorted(times.items(), key=lambda item: item[1])
        shown = ", ".join(f"{name} {seconds * 1e6:.0f}" for name, seconds in ranked)
        lines.append(
            f"| {kind} {'×'.join(map(str, weight_shape))} | {'×'.join(map(str, shape))} "
            f"| {rule} | {ranked[0][0]} | {shown} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from relprop import _native

    # relprop's CPU element-wise loops: "avx2" or "baseline" (relprop._native.cpu_isa).
    return f"{cpu} ({torch.get_num_threads()} threads; relprop loops {_native.cpu_isa()})"


def rows_of(cases: list[Case], batch: int) -> list[dict]:
    """One dict per case with every derived number (None where it has none)."""
    base = next(c for c in cases if c.method == "gradient")
    base_median = _measure.Timing.of(base.seconds).median if base.seconds else None
    rows = []
    for case in cases:
        row = {"method": case.method, "provider": case.provider, "note": case.reason}
        timing = _measure.Timing.of(case.seconds) if case.seconds else None
        ratio = timing.median / base_median if timing and base_median else None
        row.update(
            median_s=timing.median if timing else None,
            p20_s=timing.p20 if timing else None,
            p80_s=timing.p80 if timing else None,
            ratio_to_gradient=ratio,
            images_per_s=batch / timing.median if timing else None,
            peak_mem_mb=case.peak_bytes / 2**20 if case.peak_bytes is not None else None,
            mem_ratio=(
                case.peak_bytes / base.peak_bytes
                if case.peak_bytes is not None and base.peak_bytes
                else None
            ),
            floor_ratio=FLOOR[case.method],
            floor_fraction=FLOOR[case.method] / ratio if ratio else None,
        )
        rows.append(row)
    return rows


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    milliseconds = seconds * 1e3
    return f"{milliseconds:.0f}" if milliseconds >= 100 else f"{milliseconds:.3g}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        (
            "| method | provider | median ms | p20–p80 ms | × gradient | images/s | peak MB "
            "| mem × gradient | floor × | floor fraction |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for row in rows:
        spread = f"{_ms(row['p20_s'])}–{_ms(row['p80_s'])}" if row["p20_s"] is not None else "n/a"
        median = _ms(row["median_s"])
        mark = ""
        if row["note"]:
            notes.append(row["note"])
            mark = f" [{len(notes)}]"
        lines.append(
            f"| {row['method']} | {row['provider']}{mark} | {median} | {spread} "
            f"| {_fmt(row['ratio_to_gradient'], '.2f')} | {_fmt(row['images_per_s'], '.1f')} "
            f"| {_fmt(row['peak_mem_mb'], '.0f')} | {_fmt(row['mem_ratio'], '.2f')} "
            f"| {row['floor_ratio']:.1f} | {_fmt(row['floor_fraction'], '.2f')} |"
        )
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


# Issue 3's targets (H100/H200, batch 64): relprop's time as a multiple of the gradient's, its
# speed-up over Zennit on the same composite, and its peak memory as a multiple of the gradient's.
TIME_TARGETS = {
    "lrp.epsilon": 1.1, "EpsilonPlusFlat": 1.6, "EpsilonGammaBox": 1.6, "EpsilonAlpha2Beta1": 2.2,
}  # fmt: skip
ZENNIT_SPEEDUP_TARGETS = {"EpsilonPlusFlat": 1.6, "EpsilonGammaBox": 3.0, "EpsilonAlpha2Beta1": 2.0}
MEMORY_TARGET = 1.2


def targets_table(rows: list[dict]) -> str:
    """Issue 3's targets against this run, for each relprop row (its own dispatch, and
    ``relprop[auto]`` where it ran): the measured value and ✓ or ✗."""
    providers = [p for p in ("relprop", "relprop[auto]") if any(r["provider"] == p for r in rows)]
    by_key = {(r["method"], r["provider"]): r for r in rows}

    def cell(value: float | None, ok: bool | None, pattern: str = ".2f") -> str:
        if value is None:
            return "n/a"
        return f"{value:{pattern}} {'✓' if ok else '✗'}"

    header = "| target | " + " | ".join(providers) + " |"
    lines = [header, "| --- |" + " ---: |" * len(providers)]
    for method, limit in TIME_TARGETS.items():
        values = [by_key.get((method, p), {}).get("ratio_to_gradient") for p in providers]
        cells = [cell(v, v is not None and v <= limit) for v in values]
        lines.append(f"| {method} ≤ {limit}× gradient | " + " | ".join(cells) + " |")
    for method, limit in ZENNIT_SPEEDUP_TARGETS.items():
        zennit = by_key.get((method, "zennit"), {}).get("median_s")
        cells = []
        for p in providers:
            mine = by_key.get((method, p), {}).get("median_s")
            speedup = zennit / mine if zennit and mine else None
            cells.append(cell(speedup, speedup is not None and speedup >= limit))
        lines.append(f"| {method}: Zennit ÷ relprop ≥ {limit} | " + " | ".join(cells) + " |")
    cells = []
    for p in providers:
        ratios = [r["mem_ratio"] for r in rows if r["provider"] == p and r["mem_ratio"] is not None]
        worst = max(ratios) if ratios else None
        cells.append(cell(worst, worst is not None and worst <= MEMORY_TARGET))
    lines.append(
        f"| peak memory ≤ {MEMORY_TARGET}× gradient (worst method) | " + " | ".join(cells) + " |"
    )
    return "\n".join(lines)


def append_csv(path: Path, rows: list[dict], common: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            record = {**common, **row}
            writer.writerow({
                k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                for k, v in record.items()
            })  # fmt: skip


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--models", default=None, help="comma-separated torchvision names (default vgg16,resnet50)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=224, help="image height = width")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 5 on CPU, 10 on CUDA)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds first (default 1 on CPU, 2 on CUDA)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated of float32, bfloat16, float16 (default float32 on "
        "CPU, float32,bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated of {', '.join(METHODS)}; gradient always runs",
    )
    parser.add_argument(
        "--providers",
        default="relprop,zennit,captum",
        help="comma-separated of relprop, zennit, captum",
    )
    parser.add_argument(
        "--relprop-backends",
        default=None,
        help="comma-separated of default, native, triton, reference, auto (measured per layer "
        "shape), nondeterministic (relprop's choice with RELPROP_DETERMINISTIC=0): one relprop "
        "row each (default: 'default' on CPU, 'default,nondeterministic,auto,triton,reference' "
        "on CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's choice); on a loaded machine 1 "
        "avoids OpenMP threads spinning against other processes",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument(
        "--targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print issue 3's targets against each model's table (default: on CUDA)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile one call of the gradient and each default relprop row and "
        "print the ROWS ops with the most self time",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: resnet18 at 64×64, batch 2, 2 rounds, no CSV unless --csv is given",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="CSV to append to (default benchmarks/results/results.csv)",
    )
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the printed tables to this file"
    )
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    cuda = args.device == "cuda"
    if args.quick:
        args.models = args.models or "resnet18"
        args.size = 64
        args.batch = args.batch or 2
        args.rounds = args.rounds or 2
    args.models = (args.models or "vgg16,resnet50").split(",")
    args.batch = args.batch or (64 if cuda else 4)
    args.rounds = args.rounds or (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.dtype = (args.dtype or ("float32,bfloat16" if cuda else "float32")).split(",")
    args.targets = cuda if args.targets is None else args.targets
    args.methods = [m for m in args.methods.split(",") if m]
    args.providers = [p for p in args.providers.split(",") if p]
    args.relprop_backends = (
        args.relprop_backends
        or ("default,nondeterministic,auto,triton,reference" if cuda else "default")
    ).split(",")
    if args.csv is None and not args.quick:
        args.csv = RESULTS_CSV
    for name in args.dtype:
        if name not in DTYPES:
            parser.error(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    for name in args.methods:
        if name not in FLOOR:
            parser.error(f"--methods {name!r} is not one of {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_memory is not None:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda: no CUDA device is visible to torch here (torch.cuda.is_available() "
            "is False); run it on a GPU machine, see benchmarks/README.md",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda":
        # cuDNN picks the fastest algorithm per shape once; every provider profits alike.
        torch.backends.cudnn.benchmark = True

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    header = (
        f"# relprop benchmark — {date}\n\n"
        f"device: {device_name(device)}; torch {torch.__version__}; batch {args.batch}; "
        f"{args.size}×{args.size}; {args.rounds} rounds after {args.warmup} warm-up; "
        f"{_measure.load_average()} at start"
    )
    print(header, flush=True)
    if device.type == "cpu" and torch.get_num_threads() > 1:
        with contextlib.suppress(OSError):
            if os.getloadavg()[0] >= (os.cpu_count() or 1):
                print(
                    "warning: the load average is at least the CPU count; OpenMP threads will "
                    "contend with other processes: --threads 1 gives steadier numbers",
                    file=sys.stderr,
                )
    output = [header]
    for dtype_name in args.dtype:
        for model_name in args.models:
            cases = run_model(model_name, dtype_name, args)
            rows = rows_of(cases, args.batch)
            title = (
                f"## {model_name}, batch {args.batch}, {dtype_name} "
                f"({_measure.load_average()} after)"
            )
            table = markdown_table(rows)
            if args.targets:
                table += "\n\nIssue 3's targets (set for an H100/H200 at batch 64):\n\n"
                table += targets_table(rows)
            print(f"\n{title}\n\n{table}", flush=True)
            output += [title, table]
            if args.csv is not None:
                common = {
                    "date": date, "device": device_name(device), "torch_version": torch.__version__,
                    "model": model_name, "batch": args.batch, "dtype": dtype_name,
                }  # fmt: skip
                append_csv(args.csv, rows, common)
            if args.markdown is not None:  # after each model: a run cut short keeps its tables
                args.markdown.parent.mkdir(parents=True, exist_ok=True)
                args.markdown.write_text("\n\n".join(output) + "\n")
            # Free this model's cases (models, Zennit's hooked copies, inputs) before the next
            # is built: on an H100 the float32 leftovers left bfloat16 out of memory.
            del cases, rows
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
