"""Test-suite set-up: markers, and Triton's interpreter on machines without a GPU.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it happens here, at the
top of the root conftest, whenever no CUDA device is visible.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def _cuda_visible() -> bool:
    # Ask a subprocess: importing torch here first would not hurt, but keeping this process free
    # of CUDA initialisation until the tests decide is cheaper to reason about.
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode
        == 0
    )


if "TRITON_INTERPRET" not in os.environ and not _cuda_visible():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "interpret: Triton kernels run by the CPU interpreter")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """End a pytest-xdist worker whose CUDA context a test broke.

    A device-side fault (an illegal address, say) is sticky: every later CUDA call in the
    process fails with it, so one broken kernel would fail every test the worker runs next.
    Ending the worker makes xdist report this test as the one that crashed it and start a fresh
    worker for the rest. Without xdist the error is reported as usual.
    """
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    if (
        error is not None
        and os.environ.get("PYTEST_XDIST_WORKER")
        and "illegal" in str(error)
        and "CUDA" in str(error)
    ):
        sys.stderr.write(f"{item.nodeid}: {str(error).splitlines()[0]}\n")
        sys.stderr.flush()
        os._exit(70)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
    failure = _interpreter_failure()
    if failure is not None:
        skip_interpret = pytest.mark.skip(reason=failure)
        for item in items:
            if "interpret" in item.keywords:
                item.add_marker(skip_interpret)


def _interpreter_failure() -> str | None:
    """Why Triton's interpreter cannot run the kernels in this environment (Triton 3.0's beside
    NumPy 2, say), or None: there its tests skip with that reason instead of failing on garbage."""
    if importlib.util.find_spec("triton") is None:  # the kernel tests' ``needs_triton`` skips
        return None
    from relprop._kernels.triton._common import interpreter_failure

    return interpreter_failure()
