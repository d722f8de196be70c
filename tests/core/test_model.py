import numpy as np
import pytest
import torch
from small_model import CONFIGS, randomise_heads

from dti_sprites.compose import compose
from dti_sprites.model import Decomposition, DTISprites


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_parameter_gets_a_gradient_and_nothing_is_nan(name):
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS[name], empty_penalty=0.0).train()
    randomise_heads(model)
    # Enough images, of varied colours, that every sprite is chosen somewhere (its heads then
    # get a gradient).
    size = model.image_size
    x = 0.5 * torch.rand(24, 3, 1, 1) + 0.5 * torch.rand(24, 3, size, size)
    out = model(x)
    for value in (out.reconstruction, out.layers, out.background, out.mse):
        assert torch.isfinite(value).all()
    out.mse.mean().backward()
    used = set(out.sprite_choice[out.sprite_choice >= 0].tolist())
    assert used == set(range(model.sprites.n_sprites)), "test needs every sprite used"
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", ["tetrominoes", "multidsprites", "gtsrb8"])
def test_selected_rendering_has_the_gradients_of_rendering_every_candidate(name):
    torch.manual_seed(1)
    model = DTISprites(**CONFIGS[name]).double().eval()  # eval: no mask noise, BN fixed
    randomise_heads(model)
    x = torch.rand(5, 3, model.image_size, model.image_size)
    out = model(x)
    out.mse.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Reference: render every candidate with gradients, then select with one-hot weights.
    b, n_layers, k0 = len(x), model.n_layers, model.sprites.n_sprites
    features = model.encoder(x)
    occ = model.occlusion(features)
    layer_p = [p.reshape(b * n_layers, -1) for p in model.layer_transforms.predict(features)]
    sprite_p = [p.reshape(b * n_layers * k0, -1) for p in model.sprite_transforms.predict(features)]
    canvases = model._canvases(noisy=False)
    rgb, alpha = model._render(
        canvases[:k0].expand(b * n_layers, -1, -1, -1, -1), sprite_p, layer_p, None
    )  # (B·L, K0, C, H, W)
    choice = out.sprite_choice.flatten()
    onehot = torch.nn.functional.one_hot(choice.clamp(min=0), k0).to(x) * (choice >= 0)[:, None]
    sel_rgb = (onehot[..., None, None, None] * rgb).sum(1).view(b, n_layers, 3, *x.shape[2:])
    sel_alpha = (onehot[..., None, None, None] * alpha).sum(1).view(b, n_layers, 1, *x.shape[2:])
    bgs = model._render_backgrounds(b, model.background_transforms.predict(features))
    bg_onehot = torch.nn.functional.one_hot(out.background_choice, bgs.shape[1]).to(x)
    background = (bg_onehot[..., None, None, None] * bgs).sum(1)
    recon = compose(
        torch.cat([background[:, None], sel_rgb], 1),
        torch.cat([torch.ones_like(sel_alpha[:, :1]), sel_alpha], 1),
        occ,
    )
    torch.testing.assert_close(recon, out.reconstruction)
    (recon - x).pow(2).flatten(1).mean(1).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_frozen_sprites_get_no_gradient_and_empty_is_no_candidate():
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS["multidsprites"], empty_penalty=10.0).train()
    x = torch.rand(6, 3, 16, 16)
    model.freeze_sprites(True)
    out = model(x)
    assert (out.sprite_choice >= 0).all()  # λ off, empty excluded
    out.mse.mean().backward()
    assert model.sprites.appearance.grad is None and model.sprites.mask.grad is None
    model.freeze_sprites(False)
    out = model(x)
    assert (out.sprite_choice == -1).all()  # λ = 10 makes every sprite too expensive


def test_empty_while_frozen_keeps_the_empty_sprite_a_candidate():
    """A blank image (the constant background alone) while frozen: with the switch every layer
    stays empty; without it every layer must draw a sprite. λ stays off either way."""
    torch.manual_seed(0)
    config = {**CONFIGS["multidsprites"], "empty_penalty": 10.0, "mask_noise": 0.0}
    x = torch.full((4, 3, 16, 16), 0.5)  # the backgrounds' constant init: nothing to explain
    for switch, expected_empty in ((True, True), (False, False)):
        model = DTISprites(**config, empty_while_frozen=switch).eval()
        model.freeze_sprites(True)
        out = model(x)
        assert bool((out.sprite_choice == -1).all()) is expected_empty, switch
        assert model.active_penalty == 0.0
    model.freeze_sprites(False)  # released: the paper's rule, the switch changes nothing
    assert torch.equal(model.candidate_penalty(), DTISprites(**config).candidate_penalty())


