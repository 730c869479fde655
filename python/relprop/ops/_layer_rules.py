"""The LRP rules of linear maps (dense and convolution layers), written once for any linear map.

A dense layer and a convolution differ only in the linear map ``x ↦ Wx + b`` and its transpose
``s ↦ Wᵀs``. Everything a rule does on top of that — the modified pre-activations, the stabilised
division, the product with the input — is the same, so it lives here and ``linear.py`` /
``conv.py`` supply the map. docs/ops.md states every formula; the rules' papers are cited in
``relprop.rules``.

Two implementations per rule:

- ``*_reference``: the formula term by term, no shortcuts. The truth that tests compare with.
- ``*_fast``: the same numbers with the work a real network lets us skip: the ``x⁻`` terms when
  the input is non-negative (after a ReLU), the ``z < 0`` branch of γ when no relevance sits there;
  and it accepts a lean ``saved`` so the forward pass need not keep aux tensors alive.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from relprop.ops._backend import ContextVarScope, call_op, calls_kernels_directly
from relprop.ops.elementwise import (
    COMPUTE_DTYPES,
    product_with_factor,
    stabilized_divide_into,
    stabilized_divide_kernel,
    stabilized_divide_op,
    stabilized_divide_reference,
    to_share_dtype,
)
from relprop.ops.paired_shares import (
    paired_shares_kernel,
    paired_shares_op,
)

RULES = ("epsilon", "wsquare", "flat", "zplus", "alphabeta", "gamma", "zbox")
# How many parameters each rule takes (docs/ops.md).
RULE_PARAM_COUNT = {
    "epsilon": 1,
    "wsquare": 1,
    "flat": 1,
    "zplus": 2,
    "alphabeta": 4,
    "gamma": 2,
    "zbox": 3,
}
# The Triton kernels take these; float64 runs the torch path (tests compare in float64).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# How many tensors each rule's forward saves after z.
AUX_COUNT = {"zplus": 1, "alphabeta": 2, "gamma": 2, "zbox": 1}


@dataclass(frozen=True)
class LinearMap:
    """A linear map with bias: ``forward(x, W, b) = Wx + b`` and ``transpose(s, W, x) = Wᵀs``.

    (Stacking several weight sets into one oneDNN call was measured on VGG-16 shapes: no faster
    than separate calls, and splitting the result costs copies.)
    """

    forward: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    transpose: Callable[[Tensor, Tensor, Tensor], Tensor]
    # The flat rule's relevance without forming the all-ones weights, where the map knows how.
    flat_relevance: Callable[[Tensor, Tensor, Tensor, float], Tensor] | None = None
    # Whether weights may be stacked (dense layers; convolutions with one group): along dim 1
    # they act on inputs concatenated along dim 1 as the sum of the two maps, so ``A x⁺ + B x⁻``
    # is one product of ``[x⁺, x⁻]`` with ``[A, B]``; along dim 0 their transpose takes shares
    # concatenated along dim 1 and sums, so ``Aᵀs + Bᵀt`` is one product of ``[s, t]`` with
    # ``[A; B]``. (Groups would pair each slice of channels with the wrong weights.)
    stacks_weights: bool = False
    # The output's shape for an input and a weight of these shapes; raises ValueError where they
    # do not fit. None: the reference checks only that its tensors agree with one another.
    output_shape: Callable[[tuple[int, ...], tuple[int, ...]], tuple[int, ...]] | None = None
    # Whether ``forward`` adds the bias in a pass of its own after the product (torch's
    # convolutions on CUDA: cuDNN's product, then an add over the whole output; a dense layer's
    # bias rides in the GEMM). The native rules then hand a modified pre-activation's bias to
    # the division that reads it (``denominator_bias``, ``zp_bias``) instead: one pass fewer.
    bias_after_product: bool = False


def check_shapes(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    relevance: Tensor | None = None,
    relevance_factor: Tensor | None = None,
    saved: Sequence[Tensor] = (),
) -> None:
    """Raise ``ValueError`` unless ``x``, ``weight`` and ``bias`` fit and the relevance, its
    factor and every ``saved`` pre-activation have the layer output's shape.

    The reference is plain PyTorch, which would broadcast a relevance of batch 1 against an
    input of batch 2 and return a plausible-looking result; the fast paths refuse such a call,
    and so must the truth they are tested against. Shapes only: no tensor value is read. Every
    layer step of an analysis passes here, so a call that fits does no more than compare shapes
    (the output shape of a map is cached per input and weight shape).
    """
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if lin.output_shape is not None:
        expected = _output_shape(lin.output_shape, x.shape, weight.shape)
    else:
        given = [t for t in (relevance, relevance_factor, *saved) if t is not None]
        if not given:
            return
        expected = tuple(given[0].shape)
    for t in (relevance, relevance_factor, *saved):
        if t is not None and t.shape != expected:
            _refuse_shapes(lin, x, weight, expected, relevance, relevance_factor, saved)


@functools.lru_cache(maxsize=4096)
def _output_shape(
    output_shape: Callable[[tuple[int, ...], tuple[int, ...]], tuple[int, ...]],
    x_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
) -> tuple[int, ...]:
    # A shape that does not fit raises, and lru_cache keeps no exception: asked again, it raises
    # again.
    return tuple(output_shape(tuple(x_shape), tuple(weight_shape)))


def _refuse_shapes(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    expected: tuple[int, ...],
    relevance: Tensor | None,
    relevance_factor: Tensor | None,
    saved: Sequence[Tensor],
) -> None:
    """The :func:`check_shapes` error naming the first tensor whose shape is not ``expected``."""
    named = [("relevance", relevance), ("relevance_factor", relevance_factor)]
    named += [(f"saved[{i}]", t) for i, t in enumerate(saved)]
    given = [(name, tuple(t.shape)) for name, t in named if t is not None]
    if lin.output_shape is not None:
        source = f"the output's for x {tuple(x.shape)} and weight {tuple(weight.shape)}"
    else:
        source = given[0][0]
    for name, shape in given:
        if shape != expected:
            raise ValueError(f"{name} has shape {shape}; {source} is {expected}")


def check_rule(rule: str, params: Sequence[float]) -> None:
    """Raise a clear error for an unknown rule name or a wrong number of parameters."""
    if rule not in RULE_PARAM_COUNT:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    if len(params) != RULE_PARAM_COUNT[rule]:
        raise ValueError(
            f"rule {rule!r} takes {RULE_PARAM_COUNT[rule]} parameters, got {len(params)}: "
            f"{list(params)} (see docs/ops.md)"
        )


def stabilize(denominator: Tensor, epsilon: float) -> Tensor:
    """``d + ε·(sign(d) + [d = 0])``: zero (also −0.0) counts as positive, as in Zennit."""
    return denominator + epsilon * (torch.sign(denominator) + (denominator == 0).to(denominator))


def divide(numerator: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """``numerator / stab(denominator, ε)`` (broadcasting); with ε = 0 a zero denominator gives
    zero.

    16-bit dtypes go through the reference of ``relprop::stabilized_divide``: computed in
    float32, float16 saturated at ±65504 (docs/ops.md). In float16 arithmetic ε = 1e-9 rounds to
    0 and a zero denominator gave ``0/0 = NaN``, and an overflowed share ``inf · 0 = NaN`` in the
    transposed product. float32 and float64 keep the one pass over the numerator (the
    stabilisation runs at the denominator's size, often a broadcast row).
    """
    if numerator.dtype in COMPUTE_DTYPES or denominator.dtype in COMPUTE_DTYPES:
        return stabilized_divide_reference(numerator, denominator, epsilon)
    if epsilon == 0:
        safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)
    return numerator / stabilize(denominator, epsilon)


def flat_share(relevance: Tensor, dim: int, count: Tensor, epsilon: float) -> Tensor:
    """``Σ R / stab(count, ε)`` over ``dim`` (kept, size 1): the flat rule's share summed over the
    outputs that share one denominator (a dense layer's all, a convolution group's channels).

    The flat rule (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors and assessing what
    machines really learn") takes all weights as one, which gives every such output the same
    denominator ``count``: the sum of their shares is their summed relevance divided once, and
    no tensor of the layer's output size is made (dividing first made three, in float32 for
    16-bit dtypes: VGG16's first layer held 1.6 GB at batch 64 in bfloat16). The sum and the
    division run in float32 for 16-bit dtypes and round once (float16 saturated, as
    :func:`divide`'s shares are); ``count`` should be exact in that precision (compute it in
    float32).
    """
    compute = COMPUTE_DTYPES.get(relevance.dtype, relevance.dtype)
    summed = relevance.sum(dim=dim, keepdim=True, dtype=compute)
    return to_share_dtype(divide(summed, count.to(compute), epsilon), relevance.dtype)


def times_factor(relevance: Tensor, factor: Tensor) -> Tensor:
    """``relevance · factor``: a relevance ``c · x`` formed. In float16 exactly 0 where the
    factor is, also where ``c`` overflowed (docs/ops.md: a saturated share times large weights;
    ``inf · 0`` is NaN); other dtypes skip that pass, their ``c`` does not overflow."""
    if relevance.dtype == torch.float16:
        return product_with_factor(relevance, factor)
    return relevance * factor


def times_input_in_place(c: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``x · c`` written into ``c`` (or ``out``), 0 where ``x`` is in float16 (as
    :func:`times_factor`)."""
    product = c.mul_(x) if out is None else torch.mul(c, x, out=out)
    if product.dtype == torch.float16:
        product.masked_fill_(x == 0, 0)
    return product


def divide_fast(
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    scale: float = 1.0,
    sign_reference: Tensor | None = None,
    sign: int = 1,
    factor: Tensor | None = None,
    denominator_bias: Tensor | None = None,
    numerator_addend: Tensor | None = None,
    last_read: bool = False,
) -> Tensor:
    """``scale · [sign·ref > 0] · ((numerator + addend) · factor) / stab(denominator + bias, ε)``
    in one fused pass (``relprop::stabilized_divide``) at every size.

    ``last_read``: the caller reads ``numerator`` no more after this; where it is a donated
    coefficient (:func:`donate`), the result is written into its memory instead of a new tensor.


    Small tensors once took the torch composition, when each op call paid the dispatcher
    (~50 µs). Called as a function in eager mode (:func:`~relprop.ops._backend.call_op`) the
    native kernel costs 19 µs on 1000 elements against the composition's 76 µs (one CPU thread;
    on a GPU one launch against ten), so it is the faster at every size.
    """
    if (
        last_read
        and numerator_addend is None
        and read_mark(numerator, DONATED_MARK)
        and calls_kernels_directly(numerator)
    ):
        into = stabilized_divide_into(
            numerator, numerator, denominator, epsilon, scale, sign_reference, sign, factor,
            denominator_bias,
        )  # fmt: skip
        if into is not None:
            return into
    # The engine's own tensors: same shapes and dtypes by construction, so the op's kernel is
    # called without the public wrapper's checks (and without the dispatcher in eager).
    return call_op(
        stabilized_divide_op, stabilized_divide_kernel,
        numerator, denominator, float(epsilon), float(scale), sign_reference, int(sign), factor,
        denominator_bias, numerator_addend,
    )  # fmt: skip


def _positive(t: Tensor | None) -> Tensor | None:
    """``t⁺`` of a bias (None stays None)."""
    return None if t is None else _derived_bias(t, ("positive",), lambda b: b.clamp(min=0))


def _negative(t: Tensor | None) -> Tensor | None:
    """``t⁻`` of a bias (None stays None)."""
    return None if t is None else _derived_bias(t, ("negative",), lambda b: b.clamp(max=0))


# Set by the engine on biases that are slices of one tensor made for many layers at once (the
# shifts of the BatchNorms folded in one pass, graph/canonize.py): (that tensor, the slice's
# start, a dict of what was derived from it in this pass).
BIAS_SET_MARK = "_relprop_bias_set"


def derive_biases_together(whole: Tensor, slices: Sequence[Tensor]) -> None:
    """Let what the rules derive from each of ``slices`` (views of the 1-D ``whole``, in order,
    end to end) be derived from ``whole`` once, for all of them: ``b⁺``, ``b⁻``, ``b + γb⁺``, …
    of ResNet50's 53 folded BatchNorm shifts in one launch each instead of 53. Elementwise, so
    each slice of the result has the bits the slice alone would give."""
    store: dict[tuple, Tensor] = {}
    start = 0
    for piece in slices:
        stamp_mark(piece, BIAS_SET_MARK, (whole, start, store))
        start += piece.shape[0]


def _derived_bias(bias: Tensor, key: tuple, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(bias)`` for an elementwise ``make``; for a slice of a set of biases
    (:func:`derive_biases_together`) the slice of ``make`` of the whole set, made once per pass."""
    mark = read_mark(bias, BIAS_SET_MARK)
    if mark is None:
        return make(bias)
    whole, start, store = mark
    derived = store.get(key)
    if derived is None:
        derived = store[key] = make(whole)
    return derived[start : start + bias.shape[0]]


# Set by the engine on the weights it hands the ops (graph/canonize.FoldedParameters): a
# DerivedWeights, stamped with the weight's version, that keeps what the rules derive from the
# weight (W⁺, [W⁺; W⁻], W + γW⁺, ...) for the rest of the analysis. Every analysis derives them
# anew (a model can change in ways no version counter sees: graph/canonize.py), but into the
# memory the previous analysis of the same layer derived them in.
DERIVED_WEIGHTS_MARK = "_relprop_derived_weights"


class DerivedWeights(dict):
    """What the rules derived from one analysis's weight of a layer (key → tensor), and the
    tensors the previous analysis derived for that layer (spares), whose memory new ones reuse.

    Deriving writes a few passes over the weights per layer and analysis. Into fresh memory, on a
    CPU, each pass also faults in the pages it writes: ResNet18 at batch 2, 64², two threads, was
    10–20 % faster for EpsilonGammaBox and α-β with the reuse, and where memory is busy (other
    processes) page faults cost far more (one 32×32 image: EpsilonGammaBox 185 → 99 ms; docs/ops.md
    has the numbers). CUDA's caching allocator hands back recently freed memory anyway; there
    the reuse changes nothing. Spares are matched by shape, dtype and device, so a rule
    parameter changed between analyses reuses them too.
    """

    def __init__(self, previous: DerivedWeights | None = None) -> None:
        super().__init__()
        self._spares: list[Tensor] = [] if previous is None else list(previous.values())

    def buffer(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A spare of ``shape`` with the dtype and device of ``like`` (removed from the spares),
        or new memory."""
        for index, spare in enumerate(self._spares):
            if spare.shape == shape and spare.dtype == like.dtype and spare.device == like.device:
                return self._spares.pop(index)
        return like.new_empty(shape)


def keep_derived_weights(weight: Tensor, previous: DerivedWeights | None = None) -> DerivedWeights:
    """Let the rules keep what they derive from ``weight`` on it (see DERIVED_WEIGHTS_MARK),
    reusing the memory of ``previous``: the store of the layer's previous analysis, whose
    tensors nothing may read any more."""
    store = DerivedWeights(previous)
    stamp_mark(weight, DERIVED_WEIGHTS_MARK, store)
    return store


def _derived(
    weight: Tensor, key: tuple, shape: Sequence[int], make: Callable[[Tensor], Tensor]
) -> Tensor:
    """``make(out)``, which writes into ``out`` (a tensor of ``shape``, the weight's dtype and
    device) and returns it, kept on ``weight`` under ``key`` where the engine allows it (and the
    weight is unchanged since); callers only read what it returns."""
    store = read_mark(weight, DERIVED_WEIGHTS_MARK)
    if store is None:
        return make(weight.new_empty(tuple(shape)))
    value = store.get(key)
    if value is None:
        value = store[key] = make(store.buffer(tuple(shape), weight))
    return value


def _positive_weight(weight: Tensor) -> Tensor:
    return _derived(
        weight, ("positive",), weight.shape, lambda out: torch.clamp(weight, min=0, out=out)
    )


def _negative_weight(weight: Tensor) -> Tensor:
    return _derived(
        weight, ("negative",), weight.shape, lambda out: torch.clamp(weight, max=0, out=out)
    )


def _gamma_weights(
    weight: Tensor, bias: Tensor | None, gamma: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``W + γW⁺``, ``W + γW⁻`` and the biases ``b + γb⁺``, ``b + γb⁻``."""
    w_up = weight + gamma * weight.clamp(min=0)
    w_down = weight + gamma * weight.clamp(max=0)
    if bias is None:
        return w_up, w_down, None, None
    return w_up, w_down, bias + gamma * bias.clamp(min=0), bias + gamma * bias.clamp(max=0)


# ---------------------------------------------------------------------------------------------
# Reference: every term of docs/ops.md, literally.
# ---------------------------------------------------------------------------------------------


def forward_reference(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rule: str,
    params: Sequence[float],
) -> list[Tensor]:
    """``[z, *aux]`` of ``rule`` for the layer ``(weight, bias)`` at input ``x``."""
    check_rule(rule, params)
    check_shapes(lin, x, weight, bias)
    fwd = lin.forward
    z = fwd(x, weight, bias)
    if rule in ("epsilon", "wsquare", "flat"):
        return [z]
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    if rule in ("zplus", "alphabeta"):
        use_bias = params[-1] != 0
        zp = fwd(xp, wp, _positive(bias) if use_bias else None) + fwd(xn, wn, None)
        if rule == "zplus":
            return [z, zp]
        zn = fwd(xp, wn, _negative(bias) if use_bias else None) + fwd(xn, wp, None)
        return [z, zp, zn]
    if rule == "gamma":
        w_up, w_down, b_up, b_down = _gamma_weights(weight, bias, params[0])
        zpos = fwd(xp, w_up, b_up) + fwd(xn, w_down, None)
        zneg = fwd(xp, w_down, b_down) + fwd(xn, w_up, None)
        return [z, zpos, zneg]
    low, high = torch.full_like(x, params[0]), torch.full_like(x, params[1])
    zb = fwd(x, weight, None) - fwd(low, wp, None) - fwd(high, wn, None)
    return [z, zb]


def relevance_reference(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
    relevance_factor: Tensor | None = None,
    times_input: bool = True,
) -> Tensor:
    """Relevance of the input ``x`` from the ``relevance`` of the layer output.

    ``relevance_factor``: the output's relevance is ``relevance · relevance_factor``.
    ``times_input=False``: return ``c`` with ``R_in = x · c`` instead (ε always; z⁺, α-β and γ
    for ``x ≥ 0``; :data:`INPUT_PRODUCT_RULES`).
    """
    check_rule(rule, params)
    check_shapes(lin, x, weight, bias, relevance, relevance_factor, saved)
    if relevance_factor is not None:
        relevance = times_factor(relevance, relevance_factor)
    if not times_input:
        return _input_coefficient_reference(lin, x, weight, bias, saved, relevance, rule, params)
    fwd, tr = lin.forward, lin.transpose
    saved = complete_saved(lin, x, weight, bias, saved, rule, params)
    z = saved[0]
    # Each x · c below is times_factor(c, x): in float16 0 where x is, also where c overflowed.
    if rule == "epsilon":
        return times_factor(tr(divide(relevance, z, params[0]), weight, x), x)
    if rule == "wsquare":
        w2 = weight * weight
        d = fwd(torch.ones_like(x), w2, None if bias is None else bias * bias)
        return tr(divide(relevance, d, params[0]), w2, x)
    if rule == "flat":
        w1 = torch.ones_like(weight)
        d = fwd(torch.ones_like(x), w1, None)
        return tr(divide(relevance, d, params[0]), w1, x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    if rule == "zplus":
        s = divide(relevance, saved[1], params[0])
        return times_factor(tr(s, wp, x), xp) + times_factor(tr(s, wn, x), xn)
    if rule == "alphabeta":
        alpha, beta, eps = params[0], params[1], params[2]
        sp = divide(relevance, saved[1], eps)
        sn = divide(relevance, saved[2], eps)
        activator = times_factor(tr(sp, wp, x), xp) + times_factor(tr(sp, wn, x), xn)
        inhibitor = times_factor(tr(sn, wn, x), xp) + times_factor(tr(sn, wp, x), xn)
        return alpha * activator - beta * inhibitor
    if rule == "gamma":
        w_up, w_down, _, _ = _gamma_weights(weight, bias, params[0])
        sp = divide(relevance * (z > 0), saved[1], params[1])
        sn = divide(relevance * (z < 0), saved[2], params[1])
        return times_factor(tr(sp, w_up, x) + tr(sn, w_down, x), xp) + times_factor(
            tr(sp, w_down, x) + tr(sn, w_up, x), xn
        )
    low, high = torch.full_like(x, params[0]), torch.full_like(x, params[1])
    s = divide(relevance, saved[1], params[2])
    return times_factor(tr(s, weight, x), x) - low * tr(s, wp, x) - high * tr(s, wn, x)


# Rules whose input relevance is ``x · c`` (for z⁺, α-β and γ when ``x ≥ 0``, where the ``x⁻``
# terms vanish): their relevance ops can return ``c`` and leave the product to the consumer.
INPUT_PRODUCT_RULES = ("epsilon", "zplus", "alphabeta", "gamma")


def _input_product_error(rule: str) -> ValueError:
    return ValueError(
        f"times_input=False returns c of R_in = x·c, which rule {rule!r} does not have here: "
        "only epsilon, and zplus/alphabeta/gamma on non-negative input, take that form; call "
        "with times_input=True"
    )


def _input_coefficient_reference(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
) -> Tensor:
    """``c`` with ``relevance_reference(...) = x · c``: the reference's terms without the ``x⁻``
    ones (which vanish for ``x ≥ 0``) and without the final product with ``x``."""
    if rule not in INPUT_PRODUCT_RULES or (rule != "epsilon" and not bool((x >= 0).all())):
        raise _input_product_error(rule)
    tr = lin.transpose
    saved = complete_saved(lin, x, weight, bias, saved, rule, params)
    z = saved[0]
    if rule == "epsilon":
        return tr(divide(relevance, z, params[0]), weight, x)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    if rule == "zplus":
        return tr(divide(relevance, saved[1], params[0]), wp, x)
    if rule == "alphabeta":
        alpha, beta, eps = params[0], params[1], params[2]
        activator = tr(divide(relevance, saved[1], eps), wp, x)
        inhibitor = tr(divide(relevance, saved[2], eps), wn, x)
        return alpha * activator - beta * inhibitor
    w_up, w_down, _, _ = _gamma_weights(weight, bias, params[0])
    sp = divide(relevance * (z > 0), saved[1], params[1])
    sn = divide(relevance * (z < 0), saved[2], params[1])
    return tr(sp, w_up, x) + tr(sn, w_down, x)


# ---------------------------------------------------------------------------------------------
# Fast: the same numbers, skipping what vanishes.
# ---------------------------------------------------------------------------------------------


def stamp_mark(t: Tensor, name: str, value: object = True) -> None:
    """Remember ``value`` on ``t`` under attribute ``name`` for ``t`` as it is now: the mark holds
    until ``t`` changes in place (its version moves on).

    Inference tensors (made under ``torch.inference_mode``) have no version counter, so nothing
    could tell that one changed: they get no mark, and whatever a mark would spare is computed.
    """
    if t.is_inference():
        return
    setattr(t, name, (t._version, value))


def read_mark(t: Tensor, name: str) -> object | None:
    """The value :func:`stamp_mark` left on ``t`` under ``name``, or None where there is none or
    ``t`` has changed since."""
    mark = getattr(t, name, None)
    return mark[1] if mark is not None and mark[0] == t._version else None


# Attribute under which a relevance coefficient says that the step it is handed to is its only
# reader (the fresh output of a layer's transposed product or of a max pool's relevance, handed
# down unformed): that step's division may write its result into the coefficient's memory, one
# output-sized tensor fewer alive during the step's transposed product — where the relevance
# pass of a VGG holds the most (docs/ops.md). Not set on a coefficient two steps share (a residual
# sum's share).
DONATED_MARK = "_relprop_donated"


def donate(t: Tensor) -> Tensor:
    """Mark ``t`` as a coefficient whose one reader may overwrite it (:data:`DONATED_MARK`)."""
    try:
        stamp_mark(t, DONATED_MARK)
    except (AttributeError, RuntimeError):  # tensor subclasses under tracing may refuse
        pass
    return t


# Attribute under which a tensor remembers whether it is ≥ 0: the forward and the relevance op
# of one layer see the same input object, and a fused ReLU marks its output.
NONNEGATIVE_MARK = "_relprop_nonnegative"


def mark_nonnegative(t: Tensor) -> None:
    """Record that ``t`` (as it is now) has no negative entry, sparing a reduction later."""
    stamp_mark(t, NONNEGATIVE_MARK)


def is_marked_nonnegative(t: Tensor) -> bool:
    """Whether ``t`` carries a mark (from a fused ReLU or a earlier test) that it is ≥ 0.

    No reduction and no host sync: where the answer only decides whether a term that would be
    zero is skipped, an unmarked tensor simply gets the term computed.
    """
    return read_mark(t, NONNEGATIVE_MARK) is True


def _is_nonnegative(x: Tensor) -> bool:
    # One reduction decides whether the x⁻ terms (half the modified products) can be skipped;
    # its answer is kept on the tensor until the tensor changes.
    known = read_mark(x, NONNEGATIVE_MARK)
    if known is not None:
        return bool(known)
    result = x.numel() == 0 or bool(x.amin() >= 0)
    try:
        stamp_mark(x, NONNEGATIVE_MARK, result)
    except (AttributeError, RuntimeError):  # tensor subclasses under tracing may refuse
        pass
    return result


def forward_fast(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rule: str,
    params: Sequence[float],
) -> list[Tensor]:
    """Same as :func:`forward_reference`, with the ``x⁻`` products skipped when ``x ≥ 0``."""
    check_rule(rule, params)
    if rule in ("epsilon", "wsquare", "flat"):
        return [lin.forward(x, weight, bias)]
    if not _is_nonnegative(x) or rule == "zbox":
        return forward_reference(lin, x, weight, bias, rule, params)
    z = lin.forward(x, weight, bias)
    return [z, *_aux_nonnegative(lin, x, weight, bias, z, rule, params)]


def _aux_nonnegative(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    z: Tensor | None,
    rule: str,
    params: Sequence[float],
) -> list[Tensor]:
    """The aux pre-activations of z⁺, αβ and γ for ``x ≥ 0`` from ``z`` and one product W⁺x
    (z⁺ needs no ``z``)."""
    wp = _positive_weight(weight)
    if rule in ("zplus", "alphabeta"):
        use_bias = params[-1] != 0
        zp = lin.forward(x, wp, _positive(bias) if use_bias else None)
        if rule == "zplus":
            return [zp]
        if (use_bias or bias is None) and inhibitor_from_difference(weight):
            # With x ≥ 0: W⁻x + b⁻ = (Wx + b) − (W⁺x + b⁺), no third product needed.
            return [zp, z - zp]
        return [zp, lin.forward(x, _negative_weight(weight), _negative(bias) if use_bias else None)]
    # γ with x ≥ 0: zpos = (W + γW⁺)x + b + γb⁺, one product, and
    # zneg = z + γ(W⁻x + b⁻) = (1 + γ)z − γ(W⁺x + b⁺) = (2 + γ)z − zpos.
    gamma = params[0]
    zpos = lin.forward(x, *_gamma_shifted(weight, bias, gamma, up=True))
    return [zpos, torch.add(-zpos, z, alpha=2 + gamma)]


def _gamma_shifted(
    weight: Tensor, bias: Tensor | None, gamma: float, up: bool
) -> tuple[Tensor, Tensor | None]:
    """``W + γW⁺`` and ``b + γb⁺`` (``up``), or ``W + γW⁻`` and ``b + γb⁻``."""
    shifted = _derived(
        weight, ("gamma", gamma, up), weight.shape, lambda out: _gamma_shift(weight, gamma, up, out)
    )
    return shifted, None if bias is None else _gamma_shifted_bias(bias, gamma, up)


def _gamma_shifted_bias(bias: Tensor, gamma: float, up: bool) -> Tensor:
    """``b + γb⁺`` (``up``) or ``b + γb⁻``."""
    return _derived_bias(bias, ("gamma", gamma, up), lambda b: _gamma_shift(b, gamma, up))


def _gamma_shift(t: Tensor, gamma: float, up: bool, out: Tensor | None = None) -> Tensor:
    """``t + γt⁺`` (``up``) or ``t + γt⁻``, into ``out`` if given: the clamped ``t`` is written
    there and ``t`` added to it with alpha, two passes and no temporary (ResNet50 has 25M
    weights)."""
    out = torch.clamp(t, min=0 if up else None, max=None if up else 0, out=out)
    return torch.add(t, out, alpha=gamma, out=out)


def complete_saved(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    rule: str,
    params: Sequence[float],
    forward=None,
) -> list[Tensor]:
    """``saved`` with its missing entries recomputed from ``x`` (docs/ops.md: ``saved`` may be
    ``[]`` or ``[z]``, trading one more product in the relevance pass for memory)."""
    if len(saved) == 1 + AUX_COUNT.get(rule, 0):
        return list(saved)
    return (forward or forward_reference)(lin, x, weight, bias, rule, params)


# A relevance step whose input or output is at least this large may run in batch chunks, where
# its rule would otherwise hold several whole-batch transients (α-β; z⁺, α-β and γ on mixed
# input). How many chunks is decided by the memory the step may use (:func:`transient_budget`):
# a Program allows what its relevance pass has freed so far, so the analysis never holds more
# than it held when that pass began. Outside a Program (an op called directly) nothing is known
# of the memory around the step, and a large step runs in ``_MAX_CHUNKS``.
_CHUNK_MIN_BYTES = 16 * 2**20
_MAX_CHUNKS = 8
# Tensors the size of a chunkable step's larger side (input or output) that it holds at once
# besides its result, measured on VGG16's α-β steps: W⁺x, the two shares, the transposed
# product before it is copied into its slice (the mixed-sign first layer holds fewer).
_STEP_TRANSIENTS = 4
_transient_budget: ContextVar[int | Callable[[], int] | None] = ContextVar(
    "relprop_transient_budget", default=None
)


def transient_budget(nbytes: int | Callable[[], int] | None) -> ContextVarScope:
    """The bytes a relevance step run inside may allocate at once (None: unknown).

    A callable is asked only when a step could run in chunks: working the budget out walks the
    storages the pass holds (about 20 µs a step on ResNet50), which most steps never need.
    """
    return ContextVarScope(_transient_budget, nbytes)


def may_run_in_chunks(rule: str, params: Sequence[float], input_nonnegative: bool) -> bool:
    """Whether :func:`relevance_fast` may ask for a :func:`transient_budget` for ``rule``:
    α-β with β ≠ 0 on any input, z⁺, α-β and γ on input not known to be ≥ 0 (only the marks
    are read: an unmarked input counts as mixed-sign). A pass with no such step spares working
    out what it holds (``graph/program.py``)."""
    if rule == "alphabeta" and params[1] != 0:
        return True
    return rule in ("zplus", "alphabeta", "gamma") and not input_nonnegative


def _batch_chunks(x: Tensor, relevance: Tensor) -> list[slice]:
    """Slices of the batch for a chunkable relevance step: one slice when its transients fit
    the budget, or the step is small, or the batch is one sample.

    Each chunk is a kernel launch per op of the step, and a smaller product (a chunk of 8 of 64
    images of a 7×7 layer is too small a GEMM to fill a GPU), so a step is split only as far as
    the memory asks: on a ResNet50 at batch 64 only the steps near the output are, where the
    pass has freed little yet.
    """
    n = x.shape[0] if x.dim() > 1 else 1
    size_bytes = max(t.numel() * t.element_size() for t in (x, relevance))
    if n < 2 or size_bytes < _CHUNK_MIN_BYTES:
        return [slice(None)]
    budget = _transient_budget.get()
    if callable(budget):
        budget = budget()
    parts = min(n, _MAX_CHUNKS)
    if budget is not None:
        # The step's result, the input's relevance, is allocated whole however it is chunked.
        budget -= x.numel() * x.element_size()
        need = _STEP_TRANSIENTS * size_bytes
        parts = min(parts, -(-need // max(budget, _CHUNK_MIN_BYTES)))
    size = -(-n // parts)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _in_chunks(x: Tensor, chunks: list[slice], step: Callable[[slice, Tensor], Tensor]) -> Tensor:
    """The input relevance assembled from ``step(part, target)`` for each batch slice in turn:
    a step may write its result into ``target`` (its slice of the output) with its last op;
    otherwise the result is copied there."""
    out = torch.empty_like(x)
    for part in chunks:
        target = out[part]
        result = step(part, target)
        if result.data_ptr() != target.data_ptr():
            target.copy_(result)
    return out


def divides_factor(rule: str, stacks_weights: bool, nonnegative: bool) -> bool:
    """Whether :func:`relevance_fast` forms an unformed relevance ``c · factor`` inside its
    divisions (one pass fewer than forming it first, at the layer's output size): every rule
    whose denominators have the relevance's shape — ε, zB, and z⁺/α-β/γ on non-negative input
    or, on mixed-sign input, through the stacked ``[x⁺, x⁻]`` path (a map that stacks its
    weights); not w², flat (one denominator broadcast over the batch) or the reference's
    unstacked mixed-sign path."""
    if rule in ("epsilon", "zbox"):
        return True
    return rule in ("zplus", "alphabeta", "gamma") and (stacks_weights or nonnegative)


def prefers_factor(rule: str, stacks_weights: bool, nonnegative: bool) -> bool:
    """Whether a max pool above the layer should hand it its relevance unformed, as ``c`` and
    the factor ``out``, for the layer's divisions to form (:func:`divides_factor`).

    On mixed-sign input only for rules with one division: α-β's and γ's two terms would read the
    factor twice at the layer's output size, more than the pool pays to form ``c · out`` at its
    own, smaller size (ResNet50 α-β: +0.3 GB at batch 64 by count).
    """
    return divides_factor(rule, stacks_weights, nonnegative) and (
        nonnegative or rule in ("epsilon", "zbox", "zplus")
    )


def relevance_fast(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
    relevance_factor: Tensor | None = None,
    times_input: bool = True,
) -> Tensor:
    """Same as :func:`relevance_reference`, with the vanishing terms skipped.

    Takes a lean ``saved`` (``[]`` or ``[z]``) for z⁺, αβ and γ on non-negative input and
    computes their one extra product ``W⁺x`` here, so the forward pass keeps no aux tensors.
    A ``relevance_factor`` is multiplied in by the divisions themselves where the rule's
    relevance has the form ``x · c``, and ``times_input=False`` returns that ``c``.
    """
    check_rule(rule, params)
    input_product = rule == "epsilon" or (rule in INPUT_PRODUCT_RULES and _is_nonnegative(x))
    if not times_input and not input_product:
        raise _input_product_error(rule)
    if relevance_factor is not None and not divides_factor(rule, lin.stacks_weights, input_product):
        relevance, relevance_factor = times_factor(relevance, relevance_factor), None
    factor = relevance_factor

    def finish(c: Tensor) -> Tensor:
        # The transposed product is a fresh tensor: scale it by x in place, no extra buffer.
        return times_input_in_place(c, x) if times_input else c

    tr = lin.transpose
    if rule == "flat":
        return _flat_fast(lin, x, weight, relevance, params[0])
    if rule == "wsquare":
        return _wsquare_fast(lin, x, weight, bias, relevance, params[0])
    if rule == "epsilon":
        z = saved[0] if saved else lin.forward(x, weight, bias)
        share = divide_fast(relevance, z, params[0], factor=factor, last_read=True)
        return finish(tr(share, weight, x))
    if rule == "zbox":
        # x·Wᵀs − l·W⁺ᵀs − h·W⁻ᵀs = (x − h)·Wᵀs + (h − l)·W⁺ᵀs, since W⁻ = W − W⁺.
        low, high, eps = params
        zb = saved[1] if len(saved) == 2 else _zbox_denominator(lin, x, weight, low, high)
        s = divide_fast(relevance, zb, eps, factor=factor)
        del zb
        c = tr(s, weight, x)
        cp = tr(s, _positive_weight(weight), x)
        return c.mul_(x - high).add_(cp.mul_(high - low))
    if rule in ("zplus", "alphabeta", "gamma") and lin.stacks_weights and not _is_nonnegative(x):
        # Mixed-sign input (a first layer): x⁺ and x⁻ side by side, each product one call.
        chunks = _batch_chunks(x, relevance) if len(saved) <= 1 else [slice(None)]
        z = saved[0] if saved else None
        if z is None and rule == "gamma":
            z = lin.forward(x, weight, bias)  # γ keeps each share where z has its sign

        def stacked_part(part: slice, target: Tensor | None = None) -> Tensor:
            part_saved = [t[part] for t in saved] if len(saved) > 1 else None
            return _mixed_input_relevance(
                lin, x[part], weight, bias, None if z is None else z[part], part_saved,
                relevance[part], rule, params, None if factor is None else factor[part],
            )  # fmt: skip

        if len(chunks) == 1:
            return stacked_part(slice(None))
        # Chunk by chunk only a chunk's worth of the output-sized transients (two modified
        # pre-activations and their shares) lives at once: a first layer's output is the
        # largest tensor of a VGG (64 channels at 224×224).
        return _in_chunks(x, chunks, stacked_part)
    if rule == "wsquare" or not _is_nonnegative(x):
        if rule in ("zplus", "alphabeta", "gamma") and len(saved) <= 1:
            chunks = _batch_chunks(x, relevance)
            if len(chunks) > 1:
                # Mixed-sign input (a first layer): the reference formula holds z⁺, z⁻ and two
                # shares at the output's size; chunk by chunk only a chunk's worth of them
                # lives at once (this step was α-β's peak on VGG16: the 3-channel image in,
                # 64 channels at 224×224 out).
                def mixed_part(part: slice, target: Tensor) -> Tensor:
                    part_saved = complete_saved(
                        lin, x[part], weight, bias, [t[part] for t in saved], rule, params,
                        forward_fast,
                    )  # fmt: skip
                    return relevance_reference(
                        lin, x[part], weight, bias, part_saved, relevance[part], rule, params
                    )

                return _in_chunks(x, chunks, mixed_part)
        saved = complete_saved(lin, x, weight, bias, saved, rule, params, forward_fast)
        return relevance_reference(lin, x, weight, bias, saved, relevance, rule, params)
    # z⁺ never reads z; αβ and γ do (a lean saved then holds it, or it is recomputed).
    if saved:
        z = saved[0]
    else:
        z = None if rule == "zplus" else lin.forward(x, weight, bias)
    # A full saved is the caller's: read it. A lean one means W⁺x is computed here, into
    # buffers this function owns and reuses in place, each freed as soon as it is spent — the
    # peak of a layer's relevance step is what decides the peak memory of the whole analysis.
    full = len(saved) > 1
    if rule == "zplus":
        wp = _positive_weight(weight)
        if full:
            zp, zp_bias = saved[1], None
        else:
            zp, zp_bias = _product_and_bias(lin, x, wp, _positive(bias) if params[1] != 0 else None)
        share = divide_fast(
            relevance, zp, params[0], factor=factor, denominator_bias=zp_bias, last_read=True
        )
        del zp
        return finish(tr(share, wp, x))
    if rule == "alphabeta":
        if full:
            return _alphabeta_nonnegative(
                lin, x, weight, bias, z, saved, relevance, params, factor, times_input
            )
        chunks = _batch_chunks(x, relevance) if params[1] != 0 else [slice(None)]
        if len(chunks) == 1:
            return _alphabeta_nonnegative(
                lin, x, weight, bias, z, None, relevance, params, factor, times_input
            )
        # Chunk by chunk the step holds its output and one chunk's transients instead of three
        # whole-batch ones (W⁺x, a share, the second transposed product): this step was the
        # peak of a whole α-β analysis (1.55× a gradient's memory on VGG16). The weights' signs
        # are split once for all chunks, and each chunk's last op writes into its slice.
        signed = _signed_weights(weight, lin.stacks_weights)
        return _in_chunks(
            x, chunks,
            lambda part, target: _alphabeta_nonnegative(
                lin, x[part], weight, bias, None if z is None else z[part], None,
                relevance[part], params, None if factor is None else factor[part], times_input,
                signed, target,
            ),
        )  # fmt: skip
    gamma, eps = params[0], params[1]
    # The z < 0 branch only exists where z has negative entries: never after a fused ReLU, which
    # marks its output. Where z is not marked (a layer feeding a residual sum, a concatenation,
    # a BatchNorm) relevance does reach negative entries, so the branch runs without testing z
    # or the share for them: a test costs a pass and a host sync per layer and almost never
    # saves the product; where there are none the branch adds zeros.
    z_nonnegative = is_marked_nonnegative(z)
    if not z_nonnegative and not full and lin.stacks_weights:
        return finish(_gamma_paired(lin, x, weight, bias, z, relevance, gamma, eps, factor))
    # zpos = (W + γW⁺)x + b + γb⁺ straight from the product with the γ weights, which the
    # transposed product needs anyway (no W⁺x scaled and added to z: two passes fewer);
    # zneg = (1 + γ)z − γ(W⁺x + b⁺) = (2 + γ)z − zpos.
    w_up, b_up = _gamma_shifted(weight, bias, gamma, up=True)
    zpos_bias = None
    if full:
        zpos = saved[1]
    elif z_nonnegative:  # zpos is read by the division alone: its bias may go there
        zpos, zpos_bias = _product_and_bias(lin, x, w_up, b_up)
    else:
        zpos = lin.forward(x, w_up, b_up)
    share = divide_fast(
        relevance, zpos, eps, sign_reference=z, sign=1, factor=factor, denominator_bias=zpos_bias,
        last_read=z_nonnegative,  # the z < 0 branch below reads the relevance again
    )  # fmt: skip
    if z_nonnegative:
        del zpos
    c = tr(share, w_up, x)
    del share, w_up
    if not z_nonnegative:
        zneg = saved[2] if full else zpos.neg_().add_(z, alpha=2 + gamma)
        zpos = None
        share = divide_fast(relevance, zneg, eps, sign_reference=z, sign=-1, factor=factor)
        del zneg
        c.add_(tr(share, _gamma_shifted(weight, None, gamma, up=False)[0], x))
    return finish(c)


def _gamma_paired(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    z: Tensor,
    relevance: Tensor,
    gamma: float,
    eps: float,
    factor: Tensor | None,
) -> Tensor:
    """γ's bracket for ``x ≥ 0`` where both branches are live (``z`` of either sign), as one
    pass of ``relprop::paired_shares`` and one transposed product with ``[W + γW⁺; W + γW⁻]``
    (stacked along the outputs in one buffer): ``zneg = (2 + γ)z − zpos`` is formed inside the
    pass, and the two products' sum inside the product's reduction."""
    both = _stacked_weights(weight, gamma)
    b_up = None if bias is None else _gamma_shifted_bias(bias, gamma, up=True)
    zpos, zpos_bias = _product_and_bias(lin, x, both[: weight.shape[0]], b_up)
    shares = paired_shares_fast(
        relevance, z, zpos, eps, 1.0, 1.0, 2 + gamma, True, factor, zpos_bias
    )
    del zpos
    return lin.transpose(shares, both, x)


def _product_and_bias(
    lin: LinearMap, x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``(Wx + b, None)``, or ``(Wx, b)`` where the map adds a bias in a pass of its own
    (:attr:`LinearMap.bias_after_product`): for a pre-activation that only a division reads, which
    then adds ``b`` itself (the same rounding: ``Wx`` is rounded to the dtype either way)."""
    if bias is not None and lin.bias_after_product:
        return lin.forward(x, weight, None), bias
    return lin.forward(x, weight, bias), None


# Rules whose relevance a max pool above may hand down unspread, for the layer to divide at the
# pool's winners (graph/layers.Unspread): one division, by a product the layer makes itself.
DIVIDES_AT_WINNERS = ("zplus", "gamma")


def winner_division_terms(
    lin: LinearMap, x: Tensor, weight: Tensor, bias: Tensor | None, rule: str, params
) -> tuple[Tensor, Tensor | None, float, Tensor]:
    """What z⁺'s or γ's one division reads, for ``x ≥ 0`` and ``z ≥ 0`` (a fused ReLU): the
    denominator's product at the layer's output size, its bias where the division adds it
    (:func:`_product_and_bias`), ε, and the weight of the transposed product.

    z⁺ (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
    decomposition"): ``W⁺x (+ b⁺)`` with ``W⁺``; γ (Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview"):
    ``(W + γW⁺)x + b + γb⁺`` with ``W + γW⁺`` — γ's ``z < 0`` branch has no entry where a ReLU
    made ``z``. The same terms :func:`relevance_fast` divides by, for a caller that divides at
    a max pool's winners only (``graph.layers.WeightLayer._relevance_at_winners``).
    """
    if rule == "zplus":
        positive = _positive_weight(weight)
        product, product_bias = _product_and_bias(
            lin, x, positive, _positive(bias) if params[1] != 0 else None
        )
        return product, product_bias, float(params[0]), positive
    if rule == "gamma":
        shifted, shifted_bias = _gamma_shifted(weight, bias, params[0], up=True)
        product, product_bias = _product_and_bias(lin, x, shifted, shifted_bias)
        return product, product_bias, float(params[1]), shifted
    raise ValueError(f"relprop: {rule!r} does not divide at a max pool's winners")


def _zbox_denominator(lin: LinearMap, x: Tensor, weight: Tensor, low: float, high: float):
    """``Wx − W⁺l − W⁻h`` (no bias).

    Where the map stacks its weights (no channel groups): one product of ``[x, 1]`` (the input
    beside an input of ones, which the convolution zero-pads as it pads x) with
    ``[W, −(lW⁺ + hW⁻)]`` along the input channels, so that the bounds' terms are summed in the
    product's own reduction instead of in a pass over the layer's output (VGG16 EpsilonGammaBox
    at batch 64 by count: 46.1 → 45.4 GB moved). Otherwise the bounds' products, the same for
    every sample, are computed for one and subtracted.
    """
    if lin.stacks_weights:
        bounds_weight = _derived(
            weight,
            ("zbox", low, high),
            (weight.shape[0], 2 * weight.shape[1], *weight.shape[2:]),
            lambda out: torch.cat(
                [
                    weight,
                    _positive_weight(weight).mul(-low).sub_(_negative_weight(weight).mul(high)),
                ],
                dim=1,
                out=out,
            ),
        )
        return lin.forward(torch.cat([x, torch.ones_like(x)], dim=1), bounds_weight, None)
    bounds = torch.full_like(x[:1], low), torch.full_like(x[:1], high)
    offset = lin.forward(bounds[0], _positive_weight(weight), None).add_(
        lin.forward(bounds[1], _negative_weight(weight), None)
    )
    return lin.forward(x, weight, None).sub_(offset)


def _mixed_input_relevance(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    z: Tensor | None,
    saved: Sequence[Tensor] | None,
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
    factor: Tensor | None = None,
) -> Tensor:
    """z⁺, α-β and γ for input of both signs, with ``[x⁺, x⁻]`` stacked along dim 1
    (``relevance · factor`` formed by the divisions).

    Every term of :func:`relevance_reference` pairs ``x⁺`` with one weight set and ``x⁻`` with
    its mirror (``W⁺``/``W⁻``, ``W + γW⁺``/``W + γW⁻``), so each modified pre-activation is one
    product of the stacked input with ``[A, B]`` and each pair of transposed products is one
    product with it too: a first layer's output-sized tensors are written once per rule term
    instead of once per product, sum and division step of the reference.
    """
    tr = lin.transpose
    channels = x.shape[1]
    both = torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)
    if rule == "gamma":
        up, up_bias = _gamma_shifted(weight, bias, params[0], up=True)
        down, down_bias = _gamma_shifted(weight, bias, params[0], up=False)
        eps = params[1]
        # (weights on x⁺, on x⁻, bias, scale, sign of z that keeps the share)
        terms = [(up, down, up_bias, 1.0, 1), (down, up, down_bias, 1.0, -1)]
    else:
        wp, wn = _positive_weight(weight), _negative_weight(weight)
        use_bias = params[-1] != 0 and bias is not None
        bp = bias.clamp(min=0) if use_bias else None
        if rule == "zplus":
            eps = params[0]
            terms = [(wp, wn, bp, 1.0, 0)]
        else:
            eps = params[2]
            bn = bias.clamp(max=0) if use_bias else None
            terms = [(wp, wn, bp, params[0], 0)]
            if params[1] != 0:
                terms.append((wn, wp, bn, -params[1], 0))
    c = None
    for index, (on_positive, on_negative, term_bias, scale, sign) in enumerate(terms):
        stacked = _derived(
            weight,
            ("mixed", rule, tuple(params), index),
            (weight.shape[0], 2 * weight.shape[1], *weight.shape[2:]),
            lambda out, a=on_positive, b=on_negative: torch.cat([a, b], dim=1, out=out),
        )
        denominator = saved[1 + index] if saved else lin.forward(both, stacked, term_bias)
        share = divide_fast(
            relevance, denominator, eps, scale, z if sign else None, sign or 1, factor
        )
        del denominator
        term = tr(share, stacked, both)
        del share
        c = term if c is None else c.add_(term)
    both = times_input_in_place(c, both)
    return torch.add(both[:, :channels], both[:, channels:])


def _stacked_weights(weight: Tensor, gamma: float | None = None) -> Tensor:
    """``[W⁺; W⁻]`` (``gamma`` None) or ``[W + γW⁺; W + γW⁻]``, each set written straight into
    its half of one buffer stacked along the output dim (no copy to form the stack)."""

    outputs = weight.shape[0]

    def make(both: Tensor) -> Tensor:
        for half, up in ((both[:outputs], True), (both[outputs:], False)):
            if gamma is None:
                torch.clamp(weight, min=0 if up else None, max=None if up else 0, out=half)
            else:
                _gamma_shift(weight, gamma, up, out=half)
        return both

    return _derived(weight, ("stacked", gamma), (2 * outputs, *weight.shape[1:]), make)


def _signed_weights(weight: Tensor, stacked: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(W⁺, W⁻, [W⁺; W⁻])``, with ``W⁺`` and ``W⁻`` views of the stack, where ``stacked``;
    otherwise ``(W⁺, W⁻, None)``."""
    if not stacked:
        return _positive_weight(weight), _negative_weight(weight), None
    both = _stacked_weights(weight)
    return both[: weight.shape[0]], both[weight.shape[0] :], both


def paired_shares_fast(
    relevance: Tensor,
    z: Tensor,
    zp: Tensor,
    epsilon: float,
    scale: float,
    second_scale: float,
    z_weight: float,
    sign_masks: bool,
    factor: Tensor | None = None,
    zp_bias: Tensor | None = None,
) -> Tensor:
    """``[scale·R/stab(zp), second_scale·R/stab(z_weight·z − zp)]`` along dim 1
    (``relprop::paired_shares``; ``zp`` plus ``zp_bias``) in one native pass at every size (as
    :func:`divide_fast`: 25 µs against the composition's 177 µs on 256 elements)."""
    return call_op(
        paired_shares_op, paired_shares_kernel,
        relevance, z, zp, float(epsilon), float(scale), float(second_scale), float(z_weight),
        bool(sign_masks), factor, zp_bias,
    )  # fmt: skip


# α-β's z⁻ = W⁻x + b⁻ (x ≥ 0) is formed as z − z⁺ from the layer's z and the z⁺ the rule needs
# anyway, one product fewer, where each output unit has at least this many inputs; below it, as a
# product of its own. See inhibitor_from_difference.
MIN_INPUTS_FOR_DIFFERENCE = 64


def inhibitor_from_difference(weight: Tensor) -> bool:
    """Whether α-β's ``z⁻`` may be formed as ``z − z⁺`` for this layer without losing digits.

    The difference rounds at ``ε·(|z| + |z⁺|)``, which is a small error for ``z⁻`` only where
    ``|z⁻|`` is not much smaller than ``|z⁺|``. With many inputs per output unit both are sums of
    many terms and of one size. With few (a depthwise 3×3 convolution has 9, most of them 0
    after a ReLU) ``z⁻`` is often a small sum beside a large ``z⁺`` and the difference keeps few
    of its digits. Measured on random float32 α-β layers (4 seeds; the layer's error against
    float64 over the reference's): 9 inputs per unit 40×, 16 3600×, 18 350×, 36 3.6×, 64 1.6×,
    72 and more ≤ 1.4×; whole float32 analyses were 3.8× (MobileNetV2, depthwise 3×3) and 25×
    (a grouped 1-D convolution with 9 inputs per unit) as far from float64 as the reference's.
    The product of its own costs the layer's forward, which with few inputs per unit is small;
    every layer of VGG16 and ResNet50 that takes ``x ≥ 0`` has 64 inputs per unit or more.
    """
    # The product of the shape, not weight[0].numel(): indexing makes a view, 2 µs per call.
    return math.prod(weight.shape[1:]) >= MIN_INPUTS_FOR_DIFFERENCE


def _alphabeta_nonnegative(
    lin: LinearMap,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    z: Tensor | None,
    saved: Sequence[Tensor] | None,
    relevance: Tensor,
    params: Sequence[float],
    factor: Tensor | None = None,
    times_input: bool = True,
    signed_weights: tuple[Tensor, Tensor, Tensor | None] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """α-β relevance for ``x ≥ 0``: ``x·(α·W⁺ᵀ(R/zp) − β·W⁻ᵀ(R/zn))``, reading a full ``saved``
    or computing W⁺x into buffers it owns and reuses in place (``R = relevance · factor``;
    without ``times_input`` the bracket alone). ``signed_weights``: :func:`_signed_weights`
    already formed; ``out``: where the last op writes the result."""
    tr = lin.transpose
    alpha, beta, eps, use_bias = params[0], params[1], params[2], params[3] != 0
    # Both shares in one pass and one transposed product with [W⁺; W⁻], where zn = z − zp holds
    # (x ≥ 0, and the rule's bias is the layer's) and the map can stack its weights: the
    # subtraction, the second division's reads of R and the sum of two products are gone.
    difference = (use_bias or bias is None) and inhibitor_from_difference(weight)
    paired = beta != 0 and not saved and z is not None and difference and lin.stacks_weights
    wp, wn, both = signed_weights or _signed_weights(weight, paired)
    positive_bias = _positive(bias) if use_bias else None
    if paired:  # then `both` exists: the chunked caller stacks wherever the map can
        # zp is read by the paired shares alone: its bias may go there.
        zp, zp_bias = _product_and_bias(lin, x, wp, positive_bias)
        shares = paired_shares_fast(
            relevance, z, zp, eps, alpha, -beta, 1.0, False, factor, zp_bias
        )
        del zp
        c = tr(shares, both, x)
        del shares
    else:
        zp = saved[1] if saved else lin.forward(x, wp, positive_bias)
        c = tr(divide_fast(relevance, zp, eps, alpha, factor=factor), wp, x)
        if beta != 0:
            if saved:
                zn = saved[2]
            elif difference and z is not None:
                # With x ≥ 0: W⁻x + b⁻ = (Wx + b) − (W⁺x + b⁺), into zp's buffer in one pass.
                zn = torch.sub(z, zp, out=zp)
            else:
                zn = lin.forward(x, wn, _negative(bias) if use_bias else None)
            del zp
            share = divide_fast(relevance, zn, eps, -beta, factor=factor)
            del zn
            inhibitor = tr(share, wn, x)
            del share
            if not times_input:
                return c.add_(inhibitor) if out is None else torch.add(c, inhibitor, out=out)
            c.add_(inhibitor)
    if not times_input:
        return c
    return times_input_in_place(c, x, out)


def _wsquare_fast(
    lin: LinearMap, x: Tensor, weight: Tensor, bias: Tensor | None, relevance: Tensor, eps: float
) -> Tensor:
    """w² (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
    decomposition"): ``(W²)ᵀ(R / stab(W²·1 + b², e))``. The denominator does not depend on the
    input, so it is made for one sample and broadcast: the reference's product of a whole batch
    of ones cost the layer's forward again. The division is the fused one, in the relevance's
    dtype (16-bit dtypes computed in float32 inside the kernel, not in float32 tensors)."""
    squared = _derived(
        weight, ("square",), weight.shape, lambda out: torch.mul(weight, weight, out=out)
    )
    ones = x.new_ones((1, *x.shape[1:]))
    squared_bias = None if bias is None else _derived_bias(bias, ("square",), lambda b: b * b)
    denominator = lin.forward(ones, squared, squared_bias)
    share = divide_fast(relevance, denominator.expand_as(relevance), eps)
    return lin.transpose(share, squared, x)


def _flat_fast(lin: LinearMap, x: Tensor, weight: Tensor, relevance: Tensor, eps: float) -> Tensor:
    if lin.flat_relevance is not None:
        return lin.flat_relevance(x, weight, relevance, eps)
    return relevance_reference(lin, x, weight, None, [relevance], relevance, "flat", [eps])


def forward_by_backend(
    lin: LinearMap,
    triton_forward: Callable[[], Callable[..., list[Tensor]]],
    backend: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rule: str,
    params: Sequence[float],
) -> list[Tensor]:
    """Run the forward of ``rule`` on ``backend`` (``triton_forward()`` binds the kernel)."""
    if backend == "triton" and x.dtype in TRITON_DTYPES:
        return triton_forward()(x, weight, bias, rule, list(params))
    if backend == "reference":
        return forward_reference(lin, x, weight, bias, rule, params)
    return forward_fast(lin, x, weight, bias, rule, params)


def relevance_by_backend(
    lin: LinearMap,
    triton_relevance: Callable[[], Callable[..., Tensor]],
    backend: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    saved: Sequence[Tensor],
    relevance: Tensor,
    rule: str,
    params: Sequence[float],
    relevance_factor: Tensor | None = None,
    times_input: bool = True,
) -> Tensor:
    """Run the relevance of ``rule`` on ``backend`` (``triton_relevance()`` binds the kernel)."""
    extra = (relevance_factor, times_input)
    if backend == "reference":
        return relevance_reference(lin, x, weight, bias, saved, relevance, rule, params, *extra)
    # As the reference does (shapes only): the fast paths' own errors for a relevance of another
    # batch came from an inner op (relprop::stabilized_divide), naming none of these tensors.
    check_shapes(lin, x, weight, bias, relevance, relevance_factor, saved)
    if backend == "triton" and x.dtype in TRITON_DTYPES:
        if not times_input:
            # The fused kernel ends with the product with x; c alone is the native path's.
            return relevance_fast(lin, x, weight, bias, saved, relevance, rule, params, *extra)
        if relevance_factor is not None:
            relevance = times_factor(relevance, relevance_factor)
        # The kernels read every saved tensor; lean saved ([] or [z]) is completed first.
        saved = complete_saved(lin, x, weight, bias, saved, rule, params)
        return triton_relevance()(x, weight, bias, saved, relevance, rule, list(params))
    return relevance_fast(lin, x, weight, bias, saved, relevance, rule, params, *extra)


def fake_forward(z: Tensor, rule: str, params: Sequence[float]) -> list[Tensor]:
    """Shapes of ``[z, *aux]`` for ``torch.library`` fake tensors, ``z`` an empty output."""
    check_rule(rule, params)
    return [z] + [torch.empty_like(z) for _ in range(AUX_COUNT.get(rule, 0))]
