"""The placement search (``DTISprites(placement_search=r)``): while the sprites are frozen, every
layer is also tried at a grid of offsets around its predicted position, drawn at the one chosen,
and its predicted translation is pulled toward it."""

import lightning as L
import pytest
import torch
from small_model import SMALL_MODEL, quiet_trainer

from dti_sprites.model import DTISprites
from dti_sprites.module import DTISpritesModule
from dti_sprites.transforms import PositionTransform, make_transform

PIECE = torch.zeros(10, 10)
PIECE[2:8, 3:5] = 1  # an L: a vertical bar and a foot
PIECE[6:8, 5:8] = 1
SQUARE = torch.zeros(10, 10)
SQUARE[3:7, 3:7] = 1


def test_shifted_parameters_draw_the_canvas_whole_pixels_away():
    module = make_transform("position", (10, 10), (20, 20))
    canvas = PIECE[None, None, None]  # (N=1, S=1, C'=1, 10, 10)
    params = torch.tensor([[0.0, 0.1, -0.05]])  # any scale and translation
    right2_up4 = torch.tensor([[2 * 2 / 20, -4 * 2 / 20]])  # (x, y), normalised
    out = module(canvas, params)[0, 0, 0]
    moved = module(canvas, PositionTransform.shifted(params, right2_up4))[0, 0, 0]
    torch.testing.assert_close(moved, torch.roll(out, (-4, 2), (0, 1)), atol=1e-5, rtol=0)
    assert moved.sum() > 10  # the piece is in the picture


def frozen_model(masks: list[torch.Tensor], n_layers: int = 1, **switches) -> DTISprites:
    """Sprites with these 10×10 masks (grey 0.9), frozen, on a black 20×20 image, the layers at
    their initial placement (canvas on pixels 5..14), no mask noise, in training mode."""
    torch.manual_seed(0)
    model = DTISprites(
        image_size=20,
        n_sprites=len(masks),
        n_layers=n_layers,
        sprite_size=10,
        mask_std=3,
        mask_noise=0.0,
        **{"placement_step": 4, **switches},
    ).train()
    model.freeze_sprites(True)
    with torch.no_grad():
        model.sprites.mask.copy_(torch.stack(masks)[:, None])
    return model


def scene(*shifts: tuple[int, int], mask: torch.Tensor = PIECE) -> torch.Tensor:
    """The mask drawn at the initial placement moved by (right, down) pixels, once per shift."""
    image = torch.zeros(1, 3, 20, 20)
    for dx, dy in shifts:
        image[0, :, 5 + dy : 15 + dy, 5 + dx : 15 + dx] += 0.9 * mask
    return image


def drawn_shift(position: torch.Tensor) -> tuple[float, float]:
    """(right, down) pixels of a layer drawn at position parameters (3,) with scale 2."""
    s, tx, ty = position.tolist()
    assert s == 0.0
    return (-tx / 2 * 10, -ty / 2 * 10)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_search_draws_the_layer_on_the_object_and_pulls_the_prediction(weight):
    model = frozen_model([PIECE], placement_search=1, placement_weight=weight)
    image = scene((4, -4))  # one step right and one up: a corner of the 3×3 grid
    out = model(image)
    assert out.mse.item() < 1e-10
    assert drawn_shift(out.params["layer/position"][0, 0]) == pytest.approx((4, -4))
    # predicted translation 0, drawn at t = −scale · δ = −2 · (0.4, −0.4): squared gap 1.28
    torch.testing.assert_close(out.placement, torch.tensor(weight * 1.28))
    plain = frozen_model([PIECE])(image)  # no search: drawn where predicted, far off
    assert plain.placement is None and plain.mse.item() > 0.01


def test_the_greedy_selection_moves_each_layer_onto_its_own_object():
    model = frozen_model([PIECE], n_layers=2, placement_search=1)
    out = model(scene((4, 0), (-4, 0)))
    assert out.mse.item() < 1e-10
    shifts = {tuple(round(v, 4) for v in drawn_shift(p)) for p in out.params["layer/position"][0]}
    assert shifts == {(4, 0), (-4, 0)}


def test_a_layer_already_on_its_object_stays_and_pays_nothing():
    out = frozen_model([PIECE], placement_search=2)(scene((0, 0)))
    assert drawn_shift(out.params["layer/position"][0, 0]) == pytest.approx((0, 0))
    assert out.placement.item() == 0.0


def test_identical_frozen_sprites_are_drawn_once_and_distinct_ones_are_all_tried():
    image = scene((-4, 4))
    one = frozen_model([PIECE], placement_search=1)(image)
    three = frozen_model([PIECE, PIECE, PIECE], placement_search=1)(image)
    assert three.sprite_choice.tolist() == [[0]]
    torch.testing.assert_close(three.mse, one.mse)
    mixed = frozen_model([SQUARE, PIECE], placement_search=1)(image)
    assert mixed.sprite_choice.tolist() == [[1]] and mixed.mse.item() < 1e-10
    assert drawn_shift(mixed.params["layer/position"][0, 0]) == pytest.approx((-4, 4))


