"""benchmarks/bank_oracle.py: each bank mask's best IoU with an object over a grid of poses."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from dti_sprites.datamodules.pipeline.synth import _sprite_inside, synthesize

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bank_oracle.py"
spec = importlib.util.spec_from_file_location("bank_oracle", SCRIPT)
oracle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oracle)

COARSE = dict(turns=12, sizes=[20 * 1.15**i for i in range(-3, 4)], shifts=(-0.5, 0.0, 0.5))


def test_windows_centre_each_object_and_keep_its_occluders_apart():
    label = np.zeros((1, 64, 64), dtype=np.uint8)
    label[0, 10:21, 30:41] = 1  # an 11×11 square, centroid (15, 35)
    label[0, 21:24, 36:44] = 2  # another object just below it
    label[0, 50:60, 0:3] = 3  # too small (30 px) with min_pixels 40
    shape = np.array([[0, 1, 2, 3]])
    objects, others, shapes, isolated = oracle.object_windows(label, shape, min_pixels=40)
    assert shapes.tolist() == [1] and isolated.tolist() == [False]
    first = objects[0].reshape(32, 32)  # the centroid at pixel (16, 16): rows r + 1, cols c - 19
    rows, cols = np.nonzero(first)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (11, 21, 11, 21)
    assert others[0].reshape(32, 32)[22, 17] == 1 and first[22, 17] == 0  # label 2 at (21, 36)
    assert objects[0].sum() == (label == 1).sum() and others[0].sum() == (label == 2).sum()


def test_a_drawn_mask_at_the_objects_pose_scores_near_one():
    """A square of side 14 turned by 30°: the ideal square at that turn and size is in the grid."""
    label = _sprite_inside(1, 14 / (2 * 0.16 * 64), math.radians(30), 32.0, 32.0, 64)
    objects, others, *_ = oracle.object_windows(label[None].astype(np.uint8), np.array([[0, 1]]))
    size = 28 * 14 / (2 * 0.32 * 28)  # the ideal square's side is 0.64 of its canvas width
    thetas = oracle.pose_thetas(12, [size], shifts=(-0.5, 0.0, 0.5))
    bank = oracle.drawn_bank(oracle.ideal_bank(), thetas)
    scores = oracle.best_ious(bank, torch.from_numpy(objects), torch.from_numpy(others))[0]
    assert scores[0] > 0.95  # the square, at 30° (and 120°, …): all but a few edge pixels
    assert scores[0] - max(scores[1], scores[2]) > 0.05  # the ellipse and heart fit worse
    upright = oracle.drawn_bank(oracle.ideal_bank(), oracle.pose_thetas(1, [size], (0.0,)))
    tilted = oracle.best_ious(upright, torch.from_numpy(objects), torch.from_numpy(others))[0]
    assert tilted[0] < scores[0] - 0.1  # 30° off: the turn is what the grid found


def test_the_generators_shapes_are_told_apart_and_identical_masks_are_not():
    records = list(synthesize("multi_dsprites", 12, seed=3))
    label = np.stack([r["mask"][..., 0].argmax(-1) for r in records])  # (N, 64, 64)
    shape = np.stack([r["shape"] for r in records]).astype(np.int64)
    objects, others, shapes, isolated = oracle.object_windows(label, shape)
    objects, others = torch.from_numpy(objects), torch.from_numpy(others)
    thetas = oracle.pose_thetas(**COARSE)

    scores = oracle.best_ious(oracle.drawn_bank(oracle.ideal_bank(), thetas), objects, others)
    table = oracle.confusion(shapes[isolated], scores.argmax(1).numpy()[isolated], 3)
    assert isolated.sum() >= 5 and oracle.purity(table) == 1.0
    assert (np.diag(table) == table.sum(1)).all()  # each shape's own mask, not a permutation

    disc = torch.from_numpy(_sprite_inside(2, 2.0, 0.0, 14, 14, 28).astype(np.float32))
    same = oracle.best_ious(oracle.drawn_bank(disc.expand(3, -1, -1), thetas), objects, others)
    torch.testing.assert_close(same[:, 1:], same[:, :1].expand(-1, 2))  # no sprite is preferred
    table = oracle.confusion(shapes, same.argmax(1).numpy(), 3)
    assert oracle.purity(table) == np.bincount(shapes).max() / len(shapes)  # the majority shape
