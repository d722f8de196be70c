"""Orientation candidates (``DTISprites(orientations=n)``): each sprite is also a candidate at n
turns, folded exactly into its similarity / affine parameters."""

import math

import pytest
import torch
from small_model import CONFIGS, randomise_heads

from dti_sprites.model import DTISprites
from dti_sprites.transforms import (
    AffineTransform,
    SimilarityTransform,
    pose_params,
    rotate_params,
)

PIECE = torch.zeros(10, 10)
PIECE[2:8, 3:5] = 1  # an L: a vertical bar and a foot (no rotational symmetry)
PIECE[6:8, 5:8] = 1


@pytest.mark.parametrize("family", [SimilarityTransform, AffineTransform])
def test_turned_parameters_are_the_turn_times_the_predicted_matrix(family):
    module = family((10, 10))
    params = 0.3 * torch.randn(5, module.n_params, generator=torch.Generator().manual_seed(0))
    turned = rotate_params(module, params, 8)  # (5, 8, P)
    torch.testing.assert_close(turned[:, 0], params)
    for r in range(8):
        angle = 2 * math.pi * r / 8
        rotation = torch.tensor(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        torch.testing.assert_close(module.theta(turned[:, r]), rotation @ module.theta(params))


def test_a_quarter_turn_renders_the_canvas_turned_a_quarter():
    module = SimilarityTransform((10, 10))
    canvas = PIECE[None, None, None]  # (N=1, S=1, C'=1, 10, 10)
    turned = rotate_params(module, torch.zeros(1, 4), 4)  # identity, 1/4, 1/2, 3/4 turn
    for r in range(4):
        out = module(canvas, turned[:, r])[0, 0, 0]  # pixel centres map onto pixel centres
        torch.testing.assert_close(out, torch.rot90(PIECE, r), atol=1e-5, rtol=0)


def one_sprite_model(mask: torch.Tensor, n_layers: int, **switches) -> DTISprites:
    """One sprite with this 10×10 mask, its similarity on, at the initial placement (canvas on
    image pixels 5..14); ``switches``: orientations, candidate_sizes."""
    torch.manual_seed(0)
    model = DTISprites(
        image_size=20,
        n_sprites=1,
        n_layers=n_layers,
        n_backgrounds=0,
        sprite_size=10,
        mask_std=3,
        sprite_transforms=["similarity"],
        **switches,
    ).eval()
    with torch.no_grad():
        model.sprites.mask.copy_(mask)
    return model


def scene_model(orientations: int) -> DTISprites:
    """The L piece on two layers."""
    return one_sprite_model(PIECE, 2, orientations=orientations)


def test_the_selection_picks_the_orientation_that_explains_the_image():
    image = torch.zeros(1, 3, 20, 20)
    image[0, :, 5:15, 5:15] = 0.9 * torch.rot90(PIECE, 1)  # the piece turned a quarter, in grey
    plain, turned = scene_model(0)(image), scene_model(4)(image)
    assert plain.mse.item() > 0.01  # the upright piece cannot explain it
    assert turned.mse.item() < 1e-8
    assert turned.sprite_choice.tolist() == [[0, 0]]  # the sprite, not the candidate index
    a, b = turned.params["sprite/similarity"][0, :, :2].unbind(-1)  # chosen: the quarter turn
    torch.testing.assert_close(1 + a, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.ones(2), atol=1e-6, rtol=0)


def test_orientations_are_off_while_the_similarity_is_inactive():
    """Same weights, similarity switched off (curriculum): the plain model's decomposition."""
    image = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    plain, turned = scene_model(0), scene_model(4)
    turned.load_state_dict(plain.state_dict())  # no new parameter or buffer
    for model in (plain, turned):
        model.sprite_transforms.set_active(0)
    a, b = plain(image), turned(image)
    assert torch.equal(a.sprite_choice, b.sprite_choice)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)


def test_orientations_need_a_similarity_or_affine_first():
    with pytest.raises(ValueError, match="orientations > 1 or candidate_sizes need"):
        DTISprites(image_size=20, sprite_size=10, sprite_transforms=["projective"], orientations=4)
    with pytest.raises(ValueError, match="orientations > 1 or candidate_sizes need"):
        DTISprites(image_size=20, sprite_size=10, orientations=4)


