"""Where a trained multi-object model goes wrong, object by object (no training).

    python benchmarks/decomposition_probe.py --checkpoint RUN/seed0.ckpt --data FILE.h5 \
        --first 20000 --count 500 [--batch-size 50] [--out FOLDER]

Decomposes records ``first .. first+count`` of a generated or converted HDF5 file (with its
``mask`` label map and the per-entity ``shape``, ``orientation`` and ``scale`` of
Multi-dSprites) and matches every visible ground-truth object to the layer that covers most of
its pixels in the instance map (docs/method.md §9). It prints:

- **objects**: the share of objects that are *found* (their layer's IoU with them ≥ 0.5),
  *merged* (their layer also covers ≥ 30 % of another object), *split* (a second layer covers
  ≥ 25 % of them) or *missed* (best IoU < 0.5);
- **shapes × sprites**: the confusion of each object's true shape with the sprite its layer
  chose (−1: empty), and the purity (share of objects whose sprite's majority shape is theirs);
- **rotation**: for each (sprite, shape) pair with enough objects, how well the layer's
  predicted rotation follows the object's orientation, up to the shape's symmetry (n = 4
  square, 2 ellipse, 1 heart) and a constant offset: the mean resultant length of
  n·(predicted − true) (or of n·(predicted + true), whichever sign is larger); 1 means the
  rotation is learned, about 1/sqrt(count) means it is unrelated;
- **scale**: the Pearson correlation of the layer's predicted scale with the object's;
- **placement**: the median distance (pixels) from an object's centroid to the centre of the
  sprite its covering layer draws, and to the nearest layer's; the *layer reach*, a layer's
  drawn centre's standard deviation over the images (objects spread over the whole image: a
  layer that stays within a few pixels of one spot covers a region, not an object);
- the harness's ARI-FG, mIoU and mACC of the same images.

``--orientations N`` decomposes with every sprite tried at N orientations (docs/method.md §11)
whatever the model was trained with: if the scores jump, the sprites are right and the predicted
rotations are what is missing. ``--sizes S …`` does the same with candidate sizes (``--sizes``
alone: none). ``--placement R STEP`` draws every layer at the best offset of a (2R+1)² grid
STEP pixels apart around its predicted position: if the scores jump, placement is what is
missing. ``--pose-refinement STEPS`` refines every chosen layer's pose and colour by gradient
descent on the reconstruction (``--pose-refinement-lr``, ``--pose-refinement-rounds``,
``--order-search``, ``--residual-placement``: ``dti-sprites-decompose``'s options, each left
out keeping the checkpoint's own setting; DTISprites.set_pose_refinement). The
summary also gives the *size purity*: the purity of the sprites against the object's scale
tercile (0.5-1 in three bins) instead of its shape; when it is above the shape purity, a
layer's choice of sprite stands for the size of its object.

With ``--out`` it writes ``objects.csv`` (one row per object) and ``summary.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import h5py
import numpy as np
import torch
from bank_oracle import purity as table_purity
from score_checkpoint import RangeScores, decompose_range

from dti_sprites.allocator import keep_freed_memory
from dti_sprites.decompose import add_refinement_arguments, apply_refinement
from dti_sprites.model import DTISprites

SYMMETRY = {
    1: 4,
    2: 2,
    3: 1,
}  # dSprites shape -> rotational symmetry order (square, ellipse, heart)


def similarity_angle_scale(params: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (rad) and scale of each layer's selected sprite warp, (B, L) each.

    The sprite's similarity θ = [[1+a, −b], [b, 1+a]] times the layer's position scale 1 + eˢ
    (both map output to input coordinates, so a larger θ means a smaller drawn sprite)."""
    b, n_layers = params["layer/position"].shape[:2]
    angle = np.zeros((b, n_layers))
    scale = 1 + params["layer/position"][..., 0].exp().cpu().numpy()
    if "sprite/similarity" in params:
        a, bb = params["sprite/similarity"][..., 0], params["sprite/similarity"][..., 1]
        angle = torch.atan2(bb, 1 + a).cpu().numpy()
        scale = scale * torch.hypot(1 + a, bb).cpu().numpy()
    return angle, 1 / scale  # drawn size ∝ 1 / θ's scale


