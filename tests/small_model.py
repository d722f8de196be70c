"""Small models the tests share.

``CONFIGS``: small versions of the paper's configurations (and the fast recipe's switches), for
the model's own tests. ``SMALL_MODEL``: the small model that the training tests share: 20×20
images, 3 sprites + empty, 2 layers, one background, predicted occlusion, a similarity per
sprite and a colour per background. Tests change what they need with
``{**SMALL_MODEL, key: value}``. ``quiet_trainer``: a CPU Trainer that writes nothing but
what a test asks for.
"""

import lightning as L
import torch

from dti_sprites.heatmap import HeatmapPosition
from dti_sprites.transforms import GroupedMLP

SMALL_MODEL = dict(
    image_size=20,
    n_sprites=3,
    n_layers=2,
    n_backgrounds=1,
    sprite_size=12,
    mask_std=3,
    empty_sprite=True,
    occlusion="predicted",
    greedy_passes=1,
    sprite_transforms=["similarity"],
    background_transforms=["color"],
)


# Small versions of the paper's configurations (docs/method.md §7).
CONFIGS = {
    "tetrominoes": dict(
        image_size=20, n_sprites=4, n_layers=3, n_backgrounds=0, sprite_size=12, mask_std=3
    ),
    "multidsprites": dict(
        image_size=16,
        n_sprites=3,
        n_layers=3,
        n_backgrounds=1,
        sprite_size=10,
        mask_std=3,
        empty_sprite=True,
        pool=2,
        sprite_transforms=["similarity"],
        background_transforms=["color"],
        occlusion="predicted",
        greedy_passes=3,
    ),
    "multidsprites_orientations": dict(  # the fast recipe's orientation candidates
        image_size=16,
        n_sprites=3,
        n_layers=3,
        n_backgrounds=1,
        sprite_size=10,
        mask_std=3,
        empty_sprite=True,
        pool=2,
        sprite_transforms=["similarity"],
        background_transforms=["color"],
        occlusion="predicted",
        greedy_passes=3,
        orientations=4,
    ),
    "multidsprites_heatmap": dict(  # the fast recipe's heat-map positions and glimpses
        image_size=16,
        n_sprites=3,
        n_layers=3,
        n_backgrounds=1,
        sprite_size=10,
        mask_std=3,
        empty_sprite=True,
        pool=2,
        sprite_transforms=["similarity"],
        background_transforms=["color"],
        occlusion="predicted",
        greedy_passes=3,
        position_head="heatmap",
        heatmap_features=True,
    ),
    "clevr6": dict(
        image_size=16,
        n_sprites=3,
        n_layers=3,
        n_backgrounds=2,
        sprite_size=10,
        mask_std=3,
        empty_sprite=True,
        encoder="resnet18",
        pool=2,
        sprite_transforms=["projective"],
        background_transforms=["color"],
        occlusion="predicted",
        greedy_passes=2,
        background_init="mean",
    ),
    "gtsrb8": dict(
        image_size=12,
        n_sprites=3,
        n_layers=1,
        n_backgrounds=1,
        sprite_size=12,
        mask_std=3,
        layer_transforms=[],
        sprite_transforms=["color", "projective", "tps"],
        background_transforms=["color", "projective", "tps"],
    ),
}


def randomise_heads(model):
    """Break the zero init of the last layers (and the identical sprites) so that every
    parameter can get a gradient."""
    torch.manual_seed(0)
    model.sprites.appearance.data.uniform_()
    for module in model.modules():
        if isinstance(module, GroupedMLP):
            module.weights[-1].data.normal_(0, 0.05)
            module.biases[-1].data.normal_(0, 0.05)
        if isinstance(module, HeatmapPosition):  # soft heat maps: logits of std about 1 here
            module.conv.weight.data.normal_(0, 0.005)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """One epoch, no logger, progress bar, model summary or checkpoints; ``kwargs`` override."""
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**defaults, **kwargs})
