"""Pieces shared by the linear and conv2d LRP kernels.

Host side: rule codes, parameter parsing, dtype checks. Device side (``@triton.jit`` helpers that
the kernels inline): the stabiliser, the per-rule accumulation of the modified forward, the
per-rule relevance scales ``s = R / stab(z, e)`` and the per-rule accumulation and epilogue of the
transposed product. The maths is the op contract of ``docs/ops.md``; the rules are Zennit 0.5's
``Epsilon``, ``WSquare``, ``Flat``, ``ZPlus``, ``AlphaBeta``, ``Gamma`` and ``ZBox`` (Bach et al.,
PLoS ONE 2015; Montavon et al., Pattern Recognition 2017; Montavon et al., Explainable AI 2019).
"""

# No ``from __future__ import annotations`` here: Triton 3.0's interpreter recognises a
# ``tl.constexpr`` parameter only by its evaluated annotation, not by the string it would become.
import contextlib
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

EPSILON = tl.constexpr(0)
WSQUARE = tl.constexpr(1)
FLAT = tl.constexpr(2)
ZPLUS = tl.constexpr(3)
ALPHABETA = tl.constexpr(4)
GAMMA = tl.constexpr(5)
ZBOX = tl.constexpr(6)

_RULES = {
    # name: (code, number of params, number of aux tensors saved after z)
    "epsilon": (0, 1, 0),
    "wsquare": (1, 1, 0),
    "flat": (2, 1, 0),
    "zplus": (3, 2, 1),
    "alphabeta": (4, 4, 2),
    "gamma": (5, 2, 2),
    "zbox": (6, 3, 1),
}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton decides at ``@triton.jit`` time, from this variable, whether a kernel is interpreted; the
# kernels of this package are decorated when it is imported, just after this line runs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class RuleSpec:
    """A rule in the kernels' terms.

    ``p0``/``p1`` are the rule's own numbers (α-β: α, β; γ: γ; zB: low, high; else unused),
    ``stabilizer`` is the ``e`` of ``stab`` (ε for the ε-rule), ``use_bias`` scales the bias in the
    z⁺ and α-β pre-activations (1 elsewhere), ``beta_nonzero`` lets α-β drop its negative stream
    at compile time when β = 0.
    """

    code: int
    n_aux: int
    p0: float
    p1: float
    stabilizer: float
    use_bias: float
    beta_nonzero: bool


def parse_rule(rule: str, params: list[float]) -> RuleSpec:
    """Check ``rule`` and ``params`` against the op contract and map them to kernel arguments.

    Params per rule (contract order): epsilon ``[ε]``, wsquare/flat ``[e]``, zplus
    ``[e, use_bias]``, alphabeta ``[α, β, e, use_bias]``, gamma ``[γ, e]``, zbox
    ``[low, high, e]``.
    """
    if rule not in _RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(_RULES)}")
    code, n_params, n_aux = _RULES[rule]
    if len(params) != n_params:
        raise ValueError(f"rule {rule!r} takes {n_params} params, got {len(params)}: {params}")
    values = [float(p) for p in params]
    if rule == "zplus":
        return RuleSpec(code, n_aux, 0.0, 0.0, values[0], values[1], False)
    if rule == "alphabeta":
        alpha, beta, stabilizer, use_bias = values
        return RuleSpec(code, n_aux, alpha, beta, stabilizer, use_bias, beta != 0.0)
    if rule == "gamma":
        return RuleSpec(code, n_aux, values[0], 0.0, values[1], 1.0, False)
    if rule == "zbox":
        return RuleSpec(code, n_aux, values[0], values[1], values[2], 1.0, False)
    return RuleSpec(code, n_aux, 0.0, 0.0, values[0], 1.0, False)


# Triton 3.0 and 3.1 (torch 2.4 and 2.5): some kernels need other launch settings on sm_90.
_TRITON_VERSION = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
OLD_TRITON = _TRITON_VERSION < (3, 2)


def target_arch() -> int:
    """The compute capability Triton compiles for on the current device (90 for sm_90)."""
    from triton.runtime import driver

    return driver.active.get_current_target().arch


