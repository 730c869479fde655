"""The fused Triton kernels compile for an H100 and stay within its registers, checked without one.

The interpreter tests check what the kernels compute, in tiny blocks on the CPU. They say nothing
of what ptxas makes of the real blocks: a kernel that needs more than 255 registers a thread
spills to local memory. The H100 run that found the Triton kernels 5–60× slower than the torch
composition on most shapes (``benchmarks/results/gpu_h100_2026-11-23.md``) ran tiles of which 48 of this
quick set's 128 variants spilled. ``benchmarks/triton_resources.py`` records the
launches relprop's host code makes on VGG16/ResNet50 layers as the JIT would specialise them for
sm_90, compiles them ahead of time with Triton's compiler and ptxas, and reads the cubins'
resource usage; here it runs on the quick set of layers, in a child process because the
interpreter (set for this process by the root conftest) compiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relprop._kernels.triton._common import OLD_TRITON

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "benchmarks" / "triton_resources.py"
RULES = ("epsilon", "wsquare", "flat", "zplus", "alphabeta", "gamma", "zbox")
# benchmarks/triton_resources.py's --quick set: a 3-channel first layer (mixed-sign input, every
# x⁻ product), a strided 3×3, a 1×1 and a dense layer.
QUICK_LAYERS = ("vgg16.conv1_1", "resnet50.layer2.conv2", "resnet50.layer1.conv1", "vgg16.fc7")


def _compiled_variants(directory: Path, *options: str) -> list[dict]:
    out = directory / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--arch", "90", "--json", str(out), "--workers",
         str(min(4, os.cpu_count() or 1)), *options],
        env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sm90_variants(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The quick set under torch's default flags (TF32 convolutions, IEEE dense layers)."""
    return _compiled_variants(tmp_path_factory.mktemp("triton_resources"))


@pytest.fixture(scope="module")
def sm90_ieee_variants(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The quick set with TF32 off (as the GPU tests run): fp32 products in IEEE precision."""
    return _compiled_variants(
        tmp_path_factory.mktemp("triton_resources_ieee"), "--fp32-products", "ieee"
    )


def test_every_launch_of_every_rule_is_recorded(sm90_variants):
    """The recorder saw each layer step's forward and relevance launch (and the w²/flat
    denominator launch): a launch that ran elsewhere, or not at all, would leave a gap."""
    uses = [use for v in sm90_variants for use in v["uses"]]
    for layer in QUICK_LAYERS:
        for rule in RULES:
            for dtype in ("fp32", "bf16"):
                step = f"{layer}/{rule}/{dtype}"
                expected = 3 if rule in ("wsquare", "flat") else 2
                assert uses.count(step) == expected, (step, uses.count(step))
    kernels = {v["kernel"] for v in sm90_variants}
    assert kernels == {
        "conv2d_forward_kernel",
        "conv2d_relevance_kernel",
        "linear_forward_kernel",
        "linear_relevance_kernel",
    }


def test_every_variant_compiles_for_sm90(sm90_variants):
    broken = [(v["kernel"], v["constants"], v["error"]) for v in sm90_variants if v["error"]]
    assert not broken, broken


def test_no_variant_spills_registers_on_sm90(sm90_variants):
    spilling = [
        (v["kernel"], v["constants"], f"num_warps={v['num_warps']}", f"{v['regs']} regs",
         f"{v['spill']} B spilled", v["uses"][:2])
        for v in sm90_variants
        if v["spill"] > 0
    ]  # fmt: skip
    assert not spilling, "\n".join(map(str, spilling))


def test_shared_memory_within_an_h100_block(sm90_variants):
    """Within the 227 KiB a block may have, so every program can be resident on a multiprocessor."""
    for v in sm90_variants:
        assert 0 < v["smem"] <= 227 * 1024, (v["kernel"], v["constants"], v["smem"])
        assert v["blocks_per_sm"] >= 1, (v["kernel"], v["constants"], v["blocks_per_sm"])


def test_every_ieee_fp32_variant_compiles_for_sm90(sm90_ieee_variants):
    assert {v["kernel"] for v in sm90_ieee_variants} >= {
        "conv2d_forward_kernel",
        "linear_forward_kernel",
    }
    assert not [v for v in sm90_ieee_variants if v["error"]]


# Triton 3.0 and 3.1 cannot compile several sm_90 convolutions at 8 warps, so there they launch
# 4 warps on half-wide tiles (conv._four_warps), which the tile tables were not sized for: with
# Triton 3.0, 13 of the 128 IEEE-fp32 variants spill, all of them such, up to 80 bytes a thread.
@pytest.mark.skipif(
    OLD_TRITON,
    reason="Triton < 3.2: the sm_90 convolutions run conv._four_warps' 4-warp fallback tiles, "
    "which these spill bounds were not tuned for",
)
def test_ieee_fp32_spills_stay_small(sm90_ieee_variants):
    """With TF32 off a few convolution variants keep a small spill where ptxas holds them to 128
    registers (docs/ops.md); the tiles before the per-kind tables spilled up to 7 KB a thread
    in two of three of these variants."""
    spilling = [v for v in sm90_ieee_variants if v["spill"] > 0]
    assert all(v["spill"] <= 64 for v in spilling), [(v["constants"], v["spill"]) for v in spilling]
    assert len(spilling) <= len(sm90_ieee_variants) // 10, [
        (v["constants"], v["spill"]) for v in spilling
    ]
