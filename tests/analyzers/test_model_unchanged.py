"""The user's model is exactly as it was after ``analyze`` — also when ``analyze`` raises.

Checked: every parameter and buffer bitwise (BatchNorm folding works on a copy; running statistics
are not updated), the same parameter objects, no ``.grad`` appearing, ``requires_grad`` flags,
train/eval mode of every module, no hooks left (module and global), no patched ``forward``, and the
input tensor itself untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tests.oracles.nets import randomize_batchnorm, seeded_normal
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

import relprop

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class Net(nn.Module):
    """Conv + BatchNorm + residual addition + dropout + dense, so folding, sums and train-mode
    layers are all exercised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(24, 4)
        randomize_batchnorm(self, seed=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)) + h)
        return self.fc(self.drop(torch.flatten(self.pool(h), 1)))


@dataclass
class Snapshot:
    tensors: dict[str, Tensor]
    parameter_ids: dict[str, int]
    requires_grad: dict[str, bool]
    grads: dict[str, Tensor | None]
    training: dict[str, bool]
    hooks: dict[str, dict[str, int]]
    global_hooks: dict[str, int]
    patched: dict[str, list[str]]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        tensors={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        parameter_ids={k: id(p) for k, p in model.named_parameters()},
        requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
        grads={
            k: None if p.grad is None else p.grad.detach().clone()
            for k, p in model.named_parameters()
        },
        training={k: m.training for k, m in model.named_modules()},
        hooks={
            k: {d: len(getattr(m, d, {})) for d in HOOK_DICTS} for k, m in model.named_modules()
        },
        global_hooks={d: len(getattr(torch_module, d, {})) for d in GLOBAL_HOOK_DICTS},
        # Instance attributes that shadow methods, e.g. a monkey-patched forward.
        patched={
            k: sorted(a for a in vars(m) if callable(vars(m)[a]) and hasattr(type(m), a))
            for k, m in model.named_modules()
        },
    )