def single_one(like: torch.Tensor) -> torch.Tensor:
    """One element, 1.0, of ``like``'s dtype and device: what the flat rule's kernels load their
    tile of all-ones weights from, at offset 0 under the tile's mask.

    Ones made in the kernel (``tl.full``, or a mask cast to float) are constants or masks to the
    compiler, and Triton 3.0-3.2 aborts lowering them as ``tl.dot`` operands (sm_80 and sm_90;
    ``scripts/triton_versions.sh``); a load is what every other operand is. (The w²/flat
    denominators' all-ones input is a real image or row of ones: read like x, it compiles as the
    ε forward does, where a broadcast load of one element made ptxas spill.)
    """
    return torch.ones(1, dtype=like.dtype, device=like.device)


def check_tensors(*tensors: Optional[torch.Tensor]) -> None:
    """Raise unless all tensors share a supported dtype and a device the kernels can run on."""
    present = [t for t in tensors if t is not None]
    dtype, device = present[0].dtype, present[0].device
    if device.type != "cuda" and not INTERPRETED and not driver_takes_cpu_tensors():
        # Else Triton's own error: "0 active drivers ([]). There should only be one." without a
        # GPU, and beside one "Pointer argument (at 0) cannot be accessed from Triton".
        raise ValueError(
            f"the Triton kernels run on CUDA tensors, or on the CPU under Triton's interpreter "
            f"(TRITON_INTERPRET=1 set before triton is first imported); got tensors on {device}. "
            f"On the CPU use the native backend (unset RELPROP_BACKEND, or set it to native)"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton LRP kernels take float32, float16 or bfloat16, got {dtype}")
    for t in present:
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"all tensors must share dtype and device; got {t.dtype} on {t.device} "
                f"beside {dtype} on {device}"
            )
    if is_interpreted(device):
        failure = interpreter_failure()
        if failure is not None:
            from relprop.errors import BackendError

            raise BackendError(
                f"{failure}; install a NumPy that this Triton supports (numpy<2 for Triton 3.0 "
                "and 3.1), or unset RELPROP_BACKEND to run the native CPU path"
            )


@triton.jit
def _interpreter_probe_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # What every kernel here does: a loop bounded by a runtime size, masked loads and stores.
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


