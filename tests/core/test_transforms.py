import pytest
import torch

from dti_sprites.model import DTISprites
from dti_sprites.sprites import softclip
from dti_sprites.transforms import (
    ColorTransform,
    GroupedMLP,
    PositionTransform,
    ProjectiveTransform,
    TransformSequence,
    make_transform,
)

pytestmark = pytest.mark.usefixtures("float64")
SIZE = (12, 12)


def stack(n=2, s=3, c=5, size=SIZE):
    return torch.rand(n, s, c, *size)


@pytest.mark.parametrize("name", ["color", "similarity", "affine", "projective", "tps"])
def test_identity_at_zero_parameters(name):
    t = make_transform(name, SIZE, SIZE).double()
    x = stack()
    y = t(x, torch.zeros(len(x), t.n_params))
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)


def test_position_at_zero_places_canvas_at_half_size_centred():
    canvas = torch.rand(2, 1, 4, 8, 8)
    t = PositionTransform((16, 16))
    y = t(canvas, torch.zeros(2, 3))
    torch.testing.assert_close(y[..., 4:12, 4:12], canvas, atol=1e-12, rtol=0)
    outside = y.clone()
    outside[..., 4:12, 4:12] = 0
    assert outside.abs().max() == 0


def test_position_scale_never_exceeds_image():
    canvas = torch.ones(1, 1, 1, 8, 8)
    y = PositionTransform((16, 16))(canvas, torch.tensor([[-30.0, 0.0, 0.0]]))
    # e^s → 0: the canvas covers (almost) the whole image, never more.
    assert y[0, 0, 0, 1:-1, 1:-1].min() > 0.99


@pytest.mark.parametrize("name", ["similarity", "affine", "projective"])
def test_known_translation(name):
    x = stack()
    n = len(x)
    shift = 3  # pixels: output(i) = input(i + shift) along x
    tx = 2 * shift / SIZE[1]
    params = torch.zeros(n, make_transform(name, SIZE, SIZE).n_params)
    params[:, {"similarity": 2, "affine": 2, "projective": 2}[name]] = tx
    y = make_transform(name, SIZE, SIZE)(x, params)
    torch.testing.assert_close(y[..., :, :-shift], x[..., :, shift:], atol=1e-12, rtol=0)
    assert y[..., :, -shift:].abs().max() < 1e-12  # zero padding


def test_tps_uniform_displacement_is_a_translation():
    x = stack()
    shift = 2
    params = torch.zeros(len(x), 16, 2)
    params[..., 1] = 2 * shift / SIZE[0]  # every control point moves down by `shift` pixels
    y = make_transform("tps", SIZE, SIZE)(x, params.view(len(x), 32))
    torch.testing.assert_close(y[..., :-shift, :], x[..., shift:, :], atol=1e-9, rtol=0)


