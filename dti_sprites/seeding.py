"""Sprite masks from the data: each layer's pixels, inverse-warped into the sprite canvas.

Once the layer transformations place the layers on the objects, the pixels a layer explains,
taken back through its own warp (:meth:`DTISprites.to_canvas`), show the shape it covers in
sprite coordinates. Clustering many such crops (k-means) gives K0 masks at once, and averaging
the crops of the layers that chose each sprite refits the masks in closed form (a Lloyd step).
Split-merge moves take the clustering out of the local optima that Lloyd steps stop in.
Objects that appear at any rotation and size (Multi-dSprites) need crops normalised for scale
and a clustering that is invariant to rotation: :func:`normalise_crops` and
:func:`invariant_kmeans`, the method's own idea (DTI) applied to the crops.
See ``docs/method.md``, "Fast recipe". Plain PyTorch and SciPy; a callback decides when.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dti_sprites.model import Decomposition, DTISprites


@torch.no_grad()
def layer_supports(
    model: DTISprites, image: Tensor, background_tolerance: float | None = None
) -> tuple[Tensor, Decomposition]:
    """The pixels each layer explains: its support (B, L, H, W) in {0, 1}, and the
    decomposition it comes from (the model in evaluation mode: no mask noise; never refined,
    :meth:`DTISprites.unrefined`, since the seeding is part of training).

    A layer's support is the pixels that ``instance_fg`` gives it and that its colour explains
    better than the background does. With ``background_tolerance`` τ, its pixels that the
    background does not explain (squared RGB distance above τ) count too: shaded piece edges
    that a black background fits about as well as the layer's flat colour, which the masks
    would otherwise lose (docs/method.md §11). image (B, C, H, W) in [0, 1].
    """
    was_training = model.training
    model.eval()
    try:
        with model.unrefined():
            out = model(image)
    finally:
        model.train(was_training)
    labels = out.instance_fg(image)  # (B, H, W) in 1..L
    layer_ids = torch.arange(1, model.n_layers + 1, device=image.device)
    own = labels[:, None] == layer_ids[None, :, None, None]  # (B, L, H, W)
    layer_err = (out.layers[:, :, :-1] - image[:, None]).pow(2).sum(2)  # (B, L, H, W)
    background_err = (out.background - image).pow(2).sum(1)[:, None]  # (B, 1, H, W)
    explained = layer_err < background_err  # (B, L, H, W)
    if background_tolerance is not None:
        explained = explained | (background_err > background_tolerance)
    return (own & explained).to(image.dtype), out


def isolated_layers(
    support: Tensor, out: Decomposition, image: Tensor, tolerance: float = 0.01, ring: int = 1
) -> Tensor:
    """Which layer instances show an object that touches no other: (B, L) bool.

    The ``ring`` pixels around a layer's support (a max-pooling dilation) must all be
    background: their squared RGB distance to the decomposition's background is at most
    ``tolerance``. Such an object is neither occluded nor merged with a neighbour, so its
    support is its whole shape; in crowded scenes (Multi-dSprites) most supports are not.
    support (B, L, H, W) from :func:`layer_supports`, image (B, C, H, W).
    """
    size = 2 * ring + 1
    grown = F.max_pool2d(support, size, stride=1, padding=ring)  # (B, L, H, W)
    border = (grown - support) > 0  # (B, L, H, W)
    foreground = (out.background - image).pow(2).sum(1)[:, None] > tolerance  # (B, 1, H, W)
    touching = (border & foreground).flatten(2).any(2)  # (B, L)
    return ~touching & (support.flatten(2).sum(2) > 0)


@torch.no_grad()
def layer_crops(
    model: DTISprites,
    image: Tensor,
    min_pixels: int = 4,
    background_tolerance: float | None = None,
    isolated_only: bool = False,
) -> tuple[Tensor, Tensor]:
    """The support of every layer instance (:func:`layer_supports`), in the frame of the sprite
    it chose: taken back through the layer's and the sprite's own transformations.

    With ``isolated_only``, only the layers whose object touches no other
    (:func:`isolated_layers`) and whose crop is one whole piece inside the canvas
    (:func:`whole_crops`): the shapes themselves, not occluded or merged ones.
    image (B, C, H, W) in [0, 1]. Returns crops (N, h·w) in [0, 1] and the sprite each of those
    layers chose (N,) int64, for the N = at most B·L layers with a non-empty sprite and at least
    ``min_pixels`` support pixels.
    """
    support, out = layer_supports(model, image, background_tolerance)  # (B, L, H, W)
    crops = model.to_canvas(support[:, :, None], out.params).clamp(0, 1)  # (B, L, 1, h, w)
    keep = (support.flatten(2).sum(2) >= min_pixels) & (out.sprite_choice >= 0)  # (B, L)
    if isolated_only:
        keep &= isolated_layers(support, out, image)
    crops, choices = crops.flatten(2)[keep], out.sprite_choice[keep]  # (N, h·w), (N,)
    if isolated_only:
        whole = whole_crops(crops, tuple(model.sprites.mask.shape[-2:]))
        crops, choices = crops[whole], choices[whole]
    return crops, choices


def whole_crops(crops: Tensor, size: tuple[int, int], min_share: float = 0.9) -> Tensor:
    """Which crops show one whole object: (N,) bool.

    A crop is kept when its largest connected piece (pixels above 0.5, 4-connected) holds at
    least ``min_share`` of its pixels above 0.5, and none of them lies on the canvas border.
    The others are layers that cover two objects, a fragment, or an object that the canvas
    cuts off: their shape is not a sprite's. crops (N, h·w).
    """
    binary = (crops > 0.5).view(-1, *size).cpu().numpy()  # (N, h, w)
    keep = np.zeros(len(binary), dtype=bool)
    for i, mask in enumerate(binary):
        total = mask.sum()
        if total == 0 or mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
            continue
        labels, n = ndimage.label(mask)
        largest = np.bincount(labels.ravel())[1:].max() if n else 0
        keep[i] = largest >= min_share * total
    return torch.from_numpy(keep).to(crops.device)


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
    _, cx, cy, _ = _moments(crops, size)  # (N,) each
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


def _moments(crops: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mass (N,), centre of mass cx, cy (N,) and radius of gyration (N,), in pixels."""
    h, w = size
    c = crops.view(-1, h, w)  # (N, h, w)
    ys = torch.arange(h, dtype=crops.dtype, device=crops.device)
    xs = torch.arange(w, dtype=crops.dtype, device=crops.device)
    mass = c.sum((1, 2)).clamp(min=1e-12)  # (N,)
    cy = (c.sum(2) * ys).sum(1) / mass  # (N,)
    cx = (c.sum(1) * xs).sum(1) / mass  # (N,)
    var_y = (c.sum(2) * (ys[None] - cy[:, None]).pow(2)).sum(1) / mass  # (N,)
    var_x = (c.sum(1) * (xs[None] - cx[:, None]).pow(2)).sum(1) / mass  # (N,)
    return mass, cx, cy, (var_x + var_y).sqrt()


