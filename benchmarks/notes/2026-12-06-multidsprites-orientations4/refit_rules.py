"""One-off probe of 2026-12-06 (run from the repository root; tidied after the run):

    python benchmarks/notes/2026-12-06-multidsprites-orientations4/refit_rules.py CKPT OUT.png

Which refit rule keeps the masks shapes: the isolated layer crops of 50 training batches of
data/convergence/mds21k.h5 through a checkpoint's model, then (a) the refit by the layers'
choices, (b) by nearest mask, (c) by nearest mask on scale-normalised crops, (d) the invariant
k-means on normalised crops (the seeding's). Draws the masks of each, one row per rule.
"""

import sys
from pathlib import Path

import h5py
import matplotlib
import torch

from dti_sprites.model import DTISprites
from dti_sprites.seeding import (
    centre_crops,
    invariant_kmeans,
    invariant_refit,
    layer_crops,
    normalise_crops,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt

torch.set_num_threads(1)
ckpt, out = sys.argv[1], Path(sys.argv[2])
model = DTISprites.from_checkpoint(ckpt).eval()
size = tuple(model.sprites.mask.shape[-2:])
crops, choices = [], []
with h5py.File("data/convergence/mds21k.h5") as f:
    for b in range(50):
        image = torch.from_numpy(f["image"][b * 32 : (b + 1) * 32]).permute(0, 3, 1, 2) / 255
        with torch.no_grad():
            c, ch = layer_crops(model, image.float(), 4, None, True)
        crops.append(c)
        choices.append(ch)
crops, choices = centre_crops(torch.cat(crops), size), torch.cat(choices)
print("crops", len(crops), "choices", torch.bincount(choices, minlength=3).tolist())
masks = model.sprites.mask.detach().flatten(1)
scales = (0.8, 0.9, 1.0, 1.1, 1.25)
normalised, _ = normalise_crops(crops, size)
rows = {
    "current": masks,
    "choice": invariant_refit(crops, choices, masks, size, 36, scales)[0],
    "nearest": invariant_refit(crops, None, masks, size, 36, scales)[0],
    "nearest, normalised": invariant_refit(normalised, None, masks, size, 36, scales)[0],
    "kmeans, normalised": invariant_kmeans(normalised, 3, size, 36, seed=0)[0],
}
fig, axes = plt.subplots(len(rows), 3, figsize=(4, 1.4 * len(rows)))
for i, (name, shown) in enumerate(rows.items()):
    for k in range(3):
        axes[i, k].imshow(shown[k].view(size), cmap="gray", vmin=0, vmax=1)
        axes[i, k].set_xticks([])
        axes[i, k].set_yticks([])
    axes[i, 0].set_ylabel(name, fontsize=6)
fig.tight_layout()
fig.savefig(out, dpi=100)
