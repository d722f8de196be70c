"""Layer positions by soft-argmax over the encoder's feature map
(``DTISprites(position_head="heatmap")``, :class:`dti_sprites.heatmap.HeatmapPosition`)."""

import pytest
import torch

from dti_sprites.heatmap import HeatmapPosition
from dti_sprites.model import DTISprites
from dti_sprites.transforms import GroupedMLP

SQUARE = torch.zeros(10, 10)
SQUARE[3:7, 3:7] = 1


def model_with(masks: list[torch.Tensor], n_layers: int = 1, **switches) -> DTISprites:
    """Sprites with these 10×10 masks (grey 0.9), frozen, on black 20×20 images (feature map
    5×5), no mask noise, the layers' positions from heat maps."""
    torch.manual_seed(0)
    model = DTISprites(
        image_size=20,
        n_sprites=len(masks),
        n_layers=n_layers,
        sprite_size=10,
        mask_std=3,
        mask_noise=0.0,
        **{"position_head": "heatmap", **switches},
    )
    model.freeze_sprites(True)
    with torch.no_grad():
        model.sprites.mask.copy_(torch.stack(masks)[:, None])
    return model


def test_each_layer_is_centred_on_the_cell_its_heat_picks():
    head = HeatmapPosition(n_layers=2, channels=2, gain=10.0)
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[0, 0, 1, 2] = 1  # channel 0 marks row 1, column 2; channel 1 row 3, column 0
    fmap[0, 1, 3, 0] = 1
    with torch.no_grad():
        head.conv.weight[0, 0] = 5  # layer 0 follows channel 0, layer 1 channel 1
        head.conv.weight[1, 1] = 5
    centres = head(fmap)[0][0]  # cell (row i, column j) is centred at ((2j+1)/4 − 1, (2i+1)/4 − 1)
    torch.testing.assert_close(
        centres, torch.tensor([[0.25, -0.25], [-0.75, 0.75]]), atol=1e-6, rtol=0
    )
    assert head.heat(fmap).sum((2, 3)).allclose(torch.ones(1, 2))


def test_the_heads_start_at_the_paper_initial_placement():
    image = torch.rand(2, 3, 20, 20)
    plain, heat = model_with([SQUARE], n_layers=2, position_head="mlp"), model_with([SQUARE], 2)
    out_plain, out_heat = plain(image), heat(image)
    assert out_heat.params["layer/position"].abs().max() < 1e-6  # every layer centred
    torch.testing.assert_close(out_heat.params, out_plain.params, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_heat.reconstruction, out_plain.reconstruction, atol=1e-6, rtol=0)


def test_the_layer_is_drawn_where_its_heat_is():
    model = model_with([SQUARE]).eval()
    with torch.no_grad():
        model.heatmap.conv.weight[0, -2] = 10  # the x coordinate: heat in the last column
        out = model(torch.zeros(1, 3, 20, 20))
    s, tx, ty = out.params["layer/position"][0, 0].tolist()
    assert (tx, ty) == pytest.approx((-(1 + torch.e**s) * 0.8, 0.0), abs=1e-4)
    alpha = out.layers[0, 0, -1]  # (20, 20): the square drawn about pixel (17.5, 9.5)
    assert alpha[:, 16:20].sum() == pytest.approx(alpha.sum(), abs=1e-3)
    assert alpha[8:12].sum() == pytest.approx(alpha.sum(), abs=1e-3)


