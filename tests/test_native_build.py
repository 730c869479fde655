"""The compiled module must be there: a silent fallback to the references must not hide a broken
build. ``RELPROP_ALLOW_NO_NATIVE=1`` is the explicit opt-out (e.g. a source checkout without a
compiler)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from relprop import _native

ALLOW_NO_NATIVE = os.environ.get("RELPROP_ALLOW_NO_NATIVE") == "1"

# Makes `relprop._C` unimportable in a child interpreter, as on a machine where the build failed.
BLOCK_NATIVE = textwrap.dedent(
    """
    import sys

    class _BlockNative:
        def find_spec(self, name, path=None, target=None):
            if name == "relprop._C":
                raise ImportError("simulated: relprop._C was not built")
            return None

    sys.meta_path.insert(0, _BlockNative())
    """
)


def _run_python(code: str, allow_no_native: bool) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RELPROP_ALLOW_NO_NATIVE", "RELPROP_BACKEND")
    }
    if allow_no_native:
        env["RELPROP_ALLOW_NO_NATIVE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", BLOCK_NATIVE + textwrap.dedent(code)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_native_module_loaded():
    if ALLOW_NO_NATIVE and not _native.native_available():
        pytest.skip(
            f"RELPROP_ALLOW_NO_NATIVE=1 and relprop._C did not load: {_native.native_error()}"
        )
    assert _native.native_available(), (
        f"relprop._C did not load ({_native.native_error()}): the build is broken. Rebuild with "
        "`pip install -e .`, or set RELPROP_ALLOW_NO_NATIVE=1 to run on the references only."
    )


def test_cuda_sources_compiled_when_nvcc_is_present():
    if not _native.native_available():
        pytest.skip(f"relprop._C did not load: {_native.native_error()}")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH, so the CPU-only module is expected")
    if os.environ.get("RELPROP_WITH_CUDA", "ON").upper() in ("OFF", "0", "FALSE"):
        pytest.skip("the build was asked for no CUDA (RELPROP_WITH_CUDA=OFF)")
    assert _native.cuda_compiled(), "nvcc is on PATH but relprop._C holds no CUDA kernels"
    # The CUDA runtime is linked statically: asking for devices works here even without a GPU.
    assert _native.native().cuda_device_count() >= 0


def test_import_without_native_warns_once_and_uses_the_references():
    result = _run_python(
        """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import relprop
            import torch
            import torch.nn.functional as F
            from relprop import _native
            from relprop.ops import pool
            x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
            out, idx = F.max_pool2d(x, 2, return_indices=True)
            got = pool.max_pool_relevance(out, idx, x.shape)
            pool.avg_pool_relevance(x, out, 2)
        assert not _native.native_available()
        assert "simulated" in _native.native_error()
        messages = [str(w.message) for w in caught if "relprop._C" in str(w.message)]
        assert len(messages) == 1, messages
        # With R = the pooled values, each window's maximum keeps its value, the rest is zero.
        assert torch.equal(got, F.max_unpool2d(out, idx, 2, output_size=x.shape[2:]))
        print("OK")
        """,
        allow_no_native=False,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_opt_out_silences_the_warning():
    result = _run_python(
        """
        import warnings
        warnings.simplefilter("error")
        import relprop
        from relprop import _native
        from relprop.ops import pool
        assert not _native.native_available()
        print("OK")
        """,
        allow_no_native=True,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


@pytest.mark.parametrize("allow_no_native", [False, True], ids=["strict", "opted-out"])
def test_broken_build_guard(allow_no_native):
    # The guard itself: test_native_module_loaded fails without relprop._C unless opted out.
    test_id = f"{os.path.abspath(__file__)}::test_native_module_loaded"
    result = _run_python(
        f"""
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", {test_id!r}]))
        """,
        allow_no_native=allow_no_native,
    )
    if allow_no_native:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 skipped" in result.stdout
    else:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "1 failed" in result.stdout


def _parameter_names(entry) -> list[str]:
    """Keyword names of a pybind11 function, read off the signature line of its docstring."""
    signature = entry.__doc__.splitlines()[0]
    return re.findall(r"[(,]\s*(\w+):", signature)


def test_cuda_entries_take_the_cpu_twins_arguments_plus_the_launch(monkeypatch):
    # The Python glue builds one keyword dict for both twins and adds the launch keywords for
    # CUDA (relprop/ops/*.py: `**_native.cuda_launch_args(...)`, a workspace for the pools, the
    # max pool's offset bounds). No
    # test here can call a CUDA entry, so a keyword that drifts between the twins would first
    # fail on a GPU; this compares the compiled signatures instead.
    if not _native.native_available():
        pytest.skip(f"relprop._C did not load: {_native.native_error()}")
    if not _native.cuda_compiled():
        pytest.skip("relprop._C was built without its CUDA kernels")
    module = _native.native()
    cpu_entries = sorted(n for n in dir(module) if n.endswith("_cpu"))
    assert cpu_entries == [
        "adaptive_avg_pool2d_relevance_cpu", "add_relu_cpu", "avg_pool2d_relevance_cpu",
        "bias_relu_cpu", "max_pool_divided_relevance_cpu",
        "max_pool_relevance_cpu", "paired_shares_cpu", "stabilized_divide_cpu",
    ]  # fmt: skip
    # The launch keywords as the glue makes them, with torch's stream queries stubbed (no GPU).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    launch = list(_native.cuda_launch_args(torch.zeros(1)))
    for cpu_name in cpu_entries:
        name = cpu_name.removesuffix("_cpu")
        cpu = _parameter_names(getattr(module, cpu_name))
        cuda = _parameter_names(getattr(module, f"{name}_cuda"))
        workspace = ["workspace"] if "pool" in name else []
        # The max pool's winners' offset bounds, where the pool's window gives them (the CPU
        # twin scatters and needs none).
        bounds = ["offset_bounds"] if name.startswith("max_pool") else []
        assert cuda == cpu + workspace + bounds + launch, (name, cpu, cuda)
