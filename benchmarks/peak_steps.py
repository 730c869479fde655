"""Where each method's memory peaks: the bytes alive before each step of one call and the most
alive during it, the steps with the highest peaks first.

``run.py`` gives each method's peak; this says where it happens, so that a peak above the
gradient's can be traced to a step (and compared with the gradient's op at the same layer). On
CUDA the numbers are the caching allocator's (``torch.cuda.memory_allocated`` and its peak), so
cuDNN's workspaces are in them; on the CPU they are the storage ledger's of the tests
(``tests/oracles/live_bytes.py``: tensors only, as ``traffic.py`` counts them).

- relprop's methods are timed per plan step (``graph.layers``' ``forward`` and ``relevance``,
  named by the plan's module paths), without a dispatch mode on CUDA, so the analysis runs as it
  does in ``run.py`` (in eager mode its ops are called as functions; a dispatch mode would send
  them through the dispatcher, which changes what they allocate);
- the gradient is recorded per aten op (``convolution_backward #12``): its backward runs inside
  autograd, with no step of relprop's to hang the numbers on.

Every number is above what was alive before the call (the model's weights and the input). The
call is run once before it is measured (the analyzers' first call traces the model).

Usage::

    python benchmarks/peak_steps.py --device cuda --models vgg16 --methods gradient,lrp.epsilon
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import run  # the benchmark's models, inputs and methods
from tests.oracles.live_bytes import LiveBytes  # the memory oracle the tests use


@dataclass
class Step:
    """One step of a call: its name, the bytes alive as it began, the most alive during it."""

    name: str
    before: int
    peak: int


class CudaMeter:
    """The caching allocator's statistics of the current device."""

    def live(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()

    @contextmanager
    def active(self) -> Iterator[None]:
        yield


class LedgerMeter:
    """The storage ledger of every op run under it (the CPU has no allocator statistics); a
    relprop op's kernel runs under it too, so what it allocates inside is seen."""

    def __init__(self) -> None:
        self.mode = LiveBytes()

    def live(self) -> int:
        return self.mode.live

    def reset_peak(self) -> None:
        self.mode.reset_peak()

    def peak(self) -> int:
        return self.mode.peak

    @contextmanager
    def active(self) -> Iterator[None]:
        with self.mode:
            yield


class OpSteps(TorchDispatchMode):
    """Records each aten op as a step (the gradient's), reading ``meter`` around it."""

    def __init__(self, meter, steps: list[Step]) -> None:
        super().__init__()
        self.meter, self.steps, self.seen = meter, steps, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = self.meter.live()
        self.meter.reset_peak()
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.seen[name] = self.seen.get(name, 0) + 1
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.steps.append(Step(f"{name} #{self.seen[name]} {shape}", before, self.meter.peak()))
        return out


@contextmanager
def layer_steps(analyzer, meter, steps: list[Step]) -> Iterator[None]:
    """Records each plan step of ``analyzer``'s calls (forward and relevance of its layers)."""
    from relprop.graph import layers

    names = {id(s.layer): s.path or s.name for s in analyzer.plan.steps if s.layer is not None}
    classes = [
        c for c in vars(layers).values() if isinstance(c, type) and issubclass(c, layers.Layer)
    ]
    depth = [0]
    patched = []
    meter.reset_peak()
    # What the program does between its steps (the folds of a pass's start, the selection mask)
    # is a step too, named after the step it precedes: its peak is read as the next step begins.
    last = {"live": meter.live(), "name": "the call's start"}

    def wrap(original, phase):
        def measured(self, *args):
            depth[0] += 1
            if depth[0] == 1:
                name = f"{names.get(id(self), type(self).__name__)} ({phase})"
                before = meter.live()
                if meter.peak() > max(last["live"], before):
                    steps.append(
                        Step(f"between {last['name']} and {name}", last["live"], meter.peak())
                    )
                meter.reset_peak()
            try:
                return original(self, *args)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    steps.append(Step(name, before, meter.peak()))
                    last["live"], last["name"] = meter.live(), name
                    meter.reset_peak()

        return measured

    for cls in classes:
        for phase in ("forward", "relevance"):
            if phase in cls.__dict__:
                patched.append((cls, phase, cls.__dict__[phase]))
                setattr(cls, phase, wrap(cls.__dict__[phase], phase))
    try:
        yield
    finally:
        for cls, phase, original in patched:
            setattr(cls, phase, original)


def whole_call_peak(call: Callable[[], object], meter) -> int:
    """The most bytes alive during ``call()`` above those alive before it."""
    with meter.active():
        # Once under the meter first: what a call keeps for the next (the analyzers' folded
        # weights, into whose memory the next call folds again) is then on the ledger when
        # the next call replaces it, as the allocator sees it.
        call()
        before = meter.live()
        meter.reset_peak()
        call()
        return meter.peak() - before


def measure(model_name: str, method: str, device: str, batch: int, size: int, dtype: str):
    """``(whole-call peak, steps)`` of one method (``"gradient"`` or one of ``run.FLOOR``'s)."""
    dev, torch_dtype = torch.device(device), getattr(torch, dtype)
    model = run.make_model(model_name, dev, torch_dtype)
    x = run.make_input(batch, size, dev, torch_dtype)
    gradient = method == "gradient"
    case = run.Case(method, "torch" if gradient else "relprop")
    call = run.build_call(case, model_name, model, x)
    call()  # the analyzers' first call traces the model; cuDNN picks its algorithms
    meter = CudaMeter() if dev.type == "cuda" else LedgerMeter()
    peak = whole_call_peak(call, meter)
    steps: list[Step] = []
    if gradient:
        recorder = OpSteps(meter, steps)
        with meter.active():
            base = meter.live()
            with recorder:
                call()
    else:
        analyzer = _analyzer_of(call)
        with meter.active():
            base = meter.live()
            with layer_steps(analyzer, meter, steps):
                call()
                if meter.peak() > meter.live():
                    steps.append(Step("after the last step", meter.live(), meter.peak()))
    return peak, [Step(s.name, s.before - base, s.peak - base) for s in steps]


def _analyzer_of(call: Callable[[], object]):
    """The analyzer ``run._relprop``'s call closes over."""
    import relprop

    for cell in call.__closure__ or ():
        if isinstance(cell.cell_contents, relprop.analyzers.base.Analyzer):
            return cell.cell_contents
    raise LookupError("run._relprop's call holds no analyzer")


def report(model_name: str, method: str, peak: int, steps: list[Step], top: int) -> str:
    mib = 2**20
    lines = [
        f"### {model_name} {method}: peak {peak / mib:.1f} MiB above the weights and input",
        "",
        "| step | alive before, MiB | peak in it, MiB | its own, MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    # The highest peaks first; among equal ones, the step that allocated most itself.
    for s in sorted(steps, key=lambda s: (s.peak, s.peak - s.before), reverse=True)[:top]:
        lines.append(
            f"| {s.name} | {s.before / mib:.1f} | {s.peak / mib:.1f} | "
            f"{(s.peak - s.before) / mib:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--methods", default=",".join(run.FLOOR))
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--top", type=int, default=6, help="steps listed per method")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    batch = args.batch or (64 if args.device == "cuda" else 4)
    parts = [f"# Peak memory by step, batch {batch}, {args.size}², {args.dtype}, {args.device}\n"]
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            peak, steps = measure(model_name, method, args.device, batch, args.size, args.dtype)
            parts.append(report(model_name, method, peak, steps, args.top))
            print(parts[-1], flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