def warp_crops(
    crops: Tensor,
    size: tuple[int, int],
    angle: Tensor,
    scale: Tensor,
    shift: Tensor | None = None,
) -> Tensor:
    """Rotate and scale each crop about the canvas centre (bilinear, zeros outside).

    crops (N, h·w) with h = w; angle (N,) in radians, scale (N,) > 0, shift (N, 2) in pixels
    (x, y) or None. out(p) = crop(c + shift + scale · R(angle) · (p − c)) with c the canvas
    centre: the crop's content turns by −angle and shrinks by 1 / scale; the content at
    c + shift moves to c. Returns (N, h·w).
    """
    h, w = size
    if h != w:
        raise ValueError(f"warp_crops needs a square canvas, got {h}×{w}")
    cos, sin = angle.cos() * scale, angle.sin() * scale  # (N,)
    zero = torch.zeros_like(cos)
    tx, ty = (zero, zero) if shift is None else (shift[:, 0] * 2 / w, shift[:, 1] * 2 / h)
    theta = torch.stack([cos, -sin, tx, sin, cos, ty], 1).view(-1, 2, 3)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(crops.dtype), [len(crops), 1, h, w], align_corners=False)
    out = F.grid_sample(crops.view(-1, 1, h, w), grid, align_corners=False)  # (N, 1, h, w)
    return out.flatten(1)


