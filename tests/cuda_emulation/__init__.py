"""relprop's CUDA kernels, compiled for and run on the CPU.

CI has nvcc but no GPU, so ``kernels/cuda/*.cu`` compile there and never run. This package builds
a second ``relprop._C`` whose CUDA entry points are those same sources compiled by the host C++
compiler against stand-ins for the CUDA headers (``include/``): every thread of a launch runs,
block by block and warp by warp, each warp's 32 lanes as fibers so that warp shuffles behave as
on the device (``include/cuda_runtime.h`` says what is and is not emulated). The only change to
the sources is the launch syntax, ``k<<<grid, block, shared, stream>>>(args)``, which the builder
rewrites to a call.

:func:`emulate_cuda` then points ``relprop._native`` at that module and sends every native op
through its CUDA branch: the ops build their CUDA arguments (workspaces, launch arguments, the
16-bit dtypes) and call the CUDA entry points with CPU tensors, whose addresses the emulated
kernels read. The result is the kernels' own arithmetic and indexing, checked against the
references on any machine; what it cannot show is device-only behaviour (timing, memory faults
of other threads, the real runtime).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# `kernel<<<config>>>(` where kernel is a name with optional template arguments.
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)

_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    # Two roundings for a product and a sum, as the device computes them without contraction.
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-Wall",
    "-Wno-unknown-pragmas",  # the CPU twins' OpenMP pragmas (no -fopenmp: one thread is enough)
    "-DRELPROP_WITH_CUDA=1",
]


def host_source(text: str) -> str:
    """``text`` with every ``k<<<config>>>(args)`` launch rewritten to an emulated launch call."""
    launches = text.count("<<<")
    rewritten, count = _LAUNCH.subn(r"::relprop_emulation::launch(\1, \2)(", text)
    if count != launches or "<<<" in rewritten:
        raise RuntimeError(f"rewrote {count} of {launches} kernel launches; extend _LAUNCH")
    return rewritten


def _sources() -> list[Path]:
    return [
        REPO / "csrc" / "bindings.cpp",
        *sorted((REPO / "csrc" / "cpu").glob("*.cpp")),
        *sorted((REPO / "kernels" / "cuda").glob("*.cu")),
    ]


def _inputs_digest(compiler: str, includes: list[str]) -> str:
    digest = hashlib.sha256()
    files = [
        *_sources(),
        *sorted((REPO / "csrc" / "include").rglob("*")),
        *sorted(HERE.rglob("*.h")),
        Path(__file__),
    ]
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    digest.update(" ".join([compiler, *_FLAGS, *includes, sys.version]).encode())
    return digest.hexdigest()[:16]


def _compile(compiler: str, flags: list[str], source: Path, obj: Path) -> None:
    result = subprocess.run(
        [compiler, *flags, "-c", str(source), "-o", str(obj)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"compiling {source.name} for the CUDA emulation failed:\n{result.stderr}"
        )


@functools.cache
def build() -> Path:
    """The emulated module's shared library, built once per source state (cached on disk)."""
    import pybind11

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    includes = [
        f"-I{HERE / 'include'}",  # before the system's: these are the CUDA headers here
        f"-I{REPO / 'csrc' / 'include'}",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target_dir = cache_root / "relprop" / "cuda-emulation" / _inputs_digest(compiler, includes)
    library = target_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if library.exists():
        return library
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir.parent) as scratch:
        work = Path(scratch)
        units = []
        for source in _sources():
            if source.suffix == ".cu":
                host = work / f"{source.stem}_cu.cpp"
                host.write_text(f'#line 1 "{source}"\n' + host_source(source.read_text()))
                units.append(host)
            else:
                units.append(source)
        objects = [work / f"{unit.stem}.o" for unit in units]
        flags = [*_FLAGS, *includes]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(lambda pair: _compile(compiler, flags, *pair), zip(units, objects)))
        built = work / library.name
        result = subprocess.run(
            [compiler, "-shared", "-o", str(built), *map(str, objects), "-pthread"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"linking the CUDA emulation failed:\n{result.stderr}")
        target_dir.mkdir(exist_ok=True)
        os.replace(built, library)  # atomic: a concurrent build (xdist) finds a whole file
    return library


@functools.cache
def load() -> ModuleType:
    """The emulated ``relprop._C`` (imported under another name, beside the real one)."""
    spec = importlib.util.spec_from_file_location("relprop_cuda_emulation._C", build())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingModule:
    """The emulated module, counting the calls of its CUDA entry points (``calls``): a test can
    tell that its ops ran the kernels rather than falling back to a reference."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str):
        entry = getattr(self._module, name)
        if not name.endswith("_cuda"):
            return entry

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return entry(*args, **kwargs)

        return counted


def emulate_cuda(monkeypatch: pytest.MonkeyPatch) -> CountingModule:
    """Route every native op through its CUDA branch, run by the emulated kernels, for one test.

    ``RELPROP_BACKEND=native`` makes the ops take the native path (on CUDA they would by
    default); the tensors stay on the CPU. Returns the module the ops now call.
    """
    from relprop import _native

    module = CountingModule(load())
    monkeypatch.setattr(_native, "_module", module)
    monkeypatch.setattr(_native, "on_cuda", lambda tensor: True)
    monkeypatch.setattr(_native, "cuda_launch_args", lambda tensor: {"stream": 0, "device": 0})
    monkeypatch.setenv("RELPROP_BACKEND", "native")
    return module