def _bytes(t: Tensor) -> Tensor:
    """The raw bytes: bitwise equality, so -0.0 vs 0.0 or a changed NaN pattern would show."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(before: Snapshot, model: nn.Module) -> None:
    after = snapshot(model)
    assert after.tensors.keys() == before.tensors.keys()
    for key, value in before.tensors.items():
        now = after.tensors[key]
        assert now.dtype == value.dtype and now.shape == value.shape, key
        assert torch.equal(_bytes(now), _bytes(value)), key
    assert after.parameter_ids == before.parameter_ids
    assert after.requires_grad == before.requires_grad
    assert after.grads.keys() == before.grads.keys()
    for key, grad in before.grads.items():
        if grad is None:
            assert after.grads[key] is None, f"{key}.grad appeared"
        else:
            assert torch.equal(after.grads[key], grad), key
    assert after.training == before.training
    assert after.hooks == before.hooks
    assert after.global_hooks == before.global_hooks
    assert after.patched == before.patched


ANALYZERS = [
    ("lrp.epsilon", {}),
    ("lrp.epsilon_plus_flat", {}),
    ("lrp.epsilon_gamma_box", {"low": -3.0, "high": 3.0}),
    ("lrp.alpha_2_beta_1", {}),
    ("deep_taylor", {}),
    ("gradient", {}),
    ("input_t_gradient", {}),
    ("smoothgrad", {"augment_by_n": 3, "noise_scale": 0.1, "seed": 0}),
    ("integrated_gradients", {"steps": 4}),
    ("guided_backprop", {}),
    ("deconvnet", {}),
]


def _x() -> Tensor:
    return seeded_normal((2, 3, 6, 6), seed=41, dtype=torch.float32)


def _prepared(mode: str, frozen: bool) -> nn.Module:
    model = Net()
    model.train(mode == "train")
    if mode == "mixed":
        model.bn2.train()
        model.drop.train()
    if frozen:
        model.conv1.weight.requires_grad_(False)
        model.bn1.bias.requires_grad_(False)
    # A user hook and a stale gradient that must survive untouched.
    model.fc.register_forward_hook(lambda module, inputs, output: None)
    model.conv2.weight.grad = torch.full_like(model.conv2.weight, 0.5)
    return model


@pytest.mark.parametrize(("name", "kwargs"), ANALYZERS, ids=[a[0] for a in ANALYZERS])
@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_model_unchanged_after_analyze(name, kwargs, mode):
    model = _prepared(mode, frozen=mode == "train")
    x = _x()
    x_before = x.clone()
    before = snapshot(model)
    analyzer = relprop.create_analyzer(name, model, **kwargs)
    assert_unchanged(before, model)
    relevance = analyzer.analyze(x)
    assert relevance.shape == x.shape and relevance.dtype == x.dtype
    assert bool(torch.isfinite(relevance).all())
    assert_unchanged(before, model)
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    analyzer.analyze(x)
    assert_unchanged(before, model)


def test_train_mode_model_is_analyzed_in_eval_mode():
    """A model left in train mode is explained as the deterministic eval-mode function (running
    BatchNorm statistics, no dropout): the same relevance as for the eval-mode model."""
    x = _x()
    in_train = _prepared("train", frozen=False)
    in_eval = _prepared("eval", frozen=False)
    for name in ("lrp.epsilon", "gradient"):
        a = relprop.create_analyzer(name, in_train).analyze(x)
        b = relprop.create_analyzer(name, in_eval).analyze(x)
        assert torch.equal(a, b), name
    assert in_train.training and in_train.bn1.training


def test_input_requiring_grad_is_left_alone():
    model = _prepared("eval", frozen=False)
    x = _x().requires_grad_(True)
    for name in ("lrp.epsilon", "gradient", "smoothgrad"):
        relprop.create_analyzer(name, model).analyze(x)
        assert x.requires_grad and x.grad is None, name


def _raising_cases():
    nan = _x()
    nan[0, 0, 0, 0] = float("nan")
    return [
        ("nan_input", "max_activation", nan, None),
        ("index_out_of_range", "index", _x(), 99),
        ("wrong_length", "index", _x(), [0, 1, 2]),
        ("wrong_shape", "max_activation", seeded_normal((2, 4, 6, 6), 42, torch.float32), None),
    ]


@pytest.mark.parametrize(("name", "kwargs"), ANALYZERS, ids=[a[0] for a in ANALYZERS])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _raising_cases()])
def test_model_unchanged_when_analyze_raises(name, kwargs, mode, case):
    _, selection_mode, x, selection = _raising_cases()[case]
    model = _prepared(mode, frozen=True)
    before = snapshot(model)
    analyzer = relprop.create_analyzer(name, model, neuron_selection_mode=selection_mode, **kwargs)
    with pytest.raises(relprop.AnalyzerInputError):
        analyzer.analyze(x, neuron_selection=selection)
    assert_unchanged(before, model)
    # And the analyzer still works afterwards.
    good = relprop.create_analyzer(name, model, **kwargs).analyze(_x())
    assert bool(torch.isfinite(good).all())
    assert_unchanged(before, model)


class Sorter(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sort(x, dim=1).values


def test_model_unchanged_when_a_layer_is_unsupported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), Sorter(), nn.Linear(6, 3)).train()
    randomize_batchnorm(model, seed=1)
    before = snapshot(model)
    with pytest.raises(relprop.UnsupportedLayerError):
        relprop.create_analyzer("lrp.epsilon", model).analyze(
            seeded_normal((2, 5), 43, torch.float32)
        )
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    "setting, inside", [(None, True), ("1", True), ("0", False), ("off", False)]
)
def test_cudnn_determinism_is_switched_for_the_analysis_and_restored(monkeypatch, setting, inside):
    """Analyses on CUDA run with cuDNN's deterministic algorithms (bitwise-equal runs) unless
    RELPROP_DETERMINISTIC=0; either way the caller's flag is back afterwards."""
    from relprop.analyzers.base import deterministic_cudnn

    if setting is None:
        monkeypatch.delenv("RELPROP_DETERMINISTIC", raising=False)
    else:
        monkeypatch.setenv("RELPROP_DETERMINISTIC", setting)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    with deterministic_cudnn(active=True):
        assert torch.backends.cudnn.deterministic is inside
    assert torch.backends.cudnn.deterministic is False
    with deterministic_cudnn(active=False):  # CPU input: cuDNN is not involved
        assert torch.backends.cudnn.deterministic is False


def test_unknown_determinism_setting_is_refused(monkeypatch):
    from relprop.analyzers.base import deterministic_cudnn

    monkeypatch.setenv("RELPROP_DETERMINISTIC", "maybe")
    refused = pytest.raises(ValueError, match="RELPROP_DETERMINISTIC='maybe' is not a switch")
    with refused, deterministic_cudnn(active=True):
        pass


@pytest.mark.parametrize("name", ["input_t_gradient", "integrated_gradients", "lrp.epsilon"])
def test_relevance_of_an_input_requiring_grad_is_detached(name):
    model = _prepared("eval", frozen=False)
    x = _x().requires_grad_(True)
    relevance = relprop.create_analyzer(name, model).analyze(x * 1.0)
    assert not relevance.requires_grad and relevance.grad_fn is None
    relevance.numpy()
