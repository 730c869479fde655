"""``benchmarks/bench_ops_triton.py`` runs end to end, so that a GPU session does not find it
broken: on tiny layer shapes in Triton's interpreter (``--device cpu --smoke``). Oracle for the
numbers it reports: its Triton relevance against relprop's reference of the same op."""

from __future__ import annotations

import csv

import pytest
from tests._benchmarks import load_benchmark
from tests.kernels._common import DEVICE, needs_triton

PROVIDERS = ("gradient", "triton", "native", "reference")
# Largest |triton − reference| over max |reference| the script may report: a few ulps of the
# dtype (float16's shares are saturated alike on both paths, docs/ops.md).
MAX_DEVIATION = {"fp32": 1e-5, "fp16": 1e-2}


@needs_triton
@pytest.mark.interpret
@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU session runs the script itself, compiled")
def test_smoke_run_writes_every_row_and_the_kernels_match_the_reference(tmp_path):
    bench = load_benchmark("bench_ops_triton.py")
    out = tmp_path / "bench_ops.csv"
    argv = ["--device", "cpu", "--smoke", "--batch", "2", "--dtypes", "fp32,fp16"]
    argv += ["--out", str(out)]
    assert bench.main(argv) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    expected = {
        (layer.name, rule, dtype, provider)
        for layer in bench.SMOKE_LAYERS
        for rule in bench.rules_for(layer)
        for dtype in MAX_DEVIATION
        for provider in PROVIDERS
    }
    pooled = [r for r in rows if r["op"] == "max_pool_divided_relevance"]
    rows = [r for r in rows if r["op"] != "max_pool_divided_relevance"]
    times = {(r["layer"], r["rule"], r["dtype"], r["provider"]): r for r in rows
             if r["metric"] == "time_ms"}  # fmt: skip
    assert set(times) == expected
    assert all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in times.values())
    deviations = [r for r in rows if r["metric"] == "max_rel_dev"]
    assert len(deviations) == len(expected) // len(PROVIDERS)
    for row in deviations:
        assert float(row["p50"]) <= MAX_DEVIATION[row["dtype"]], row
    # The pools' step: every provider timed, the fused op against the three ops it replaces.
    pool_times = {(r["layer"], r["dtype"], r["provider"]) for r in pooled
                  if r["metric"] == "time_ms"}  # fmt: skip
    assert pool_times == {
        (pool.name, dtype, provider)
        for pool in bench.SMOKE_POOLS
        for dtype in MAX_DEVIATION
        for provider in bench.POOL_PROVIDERS
    }
    pool_deviations = [r for r in pooled if r["metric"] == "max_rel_dev"]
    assert len(pool_deviations) == len(bench.SMOKE_POOLS) * len(MAX_DEVIATION)
    for row in pool_deviations:
        assert float(row["p50"]) <= MAX_DEVIATION[row["dtype"]], row


def test_cpu_device_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        load_benchmark("bench_ops_triton.py").main(["--device", "cpu", "--smoke"])
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
