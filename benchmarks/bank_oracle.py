"""Can a sprite bank's masks tell the shapes apart, whatever the network predicts? (no training)

    python benchmarks/bank_oracle.py --checkpoint RUN/seed0.ckpt --data FILE.h5 \
        [--first 20000] [--count 150] [--out FOLDER]
    python benchmarks/bank_oracle.py --ideal --data FILE.h5 …   # the generator's own shapes

For every visible object of records ``first .. first+count`` of a Multi-dSprites HDF5 file (its
``mask`` label map and per-entity ``shape``), every mask of the bank is drawn at every pose of a
grid around the object's centroid (``--turns`` rotations × ``--sizes`` canvas widths ×
``--shifts``² offsets, by default 36 × 12 widths of ratio 1.15 × a 5×5 grid of half pixels),
binarised at 0.5 and compared with the object's visible pixels in a 32-pixel window; pixels of
other objects are left out of the union (an occluder hides a shape, it does not contradict it).
Each sprite's score is its best IoU over the grid and the oracle's choice is the sprite with the
highest. It prints, for all objects and for the isolated ones (no other object in the window):

- the confusion of the true shape with the oracle's choice and its purity (the share of objects
  whose sprite's majority shape is theirs, as ``decomposition_probe.py`` computes it for the
  layers' own choices);
- the mean best IoU of each (shape, sprite) pair.

When the layers' purity (``decomposition_probe.py``) is far below this oracle's, the predicted
poses are what is missing; when the oracle is low too, the bank's masks are (``--ideal`` gives
the ceiling of the search itself: the generator's shapes in place of the bank).
With ``--out`` it writes ``objects.csv`` (one row per object) and ``summary.txt``.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from dti_sprites.datamodules.pipeline.synth import _sprite_inside

WINDOW = 32  # pixels around an object's centroid; a dSprites shape is at most 29 px across


def ideal_bank(sprite_size: int = 28) -> torch.Tensor:
    """The generator's square, ellipse and heart, upright, filling most of the canvas: (3, S, S)."""
    shapes = [
        _sprite_inside(shape, 2.0, 0.0, sprite_size / 2, sprite_size / 2, sprite_size)
        for shape in (1, 2, 3)
    ]
    return torch.from_numpy(np.stack(shapes).astype(np.float32))


