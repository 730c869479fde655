"""relprop::linear_* and relprop::conv2d_*: the fast CPU path against the float64 reference,
lean ``saved`` against full, and ``torch.library.opcheck`` on every op."""

from __future__ import annotations

import pytest
import torch

from relprop.ops import _layer_rules, conv, linear

RULES = [
    ("epsilon", [0.1]),
    ("epsilon", [0.0]),
    ("wsquare", [1e-6]),
    ("flat", [1e-6]),
    ("zplus", [1e-6, 1.0]),
    ("zplus", [1e-6, 0.0]),
    ("alphabeta", [2.0, 1.0, 1e-6, 1.0]),
    ("alphabeta", [1.0, 0.0, 1e-6, 0.0]),
    ("gamma", [0.25, 1e-6]),
    ("zbox", [-1.5, 2.0, 1e-6]),
]
CONV_GEOMETRY = [
    ([1, 1], [1, 1], [1, 1], 1),
    ([2, 2], [1, 1], [2, 2], 1),
    ([2, 1], [0, 2], [1, 2], 2),
]


def _inputs(nonnegative: bool, shape, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype)
    return x.relu() if nonnegative else x


@pytest.mark.parametrize("rule,params", RULES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRY)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_fast_matches_reference(rule, params, geometry, nonnegative, with_bias):
    torch.manual_seed(0)
    stride, padding, dilation, groups = geometry
    x = _inputs(nonnegative, (3, 4, 7, 9))
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if with_bias else None
    ref = conv.conv2d_forward_reference(x, w, b, stride, padding, dilation, groups, rule, params)
    got = conv.conv2d_forward(x, w, b, stride, padding, dilation, groups, rule, params)
    assert len(got) == len(ref) == 1 + _layer_rules.AUX_COUNT.get(rule, 0)
    for a, c in zip(ref, got):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    relevance = torch.randn_like(ref[0])
    expected = conv.conv2d_relevance_reference(
        x, w, b, ref, relevance, stride, padding, dilation, groups, rule, params
    )
    full = conv.conv2d_relevance(
        x, w, b, got, relevance, stride, padding, dilation, groups, rule, params
    )
    lean = conv.conv2d_relevance(
        x, w, b, got[:1], relevance, stride, padding, dilation, groups, rule, params
    )
    empty = conv.conv2d_relevance(
        x, w, b, [], relevance, stride, padding, dilation, groups, rule, params
    )
    for r in (full, lean, empty):
        torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule,params", RULES)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_fast_matches_reference(rule, params, nonnegative, with_bias):
    torch.manual_seed(1)
    x = _inputs(nonnegative, (5, 23))
    w = torch.randn(7, 23, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64) if with_bias else None
    ref = linear.linear_forward_reference(x, w, b, rule, params)
    got = linear.linear_forward(x, w, b, rule, params)
    for a, c in zip(ref, got):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
    relevance = torch.randn_like(ref[0])
    expected = linear.linear_relevance_reference(x, w, b, ref, relevance, rule, params)
    for saved in (got, got[:1], []):
        r = linear.linear_relevance(x, w, b, saved, relevance, rule, params)
        torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_float16_mixed_sign_input_with_a_dead_inhibitor_is_finite(monkeypatch, backend):
    """A first layer (x of both signs): unit 0's negative weights meet only x ≤ 0 and its
    positive weights only x ≥ 0, so its α-β ``z⁻ = W⁻x⁺ + W⁺x⁻`` is exactly 0 and the share
    saturates; with large weights ``c`` then overflows where ``x⁺`` or ``x⁻`` is 0, and
    ``[x⁺, x⁻] · c`` must be 0 there, not ``0 · inf = NaN``. Oracle: float64 (docs/ops.md)."""
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)
    x[:, :5] = -x[:, :5].abs()
    x[:, 5:] = x[:, 5:].abs()
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    w[0, :5] = -16 * w[0, :5].abs()
    w[0, 5:] = 16 * w[0, 5:].abs()
    b = torch.zeros(4, dtype=torch.float64)
    params = [2.0, 1.0, 1e-6, 1.0]
    relevance = torch.rand(3, 4, generator=g, dtype=torch.float64) + 1.0
    truth = linear.linear_relevance_reference(
        x, w, b, linear.linear_forward_reference(x, w, b, "alphabeta", params),
        relevance, "alphabeta", params,
    )  # fmt: skip
    half = [t.half() for t in (x, w, b, relevance)]
    saved = linear.linear_forward(*half[:3], "alphabeta", params)
    assert (saved[2][:, 0] == 0).all()  # z⁻ of unit 0: its share is past float16's range
    got = linear.linear_relevance(*half[:3], saved, half[3], "alphabeta", params)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), truth, rtol=0, atol=2e-3 * truth.abs().max().item())


