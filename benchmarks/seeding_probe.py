"""How well a seeding separates the shapes: cluster purity of the layer crops, no training.

    python benchmarks/seeding_probe.py --checkpoint RUN/seed0.ckpt --data FILE.h5
        [--batches 50] [--batch-size 32] [--tolerance T] [--out FOLDER] [--seed 0]

Loads a training checkpoint taken just before a seeding (e.g. ``convergence.py --steps 750
--checkpoint``), takes the layer crops of ``--batches`` random training batches as
``SpriteSeeding`` would (:func:`dti_sprites.seeding.layer_supports`, then the inverse warp), and
labels each crop with the ground-truth class that covers 80% of its support (0: none does). Then
it clusters the crops into K0 masks with each seeding variant, over all crops and over those of
isolated, whole objects (``SpriteSeeding(isolated_only)``), and prints the purity (the share of
labelled crops whose cluster's majority class is their own) and the confusion (clusters ×
classes, column 0 the unlabelled crops).
With ``--out`` it writes ``<out>/purity.csv`` and ``<out>/centres.png`` (a row of masks per
variant). Purity 1 means one cluster per class; a seeding that sorts by size or by rotation
scores near the largest class's share.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import torch
from torch import Tensor

from dti_sprites.model import DTISprites
from dti_sprites.seeding import (
    centre_crops,
    invariant_kmeans,
    isolated_layers,
    kmeans_masks,
    layer_supports,
    normalise_crops,
    split_merge,
    whole_crops,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@torch.no_grad()
def collect(
    model: DTISprites, path: Path, batches: int, batch_size: int, tolerance: float | None, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Crops (N, h·w) of random training scenes, the majority class of each (N,) and whether
    its object touches no other (N,) bool (:func:`dti_sprites.seeding.isolated_layers`)."""
    rng = np.random.default_rng(seed)
    crops, classes, isolated = [], [], []
    with h5py.File(path, "r") as f:
        n_train = len(f["image"]) - 1000  # the harness's validation and test ranges follow
        for _ in range(batches):
            index = np.sort(rng.choice(n_train, batch_size, replace=False))
            image = torch.from_numpy(f["image"][index]).permute(0, 3, 1, 2).float() / 255
            semantic = torch.from_numpy(f["semantic"][index]).long()  # (B, H, W)
            support, out = layer_supports(model, image, tolerance)  # (B, L, H, W)
            canvas = model.to_canvas(support[:, :, None], out.params).clamp(0, 1)
            keep = (support.flatten(2).sum(2) >= 4) & (out.sprite_choice >= 0)  # (B, L)
            n_classes = int(semantic.max()) + 1
            onehot = torch.nn.functional.one_hot(semantic, n_classes).permute(0, 3, 1, 2)
            votes = torch.einsum("blhw,bchw->blc", support, onehot.float())  # (B, L, classes)
            votes[..., 0] = 0  # a crop is labelled by the object it covers, not the background
            share, label = votes.max(2)  # (B, L)
            pure = share >= 0.8 * support.flatten(2).sum(2)  # one class covers 80% of it
            crops.append(canvas.flatten(2)[keep])
            classes.append(torch.where(pure, label, 0)[keep])  # 0: no single class
            isolated.append(isolated_layers(support, out, image)[keep])
    return torch.cat(crops), torch.cat(classes), torch.cat(isolated)


def purity(cluster: Tensor, classes: Tensor, k: int) -> tuple[float, list[list[int]]]:
    """Share of the labelled crops (class > 0) in their cluster's majority class, and the
    confusion (k, classes) of all crops (column 0: crops that no single class covers)."""
    n_classes = int(classes.max()) + 1
    confusion = torch.zeros(k, n_classes, dtype=torch.long)
    confusion.index_put_((cluster, classes), torch.ones_like(cluster), accumulate=True)
    labelled = confusion[:, 1:]
    return float(labelled.max(1).values.sum() / labelled.sum().clamp(min=1)), confusion.tolist()


def nearest(crops: Tensor, centres: Tensor) -> Tensor:
    return torch.cdist(crops.double(), centres.double()).argmin(1)


def variants(size: tuple[int, int], k: int, seed: int) -> dict[str, Callable]:
    """name -> crops -> (centres (k, h·w), cluster of every crop (N,))."""

    def plain(crops: Tensor) -> tuple[Tensor, Tensor]:
        centred = centre_crops(crops, size)
        centres = kmeans_masks(centred, k, seed)
        return centres, nearest(centred, centres)

    def plain_moves(crops: Tensor) -> tuple[Tensor, Tensor]:
        centred = centre_crops(crops, size)
        centres, _ = split_merge(centred, kmeans_masks(centred, k, seed), None, 4, seed)
        return centres, nearest(centred, centres)

    def scale(crops: Tensor) -> tuple[Tensor, Tensor]:
        normal, _ = normalise_crops(centre_crops(crops, size), size)
        centres = kmeans_masks(normal, k, seed)
        return centres, nearest(normal, centres)

    def invariant(rotations: int) -> Callable:
        def run(crops: Tensor) -> tuple[Tensor, Tensor]:
            normal, _ = normalise_crops(centre_crops(crops, size), size)
            centres, cluster, _ = invariant_kmeans(normal, k, size, rotations, seed=seed)
            return centres, cluster

        return run

    return {
        "centred k-means (recipe before)": plain,
        "centred k-means + 4 moves (recipe)": plain_moves,
        "scale-normalised k-means": scale,
        "scale-normalised, rotation-invariant k-means (36)": invariant(36),
        "scale-normalised, rotation-invariant k-means (72)": invariant(72),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = DTISprites.from_checkpoint(args.checkpoint)
    crops, classes, isolated = collect(
        model, args.data, args.batches, args.batch_size, args.tolerance, args.seed
    )
    k, size = model.sprites.n_sprites, tuple(model.sprites.mask.shape[-2:])
    print(f"{len(crops)} crops, classes {torch.bincount(classes).tolist()} (0: none)")
    selections = {
        "all crops": torch.ones(len(crops), dtype=torch.bool),
        "isolated, whole crops": isolated & whole_crops(crops, size),
    }
    rows, centres = [], {}
    for selection, chosen in selections.items():
        print(f"{selection}: {int(chosen.sum())}", flush=True)
        for variant, run in variants(size, k, args.seed).items():
            name = f"{selection}: {variant}"
            start = time.perf_counter()
            centres[name], cluster = run(crops[chosen])
            score, confusion = purity(cluster, classes[chosen], k)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "crops": selection,
                    "variant": variant,
                    "n": int(chosen.sum()),
                    "purity": round(score, 4),
                    "confusion": confusion,
                }
            )
            print(f"  {variant}: purity {score:.3f} ({seconds:.1f} s) {confusion}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "purity.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["crops", "variant", "n", "purity", "confusion"])
            writer.writeheader()
            writer.writerows(rows)
        fig, axes = plt.subplots(len(centres), k, figsize=(1.6 * k, 1.6 * len(centres)))
        for row, (name, masks) in zip(axes, centres.items(), strict=True):
            for ax, mask in zip(row, masks, strict=True):
                ax.imshow(mask.view(size).cpu(), cmap="gray", vmin=0, vmax=1)
                ax.set(xticks=[], yticks=[])
            row[0].set_ylabel(name[:40], fontsize=5)
        fig.tight_layout()
        fig.savefig(args.out / "centres.png", dpi=90)


if __name__ == "__main__":
    main()
