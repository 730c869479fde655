"""The engine's shortcuts for host time are exact: each gives what the long way gives.

On a GPU the host issues every kernel, and where kernels are short (ResNet50's late layers) the
device waits for it; ``benchmarks/test_bench_host.py`` measures the host time per analysis. The
shortcuts taken for it are checked here against the long way as the oracle: torch's own module
walk, ``fx.node.map_arg``, a chunking step always finding a memory budget, a parametrized weight
read as the module computes it, and ``RELPROP_BACKEND`` read at the pass's start.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from tests.oracles.inside_ops import InsideCustomOps
from tests.oracles.nets import bn_sequential, seeded_normal, small_resnet, tiny_cnn
from torch import fx, nn

import relprop
from relprop import _native
from relprop.graph import program as program_module
from relprop.graph.program import _argument_reader
from relprop.graph.trace import named_submodules, submodules
from relprop.ops import _backend, _layer_rules

LRP_NAMES = [
    name
    for name in relprop.analyzer_names()
    if name.startswith(("lrp", "deep_taylor")) and name != "lrp"
]


def _models_to_walk() -> list[nn.Module]:
    shared = nn.Linear(3, 3)
    with_shared = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.Tanh()), shared)
    with_none = nn.Sequential(nn.Linear(3, 3))
    with_none.register_module("missing", None)
    with_none.add_module("tail", nn.Sequential(nn.Identity(), nn.Sequential(nn.ReLU())))
    return [torchvision.models.resnet18(), torchvision.models.googlenet(init_weights=False),
            with_shared, with_none, nn.Linear(2, 2)]  # fmt: skip


@pytest.mark.parametrize("index", range(5))
def test_submodules_walk_as_torch_does(index):
    # Same objects (and paths) in the same order as nn.Module.modules() (named_modules()): each
    # once, None children left out.
    model = _models_to_walk()[index]
    walked = submodules(model)
    expected = list(model.modules())
    assert len(walked) == len(expected)
    assert all(a is b for a, b in zip(walked, expected))
    named, expected_named = named_submodules(model), list(model.named_modules())
    assert [path for path, _ in named] == [path for path, _ in expected_named]
    assert all(a is b for (_, a), (_, b) in zip(named, expected_named))


def test_an_analysis_walks_its_model_once_and_sees_a_replaced_module_after(monkeypatch):
    # Its train/eval flags, hooks and trace check share one walk (graph.trace.OneWalk); outside
    # an analysis nothing is kept: a module replaced between two analyses is walked, and the
    # next analysis runs the new module (oracle: a new analyzer of the changed model).
    from relprop.graph import trace as trace_module

    model = tiny_cnn().double().eval()
    analyzer = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.0)
    x = seeded_normal((2, 3, 8, 8), seed=1)
    analyzer.analyze(x)
    walks = []
    walk = trace_module.named_submodules

    def recorded(module):
        walks.append(walk(module))
        return walks[-1]

    monkeypatch.setattr(trace_module, "named_submodules", recorded)
    analyzer.analyze(x)
    # Three asked for (flags, hooks, the trace's modules), one made.
    assert len(walks) == 3 and all(w is walks[0] for w in walks)
    with trace_module.OneWalk(model) as outer:
        with trace_module.OneWalk(model) as inner:
            assert inner is outer
        assert trace_module.named_submodules(model) is outer  # the outer one kept
    assert trace_module.named_submodules(model) is not outer
    model[7] = nn.Linear(24, 4).double()
    relevance = analyzer.analyze(x)
    fresh = relprop.create_analyzer("lrp.epsilon", model, epsilon=0.0).analyze(x)
    assert torch.equal(relevance, fresh)
    # Not the relevance of the old head: LRP-0 on this ReLU net is gradient × input (to the
    # average pool's stabiliser).
    leaf = x.clone().requires_grad_()
    output = model(leaf)
    (grad,) = torch.autograd.grad(output.gather(1, output.argmax(1, keepdim=True)).sum(), leaf)
    torch.testing.assert_close(relevance, grad * x, rtol=1e-2, atol=1e-6)


class _Arguments(nn.Module):
    """Calls with flat, nested, keyword and slice arguments, as traced models have them."""

    def forward(self, x):
        a = x.relu()
        b = torch.cat([a, x], dim=1)
        c = b[:, 1:3]
        d = b[:, : x.shape[1]]
        e = torch.add(c, d, alpha=2.0)
        f = operator.mul(e, 3.0)
        g = e.reshape(e.shape[0], -1)
        h = torch.stack((f.flatten(1), g), 0)
        return h.sum(dim=(0,), keepdim=False)


def test_argument_reader_gives_what_map_arg_gives():
    gm = fx.symbolic_trace(_Arguments())
    values = {node.name: object() for node in gm.graph.nodes}
    checked = 0
    for node in gm.graph.nodes:
        args, kwargs = _argument_reader(node.args, node.kwargs)(values)
        expected_args = fx.node.map_arg(node.args, lambda n: values[n.name])
        expected_kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n.name])
        assert args == expected_args and type(args) is tuple, node.format_node()
        assert kwargs == expected_kwargs, node.format_node()
        checked += bool(node.args)
    assert checked >= 8


def _inputs() -> list[tuple[nn.Module, torch.Tensor]]:
    return [
        (tiny_cnn(seed=2).double(), seeded_normal((2, 3, 9, 8), seed=5)),
        (tiny_cnn(seed=2).double(), seeded_normal((2, 3, 9, 8), seed=5).abs()),
        (bn_sequential(seed=3).double(), seeded_normal((2, 3, 8, 8), seed=6)),
        (small_resnet(seed=4).double(), seeded_normal((2, 3, 32, 32), seed=7)),
    ]


@pytest.mark.parametrize("name", LRP_NAMES)
def test_every_step_that_may_chunk_finds_a_budget(monkeypatch, name):
    """A pass works out what it holds only where a step may ask (α-β, or z⁺/α-β/γ on input not
    marked ≥ 0): every step that asks must find a budget (a pass that skipped the work would
    hand it none, and the step would split as far as it may: 8 chunks). Chunking is forced on
    for every size, so every step that can ask does."""
    monkeypatch.setattr(_layer_rules, "_CHUNK_MIN_BYTES", 1)
    asked = []
    batch_chunks = _layer_rules._batch_chunks

    def checked(x, relevance):
        budget = _layer_rules._transient_budget.get()
        assert budget is not None, f"{name}: a step asked for a budget the pass did not work out"
        asked.append(budget)
        return batch_chunks(x, relevance)

    monkeypatch.setattr(_layer_rules, "_batch_chunks", checked)
    held = []
    held_bytes = program_module._HeldBytes

    def counting(*args):
        held.append(True)
        return held_bytes(*args)

    monkeypatch.setattr(program_module, "_HeldBytes", counting)
    for model, x in _inputs():
        kwargs = {"low": -3.0, "high": 3.0} if "bounded" in name or "box" in name else {}
        try:
            analyzer = relprop.create_analyzer(name, model, **kwargs)
        except TypeError:
            analyzer = relprop.create_analyzer(name, model)
        analyzer.analyze(x, neuron_selection=[1, 2])
    # The pass counts its memory at most once per analysis, and only where a step could ask.
    assert len(held) <= len(_inputs())
    if asked:
        assert held


def test_an_epsilon_pass_on_a_relu_net_does_not_count_its_memory(monkeypatch):
    # ε never chunks: the walk over the saved storages would be host time for nothing.
    calls = []
    held_bytes = program_module._HeldBytes
    monkeypatch.setattr(
        program_module, "_HeldBytes", lambda *args: calls.append(1) or held_bytes(*args)
    )
    model, x = small_resnet(seed=4).double(), seeded_normal((2, 3, 32, 32), seed=7)
    relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    relprop.create_analyzer("lrp.epsilon_gamma_box", model, low=-3.0, high=3.0).analyze(x)
    assert calls == []
    relprop.create_analyzer("lrp.alpha_2_beta_1", model).analyze(x)
    assert calls == [1]


def test_a_parametrized_convolution_before_a_batchnorm_folds_its_weight_as_it_is_now():
    """The fold reads a plain parameter from the module's dicts; a parametrized weight (computed
    on access) is read as an attribute. Oracle: the same model with that weight as a plain
    parameter."""
    model = bn_sequential(seed=8).double()
    nn.utils.parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(1.5)  # a training step, say
    plain = bn_sequential(seed=8).double()
    with torch.no_grad():
        plain[0].weight.copy_(model[0].weight)
    x = seeded_normal((2, 3, 8, 8), seed=9)
    for name in ["lrp.epsilon", "lrp.alpha_2_beta_1"]:
        expected = relprop.create_analyzer(name, plain).analyze(x, neuron_selection=[0, 3])
        actual = relprop.create_analyzer(name, model).analyze(x, neuron_selection=[0, 3])
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def test_the_backend_is_read_as_a_pass_begins(monkeypatch):
    monkeypatch.setenv("RELPROP_BACKEND", "reference")
    x = torch.ones(2, 3)
    with torch.no_grad(), _backend.one_pass(x):
        monkeypatch.setenv("RELPROP_BACKEND", "native")
        assert _backend.forced_backend() == "reference"
        assert _backend.layer_backend() == "reference"
        assert _backend.calls_kernels_directly(x)
    assert _backend.forced_backend() == "native"


def test_a_pass_under_a_dispatch_mode_goes_through_the_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.ones(2, 3)
    with torch.no_grad(), Passthrough(), _backend.one_pass(x):
        assert not _backend.calls_kernels_directly(x)
    with torch.enable_grad(), _backend.one_pass(x):
        assert not _backend.calls_kernels_directly(x)


def test_a_cpu_pass_fixes_no_cuda_launch_arguments():
    assert _native.pass_launch_args(torch.ones(2)) is None
    _native.end_pass_launch_args(None)


@pytest.mark.gpu
def test_a_pass_launches_on_the_stream_current_as_it_begins():
    x = torch.randn(4, 3, 32, 32, device="cuda")
    model = small_resnet(seed=4).cuda()
    expected = relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.no_grad(), _backend.one_pass(x):
            args = _native.cuda_launch_args(x)
        assert args["stream"] == side.cuda_stream
        on_side = relprop.create_analyzer("lrp.epsilon", model).analyze(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(on_side, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batchnorm_scales_and_shifts_concatenated_match_per_tensor_and_float64(dtype):
    """The fold computes all BatchNorms' ``γ/√(σ² + ε)`` and ``β − μ·scale`` as one pass over
    their concatenated statistics (or by multi-tensor ops where dtypes, devices or ε differ):
    bitwise the same as the per-tensor ops, and within a rounding of the float64 values."""
    from relprop.graph import canonize

    model = small_resnet(seed=11).to(dtype)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    statistics = [[getattr(bn, n) for bn in bns] for n in ("running_var", "weight", "bias")]
    statistics.append([bn.running_mean for bn in bns])
    eps = bns[0].eps
    with torch.no_grad():
        scales, shifts = canonize._scales_and_shifts(bns)
        per_tensor = canonize._multi_tensor_scales_and_shifts(*statistics, [bn.eps for bn in bns])
        bns[0].eps = 2e-5  # another ε: the multi-tensor ops run
        mixed_scales, _ = canonize._scales_and_shifts(bns)
    for scale, shift, scale_t, shift_t, bn in zip(scales, shifts, *per_tensor, bns):
        assert torch.equal(scale, scale_t) and torch.equal(shift, shift_t)
        var, gamma = bn.running_var.double(), bn.weight.double()
        expected_scale = gamma / torch.sqrt(var + eps)
        expected_shift = bn.bias.double() - bn.running_mean.double() * expected_scale
        tolerance = {"rtol": 4e-7, "atol": 1e-7} if dtype == torch.float32 else {}
        torch.testing.assert_close(scale.double(), expected_scale, **tolerance)
        torch.testing.assert_close(shift.double(), expected_shift, **tolerance)
    expected_first = bns[0].weight.double() / torch.sqrt(bns[0].running_var.double() + 2e-5)
    torch.testing.assert_close(mixed_scales[0].double(), expected_first, rtol=4e-7, atol=1e-7)


class _IdentityHeavy(nn.Module):
    """Identity modules, a dropout and a fused ReLU, one identity read twice and one at the end:
    steps a program skips (their users read the input itself)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.same = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)
        self.tail = nn.Identity()

    def forward(self, x):
        a = self.same(self.relu(self.bn(self.conv(x))))
        b = self.conv2(self.drop(a)) + a
        return self.tail(self.fc(torch.flatten(self.same(b), 1)))


