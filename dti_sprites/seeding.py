"""Sprite masks from the data: each layer's pixels, inverse-warped into the sprite canvas.

Once the layer transformations place the layers on the objects, the pixels a layer explains,
taken back through its own warp (:meth:`DTISprites.to_canvas`), show the shape it covers in
sprite coordinates. Clustering many such crops (k-means) gives K0 masks at once, and averaging
the crops of the layers that chose each sprite refits the masks in closed form (a Lloyd step).
Split-merge moves take the clustering out of the local optima that Lloyd steps stop in.
See ``docs/method.md``, "Fast recipe". Plain PyTorch and SciPy; a callback decides when.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

from dti_sprites.model import DTISprites


@torch.no_grad()
def layer_crops(
    model: DTISprites,
    image: Tensor,
    min_pixels: int = 4,
    background_tolerance: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The support of every layer instance, in sprite-canvas coordinates.

    A layer's support is the pixels that ``instance_fg`` gives it and that its colour explains
    better than the background does. With ``background_tolerance`` τ, its pixels that the
    background does not explain (squared RGB distance above τ) count too: shaded piece edges
    that a black background fits about as well as the layer's flat colour, which the masks
    would otherwise lose (docs/method.md §11). The model runs in evaluation mode (no mask noise).

    image (B, C, H, W) in [0, 1]. Returns crops (N, h·w) in [0, 1] and the sprite each of those
    layers chose (N,) int64, for the N = at most B·L layers with a non-empty sprite and at least
    ``min_pixels`` support pixels.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(image)
    finally:
        model.train(was_training)
    n_layers = model.n_layers
    labels = out.instance_fg(image)  # (B, H, W) in 1..L
    layer_ids = torch.arange(1, n_layers + 1, device=image.device)
    own = labels[:, None] == layer_ids[None, :, None, None]  # (B, L, H, W)
    layer_err = (out.layers[:, :, :-1] - image[:, None]).pow(2).sum(2)  # (B, L, H, W)
    background_err = (out.background - image).pow(2).sum(1)[:, None]  # (B, 1, H, W)
    explained = layer_err < background_err  # (B, L, H, W)
    if background_tolerance is not None:
        explained = explained | (background_err > background_tolerance)
    support = (own & explained).to(image.dtype)  # (B, L, H, W)
    crops = model.to_canvas(support[:, :, None], out.params).clamp(0, 1)  # (B, L, 1, h, w)
    keep = (support.flatten(2).sum(2) >= min_pixels) & (out.sprite_choice >= 0)  # (B, L)
    return crops.flatten(2)[keep], out.sprite_choice[keep]  # (N, h·w), (N,)


def centre_crops(crops: Tensor, size: tuple[int, int]) -> Tensor:
    """Shift each crop by whole pixels so that its centre of mass sits at the canvas centre.

    crops (N, h·w) -> (N, h·w); zeros are shifted in, so nothing moves in from the other side.
    The same shape placed anywhere in the canvas then gives the same crop: k-means clusters
    shapes rather than the position errors of the layers (measured: mIoU 28 instead of 21
    right after seeding, docs/method.md §11).
    """
    h, w = size
    c = crops.view(-1, h, w)  # (N, h, w)
    ys = torch.arange(h, device=crops.device)
    xs = torch.arange(w, device=crops.device)
    mass = c.sum((1, 2)).clamp(min=1e-12)  # (N,)
    cy = (c.sum(2) * ys).sum(1) / mass  # (N,)
    cx = (c.sum(1) * xs).sum(1) / mass  # (N,)
    src_y = ys[None] - ((h - 1) / 2 - cy).round().long()[:, None]  # (N, h) source rows
    src_x = xs[None] - ((w - 1) / 2 - cx).round().long()[:, None]  # (N, w) source columns
    inside_y = (src_y >= 0) & (src_y < h)
    inside_x = (src_x >= 0) & (src_x < w)
    n = torch.arange(len(c), device=crops.device)[:, None, None]
    out = c[n, src_y.clamp(0, h - 1)[:, :, None], src_x.clamp(0, w - 1)[:, None, :]]
    return (out * (inside_y[:, :, None] & inside_x[:, None, :])).flatten(1)  # (N, h·w)


def kmeans_masks(crops: Tensor, k: int, seed: int = 0) -> Tensor:
    """k-means (k-means++ start) over crops (N, D) -> k centres (k, D), each in [0, 1].

    Fewer than k crops is an error: each centre needs at least one.
    """
    if len(crops) < k:
        raise ValueError(f"sprite seeding: {len(crops)} layer crops for {k} sprites; need >= {k}")
    data = crops.detach().double().cpu().numpy()
    centres, _ = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed))
    return torch.from_numpy(centres).to(crops).clamp(0, 1)


def refit_masks(crops: Tensor, choices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Closed-form refit: each sprite's mask as the mean crop of the layers that chose it.

    crops (N, D), choices (N,) in [0, k). Returns means (k, D) (zeros where unused) and counts
    (k,) int64.
    """
    counts = torch.bincount(choices, minlength=k)  # (k,)
    sums = crops.new_zeros(k, crops.shape[1]).index_add_(0, choices, crops)  # (k, D)
    return sums / counts.clamp(min=1)[:, None].to(crops), counts


