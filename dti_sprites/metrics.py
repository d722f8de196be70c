"""Evaluation metrics of DTI-Sprites (docs/method.md §9), as DDP-safe ``torchmetrics.Metric``
classes.

Shapes (B batch, H×W image; label maps may have any trailing shape ``(B, *)`` as long as
prediction and target agree):

- ``ARI(foreground_only)``: ``update(pred (B, H, W) int, target (B, H, W) int)``; adjusted Rand
  index per image, averaged over images; ``compute()`` -> scalar float64 tensor.
  ``ari_per_image(pred, target, foreground_only)`` -> ``(B,)`` float64, NaN for skipped images.
- ``SemanticScores(num_classes, num_clusters)``: ``update(pred (B, H, W) cluster ids,
  target (B, H, W) class ids)``; one dataset-level confusion matrix, Hungarian matching in
  ``compute()`` -> dict of scalar tensors ``global_acc, macc, miou, macc_nobg, miou_nobg``.
- ``ClusteringAccuracy(num_classes, num_clusters)``: ``update(pred (B,), target (B,))``;
  ``compute()`` -> dict ``acc`` (Hungarian) and ``nmi`` (arithmetic normalisation).
- ``ForegroundIoU()``: ``update(pred (B, H, W), target (B, H, W))``, nonzero = foreground;
  ``compute()`` -> scalar tensor, dataset-level IoU.

Every state is a fixed-shape tensor reduced with ``dist_reduce_fx="sum"`` (counts in int64, sums
of scores in float64), so under DDP the states are summed over ranks *before* ``compute()``
matches clusters to classes: the result equals the single-process value on the union of the data.
A metric with no data (nothing updated, no pixel to score) computes NaN. ``SemanticScores`` and
``ClusteringAccuracy`` reject labels outside their range (one host sync per ``update``).

Conventions where the paper is silent (see the class docstrings for details):

- ARI: a degenerate image (one cluster on both sides, or one point per cluster on both sides,
  which includes images with a single pixel) scores 1.0. This is the only case where the ARI
  formula is 0/0; DeepMind's ``adjusted_rand_index`` special-cases "both single cluster" to 1
  (and refuses the one-point-per-cluster case), sklearn returns 1.0 for both. Unlike DeepMind's
  code, "single cluster" is decided *after* dropping the background pixels for ARI-FG. Images
  with no pixel left (no ground-truth foreground under ``foreground_only``) are skipped: not
  counted in the mean (the authors' code would score them 1.0).
- Semantic scores: the background cluster (0) is matched freely, like every other cluster, as in
  the authors' ``SegmentationScores`` (Hungarian over the full matrix).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ARI",
    "ClusteringAccuracy",
    "ForegroundIoU",
    "SemanticScores",
    "ari_per_image",
    "hungarian_match",
]

# Largest dense contingency table (B × P × T cells) built at once; bigger batches are chunked.
_MAX_TABLE_CELLS = 1 << 22


def _check_labels(pred: Tensor, target: Tensor, min_dim: int = 1) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() < min_dim:
        raise ValueError(f"expected at least {min_dim} dimensions, got {tuple(pred.shape)}")
    for name, x in (("pred", pred), ("target", target)):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must hold integer labels, got {x.dtype}")


def _check_range(x: Tensor, upper: int, name: str) -> None:
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= upper):
        raise ValueError(f"{name} labels must lie in [0, {upper}), got [{x.min()}, {x.max()}]")


def _contingency(p: Tensor, t: Tensor, keep: Tensor | None, num_p: int, num_t: int) -> Tensor:
    """Per-image contingency tables from dense ids ``p`` (B, N) < num_p and ``t`` (B, N) < num_t."""
    b = p.shape[0]
    image = torch.arange(b, device=p.device).unsqueeze(1)  # (B, 1)
    cells = b * num_p * num_t
    index = (image * num_p + p) * num_t + t  # (B, N)
    if keep is not None:
        index = torch.where(keep, index, cells)  # dropped pixels go to one extra bin
    counts = torch.bincount(index.flatten(), minlength=cells + 1)[:cells]
    return counts.view(b, num_p, num_t)  # (B, P, T)


def _ari_from_tables(table: Tensor) -> Tensor:
    """ARI (B,) float64 from contingency tables (B, P, T) int64; NaN where the table is empty.

    With ordered pair counts R = Σ n_ij(n_ij-1), A = Σ a_i(a_i-1), C = Σ b_j(b_j-1) and
    N2 = n(n-1): ARI = (R - A·C/N2) / ((A+C)/2 - A·C/N2) = 2(R·N2 - A·C) / ((A+C)·N2 - 2A·C).
    The denominator is zero exactly when both partitions are a single cluster (A = C = N2) or all
    singletons (A = C = 0); those (identical) partitions score 1.0. Pair counts are exact int64;
    the products are float64, exact while 2n⁴ < 2⁵³ (n < 8192 pixels), so that the score is then
    the correctly rounded ARI, bit-equal to sklearn's.
    """
    n = table.sum(dim=(1, 2))  # (B,)
    a = table.sum(dim=2)  # (B, P) predicted cluster sizes
    c = table.sum(dim=1)  # (B, T) ground-truth cluster sizes
    pairs = (table * (table - 1)).sum(dim=(1, 2))  # (B,)
    pairs_a = (a * (a - 1)).sum(dim=1)  # (B,)
    pairs_c = (c * (c - 1)).sum(dim=1)  # (B,)
    pairs_n = n * (n - 1)  # (B,)
    degenerate = ((pairs_a == pairs_n) & (pairs_c == pairs_n)) | ((pairs_a == 0) & (pairs_c == 0))
    r, a2, c2, n2 = pairs.double(), pairs_a.double(), pairs_c.double(), pairs_n.double()
    numerator = 2 * (r * n2 - a2 * c2)  # (B,)
    denominator = (a2 + c2) * n2 - 2 * a2 * c2  # (B,)
    ones = torch.ones_like(numerator)
    ari = torch.where(degenerate, ones, numerator / torch.where(degenerate, ones, denominator))
    return torch.where(n == 0, torch.full_like(ari, float("nan")), ari)


def ari_per_image(pred: Tensor, target: Tensor, foreground_only: bool = False) -> Tensor:
    """Adjusted Rand index of each image, for the metric and for per-image tables.

    Args:
        pred: (B, H, W) (or any (B, *)) integer predicted labels; values are arbitrary.
        target: same shape, integer ground-truth labels; 0 is background.
        foreground_only: drop pixels whose target is 0 (ARI-FG).

    Returns:
        (B,) float64 on the input device: the ARI of each image; 1.0 for degenerate images (see
        the module docstring); NaN for images with no pixel left (skipped by ``ARI``).
    """
    _check_labels(pred, target, min_dim=1)
    b = pred.shape[0]
    pred, target = pred.reshape(b, -1), target.reshape(b, -1)  # (B, N)
    if pred.numel() == 0:
        return torch.full((b,), float("nan"), dtype=torch.float64, device=pred.device)
    keep = target != 0 if foreground_only else None  # (B, N)
    # Dense ids over the whole batch, so arbitrary (sparse, large) labels cost nothing.
    p = torch.unique(pred, return_inverse=True)[1]  # (B, N) in [0, P)
    t = torch.unique(target, return_inverse=True)[1]  # (B, N) in [0, T)
    num_p, num_t = int(p.max()) + 1, int(t.max()) + 1
    chunk = max(1, _MAX_TABLE_CELLS // (num_p * num_t))
    scores = [
        _ari_from_tables(
            _contingency(
                p[i : i + chunk],
                t[i : i + chunk],
                None if keep is None else keep[i : i + chunk],
                num_p,
                num_t,
            )
        )
        for i in range(0, b, chunk)
    ]
    return torch.cat(scores)  # (B,)


class ARI(Metric):
    """Adjusted Rand index per image, averaged over images (ARI, or ARI-FG).

    ``update(pred, target)``: integer label maps (B, H, W) of any integer dtype; labels are
    arbitrary non-negative ints (not necessarily contiguous); target 0 is background.
    ``compute()``: scalar float64 tensor, the mean over scored images.

    Args:
        foreground_only: drop ground-truth background pixels (``target == 0``) before scoring:
            ARI-FG. Images without any foreground pixel are skipped (not counted).

    Degenerate images score 1.0 (module docstring). States: ``score_sum`` (float64) and
    ``num_images`` (int64), both summed across ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    score_sum: Tensor
    num_images: Tensor

    def __init__(self, foreground_only: bool = False) -> None:
        super().__init__()
        self.foreground_only = foreground_only
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        scores = ari_per_image(pred, target, self.foreground_only)  # (B,)
        scored = ~scores.isnan()
        self.score_sum += scores[scored].sum().to(self.score_sum)
        self.num_images += scored.sum().to(self.num_images)

    def compute(self) -> Tensor:
        return self.score_sum / self.num_images


