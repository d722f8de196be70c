"""Seeding for shapes at any rotation and size: normalised crops, rotation-invariant k-means."""

import math
from types import SimpleNamespace

import pytest
import torch

from dti_sprites.seeding import (
    align_crops,
    invariant_assign,
    invariant_kmeans,
    invariant_refit,
    isolated_layers,
    kmeans_masks,
    match_masks,
    normalise_crops,
    warp_crops,
    whole_crops,
)

SIZE = (12, 12)
L_SHAPE = torch.zeros(SIZE)
L_SHAPE[2:9, 4:6] = 1  # a vertical bar with a foot to the right: no rotational symmetry
L_SHAPE[7:9, 6:9] = 1
BAR = torch.zeros(SIZE)
BAR[5:7, 2:10] = 1  # a horizontal bar: 2-fold symmetric


def turns(shape: torch.Tensor) -> torch.Tensor:
    """The shape at the four right angles, exact. (4, h·w)"""
    return torch.stack([torch.rot90(shape, k, (0, 1)).flatten() for k in range(4)])


def quarter_grid(angles_turns: list[int]) -> torch.Tensor:
    return torch.tensor([[k * math.pi / 2, 1.0] for k in angles_turns])


def test_warp_crops_turns_the_content_by_the_angle_and_shrinks_it_by_the_scale():
    crops = L_SHAPE.flatten()[None]
    quarter = warp_crops(crops, SIZE, torch.tensor([math.pi / 2]), torch.tensor([1.0]))
    torch.testing.assert_close(quarter.view(SIZE), torch.rot90(L_SHAPE, 1, (0, 1)))
    # Scale 2: the content at distance 2d from the centre shows at distance d.
    dot = torch.zeros(SIZE)
    dot[1:3, 1:3] = 1  # a 2×2 block centred 4 px up and left of the centre (5.5, 5.5)
    half = warp_crops(dot.flatten()[None], SIZE, torch.zeros(1), torch.tensor([2.0])).view(SIZE)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    mass = half.sum()
    assert float((half * ys).sum() / mass) == pytest.approx(5.5 - 2, abs=1e-4)
    assert float((half * xs).sum() / mass) == pytest.approx(5.5 - 2, abs=1e-4)


def test_normalised_crops_of_one_shape_at_two_sizes_and_places_agree():
    big = torch.zeros(24, 24)
    big[4:12, 6:14] = 1  # an 8×8 square, off centre
    small = torch.zeros(24, 24)
    small[13:17, 3:7] = 1  # a 4×4 square elsewhere
    out, radius = normalise_crops(torch.stack([big.flatten(), small.flatten()]), (24, 24))
    # radius of gyration of an a×a block of pixels: sqrt((a² − 1) / 6); the median of two is
    # the lower (torch.median)
    assert radius == pytest.approx(math.sqrt(15 / 6), rel=1e-5)
    # both become the same square at the canvas centre (bilinear edges differ a little)
    assert (out[0] - out[1]).abs().sum() < 0.08 * out[0].sum()
    for crop in out.view(2, 24, 24):
        ys, xs = torch.nonzero(crop > 0.5, as_tuple=True)
        assert float(ys.float().mean()) == pytest.approx(11.5, abs=0.3)
        assert float(xs.float().mean()) == pytest.approx(11.5, abs=0.3)