def _sq_distances(crops: Tensor, centres: Tensor) -> Tensor:
    """Squared Euclidean distances (N, K) between crops (N, D) and centres (K, D)."""
    cross = crops @ centres.T  # (N, K)
    return (crops.pow(2).sum(1)[:, None] - 2 * cross + centres.pow(2).sum(1)[None]).clamp(min=0)


def _two_means(crops: Tensor, seed: int, restarts: int = 3) -> tuple[Tensor, Tensor]:
    """The best of ``restarts`` 2-means runs over crops (n, D): centres (2, D), labels (n,)."""
    data = crops.detach().double().cpu().numpy()
    best = None
    for r in range(restarts):
        centres, labels = kmeans2(data, 2, minit="++", seed=np.random.default_rng(seed + r))
        sse = float(((data - centres[labels]) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, centres, labels)
    assert best is not None
    return torch.from_numpy(best[1]).to(crops), torch.from_numpy(best[2]).to(crops.device)


def split_merge(
    crops: Tensor,
    centres: Tensor,
    assignment: Tensor | None = None,
    max_moves: int = 4,
    seed: int = 0,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Split one cluster and remove another while that lowers the k-means objective.

    Lloyd steps (assign, average) stop where one centre covers two shapes (a mixture) while
    two others share one shape (a duplicate) or hold stray crops. A move splits the cluster
    whose 2-means split lowers the sum of squared crop-to-centre distances most, and removes
    the cluster whose crops, sent to their next-nearest centre, raise it least; it is made
    only when the first exceeds the second. The two halves' means take the two clusters'
    places, and the crops of both are assigned to their nearest centre. Up to ``max_moves``
    moves (docs/method.md §11).

    crops (N, D); centres (K, D); assignment (N,) in [0, K), the cluster of each crop (e.g. the
    sprite its layer chose), or None: the nearest centre, with Lloyd steps after every move.
    Returns the centres (K, D) and the moves made, as (split, removed) cluster pairs. A centre
    that a move changed, or that gained crops from one, is the mean of its crops (all of them
    are, with ``assignment`` None); the others are returned as given.
    """
    if assignment is not None and assignment.shape != crops.shape[:1]:
        raise ValueError(
            f"split_merge: assignment of shape {tuple(assignment.shape)} for {len(crops)} crops"
        )
    x, centres = crops.double(), centres.double().clone()
    k, device = len(centres), crops.device
    nearest = assignment is None
    label = _sq_distances(x, centres).argmin(1) if nearest else assignment.clone()
    if nearest:
        centres, label = _lloyd(x, centres, label)
    moves: list[tuple[int, int]] = []
    for move in range(max_moves):
        dist = _sq_distances(x, centres)  # (N, K)
        own = dist.gather(1, label[:, None])[:, 0]  # (N,)
        others = dist.scatter(1, label[:, None], float("inf")).min(1).values  # (N,)
        removal = x.new_zeros(k).index_add_(0, label, others - own)  # (K,)
        gain, halves = x.new_full((k,), -1.0), {}
        for c in range(k):
            members = label == c
            if int(members.sum()) < 4:
                continue
            two, sub = _two_means(x[members], seed + 97 * move + c)
            sse_split = (x[members] - two[sub]).pow(2).sum()
            sse = (x[members] - x[members].mean(0)).pow(2).sum()
            gain[c], halves[c] = sse - sse_split, two
        split = int(gain.argmax())
        cost = removal.clone()
        cost[split] = float("inf")
        removed = int(cost.argmin())
        if gain[split] <= cost[removed]:
            break
        centres[split], centres[removed] = halves[split]
        changed = (label == split) | (label == removed)  # (N,)
        label[changed] = _sq_distances(x[changed], centres).argmin(1)
        touched = torch.zeros(k, dtype=torch.bool, device=device)
        touched[label[changed]] = True
        touched[[split, removed]] = True
        centres = torch.where(touched[:, None], _means(x, label, centres), centres)
        if nearest:
            centres, label = _lloyd(x, centres, label)
        moves.append((split, removed))
    return centres.to(crops), moves


def _means(x: Tensor, label: Tensor, centres: Tensor) -> Tensor:
    """Each centre replaced by the mean of its crops (:func:`refit_masks`); without crops, kept."""
    means, counts = refit_masks(x, label, len(centres))
    return torch.where(counts[:, None] > 0, means, centres)


def _lloyd(x: Tensor, centres: Tensor, label: Tensor, steps: int = 30) -> tuple[Tensor, Tensor]:
    """Lloyd steps (means, then nearest centre) until the assignment stops changing."""
    for _ in range(steps):
        centres = _means(x, label, centres)
        new = _sq_distances(x, centres).argmin(1)
        if torch.equal(new, label):
            break
        label = new
    return centres, label