QUARTER_TURN = {  # parameters whose matrix is [[0, -1, 0], [1, 0, 0]] (cos = 0, sin = 1)
    "similarity": [-1.0, 1.0, 0.0, 0.0],
    "affine": [-1.0, -1.0, 0.0, 1.0, -1.0, 0.0],
    "projective": [-1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(QUARTER_TURN))
def test_quarter_turn_is_rot90(name):
    x = stack()
    params = torch.tensor([QUARTER_TURN[name]]).expand(len(x), -1)
    y = make_transform(name, SIZE, SIZE)(x, params)
    torch.testing.assert_close(y, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-12, rtol=0)


def test_position_known_translation():
    canvas = torch.rand(2, 1, 4, 8, 8)
    shift = 2  # pixels of the 16×16 image; the canvas is shown at scale 1/2 at s = 0
    params = torch.tensor([[0.0, -2 * 2 * shift / 16, 0.0]]).expand(2, -1)
    y = PositionTransform((16, 16))(canvas, params)
    torch.testing.assert_close(y[..., 4:12, 4 + shift : 12 + shift], canvas, atol=1e-12, rtol=0)


def test_color_transform_recolours_rgb_only():
    x = stack(c=5)
    a = torch.tensor([0.5, -0.5, 0.0])
    b = torch.tensor([0.1, 0.0, -0.2])
    params = torch.cat([a, b]).expand(len(x), -1)
    y = ColorTransform(SIZE)(x, params)
    expected = softclip((1 + a.view(3, 1, 1)) * x[:, :, :3] + b.view(3, 1, 1))
    torch.testing.assert_close(y[:, :, :3], expected)
    torch.testing.assert_close(y[:, :, 3:], x[:, :, 3:])


def test_grouped_mlp_matches_separate_mlps_and_starts_at_zero():
    torch.manual_seed(0)
    mlp = GroupedMLP(n_groups=3, in_features=7, out_features=4, hidden=5)
    x = torch.rand(6, 7)
    assert mlp(x).abs().max() == 0  # zero-initialised last layer
    for w in mlp.weights[-1:]:
        w.data.normal_()
    out = mlp(x)  # (B, G, P)
    for g in range(3):
        h = x
        for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
            h = h @ (w[:, g] if i == 0 else w[g]) + b[g]
            if i < 2:
                h = h.relu()
        torch.testing.assert_close(out[:, g], h)


def test_sequence_curriculum_skips_inactive_modules():
    seq = TransformSequence(["color", "similarity"], 1, 4, SIZE, SIZE)
    for head in seq.heads:
        head.weights[-1].data.normal_()
    features = torch.rand(2, 4)
    x = stack(n=2)
    params = [p[:, 0] for p in seq.predict(features)]
    full = seq(x, params)
    seq.set_active(1)
    partial_params = seq.predict(features)
    assert partial_params[1] is None
    partial = seq(x, [partial_params[0][:, 0], None])
    torch.testing.assert_close(partial, seq.transforms[0](x, params[0]))
    assert not torch.allclose(partial, full)
    with pytest.raises(ValueError, match="n_active"):
        seq.set_active(3)


def test_inactive_position_still_maps_canvas_to_image():
    seq = TransformSequence(["color", "position"], 1, 4, (8, 8), (16, 16))
    seq.set_active(0)
    x = torch.rand(1, 1, 4, 8, 8)
    y = seq(x, seq.predict(torch.rand(1, 4)))
    assert y.shape[-2:] == (16, 16)
    torch.testing.assert_close(y[..., 4:12, 4:12], x, atol=1e-12, rtol=0)


def test_only_position_resizes():
    with pytest.raises(ValueError, match="only 'position' resizes"):
        make_transform("tps", (8, 8), (16, 16))
    with pytest.raises(ValueError, match="needs a 'position' module"):
        TransformSequence(["color"], 1, 4, (8, 8), (16, 16))


def test_to_canvas_of_a_known_translation_and_scale_returns_the_crop():
    # A 20×20 image, a 5×5 canvas drawn at scale 2 (s = 0: one canvas pixel covers 2×2 image
    # pixels) with its top-left corner at row 3, column 6: t = 1 − offset/5 in each axis.
    model = DTISprites(
        image_size=20,
        n_sprites=2,
        n_layers=2,
        sprite_size=5,
        layer_transforms=["color", "position"],
    )
    torch.manual_seed(0)
    crop = torch.rand(3, 5, 5)
    image = torch.zeros(3, 20, 20)
    image[:, 3:13, 6:16] = crop.repeat_interleave(2, 1).repeat_interleave(2, 2)
    position = torch.tensor([[[0.0, 1 - 6 / 5, 1 - 3 / 5], [0.0, 0.0, 0.0]]])  # (B=1, L, 3)
    params = {"layer/color": torch.randn(1, 2, 6), "layer/position": position}
    canvas = model.to_canvas(image[None, None].expand(1, 2, 3, 20, 20), params)
    assert canvas.shape == (1, 2, 3, 5, 5)
    torch.testing.assert_close(canvas[0, 0], crop)  # colour is not undone
    # Layer 1 sits at the initial placement (centred): the centre of the image.
    # Layer 1 sits at the initial placement, centred: the means of the 2×2 blocks of the
    # image's centre (bilinear sampling between four pixels).
    blocks = torch.nn.functional.avg_pool2d(image[None, :, 5:15, 5:15], 2)[0]  # (3, 5, 5)
    torch.testing.assert_close(canvas[0, 1], blocks)


def test_to_canvas_also_undoes_the_selected_sprites_own_transformation():
    # As above, with a sprite similarity of a quarter turn (1 + a = 0, b = 1): the canvas shows
    # the sprite turned, and to_canvas returns the sprite itself, in its own frame.
    model = DTISprites(
        image_size=20,
        n_sprites=2,
        n_layers=1,
        sprite_size=5,
        layer_transforms=["color", "position"],
        sprite_transforms=["similarity"],
    )
    torch.manual_seed(0)
    sprite = torch.rand(3, 5, 5)
    turned = torch.rot90(sprite, 1, (1, 2))  # what the similarity draws on the canvas
    image = torch.zeros(3, 20, 20)
    image[:, 3:13, 6:16] = turned.repeat_interleave(2, 1).repeat_interleave(2, 2)
    params = {
        "layer/position": torch.tensor([[[0.0, 1 - 6 / 5, 1 - 3 / 5]]]),  # (B=1, L=1, 3)
        "sprite/similarity": torch.tensor([[[-1.0, 1.0, 0.0, 0.0]]]),  # (B, L, 4)
    }
    rendered = model.sprite_transforms(sprite[None, None], [params["sprite/similarity"][0]])
    torch.testing.assert_close(rendered[0, 0], turned)
    canvas = model.to_canvas(image[None, None], params)  # (1, 1, 3, 5, 5)
    torch.testing.assert_close(canvas[0, 0], sprite)
    # without the sprite's parameters (the module inactive) only the layer's warp is undone
    canvas = model.to_canvas(image[None, None], {"layer/position": params["layer/position"]})
    torch.testing.assert_close(canvas[0, 0], turned)


def test_inverse_undoes_a_similarity_warp():
    # Forward with a rotation + scale + shift, then inverse: a smooth blob comes back (up to
    # the blur of two bilinear resamplings); without the inverse it would be far off.
    sequence = TransformSequence(["similarity"], 1, 8, (32, 32), (32, 32))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x = torch.exp(-((ys - 14) ** 2 + (xs - 17) ** 2) / 18)[None, None, None]  # (1, 1, 1, 32, 32)
    params = [torch.tensor([[0.1, 0.3, 0.2, -0.1]])]
    warped = sequence(x, params)
    assert (warped - x).abs().max() > 0.5
    back = sequence.inverse(warped, params)
    assert (back - x).abs().max() < 0.05


def test_inverse_undoes_a_projective_warp():
    # A homography with perspective terms: forward then inverse brings a smooth blob back.
    sequence = TransformSequence(["projective"], 1, 8, (32, 32), (32, 32))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x = torch.exp(-((ys - 14) ** 2 + (xs - 17) ** 2) / 18)[None, None, None]  # (1, 1, 1, 32, 32)
    params = [torch.tensor([[0.15, -0.1, 0.2, 0.05, -0.1, -0.15, 0.1, -0.08]])]
    warped = sequence(x, params)
    assert (warped - x).abs().max() > 0.5
    back = sequence.inverse(warped, params)
    assert (back - x).abs().max() < 0.05


def test_the_projective_inverse_of_a_whole_pixel_shift_is_exact():
    # H = translation by 2 pixels in x (2 · 2/16 in normalised units): the inverse moves the
    # pixels back exactly, and the 2 columns that left the output come back as zeros.
    module = ProjectiveTransform((16, 16))
    x = torch.rand(1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]])
    warped = module(x, params)
    torch.testing.assert_close(warped[..., :14], x[..., 2:], atol=1e-6, rtol=0)
    back = module.inverse(warped, params, (16, 16))
    torch.testing.assert_close(back[..., 2:], x[..., 2:], atol=1e-6, rtol=0)
    assert back[..., :2].abs().max() < 1e-6


def test_inverse_refuses_transformations_without_closed_form():
    sequence = TransformSequence(["tps"], 1, 8, (16, 16), (16, 16))
    with pytest.raises(NotImplementedError, match="affine family"):
        sequence.inverse(torch.zeros(1, 1, 1, 16, 16), [torch.zeros(1, 32)])