@pytest.mark.parametrize(
    "name", ["lrp.epsilon", "lrp.z_plus", "lrp.alpha_2_beta_1", "lrp.epsilon_gamma_box"]
)
@pytest.mark.parametrize("model_index", range(3))
def test_skipped_steps_change_nothing(monkeypatch, name, model_index):
    """Oracle: the same analysis with every step run, the skipped ones included."""
    model, x = [
        (_IdentityHeavy().double().eval(), seeded_normal((2, 3, 8, 8), seed=13)),
        (small_resnet(seed=4).double(), seeded_normal((2, 3, 32, 32), seed=7)),
        (bn_sequential(seed=3).double(), seeded_normal((2, 3, 8, 8), seed=6)),
    ][model_index]
    kwargs = {"low": -3.0, "high": 3.0} if "box" in name else {}
    analyzer = relprop.create_analyzer(name, model, **kwargs)
    skipping = analyzer.analyze(x, neuron_selection=[1, 2])
    skipped = analyzer._get_program()._source
    assert skipped, "nothing was skipped"
    monkeypatch.setattr(program_module, "_hands_on_its_input", lambda step: False)
    every_step = relprop.create_analyzer(name, model, **kwargs)
    assert not every_step._get_program()._source
    assert torch.equal(every_step.analyze(x, neuron_selection=[1, 2]), skipping)


