"""Sprite seeding: layer supports through the inverse warp, k-means and closed-form refits."""

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dti_sprites.callbacks import SpriteFreeze, SpriteSeeding
from dti_sprites.datamodules.base import DTIDataModule
from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.seeding import (
    centre_crops,
    kmeans_masks,
    layer_crops,
    refit_masks,
    split_merge,
)

# 20×20 images, a 10×10 canvas: at the initial placement (scale 2, centred) one canvas pixel is
# one image pixel and the canvas covers image pixels 5..14 in both axes.
MODEL = dict(
    image_size=20,
    n_sprites=3,
    n_layers=2,
    n_backgrounds=0,
    sprite_size=10,
    mask_std=3,
    layer_transforms=["color", "position"],
    occlusion="fixed",
)
PIECE = torch.zeros(10, 10)
PIECE[2:8, 3:5] = 1  # an L: a vertical bar and a foot
PIECE[6:8, 5:8] = 1


def opaque_model() -> DTISprites:
    """At init, with opaque masks: the front layer covers the whole canvas area."""
    torch.manual_seed(0)
    model = DTISprites(**MODEL)
    with torch.no_grad():
        model.sprites.mask.fill_(1.0)
    return model


def scenes(n: int) -> torch.Tensor:
    """(n, 3, 20, 20): the piece in grey 0.9 (the sprites' colour) at the canvas area, on black."""
    images = torch.zeros(n, 3, 20, 20)
    images[:, :, 5:15, 5:15] = 0.9 * PIECE
    return images


def test_layer_crops_of_a_placed_piece_are_the_piece():
    crops, choices = layer_crops(opaque_model(), scenes(4))
    # The front layer takes the piece (the back one keeps no pixel and is dropped).
    assert crops.shape == (4, 100)
    torch.testing.assert_close(crops, PIECE.flatten().expand(4, -1))
    assert ((choices >= 0) & (choices < 3)).all()


def test_background_tolerance_keeps_dim_piece_pixels():
    images = scenes(2)
    images[:, :, 12:13, 8:10] = 0.3  # a dim edge of the foot: black fits it better than grey 0.9
    dim = torch.zeros(10, 10, dtype=torch.bool)
    dim[7, 3:5] = True  # the same pixels in the canvas
    strict, _ = layer_crops(opaque_model(), images)
    assert (strict[:, dim.flatten()] == 0).all()  # lost without a tolerance
    torch.testing.assert_close(
        strict[:, ~dim.flatten()], PIECE.flatten()[~dim.flatten()].expand(2, -1)
    )
    tolerant, _ = layer_crops(opaque_model(), images, background_tolerance=0.05)
    torch.testing.assert_close(tolerant, PIECE.flatten().expand(2, -1))  # 3·0.3² = 0.27 > 0.05


def test_seeding_from_one_repeated_piece_gives_that_piece():
    crops, _ = layer_crops(opaque_model(), scenes(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means warns that identical points leave clusters empty
        masks = kmeans_masks(crops, k=3)
    torch.testing.assert_close(masks, PIECE.flatten().expand(3, -1))


def test_kmeans_separates_two_shapes_and_needs_enough_crops():
    other = torch.zeros(10, 10)
    other[4:6, 1:9] = 1  # a horizontal bar
    crops = torch.cat([PIECE.flatten().expand(5, -1), other.flatten().expand(5, -1)])
    masks = kmeans_masks(crops, k=2)
    assert sorted(m.sum().item() for m in masks) == sorted([PIECE.sum().item(), other.sum().item()])
    with pytest.raises(ValueError, match="3 layer crops for 4 sprites"):
        kmeans_masks(crops[:3], k=4)


def test_refit_is_the_mean_crop_of_the_layers_that_chose_each_sprite():
    crops = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    means, counts = refit_masks(crops, torch.tensor([2, 2, 0]), k=3)
    torch.testing.assert_close(means, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]))
    assert counts.tolist() == [1, 0, 2]


class PieceData(DTIDataModule):
    """Training batches of the placed piece."""

    image_size = (20, 20)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"image": x} for x in scenes(16)], batch_size=4)