def test_empty_while_frozen_needs_the_empty_sprite():
    config = {**CONFIGS["multidsprites"], "empty_sprite": False}
    with pytest.raises(ValueError, match="empty_while_frozen needs empty_sprite"):
        DTISprites(**config, empty_while_frozen=True)


def test_copy_sprite_copies_appearance_mask_and_heads():
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS["multidsprites"])
    randomise_heads(model)
    with torch.no_grad():
        model.sprites.appearance.normal_()
        model.sprites.mask.normal_()
    noise = torch.full(model.sprites.appearance.shape[1:], 0.5)
    before = {id(p): p.detach().clone() for p, _ in model.sprite_slices(0)}
    pairs = model.copy_sprite(src=0, dst=2, noise=noise)
    assert len(pairs) == 2 + model.n_layers * 6  # appearance, mask, 6 head tensors per layer
    torch.testing.assert_close(model.sprites.appearance[2], model.sprites.appearance[0] + 0.5)
    torch.testing.assert_close(model.sprites.mask[2], model.sprites.mask[0])
    head = model.sprite_transforms.heads[0]
    for layer in range(model.n_layers):
        torch.testing.assert_close(head.weights[1][layer * 3 + 2], head.weights[1][layer * 3])
    # The source is untouched.
    for p, idx in model.sprite_slices(0):
        torch.testing.assert_close(p[idx], before[id(p)][idx])


def test_mask_noise_only_inside_the_support_and_only_in_training():
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS["tetrominoes"])
    x = torch.rand(4, 3, 20, 20)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    model.train()
    noisy = model(x).layers[:, :, 3]  # (B, L, H, W)
    model.mask_noise = 0.0
    clean = model(x).layers[:, :, 3]
    support = PositionSupport.of(model, x)
    assert (noisy - clean)[~support].abs().max() == 0
    assert (noisy - clean)[support].abs().max() > 0.05


class PositionSupport:
    @staticmethod
    def of(model, x):
        """Where the warped canvas of each layer lands (B, L, H, W), from a canvas of ones."""
        features = model.encoder(x)
        params = [p.reshape(-1, p.shape[-1]) for p in model.layer_transforms.predict(features)]
        ones = torch.ones(
            len(params[0]), 1, 4, model.sprites.mask.shape[-1], model.sprites.mask.shape[-1]
        )
        warped = model.layer_transforms(ones, params)[:, 0, 3]
        return warped.view(len(x), model.n_layers, *x.shape[2:]) > 0


def test_decomposition_label_maps_follow_choices():
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS["tetrominoes"]).eval()
    with torch.no_grad():
        model.sprites.mask.fill_(1.0)  # opaque square sprites
    x = torch.rand(3, 3, 20, 20)
    out = model(x)
    instance, semantic = out.instance(), out.semantic()
    # Same translation for every layer at init: the front layer (L) covers the canvas area.
    assert set(instance.unique().tolist()) == {0, model.n_layers}
    front = out.sprite_choice[:, -1]
    for b in range(3):
        assert torch.equal(semantic[b][instance[b] > 0].unique(), front[b : b + 1] + 1)
    assert (semantic[instance == 0] == 0).all()
    fg = out.instance_fg(x)
    assert (fg >= 1).all() and torch.equal(fg[instance > 0], instance[instance > 0])
    arrays = out.to_arrays(x)
    assert arrays["reconstruction"].dtype.name == "uint8"
    assert arrays["layers"].shape == (3, 3, 20, 20, 4)
    assert arrays["sprite_choice"].dtype.name == "int16"
    assert np.array_equal(arrays["instance_fg"], fg.numpy())


