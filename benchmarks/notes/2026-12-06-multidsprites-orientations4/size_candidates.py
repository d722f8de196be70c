"""One-off probe of 2026-12-06 (run from the repository root; tidied after the run):

    python benchmarks/notes/2026-12-06-multidsprites-orientations4/size_candidates.py CKPT \
        0.6,0.8,1.0,1.2 TURNS

Inference-time candidates at TURNS orientations x these sizes (a sprite drawn that many times
its predicted size), by patching the model's rotate_params; benchmarks/decomposition_probe.py
scores them on the validation range (records 20,000-20,499 of data/convergence/mds21k.h5).
Not a model feature: a measurement.
"""

import importlib.util
import sys
from pathlib import Path

import torch

import dti_sprites.model as model_module
from dti_sprites.transforms import rotate_params

torch.set_num_threads(1)
sizes = [float(x) for x in sys.argv[2].split(",")]


def turned_and_sized(module, params, versions):
    """(N, P) -> (N, turns · sizes, P): each turn's matrix divided by each size."""
    turns = versions // len(sizes)
    turned = rotate_params(module, params, turns)  # (N, T, P)
    theta = module.theta(turned.flatten(0, 1)).view(len(params), turns, 1, 2, 3)
    factor = torch.tensor([1 / s for s in sizes], dtype=params.dtype).view(1, 1, -1, 1, 1)
    out = (theta * factor).flatten(1, 2)  # (N, T·S, 2, 3)
    return module.params(out.flatten(0, 1)).view(len(params), turns * len(sizes), -1)


model_module.rotate_params = turned_and_sized
spec = importlib.util.spec_from_file_location("probe", "benchmarks/decomposition_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
model = model_module.DTISprites.from_checkpoint(sys.argv[1]).eval()
model.set_orientations(int(sys.argv[3]) * len(sizes))
rows, scores = probe.probe(model, Path("data/convergence/mds21k.h5"), 20000, 500, 50)
print(sizes, scores)
for name, value in probe.summarise(rows, 3, 20):
    if "rotation" not in name:
        print(name, value)