@pytest.mark.parametrize("rule,params", RULES)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", ["conv-groups", "conv", "linear"])
def test_relevance_as_input_product(monkeypatch, kind, backend, nonnegative, rule, params):
    """``relevance_factor`` gives the relevance of ``relevance · factor``; ``times_input=False``
    returns ``c`` with ``R_in = x · c`` where the rule has that form, and refuses elsewhere.
    (One-group convolutions and dense layers on mixed-sign input form the product inside the
    divisions of their stacked ``[x⁺, x⁻]`` path; grouped ones before their reference path.)

    Oracle: the float64 reference called with the product formed and with the product with x
    done, on the same inputs."""
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    torch.manual_seed(4)
    if kind.startswith("conv"):
        groups = 2 if kind == "conv-groups" else 1
        x = _inputs(nonnegative, (3, 4, 7, 9))
        w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64)
        b = torch.randn(6, dtype=torch.float64)
        geometry = ([2, 1], [1, 1], [1, 2], groups)

        def relevance_op(*args, **kwargs):
            saved, relevance = args
            return conv.conv2d_relevance(
                x, w, b, saved, relevance, *geometry, rule, params, **kwargs
            )

        saved = conv.conv2d_forward(x, w, b, *geometry, rule, params)
        reference = conv.conv2d_relevance_reference
        truth_args = (x, w, b, saved)
        truth_tail = (*geometry, rule, params)
    else:
        x = _inputs(nonnegative, (5, 23))
        w, b = torch.randn(7, 23, dtype=torch.float64), torch.randn(7, dtype=torch.float64)

        def relevance_op(*args, **kwargs):
            saved, relevance = args
            return linear.linear_relevance(x, w, b, saved, relevance, rule, params, **kwargs)

        saved = linear.linear_forward(x, w, b, rule, params)
        reference = linear.linear_relevance_reference
        truth_args = (x, w, b, saved)
        truth_tail = (rule, params)
    coefficient = torch.randn_like(saved[0])
    factor = torch.rand_like(saved[0])
    truth = reference(*truth_args, coefficient * factor, *truth_tail)
    for lean in (saved, saved[:1]):
        got = relevance_op(lean, coefficient, relevance_factor=factor)
        torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10)
        has_form = rule == "epsilon" or (rule in ("zplus", "alphabeta", "gamma") and nonnegative)
        if has_form:
            c = relevance_op(lean, coefficient, relevance_factor=factor, times_input=False)
            torch.testing.assert_close(x * c, truth, rtol=1e-10, atol=1e-10)
        else:
            with pytest.raises(ValueError, match="times_input=False"):
                relevance_op(lean, coefficient, relevance_factor=factor, times_input=False)


def test_epsilon_rule_is_gradient_times_input_with_zero_epsilon():
    # An independent oracle for the transposed product: autograd.
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    z = torch.nn.functional.conv2d(x, w, None, 2, 1)
    relevance = z.detach() * torch.rand_like(z)
    (grad,) = torch.autograd.grad(z, x, relevance / z.detach())
    saved = conv.conv2d_forward(x.detach(), w, None, [2, 2], [1, 1], [1, 1], 1, "epsilon", [0.0])
    got = conv.conv2d_relevance(
        x.detach(), w, None, saved, relevance, [2, 2], [1, 1], [1, 1], 1, "epsilon", [0.0]
    )
    torch.testing.assert_close(got, x.detach() * grad, rtol=1e-10, atol=1e-12)


def test_bad_rule_and_params_raise():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        linear.linear_forward(x, w, None, "nope", [])
    with pytest.raises(ValueError, match="takes 2 parameters"):
        linear.linear_forward(x, w, None, "zplus", [1e-6])