def normalise_crops(
    crops: Tensor, size: tuple[int, int], radius: float | None = None
) -> tuple[Tensor, float]:
    """Move each crop's centre of mass to the canvas centre and scale it to one size.

    The size of a shape is its radius of gyration (the square root of its second central
    moment, in pixels), which grows in proportion to the shape: after this, the same shape
    drawn at any scale gives about the same crop. crops (N, h·w); radius: the common radius,
    default the median of the crops'. Returns the crops (N, h·w) (sub-pixel, bilinear) and the
    radius used.
    """
    _, cx, cy, r = _moments(crops, size)
    if radius is None:
        radius = float(r.median())
    h, w = size
    shift = torch.stack([cx - (w - 1) / 2, cy - (h - 1) / 2], 1)  # (N, 2)
    scale = r.clamp(min=1e-6) / radius
    angle = torch.zeros_like(scale)
    return warp_crops(crops, size, angle, scale, shift).clamp(0, 1), radius


def _transform_grid(
    rotations: int, scales: tuple[float, ...], like: Tensor
) -> tuple[Tensor, Tensor]:
    """Every (angle, scale) of a grid of ``rotations`` angles × ``scales``: (T,), (T,)."""
    angles = torch.arange(rotations, dtype=like.dtype, device=like.device) * (
        2 * math.pi / rotations
    )
    factors = torch.tensor(scales, dtype=like.dtype, device=like.device)
    return angles.repeat_interleave(len(factors)), factors.repeat(rotations)  # (T,), (T,)


def invariant_assign(
    crops: Tensor,
    centres: Tensor,
    size: tuple[int, int],
    rotations: int,
    scales: tuple[float, ...] = (1.0,),
) -> tuple[Tensor, Tensor, Tensor]:
    """The best transformation of every centre for every crop, over a grid.

    Each centre (K, h·w) is rotated by each of ``rotations`` angles over a full turn and scaled
    by each factor of ``scales`` (T = rotations · len(scales) versions); crops (N, h·w).
    Returns the squared distance (N, K) of each crop to each centre's best version, the index
    (N, K) in [0, T) of that version, and the grid's angles and scales as a (T, 2) tensor.
    """
    angle, scale = _transform_grid(rotations, scales, crops)  # (T,), (T,)
    k, n_t = len(centres), len(angle)
    versions = warp_crops(
        centres.repeat_interleave(n_t, 0), size, angle.repeat(k), scale.repeat(k)
    )  # (K·T, h·w)
    dist = _sq_distances(crops, versions).view(len(crops), k, n_t)  # (N, K, T)
    best, index = dist.min(2)  # (N, K), (N, K)
    return best, index, torch.stack([angle, scale], 1)


def align_crops(crops: Tensor, size: tuple[int, int], transform: Tensor) -> Tensor:
    """Each crop taken into the frame of the centre it matched: the inverse of its version.

    crops (N, h·w), transform (N, 2): the (angle, scale) of the centre's version that the crop
    matched (:func:`invariant_assign`), i.e. crop ≈ centre seen through that transformation.
    Returns (N, h·w), each ≈ its centre.
    """
    return warp_crops(crops, size, -transform[:, 0], 1 / transform[:, 1])