def pose_thetas(
    turns: int,
    sizes: Sequence[float],
    shifts: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0),
    window: int = WINDOW,
) -> torch.Tensor:
    """Affine grids' matrices, window → sprite canvas (normalised coordinates): (T, 2, 3).

    Pose t = (turn, size, dy, dx), turn-major: the canvas drawn ``size`` pixels wide, turned by
    2π·turn/turns, its centre shifted by (dx, dy) ∈ shifts² pixels from the object's
    centroid, which :func:`object_windows` puts at pixel ``window // 2`` (to the nearest pixel),
    half a pixel right of and below the window's centre."""
    offsets = torch.tensor(shifts, dtype=torch.float32) + 0.5
    thetas = []
    for turn in range(turns):
        angle = 2 * math.pi * turn / turns
        rotation = torch.tensor(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        for size in sizes:
            linear = (window / size) * rotation
            for dy in offsets:
                for dx in offsets:
                    centre = torch.stack([dx, dy]) * (2 / window)  # normalised window coords
                    thetas.append(torch.cat([linear, (-linear @ centre)[:, None]], 1))
    return torch.stack(thetas)


def drawn_bank(masks: torch.Tensor, thetas: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Every mask (K, S, S) at every pose, binarised at 0.5: (K, T, window²) float 0/1."""
    k, t = masks.shape[0], thetas.shape[0]
    grid = F.affine_grid(thetas, [t, 1, window, window], align_corners=False)
    drawn = [
        F.grid_sample(m[None, None].expand(t, 1, -1, -1), grid, align_corners=False) > 0.5
        for m in masks
    ]  # K × (T, 1, W, W)
    return torch.stack(drawn).view(k, t, window * window).float()  # (K, T, W²)


def object_windows(
    label: np.ndarray, shape: np.ndarray, window: int = WINDOW, min_pixels: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each visible object's pixels and the other objects' pixels in a window centred (to the
    nearest pixel) on its centroid.

    Args:
        label: (N, H, W) label maps, 0 background, e the entity e.
        shape: (N, E) each entity's shape (0 for none).
    Returns:
        objects (M, window²) and others (M, window²) float 0/1, shapes (M,) int, isolated (M,)
        bool; objects with fewer than ``min_pixels`` visible pixels are left out.
    """
    half = window // 2
    padded = np.pad(label, ((0, 0), (half, half), (half, half)))  # (N, H + W, W + W)
    objects, others, shapes, isolated = [], [], [], []
    for n in range(label.shape[0]):
        for entity in np.unique(label[n]):
            if entity == 0 or shape[n, entity] < 1:
                continue
            ys, xs = np.nonzero(label[n] == entity)
            if len(ys) < min_pixels:
                continue
            y0, x0 = (
                round(float(ys.mean())),
                round(float(xs.mean())),
            )  # window rows y0-half .. +half
            crop = padded[n, y0 : y0 + window, x0 : x0 + window]  # (W, W)
            other = (crop != 0) & (crop != entity)
            objects.append((crop == entity).ravel())
            others.append(other.ravel())
            shapes.append(int(shape[n, entity]))
            isolated.append(not other.any())
    return (
        np.asarray(objects, np.float32),
        np.asarray(others, np.float32),
        np.asarray(shapes),
        np.asarray(isolated),
    )


def best_ious(bank: torch.Tensor, objects: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Each sprite's best IoU with each object over the poses: (M, K).

    bank (K, T, P), objects and others (M, P) 0/1; the other objects' pixels leave the union."""
    k, t, p = bank.shape
    flat = bank.reshape(k * t, p)  # (K·T, P)
    scores = []
    for obj, oth in zip(objects.split(64), others.split(64), strict=True):  # chunks of objects
        inter = obj @ flat.T  # (m, K·T)
        drawn_visible = (1 - oth) @ flat.T  # the drawn pixels where no other object is
        union = drawn_visible + obj.sum(1, keepdim=True) - inter
        iou = (inter / union.clamp(min=1)).view(-1, k, t)  # (m, K, T)
        scores.append(iou.amax(-1))
    return torch.cat(scores)  # (M, K)


def confusion(shapes: np.ndarray, choice: np.ndarray, k: int) -> np.ndarray:
    """(3, K): objects of each shape (1 square, 2 ellipse, 3 heart) by chosen sprite."""
    table = np.zeros((3, k), dtype=np.int64)
    np.add.at(table, (shapes - 1, choice), 1)
    return table


def purity(table: np.ndarray) -> float:
    """The share of objects whose sprite's majority shape is theirs."""
    return float(table.max(0).sum() / max(table.sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a Lightning or convergence.py checkpoint")
    source.add_argument("--ideal", action="store_true", help="the generator's three shapes")
    parser.add_argument("--data", type=Path, required=True, help="Multi-dSprites HDF5 file")
    parser.add_argument("--first", type=int, default=20000)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--turns", type=int, default=36)
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[10 * 1.15**i for i in range(12)],
        help="drawn canvas widths in pixels (default 10 … 47, ratio 1.15)",
    )
    parser.add_argument(
        "--shifts",
        type=float,
        nargs="+",
        default=[-1.0, -0.5, 0.0, 0.5, 1.0],
        help="the canvas centre's offsets from the centroid, pixels, in x and in y",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.ideal:
        masks = ideal_bank()
    else:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        masks = state["model.sprites.mask"][:, 0].clamp(0, 1)  # (K, S, S)
    with h5py.File(args.data, "r") as f:
        label = f["mask"][args.first : args.first + args.count]
        shape = f["shape"][args.first : args.first + args.count].astype(np.int64)
    objects, others, shapes, isolated = object_windows(label, shape)
    bank = drawn_bank(masks, pose_thetas(args.turns, args.sizes, args.shifts))
    scores = best_ious(bank, torch.from_numpy(objects), torch.from_numpy(others)).numpy()
    choice = scores.argmax(1)

    lines = [f"bank: {'ideal' if args.ideal else args.checkpoint}, objects: {len(shapes)}"]
    for name, keep in (("all", np.ones_like(isolated)), ("isolated", isolated)):
        table = confusion(shapes[keep], choice[keep], masks.shape[0])
        lines.append(f"{name} ({keep.sum()} objects): purity {purity(table):.3f}")
        lines.append("shape \\ sprite " + "".join(f"{k:>7}" for k in range(masks.shape[0])))
        for s, row in zip(("square", "ellipse", "heart"), table, strict=True):
            lines.append(f"{s:>14} " + "".join(f"{v:>7}" for v in row))
        lines.append("mean best IoU")
        for s, name_s in zip((1, 2, 3), ("square", "ellipse", "heart"), strict=True):
            mean = scores[keep & (shapes == s)].mean(0)
            lines.append(f"{name_s:>14} " + "".join(f"{v:>7.3f}" for v in mean))
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
        with (args.out / "objects.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["shape", "isolated", "choice"] + [f"iou{k}" for k in range(scores.shape[1])]
            )
            for row in zip(shapes, isolated.astype(int), choice, *scores.T.round(4), strict=True):
                writer.writerow(row)


if __name__ == "__main__":
    main()
