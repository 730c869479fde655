"""A ReLU fused into the step before it (graph/plan.py ``_fuse_relus``): the step keeps ``relu(z)``
in place of ``z``, which the relevance pass reads only where relevance arrives — where the two
are equal. Checked here: which steps take their ReLU, that a ResNet block's sum then holds no
tensor beside the block's output, and that a ReLU whose output reaches a rule that hands
relevance to zero activations stays a step of its own. That the relevance is unchanged is held by
the float64 comparisons with Zennit on the same ResNet (test_zennit.py) and by the emulated CUDA
analyses (test_cuda_emulation.py, where the convolutions' bias goes with the ReLU too).
"""

from __future__ import annotations

import torch
from tests.oracles import nets

import relprop
from relprop.graph import layers as L


def _forward(analyzer, x):
    """The analysis' plan and what each step of its forward pass saved for the relevance pass."""
    program = analyzer._get_program()
    _, saved, _ = program._forward(x)
    return program.plan, saved


def test_a_residual_sum_takes_its_relu_and_holds_no_tensor_of_its_own():
    model = nets.small_resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    plan, saved = _forward(analyzer, x)
    sums = [s for s in plan.steps if isinstance(s.layer, L.NormLayer)]
    assert [s.kind for s in sums] == ["sum + relu"] * 4
    for step in sums:
        args, _, out = saved[step.name]
        assert (out >= 0).all() and (out == 0).any()
        # relu(a + b) itself, not a copy: the block's output, which the next block's
        # convolutions (or the average pool) read.
        (relu,) = [s for s in plan.steps if step.name in s.leaves]
        assert relu.kind == "relu (fused)"
        readers = [s for s in plan.steps if relu.name in s.leaves]
        assert readers
        for reader in readers:
            if isinstance(reader.layer, L.WeightLayer):
                assert saved[reader.name][0] is out
        # The residual branch's output is an operand, untouched by the ReLU after the sum.
        assert (args[0] < 0).any()
    # A ReLU after a convolution as before.
    assert sum(s.kind.endswith("batchnorm + relu") for s in plan.steps) == 5


def test_a_relu_whose_output_reaches_a_zero_insensitive_rule_stays_a_step():
    """The flat rule hands relevance to every input, zero or not: the sum's output must stay
    ``a + b`` there, so the ReLU before the first convolution of the next block is not fused."""
    model = nets.small_resnet()
    flat_next = relprop.composites.Composite(
        name_map={
            "layer2.0.conv1": relprop.rules.Flat(),
            "layer2.0.downsample.0": relprop.rules.Flat(),
        }
    )
    analyzer = relprop.create_analyzer("lrp", model, composite=flat_next)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    plan, saved = _forward(analyzer, x)
    sums = [s for s in plan.steps if isinstance(s.layer, L.NormLayer)]
    assert [s.kind for s in sums] == ["sum", "sum + relu", "sum + relu", "sum + relu"]
    _, _, first_out = saved[sums[0].name]
    assert (first_out < 0).any()  # a + b, not its ReLU