def test_the_host_benchmark_runs_resnet50s_steps():
    """``benchmarks/test_bench_host.py`` times ResNet50's host work on a narrow copy: it must have
    torchvision ResNet50's modules (types, in order) and relprop's plan for it the same steps
    (kinds, rules, ops), so that only the kernels' sizes differ."""
    from tests._benchmarks import load_benchmark

    pytest.importorskip("pytest_benchmark")
    bench = load_benchmark("test_bench_host.py")
    narrow = bench.narrow_resnet50()
    full = torchvision.models.resnet50().eval()
    assert [type(m) for m in narrow.modules()] == [type(m) for m in full.modules()]
    widths = [m.out_channels for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [m.out_channels // 16 for m in full.modules() if isinstance(m, nn.Conv2d)]
    for method in bench.METHODS:
        plans = [bench._analyzer(method, model).plan for model in (narrow, full)]
        rows = [[(s.kind, str(s.rule), s.impl) for s in plan.steps] for plan in plans]
        assert rows[0] == rows[1], method


def test_each_weight_is_folded_in_its_own_step():
    """On a GPU the device waits for whatever the host launches before the first layer: each
    layer's BatchNorm product is made when its step asks for its weight, between the layers
    before it. Counted on the ops dispatched: one fold product before the first convolution (the
    first layer's own), one per folded layer in all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Order(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model, x = small_resnet(seed=4).double(), seeded_normal((2, 3, 32, 32), seed=7)
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    analyzer.analyze(x)  # the trace, and weight buffers to fold into
    with Order() as order:
        analyzer.analyze(x)
    folded = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    first_convolution = next(
        i for i, n in enumerate(order.names) if "convolution" in n or "conv2d_forward" in n
    )
    products = [i for i, n in enumerate(order.names) if n == "aten.mul.out"]
    assert len(products) == folded
    assert sum(i < first_convolution for i in products) == 1


@pytest.mark.parametrize(
    "composite",
    ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonPlus", "lrp.w_square"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biases_derived_together_change_nothing(monkeypatch, composite, dtype):
    """A convolution without a bias of its own gets its BatchNorm's shift as its bias, a slice of
    one tensor made for all layers of the pass: ``b⁺``, ``b⁻``, ``b + γb⁺`` and w²'s ``b²`` are
    derived from that tensor once, for all (one launch each on ResNet50 instead of 53). Oracle:
    the same analysis with every bias derived on its own (bitwise: the operations are
    elementwise); and counted, the rules' clamps (w²: products) of the biases made once per set,
    not once per layer."""
    from relprop import composites
    from relprop.graph import canonize

    class BiasClamps(InsideCustomOps):
        """Clamps (and products) of 1-D tensors: the biases' (a weight's have more dimensions)."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def record(self, func, args, kwargs, out) -> None:
            derives = (torch.ops.aten.clamp, torch.ops.aten.mul)
            if func.overloadpacket in derives and args[0].dim() == 1:
                self.count += 1

    model = small_resnet(seed=4).to(dtype)
    x = seeded_normal((2, 3, 32, 32), seed=7).to(dtype)
    kwargs = {"low": -3.0, "high": 3.0} if composite == "EpsilonGammaBox" else {}

    def analyze() -> tuple[torch.Tensor, int]:
        if composite.startswith("lrp."):
            analyzer = relprop.create_analyzer(composite, model)
        else:
            make = getattr(composites, composite)
            analyzer = relprop.create_analyzer("lrp", model, composite=make(**kwargs))
        analyzer.analyze(x, neuron_selection=[1, 2])  # the trace
        counted = BiasClamps()
        with counted:
            relevance = analyzer.analyze(x, neuron_selection=[1, 2])
        return relevance, counted.count

    together, clamps_together = analyze()
    monkeypatch.setattr(canonize, "derive_biases_together", lambda whole, slices: None)
    apart, clamps_apart = analyze()
    assert torch.equal(together, apart)
    # small_resnet: 12 convolutions, each followed by a BatchNorm; the other 11 derive at least
    # one bias each apart, and at most two kinds (b⁺ and b⁻; b + γb⁺) for all of them together
    # (plus what the first layer's rule derives on mixed-sign input, where it does).
    assert clamps_apart >= 11, clamps_apart
    assert clamps_together <= clamps_apart - 9, (clamps_together, clamps_apart)


def test_a_bias_set_changed_in_place_is_derived_again():
    """The mark that sends a bias to its set holds while the set is unchanged: written in place,
    each bias is derived from its own values."""
    whole = torch.tensor([1.0, -2.0, 3.0, -4.0])
    first, second = whole.split([1, 3])
    _layer_rules.derive_biases_together(whole, [first, second])
    torch.testing.assert_close(_layer_rules._positive(second), torch.tensor([0.0, 3.0, 0.0]))
    whole.mul_(-1)
    torch.testing.assert_close(_layer_rules._positive(second), torch.tensor([2.0, 0.0, 4.0]))
    torch.testing.assert_close(
        _layer_rules._gamma_shifted_bias(first, 0.5, up=False), torch.tensor([-1.5])
    )
