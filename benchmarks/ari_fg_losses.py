"""Where a trained multi-object model loses ARI-FG, on the held-out split.

    python benchmarks/ari_fg_losses.py --config tetrominoes_fast --checkpoint FILE.ckpt
        [--data FILE.h5] [--heldout 500] [--thresholds 0.5 0.3]

``FILE.ckpt`` is a checkpoint of that config (e.g. ``convergence.py --checkpoint``). Prints:
- ARI-FG, the images scoring below 0.9, and of those how many have two objects in one layer
  (merged) rather than an object whose pixels are shared between layers (split);
- the ground-truth foreground pixels that no layer covers (``instance`` = 0, so ``instance_fg``
  gives them to the best-coloured layer), how many of them touch a covered pixel of their own
  object (edges, not whole pieces), and the background pixels that a layer covers;
- what-ifs, no training: the same model with every mask binarised at each threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_dilation

sys.path.insert(0, str(Path(__file__).parent))
import convergence  # the harness builds the config exactly as it trained

from dti_sprites.metrics import ari_per_image


def heldout(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The config's model with the checkpoint's weights, the held-out images and their masks."""
    harness = argparse.Namespace(
        config=args.config, steps=1, every=1, data=args.data, generate=0, heldout=args.heldout
    )
    cli = convergence.build(harness, [], 0, Path(args.checkpoint).parent / "ari_fg_losses")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    cli.model.load_state_dict(state)
    data = cli.datamodule
    data.setup("validate")
    loader = data.val_dataloader()[list(data.eval_protocols).index("heldout")]
    batches = list(loader)
    image = torch.cat([b["image"] for b in batches]).float() / 255  # (N, C, H, W)
    mask = torch.cat([b["mask"] for b in batches])  # (N, H, W) 0 = background
    return cli.model.model.eval(), image, mask


def report(model: torch.nn.Module, image: torch.Tensor, gt: np.ndarray, tag: str) -> None:
    with torch.no_grad():
        outs = [model(image[i : i + 100]) for i in range(0, len(image), 100)]
        fg = np.concatenate(
            [o.instance_fg(image[i * 100 : (i + 1) * 100]).numpy() for i, o in enumerate(outs)]
        )
        inst = np.concatenate([o.instance().numpy() for o in outs])  # (N, H, W)
    scores = ari_per_image(torch.from_numpy(fg).long(), torch.from_numpy(gt).long(), True).numpy()
    merged = edge = far = 0
    for n in range(len(gt)):
        fore = gt[n] > 0
        owners = set()
        for obj in np.unique(gt[n][fore]):
            pixels = gt[n] == obj
            owners.add(np.bincount(fg[n][pixels]).argmax())
            uncovered = pixels & (inst[n] == 0)
            near = binary_dilation(pixels & (inst[n] > 0))
            edge += int((uncovered & near).sum())
            far += int((uncovered & ~near).sum())
        merged += scores[n] < 0.9 and len(owners) < len(np.unique(gt[n][fore]))
    low = int((scores < 0.9).sum())
    print(
        f"{tag}: ARI-FG {100 * scores.mean():.1f}; {low} images below 0.9 ({merged} merged, "
        f"{low - merged} split); foreground uncovered {edge + far} of {(gt > 0).sum()} "
        f"({edge} at an edge); background covered {((gt == 0) & (inst > 0)).sum()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, image, mask = heldout(args)
    gt = mask.numpy()
    report(model, image, gt, "as trained")
    trained = model.sprites.mask.detach().clone()
    for threshold in args.thresholds:
        with torch.no_grad():
            model.sprites.mask.copy_((trained > threshold).to(trained))
        report(model, image, gt, f"masks binarised at {threshold}")
    with torch.no_grad():
        model.sprites.mask.copy_(trained)


if __name__ == "__main__":
    main()