def drawn_centres(params: dict[str, torch.Tensor], size: int) -> np.ndarray:
    """Where each layer draws its sprite canvas's centre, in image pixels (x, y): (B, L, 2).

    The layer's position maps image to canvas coordinates (q = s·p + t), the sprite's
    similarity maps canvas to sprite coordinates (r = A·q + t'); the sprite's centre r = 0 is
    at q = −A⁻¹t', so at p = (q − t) / s."""
    pos = params["layer/position"].double().cpu().numpy()  # (B, L, 3)
    q = np.zeros((*pos.shape[:2], 2))
    if "sprite/similarity" in params:
        a, b, tx, ty = np.moveaxis(params["sprite/similarity"].double().cpu().numpy(), -1, 0)
        rows = np.stack([np.stack([1 + a, -b], -1), np.stack([b, 1 + a], -1)], -2)  # (B, L, 2, 2)
        q = -np.linalg.solve(rows, np.stack([tx, ty], -1)[..., None])[..., 0]
    p = (q - pos[..., 1:]) / (1 + np.exp(pos[..., :1]))  # normalised image coordinates
    return (p + 1) * size / 2 - 0.5  # pixel centres at 0 .. size − 1


def probe(
    model: DTISprites, path: Path, first: int, count: int, batch_size: int
) -> tuple[list[dict], dict[str, float]]:
    """Per-object rows, and the harness's scores (ARI-FG, mIoU, mACC) of the same images."""
    rows: list[dict] = []
    layer_centres: list[np.ndarray] = []
    scores = RangeScores(4, model.sprites.n_sprites + 1)  # background + 3 shapes
    with h5py.File(path, "r") as f:
        for start, stop, image, out in decompose_range(model, f, first, count, batch_size):
            scores.update(out, image, f, start, stop)
            instance = out.instance().numpy()  # (B, H, W), 0 = background, l + 1 = layer l
            choice = out.sprite_choice.numpy()  # (B, L)
            angle, scale = similarity_angle_scale(out.params)  # (B, L) each
            centres = drawn_centres(out.params, image.shape[-1])  # (B, L, 2)
            layer_centres.append(centres)
            mask = f["mask"][start:stop]  # (B, H, W), 0 = background, e = entity e
            shape, orient = f["shape"][start:stop], f["orientation"][start:stop]  # (B, E)
            true_scale = f["scale"][start:stop]
            n_layers = choice.shape[1]
            for i in range(stop - start):
                entities = [e for e in np.unique(mask[i]) if e > 0]
                # overlap[e, l]: pixels of object e labelled layer l (l = 0: background)
                overlap = np.array(
                    [
                        np.bincount(instance[i][mask[i] == e], minlength=n_layers + 1)
                        for e in entities
                    ]
                ).reshape(len(entities), n_layers + 1)
                layer_area = np.bincount(instance[i].ravel(), minlength=n_layers + 1)
                for j, e in enumerate(entities):
                    area = overlap[j].sum()
                    ys, xs = np.nonzero(mask[i] == e)
                    offsets = np.hypot(*(centres[i] - [xs.mean(), ys.mean()]).T)  # (L,)
                    layer = int(overlap[j, 1:].argmax()) + 1
                    inter = overlap[j, layer]
                    iou = inter / (area + layer_area[layer] - inter)
                    others = np.delete(overlap[:, layer], j)
                    other_areas = np.delete(overlap.sum(1), j)
                    merged = bool(np.any(others >= 0.3 * other_areas)) if len(others) else False
                    covered = np.sort(overlap[j, 1:])[::-1]
                    rows.append(
                        {
                            "record": start + i,
                            "entity": int(e),
                            "pixels": int(area),
                            "shape": int(shape[i, e]),
                            "orientation": float(orient[i, e]),
                            "scale": float(true_scale[i, e]),
                            "layer": layer - 1,
                            "sprite": int(choice[i, layer - 1]),
                            "iou": float(iou),
                            "merged": merged,
                            "split": bool(len(covered) > 1 and covered[1] >= 0.25 * area),
                            "pred_angle": float(angle[i, layer - 1]),
                            "pred_scale": float(scale[i, layer - 1]),
                            "centre_offset": float(offsets[layer - 1]),
                            "nearest_centre": float(offsets.min()),
                        }
                    )
    spread = np.concatenate(layer_centres).std(0)  # (L, 2): over images, per layer and axis
    return rows, {
        **scores.compute(),
        "layer reach (px, std of a layer's centre over images)": float(spread.mean()),
    }