def train(
    tmp_path,
    model: DTISprites,
    callbacks: list[L.Callback],
    steps: int,
    data: DTIDataModule | None = None,
    lr: float = 1e-9,
) -> None:
    """``steps`` training steps on ``data`` (default: the placed piece) at ``lr`` (default
    negligible: only callbacks act). A SpriteSeeding without a SpriteFreeze gets one until its
    seeding, listed after it (the freeze's one owner)."""
    seedings = [c for c in callbacks if isinstance(c, SpriteSeeding)]
    if seedings and not any(isinstance(c, SpriteFreeze) for c in callbacks):
        i = callbacks.index(seedings[0]) + 1
        callbacks = [*callbacks[:i], SpriteFreeze(steps=seedings[0].at_step), *callbacks[i:]]
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DTISpritesModule(model, lr=lr), data or PieceData())


def test_callback_freezes_until_it_seeds_then_refits(tmp_path):
    model = opaque_model()
    seeding = SpriteSeeding(at_step=3, collect_steps=2, refit_every=2, min_count=1, centre=False)
    assert [seeding.next_event(s) for s in (0, 3, 4, 5, 6)] == [3, 3, 5, 5, 7]
    frozen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            frozen.append(bool(pl_module.model.sprites_frozen))

    train(tmp_path, model, [seeding, SpriteFreeze(steps=3), Watch()], steps=5)
    assert frozen == [True, True, True, False, False]
    assert [(e["step"], e["kind"]) for e in seeding.events] == [(3, "seed"), (5, "refit")]
    assert seeding.events[0]["crops"] == 8  # 2 batches of 4 images, one layer each
    masks = model.sprites.mask.detach().flatten(1)
    torch.testing.assert_close(masks, PIECE.flatten().expand(3, -1), atol=1e-6, rtol=0)
    assert seeding.state_dict()["crops"] == []


def test_a_seeding_without_enough_crops_keeps_the_masks(tmp_path):
    """No layer has min_pixels pixels (the image has 400): no crop to cluster, so the seeding
    and the refit keep the masks and say so in their events, instead of failing."""
    model = opaque_model()
    before = model.sprites.mask.detach().clone()
    seeding = SpriteSeeding(at_step=3, collect_steps=2, refit_every=2, min_pixels=401)
    train(tmp_path, model, [seeding], steps=5)
    assert [(e["step"], e["kind"], e["crops"]) for e in seeding.events] == [
        (3, "seed", 0),
        (5, "refit", 0),
    ]
    assert all(e["skipped"] for e in seeding.events)
    assert torch.equal(model.sprites.mask.detach(), before)


def test_held_masks_keep_the_seeded_values_then_learn(tmp_path):
    """hold_masks=2 after a seeding at step 1: steps 2 and 3 leave the masks as seeded (the
    rest of the model learns), step 4 updates them."""
    model = opaque_model()
    seeding = SpriteSeeding(at_step=1, collect_steps=1, min_count=1, centre=False)
    freeze = SpriteFreeze(steps=1, hold_masks=2)  # the masks held for 2 steps after step 1
    masks, appearances = [], []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks.append(pl_module.model.sprites.mask.detach().clone())
            appearances.append(pl_module.model.sprites.appearance.detach().clone())

    train(tmp_path, model, [seeding, freeze, Watch()], steps=4, lr=1e-2)
    assert seeding.events[0]["step"] == 1 and masks[0].min() == 0  # seeded (was all ones)
    assert torch.equal(masks[1], masks[0]) and torch.equal(masks[2], masks[0])  # steps 2, 3: held
    assert not torch.equal(masks[3], masks[2])  # step 4: gradient descent again
    assert not torch.equal(appearances[1], appearances[0])  # the rest learns during the hold


