"""Selection on a coarse grid (``DTISprites(select_downscale=f)``): the candidates are rendered
and scored at (H/f)×(W/f); the chosen ones are rendered at full size as before."""

import pytest
import torch
from torch.nn import functional as F

from dti_sprites.model import DTISprites

SQUARE = torch.zeros(12, 12)
SQUARE[2:10, 2:10] = 1
BAR = torch.zeros(12, 12)
BAR[1:11, 4:8] = 1
PIECE = torch.zeros(12, 12)
PIECE[2:10, 2:6] = 1  # an L: a vertical bar and a foot
PIECE[6:10, 6:10] = 1
SHAPES = [SQUARE, BAR, PIECE]


def scene_model(select_downscale: int, **kwargs) -> DTISprites:
    """Three sprites at the initial placement: the 12-pixel canvas on image pixels 6..17."""
    torch.manual_seed(0)
    model = DTISprites(
        image_size=24,
        n_sprites=3,
        n_layers=2,
        n_backgrounds=0,
        sprite_size=12,
        mask_std=3,
        select_downscale=select_downscale,
        **kwargs,
    ).eval()
    with torch.no_grad():
        model.sprites.mask.copy_(torch.stack(SHAPES)[:, None])
    return model


def test_a_pixel_aligned_sprite_on_the_coarse_grid_is_its_area_average():
    """At the initial placement canvas pixels fall on image pixels; the 12×12 grid then samples
    the canvas halfway between pixels, where bilinear sampling averages each 2×2 block."""
    model = scene_model(1)
    canvas = torch.cat([torch.rand(3, 3, 12, 12), torch.stack(SHAPES)[:, None]], 1)[None]
    params = [None, None]  # no colour change, position at its initial placement
    full = model.layer_transforms(canvas, params)  # (1, 3, 4, 24, 24)
    coarse = model.layer_transforms(canvas, params, (12, 12))  # (1, 3, 4, 12, 12)
    expected = F.avg_pool2d(full.flatten(0, 1), 2).view(coarse.shape)
    torch.testing.assert_close(coarse, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_the_coarse_selection_chooses_as_the_full_one_and_renders_at_full_size(shape):
    image = torch.zeros(2, 3, 24, 24)
    image[0, :, 6:18, 6:18] = 0.9 * SHAPES[shape]  # the sprite's grey (sprite_init 0.9)
    image[1, :, 6:18, 6:18] = 0.9 * SHAPES[shape].flip(0)  # no sprite explains it exactly
    full, coarse = scene_model(1)(image), scene_model(2)(image)
    assert full.sprite_choice[0].tolist() == [shape, shape]
    assert torch.equal(coarse.sprite_choice, full.sprite_choice)
    assert coarse.reconstruction.shape == image.shape
    assert torch.equal(coarse.reconstruction, full.reconstruction)  # same choices: same loss
    assert torch.equal(coarse.mse, full.mse)


def test_a_coarse_training_step_has_the_full_size_gradients_of_its_choices():
    image = torch.zeros(4, 3, 24, 24)
    for b, shape in enumerate([0, 1, 2, 0]):
        image[b, :, 6:18, 6:18] = 0.9 * SHAPES[shape]
    grads = []
    for f in (1, 2):
        model = scene_model(f, mask_noise=0.0).train()
        model(image).mse.mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=0, msg=name)


def test_with_mask_noise_the_coarse_selection_uses_the_full_size_draw():
    """The noise is drawn once, at full size (the coarse grid takes every f-th pixel): the
    random stream and the rendered layers are those of the full-size selection."""
    image = torch.zeros(3, 3, 24, 24)
    for b in range(3):
        image[b, :, 6:18, 6:18] = 0.9 * SHAPES[b]
    outs = []
    for f in (1, 2):
        model = scene_model(f, mask_noise=0.4).train()
        torch.manual_seed(1)
        outs.append((model(image), torch.rand(1)))
    (full, after_full), (coarse, after_coarse) = outs
    assert full.sprite_choice[:, 0].tolist() == [0, 1, 2]
    assert torch.equal(coarse.sprite_choice, full.sprite_choice)
    assert torch.equal(coarse.reconstruction, full.reconstruction)
    assert torch.equal(after_coarse, after_full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 35, "select_downscale": 2}, "must divide image_size"),
        (
            {"layer_transforms": ["position", "similarity"], "select_downscale": 2},
            "ending with 'position'",
        ),
    ],
)
def test_a_downscale_the_model_cannot_render_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DTISprites(**{"image_size": 24, "sprite_size": 12, **kwargs})
