"""One-off contrast of 2026-12-07 (run from the repository root): where the shipped Tetrominoes
model's layers draw their sprites, against the objects they cover.

    dti-sprites-data synth --dataset tetrominoes --n 500 --seed 7 --out scratch/tet500.tfrecords
    dti-sprites-data convert --dataset tetrominoes --src scratch/tet500.tfrecords \
        --out scratch/tet500.h5
    python benchmarks/notes/2026-12-07-multidsprites-size-candidates/tetrominoes_contrast.py

Prints the layers' reach (std of a layer's drawn centre over the images), the objects' spread
and the median distance from an object's centroid to its covering layer's drawn centre, the
measures of benchmarks/decomposition_probe.py.
"""

import importlib.util

import h5py
import numpy as np
import torch

from dti_sprites.model import DTISprites

torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("probe", "benchmarks/decomposition_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
model = DTISprites.from_checkpoint("weights/tetrominoes_fast.pt").eval()
with h5py.File("scratch/tet500.h5", "r") as f:
    image = torch.from_numpy(f["image"][:]).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    mask = f["mask"][:]  # (N, H, W)
size = image.shape[-1]
centres, instance = [], []
with torch.no_grad():
    for i in range(0, len(image), 100):
        out = model(image[i : i + 100])
        centres.append(probe.drawn_centres(out.params, size))  # (B, L, 2)
        instance.append(out.instance().numpy())  # (B, H, W)
centres, instance = np.concatenate(centres), np.concatenate(instance)
objects, offsets = [], []
for i in range(len(mask)):
    for e in np.unique(mask[i]):
        if e == 0:
            continue
        ys, xs = np.nonzero(mask[i] == e)
        objects.append((xs.mean(), ys.mean()))
        layer = np.bincount(instance[i][mask[i] == e], minlength=model.n_layers + 1)[1:].argmax()
        offsets.append(np.hypot(*(centres[i, layer] - objects[-1])))
print(f"image {size} px; layer reach {centres.std(0).mean():.1f} px; objects' spread")
print(f"{np.array(objects).std(0).mean():.1f} px; offset of the covering layer: median")
print(f"{np.median(offsets):.2f} px, 75th percentile {np.percentile(offsets, 75):.2f} px")