def test_invariant_assign_finds_the_rotation_and_align_crops_undoes_it():
    crops = turns(L_SHAPE)  # the L at 0, 90, 180, 270 degrees
    dist, index, grid = invariant_assign(crops, L_SHAPE.flatten()[None], SIZE, rotations=4)
    assert grid.shape == (4, 2)
    assert index[:, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(dist, torch.zeros(4, 1), atol=1e-6, rtol=0)
    aligned = align_crops(crops, SIZE, grid[index[:, 0]])
    torch.testing.assert_close(aligned, L_SHAPE.flatten().expand(4, -1), atol=1e-5, rtol=0)


def test_invariant_kmeans_clusters_shapes_where_plain_kmeans_clusters_rotations():
    crops = torch.cat([turns(L_SHAPE).repeat(3, 1), turns(BAR).repeat(3, 1)])  # (24, 144)
    shape = torch.tensor([0] * 12 + [1] * 12)
    centres, cluster, aligned = invariant_kmeans(crops, 2, SIZE, rotations=4, seed=0)
    # one cluster per shape, whatever the rotation
    assert len(set(cluster[shape == 0].tolist())) == 1
    assert len(set(cluster[shape == 1].tolist())) == 1
    assert cluster[0] != cluster[12]
    # each centre is its shape at one of the right angles, exactly, and every crop aligns to it
    for k, shape_map in ((int(cluster[0]), L_SHAPE), (int(cluster[12]), BAR)):
        assert min(float((centres[k] - t).abs().max()) for t in turns(shape_map)) < 1e-5
        torch.testing.assert_close(
            aligned[cluster == k], centres[k].expand(12, -1), atol=1e-5, rtol=0
        )
    # plain k-means over the same crops does not: some cluster holds both shapes
    plain = torch.cdist(crops, kmeans_masks(crops, 2, seed=0)).argmin(1)
    assert set(plain[shape == 0].tolist()) & set(plain[shape == 1].tolist())


def test_invariant_kmeans_needs_a_crop_per_centre():
    with pytest.raises(ValueError, match="1 layer crops for 2 sprites"):
        invariant_kmeans(L_SHAPE.flatten()[None], 2, SIZE, rotations=4)


def test_invariant_refit_averages_crops_turned_back_into_the_masks_frame():
    masks = torch.stack([L_SHAPE.flatten(), BAR.flatten()])
    noisy_l = L_SHAPE.clone()
    noisy_l[0, 0] = 1  # one stray pixel: the refit mean shows it at a quarter of its weight
    crops = torch.cat([turns(noisy_l), turns(BAR)])
    choices = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    means, counts, aligned, label = invariant_refit(crops, choices, masks, SIZE, rotations=4)
    assert counts.tolist() == [4, 4]
    torch.testing.assert_close(means[0].view(SIZE), noisy_l, atol=1e-5, rtol=0)
    torch.testing.assert_close(means[1].view(SIZE), BAR, atol=1e-5, rtol=0)
    assert aligned.shape == crops.shape
    assert torch.equal(label, choices)  # the layers' choices, as given
    # a plain mean of the same crops is a blur of four rotations, not the L
    assert float((crops[:4].mean(0).view(SIZE) - L_SHAPE).abs().max()) > 0.5


def test_a_nearest_refit_keeps_the_shapes_whatever_the_layers_chose():
    """Choices unrelated to the shapes (a network that has not learned the rotations): the
    refit by choice averages L's and bars into one blur; by nearest mask it keeps both."""
    masks = torch.stack([L_SHAPE.flatten(), BAR.flatten()])
    crops = torch.cat([turns(L_SHAPE), turns(BAR)])  # (8, h·w), each shape at 4 turns
    choices = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # half of each shape to each sprite
    mixed, _, _, _ = invariant_refit(crops, choices, masks, SIZE, rotations=4)
    assert float((mixed[0].view(SIZE) - L_SHAPE).abs().max()) > 0.4
    means, counts, _, label = invariant_refit(crops, None, masks, SIZE, rotations=4)
    assert label.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and counts.tolist() == [4, 4]
    torch.testing.assert_close(means[0].view(SIZE), L_SHAPE, atol=1e-5, rtol=0)
    torch.testing.assert_close(means[1].view(SIZE), BAR, atol=1e-5, rtol=0)


def test_whole_crops_keep_one_piece_inside_the_canvas():
    one = L_SHAPE.clone()
    two = L_SHAPE.clone()
    two[1:4, 9:11] = 1  # a second piece of 6 pixels, away from the first (20)
    cut = torch.zeros(SIZE)
    cut[0:4, 3:6] = 1  # touches the top border: the canvas cuts the object
    keep = whole_crops(torch.stack([one, two, cut, torch.zeros(SIZE)]).flatten(1), SIZE)
    assert keep.tolist() == [True, False, False, False]
    # a small stray piece is allowed up to (1 − min_share) of the pixels
    stray = L_SHAPE.clone()
    stray[1, 10] = 1
    assert whole_crops(stray.flatten()[None], SIZE, min_share=0.9).tolist() == [True]
    assert whole_crops(stray.flatten()[None], SIZE, min_share=1.0).tolist() == [False]


def test_isolated_layers_are_those_whose_surroundings_are_background():
    # Two layers on a black background: layer 0 a square alone, layer 1 a square touching a
    # third object that no layer explains (its pixels are not background).
    image = torch.zeros(1, 3, 16, 16)
    image[0, :, 2:5, 2:5] = 1  # object A
    image[0, :, 9:12, 9:12] = 1  # object B
    image[0, :, 9:12, 12:14] = 0.5  # object C, right next to B
    support = torch.zeros(1, 2, 16, 16)
    support[0, 0, 2:5, 2:5] = 1
    support[0, 1, 9:12, 9:12] = 1
    out = SimpleNamespace(background=torch.zeros(1, 3, 16, 16))
    assert isolated_layers(support, out, image).tolist() == [[True, False]]
    # a layer with no support is not an isolated object
    support[0, 1] = 0
    assert isolated_layers(support, out, image).tolist() == [[True, False]]


def test_match_masks_puts_each_new_mask_in_the_place_and_frame_of_its_match():
    """New masks found in another order and at other turns replace the current ones they
    match, turned into their frames: sprite k stays the same shape, at the same angle."""
    current = torch.stack([L_SHAPE.flatten(), BAR.flatten()])
    new = torch.stack(  # the bar first, then the L a quarter turn round
        [torch.rot90(BAR, 1).flatten(), torch.rot90(L_SHAPE, 1).flatten()]
    )
    matched = match_masks(new, current, SIZE, rotations=4)
    torch.testing.assert_close(matched[0].view(SIZE), L_SHAPE, atol=1e-5, rtol=0)
    torch.testing.assert_close(matched[1].view(SIZE), BAR, atol=1e-5, rtol=0)
