"""The pose refinement (``DTISprites(pose_refinement=n)``): in eval mode, the selected layers'
transformation parameters descend the image's reconstruction error, so a layer predicted a
fraction of a pixel off its object is drawn on it."""

import pytest
import torch

from dti_sprites.model import DTISprites
from dti_sprites.seeding import layer_supports
from dti_sprites.transforms import PositionTransform, make_transform

SQUARE = torch.zeros(10, 10)
SQUARE[2:8, 2:8] = 1


def square_model(**switches) -> DTISprites:
    """One layer (unless switched) drawing a 6×6 grey (0.9) square sprite on a black 20×20
    image, at its initial placement (canvas on pixels 5..14, scale 2), no mask noise, in eval
    mode."""
    torch.manual_seed(0)
    settings = dict(image_size=20, n_sprites=1, n_layers=1, sprite_size=10, mask_noise=0.0)
    model = DTISprites(**{**settings, **switches}).eval()
    with torch.no_grad():
        model.sprites.mask.copy_(SQUARE[None, None])
    return model


def scene(right: float, down: float) -> torch.Tensor:
    """The square sprite drawn (bilinearly) ``right`` and ``down`` pixels from the initial
    placement: (1, 3, 20, 20)."""
    module = make_transform("position", (10, 10), (20, 20))
    moved = PositionTransform.shifted(torch.zeros(1, 3), torch.tensor([[right, down]]) / 10)
    return 0.9 * module(SQUARE[None, None, None], moved)[0, 0].expand(1, 3, -1, -1)


def drawn_centre(position: torch.Tensor) -> tuple[float, float]:
    """(right, down) pixels of the canvas centre drawn at position parameters (3,)."""
    s, tx, ty = position.tolist()
    scale = 1 + torch.tensor(s).exp().item()
    return (-tx / scale * 10, -ty / scale * 10)


def test_the_refinement_slides_the_layer_onto_an_object_a_pixel_off():
    image = scene(1.3, -0.6)
    plain = square_model()(image)
    assert drawn_centre(plain.params["layer/position"][0, 0]) == (0.0, 0.0)
    refined = square_model(pose_refinement=150, pose_refinement_lr=0.01)(image)
    right, down = drawn_centre(refined.params["layer/position"][0, 0])
    assert right == pytest.approx(1.3, abs=0.1) and down == pytest.approx(-0.6, abs=0.1)
    assert refined.mse.item() < plain.mse.item() / 20
    # the decomposition is the refined one: its reconstruction and its layer agree
    torch.testing.assert_close(
        refined.reconstruction, refined.layers[:, 0, :3] * refined.layers[:, 0, 3:]
    )


def test_an_empty_layer_is_moved_onto_the_object_no_layer_drew():
    # Two layers predicted at the same place: the back one draws square A there, the front one
    # would add nothing and stays empty; square B, 6 px up and left, is drawn by no layer.
    image = (scene(0, 0) + scene(-6, -6)).clamp(max=0.9)
    switches = dict(n_layers=2, empty_sprite=True, pose_refinement=60, pose_refinement_lr=0.02)
    alone = square_model(**switches, pose_refinement_rounds=2)(image)
    assert alone.sprite_choice.tolist() == [[0, -1]] and alone.mse.item() > 0.05
    placed = square_model(**switches, pose_refinement_rounds=2, residual_placement=0.05)(image)
    assert placed.sprite_choice.tolist() == [[0, 0]]
    assert placed.mse.item() < alone.mse.item() / 20
    right, down = drawn_centre(placed.params["layer/position"][0, 1])
    assert right == pytest.approx(-6, abs=0.3) and down == pytest.approx(-6, abs=0.3)