def _two_layer_decomposition(sprite_choice: list[int]) -> Decomposition:
    """One 1×3 image: a red layer over pixel 0, a green one over pixel 1, pixel 2 uncovered."""
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[:, :, None, None].expand(2, 3, 1, 3)
    alpha = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).view(2, 1, 1, 3)
    layers = torch.cat([rgb, alpha], 1)[None]  # (1, L=2, 4, 1, 3)
    layers = layers * (torch.tensor(sprite_choice) >= 0).view(1, 2, 1, 1, 1)  # empty: zeros
    occlusion = torch.tril(torch.ones(3, 3), -1).T[None]  # higher layer in front
    return Decomposition(
        reconstruction=torch.zeros(1, 3, 1, 3),
        layers=layers,
        background=torch.zeros(1, 3, 1, 3),
        occlusion=occlusion,
        sprite_choice=torch.tensor([sprite_choice]),
        background_choice=torch.zeros(1, dtype=torch.long),
        mse=torch.zeros(1),
    )


def test_instance_fg_gives_an_uncovered_pixel_to_the_best_coloured_layer():
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 0.1]])[None, :, None]
    out = _two_layer_decomposition([4, 7])  # (1, 3, 1, 3): pixel 2 is nearly green
    assert out.instance().tolist() == [[[1, 2, 0]]]
    arrays = out.to_arrays(image)
    assert arrays["instance"].tolist() == [[[1, 2, 0]]]
    assert arrays["instance_fg"].tolist() == [[[1, 2, 2]]]  # green layer = layer 1 -> label 2
    assert arrays["instance_fg"].dtype == np.uint8
    # An empty layer takes no pixel, however well its (zero) colour fits.
    empty = _two_layer_decomposition([4, -1])
    assert empty.instance().tolist() == [[[1, 0, 0]]]
    assert empty.instance_fg(image).tolist() == [[[1, 1, 1]]]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("n_sprites", 0, "n_sprites"),
        ("empty_penalty", -1.0, "empty_penalty"),
        ("sprite_size", 40, "sprite_size"),
        ("layer_transforms", ["color", "warp"], "layer_transforms"),
    ],
)
def test_bad_hyper_parameters_name_the_key(key, value, match):
    config = dict(CONFIGS["tetrominoes"], **{key: value})
    with pytest.raises(ValueError, match=match):
        DTISprites(**config)


def test_masks_pushed_beyond_one_resist_the_noise():
    """Noise is added to the unclipped warped mask and clipped afterwards (the authors' order):
    a mask parameter of 3 stays opaque under ±0.4 noise, one of 1 does not."""
    torch.manual_seed(0)
    model = DTISprites(**{**CONFIGS["tetrominoes"], "sprite_size": 10}).train()
    x = torch.rand(4, 3, 20, 20)
    support = PositionSupport.of(model, x)
    for value, opaque in ((3.0, True), (1.0, False)):
        with torch.no_grad():
            model.sprites.mask.fill_(value)
        alpha = model(x).layers[:, :, 3]  # (B, L, H, W)
        # Away from the canvas border (where bilinear sampling blends with the zero padding).
        inner = torch.nn.functional.avg_pool2d(support.float(), 3, 1, 1) == 1
        assert (alpha[inner].min() >= 0.99) == opaque


def test_reset_layer_puts_that_layer_back_at_its_initial_placement_only():
    torch.manual_seed(0)
    model = DTISprites(**CONFIGS["tetrominoes"], layer_transforms=["color", "position"]).eval()
    image = torch.rand(4, 3, 20, 20)
    with torch.no_grad():
        for head in model.layer_transforms.heads:  # trained heads: non-zero outputs
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    before = model(image).params["layer/position"]  # (B, L, 3)
    assert before[:, 1].abs().min() > 0
    slices = model.reset_layer(1)
    after = model(image)
    assert len(slices) == 4  # output weight and bias of the colour and the position heads
    torch.testing.assert_close(after.params["layer/position"][:, 1], torch.zeros(4, 3))
    torch.testing.assert_close(after.params["layer/color"][:, 1], torch.zeros(4, 6))
    for other in (0, 2):
        torch.testing.assert_close(after.params["layer/position"][:, other], before[:, other])
    with pytest.raises(ValueError, match="layer 3 does not exist: the model has 3"):
        model.reset_layer(3)