@pytest.mark.parametrize("rule,params", [RULES[0], RULES[3], RULES[4], RULES[8]])
def test_opcheck_layer_ops(rule, params):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 5).relu()
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    saved = conv.conv2d_forward(x, w, b, *geometry, rule, params)
    relevance = torch.randn_like(saved[0])
    torch.library.opcheck(conv.conv2d_forward, (x, w, b, *geometry, rule, params))
    torch.library.opcheck(
        conv.conv2d_relevance, (x, w, b, saved, relevance, *geometry, rule, params)
    )
    factor = torch.rand_like(relevance)
    torch.library.opcheck(
        conv.conv2d_relevance,
        (x, w, b, saved, relevance, *geometry, rule, params, factor, rule == "flat"),
    )
    xl, wl, bl = torch.randn(3, 5).relu(), torch.randn(4, 5), torch.randn(4)
    saved_l = linear.linear_forward(xl, wl, bl, rule, params)
    torch.library.opcheck(linear.linear_forward, (xl, wl, bl, rule, params))
    torch.library.opcheck(
        linear.linear_relevance, (xl, wl, bl, saved_l, torch.randn_like(saved_l[0]), rule, params)
    )


CHUNKED_RULES = [
    ("alphabeta", [2.0, 1.0, 1e-6, 1.0]),
    ("alphabeta", [2.0, 1.0, 1e-6, 0.0]),
    ("zplus", [1e-6, 1.0]),
    ("gamma", [0.25, 1e-6]),
]


