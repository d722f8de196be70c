import pytest
import torch

from dti_sprites.compose import (
    Occlusion,
    affine_terms,
    compose,
    greedy_select,
    label_maps,
    order_search,
)
from dti_sprites.model import exhaustive_select
from dti_sprites.transforms import GroupedMLP

pytestmark = pytest.mark.usefixtures("float64")


def compose_loop(rgb, alpha, occ):
    """Î = Σ_i α_i c_i Π_{j≠i} (1 − occ[j, i] α_j), one image, plain loops.

    rgb (L+1, C, H, W), alpha (L+1, 1, H, W), occ (L+1, L+1)."""
    out = torch.zeros_like(rgb[0])
    for i in range(len(rgb)):
        term = alpha[i] * rgb[i]
        for j in range(len(rgb)):
            if j != i:
                term = term * (1 - occ[j, i] * alpha[j])
        out = out + term
    return out


def random_occlusion(b, n_layers):
    head = GroupedMLP(1, 4, n_layers * (n_layers - 1) // 2)
    head.weights[-1].data.normal_()
    return Occlusion(n_layers, "predicted", head)(torch.rand(b, 4))


def random_layers(b, n_layers, c=3, size=6):
    rgb = torch.rand(b, n_layers + 1, c, size, size)
    alpha = torch.rand(b, n_layers + 1, 1, size, size)
    alpha[:, 0] = 1
    return rgb, alpha


def test_occlusion_matrix_properties():
    occ = random_occlusion(3, 4)  # (B, 5, 5)
    assert torch.all(occ.diagonal(dim1=1, dim2=2) == 0)
    sprites = occ[:, 1:, 1:]
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close((sprites + sprites.transpose(1, 2))[:, off], torch.ones(3, 12))
    assert torch.all(occ[:, 1:, 0] == 1) and torch.all(occ[:, 0, 1:] == 0)
    at_init = Occlusion(3, "predicted", GroupedMLP(1, 4, 3))(torch.rand(2, 4))
    assert torch.all(at_init[:, 1:, 1:][:, ~torch.eye(3, dtype=torch.bool)] == 0.5)


def test_compose_matches_loop():
    rgb, alpha = random_layers(2, 3)
    occ = random_occlusion(2, 3)
    out = compose(rgb, alpha, occ)
    for b in range(2):
        torch.testing.assert_close(out[b], compose_loop(rgb[b], alpha[b], occ[b]))


def test_fixed_occlusion_is_back_to_front_over_compositing():
    rgb, alpha = random_layers(2, 3)
    occ = Occlusion(3, "fixed")(torch.rand(2, 4))
    expected = rgb[:, 0]
    for layer in range(1, 4):
        expected = alpha[:, layer] * rgb[:, layer] + (1 - alpha[:, layer]) * expected
    torch.testing.assert_close(compose(rgb, alpha, occ), expected)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_composite_is_affine_in_one_layer(layer):
    rgb, alpha = random_layers(2, 3)
    occ = random_occlusion(2, 3)
    s, t, p = affine_terms(rgb, alpha, occ, layer)
    new_rgb, new_alpha = torch.rand_like(rgb[:, 0]), torch.rand_like(alpha[:, 0])
    if layer == 0:
        new_alpha = torch.ones_like(new_alpha)
    rgb[:, layer], alpha[:, layer] = new_rgb, new_alpha
    torch.testing.assert_close(s + new_alpha * (p * new_rgb - t), compose(rgb, alpha, occ))


def reference_greedy(image, sprite_rgb, sprite_alpha, backgrounds, occ, passes, penalty):
    """The same algorithm, written plainly: full composition per candidate, Python loops."""
    b_size, n_layers, k = sprite_rgb.shape[:3]
    choices, bg_choices = [], []
    for b in range(b_size):
        rgb = [backgrounds[b, 0]] + [torch.zeros_like(image[b])] * n_layers
        alpha = [torch.ones_like(image[b, :1])] + [torch.zeros_like(image[b, :1])] * n_layers
        choice, bg_choice = [None] * n_layers, 0

        def error(rgb, alpha, b=b):
            recon = compose_loop(torch.stack(rgb), torch.stack(alpha), occ[b])
            return ((image[b] - recon) ** 2).mean()

        for _ in range(passes):
            if backgrounds.shape[1] > 1:
                errs = [
                    error([backgrounds[b, m], *rgb[1:]], alpha) for m in range(len(backgrounds[b]))
                ]
                bg_choice = int(torch.stack(errs).argmin())
                rgb[0] = backgrounds[b, bg_choice]
            for layer in range(n_layers):
                best, best_err = None, None
                for cand in range(k):
                    trial_rgb, trial_alpha = list(rgb), list(alpha)
                    trial_rgb[layer + 1] = sprite_rgb[b, layer, cand]
                    trial_alpha[layer + 1] = sprite_alpha[b, layer, cand]
                    err = error(trial_rgb, trial_alpha) + penalty[cand]
                    if best_err is None or err < best_err:
                        best, best_err = cand, err
                choice[layer] = best
                rgb[layer + 1] = sprite_rgb[b, layer, best]
                alpha[layer + 1] = sprite_alpha[b, layer, best]
        choices.append(choice)
        bg_choices.append(bg_choice)
    return torch.tensor(choices), torch.tensor(bg_choices)


@pytest.mark.parametrize(
    ("n_layers", "k", "m", "passes", "empty", "occlusion"),
    [
        (3, 5, 1, 1, False, "fixed"),
        (3, 4, 1, 3, True, "predicted"),
        (4, 3, 2, 2, True, "predicted"),
        (2, 6, 3, 3, False, "fixed"),
    ],
)
def test_batched_greedy_matches_reference(n_layers, k, m, passes, empty, occlusion):
    torch.manual_seed(n_layers * 100 + k)
    b, size = 6, 5
    image = torch.rand(b, 3, size, size)
    sprite_rgb = torch.rand(b, n_layers, k, 3, size, size)
    sprite_alpha = torch.rand(b, n_layers, k, 1, size, size) ** 3  # sparse-ish masks
    penalty = torch.full((k,), 1e-2)
    if empty:
        sprite_rgb[:, :, -1] = 0
        sprite_alpha[:, :, -1] = 0
        penalty[-1] = 0
    backgrounds = torch.rand(b, m, 3, size, size)
    occ = (
        random_occlusion(b, n_layers)
        if occlusion == "predicted"
        else Occlusion(n_layers, "fixed")(torch.rand(b, 4))
    )
    # The batched selection scores the empty sprite without a rendered candidate.
    k0 = k - 1 if empty else k
    choice, bg = greedy_select(
        image, sprite_rgb[:, :, :k0], sprite_alpha[:, :, :k0], backgrounds, occ, passes, penalty
    )
    ref_choice, ref_bg = reference_greedy(
        image, sprite_rgb, sprite_alpha, backgrounds, occ, passes, penalty
    )
    assert torch.equal(choice, ref_choice)
    assert torch.equal(bg, ref_bg)


def test_single_layer_greedy_and_exhaustive_equal_the_exhaustive_minimum():
    torch.manual_seed(1)
    b, k, m, size = 8, 5, 3, 5
    image = torch.rand(b, 3, size, size)
    rgb = torch.rand(b, k, 3, size, size)
    alpha = torch.rand(b, k, 1, size, size)
    backgrounds = torch.rand(b, m, 3, size, size)
    penalty = torch.zeros(k)
    sprite, bg = exhaustive_select(image, rgb, alpha, backgrounds, penalty)
    for i in range(b):
        errs = torch.zeros(k, m)
        for s in range(k):
            for j in range(m):
                recon = alpha[i, s] * rgb[i, s] + (1 - alpha[i, s]) * backgrounds[i, j]
                errs[s, j] = ((image[i] - recon) ** 2).mean()
        best = errs.argmin()
        assert (int(sprite[i]), int(bg[i])) == (int(best // m), int(best % m))
    # With a single background, one greedy pass is the exhaustive minimum too.
    occ = Occlusion(1, "fixed")(torch.rand(b, 4))
    greedy, _ = greedy_select(
        image, rgb[:, None], alpha[:, None], backgrounds[:, :1], occ, 1, penalty
    )
    exhaustive, _ = exhaustive_select(image, rgb, alpha, backgrounds[:, :1], penalty)
    assert torch.equal(greedy[:, 0], exhaustive)


def test_label_maps_hand_made():
    # Two 4×4 squares on a 6×6 image overlapping in the centre; layer 2 hides layer 1.
    alpha = torch.zeros(1, 2, 1, 6, 6)
    alpha[0, 0, 0, 0:4, 0:4] = 0.9
    alpha[0, 1, 0, 2:6, 2:6] = 0.8
    alpha[0, 0, 0, 0, 0] = 0.4  # below 0.5: background
    occ = Occlusion(2, "fixed")(torch.rand(1, 4))
    labels = label_maps(alpha, occ)[0]
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[0:4, 0:4] = 1
    expected[2:6, 2:6] = 2
    expected[0, 0] = 0
    assert torch.equal(labels, expected)
    # Reverse the occlusion: layer 1 in front of layer 2.
    occ_rev = occ.clone()
    occ_rev[0, 1, 2], occ_rev[0, 2, 1] = 1.0, 0.0
    expected[2:6, 2:6] = 2
    expected[0:4, 0:4] = 1
    expected[0, 0] = 0
    assert torch.equal(label_maps(alpha, occ_rev)[0], expected)


def test_exhaustive_scores_the_empty_sprite_like_a_zero_candidate():
    torch.manual_seed(2)
    b, k0, m, size = 8, 3, 2, 5
    image = torch.rand(b, 3, size, size)
    rgb = torch.rand(b, k0, 3, size, size)
    alpha = torch.rand(b, k0, 1, size, size)
    backgrounds = torch.rand(b, m, 3, size, size)
    image[:4] = backgrounds[:4, 1]  # these images are best explained by the background alone
    penalty = torch.tensor([1e-3] * k0 + [0.0])
    zeros = torch.zeros_like(rgb[:, :1])
    explicit = exhaustive_select(
        image,
        torch.cat([rgb, zeros], 1),
        torch.cat([alpha, zeros[:, :, :1]], 1),
        backgrounds,
        penalty,
    )
    virtual = exhaustive_select(image, rgb, alpha, backgrounds, penalty)
    assert torch.equal(explicit[0], virtual[0]) and torch.equal(explicit[1], virtual[1])
    assert (virtual[0][:4] == k0).all() and (virtual[1][:4] == 1).all()


def test_order_search_puts_the_layer_the_image_shows_in_front():
    # Three layers on a black 6×6 image: red (0..3) overlaps green (2..5) in rows 2..3;
    # blue sits apart. The image shows green in front; the occlusion starts undecided (0.5)
    # for every pair, and red-over-green in image 1.
    rgb = torch.zeros(2, 4, 3, 6, 6)
    alpha = torch.zeros(2, 4, 1, 6, 6)
    alpha[:, 0] = 1  # the black background
    for layer, channel, rows, cols in ((1, 0, (0, 4), (0, 4)), (2, 1, (2, 6), (2, 6))):
        rgb[:, layer, channel] = 1
        alpha[:, layer, 0, rows[0] : rows[1], cols[0] : cols[1]] = 1
    rgb[:, 3, 2] = 1
    alpha[:, 3, 0, 0:2, 4:6] = 1
    occ = Occlusion(3, "fixed")(torch.rand(2, 4)).clone()
    occ[:, 1:, 1:] = 0.5 * (1 - torch.eye(3))
    occ[1, 1, 2], occ[1, 2, 1] = 1.0, 0.0  # image 1: red hides green
    green_front = occ[:1].clone()
    green_front[0, 2, 1], green_front[0, 1, 2] = 1.0, 0.0
    image = compose(rgb[:1], alpha[:1], green_front).expand(2, -1, -1, -1)
    found = order_search(image, rgb, alpha, occ)
    for b in range(2):
        assert found[b, 2, 1] == 1 and found[b, 1, 2] == 0  # green hides red
        torch.testing.assert_close(
            compose(rgb[b : b + 1], alpha[b : b + 1], found[b : b + 1]), image[:1]
        )
    # blue overlaps nobody: every order explains the image alike, so its pairs keep 0.5
    assert (found[:, 3, 1:3] == 0.5).all() and (found[:, 1:3, 3] == 0.5).all()
    assert torch.equal(found[:, :, 0], occ[:, :, 0]) and torch.equal(found[:, 0], occ[:, 0])