def test_training_the_heat_map_moves_the_layer_onto_the_object():
    model = model_with([SQUARE]).train()
    image = torch.zeros(1, 3, 20, 20)
    image[0, :, 6:10, 10:14] = 0.9  # the square 2 px right and up of the initial placement
    optimizer = torch.optim.Adam(model.heatmap.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(image).mse.mean().backward()
        optimizer.step()
    with torch.no_grad():
        centre = model.heatmap(model.encoder(image, with_map=True)[1])[0][0, 0]
        mse = model(image).mse.item()
    # the object's centre, pixel (11.5, 7.5), is (0.2, −0.2); 0.05 is half a pixel
    torch.testing.assert_close(centre, torch.tensor([0.2, -0.2]), atol=0.05, rtol=0)
    assert mse < 1e-4  # against 0.0324 for the object left to the background


def test_reset_layer_puts_that_layer_back_at_the_centre_only():
    model = model_with([SQUARE], n_layers=2).eval()
    with torch.no_grad():
        model.heatmap.conv.weight[:, -2] = 10
    model.reset_layer(0)
    with torch.no_grad():
        position = model(torch.zeros(1, 3, 20, 20)).params["layer/position"][0]  # (L, 3)
    assert position[0].abs().max() < 1e-6
    assert position[1, 1] < -1  # layer 1 still drawn right of the centre


def test_the_weights_come_back_from_a_weights_file(tmp_path):
    model = model_with([SQUARE]).eval()
    with torch.no_grad():
        model.heatmap.conv.weight[0, -1] = -3
    model.save_weights(tmp_path / "w.pt")
    loaded = DTISprites.from_checkpoint(tmp_path / "w.pt")
    image = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image).params, model(image).params)
        assert model(image).params["layer/position"][0, 0, 2] > 1  # the weights matter


def test_a_heatmap_needs_the_position_transformation_and_a_known_name():
    with pytest.raises(ValueError, match=r"position_head=.heatmap.*layer_transforms"):
        DTISprites(
            image_size=10, sprite_size=10, layer_transforms=["color"], position_head="heatmap"
        )
    with pytest.raises(ValueError, match="position_head: unknown head 'conv'"):
        DTISprites(position_head="conv")  # type: ignore[arg-type]


def test_a_glimpse_is_the_features_where_the_heat_is():
    head = HeatmapPosition(n_layers=1, channels=3)
    fmap = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        head.conv.weight[0, -2] = 10  # heat in the last column, any row: its mean features
        head.conv.weight[0, -1] = 10  # and the last row: the corner cell (3, 3)
    glimpse = head(fmap)[1]  # (B, L, C)
    torch.testing.assert_close(glimpse[:, 0], fmap[:, :, 3, 3], atol=1e-4, rtol=0)


def test_a_grouped_head_reads_its_own_groups_local_features_only():
    torch.manual_seed(0)
    mlp = GroupedMLP(n_groups=3, in_features=4, out_features=2, hidden=5, local_features=6)
    with torch.no_grad():
        mlp.weights[-1].normal_()  # the last layer starts at zero: make the output depend
    features, local = torch.rand(2, 4), torch.rand(2, 3, 6)
    changed = local.clone()
    changed[:, 1] += 1  # group 1's own features
    out, out_changed = mlp(features, local), mlp(features, changed)
    assert (out_changed[:, 1] - out[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(out_changed[:, [0, 2]], out[:, [0, 2]])
    assert any(param is mlp.local_weight for param, _ in mlp.group_slices(1))
    with pytest.raises(ValueError, match="reads local features"):
        mlp(features)


def test_with_glimpses_identical_layer_heads_predict_for_what_each_layer_sees():
    model = model_with([SQUARE], n_layers=2, heatmap_features=True).eval()
    head = model.layer_transforms.heads[0]  # colour
    with torch.no_grad():
        for param, index in head.group_slices(1):  # layer 1's colour head := layer 0's
            param[index] = param[(slice(None), 0) if index[0] == slice(None) else (0,)]
        head.weights[-1].normal_()
        model.heatmap.conv.weight[0, -2] = 10  # layer 0 looks right, layer 1 left
        model.heatmap.conv.weight[1, -2] = -10
        image = torch.zeros(1, 3, 20, 20)
        image[0, :, :, 14:] = 1  # something on the right only
        colour = model(image).params["layer/color"][0]  # (L, 3)
    assert (colour[0] - colour[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="heatmap_features needs position_head='heatmap'"):
        DTISprites(heatmap_features=True)