def test_set_orientations_turns_a_trained_model_into_the_one_built_with_them():
    """An inference-time search (decomposition_probe.py --orientations): the same weights with
    ``set_orientations(4)`` decompose exactly as a model built with 4 orientations."""
    image = torch.zeros(1, 3, 20, 20)
    image[0, :, 5:15, 5:15] = 0.9 * torch.rot90(PIECE, 1)
    plain, built = scene_model(0), scene_model(4)
    plain.set_orientations(4)
    a, b = plain(image), built(image)
    assert a.mse.item() < 1e-8
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)
    plain.set_orientations(1)  # back to no turns: the upright piece again
    assert plain(image).mse.item() > 0.01
    with pytest.raises(ValueError, match="orientations > 1 or candidate_sizes need"):
        DTISprites(image_size=20, sprite_size=10).set_orientations(4)


# Size candidates (``DTISprites(candidate_sizes=...)``): each sprite also drawn s times larger.


@pytest.mark.parametrize("family", [SimilarityTransform, AffineTransform])
def test_posed_parameters_are_turn_and_shrink_times_the_predicted_matrix(family):
    module = family((10, 10))
    params = 0.3 * torch.randn(4, module.n_params, generator=torch.Generator().manual_seed(2))
    sizes = (0.5, 1.0, 2.0)
    posed = pose_params(module, params, 4, sizes)  # (4, 4·3, P), turn-major
    assert posed.shape == (4, 12, module.n_params)
    torch.testing.assert_close(posed[:, 1], params)  # turn 0 at size 1
    torch.testing.assert_close(rotate_params(module, params, 4), posed[:, 1::3])
    for r in range(4):
        angle = 2 * math.pi * r / 4
        rotation = torch.tensor(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        for j, size in enumerate(sizes):
            expected = rotation @ module.theta(params) / size
            torch.testing.assert_close(module.theta(posed[:, 3 * r + j]), expected)


def test_size_two_renders_the_canvas_twice_as_large_about_its_centre():
    module = SimilarityTransform((10, 10))
    square = torch.zeros(10, 10)
    square[4:6, 4:6] = 1  # 2×2 in the centre
    posed = pose_params(module, torch.zeros(1, 4), 1, (2.0,))
    out = module(square[None, None, None], posed[:, 0])[0, 0, 0]
    expected = torch.zeros(10, 10)
    expected[3:7, 3:7] = 1  # 4×4 in the centre
    assert (out > 0.5).equal(expected.bool())


SQUARE = torch.zeros(10, 10)
SQUARE[3:7, 3:7] = 1  # a centred 4×4 square


def sized_model(sizes: tuple[float, ...]) -> DTISprites:
    """The square on one layer."""
    return one_sprite_model(SQUARE, 1, candidate_sizes=sizes)


def test_the_selection_picks_the_size_that_explains_the_image():
    image = torch.zeros(1, 3, 20, 20)
    image[0, :, 7:13, 7:13] = 0.9  # the square at 1.5 times its size, in grey
    plain, sized = sized_model(()), sized_model((0.75, 1.5))
    plain_mse = plain(image).mse.item()  # the square at its own size: a 4×4 for a 6×6
    out = sized(image)
    assert out.mse.item() < plain_mse / 5  # bilinear edges only
    assert out.sprite_choice.tolist() == [[0]]
    a, b = out.params["sprite/similarity"][0, 0, :2].unbind(-1)  # the matrix reads 1 / 1.5
    torch.testing.assert_close(1 + a, torch.tensor(1 / 1.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_candidate_sizes_need_a_similarity_and_positive_sizes():
    with pytest.raises(ValueError, match="orientations > 1 or candidate_sizes need"):
        DTISprites(image_size=20, sprite_size=10, candidate_sizes=[1.0, 2.0])
    with pytest.raises(ValueError, match="candidate_sizes must be positive"):
        sized_model(()).set_orientations(0, [1.0, 0.0])


def test_with_size_candidates_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    config = {**CONFIGS["multidsprites_orientations"], "candidate_sizes": [0.8, 1.25]}
    model = DTISprites(**config, empty_penalty=0.0).train()
    randomise_heads(model)
    x = 0.5 * torch.rand(24, 3, 1, 1) + 0.5 * torch.rand(24, 3, 16, 16)
    out = model(x)
    out.mse.mean().backward()
    assert set(out.sprite_choice[out.sprite_choice >= 0].tolist()) == {0, 1, 2}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
