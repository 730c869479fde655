"""relprop.visualize: colour maps centred on zero, hand-checked projections, montage geometry."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from relprop import visualize


def test_heatmap_maps_zero_to_centre_and_extremes_to_ends():
    relevance = torch.tensor([[[-2.0, 0.0], [1.0, 2.0]]])
    seismic = matplotlib.colormaps["seismic"]
    image = visualize.heatmap(relevance)
    assert image.shape == (2, 2, 3)
    np.testing.assert_allclose(image[0, 0], seismic(0.0)[:3])  # -max|R| → dark blue end
    np.testing.assert_allclose(image[0, 1], seismic(0.5)[:3])  # 0 → white centre
    np.testing.assert_allclose(image[1, 0], seismic(0.75)[:3])  # +max/2 → halfway to red
    np.testing.assert_allclose(image[1, 1], seismic(1.0)[:3])  # +max|R| → dark red end


def test_heatmap_is_symmetric_and_sums_channels_per_sample():
    rng = np.random.default_rng(0)
    relevance = rng.normal(size=(2, 3, 5, 7))
    relevance[1] *= 100.0  # each sample is normalised on its own
    image = visualize.heatmap(relevance)
    assert image.shape == (2, 5, 7, 3)
    summed = relevance.sum(1)
    for n in range(2):
        unit = (summed[n] / np.abs(summed[n]).max() + 1) / 2
        np.testing.assert_allclose(image[n], matplotlib.colormaps["seismic"](unit)[..., :3])
    # Negating the relevance mirrors the colormap: bwr is the mirror of itself around 0.5.
    np.testing.assert_allclose(
        visualize.heatmap(-relevance[0], cmap="bwr"),
        matplotlib.colormaps["bwr"](1 - (summed[0] / np.abs(summed[0]).max() + 1) / 2)[..., :3],
    )


def test_heatmap_of_zero_relevance_is_uniform_centre_colour():
    image = visualize.heatmap(np.zeros((4, 4)))
    np.testing.assert_allclose(
        image, np.broadcast_to(matplotlib.colormaps["seismic"](0.5)[:3], image.shape)
    )


def test_graymap_shows_amplitude_black_to_white():
    image = visualize.graymap(torch.tensor([[-4.0, 0.0, 2.0, 4.0]]))
    np.testing.assert_allclose(image[0, :, 0], [1.0, 0.0, 0.5, 1.0], atol=1 / 255)


def test_project_hand_values():
    x = np.array([[-3.0, 0.0, 1.5, 3.0]])
    np.testing.assert_allclose(visualize.project(x), [[0.0, 0.5, 0.75, 1.0]])
    np.testing.assert_allclose(visualize.project(x, output_range=(-1, 1)), [[-1.0, 0.0, 0.5, 1.0]])
    np.testing.assert_allclose(visualize.project(x, absmax=6.0), [[0.25, 0.5, 0.625, 0.75]])
    positive = np.array([[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(
        visualize.project(positive, input_is_positive_only=True), [[0.0, 0.5, 1.0]]
    )


def test_gamma_hand_values_keep_signs():
    x = np.array([-4.0, 1.0, 0.0, 4.0])
    np.testing.assert_allclose(visualize.gamma(x, exponent=0.5), [-4.0, 2.0, 0.0, 4.0])
    np.testing.assert_allclose(visualize.gamma(x, exponent=1.0), x)
    # minamp cuts small amplitudes and rescales the rest onto [0, maxamp].
    np.testing.assert_allclose(visualize.gamma(x, exponent=1.0, minamp=2.0), [-4.0, 0.0, 0.0, 4.0])


def test_clip_quantile_hand_threshold_and_per_sample_batches():
    x = np.arange(-100.0, 101.0).reshape(1, 1, 1, -1)  # |x| has 201 values, 0..100 twice
    clipped = visualize.clip_quantile(x, 0.9)
    threshold = np.quantile(np.abs(x), 0.9)
    assert clipped.max() == threshold and clipped.min() == -threshold
    batch = np.concatenate([x, 10 * x])
    thresholds = visualize.clip_quantile(batch, 0.9).max(axis=(1, 2, 3))
    np.testing.assert_allclose(thresholds, [threshold, 10 * threshold])
    np.testing.assert_array_equal(visualize.clip_quantile(x, 1.0), x)
    with pytest.raises(ValueError):
        visualize.clip_quantile(x, 0.0)


def test_image_shows_gray_and_rgb_inputs_in_range():
    gray = visualize.image(torch.tensor([[[0.0, 0.5, 1.0]]]), low=0.0, high=1.0)
    assert gray.shape == (1, 3, 3)
    np.testing.assert_allclose(gray[0, :, 0], [0.0, 0.5, 1.0])
    rgb = visualize.image(torch.arange(6.0).view(3, 1, 2))
    np.testing.assert_allclose(rgb[0, 1], [0.2, 0.6, 1.0])


def test_montage_without_labels_has_exact_geometry_and_tile_placement():
    red = np.zeros((3, 5, 3))
    red[..., 0] = 1.0
    gray = np.full((3, 5), 0.5)
    grid = visualize.montage([[red, gray], [gray, red]], scale=2, pad=1)
    assert grid.shape == (1 + 2 * (6 + 1), 1 + 2 * (10 + 1), 3)
    np.testing.assert_array_equal(grid[1:7, 1:11], np.broadcast_to([255, 0, 0], (6, 10, 3)))
    np.testing.assert_array_equal(grid[1:7, 12:22], np.full((6, 10, 3), 128))
    np.testing.assert_array_equal(grid[8:14, 12:22], np.broadcast_to([255, 0, 0], (6, 10, 3)))
    assert (grid[0] == 255).all() and (grid[:, 11] == 255).all()  # padding stays white


def test_montage_labels_add_margins_and_keep_tiles():
    tile = np.zeros((4, 4, 3))
    plain = visualize.montage([[tile, tile]], scale=8)
    labelled = visualize.montage(
        [[tile, tile]],
        row_labels=["label 3\npred 3"],
        col_labels=["input", "lrp.epsilon_gamma_box"],
        scale=8,
    )
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
    black = (labelled == 0).all(axis=-1)
    assert black.sum() >= 2 * 32 * 32  # both black tiles are intact (text adds a few dark pixels)
    with pytest.raises(ValueError, match="row labels"):
        visualize.montage([[tile]], row_labels=["a", "b"])
    with pytest.raises(ValueError, match="same height"):
        visualize.montage([[tile, np.zeros((5, 4, 3))]])


def test_save_png_round_trips_pixels_and_leaves_no_temporary(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.uniform(size=(6, 9, 3))
    path = visualize.save_png(rgb, tmp_path / "out.png", scale=3)
    with Image.open(path) as saved:
        assert saved.size == (27, 18) and saved.mode == "RGB"
        pixels = np.asarray(saved)
    np.testing.assert_array_equal(pixels[::3, ::3], np.round(rgb * 255).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_save_png_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "old.png").write_bytes(b"previous")

    def broken_save(self, fp, *args, **kwargs):
        fp = open(fp, "wb") if not hasattr(fp, "write") else fp  # noqa: SIM115
        fp.write(b"half a PNG")
        fp.close()
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        visualize.save_png(np.zeros((2, 2, 3)), tmp_path / "old.png")
    # The old file is untouched and no partial temporary file remains.
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"previous"
