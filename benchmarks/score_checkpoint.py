"""The harness's ARI-FG, mIoU and mACC of a trained model on a range of records, refined or not.

    python benchmarks/score_checkpoint.py --checkpoint weights/tetrominoes_fast.pt \
        --data data/convergence/tetrominoes.h5 --first 60500 --count 500 \
        [--pose-refinement STEPS] [--pose-refinement-lr LR] [--pose-refinement-rounds R] \
        [--order-search] [--residual-placement T]

Decomposes records ``first .. first+count`` of an HDF5 file of ``dti-sprites-data`` (with its
``mask`` and ``semantic`` label maps) with a checkpoint or weights file and prints ARI-FG (mean
over images, the background pixels left out), mIoU and mACC (Hungarian-matched sprites, the
background included), as ``benchmarks/convergence.py`` scores its held-out and test ranges
(the same numbers on the same records). ``--pose-refinement`` etc. (``dti-sprites-decompose``'s
options) switch on the model's evaluation-time refinement (``DTISprites.set_pose_refinement``,
docs/method.md §11): each overrides its own setting, the others stay the model's (its
config's). Any dataset: `decomposition_probe.py` adds the
object-level diagnosis for Multi-dSprites.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import h5py
import torch

from dti_sprites.decompose import add_refinement_arguments, apply_refinement
from dti_sprites.metrics import SemanticScores, ari_per_image
from dti_sprites.model import Decomposition, DTISprites


def decompose_range(
    model: DTISprites, f: h5py.File, first: int, count: int, batch_size: int = 50
) -> Iterator[tuple[int, int, torch.Tensor, Decomposition]]:
    """Records ``first .. first+count`` of an open file, decomposed batch by batch: (start,
    stop, image (B, 3, H, W) in [0, 1], the model's decomposition)."""
    if first + count > len(f["image"]):
        raise ValueError(
            f"{f.filename} has {len(f['image'])} records, asked for up to {first + count}"
        )
    for start in range(first, first + count, batch_size):
        stop = min(start + batch_size, first + count)
        image = torch.from_numpy(f["image"][start:stop]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            yield start, stop, image, model(image)


class RangeScores:
    """The harness's ARI-FG (mean over images, background pixels left out), mIoU and mACC
    (Hungarian-matched sprites, background included), accumulated batch by batch."""

    def __init__(self, num_classes: int, num_clusters: int) -> None:
        self.ari_fg: list[torch.Tensor] = []
        self.semantic = SemanticScores(num_classes, num_clusters)

    def update(self, out: Decomposition, image: torch.Tensor, f: h5py.File, start: int, stop: int):
        """Score ``out``, the decomposition of ``image`` = records ``start .. stop`` of ``f``."""
        target = torch.from_numpy(f["mask"][start:stop]).long()  # (B, H, W)
        self.ari_fg.append(ari_per_image(out.instance_fg(image), target, foreground_only=True))
        self.semantic.update(out.semantic(), torch.from_numpy(f["semantic"][start:stop]).long())

    def compute(self) -> dict[str, float]:
        scores = self.semantic.compute()
        return {
            "ARI-FG": float(torch.cat(self.ari_fg).nanmean()) * 100,
            "mIoU": float(scores["miou"]) * 100,
            "mACC": float(scores["macc"]) * 100,
        }


def score(
    model: DTISprites, path: Path, first: int, count: int, batch_size: int = 50
) -> dict[str, float]:
    """ARI-FG, mIoU and mACC (%) of ``model`` on records ``first .. first+count`` of ``path``."""
    with h5py.File(path, "r") as f:
        n_classes = int(f["semantic"][first : first + count].max()) + 1
        n_clusters = model.sprites.n_sprites + 1
        scores = RangeScores(max(n_classes, n_clusters), n_clusters)
        for start, stop, image, out in decompose_range(model, f, first, count, batch_size):
            scores.update(out, image, f, start, stop)
    return scores.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    add_refinement_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = DTISprites.from_checkpoint(args.checkpoint).eval()
    apply_refinement(model, args)  # each option over the model's own setting
    found = score(model, args.data, args.first, args.count)
    print(" ".join(f"{name} {value:.2f}" for name, value in found.items()))


if __name__ == "__main__":
    main()
