"""The pictures: grid contents, the labels of every row and column, the PNG written."""

import numpy as np
import pytest
import torch
from PIL import Image

from dti_sprites.model import DTISprites
from dti_sprites.viz import (
    DPI,
    EMPTY_COLOR,
    SPRITE_ROWS,
    colorize,
    decomposition_figure,
    decomposition_grid,
    grid_figure,
    save_figure,
    sprite_color,
    sprite_figure,
    sprite_grid,
    to_uint8_hwc,
    usage_figure,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DTISprites(
        image_size=12, n_sprites=3, n_layers=2, n_backgrounds=1, sprite_size=8, mask_std=2
    ).eval()


def tile(grid, row, column, height, width):
    """Tile (row, column) of a make_grid grid with padding 1: (3, height, width)."""
    top, left = 1 + row * (height + 1), 1 + column * (width + 1)
    return grid[:, top : top + height, left : left + width]


def labels(ticks):
    return [t.get_text() for t in ticks]


def test_decomposition_grid_rows_and_labelled_figure(model, tmp_path):
    images = torch.rand(2, 3, 12, 12)
    grid = decomposition_grid(model, images)
    assert grid.shape == (3, 6 * 13 + 1, 2 * 13 + 1)  # 4 + 2 layers rows, 2 image columns
    with torch.no_grad():
        out = model(images)
    layers = out.layers[:, :, :3] * out.layers[:, :, 3:]  # (N, L, 3, H, W)
    rows = [
        images,
        out.reconstruction,
        colorize(out.semantic()),
        colorize(out.instance()),
        layers[:, 0],
        layers[:, 1],
    ]
    for r, expected in enumerate(rows):
        for j in range(2):
            torch.testing.assert_close(tile(grid, r, j, 12, 12), expected[j].clamp(0, 1))

    figure = decomposition_figure(model, images, zoom=2)
    (ax,) = figure.axes
    assert labels(ax.get_yticklabels()) == [
        "input",
        "reconstruction",
        "semantic map",
        "instance map",
        "layer 0",
        "layer 1",
    ]
    assert labels(ax.get_xticklabels()) == ["0", "1"] and ax.get_xlabel() == "image"
    np.testing.assert_array_equal(ax.images[0].get_array(), to_uint8_hwc(grid))
    # Label r sits on the centre of row r: rows of 12 pixels every 13, after 1 of padding.
    assert ax.get_yticks().tolist() == [6.5 + 13 * r for r in range(6)]
    assert (figure.get_size_inches() * DPI).tolist() == [2 * 27, 2 * 79]  # zoom 2

    written = save_figure(figure, tmp_path / "images" / "decompositions.png")
    with Image.open(tmp_path / "images" / "decompositions.png") as png:
        assert png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), written)
    assert written.shape[0] >= 2 * 79 and written.shape[1] > 2 * 27  # the labels widen it
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["decompositions.png"]


def test_sprite_grid_tiles_and_labels(model):
    grid = sprite_grid(model)
    assert grid.shape == (3, 3 * 11 + 1, 3 * 11 + 1)  # 8-pixel sprites with a 1-pixel border
    with torch.no_grad():
        appearance, mask = model.sprites()
    for k in range(3):
        rows = [appearance[k], mask[k].expand(3, -1, -1), appearance[k] * mask[k]]
        for r, expected in enumerate(rows):
            bordered = tile(grid, r, k, 10, 10)
            torch.testing.assert_close(bordered[:, 1:-1, 1:-1], expected)
            border = torch.tensor(sprite_color(k)) / 255  # the sprite's semantic colour
            torch.testing.assert_close(bordered[:, 0, 0], border)
    (ax,) = sprite_figure(model).axes
    assert labels(ax.get_yticklabels()) == list(SPRITE_ROWS)
    assert labels(ax.get_xticklabels()) == ["0", "1", "2"] and ax.get_xlabel() == "sprite"


def test_grid_figure_rejects_labels_that_do_not_fit_the_grid():
    with pytest.raises(ValueError, match="not 2 × 3 tiles"):
        grid_figure(torch.zeros(3, 2 * 5 + 1, 2 * 5 + 1), ["a", "b"], ["x", "y", "z"])


def test_usage_figure_bars_are_the_shares_per_layer():
    counts = torch.tensor([[1, 0, 3, 0], [1, 1, 0, 2]])  # (L=2, K0+1=4), last column empty
    figure = usage_figure(counts)
    assert [ax.get_title() for ax in figure.axes] == ["layer 0", "layer 1"]
    heights = [[bar.get_height() for bar in ax.patches] for ax in figure.axes]
    assert heights == [[25.0, 0.0, 75.0, 0.0], [25.0, 25.0, 0.0, 50.0]]
    colors = [
        tuple(round(255 * c) for c in bar.get_facecolor()[:3]) for bar in figure.axes[0].patches
    ]
    assert colors == [sprite_color(0), sprite_color(1), sprite_color(2), EMPTY_COLOR]
    assert labels(figure.axes[1].get_xticklabels()) == ["0", "1", "2", "empty"]
    assert figure.axes[1].get_xlabel() == "sprite"
    assert figure.axes[0].get_ylabel() == "% of choices"
