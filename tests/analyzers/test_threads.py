"""Analyses from several threads: one model's analyses take turns, and give the numbers they
give one at a time.

An LRP analyzer keeps its pass's folded weights on its program and writes into them again on
the next pass; two threads sharing it mixed each other's folds (wrong relevance, or a fold found
empty), and two analyses switching a train-mode model to eval and back could leave it in eval
mode. The oracle is the same analyzer run sequentially.
"""

from __future__ import annotations

import gc
import sys
import threading

import pytest
import torch
from torch import nn

import relprop
from relprop.analyzers.base import deterministic_cudnn, model_lock
from relprop.errors import AnalyzerInputError


class _BatchNormNet(nn.Module):
    """Convolutions with BatchNorms to fold (the state a pass keeps) and non-trivial stats."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _BatchNormNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def switch_often():
    """Hand the GIL over every microsecond, so threads interleave inside a pass."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _run_threads(work, count: int) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as err:  # noqa: BLE001 - reported on the main thread
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    "method",
    ["lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1", "lrp.epsilon", "guided_backprop"],
)
def test_one_analyzer_shared_by_threads_gives_the_sequential_numbers(method, switch_often):
    analyzer = relprop.create_analyzer(method, _model())
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 12, 12) for _ in range(4)]
    expected = [analyzer.analyze(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(i: int) -> None:
        for round_ in range(4):
            results[i, round_] = analyzer.analyze(inputs[i])

    _run_threads(work, len(inputs))
    for (i, _), relevance in results.items():
        torch.testing.assert_close(relevance, expected[i], rtol=0, atol=0)


def test_train_mode_model_is_left_in_train_mode_by_overlapping_analyses(switch_often):
    model = _model().train()
    analyzers = [relprop.create_analyzer(m, model) for m in ("lrp.epsilon", "gradient")]
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.eval()
        expected = [a.analyze(x) for a in analyzers]
        model.train()

    def work(i: int) -> None:
        for _ in range(6):
            relevance = analyzers[i % 2].analyze(x)
            torch.testing.assert_close(relevance, expected[i % 2], rtol=0, atol=0)

    _run_threads(work, 4)
    assert all(module.training for module in model.modules())


def test_one_lock_per_model_shared_by_its_analyzers():
    model, other = _model(), _model()
    assert model_lock(model) is model_lock(model)
    assert model_lock(model) is not model_lock(other)
    lock = model_lock(model)
    first = relprop.create_analyzer("lrp.epsilon", model)
    second = relprop.create_analyzer("gradient", model)
    x = torch.randn(1, 3, 12, 12)
    seen = []

    class Spy(nn.Module):
        """Records, while the model runs, whether another thread could take the model's lock."""

        def forward(self, x):
            seen.append(_free_elsewhere(lock))
            return x

    model.features.insert(0, Spy())
    second.analyze(x)
    assert seen and not any(seen)  # held by the gradient analysis while it runs the model

    # The LRP analyzer runs its own steps, not Spy.forward; hold the lock elsewhere instead.
    holder_ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holder_ready.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holder_ready.wait(30)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (first.analyze(x), done.set()))
    waiter.start()
    assert not done.wait(0.5), "the analysis ran while another thread held the model's lock"
    release.set()
    waiter.join(60)
    holder.join(60)
    assert done.is_set()


def test_a_models_lock_goes_with_the_model():
    from relprop.analyzers import base

    model = _model()
    relprop.create_analyzer("lrp.epsilon", model).analyze(torch.randn(1, 3, 12, 12))
    gc.collect()
    count = len(base._model_locks)
    assert model in base._model_locks
    del model
    gc.collect()
    assert len(base._model_locks) == count - 1


def _free_elsewhere(lock) -> bool:
    """Whether a thread other than this one can take ``lock`` now."""
    result = []

    def probe() -> None:
        taken = lock.acquire(blocking=False)
        if taken:
            lock.release()
        result.append(taken)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(10)
    return result[0]


def test_lock_is_released_when_an_analysis_raises():
    model = _model()
    analyzer = relprop.create_analyzer("lrp.epsilon", model)
    with pytest.raises(AnalyzerInputError, match="out of range"):
        analyzer.analyze(torch.randn(1, 3, 12, 12), neuron_selection=99)
    assert _free_elsewhere(model_lock(model))


def test_cudnn_flag_is_restored_by_the_last_of_overlapping_analyses(monkeypatch):
    # The flag is global: two analyses (of two models, in two threads) may end in either order.
    # Entered and left out of order here, as two threads can.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    first, second = deterministic_cudnn(True), deterministic_cudnn(True)
    first.__enter__()
    assert torch.backends.cudnn.deterministic is True
    second.__enter__()
    first.__exit__(None, None, None)
    assert torch.backends.cudnn.deterministic is True, "restored while an analysis still runs"
    second.__exit__(None, None, None)
    assert torch.backends.cudnn.deterministic is False
    # A caller who had set it keeps it.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    with deterministic_cudnn(True):
        pass
    assert torch.backends.cudnn.deterministic is True
