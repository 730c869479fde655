"""Faithfulness of attributions by region perturbation (pixel flipping), AOPC and ABPC.

An attribution is faithful when destroying the regions it marks as most relevant destroys the
model's evidence fastest. Region perturbation (Samek et al., "Evaluating the visualization of what a
deep neural network has learned", IEEE TNNLS 28(11), 2017) measures that: split the input into
patches, rank them by summed relevance, replace them one after another, and record the model's
output for the explained class after each step.

- MoRF (most relevant first) should make the score drop fast: a large AOPC.
- LeRF (least relevant first) should keep the score up: a small AOPC.
- ABPC (area between the LeRF and MoRF curves; Schulz et al., "Restricting the flow: information
  bottlenecks for attribution", ICLR 2020) combines both and is hard to game by a method that only
  finds, say, the background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from relprop.analyzers.base import preserved_state

__all__ = [
    "FILLS",
    "ORDERS",
    "abpc",
    "aopc",
    "fill_values",
    "perturbation_order",
    "quantus_explain_func",
    "region_perturbation",
]

FILLS = ("zeros", "mean", "uniform", "blur")
ORDERS = ("morf", "lerf")

TargetLike = Union[int, Sequence[int], torch.Tensor]


def _pair(patch: int | tuple[int, int]) -> tuple[int, int]:
    size = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"patch must be a positive int or a pair of them, got {patch!r}")
    return size


def _patch_ids(height: int, width: int, patch: tuple[int, int], device) -> torch.Tensor:
    """(H, W) map of patch numbers on a grid of ``patch`` tiles, row-major; edge tiles may be smaller."""
    rows = torch.arange(height, device=device) // patch[0]
    cols = torch.arange(width, device=device) // patch[1]
    return rows[:, None] * math.ceil(width / patch[1]) + cols[None, :]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflected borders (radius 3σ)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    # Reflection needs the padding to be smaller than the image side.
    mode_h = "reflect" if radius < x.shape[-2] else "replicate"
    mode_w = "reflect" if radius < x.shape[-1] else "replicate"
    out = nn.functional.pad(x, (0, 0, radius, radius), mode=mode_h)
    out = nn.functional.conv2d(
        out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels
    )
    out = nn.functional.pad(out, (radius, radius, 0, 0), mode=mode_w)
    return nn.functional.conv2d(
        out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels
    )


def fill_values(
    x: torch.Tensor,
    fill: str = "zeros",
    generator: torch.Generator | None = None,
    low: float | None = None,
    high: float | None = None,
    blur_sigma: float = 2.0,
) -> torch.Tensor:
    """Return the image whose pixels replace perturbed ones, shaped like ``x``.

    Parameters
    ----------
    x : torch.Tensor
        Inputs (N, C, H, W).
    fill : {"zeros", "mean", "uniform", "blur"}
        ``zeros``: the value 0. ``mean``: each sample's per-channel mean. ``uniform``: noise drawn
        uniformly from ``[low, high]`` (Samek et al. 2017). ``blur``: a Gaussian blur of the
        sample (removes detail, keeps the colour distribution).
    generator : torch.Generator, optional
        Source of the ``uniform`` noise; pass a seeded one for reproducible curves.
    low, high : float, optional
        Range of the ``uniform`` noise; default: each sample's own min and max.
    blur_sigma : float
        Standard deviation of the ``blur`` kernel in pixels.

    Returns
    -------
    torch.Tensor
        Fill image, same shape, dtype and device as ``x``.
    """
    if fill == "zeros":
        return torch.zeros_like(x)
    if fill == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
    if fill == "uniform":
        flat = x.flatten(1)
        lows = flat.min(1).values if low is None else torch.full_like(flat[:, 0], low)
        highs = flat.max(1).values if high is None else torch.full_like(flat[:, 0], high)
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return lows.view(shape) + noise * (highs - lows).view(shape)
    if fill == "blur":
        return _gaussian_blur(x, blur_sigma)
    raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


def perturbation_order(
    relevance: torch.Tensor, patch: int | tuple[int, int] = 4, order: str = "morf"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the patches of each sample by their summed relevance.

    Parameters
    ----------
    relevance : torch.Tensor
        (N, C, H, W) relevance; channels are summed.
    patch : int or tuple of int
        Patch height and width; the grid starts at the top-left corner.
    order : {"morf", "lerf"}
        ``morf``: most relevant first (descending), ``lerf``: least relevant first (ascending).

    Returns
    -------
    rank : torch.Tensor
        (N, P) int64: ``rank[n, p]`` is the step (0-based) at which patch ``p`` of sample ``n`` is
        perturbed. Ties keep the patches' row-major order.
    patch_ids : torch.Tensor
        (H, W) int64 patch number of every pixel.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    size = _pair(patch)
    n, _, height, width = relevance.shape
    ids = _patch_ids(height, width, size, relevance.device)
    n_patches = int(ids.max()) + 1
    per_pixel = relevance.detach().to(torch.float64).sum(1).flatten(1)
    scores = torch.zeros(n, n_patches, dtype=torch.float64, device=relevance.device)
    scores.index_add_(1, ids.flatten(), per_pixel)
    ranking = torch.sort(scores, dim=1, descending=order == "morf", stable=True).indices
    rank = torch.empty_like(ranking)
    steps = torch.arange(n_patches, device=relevance.device).expand(n, -1)
    rank.scatter_(1, ranking, steps)
    return rank, ids


def _targets(target: TargetLike, n: int, device) -> torch.Tensor:
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    index = torch.as_tensor(target, dtype=torch.long, device=device).flatten()
    if index.numel() != n:
        raise ValueError(f"{index.numel()} targets for {n} samples")
    return index


@torch.no_grad()
def region_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    relevance: torch.Tensor,
    target: TargetLike,
    patch: int | tuple[int, int] = 4,
    fill: str = "zeros",
    order: str = "morf",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    low: float | None = None,
    high: float | None = None,
) -> torch.Tensor:
    """Perturb the most (or least) relevant patches one by one and record the target's score.

    Samek et al. (2017), Algorithm "region perturbation": the input is split into non-overlapping
    ``patch`` tiles, ranked by summed relevance; at step ``k`` the first ``k`` tiles of the ranking
    are replaced by the ``fill`` image, and ``f_target(x^(k))``, the model's output for the explained
    class, is recorded. Replacing a tile is cumulative: ``x^(k)`` contains all earlier replacements.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; its output ``(N, classes)`` is read at ``target`` (logits, typically).
    x : torch.Tensor
        Inputs (N, C, H, W).
    relevance : torch.Tensor
        Attributions shaped like ``x``.
    target : int, sequence of int or torch.Tensor
        The explained class, one for all or one per sample.
    patch : int or tuple of int
        Tile height and width in pixels.
    fill : {"zeros", "mean", "uniform", "blur"}
        What replaces a tile, see ``fill_values``.
    order : {"morf", "lerf"}
        Most relevant first or least relevant first.
    steps : int, optional
        Number of tiles to perturb; default: all of them.
    seed : int
        Seed of the ``uniform`` fill, so a call is reproducible and MoRF and LeRF see the same noise.
    batch_size : int
        Perturbed inputs per forward pass.
    low, high : float, optional
        Range of the ``uniform`` fill (default: each sample's min and max).

    Returns
    -------
    torch.Tensor
        (N, steps + 1) float64 scores; column 0 is the unperturbed input.
    """
    if x.dim() != 4 or relevance.shape != x.shape:
        raise ValueError(
            f"x must be (N, C, H, W) and relevance shaped like it; got {tuple(x.shape)} and "
            f"{tuple(relevance.shape)}"
        )
    rank, ids = perturbation_order(relevance, patch, order)
    n_patches = rank.shape[1]
    steps = n_patches if steps is None else min(int(steps), n_patches)
    generator = torch.Generator().manual_seed(seed)
    filled = fill_values(x, fill, generator=generator, low=low, high=high)
    targets = _targets(target, len(x), x.device)
    # The step at which each pixel is replaced: rank of its patch, broadcast over channels.
    pixel_step = torch.gather(rank, 1, ids.flatten().expand(len(x), -1)).view(len(x), 1, *ids.shape)

    jobs = [(n, k) for n in range(len(x)) for k in range(steps + 1)]
    scores = torch.empty(len(x), steps + 1, dtype=torch.float64)
    # In eval mode, as the analyzers explain it: a model in train mode would otherwise update its
    # BatchNorm statistics with every perturbed batch and draw new dropout masks on each call.
    with preserved_state(model):
        for begin in range(0, len(jobs), batch_size):
            chunk = jobs[begin : begin + batch_size]
            samples = torch.tensor([n for n, _ in chunk], device=x.device)
            done = torch.tensor([k for _, k in chunk], device=x.device).view(-1, 1, 1, 1)
            perturbed = torch.where(pixel_step[samples] < done, filled[samples], x[samples])
            outputs = model(perturbed)
            picked = outputs.gather(1, targets[samples].view(-1, 1)).squeeze(1)
            scores[samples.cpu(), done.flatten().cpu()] = picked.to("cpu", torch.float64)
    return scores


def aopc(curves: torch.Tensor) -> torch.Tensor:
    """Area over the perturbation curve of each curve.

    ``AOPC = 1/(L+1) · Σ_{k=0}^{L} (f(x^(0)) − f(x^(k)))`` (Samek et al. 2017, eq. 12, before the
    average over the data set: take ``.mean()`` of the result for that).

    Parameters
    ----------
    curves : torch.Tensor
        (..., L + 1) scores from ``region_perturbation``; index 0 is the unperturbed input.

    Returns
    -------
    torch.Tensor
        (...) AOPC per curve.
    """
    return (curves[..., :1] - curves).mean(-1)


def abpc(morf: torch.Tensor, lerf: torch.Tensor) -> torch.Tensor:
    """Area between the LeRF and the MoRF perturbation curves of each sample.

    ``ABPC = 1/(L+1) · Σ_k (f(x_LeRF^(k)) − f(x_MoRF^(k)))`` = AOPC(MoRF) − AOPC(LeRF)
    (Schulz et al. 2020). Larger is better; a random ranking scores about zero.

    Parameters
    ----------
    morf, lerf : torch.Tensor
        (..., L + 1) curves of the same samples and target.

    Returns
    -------
    torch.Tensor
        (...) ABPC per sample.
    """
    if morf.shape != lerf.shape:
        raise ValueError(f"MoRF and LeRF curves differ in shape: {morf.shape} vs {lerf.shape}")
    return (lerf - morf).mean(-1)


def quantus_explain_func(method: str, **analyzer_kwargs: Any) -> Callable[..., np.ndarray]:
    """Wrap a relprop analyzer as a Quantus ``explain_func``.

    Quantus metrics call ``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)``
    with numpy batches and expect a numpy attribution back. Quantus itself is not needed here.

    Parameters
    ----------
    method : str
        Any name of ``relprop.analyzer_names()``.
    **analyzer_kwargs
        Passed to ``relprop.create_analyzer`` (e.g. ``epsilon=0.1``).

    Returns
    -------
    callable
        ``explain(model, inputs, targets, **kwargs) -> numpy.ndarray`` shaped like ``inputs``.
        Extra keyword arguments from Quantus are added to the analyzer's, except ``device``, which
        picks where the inputs go (default: the model's device). The analyzer is built once per
        model and argument set, then reused.
    """
    import relprop

    if method not in relprop.analyzer_names():
        raise relprop.UnknownAnalyzerError(
            f"unknown analyzer {method!r}; valid names: {', '.join(relprop.analyzer_names())}"
        )
    cache: dict[tuple[int, str], Any] = {}

    def explain(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
        device = kwargs.pop("device", None)
        if device is None:
            device = next(iter(model.parameters()), torch.empty(0)).device
        options = {**analyzer_kwargs, **kwargs}
        key = (id(model), repr(sorted(options.items())))
        if key not in cache:
            cache.clear()
            cache[key] = relprop.create_analyzer(
                method, model, neuron_selection_mode="index", **options
            )
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
        index = torch.as_tensor(np.asarray(targets), dtype=torch.long).flatten().tolist()
        relevance = cache[key].analyze(x, neuron_selection=index)
        return relevance.detach().cpu().numpy()

    return explain