@functools.cache
def interpreter_failure() -> Optional[str]:
    """Why Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run the kernels in this
    process, or None when it can (or when there is no interpreter to ask: on a GPU).

    The interpreters of Triton 3.0 (torch 2.4's) and 3.1 were compiled against NumPy 1: beside
    NumPy 2 their native loads and stores read the wrong bytes, and every kernel returns garbage
    without an error. Those up to 3.2 at least also turn a runtime size into a loop bound with
    ``int()`` of a one-element array, which NumPy 2.4 refuses. A copy through the interpreter,
    once per process, finds either.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    src = torch.arange(5, dtype=torch.float32)
    dst = torch.zeros_like(src)
    try:
        _interpreter_probe_kernel[(1,)](src, dst, src.numel(), BLOCK=4)
    except Exception as err:  # noqa: BLE001 — any failure means the kernels cannot run
        found = f"a copy kernel raised {type(err).__name__}: {err}"
    else:
        if torch.equal(src, dst):
            return None
        found = f"a copy kernel wrote {dst.tolist()} for {src.tolist()}"
    return (
        f"Triton {triton.__version__}'s interpreter cannot run the kernels beside NumPy "
        f"{np.__version__} ({found})"
    )


@contextlib.contextmanager
def stand_in_driver(stand_in: object) -> Iterator[None]:
    """Within the block, ``stand_in`` is Triton's active driver; the one before is put back as
    found (resetting would create Triton's own driver, which fails without a GPU)."""
    from triton.runtime import driver

    # Triton >= 3.4 keeps the active driver in ``_active``, older ones in ``active``.
    attribute = "_active" if hasattr(driver, "_active") else "active"
    before = getattr(driver, attribute)
    driver.set_active(stand_in)
    try:
        yield
    finally:
        setattr(driver, attribute, before)


def driver_takes_cpu_tensors() -> bool:
    """Whether Triton's active driver is a stand-in set by the caller (the launches that
    benchmarks/triton_resources.py records, with CPU tensors, compile nothing and run nothing).
    Triton's own drivers launch on a GPU, which cannot read CPU memory."""
    try:
        active = triton.runtime.driver.active  # creates Triton's driver where there is a GPU
    except RuntimeError:  # no GPU and no stand-in
        return False
    return not type(active).__module__.startswith("triton.")


def dot_precision(x: torch.Tensor, allow_tf32: bool) -> str:
    """``tl.dot`` precision for fp32 operands: TF32 where torch's own flag for the same product
    allows it (cuDNN convolutions do by default, cuBLAS matmuls do not), IEEE otherwise."""
    return "tf32" if allow_tf32 and x.is_cuda and x.dtype == torch.float32 else "ieee"


def has_negative(x: torch.Tensor) -> bool:
    """Whether ``x`` has a negative entry; without one the kernels skip every x⁻ product.

    Decided on the host instead of by a branch on device data around ``tl.dot``, which Triton 3.6
    compiled into faulting or wrong Hopper code. It is relprop's own test, with the answer kept on
    the tensor, so a layer's forward and relevance launches reduce x once between them and a
    fused ReLU's output needs no reduction at all.
    """
    from relprop.ops._layer_rules import _is_nonnegative

    return not _is_nonnegative(x)


def is_interpreted(device: torch.device) -> bool:
    """CPU tensors only reach a Triton kernel under ``TRITON_INTERPRET=1``: use tiny blocks there."""
    return device.type != "cuda"


def product_kind(dtype: torch.dtype, precision: str) -> str:
    """How ``tl.dot`` multiplies, which sets a kernel's register budget: ``half`` (16-bit
    operands, tensor cores), ``tf32`` (fp32 operands rounded for tensor cores) or ``ieee``
    (fp32 operands, fused multiply-adds: the most registers per product)."""
    if dtype != torch.float32:
        return "half"
    return "tf32" if precision == "tf32" else "ieee"


# Terms per partial sum of the two-level reductions (IEEE fp32): about √ of the longest reductions
# (VGG16's 4608-term 3×3 layers, its 25088-input dense layer), and a multiple of every block.
REDUCTION_CHUNK = 256


def reduction_chunk(
    x: torch.Tensor, precision: str, block: int, interpreted: bool, denominator: bool = False
) -> int:
    """The kernels' ``CHUNK_K``: how many terms of the reduction go into one partial sum before
    it joins the total, 0 for one running sum.

    Only IEEE fp32 products get two levels: there a running sum over K terms rounds about √K
    times an fp32 ulp, several times cuDNN's and cuBLAS's error on long reductions (they split
    them), where the tests hold the kernels to twice that. TF32 and 16-bit operands round far
    more on input, so their running sums keep the registers instead. The denominators (W²·1, 1·1)
    are sums of non-negative terms (counts, exact for flat). Under the interpreter
    (``interpreted``: the caller's ``is_interpreted``) every block is a chunk, so the tests' small
    shapes cross chunk edges.
    """
    if denominator or product_kind(x.dtype, precision) != "ieee":
        return 0
    chunk = block if interpreted else REDUCTION_CHUNK
    assert chunk % block == 0, (chunk, block)
    return chunk


def relevance_streams(spec: RuleSpec, rule: str) -> str:
    """The relevance kernel's register class of a rule: ``one`` accumulator (ε, w², flat), ``two``
    (z⁺, zB, α-β with β = 0) or ``down`` (α-β and γ, whose second stream doubles the products)."""
    if spec.code in (EPSILON.value, WSQUARE.value, FLAT.value):
        return "one"
    if spec.beta_nonzero or rule == "gamma":
        return "down"
    return "two"


@triton.jit
def _stabilize(d, e):
    """``stab(d, e) = d + e·(sign(d) + [d == 0])``: zero counts as positive, as in Zennit."""
    return d + tl.where(d >= 0, e, -e)


@triton.jit
def _positive(t):
    """``max(t, 0)`` in t's own dtype (``tl.maximum`` with a float literal promotes to fp32)."""
    return tl.maximum(t, 0.0).to(t.dtype)


@triton.jit
def _negative(t):
    """``min(t, 0)`` in t's own dtype."""
    return tl.minimum(t, 0.0).to(t.dtype)


@triton.jit
def _divide(r, d, e):
    """``r / stab(d, e)``, and 0 where that denominator is 0 (only possible for e = 0, LRP-0:
    a unit that nothing reaches passes nothing on instead of spreading NaN)."""
    den = _stabilize(d, e)
    return tl.where(den == 0, 0.0, r / tl.where(den == 0, 1.0, den))


@triton.jit
def _share_operand(s, w):
    """The fp32 share ``s`` as an operand of the product with ``w``, in ``w``'s dtype; for
    float16 saturated at ±65504 first, as ``relprop::stabilized_divide`` stores it: an infinite
    share (a denominator near 0, e.g. α-β's ``z⁻`` where every negative weight meets a zero
    input) times a zero weight would be NaN in the product."""
    if w.dtype == tl.float16:
        # Comparisons, not tl.minimum/maximum: those may return the other operand for a NaN.
        s = tl.where(s > 65504.0, 65504.0, tl.where(s < -65504.0, -65504.0, s))
    return s.to(w.dtype)


@triton.jit
def _forward_accumulate(
    acc0,
    acc1,
    acc2,
    x,
    w,
    valid,
    p0,
    p1,
    RULE: tl.constexpr,
    PRECISION: tl.constexpr,
    HALF: tl.constexpr,
    X_MIXED: tl.constexpr,
):
    """Add one K-tile of ``x (M×K) @ w (K×O)`` to the rule's accumulators.

    ``acc0`` collects ``Wx``; ``acc1``/``acc2`` the rule's modified products: z⁺-rule
    ``W⁺x⁺ + W⁻x⁻``; α-β the same and ``W⁻x⁺ + W⁺x⁻``; γ ``(W+γW⁺)x⁺ + (W+γW⁻)x⁻`` and
    ``(W+γW⁻)x⁺ + (W+γW⁺)x⁻``; zB ``W⁺(x−l) + W⁻(x−h)`` (every term ≥ 0, so no cancellation,
    unlike ``Wx − W⁺l − W⁻h``). Modified weights live in registers only. The x⁻ products are
    skipped when x has no negative entry (``X_MIXED`` false: after a ReLU); skipping adds
    nothing, so results do not depend on it. The host decides it: a data-dependent branch around
    ``tl.dot`` made Triton 3.6 emit wrong or faulting Hopper code. ``valid`` marks real (not padded, in-range) entries of x.

    With ``HALF`` (16-bit x and W) α-β and γ accumulate only ``W⁺x⁺ + W⁻x⁻`` beside ``Wx``; the
    epilogue forms α-β's ``W⁻x⁺ + W⁺x⁻ = Wx − (W⁺x⁺ + W⁻x⁻)`` and γ's
    ``Wx + γ(W⁺x⁺ + W⁻x⁻)`` and ``Wx + γ(W⁻x⁺ + W⁺x⁻)`` from the fp32 accumulators. That saves
    products, the cancellation costs far less than rounding the output to 16 bits, and the
    direct forms (two accumulators fed from one x⁺ operand) made Triton 3.6 emit kernels that
    faulted (α-β) or computed wrong values (γ, convolution) on an H100. fp32 keeps the direct
    sums, whose error the float64 tests bound at twice torch's.
    """
    acc0 = tl.dot(x, w, acc0, input_precision=PRECISION)
    if RULE == ZPLUS or ((RULE == ALPHABETA or RULE == GAMMA) and HALF):
        acc1 = tl.dot(_positive(x), _positive(w), acc1, input_precision=PRECISION)
        if X_MIXED:
            acc1 = tl.dot(_negative(x), _negative(w), acc1, input_precision=PRECISION)
    elif RULE == ALPHABETA:
        x_pos = _positive(x)
        w_pos = _positive(w)
        w_neg = _negative(w)
        acc1 = tl.dot(x_pos, w_pos, acc1, input_precision=PRECISION)
        acc2 = tl.dot(x_pos, w_neg, acc2, input_precision=PRECISION)
        if X_MIXED:
            x_neg = _negative(x)
            acc1 = tl.dot(x_neg, w_neg, acc1, input_precision=PRECISION)
            acc2 = tl.dot(x_neg, w_pos, acc2, input_precision=PRECISION)
    elif RULE == GAMMA:
        x_pos = _positive(x)
        w_up = (w + p0 * _positive(w)).to(w.dtype)
        w_down = (w + p0 * _negative(w)).to(w.dtype)
        acc1 = tl.dot(x_pos, w_up, acc1, input_precision=PRECISION)
        acc2 = tl.dot(x_pos, w_down, acc2, input_precision=PRECISION)
        if X_MIXED:
            x_neg = _negative(x)
            acc1 = tl.dot(x_neg, w_down, acc1, input_precision=PRECISION)
            acc2 = tl.dot(x_neg, w_up, acc2, input_precision=PRECISION)
    elif RULE == ZBOX:
        above_low = tl.where(valid, x - p0, 0.0).to(w.dtype)
        below_high = tl.where(valid, x - p1, 0.0).to(w.dtype)
        acc1 = tl.dot(above_low, _positive(w), acc1, input_precision=PRECISION)
        acc1 = tl.dot(below_high, _negative(w), acc1, input_precision=PRECISION)
    return acc0, acc1, acc2


@triton.jit
def _load_ones(one_ptr, mask):
    """A tile of ones shaped like ``mask`` (zero where it is false), loaded from the single 1.0 at
    ``one_ptr`` (``single_one``): the flat rule's weights."""
    return tl.load(one_ptr + tl.zeros(mask.shape, tl.int32), mask=mask, other=0.0)


@triton.jit
def _denominator_accumulate(acc0, ones, w, RULE: tl.constexpr, PRECISION: tl.constexpr):
    """Add one K-tile of the input-independent denominators to ``acc0``.

    w²-rule: ``W²·1``; flat: ``1·1`` (a count; ``w`` is then a tile of ones too). ``ones`` is a
    tile of the all-ones input, zero where x is padding.
    """
    if RULE == WSQUARE:
        acc0 = tl.dot(ones, w * w, acc0, input_precision=PRECISION)
    else:
        # A product with a tile of ones rather than a row sum broadcast into the accumulator's
        # layout: the layout change made ptxas spill (counts of ones are exact in any precision).
        acc0 = tl.dot(ones, w, acc0, input_precision=PRECISION)
    return acc0


@triton.jit
def _forward_epilogue(
    acc0,
    acc1,
    acc2,
    b_ptr,
    offs_o,
    mask_o,
    p0,
    use_bias,
    RULE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DENOMINATOR: tl.constexpr,
    HALF: tl.constexpr,
):
    """Add the bias terms of the contract to the accumulators: z, zp/zn, zpos/zneg, zb, W²·1+b²."""
    # Pairs in parentheses: Triton 3.0 rejects a chain of three operands (``A and B and C``).
    if (RULE == ALPHABETA and HALF) and not DENOMINATOR:
        # Before any bias: acc0 = Wx and acc1 = W⁺x⁺ + W⁻x⁻, so this is W⁻x⁺ + W⁺x⁻.
        acc2 = acc0 - acc1
    if (RULE == GAMMA and HALF) and not DENOMINATOR:
        # (W+γW⁺)x⁺ + (W+γW⁻)x⁻ = Wx + γ(W⁺x⁺ + W⁻x⁻), and its mirror with W⁻x⁺ + W⁺x⁻.
        acc2 = acc0 + p0 * (acc0 - acc1)
        acc1 = acc0 + p0 * acc1
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        if DENOMINATOR:
            if RULE == WSQUARE:
                acc0 += b * b
        else:
            acc0 += b
            if RULE == ZPLUS:
                acc1 += use_bias * tl.maximum(b, 0.0)
            elif RULE == ALPHABETA:
                acc1 += use_bias * tl.maximum(b, 0.0)
                acc2 += use_bias * tl.minimum(b, 0.0)
            elif RULE == GAMMA:
                acc1 += b + p0 * tl.maximum(b, 0.0)
                acc2 += b + p0 * tl.minimum(b, 0.0)
    return acc0, acc1, acc2


@triton.jit
def _relevance_scales(
    r_ptr,
    z_ptr,
    aux0_ptr,
    aux1_ptr,
    offs,
    mask,
    den_ptr,
    den_offs,
    den_mask,
    p0,
    p1,
    stabilizer,
    RULE: tl.constexpr,
):
    """Load one tile of R and return the rule's relevance per unit of pre-activation (fp32).

    Returns ``(s_up, s_down)``: ε ``R/stab(z, ε)``; w², flat ``R/stab(den, e)`` with the
    input-independent denominator ``den``; z⁺ ``R/stab(zp, e)``; zB ``R/stab(zb, e)``; α-β
    ``α·R/stab(zp, e)`` and ``−β·R/stab(zn, e)`` (sign folded in, so α-β and γ share one
    accumulation); γ ``[z>0]·R/stab(zpos, e)`` and ``[z<0]·R/stab(zneg, e)``. ``s_down`` is only
    meaningful for α-β and γ. Masked entries load R = 0 and a denominator of 1, so they give 0;
    so does a zero denominator.
    """
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RULE == EPSILON:
        z = tl.load(z_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        s_up = _divide(r, z, stabilizer)
        s_down = s_up
    elif RULE == WSQUARE or RULE == FLAT:
        den = tl.load(den_ptr + den_offs, mask=den_mask, other=1.0).to(tl.float32)
        s_up = _divide(r, den, stabilizer)
        s_down = s_up
    elif RULE == ZPLUS or RULE == ZBOX:
        z_mod = tl.load(aux0_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        s_up = _divide(r, z_mod, stabilizer)
        s_down = s_up
    elif RULE == ALPHABETA:
        z_pos = tl.load(aux0_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        z_neg = tl.load(aux1_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        s_up = p0 * _divide(r, z_pos, stabilizer)
        s_down = -p1 * _divide(r, z_neg, stabilizer)
    else:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z_pos = tl.load(aux0_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        z_neg = tl.load(aux1_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        s_up = _divide(tl.where(z > 0, r, 0.0), z_pos, stabilizer)
        s_down = _divide(tl.where(z < 0, r, 0.0), z_neg, stabilizer)
    return s_up, s_down


@triton.jit
def _relevance_accumulate(
    acc_a,
    acc_b,
    s_up,
    s_down,
    w,
    p0,
    RULE: tl.constexpr,
    DOWN_STREAM: tl.constexpr,
    PRECISION: tl.constexpr,
    X_MIXED: tl.constexpr,
):
    """Add one reduction tile of the transposed product ``s (M×O) @ w (O×C)`` to ``acc_a``/``acc_b``.

    The input relevance is ``x·acc_a`` (ε), ``acc_a`` (w², flat), ``x⁺·acc_a + x⁻·acc_b``
    (z⁺, α-β, γ) or ``(x−l)·acc_a + (x−h)·acc_b`` (zB). With the weight pair ``(w_a, w_b)`` =
    ``(W⁺, W⁻)`` or, for γ, ``(W+γW⁺, W+γW⁻)``: ``acc_a += s_up·w_a + s_down·w_b`` and
    ``acc_b += s_up·w_b + s_down·w_a``. ``acc_b`` is only needed where x has negative entries
    (``X_MIXED``, decided by the host for the whole tensor; the skip adds nothing, so results do
    not depend on it). The ``s_down`` products run whenever the rule has a down stream: skipping
    them where ``s_down`` is zero needed a data-dependent branch around ``tl.dot``, which Triton
    3.6 compiled into wrong results for 16-bit γ on an H100.
    """
    if RULE == EPSILON:
        acc_a = tl.dot(_share_operand(s_up, w), w, acc_a, input_precision=PRECISION)
    elif RULE == WSQUARE:
        acc_a = tl.dot(_share_operand(s_up, w), w * w, acc_a, input_precision=PRECISION)
    elif RULE == FLAT:
        # ``w`` is a loaded tile of ones here (see ``single_one``).
        acc_a = tl.dot(_share_operand(s_up, w), w, acc_a, input_precision=PRECISION)
    else:
        if RULE == GAMMA:
            w_a = (w + p0 * _positive(w)).to(w.dtype)
            w_b = (w + p0 * _negative(w)).to(w.dtype)
        else:
            w_a = _positive(w)
            w_b = _negative(w)
        s_up_w = _share_operand(s_up, w)
        acc_a = tl.dot(s_up_w, w_a, acc_a, input_precision=PRECISION)
        if RULE == ZBOX:
            acc_b = tl.dot(s_up_w, w_b, acc_b, input_precision=PRECISION)
        else:
            if X_MIXED:
                acc_b = tl.dot(s_up_w, w_b, acc_b, input_precision=PRECISION)
        if DOWN_STREAM:
            s_down_w = _share_operand(s_down, w)
            acc_a = tl.dot(s_down_w, w_b, acc_a, input_precision=PRECISION)
            if X_MIXED:
                acc_b = tl.dot(s_down_w, w_a, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _relevance_epilogue(x, acc_a, acc_b, p0, p1, RULE: tl.constexpr):
    """Combine the accumulators with the input tile into the input relevance (fp32)."""
    x = x.to(tl.float32)
    if RULE == EPSILON:
        relevance = x * acc_a
    elif RULE == WSQUARE or RULE == FLAT:
        relevance = acc_a
    elif RULE == ZBOX:
        relevance = (x - p0) * acc_a + (x - p1) * acc_b
    else:
        relevance = tl.maximum(x, 0.0) * acc_a + tl.minimum(x, 0.0) * acc_b
    return relevance