@pytest.mark.parametrize(("rule", "params"), CHUNKED_RULES, ids=str)
@pytest.mark.parametrize("sign", ["nonneg", "mixed"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_batch_chunks_match_float64(monkeypatch, kind, sign, rule, params):
    """Large steps of these rules run chunk by chunk (to bound peak memory); uneven chunks of a
    batch of 11 (six chunks: five of 2, one of 1) must give the float64 reference's numbers and
    the unchunked step's."""
    monkeypatch.setattr(_layer_rules, "_CHUNK_MIN_BYTES", 0)
    assert len(_layer_rules._batch_chunks(torch.zeros(11, 3), torch.zeros(11, 2))) == 6
    torch.manual_seed(3)
    if kind == "conv":
        x = torch.rand(11, 4, 7, 9, dtype=torch.float64)
        w, b = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        lin = conv.geometry_map([2, 1], [1, 1], [1, 1], 1)
    else:
        x = torch.rand(11, 6, dtype=torch.float64)
        w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        lin = linear.DENSE_MAP
    if sign == "mixed":
        x = x - 0.5
    full = _layer_rules.forward_reference(lin, x, w, b, rule, params)
    r = torch.randn_like(full[0])
    truth = _layer_rules.relevance_reference(lin, x, w, b, full, r, rule, params)

    def fast():
        lean = [full[0].float()]
        return _layer_rules.relevance_fast(
            lin, x.float(), w.float(), b.float(), lean, r.float(), rule, params
        )

    chunked = fast()
    torch.testing.assert_close(chunked.double(), truth, rtol=1e-4, atol=1e-5)
    if sign == "nonneg":
        # As the engine calls it: relevance unformed (r · f), c of R_in = x · c returned.
        factor = torch.rand_like(r)
        truth_of_product = _layer_rules.relevance_reference(
            lin, x, w, b, full, r * factor, rule, params
        )
        coefficient = _layer_rules.relevance_fast(
            lin, x.float(), w.float(), b.float(), [full[0].float()], r.float(), rule, params,
            factor.float(), False,
        )  # fmt: skip
        torch.testing.assert_close(x * coefficient.double(), truth_of_product, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(_layer_rules, "_CHUNK_MIN_BYTES", 1 << 62)
    torch.testing.assert_close(chunked, fast(), rtol=1e-5, atol=1e-6)


PAIRED_RULES = [("alphabeta", [2.0, 1.0, 1e-6, 1.0]), ("gamma", [0.25, 1e-6])]


@pytest.mark.parametrize(("rule", "params"), PAIRED_RULES, ids=str)
@pytest.mark.parametrize("with_factor", [False, True], ids=["plain", "factor"])
@pytest.mark.parametrize(
    "kind, paired", [("linear", True), ("conv", True), ("conv-groups", False)], ids=str
)
def test_two_shares_in_one_pass_where_weights_stack(
    monkeypatch, kind, paired, with_factor, rule, params
):
    """On x ≥ 0 with z at hand (and, for γ, z unmarked: both branches live), the rule's two
    shares come from one relprop::paired_shares pass and one transposed product with the two
    weight sets stacked — for dense layers and one-group convolutions; grouped convolutions keep
    two products. Either way: the float64 reference's numbers (the native kernel of the pass
    runs at every size)."""
    calls = []
    pass_through = _layer_rules.paired_shares_fast
    monkeypatch.setattr(
        _layer_rules, "paired_shares_fast", lambda *a: calls.append(1) or pass_through(*a)
    )
    torch.manual_seed(9)
    # At least MIN_INPUTS_FOR_DIFFERENCE inputs per unit, where α-β forms z⁻ as z − z⁺.
    if kind == "linear":
        x, w = torch.rand(4, 70, dtype=torch.float64), torch.randn(6, 70, dtype=torch.float64)
        lin = linear.DENSE_MAP
    else:
        groups = 2 if kind == "conv-groups" else 1
        x = torch.rand(3, 8, 8, 7, dtype=torch.float64)
        w = torch.randn(6, 8 // groups, 3, 3, dtype=torch.float64)
        lin = conv.geometry_map([2, 1], [1, 1], [1, 1], groups)
    b = torch.randn(6, dtype=torch.float64)
    full = _layer_rules.forward_reference(lin, x, w, b, rule, params)
    assert (full[0] < 0).any() and (full[0] > 0).any()
    r = torch.randn_like(full[0])
    factor = torch.rand_like(r) if with_factor else None
    truth = _layer_rules.relevance_reference(
        lin, x, w, b, full, r if factor is None else r * factor, rule, params
    )
    got = _layer_rules.relevance_fast(lin, x, w, b, full[:1], r, rule, params, factor)
    torch.testing.assert_close(got, truth, rtol=1e-10, atol=1e-10)
    assert len(calls) == (1 if paired else 0)


FEW_INPUTS = {
    # (input shape, weight shape, groups): 9, 16 and 18 inputs per output unit.
    "depthwise-3x3": ((2, 8, 9, 9), (8, 1, 3, 3), 8),
    "grouped-1d": ((2, 6, 1, 30), (8, 3, 1, 3), 2),
    "conv-1x1-16": ((2, 16, 5, 5), (8, 16, 1, 1), 1),
    "dense-18": ((4, 18), (5, 18), 1),
}


@pytest.mark.parametrize("kind", list(FEW_INPUTS))
def test_alphabeta_on_few_inputs_per_unit_is_as_precise_as_the_reference(kind):
    """With few inputs per unit, z⁻ = z − z⁺ keeps few digits of a small z⁻ beside a large z⁺
    (forming it so, these layers were 40× to 3600× as far from float64 as the reference in
    float32): there the fast path forms z⁻ as a product of its own, and must be as close to
    float64 as the float32 reference is (flash-attention's criterion: at most twice its error)
    over four seeds."""
    x_shape, w_shape, groups = FEW_INPUTS[kind]
    assert w_shape[1] * (w_shape[2] * w_shape[3] if len(w_shape) == 4 else 1) < (
        _layer_rules.MIN_INPUTS_FOR_DIFFERENCE
    )
    lin = (
        linear.DENSE_MAP if len(w_shape) == 2 else conv.geometry_map([1, 1], [0, 0], [1, 1], groups)
    )
    params = [2.0, 1.0, 1e-6, 1.0]
    fast_errors, reference_errors = [], []
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(x_shape, generator=generator, dtype=torch.float64).relu()
        w = torch.randn(w_shape, generator=generator, dtype=torch.float64)
        b = 0.1 * torch.randn(w_shape[0], generator=generator, dtype=torch.float64)
        z = lin.forward(x, w, b)
        r = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        truth = _layer_rules.relevance_reference(lin, x, w, b, [z], r, "alphabeta", params)
        x32, w32, b32, r32 = x.float(), w.float(), b.float(), r.float()
        lean = [lin.forward(x32, w32, b32)]
        reference = _layer_rules.relevance_reference(
            lin, x32, w32, b32, lean, r32, "alphabeta", params
        )
        fast = _layer_rules.relevance_fast(lin, x32, w32, b32, lean, r32, "alphabeta", params)
        reference_errors.append((reference.double() - truth).flatten())
        fast_errors.append((fast.double() - truth).flatten())
    # Over all seeds as a whole: the two paths round the sum of the α and β terms in different
    # places, so element by element either can be the closer by a few roundings.
    fast_error = torch.linalg.vector_norm(torch.cat(fast_errors))
    reference_error = torch.linalg.vector_norm(torch.cat(reference_errors))
    assert fast_error <= 2 * reference_error, (fast_error, reference_error)


def _batch_one(t: torch.Tensor) -> torch.Tensor:
    return t[:1].clone()


@pytest.mark.parametrize("rule,params", RULES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("which", ["relevance", "saved", "factor"])
def test_reference_refuses_a_relevance_of_another_batch(rule, params, kind, which):
    """Plain PyTorch broadcast a batch-1 relevance (or saved tensor, or factor) against a batch-2
    input and returned relevance for both samples; the fast paths refuse that call."""
    torch.manual_seed(1)
    if kind == "linear":
        x, w, b = _inputs(True, (2, 6)), torch.randn(4, 6, dtype=torch.float64), None
        ref = linear.linear_forward_reference(x, w, b, rule, params)

        def run(saved, relevance, factor):
            return linear.linear_relevance_reference(
                x, w, b, saved, relevance, rule, params, factor
            )
    else:
        x = _inputs(True, (2, 3, 5, 5))
        w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        geometry = ([1, 1], [1, 1], [1, 1], 1)
        ref = conv.conv2d_forward_reference(x, w, b, *geometry, rule, params)

        def run(saved, relevance, factor):
            return conv.conv2d_relevance_reference(
                x, w, b, saved, relevance, *geometry, rule, params, factor
            )

    relevance, factor = torch.randn_like(ref[0]), None
    run(ref, relevance, factor)  # the shapes that fit are taken
    if which == "relevance":
        relevance = _batch_one(relevance)
    elif which == "saved":
        ref = [_batch_one(ref[0]), *ref[1:]]
    else:
        factor = _batch_one(torch.rand_like(ref[0]))
    with pytest.raises(ValueError, match=r"has shape \(1, 4"):
        run(ref, relevance, factor)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("rule,params", [RULES[0], RULES[6], RULES[8]], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_every_backend_names_the_tensor_of_another_batch(monkeypatch, backend, rule, params, kind):
    """The fast paths refused a batch-1 relevance too, but from an inner op
    ("relprop::stabilized_divide: denominator has shape (2, 4), numerator (1, 4)"): they now
    check as the reference does, naming the tensor and the output's shape."""
    monkeypatch.setenv("RELPROP_BACKEND", backend)
    torch.manual_seed(2)
    if kind == "linear":
        x, w, b = torch.rand(2, 6), torch.randn(4, 6), torch.randn(4)
        saved = linear.linear_forward(x, w, b, rule, params)

        def run(relevance):
            return linear.linear_relevance(x, w, b, saved[:1], relevance, rule, params)
    else:
        x, w, b = torch.rand(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
        geometry = ([1, 1], [1, 1], [1, 1], 1)
        saved = conv.conv2d_forward(x, w, b, *geometry, rule, params)

        def run(relevance):
            return conv.conv2d_relevance(x, w, b, saved[:1], relevance, *geometry, rule, params)

    run(torch.randn_like(saved[0]))  # the shapes that fit are taken
    with pytest.raises(ValueError, match=r"^relevance has shape \(1, 4.*the output's for x"):
        run(_batch_one(torch.randn_like(saved[0])))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_reference_forward_refuses_an_input_that_does_not_fit(kind):
    if kind == "linear":
        with pytest.raises(ValueError, match=r"\(2, 5\) and \(4, 6\)"):
            linear.linear_forward_reference(
                torch.randn(2, 5), torch.randn(4, 6), None, "epsilon", [0.0]
            )
        with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
            linear.linear_forward_reference(
                torch.randn(2, 6), torch.randn(4, 6), torch.randn(3), "epsilon", [0.0]
            )
    else:
        with pytest.raises(ValueError, match="groups=1"):
            conv.conv2d_forward_reference(
                torch.randn(2, 2, 5, 5), torch.randn(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1],
                1, "epsilon", [0.0],
            )  # fmt: skip