def test_no_search_in_eval_or_once_the_sprites_are_released():
    image = scene((4, 4))
    model = frozen_model([PIECE], placement_search=1)
    assert model.eval()(image).placement is None
    model.train().freeze_sprites(False)
    out = model(image)
    assert out.placement is None
    assert drawn_shift(out.params["layer/position"][0, 0]) == pytest.approx((0, 0))


def test_the_pull_moves_the_predicted_translation_toward_the_chosen_offset():
    model = frozen_model([PIECE], placement_search=1)
    image = scene((4, 4))
    optimizer = torch.optim.SGD(model.layer_transforms.parameters(), lr=0.02)
    for _ in range(20):
        optimizer.zero_grad()
        model(image).placement.backward()
        optimizer.step()
    predicted = model.eval()(image).params["layer/position"][0, 0]
    right, down = drawn_shift(torch.cat([torch.zeros(1), predicted[1:]]))
    assert 2 < right <= 4 and 2 < down <= 4  # most of the way to the (4, 4) offset from (0, 0)


def test_training_adds_the_pull_to_the_loss(tmp_path, squares):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = {**SMALL_MODEL, "sprite_transforms": [], "placement_search": 1}
    module = DTISpritesModule(DTISprites(**model))
    module.model.freeze_sprites(True)
    t = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[Record()])
    t.fit(module, squares(n=4))
    mse, pull = (float(t.callback_metrics[f"train/{k}"]) for k in ("mse", "placement"))
    assert pull > 0
    assert losses == [pytest.approx(mse + pull)]


def test_the_search_needs_a_position_to_move():
    with pytest.raises(ValueError, match="placement_search > 0 moves the layers' 'position'"):
        DTISprites(image_size=10, sprite_size=10, layer_transforms=["color"], placement_search=1)


def drawn_centre(position: torch.Tensor) -> list[float]:
    """The canvas centre (x, y) in normalised image coordinates: −t / scale."""
    return (-position[1:] / (1 + position[0].exp())).tolist()


def test_a_move_never_takes_the_layer_out_of_the_picture():
    # On a black image a frozen blob is best as far away as it can go; 12-px steps on a 20-px
    # image would put its centre 1.2 from the middle: the move stops at the image's edge.
    model = frozen_model([PIECE], placement_search=1, placement_step=12)
    out = model(torch.zeros(1, 3, 20, 20))
    x, y = drawn_centre(out.params["layer/position"][0, 0])
    assert max(abs(x), abs(y)) == pytest.approx(1.0)
    assert abs(x) <= 1 + 1e-6 and abs(y) <= 1 + 1e-6


def test_an_empty_layer_is_not_pulled():
    model = frozen_model([PIECE], placement_search=1, empty_sprite=True, empty_while_frozen=True)
    out = model(torch.zeros(1, 3, 20, 20))
    assert out.sprite_choice.tolist() == [[-1]]
    assert out.placement.item() == 0.0
    assert drawn_centre(out.params["layer/position"][0, 0]) == pytest.approx([0, 0])


def test_a_fitted_colour_finds_an_object_the_predicted_colour_misses():
    # A red piece one step right on a mid-grey field: in the layer's predicted light grey the
    # blob does least harm on the field, away from the piece; in the colour fitted under each
    # candidate, it fits the piece exactly there.
    image = torch.full((1, 3, 20, 20), 0.45)
    piece = PIECE.bool()
    for channel, value in enumerate((0.9, 0.0, 0.0)):
        image[0, channel, 5:15, 9:19][piece] = value
    predicted = frozen_model([PIECE], placement_search=1)(image)
    fitted = frozen_model([PIECE], placement_search=1, placement_fitted_colour=True)(image)
    assert drawn_shift(fitted.params["layer/position"][0, 0]) == pytest.approx((4, 0))
    assert fitted.placement.item() > 0
    assert drawn_shift(predicted.params["layer/position"][0, 0]) != pytest.approx((4, 0))


def test_set_placement_search_runs_the_search_in_eval_mode_whatever_the_freeze():
    """A layer predicted one 2-px step left and up of its object: the search set for inference
    draws it on the object (exact reconstruction); without it, eval mode draws it where
    predicted."""
    image = scene((2, 2))
    model = frozen_model([PIECE]).eval()
    model.freeze_sprites(False)  # released sprites: the training search would not run
    assert model(image).mse.item() > 0.01
    model.set_placement_search(1, 2.0)
    out = model(image)
    assert out.mse.item() < 1e-10
    assert drawn_shift(out.params["layer/position"][0, 0]) == pytest.approx((2, 2))
    model.set_placement_search(0, 2.0)  # off again
    assert drawn_shift(model(image).params["layer/position"][0, 0]) == pytest.approx((0, 0))
    with pytest.raises(ValueError, match="radius >= 0 and step > 0"):
        model.set_placement_search(1, 0.0)
    unplaced = DTISprites(image_size=10, sprite_size=10, layer_transforms=["color"])
    with pytest.raises(ValueError, match="placement_search > 0 moves the layers' 'position'"):
        unplaced.set_placement_search(1, 2.0)