def median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def purity(rows: list[dict], key: str, found_only: bool) -> float:
    """Share of non-empty objects whose sprite's majority ``key`` is theirs: ``shape``, or
    ``tercile`` of the scale range 0.5-1 (whether the choice stands for the object's size)."""
    kept = [r for r in rows if r["sprite"] >= 0 and not (found_only and r["iou"] < 0.5)]
    if not kept:
        return 0.0
    values = [
        r["shape"] if key == "shape" else min(max(int((r["scale"] - 0.5) / (0.5 / 3)), 0), 2)
        for r in kept
    ]
    sprites = [r["sprite"] for r in kept]
    table = np.zeros((max(values) + 1, max(sprites) + 1), dtype=np.int64)  # (value, sprite)
    np.add.at(table, (values, sprites), 1)
    return table_purity(table)


def summarise(rows: list[dict], n_sprites: int, min_pixels: int) -> list[tuple[str, float]]:
    rows = [r for r in rows if r["pixels"] >= min_pixels]
    iou = np.array([r["iou"] for r in rows])
    out = [
        ("objects", len(rows)),
        ("found (IoU >= 0.5)", float((iou >= 0.5).mean())),
        ("mean IoU", float(iou.mean())),
        ("merged", float(np.mean([r["merged"] for r in rows]))),
        ("split", float(np.mean([r["split"] for r in rows]))),
        ("centre offset of the covering layer (px, median)", median(rows, "centre_offset")),
        ("nearest layer centre (px, median)", median(rows, "nearest_centre")),
    ]
    sprites = list(range(-1, n_sprites))
    confusion = np.zeros((3, len(sprites)), dtype=int)  # shapes 1..3 × sprites −1..K0−1
    for r in rows:
        confusion[r["shape"] - 1, r["sprite"] + 1] += 1
    print("shape \\ sprite " + " ".join(f"{s:>6d}" for s in sprites))
    for s, name in enumerate(("square", "ellipse", "heart")):
        print(f"{name:>14s} " + " ".join(f"{c:>6d}" for c in confusion[s]))
    out.append(("sprite purity", purity(rows, "shape", False)))
    out.append(("sprite purity (found objects)", purity(rows, "shape", True)))
    out.append(("size purity (scale terciles)", purity(rows, "tercile", False)))
    for k in range(n_sprites):
        for s in (1, 2, 3):
            pair = [r for r in rows if r["sprite"] == k and r["shape"] == s and r["iou"] >= 0.5]
            if len(pair) < 20:
                continue
            n = SYMMETRY[s]
            pred = np.array([r["pred_angle"] for r in pair])
            true = np.array([r["orientation"] for r in pair])
            resultant = max(abs(np.exp(1j * n * (pred - sign * true)).mean()) for sign in (1, -1))
            out.append((f"rotation R, sprite {k} × shape {s} (n={len(pair)})", float(resultant)))
    found = [r for r in rows if r["iou"] >= 0.5]
    if len(found) > 2:
        r = np.corrcoef([x["pred_scale"] for x in found], [x["scale"] for x in found])[0, 1]
        out.append(("scale correlation (found objects)", float(r)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True, help="first record probed")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--min-pixels", type=int, default=20, help="ignore smaller visible objects")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--orientations",
        type=int,
        help="score with every sprite tried at this many orientations (the model's: default)",
    )
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="*",
        help="score with every sprite also tried at these sizes (the model's: default)",
    )
    parser.add_argument(
        "--placement",
        type=float,
        nargs=2,
        metavar=("RADIUS", "STEP"),
        help="draw every layer at the best offset of a (2R+1)² grid STEP pixels apart around "
        "its predicted position (DTISprites.set_placement_search)",
    )
    add_refinement_arguments(parser)
    parser.add_argument(
        "--frozen",
        action="store_true",
        help="decompose as in the frozen phase (no empty sprite): a checkpoint saved at the end "
        "of a run stopped before the seeding is unfrozen by SpriteFreeze.on_fit_end",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the step's large temporaries reused, not page-faulted again
    model = DTISprites.from_checkpoint(args.checkpoint).eval()
    if args.frozen:
        model.freeze_sprites(True)
    if args.orientations is not None or args.sizes is not None:  # an inference-time search
        orientations = model.orientations if args.orientations is None else args.orientations
        model.set_orientations(orientations, args.sizes)
    if args.placement is not None:
        model.set_placement_search(int(args.placement[0]), args.placement[1])
    apply_refinement(model, args)
    rows, scores = probe(model, args.data, args.first, args.count, args.batch_size)
    summary = [*scores.items(), *summarise(rows, model.sprites.n_sprites, args.min_pixels)]
    for name, value in summary:
        print(f"{name:>48s}: {value:.3f}" if isinstance(value, float) else f"{name:>48s}: {value}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "objects.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(args.out / "summary.csv", "w", newline="") as f:
            csv.writer(f).writerows([("measure", "value"), *summary])


if __name__ == "__main__":
    main()