def invariant_refit(
    crops: Tensor,
    choices: Tensor | None,
    masks: Tensor,
    size: tuple[int, int],
    rotations: int,
    scales: tuple[float, ...] = (1.0,),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`refit_masks` through the best transformation: each crop is aligned with the
    current mask of its sprite (the one its layer chose, or its nearest) before the means are
    taken.

    crops (N, h·w), choices (N,) in [0, K) or None: each crop goes to the mask nearest to it
    over the rotations × scales instead (one assign-update step of :func:`invariant_kmeans`
    from the current masks), masks (K, h·w). Returns the means (K, h·w) (zeros where unused),
    the counts (K,), the aligned crops (N, h·w) and the sprite of every crop (N,).
    """
    label, aligned, _ = _align_to(crops, masks, choices, size, rotations, scales)
    aligned = aligned.clamp(0, 1)  # (N, h·w)
    means, counts = refit_masks(aligned, label, len(masks))
    return means, counts, aligned, label


def _align_to(
    crops: Tensor,
    centres: Tensor,
    label: Tensor | None,
    size: tuple[int, int],
    rotations: int,
    scales: tuple[float, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """Each crop aligned with centre ``label`` (None: its nearest, invariantly): the label
    (N,) used, the aligned crops (N, h·w) and their squared distances (N,) to that centre's
    best version."""
    dist, index, grid = invariant_assign(crops, centres, size, rotations, scales)  # (N, K)
    label = dist.argmin(1) if label is None else label  # (N,)
    aligned = align_crops(crops, size, grid[index.gather(1, label[:, None])[:, 0]])
    return label, aligned, dist.gather(1, label[:, None])[:, 0]


def invariant_kmeans(
    crops: Tensor,
    k: int,
    size: tuple[int, int],
    rotations: int,
    scales: tuple[float, ...] = (1.0,),
    restarts: int = 4,
    steps: int = 20,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Transformation-invariant k-means: k-means where a crop's distance to a centre is the
    smallest over the centre's rotations × scales, and a centre is the mean of its crops taken
    back into its own frame (DTI clustering, over the crops).

    The start is k-means++ with that distance; the best of ``restarts`` runs (lowest sum of
    squared distances) is kept, each run at most ``steps`` assign-update steps. crops (N, h·w),
    ``rotations`` angles over a full turn. Fewer than k crops is an error. Returns the centres
    (k, h·w) in [0, 1], the cluster of every crop (N,) and the crops aligned with their
    centres (N, h·w).
    """
    if len(crops) < k:
        raise ValueError(f"sprite seeding: {len(crops)} layer crops for {k} sprites; need >= {k}")
    x = crops.double()
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor, Tensor, Tensor] | None = None
    for _ in range(restarts):
        first = int(torch.randint(len(x), (1,), generator=generator))
        centres = x[first : first + 1]
        while len(centres) < k:  # k-means++: the next centre far from those taken
            dist, _, _ = invariant_assign(x, centres, size, rotations, scales)
            weight = dist.min(1).values.clamp(min=0)
            pick = int(torch.multinomial(weight.cpu() + 1e-12, 1, generator=generator))
            centres = torch.cat([centres, x[pick : pick + 1]])
        label = None
        for _ in range(steps):
            new, aligned, _ = _align_to(x, centres, None, size, rotations, scales)
            centres = _means(aligned, new, centres)
            if label is not None and torch.equal(new, label):
                break
            label = new
        label, aligned, dist = _align_to(x, centres, None, size, rotations, scales)
        sse = float(dist.sum())
        if best is None or sse < best[0]:
            best = (sse, centres, label, aligned)
    assert best is not None
    _, centres, label, aligned = best
    return centres.to(crops).clamp(0, 1), label, aligned.to(crops)


def match_masks(
    new: Tensor,
    current: Tensor,
    size: tuple[int, int],
    rotations: int,
    scales: tuple[float, ...] = (1.0,),
) -> Tensor:
    """New masks in the place and frame of the current ones they match.

    new, current (K, h·w). The one-to-one matching minimises the summed squared distance of
    each new mask to the best of a current mask's rotations × ``scales``
    (:func:`invariant_assign`; ``rotations`` 1 and scale 1: the plain distance, Hungarian
    assignment); each new mask is then taken into its current mask's frame
    (:func:`align_crops`), so that the transformations learned for a sprite still fit it.
    Returns (K, h·w): row k replaces current mask k.
    """
    dist, index, grid = invariant_assign(new, current, size, rotations, scales)  # (K, K) each
    rows, cols = linear_sum_assignment(dist.double().cpu().numpy())  # new rows[i] -> cols[i]
    order = torch.empty(len(current), dtype=torch.long)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)  # current k <- new order[k]
    order = order.to(new.device)
    version = index[order, torch.arange(len(current), device=new.device)]  # (K,)
    return align_crops(new[order], size, grid[version]).clamp(0, 1)
