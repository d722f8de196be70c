"""How precisely a trained Multi-dSprites model places its layers (note of 2026-12-07).

    python benchmarks/notes/2026-12-07-multidsprites-bank-oracle/placement_precision.py CKPT

Records 20,000-20,149 of data/convergence/mds21k.h5 (validation); the isolated squares and
ellipses (no other object within 3 px of the bounding box; their centre is the generator's
(cx, cy)). For the layer covering most of each: the distance from the true centre to the drawn
canvas centre (with the sprite's own translation, and with the layer's position alone), and
from the object's centroid to the centroid of the layer's drawn mask (alpha).
"""

import importlib.util
import sys

import h5py
import numpy as np
import torch

from dti_sprites.model import DTISprites

torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("probe", "benchmarks/decomposition_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

model = DTISprites.from_checkpoint(sys.argv[1]).eval()
first, count, size = 20000, 150, 64
grid_y, grid_x = np.mgrid[0:size, 0:size]
centres, masks = [], []  # per object: (drawn dx, dy, layer-only dx, dy); (mask centroid dx, dy)
with h5py.File("data/convergence/mds21k.h5", "r") as f:
    for start in range(first, first + count, 50):
        stop = start + 50
        image = torch.from_numpy(f["image"][start:stop]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            out = model(image)
        instance = out.instance().numpy()  # (B, H, W), l + 1 = layer l
        drawn = probe.drawn_centres(out.params, size)  # (B, L, 2)
        params = dict(out.params)
        if "sprite/similarity" in params:  # the layer's position alone: no sprite translation
            params["sprite/similarity"] = params["sprite/similarity"].clone()
            params["sprite/similarity"][..., 2:] = 0
        layer_only = probe.drawn_centres(params, size)
        label, shape = f["mask"][start:stop], f["shape"][start:stop]
        x, y = f["x"][start:stop], f["y"][start:stop]
        for i in range(stop - start):
            for e in np.unique(label[i]):
                if e == 0 or shape[i, e] == 3:  # background; a heart's centroid is not (cx, cy)
                    continue
                inside = label[i] == e
                ys, xs = np.nonzero(inside)
                box = label[i][
                    max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4
                ]
                if np.any((box != 0) & (box != e)):
                    continue
                true = size * (0.15 + 0.7 * np.array([x[i, e], y[i, e]])) - 0.5  # pixel index
                layer = np.bincount(instance[i][inside], minlength=6)[1:].argmax()
                alpha = out.layers[i, layer, -1].numpy()  # (H, W)
                centroid = np.array([(alpha * grid_x).sum(), (alpha * grid_y).sum()])
                centroid /= max(alpha.sum(), 1e-6)
                centres.append((*(drawn[i, layer] - true), *(layer_only[i, layer] - true)))
                masks.append(centroid - [xs.mean(), ys.mean()])
centres, masks = np.array(centres), np.array(masks)
drawn_d, layer_d = np.hypot(*centres[:, :2].T), np.hypot(*centres[:, 2:].T)
mask_d = np.hypot(*masks.T)
print(f"isolated squares and ellipses: {len(centres)}")
print(f"drawn canvas centre - true centre, median: {np.median(drawn_d):.2f} px")
print(f"layer position alone - true centre, median: {np.median(layer_d):.2f} px")
print(f"drawn mask centroid - object centroid, median: {np.median(mask_d):.2f} px")
print(f"  within 0.5 / 1 px: {(mask_d < 0.5).mean():.2f} / {(mask_d < 1).mean():.2f}")