def test_a_placed_layer_takes_the_drawn_layers_median_scale():
    """The network gives an empty layer any scale (here a canvas the size of the image, s ≪ 0):
    placed, it takes the median of its image's drawn layers (its own where none is drawn),
    with its canvas centre on the residual's peak."""
    model = square_model(n_layers=4, empty_sprite=True)
    residual = torch.zeros(2, 20, 20)
    residual[:, 2:7, 13:18] = 1.0  # its 5×5 mean peaks at row 4, column 15 in both images
    empty = torch.tensor([[False, False, False, True], [True, True, True, True]])
    position = torch.tensor(
        [[0.2, 0.0, 0.0], [0.6, 0.1, 0.1], [0.4, -0.1, 0.0], [-8.0, 0.0, 0.0]]
    ).repeat(2, 1)  # (B·L, 3)
    assert model.layer_transforms.names == ["color", "position"]
    layer_p = [torch.zeros(8, 6), position]  # (B·L, P) each
    image = torch.zeros(2, 3, 20, 20)
    moved = model._place_on_residual(image, residual, empty, layer_p)[model._position_index()]
    moved = moved.view(2, 4, 3)
    assert moved[0, 3, 0].item() == pytest.approx(0.4)  # the median of 0.2, 0.6 and 0.4
    assert moved[1, 0, 0].item() == pytest.approx(0.2)  # no drawn layer: its own
    torch.testing.assert_close(moved[0, :3], position.view(2, 4, 3)[0, :3])  # drawn: unmoved
    for b, layer in [(0, 3), (1, 0)]:
        s, tx, ty = moved[b, layer].tolist()
        scale = 1 + torch.tensor(s).exp().item()
        centre = (-tx / scale, -ty / scale)  # normalised (x, y) of the canvas centre
        assert centre == pytest.approx(((15 * 2 + 1) / 20 - 1, (4 * 2 + 1) / 20 - 1))


def test_training_is_never_refined_and_zero_steps_switch_it_off():
    image = scene(1.3, -0.6)
    model = square_model(pose_refinement=50).train()
    assert model(image).params["layer/position"].abs().max() == 0  # as predicted
    model.eval().set_pose_refinement(0)
    assert model(image).params["layer/position"].abs().max() == 0


def test_the_refinement_runs_in_inference_mode_as_lightning_validates():
    image = scene(-0.8, 0.7)
    model = square_model(pose_refinement=30, pose_refinement_rounds=2)
    with torch.no_grad():
        expected = model(image)
    with torch.inference_mode():
        found = model(image)
    torch.testing.assert_close(found.reconstruction, expected.reconstruction)
    assert found.mse.item() < square_model()(image).mse.item()


def test_the_switches_travel_with_the_checkpoint(tmp_path):
    model = square_model(pose_refinement=7, pose_refinement_lr=0.05, order_search=True)
    model.save_weights(tmp_path / "w.pt")
    loaded = DTISprites.from_checkpoint(tmp_path / "w.pt")
    assert (loaded.pose_refinement, loaded.pose_refinement_lr) == (7, 0.05)
    assert loaded.order_search and loaded.pose_refinement_rounds == 1


@pytest.mark.parametrize("steps, lr, rounds", [(-1, 0.02, 1), (5, 0.0, 1), (5, 0.02, 0)])
def test_bad_refinement_settings_raise(steps, lr, rounds):
    with pytest.raises(ValueError, match="pose_refinement"):
        square_model().set_pose_refinement(steps, lr, rounds)
    with pytest.raises(ValueError, match="residual_placement"):
        square_model(residual_placement=-0.1)


def test_the_seeding_sees_the_unrefined_decomposition():
    """The seeding is training: its supports come from the network's own selection, whatever
    the model's refinement at evaluation; the settings are back afterwards."""
    image = scene(0.6, -0.4)
    refined_model = square_model(pose_refinement=30, pose_refinement_rounds=2, order_search=True)
    support, out = layer_supports(refined_model, image)
    expected_support, expected = layer_supports(square_model(), image)
    torch.testing.assert_close(support, expected_support)
    torch.testing.assert_close(out.reconstruction, expected.reconstruction)
    refined = refined_model(image).reconstruction  # eval mode outside: refined
    assert (refined - out.reconstruction).abs().max() > 0.05
    assert refined_model.refinement_settings()["pose_refinement"] == 30
    assert refined_model.order_search and refined_model.pose_refinement_rounds == 2