def test_reseeding_runs_kmeans_again_at_the_listed_refit_steps(tmp_path):
    model = opaque_model()
    seeding = SpriteSeeding(
        at_step=2, collect_steps=1, refit_every=1, min_count=1, centre=False, reseed_at=[3]
    )
    train(tmp_path, model, [seeding], steps=4)
    kinds = [(e["step"], e["kind"]) for e in seeding.events]
    assert kinds == [(2, "seed"), (3, "reseed"), (4, "refit")]
    masks = model.sprites.mask.detach().flatten(1)
    torch.testing.assert_close(masks, PIECE.flatten().expand(3, -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="reseed_at: step 4"):
        SpriteSeeding(at_step=2, refit_every=3, collect_steps=1, reseed_at=[4])
    with pytest.raises(ValueError, match="reseed_at: step 5"):
        SpriteSeeding(at_step=2, refit_every=3, collect_steps=1, refit_until=4, reseed_at=[5])


def test_collect_window_must_fit_between_refits():
    with pytest.raises(ValueError, match="collect_steps"):
        SpriteSeeding(at_step=10, collect_steps=20, refit_every=5)


def test_centre_crops_moves_the_centre_of_mass_to_the_canvas_centre():
    crop = torch.zeros(2, 9, 9)
    crop[0, 0:2, 0:3] = 1  # top-left 2×3 block: centre of mass (0.5, 1)
    crop[1, 3:6, 3:6] = 1  # already centred (4, 4)
    centred = centre_crops(crop.flatten(1), (9, 9)).view(2, 9, 9)
    expected = torch.zeros(9, 9)
    expected[4:6, 3:6] = 1  # shifted by (round(3.5), 3) = (4, 3) rows, columns
    torch.testing.assert_close(centred[0], expected)
    torch.testing.assert_close(centred[1], crop[1])


def test_centre_crops_shifts_in_zeros_not_the_other_side():
    crop = torch.zeros(1, 5, 5)
    crop[0, :, 4] = 1  # the last column: centre of mass (2, 4), shifted 2 columns left
    centred = centre_crops(crop.flatten(1), (5, 5)).view(5, 5)
    assert centred[:, 2].tolist() == [1.0] * 5
    assert centred.sum() == 5  # nothing wrapped around


def three_shapes() -> tuple[torch.Tensor, torch.Tensor]:
    """30 noisy crops of each of three disjoint 4-pixel shapes (90, 16), and the shapes (3, 16)."""
    shapes = torch.zeros(3, 16)
    for i in range(3):
        shapes[i, 4 * i : 4 * i + 4] = 1
    noise = 0.01 * torch.randn(90, 16, generator=torch.Generator().manual_seed(0))
    return shapes.repeat_interleave(30, 0) + noise, shapes


def test_split_merge_splits_a_mixture_and_frees_a_duplicate():
    crops, shapes = three_shapes()
    # A Lloyd fixed point: one centre on the mixture of shapes 0 and 1, two on shape 2.
    centres = torch.stack([(shapes[0] + shapes[1]) / 2, shapes[2] + 0.01, shapes[2] - 0.01])
    for assignment in (None, torch.tensor([0] * 60 + [1] * 15 + [2] * 15)):
        new, moves = split_merge(crops, centres, assignment)
        assert moves == [(0, 2)]  # one move: split 0, remove a duplicate; then nothing pays
        found = (new[:, None] - shapes[None]).abs().amax(2) < 0.05  # (centre, shape)
        assert found.sum(0).tolist() == [1, 1, 1]  # every shape has exactly one centre
        assert found.sum(1).tolist() == [1, 1, 1]


def test_split_merge_gives_an_unused_centre_the_second_half():
    crops, shapes = three_shapes()
    centres = torch.stack([(shapes[0] + shapes[1]) / 2, shapes[2], torch.zeros(16)])
    assignment = torch.tensor([0] * 60 + [1] * 30)  # centre 2 chosen by no layer
    new, moves = split_merge(crops, centres, assignment, max_moves=3)
    assert moves == [(0, 2)]
    assert (new[1] - shapes[2]).abs().max() < 0.05  # the untouched centre keeps its place
    halves = sorted((new[[0, 2]].argmax(1) // 4).tolist())
    assert halves == [0, 1]  # shape 0 (pixels 0-3) and shape 1 (pixels 4-7)


def test_split_merge_leaves_a_good_clustering_alone():
    crops, shapes = three_shapes()
    new, moves = split_merge(crops, shapes)
    assert moves == []
    torch.testing.assert_close(new, crops.view(3, 30, 16).mean(1))  # the Lloyd means
    unmoved, none = split_merge(
        crops, shapes + 0.1, assignment=torch.arange(3).repeat_interleave(30), max_moves=0
    )
    assert none == []
    torch.testing.assert_close(unmoved, shapes + 0.1)  # no move: the centres as given
    with pytest.raises(ValueError, match=r"assignment of shape \(89,\) for 90 crops"):
        split_merge(crops, shapes, assignment=torch.zeros(89, dtype=torch.int64))


def test_callback_records_split_merge_moves(tmp_path):
    model = opaque_model()
    seeding = SpriteSeeding(
        at_step=2, collect_steps=1, refit_every=1, min_count=1, centre=False, split_merge_moves=2
    )
    train(tmp_path, model, [seeding], steps=3)
    # Identical crops: no split lowers the objective, so no move; the masks are the piece.
    assert [(e["kind"], e["moves"]) for e in seeding.events] == [("seed", []), ("refit", [])]
    masks = model.sprites.mask.detach().flatten(1)
    torch.testing.assert_close(masks, PIECE.flatten().expand(3, -1), atol=1e-6, rtol=0)


SQUARE = torch.zeros(10, 10)
SQUARE[3:7, 3:7] = 1


class PieceAndSquareData(DTIDataModule):
    """Batches of 4: the L piece and a square in turn, at the initial placement."""

    image_size = (20, 20)

    def train_dataloader(self) -> DataLoader:
        images = torch.zeros(16, 3, 20, 20)
        for i in range(16):
            images[i, :, 5:15, 5:15] = 0.9 * (PIECE if i % 2 == 0 else SQUARE)
        return DataLoader([{"image": x} for x in images], batch_size=4)


def test_split_merge_after_a_refit_reaches_the_masks(tmp_path):
    """After the seeding, sprites 1 and 2 are emptied, so every layer chooses sprite 0: the
    refit at step 4 makes it the mean of both shapes (a mixture). One split-merge move splits
    it and puts the second shape into a freed sprite: both shapes are masks again."""
    model = opaque_model()
    seeding = SpriteSeeding(
        at_step=2, collect_steps=1, refit_every=2, min_count=1, centre=False, split_merge_moves=1
    )
    mixtures = []

    class OnlySpriteZero(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.model.sprites.mask[1:] = 0
            if trainer.global_step == 3:
                mixtures.append(pl_module.model.sprites.mask.detach().clone())

    train(tmp_path, model, [seeding, OnlySpriteZero()], steps=4, data=PieceAndSquareData())
    refit = seeding.events[-1]
    assert (refit["step"], refit["kind"], refit["refit"]) == (4, "refit", 1)
    assert refit["moves"] == [(0, 1)]  # sprite 0 split, sprite 1 (empty) freed for a half
    masks = model.sprites.mask.detach().flatten(1)  # (3, 100)
    for shape in (PIECE, SQUARE):  # each shape is one of the masks
        assert (masks - shape.flatten()).abs().max(1).values.min() < 1e-5
    mixture = 0.5 * (PIECE + SQUARE).flatten()  # what the refit alone would have left
    assert (masks - mixture).abs().max(1).values.min() > 0.4


class TurnedPieceData(DTIDataModule):
    """Batches of 4: the piece at two right angles alone, and twice touching a dark frame."""

    image_size = (20, 20)

    def train_dataloader(self) -> DataLoader:
        images = torch.zeros(16, 3, 20, 20)
        for i in range(16):
            turned = torch.rot90(PIECE, i % 4, (0, 1))
            images[i, :, 5:15, 5:15] = 0.9 * turned
            if i % 4 >= 2:  # another object right against the piece: a dark ring around it
                ring = torch.nn.functional.max_pool2d(turned[None], 3, 1, 1)[0] - turned
                images[i, :, 5:15, 5:15] += 0.2 * ring
        order = [0, 1, 2, 3, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15]  # alone: 0, 1 then 6, 7
        return DataLoader([{"image": images[i]} for i in order], batch_size=4)


def test_invariant_seeding_through_the_callback_uses_isolated_crops_in_their_own_frame(tmp_path):
    model = opaque_model()
    seeding = SpriteSeeding(
        at_step=2, collect_steps=2, centre=False, rotations=4, isolated_only=True, min_count=1
    )
    train(tmp_path, model, [seeding], steps=2, data=TurnedPieceData())
    # Only the 4 pieces that touch nothing are used: one at each right angle.
    assert seeding.events[0]["crops"] == 4
    turns = torch.stack([torch.rot90(PIECE, k, (0, 1)).flatten() for k in range(4)])
    for mask in model.sprites.mask.detach().flatten(1):  # every mask is the piece, turned
        assert (mask - turns).abs().max(1).values.min() < 1e-5


BAR = torch.zeros(10, 10)
BAR[4:6, 1:9] = 1


def shifted(shape: torch.Tensor, s: int, dim: int) -> torch.Tensor:
    """The shape moved by s pixels along dim, zeros shifted in (nothing wraps around)."""
    out = torch.roll(shape, s, dim)
    assert out.sum() == shape.sum()
    return out


class TwoShapesData(DTIDataModule):
    """Batches 1-2: the piece and the bar at three offsets; batches 3-4: a thicker piece
    (6 of 8 layers) and the bar (2 of 8), for a refit that changes the piece's mask."""

    image_size = (20, 20)

    def train_dataloader(self) -> DataLoader:
        thick_piece = PIECE.clone()
        thick_piece[2:4, 5] = 1
        canvases = []
        for i in range(8):  # seeding window
            shape = PIECE if i % 2 == 0 else BAR
            canvases.append(shifted(shape, i % 3, 1 if shape is PIECE else 0))
        for i in range(8):  # refit window
            canvases.append(BAR if i in (3, 6) else thick_piece)
        images = torch.zeros(16, 3, 20, 20)
        images[:, :, 5:15, 5:15] = 0.9 * torch.stack(canvases)[:, None]
        return DataLoader([{"image": x} for x in images], batch_size=4)


def test_callback_seeds_centred_distinct_shapes_then_refits_those_chosen_often_enough(tmp_path):
    torch.manual_seed(0)
    model = DTISprites(**{**MODEL, "n_sprites": 2, "n_layers": 1})
    with torch.no_grad():
        model.sprites.mask.fill_(1.0)
    seeding = SpriteSeeding(at_step=2, collect_steps=2, refit_every=2, min_count=3, centre=True)
    moments = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = trainer.optimizers[0].state.get(pl_module.model.sprites.mask, {})
            moments[trainer.global_step] = state["exp_avg"].abs().max().item() if state else 0.0

    train(tmp_path, model, [seeding, Watch()], steps=4, data=TwoShapesData())
    centred = centre_crops(torch.stack([PIECE, BAR]).flatten(1), (10, 10))
    thick = TwoShapesData().train_dataloader().dataset[8]["image"][0, 5:15, 5:15] / 0.9
    thick = centre_crops(thick.flatten()[None], (10, 10))[0]
    assert [(e["step"], e["kind"]) for e in seeding.events] == [(2, "seed"), (4, "refit")]
    assert seeding.events[1]["refit"] == 1  # the bar's sprite: 2 layers < min_count
    masks = model.sprites.mask.detach().flatten(1)
    piece_k = int((masks - thick).abs().amax(1).argmin())
    # The piece's sprite is refitted to the thick piece; the bar's keeps the seeded bar: the
    # shifted crops were centred, so both are exact.
    torch.testing.assert_close(masks[piece_k], thick, atol=1e-6, rtol=0)
    torch.testing.assert_close(masks[1 - piece_k], centred[1], atol=1e-6, rtol=0)
    # The masks trained for one step after the seeding; the refit zeroed their moments.
    assert moments[3] > 0 and moments[4] == 0


def test_nearest_refits_need_the_invariant_distance():
    with pytest.raises(ValueError, match="refit_assign='nearest' needs rotations"):
        SpriteSeeding(at_step=2, collect_steps=1, refit_every=2, refit_assign="nearest")
    with pytest.raises(ValueError, match="'choice', 'nearest' or 'kmeans'"):
        SpriteSeeding(at_step=2, collect_steps=1, rotations=4, refit_assign="closest")
    assert SpriteSeeding(rotations=4, refit_assign="nearest").refit_assign == "nearest"


def test_a_kmeans_refit_finds_the_shapes_again_through_the_callback(tmp_path):
    """Every mask made the union of the L and the square after the seeding (a blob that
    covers both): a refit by the layers' choices averages the shapes, a ``kmeans`` refit
    clusters the crops again and puts both shapes back into the masks."""
    blur = torch.maximum(PIECE, SQUARE)

    class Blur(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.model.sprites.mask.copy_(blur.expand_as(pl_module.model.sprites.mask))

    results = {}
    for rule in ("choice", "kmeans"):
        model = opaque_model()
        seeding = SpriteSeeding(
            at_step=2,
            collect_steps=1,
            refit_every=2,
            min_count=1,
            centre=False,
            refit_assign=rule,
        )
        train(tmp_path / rule, model, [seeding, Blur()], steps=4, data=PieceAndSquareData())
        assert [(e["step"], e["kind"]) for e in seeding.events] == [(2, "seed"), (4, "refit")]
        results[rule] = model.sprites.mask.detach().flatten(1)  # (3, 100)
    for shape in (PIECE, SQUARE):
        assert (results["kmeans"] - shape.flatten()).abs().max(1).values.min() < 1e-5
        assert (results["choice"] - shape.flatten()).abs().max(1).values.min() > 0.4