def hungarian_match(confusion: Tensor) -> Tensor:
    """One-to-one matching of clusters (rows) to classes (columns) maximising matched counts.

    Args:
        confusion: (num_clusters, num_classes) counts.

    Returns:
        (num_clusters,) int64 on the same device: the class matched to each cluster, -1 for
        clusters left unmatched (when there are more clusters than classes).
    """
    rows, cols = linear_sum_assignment(confusion.detach().cpu().numpy(), maximize=True)
    match = np.full(confusion.shape[0], -1, dtype=np.int64)
    match[rows] = cols
    return torch.from_numpy(match).to(confusion.device)


class _ConfusionMetric(Metric):
    """A (num_clusters, num_classes) int64 confusion matrix, rows predicted, columns true."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confusion: Tensor

    def __init__(self, num_classes: int, num_clusters: int | None = None) -> None:
        super().__init__()
        if num_classes < 1 or (num_clusters is not None and num_clusters < 1):
            raise ValueError("num_classes and num_clusters must be positive")
        self.num_classes = num_classes
        self.num_clusters = num_classes if num_clusters is None else num_clusters
        shape = (self.num_clusters, self.num_classes)
        self.add_state("confusion", torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulate(self, pred: Tensor, target: Tensor) -> None:
        _check_range(pred, self.num_clusters, "pred")
        _check_range(target, self.num_classes, "target")
        index = pred.reshape(-1).long() * self.num_classes + target.reshape(-1).long()  # (N,)
        counts = torch.bincount(index, minlength=self.num_clusters * self.num_classes)
        self.confusion += counts.view(self.num_clusters, self.num_classes).to(self.confusion)

    def _matched(self) -> tuple[Tensor, Tensor, Tensor]:
        """(true, matched_true, predicted_as) per class, float64 (num_classes,) each."""
        confusion = self.confusion
        match = hungarian_match(confusion)  # (num_clusters,)
        zeros = torch.zeros(self.num_classes, dtype=torch.float64, device=confusion.device)
        matched = match >= 0
        rows = torch.arange(self.num_clusters, device=confusion.device)[matched]
        cols = match[matched]
        tp = zeros.index_add(0, cols, confusion[rows, cols].double())  # (C,)
        predicted_as = zeros.index_add(0, cols, confusion[rows].sum(dim=1).double())  # (C,)
        true = confusion.sum(dim=0).double()  # (C,)
        return true, tp, predicted_as


class SemanticScores(_ConfusionMetric):
    """Semantic segmentation scores after Hungarian matching of sprites to classes.

    ``update(pred, target)``: ``pred`` (B, H, W) integer cluster ids in ``[0, num_clusters)``
    (selected sprite index, 0 = predicted background), ``target`` (B, H, W) integer class ids in
    ``[0, num_classes)`` (0 = background). One dataset-level confusion matrix is accumulated
    (int64, summed across ranks); ``compute()`` matches clusters to classes one-to-one
    (``scipy.optimize.linear_sum_assignment``) on the summed matrix and returns float64 scalars:

    - ``global_acc``: matched pixels / all pixels;
    - ``macc``, ``miou``: mean over classes of TP/true and TP/(true + predicted - TP), all classes
      including background;
    - ``macc_nobg``, ``miou_nobg``: the same per-class values (same matching) averaged over the
      foreground classes 1..num_classes-1 only.

    Choices: the background cluster is matched freely, like any other cluster, as the authors'
    code does (Hungarian over the full matrix; their ``_nobkg`` scores re-match after deleting
    the background row and column, which forgives objects predicted as background: we keep one
    matching instead). Clusters left unmatched (more clusters than classes) count as wrong.
    Means skip only undefined (0/0) values: a class absent from the target has no accuracy and
    is left out of ``macc``; its IoU is 0 when its matched cluster predicted pixels (the union
    is not empty) and undefined, left out of ``miou``, only when it has no predicted pixel
    either. (The authors' ``nan_to_num`` counts every 0/0 as 0, which only differs on subsets
    where some class never occurs.)

    Args:
        num_classes: ground-truth classes including background.
        num_clusters: predicted clusters including the background cluster 0; defaults to
            ``num_classes`` (K sprites + background = classes).
    """

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_labels(pred, target)
        self._accumulate(pred, target)

    def compute(self) -> dict[str, Tensor]:
        true, tp, predicted_as = self._matched()  # (C,) each
        acc = tp / true  # (C,), NaN (0/0) where the class is absent from the target
        iou = tp / (true + predicted_as - tp)  # (C,), NaN (0/0) where the union is empty
        has_acc, has_iou = ~acc.isnan(), ~iou.isnan()  # (C,)
        foreground = torch.ones_like(has_acc)
        foreground[0] = False
        return {
            "global_acc": tp.sum() / true.sum(),
            "macc": acc[has_acc].mean(),
            "miou": iou[has_iou].mean(),
            "macc_nobg": acc[has_acc & foreground].mean(),
            "miou_nobg": iou[has_iou & foreground].mean(),
        }


class ClusteringAccuracy(_ConfusionMetric):
    """Clustering accuracy (Hungarian) and NMI for single-object datasets (GTSRB-8, SVHN).

    ``update(pred, target)``: ``pred`` (B,) cluster ids in ``[0, num_clusters)``, ``target`` (B,)
    class ids in ``[0, num_classes)``. ``compute()`` returns float64 scalars:

    - ``acc``: one-to-one Hungarian-matched accuracy; clusters left unmatched count as wrong
      (the authors' code switches to many-to-one majority voting when the counts differ);
    - ``nmi``: normalised mutual information with the arithmetic mean of the entropies, from
      the same confusion state; equal to sklearn's ``normalized_mutual_info_score`` (1.0 when
      both sides have at most one cluster, 0.0 when the mutual information is 0).

    Args:
        num_classes: ground-truth classes.
        num_clusters: predicted clusters (prototypes); defaults to ``num_classes``.
    """

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_labels(pred, target)
        self._accumulate(pred, target)

    def compute(self) -> dict[str, Tensor]:
        true, tp, _ = self._matched()
        return {"acc": tp.sum() / true.sum(), "nmi": _nmi(self.confusion)}


def _nmi(confusion: Tensor) -> Tensor:
    """NMI (arithmetic normalisation) of a contingency table, as sklearn computes it."""
    counts = confusion.double()
    total = counts.sum()
    rows, cols = counts.sum(dim=1), counts.sum(dim=0)  # (P,), (T,)
    one = torch.ones((), dtype=torch.float64, device=counts.device)
    if float(total) == 0.0:
        return one * float("nan")  # no data
    if int((rows > 0).sum()) == 1 and int((cols > 0).sum()) == 1:
        return one  # no split on either side: a perfect match, as sklearn says
    p_joint = counts / total  # (P, T)
    outer = rows.unsqueeze(1) * cols.unsqueeze(0) / total**2  # (P, T)
    nz = counts > 0
    mi = (p_joint[nz] * (p_joint[nz] / outer[nz]).log()).sum().clamp(min=0)

    def entropy(marginal: Tensor) -> Tensor:
        p = marginal[marginal > 0] / total
        return -(p * p.log()).sum()

    if float(mi) == 0.0:
        return 0.0 * one
    return mi / ((entropy(rows) + entropy(cols)) / 2)


class ForegroundIoU(Metric):
    """Dataset-level intersection-over-union of the foreground (Weizmann Horse).

    ``update(pred, target)``: (B, H, W) bool or integer maps, nonzero = foreground.
    ``compute()``: scalar float64, Σ|pred ∧ target| / Σ|pred ∨ target| over all pixels of all
    images (sums, not a mean of per-image IoUs; foreground is never swapped with background).
    NaN when neither side has any foreground.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    intersection: Tensor
    union: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("intersection", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_labels(pred, target)
        pred, target = pred != 0, target != 0
        self.intersection += (pred & target).sum().to(self.intersection)
        self.union += (pred | target).sum().to(self.union)

    def compute(self) -> Tensor:
        return self.intersection.double() / self.union.double()
