"""The small model that the training tests share: 20×20 images, 3 sprites + empty, 2 layers,
one background, predicted occlusion, a similarity per sprite and a colour per background.
Tests change what they need with ``{**SMALL_MODEL, key: value}``."""

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
