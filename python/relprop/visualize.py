"""Turn relevance maps into images: heatmaps, graymaps, montages, PNG files.

Arrays come in channel-first, as PyTorch holds them: ``(H, W)``, ``(C, H, W)`` or a batch
``(N, C, H, W)``, as ``torch.Tensor`` or ``numpy.ndarray``. Images come out channel-last as float
numpy arrays in [0, 1] (``(H, W, 3)`` or ``(N, H, W, 3)``), ready for ``save_png`` or matplotlib.

The post-processing follows iNNvestigate's ``innvestigate.utils.visualizations`` (Alber et al.,
"iNNvestigate neural networks!", JMLR 2019): sum relevance over channels, then map it symmetrically
around zero so that white means "no relevance", red "for" and blue "against" the explained output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = [
    "clip_quantile",
    "gamma",
    "graymap",
    "heatmap",
    "image",
    "montage",
    "project",
    "save_png",
]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _reduce_channels(x: np.ndarray) -> np.ndarray:
    """Sum the channel axis away: (H, W) stays, (C, H, W) → (H, W), (N, C, H, W) → (N, H, W)."""
    if x.ndim == 2:
        return x
    if x.ndim in (3, 4):
        return x.sum(axis=-3)
    raise ValueError(f"expected (H, W), (C, H, W) or (N, C, H, W), got shape {x.shape}")


def _per_map_absmax(x: np.ndarray) -> np.ndarray:
    """Max |x| of each (H, W) map, shaped to broadcast against x (one map or a batch)."""
    absmax = np.abs(x).max(axis=(-2, -1), keepdims=True)
    # An all-zero map stays zero instead of dividing by zero.
    return np.where(absmax > 0, absmax, 1.0)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def project(
    x: ArrayLike,
    output_range: tuple[float, float] = (0.0, 1.0),
    absmax: float | None = None,
    input_is_positive_only: bool = False,
) -> np.ndarray:
    """Map ``x`` linearly into ``output_range``, symmetrically around zero.

    Each map (the last two axes) is divided by its own ``max |x|`` unless ``absmax`` is given, so
    ``-absmax`` lands on the low end, ``0`` in the middle and ``+absmax`` on the high end. With
    ``input_is_positive_only`` the range ``[0, absmax]`` fills the whole output range instead.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Any shape with at least two axes; the last two are a map's height and width.
    output_range : tuple of float
        ``(low, high)`` of the result.
    absmax : float, optional
        The value mapped to ``high``; default: each map's own maximum absolute value.
    input_is_positive_only : bool
        Whether ``x`` is known to be non-negative (e.g. an image or ``|R|``).

    Returns
    -------
    numpy.ndarray
        Float64 array shaped like ``x`` with values in ``output_range``.
    """
    values = _to_numpy(x)
    scale = _per_map_absmax(values) if absmax is None else max(float(absmax), 1e-12)
    unit = np.clip(values / scale, -1.0, 1.0)
    if not input_is_positive_only:
        unit = (unit + 1.0) / 2.0
    low, high = output_range
    return low + np.clip(unit, 0.0, 1.0) * (high - low)


def gamma(
    x: ArrayLike, exponent: float = 0.5, minamp: float = 0.0, maxamp: float | None = None
) -> np.ndarray:
    """Sign-preserving gamma correction: ``sign(x) · |x|^exponent`` on amplitudes above ``minamp``.

    An exponent below one lifts faint relevance so it becomes visible next to a few strong pixels
    (iNNvestigate's ``visualizations.gamma``).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Relevance of any shape.
    exponent : float
        The gamma; 1 leaves amplitudes unchanged.
    minamp : float
        Amplitudes at or below this become zero.
    maxamp : float, optional
        Amplitude mapped to itself; default: ``max |x|``. Larger amplitudes are clipped to it.

    Returns
    -------
    numpy.ndarray
        Float64 array shaped like ``x``, same signs, amplitudes in ``[0, maxamp]``.
    """
    values = _to_numpy(x)
    top = float(np.abs(values).max()) if maxamp is None else float(maxamp)
    if top <= minamp:
        return np.zeros_like(values)
    amplitude = np.clip((np.abs(values) - minamp) / (top - minamp), 0.0, 1.0)
    return np.sign(values) * amplitude**exponent * top


def clip_quantile(x: ArrayLike, quantile: float = 0.995) -> np.ndarray:
    """Clip ``|x|`` at its ``quantile`` so a handful of extreme pixels do not wash out the rest.

    The threshold is taken per map (over the last two axes and any channel axis of a batch entry).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        Relevance: (H, W), (C, H, W) or (N, C, H, W).
    quantile : float
        In (0, 1]; 1 leaves ``x`` unchanged.

    Returns
    -------
    numpy.ndarray
        Float64 array shaped like ``x`` with values in ``[-t, t]``, ``t`` the quantile of ``|x|``.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    values = _to_numpy(x)
    axes = tuple(range(1, values.ndim)) if values.ndim == 4 else None
    threshold = np.quantile(np.abs(values), quantile, axis=axes, keepdims=axes is not None)
    return np.clip(values, -threshold, threshold)


def heatmap(relevance: ArrayLike, cmap: str = "seismic", clip: float | None = None) -> np.ndarray:
    """Colour relevance with a diverging colormap centred on zero.

    Channels are summed, each map is divided by its own ``max |R|`` (after optional quantile
    clipping), so zero is always the colormap's centre (white for ``seismic``), positive relevance
    red and negative relevance blue.

    Parameters
    ----------
    relevance : torch.Tensor or numpy.ndarray
        (H, W), (C, H, W) or (N, C, H, W).
    cmap : str
        A matplotlib colormap name; diverging ones ("seismic", "bwr", "coolwarm") suit signed maps.
    clip : float, optional
        Quantile of ``|R|`` at which to clip before colouring (e.g. 0.995), see ``clip_quantile``.

    Returns
    -------
    numpy.ndarray
        Float64 RGB image (H, W, 3) or batch (N, H, W, 3) with values in [0, 1].
    """
    values = _to_numpy(relevance)
    if clip is not None:
        values = clip_quantile(values, clip)
    unit = project(_reduce_channels(values))
    return _colormap(cmap)(unit)[..., :3]


def graymap(relevance: ArrayLike, cmap: str = "gray") -> np.ndarray:
    """Show the amplitude ``|R|`` (channels summed first) from black (none) to white (the maximum).

    Parameters
    ----------
    relevance : torch.Tensor or numpy.ndarray
        (H, W), (C, H, W) or (N, C, H, W).
    cmap : str
        A matplotlib colormap name for the amplitude.

    Returns
    -------
    numpy.ndarray
        Float64 RGB image (H, W, 3) or batch (N, H, W, 3) with values in [0, 1].
    """
    amplitude = np.abs(_reduce_channels(_to_numpy(relevance)))
    unit = project(amplitude, input_is_positive_only=True)
    return _colormap(cmap)(unit)[..., :3]


def image(x: ArrayLike, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Show an input as an RGB image: ``(x - low) / (high - low)``, gray for one channel.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        (H, W), (C, H, W) with C of 1 or 3, or a batch (N, C, H, W).
    low, high : float, optional
        The value range of valid inputs; default: the min and max of ``x``.

    Returns
    -------
    numpy.ndarray
        Float64 RGB image (H, W, 3) or batch (N, H, W, 3) with values in [0, 1].
    """
    values = _to_numpy(x)
    if values.ndim == 2:
        values = values[None]
    if values.ndim not in (3, 4) or values.shape[-3] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels first, got shape {values.shape}")
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    unit = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    unit = np.moveaxis(unit, -3, -1)
    return np.repeat(unit, 3, axis=-1) if unit.shape[-1] == 1 else unit


def _as_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {rgb.shape}")
    if rgb.dtype == np.uint8:
        return rgb[..., :3]
    return np.round(np.clip(rgb[..., :3], 0.0, 1.0) * 255.0).astype(np.uint8)


def _upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    # Nearest neighbour: one input pixel becomes a scale × scale block, nothing is smoothed away.
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def _wrap(text: str, font, width: int, draw) -> list[str]:
    """Break ``text`` into lines no wider than ``width``, after '.', '_', '-' or spaces."""
    if "\n" in text:
        return [line for part in text.split("\n") for line in _wrap(part, font, width, draw)]
    pieces, piece = [], ""
    for char in text:
        piece += char
        if char in "._- ":
            pieces.append(piece)
            piece = ""
    if piece:
        pieces.append(piece)
    lines, line = [], ""
    for piece in pieces:
        if line and draw.textlength(line + piece, font=font) > width:
            lines.append(line)
            line = piece
        else:
            line += piece
    lines.append(line)
    return lines


def montage(
    tiles: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 4,
    font_size: int = 14,
) -> np.ndarray:
    """Arrange images in a labelled grid, e.g. inputs (rows) × methods (columns).

    Parameters
    ----------
    tiles : sequence of sequences of numpy.ndarray
        ``tiles[row][col]``: (H, W) gray or (H, W, 3) RGB, floats in [0, 1] or uint8; all tiles of
        the grid must share one height and width.
    row_labels : sequence of str, optional
        One label per row, written left of it; "\\n" starts a new line.
    col_labels : sequence of str, optional
        One label per column, written above it (wrapped after '.', '_' if too long).
    scale : int
        Integer nearest-neighbour upscaling of every tile (small inputs such as 28×28 digits).
    pad : int
        White pixels between tiles and around the grid.
    font_size : int
        Label size in pixels.

    Returns
    -------
    numpy.ndarray
        uint8 RGB image (height, width, 3). Tiles are ``H·scale × W·scale`` pixels; the label
        margins depend on the text.
    """
    from PIL import Image, ImageDraw, ImageFont

    grid = [[_upscale(_as_uint8(np.asarray(tile)), scale) for tile in row] for row in tiles]
    if not grid or not grid[0]:
        raise ValueError("montage needs at least one tile")
    n_cols = len(grid[0])
    if any(len(row) != n_cols for row in grid):
        raise ValueError("every row of a montage must have the same number of tiles")
    tile_h, tile_w = grid[0][0].shape[:2]
    if any(tile.shape[:2] != (tile_h, tile_w) for row in grid for tile in row):
        raise ValueError("every tile of a montage must have the same height and width")
    if row_labels is not None and len(row_labels) != len(grid):
        raise ValueError(f"{len(grid)} rows but {len(row_labels)} row labels")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{n_cols} columns but {len(col_labels)} column labels")

    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has only its fixed-size bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 2
    col_lines = [_wrap(label, font, tile_w, measure) for label in col_labels or []]
    top = (max(map(len, col_lines)) * line_h + pad) if col_lines else 0
    row_lines = [_wrap(label, font, 10 * font_size, measure) for label in row_labels or []]
    widest = max(
        (measure.textlength(line, font=font) for lines in row_lines for line in lines), default=0
    )
    left = int(np.ceil(widest)) + pad if row_lines else 0

    width = left + pad + n_cols * (tile_w + pad)
    height = top + pad + len(grid) * (tile_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(col_lines):
        x0 = left + pad + c * (tile_w + pad)
        for k, line in enumerate(lines):
            offset = (tile_w - measure.textlength(line, font=font)) / 2
            draw.text((x0 + max(offset, 0), k * line_h + pad // 2), line, fill="black", font=font)
    for r, row in enumerate(grid):
        y0 = top + pad + r * (tile_h + pad)
        if row_lines:
            block = len(row_lines[r]) * line_h
            for k, line in enumerate(row_lines[r]):
                y = y0 + (tile_h - block) / 2 + k * line_h
                draw.text((pad // 2, y), line, fill="black", font=font)
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (left + pad + c * (tile_w + pad), y0))
    return np.asarray(canvas)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic: readers
    see the old file or the complete new one, never a half-written one.
    """
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    # mkstemp creates files readable by the owner only; give the result the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_png(rgb: np.ndarray, path: str | os.PathLike[str], scale: int = 1) -> Path:
    """Write an image to ``path`` as PNG, atomically: the file appears complete or not at all.

    Parameters
    ----------
    rgb : numpy.ndarray
        (H, W) gray or (H, W, 3) RGB, floats in [0, 1] or uint8.
    path : str or os.PathLike
        Target file; its directory must exist.
    scale : int
        Integer nearest-neighbour upscaling before saving.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    from PIL import Image

    pixels = _upscale(_as_uint8(np.asarray(rgb)), scale)
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
    return Path(path)
