"""dti_sprites.metrics: golden values (sklearn, hand-made), invariances, edge cases, DDP."""

from __future__ import annotations

import itertools
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torchmetrics import Metric

from dti_sprites import metrics as metrics_module
from dti_sprites.metrics import (
    ARI,
    ClusteringAccuracy,
    ForegroundIoU,
    SemanticScores,
    ari_per_image,
    hungarian_match,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def random_label_maps(
    seed: int, shape: tuple[int, ...], values: list[int], dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Label maps drawn from ``values`` (arbitrary, non-contiguous ints)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), shape, generator=generator)
    return torch.tensor(values)[index].to(dtype)


def sklearn_ari(pred: torch.Tensor, target: torch.Tensor, foreground_only: bool) -> list[float]:
    scores = []
    flat_pred, flat_target = pred.flatten(1).numpy(), target.flatten(1).numpy()
    for p, t in zip(flat_pred, flat_target, strict=True):
        if foreground_only:
            p, t = p[t != 0], t[t != 0]
        scores.append(adjusted_rand_score(t, p) if len(t) else math.nan)
    return scores


def from_confusion(confusion: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (pred, target) label vectors whose (cluster × class) confusion matrix is given."""
    counts = torch.tensor(confusion)
    clusters, classes = torch.meshgrid(
        torch.arange(counts.shape[0]), torch.arange(counts.shape[1]), indexing="ij"
    )
    pred = clusters.flatten().repeat_interleave(counts.flatten())
    target = classes.flatten().repeat_interleave(counts.flatten())
    order = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
    return pred[order], target[order]


# ---------------------------------------------------------------- ARI


@pytest.mark.parametrize("foreground_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_ari_matches_sklearn_per_image_and_mean(foreground_only: bool, dtype: torch.dtype) -> None:
    pred = random_label_maps(1, (6, 9, 7), [0, 3, 7, 200], dtype)
    target = random_label_maps(2, (6, 9, 7), [0, 5, 9], dtype)
    target[3] = torch.where(pred[3] == 7, 9, 0).to(dtype)  # a good image, ARI well above 0
    expected = sklearn_ari(pred, target, foreground_only)

    scores = ari_per_image(pred, target, foreground_only)
    assert scores.dtype == torch.float64 and scores.shape == (6,)
    np.testing.assert_array_equal(scores.numpy(), expected)  # bit-equal for small images
    assert len(set(np.round(expected, 6))) == 6  # the images really differ

    metric = ARI(foreground_only=foreground_only)
    metric.update(pred[:4], target[:4])
    metric.update(pred[4:], target[4:])  # averaged over images, not over batches
    value = metric.compute()
    assert value.shape == () and value.dtype == torch.float64
    assert value.item() == pytest.approx(np.mean(expected), abs=1e-12)


def test_ari_hand_value() -> None:
    # sklearn's documented example: a labelling worse than chance.
    pred = torch.tensor([[[0, 1], [0, 1]]])
    target = torch.tensor([[[0, 0], [1, 1]]])
    assert ari_per_image(pred, target).tolist() == [-0.5]  # exact: products are exact ints


def test_ari_fg_drops_background_pixels() -> None:
    target = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    pred = torch.tensor([[[5, 6, 3, 3, 4, 4]]])  # background split arbitrarily
    assert ari_per_image(pred, target, foreground_only=True).item() == 1.0
    assert ari_per_image(pred, target, foreground_only=False).item() < 1.0


@pytest.mark.parametrize("foreground_only", [False, True])
def test_ari_is_invariant_to_label_permutations(foreground_only: bool) -> None:
    pred = random_label_maps(3, (5, 8, 8), [0, 1, 2, 3, 4])
    target = random_label_maps(4, (5, 8, 8), [0, 1, 2, 3])
    reference = ari_per_image(pred, target, foreground_only)
    pred_map = torch.tensor([41, 7, 1000, 3, 12])  # bijection onto sparse labels
    target_map = torch.tensor([0, 17, 2, 99])  # keeps 0 = background (it has a meaning)
    permuted = ari_per_image(pred_map[pred], target_map[target], foreground_only)
    torch.testing.assert_close(permuted, reference, rtol=0, atol=1e-12)
    swapped = ari_per_image(target, pred, foreground_only=False)  # ARI is symmetric
    if not foreground_only:
        torch.testing.assert_close(swapped, reference, rtol=0, atol=1e-12)


def test_ari_degenerate_cases() -> None:
    one = torch.ones(1, 3, 3, dtype=torch.int64)
    # One cluster on both sides (DeepMind's special case): 1.0, whatever the labels.
    assert ari_per_image(one * 4, one * 9).tolist() == [1.0]
    # A single pixel: 1.0.
    assert ari_per_image(torch.tensor([[[3]]]), torch.tensor([[[8]]])).tolist() == [1.0]
    # One pixel per cluster on both sides: identical partitions, 1.0 like sklearn.
    singletons = torch.arange(9).view(1, 3, 3)
    assert ari_per_image(singletons, singletons.flip(-1) + 5).tolist() == [1.0]
    assert adjusted_rand_score(singletons.flatten(), singletons.flatten()) == 1.0
    # One side single cluster, the other split: 0.0 (like sklearn), not degenerate.
    assert ari_per_image(singletons, one).tolist() == [0.0]
    assert ari_per_image(one, singletons).tolist() == [0.0]
    # ARI-FG: single cluster on both sides *after* dropping the background, although the
    # prediction has other labels on background pixels.
    target = torch.tensor([[[0, 0, 2, 2]]])
    pred = torch.tensor([[[1, 3, 5, 5]]])
    assert ari_per_image(pred, target, foreground_only=True).tolist() == [1.0]


def test_ari_fg_skips_images_without_foreground() -> None:
    target = torch.tensor([[[0, 0], [0, 0]], [[0, 1], [1, 2]]])
    pred = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [1, 1]]])
    scores = ari_per_image(pred, target, foreground_only=True)
    assert math.isnan(scores[0]) and scores[1].item() == pytest.approx(0.0, abs=1e-12)
    metric = ARI(foreground_only=True)
    metric.update(pred, target)
    assert metric.num_images.item() == 1
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-12)
    empty = ARI(foreground_only=True)
    empty.update(pred[:1], target[:1])
    assert torch.isnan(empty.compute())  # nothing scored: undefined


def test_ari_chunked_tables_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    pred = random_label_maps(5, (7, 6, 6), list(range(6)))
    target = random_label_maps(6, (7, 6, 6), list(range(4)))
    reference = ari_per_image(pred, target, foreground_only=True)
    monkeypatch.setattr(metrics_module, "_MAX_TABLE_CELLS", 50)  # 2 images per chunk
    torch.testing.assert_close(ari_per_image(pred, target, True), reference, rtol=0, atol=0)


def test_ari_rejects_bad_input() -> None:
    labels = torch.zeros(2, 3, 3, dtype=torch.int64)
    with pytest.raises(TypeError):
        ari_per_image(labels.float(), labels)
    with pytest.raises(ValueError):
        ari_per_image(labels, labels[:, :2])


# ---------------------------------------------------------------- semantic scores


def test_semantic_scores_hand_made_confusion() -> None:
    # rows: clusters (0 = predicted background, 3 sprites); columns: classes (bg, A, B).
    confusion = [
        [50, 2, 0],
        [3, 0, 20],
        [0, 10, 1],
        [5, 4, 0],  # left unmatched (4 clusters, 3 classes): its 9 pixels are wrong
    ]
    pred, target = from_confusion(confusion)
    metric = SemanticScores(num_classes=3, num_clusters=4)
    metric.update(pred[:40].view(5, 8), target[:40].view(5, 8))  # (B, H, W)-like and flat
    metric.update(pred[40:], target[40:])
    assert metric.confusion.tolist() == confusion
    assert hungarian_match(metric.confusion).tolist() == [0, 2, 1, -1]
    scores = metric.compute()
    acc = [50 / 58, 10 / 16, 20 / 21]  # TP / true
    iou = [50 / (58 + 52 - 50), 10 / (16 + 11 - 10), 20 / (21 + 23 - 20)]
    expected = {
        "global_acc": 80 / 95,
        "macc": sum(acc) / 3,
        "miou": sum(iou) / 3,
        "macc_nobg": (acc[1] + acc[2]) / 2,
        "miou_nobg": (iou[1] + iou[2]) / 2,
    }
    assert set(scores) == set(expected)
    for key, value in expected.items():
        assert scores[key].dtype == torch.float64 and scores[key].shape == ()
        assert scores[key].item() == pytest.approx(value, abs=1e-12), key


def test_semantic_scores_match_background_freely_and_jointly() -> None:
    # The predicted-background cluster 0 mostly covers class A: matched freely, not pinned.
    # Cluster 2 prefers A by argmax, but the joint (Hungarian) optimum gives it B.
    confusion = [
        [2, 30, 0],
        [40, 1, 0],
        [0, 10, 9],
        [0, 8, 0],
    ]
    pred, target = from_confusion(confusion)
    metric = SemanticScores(num_classes=3, num_clusters=4)
    metric.update(pred, target)
    assert hungarian_match(metric.confusion).tolist() == [1, 0, 2, -1]
    assert metric.compute()["global_acc"].item() == pytest.approx(79 / 100, abs=1e-12)


def test_semantic_scores_more_classes_than_clusters() -> None:
    metric = SemanticScores(num_classes=3, num_clusters=2)
    metric.update(*from_confusion([[10, 0, 0], [0, 5, 3]]))
    scores = metric.compute()  # class B is never predicted: TP 0, acc 0, IoU 0
    assert scores["global_acc"].item() == pytest.approx(15 / 18)
    assert scores["macc"].item() == pytest.approx((1 + 1 + 0) / 3)
    assert scores["miou"].item() == pytest.approx((1 + 5 / 8 + 0) / 3)
    assert scores["miou_nobg"].item() == pytest.approx((5 / 8 + 0) / 2)


def test_semantic_scores_class_absent_from_the_target_with_predicted_pixels_has_iou_0() -> None:
    # Class B never occurs in the target, but cluster 2, matched to it, predicts 2 pixels: its
    # union is not empty, so its IoU is 0/2 = 0 and counts; its accuracy (0/0) is undefined.
    absent = SemanticScores(num_classes=3)
    absent.update(*from_confusion([[10, 0, 0], [0, 5, 0], [2, 0, 0]]))
    assert hungarian_match(absent.confusion).tolist() == [0, 1, 2]
    scores = absent.compute()
    assert scores["macc"].item() == pytest.approx((10 / 12 + 1) / 2)
    assert scores["miou"].item() == pytest.approx((10 / 12 + 1 + 0) / 3)
    assert scores["macc_nobg"].item() == pytest.approx(1.0)
    assert scores["miou_nobg"].item() == pytest.approx((1 + 0) / 2)


def test_semantic_scores_class_absent_from_target_and_prediction_is_left_out() -> None:
    # Class B occurs nowhere and its cluster 2 predicts nothing: IoU 0/0, left out of the means.
    absent = SemanticScores(num_classes=3)
    absent.update(*from_confusion([[10, 0, 0], [2, 5, 0], [0, 0, 0]]))
    assert hungarian_match(absent.confusion).tolist() == [0, 1, 2]
    scores = absent.compute()
    iou = [10 / (12 + 10 - 10), 5 / (5 + 7 - 5)]  # background, A
    assert scores["macc"].item() == pytest.approx((10 / 12 + 1) / 2)
    assert scores["miou"].item() == pytest.approx(sum(iou) / 2)
    assert scores["macc_nobg"].item() == pytest.approx(1.0)
    assert scores["miou_nobg"].item() == pytest.approx(iou[1])


def test_semantic_scores_reject_out_of_range_labels() -> None:
    metric = SemanticScores(num_classes=3, num_clusters=4)
    with pytest.raises(ValueError):
        metric.update(torch.tensor([[4]]), torch.tensor([[0]]))
    with pytest.raises(ValueError):
        metric.update(torch.tensor([[0]]), torch.tensor([[3]]))


# ---------------------------------------------------------------- clustering accuracy


def test_clustering_accuracy_hand_made_permutation() -> None:
    target = torch.arange(5).repeat_interleave(20)  # 5 classes × 20 samples
    permutation = torch.tensor([3, 0, 4, 1, 2])
    pred = permutation[target]
    wrong = torch.tensor([0, 1, 25, 47, 60, 81, 99])
    pred[wrong] = (pred[wrong] + 1) % 5  # 7 errors
    metric = ClusteringAccuracy(num_classes=5)
    metric.update(pred[:30], target[:30])
    metric.update(pred[30:], target[30:])
    scores = metric.compute()
    assert scores["acc"].item() == pytest.approx(93 / 100, abs=1e-12)
    assert scores["nmi"].item() == pytest.approx(
        normalized_mutual_info_score(target.numpy(), pred.numpy()), abs=1e-12
    )


def test_clustering_accuracy_brute_force_and_sklearn_nmi() -> None:
    target = random_label_maps(7, (200,), [0, 1, 2])
    pred = torch.where(torch.rand(200, generator=torch.Generator().manual_seed(8)) < 0.6, target, 3)
    pred = torch.where(pred == 3, random_label_maps(9, (200,), [0, 1, 2, 3]), pred)
    metric = ClusteringAccuracy(num_classes=3, num_clusters=4)
    metric.update(pred, target)
    scores = metric.compute()
    # Best injective map of the 3 classes to 4 clusters; the fourth cluster is always wrong.
    best = max(
        sum(int(((pred == cluster) & (target == c)).sum()) for c, cluster in enumerate(clusters))
        for clusters in itertools.permutations(range(4), 3)
    )
    assert scores["acc"].item() == pytest.approx(best / 200, abs=1e-12)
    expected_nmi = normalized_mutual_info_score(target.numpy(), pred.numpy())
    assert 0.1 < expected_nmi < 0.9
    assert scores["nmi"].item() == pytest.approx(expected_nmi, abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "target"),
    [
        ([2, 2, 2], [1, 1, 1]),
        ([0, 1, 2], [1, 1, 1]),
        ([1, 1, 1], [0, 1, 0]),
        ([0, 0, 1], [1, 1, 0]),
    ],
)
def test_nmi_edge_cases_match_sklearn(pred: list[int], target: list[int]) -> None:
    metric = ClusteringAccuracy(num_classes=2, num_clusters=3)
    metric.update(torch.tensor(pred), torch.tensor(target))
    assert metric.compute()["nmi"].item() == normalized_mutual_info_score(target, pred)


# ---------------------------------------------------------------- foreground IoU


def test_foreground_iou_is_dataset_level() -> None:
    metric = ForegroundIoU()
    # image 0: IoU 1/1; image 1: IoU 1/4 (integer labels, nonzero = foreground).
    pred = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]])
    target = torch.tensor([[[2, 0], [0, 0]], [[3, 0], [3, 3]]])
    metric.update(pred, target)
    assert metric.compute().item() == pytest.approx(2 / 5)  # not (1 + 1/4) / 2
    metric.update(torch.tensor([[[True, False]]]), torch.tensor([[[True, True]]]))
    assert (metric.intersection.item(), metric.union.item()) == (3, 7)
    assert metric.compute().item() == pytest.approx(3 / 7)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(ForegroundIoU().compute())  # no foreground anywhere: undefined


# ---------------------------------------------------------------- DDP


def make_fixed_set() -> dict[str, torch.Tensor]:
    """A fixed evaluation set whose two halves, alone, match clusters to classes differently."""
    target = random_label_maps(10, (8, 6, 6), [0, 1, 2, 3])
    noise = random_label_maps(11, (8, 6, 6), [0, 1, 2, 3, 4])
    uniform = torch.rand(8, 6, 6, generator=torch.Generator().manual_seed(12))
    shift = torch.tensor([1] * 4 + [2] * 4).view(8, 1, 1)  # cluster = class + shift, per half
    keep = uniform < torch.tensor([0.8] * 4 + [0.5] * 4).view(8, 1, 1)
    pred = torch.where(keep, (target + shift) % 5, noise)  # cluster ids in [0, 5)
    labels = random_label_maps(13, (30,), [0, 1, 2])
    shift = torch.tensor([0] * 15 + [1] * 15)
    clusters = torch.where(torch.arange(30) % 5 == 0, 3, (labels + shift) % 4)
    return {"pred": pred, "target": target, "labels": labels, "clusters": clusters}


def make_metrics() -> dict[str, Metric]:
    return {
        "ari": ARI(),
        "ari_fg": ARI(foreground_only=True),
        "semantic": SemanticScores(num_classes=4, num_clusters=5),
        "clustering": ClusteringAccuracy(num_classes=3, num_clusters=4),
        "fg_iou": ForegroundIoU(),
    }


def evaluate(data: dict[str, torch.Tensor], part: slice, part_labels: slice) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, metric in make_metrics().items():
        if name == "clustering":
            metric.update(data["clusters"][part_labels], data["labels"][part_labels])
        else:
            metric.update(data["pred"][part], data["target"][part])
        value = metric.compute()
        items = value.items() if isinstance(value, dict) else [("", value)]
        results.update({f"{name}/{key}": float(v) for key, v in items})
    return results


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        data = make_fixed_set()
        results = evaluate(data, slice(4 * rank, 4 * rank + 4), slice(15 * rank, 15 * rank + 15))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_equal_single_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_fixed_set()
    single = evaluate(data, slice(None), slice(None))

    # Each half alone matches clusters to classes differently from the whole set: matching
    # per rank before summing would be caught.
    def matchings(part: slice, part_labels: slice) -> tuple[list[int], list[int]]:
        semantic = SemanticScores(num_classes=4, num_clusters=5)
        semantic.update(data["pred"][part], data["target"][part])
        clustering = ClusteringAccuracy(num_classes=3, num_clusters=4)
        clustering.update(data["clusters"][part_labels], data["labels"][part_labels])
        return (
            hungarian_match(semantic.confusion).tolist(),
            hungarian_match(clustering.confusion).tolist(),
        )

    whole = matchings(slice(None), slice(None))
    for rank in (0, 1):
        half = matchings(slice(4 * rank, 4 * rank + 4), slice(15 * rank, 15 * rank + 15))
        assert half[1] != whole[1]
        assert half[0] != whole[0] or rank == 0
    # Children unpickle ddp_worker by module name: make the repository root importable there.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        assert synced.keys() == single.keys()
        for key, value in single.items():
            assert synced[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (rank, key)
