"""Pictures of a model: the sprite and decomposition grids, and labelled figures of them.

The grid functions return image tensors (the data); the figure functions draw them with
matplotlib, a label on every row and column, and :func:`save_figure` writes a figure as PNG.
Figures are ``matplotlib.figure.Figure`` objects, made without pyplot (no global state, no
display needed).

Shapes: K0 learned sprites, L layers, N images of H×W, h×w sprite canvas.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from dti_sprites.io import atomic_write

__all__ = [
    "EMPTY_COLOR",
    "PALETTE",
    "SPRITE_ROWS",
    "add_timeline",
    "background_figure",
    "colorize",
    "decomposition_figure",
    "decomposition_grid",
    "decomposition_rows",
    "grid_figure",
    "save_figure",
    "sprite_color",
    "sprite_figure",
    "sprite_grid",
    "to_uint8_hwc",
    "usage_figure",
]

# Distinct colours for label maps: index 0 (background) is black.
PALETTE = (
    torch.tensor(
        [
            [0, 0, 0],
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 212],
            [0, 128, 128],
            [220, 190, 255],
            [170, 110, 40],
            [255, 250, 200],
            [128, 0, 0],
            [170, 255, 195],
            [128, 128, 0],
            [255, 215, 180],
            [0, 0, 128],
            [128, 128, 128],
        ],
        dtype=torch.float32,
    )
    / 255
)
EMPTY_COLOR = (160, 160, 160)  # the empty sprite's bar in usage charts
SPRITE_ROWS = ("appearance", "mask", "appearance × mask")  # the rows of sprite_grid
DPI = 100  # figure pixels per inch: at zoom z, an image pixel is z × z figure pixels
FONT_SIZE = 7  # points, for every label


def colorize(labels: Tensor) -> Tensor:
    """Label map (B, H, W) → RGB (B, 3, H, W) with a fixed palette (0 = black)."""
    palette = PALETTE.to(labels.device)
    return palette[labels.long() % len(palette)].movedim(-1, 1)  # (B, 3, H, W)


def sprite_color(k: int) -> tuple[int, int, int]:
    """The semantic colour of sprite ``k`` (label k + 1) as 0–255 RGB."""
    r, g, b = (PALETTE[(k + 1) % len(PALETTE)] * 255).round().int().tolist()
    return r, g, b


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) uint8 numpy (what W&B, PIL and matplotlib take)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


# ------------------------------------------------------------------------------------ grids
def sprite_grid(model) -> Tensor:
    """Rows (:data:`SPRITE_ROWS`): appearance, mask, appearance × mask; one column per learned
    sprite, bordered in its semantic colour. (3, 3·(h+3)+1, K0·(w+3)+1) in [0, 1]."""
    with torch.no_grad():
        appearance, mask = model.sprites()
        k0 = model.sprites.n_sprites
        appearance, mask = appearance[:k0], mask[:k0].expand(-1, 3, -1, -1)
        tiles = torch.cat([appearance, mask, appearance * mask])  # (3·K0, 3, h, w)
        # Border in the semantic colour of sprite k (label k + 1).
        border = colorize(torch.arange(1, k0 + 1)).repeat(3, 1)[:, :, None, None]  # (3·K0, 3, 1, 1)
        tiles = torch.nn.functional.pad(tiles.cpu(), (1, 1, 1, 1))
        tiles[:, :, [0, -1], :] = border
        tiles[:, :, :, [0, -1]] = border
        return make_grid(tiles.float().cpu(), nrow=k0, padding=1, pad_value=1.0)


def decomposition_rows(n_layers: int) -> list[str]:
    """The row labels of :func:`decomposition_grid` for ``n_layers`` layers."""
    return [
        "input",
        "reconstruction",
        "semantic map",
        "instance map",
        *(f"layer {layer}" for layer in range(n_layers)),
    ]


def decomposition_grid(model, images: Tensor) -> Tensor:
    """One column per image; rows (:func:`decomposition_rows`): input, reconstruction, semantic
    map, instance map, then each layer (colour × alpha). images (N, 3, H, W) in [0, 1] →
    (3, (4+L)·(H+1)+1, N·(W+1)+1)."""
    with torch.no_grad():
        out = model(images)
        rows = [images, out.reconstruction, colorize(out.semantic()), colorize(out.instance())]
        rgb, alpha = out.layers[:, :, :3], out.layers[:, :, 3:]
        rows += list((rgb * alpha).unbind(1))  # L rows of (N, 3, H, W)
        tiles = torch.stack(rows).flatten(0, 1)  # (rows·N, 3, H, W)
        return make_grid(tiles.float().clamp(0, 1).cpu(), nrow=len(images), padding=1)


# ---------------------------------------------------------------------------------- figures
def grid_figure(
    grid: Tensor,
    rows: Sequence[str],
    columns: Sequence[str],
    xlabel: str | None = None,
    zoom: int = 1,
    padding: int = 1,
) -> Figure:
    """A grid of tiles (``make_grid`` layout) with a label left of each row and above each column.

    Args:
        grid: (3, R·(h+padding)+padding, C·(w+padding)+padding) in [0, 1], R = len(rows) rows and
            C = len(columns) columns of h × w tiles.
        rows, columns: the labels.
        xlabel: a title for the column labels (e.g. ``"image"``).
        zoom: figure pixels per grid pixel, each way (nearest neighbour, at :data:`DPI`).
        padding: the grid's padding between tiles.
    """
    _, height, width = grid.shape
    pitch_y, pitch_x = (height - padding) // len(rows), (width - padding) // len(columns)
    if pitch_y * len(rows) + padding != height or pitch_x * len(columns) + padding != width:
        raise ValueError(f"a {height}×{width} grid is not {len(rows)} × {len(columns)} tiles")
    fig = Figure(figsize=(width * zoom / DPI, height * zoom / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(to_uint8_hwc(grid), interpolation="nearest")
    # Tile (r, c) spans pixels padding + r·pitch_y … (r + 1)·pitch_y - 1: label its centre.
    ax.set_yticks([(padding + pitch_y - 1) / 2 + r * pitch_y for r in range(len(rows))], rows)
    ax.set_xticks([(padding + pitch_x - 1) / 2 + c * pitch_x for c in range(len(columns))], columns)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=FONT_SIZE)
    if xlabel is not None:
        ax.xaxis.set_label_position("top")
        ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def sprite_figure(model, zoom: int = 1) -> Figure:
    """:func:`sprite_grid` labelled: rows :data:`SPRITE_ROWS`, columns the sprite index k
    (semantic label k + 1: the border colour is the sprite's colour in semantic maps)."""
    columns = [str(k) for k in range(model.sprites.n_sprites)]
    return grid_figure(sprite_grid(model), SPRITE_ROWS, columns, "sprite", zoom)


def add_timeline(fig: Figure, events: Sequence[tuple[int, str]], step: int) -> Figure:
    """Add a timeline of ``events`` below a figure of one picture (e.g. :func:`sprite_figure`):
    a row per kind of event (in order of first appearance), a tick at each event's step, the
    steps from 0 to ``step`` (or the last event). The picture keeps its size in pixels.

    Args:
        fig: a figure with a single axes, e.g. from :func:`grid_figure`.
        events: (step, kind) pairs.
        step: the current step (the right end of the axis).
    """
    kinds = list(dict.fromkeys(kind for _, kind in events))
    width, height = fig.get_size_inches()
    strip, gap = 0.25 + 0.16 * len(kinds), 0.45  # inches: the timeline, room for its labels
    total = height + gap + strip
    fig.set_size_inches(width, total)
    (picture,) = fig.axes
    picture.set_position((0, (gap + strip) / total, 1, height / total))
    ax = fig.add_axes((0, 0, 1, strip / total))
    for row, kind in enumerate(kinds):
        steps = [s for s, k in events if k == kind]
        color = PALETTE[(row + 1) % len(PALETTE)].tolist()
        ax.scatter(steps, [row] * len(steps), marker="|", s=60, linewidths=1.2, color=color)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(len(kinds) - 0.5, -0.5)  # the first kind on top
    end = max([step, *(s for s, _ in events)])
    ax.set_xlim(0, max(end, 1) * 1.02)
    ax.set_xlabel("step", fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE, length=2)
    ax.grid(axis="x", alpha=0.3)
    return fig


def background_figure(model, zoom: int = 1) -> Figure:
    """The learned backgrounds side by side, a column per background index."""
    with torch.no_grad():
        backgrounds = model.backgrounds().float().clamp(0, 1).cpu()  # (M, 3, H, W)
    grid = make_grid(backgrounds, nrow=len(backgrounds), padding=1)
    columns = [str(m) for m in range(len(backgrounds))]
    return grid_figure(grid, ["background"], columns, zoom=zoom)


def decomposition_figure(model, images: Tensor, zoom: int = 1) -> Figure:
    """:func:`decomposition_grid` labelled: rows :func:`decomposition_rows`, columns the
    position of each image in ``images`` (N, 3, H, W)."""
    grid = decomposition_grid(model, images)
    columns = [str(i) for i in range(len(images))]
    return grid_figure(grid, decomposition_rows(model.n_layers), columns, "image", zoom)


def usage_figure(counts: Tensor) -> Figure:
    """Sprite usage per layer: one bar chart per layer, the share of that layer's choices (%).

    counts (L, K0 + 1): choices per layer and sprite, the last column the empty sprite. A bar
    per sprite in its semantic colour, the last one (grey, ``empty``) the empty sprite.
    """
    n_layers, n_bars = counts.shape
    share = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)  # (L, K0 + 1)
    labels = [*(str(k) for k in range(n_bars - 1)), "empty"]
    colors = [np.array(sprite_color(k)) / 255 for k in range(n_bars - 1)]
    colors.append(np.array(EMPTY_COLOR) / 255)
    fig = Figure(figsize=(1.0 + 0.22 * n_bars, 0.4 + 1.3 * n_layers), dpi=DPI, layout="constrained")
    axes = fig.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    for layer, ax in enumerate(axes):
        ax.bar(
            range(n_bars),
            (100 * share[layer]).tolist(),
            color=colors,
            edgecolor="black",
            linewidth=0.3,
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of choices", fontsize=FONT_SIZE)
        ax.set_title(f"layer {layer}", fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE)
    axes[-1].set_xticks(range(n_bars), labels, rotation=90)
    axes[-1].set_xlabel("sprite", fontsize=FONT_SIZE)
    return fig


def sweep_figure(
    ks: Sequence[int],
    losses: Sequence[float],
    elbow_k: int | None,
    title: str = "final training loss against K",
) -> Figure:
    """The loss against K (a line through the points, sorted by K), with the elbow marked in
    red: a ring, a dashed vertical line and the label ``elbow K=…``. ks, losses (N,)."""
    order = np.argsort(np.asarray(ks))
    x = np.asarray(ks, dtype=np.float64)[order]
    y = np.asarray(losses, dtype=np.float64)[order]
    fig = Figure(figsize=(6, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(x, y, "o-", color="tab:blue", label="final loss")
    if elbow_k is not None and elbow_k in x:
        loss = y[int(np.flatnonzero(x == elbow_k)[0])]
        ax.axvline(elbow_k, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([elbow_k], [loss], "o", markersize=12, fillstyle="none", color="tab:red")
        label = f"elbow K={elbow_k}"
        ax.annotate(
            label, (elbow_k, loss), xytext=(8, 8), textcoords="offset points", color="tab:red"
        )
    ax.set(title=title, xlabel="K (sprites)", ylabel="final training loss")
    ax.set_xticks(x, [str(int(k)) for k in x])
    ax.grid(alpha=0.3)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> np.ndarray:
    """Write ``fig`` as a PNG (atomically, cropped to its content on white) and return the
    image written, (H, W, 3) uint8, e.g. to log the same picture to W&B."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.04, facecolor="white")
    with Image.open(buffer) as image:
        rgb = image.convert("RGB")
    with atomic_write(path) as tmp:
        rgb.save(tmp, format="PNG")
    return np.asarray(rgb)
