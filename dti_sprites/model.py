"""DTISprites: an image → layers of transformed sprites over a background.

Shapes: B batch, L layers, K sprites incl. the empty one (K0 learned), M backgrounds,
C = 3 channels, H×W image, h×w sprite canvas, F encoder features, P transformation parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn
from torch.nn import functional as F

from dti_sprites.compose import (
    Occlusion,
    OcclusionMode,
    compose,
    greedy_select,
    label_maps,
    order_search,
)
from dti_sprites.encoders import Encoder, EncoderName
from dti_sprites.heatmap import HeatmapPosition
from dti_sprites.io import atomic_write
from dti_sprites.sprites import BackgroundInit, Backgrounds, SpriteBank, softclip
from dti_sprites.transforms import (
    TRANSFORM_NAMES,
    GroupedMLP,
    PositionTransform,
    TransformName,
    TransformSequence,
    pose_params,
)

ParamSlice = tuple[nn.Parameter, tuple[int | slice, ...]]
PositionHead = Literal["mlp", "heatmap"]


def plain(value: Any) -> Any:
    """Builtin types for checkpoints: a typed argument such as jsonargparse's ``PositiveInt(3)``
    becomes ``3`` (``torch.load(weights_only=True)`` refuses unknown classes), tuples lists."""
    if isinstance(value, bool | str | None):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclass
class Decomposition:
    """What the model explains an image batch with.

    Attributes:
        reconstruction: (B, C, H, W) composite of the selected sprites and background.
        layers: (B, L, C+1, H, W) RGBA of the selected sprite of each layer (zeros if empty).
        background: (B, C, H, W) the selected, transformed background.
        occlusion: (B, L+1, L+1) occ[j, i], how much layer j hides layer i (0 = background).
        sprite_choice: (B, L) int64 sprite index per layer, −1 for the empty sprite.
        background_choice: (B,) int64 background index.
        mse: (B,) per-image reconstruction error (differentiable).
        params: parameters of the selected transformations, e.g. ``layer/position`` (B, L, 3),
            ``sprite/similarity`` (B, L, 4), ``background/color`` (B, 6); with a placement
            search, ``layer/position`` is where the layers were drawn.
        placement: the placement search's distillation loss (a scalar, weighted), None when
            no search ran (``DTISprites(placement_search=…)``).
    """

    reconstruction: Tensor
    layers: Tensor
    background: Tensor
    occlusion: Tensor
    sprite_choice: Tensor
    background_choice: Tensor
    mse: Tensor
    params: dict[str, Tensor] = field(default_factory=dict)
    placement: Tensor | None = None
    _instance: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def n_nonempty(self) -> Tensor:
        """Non-empty sprites per image. (B,)"""
        return (self.sprite_choice >= 0).sum(1)

    def instance(self) -> Tensor:
        """Instance labels (B, H, W): 0 = background, l + 1 = layer l (docs/method.md §9).

        Computed once (``semantic``, ``instance_fg`` and the metrics all start from it)."""
        if self._instance is None:
            self._instance = label_maps(self.layers[:, :, -1:].detach(), self.occlusion.detach())
        return self._instance

    def semantic(self) -> Tensor:
        """Semantic labels (B, H, W): 0 = background, k + 1 = sprite k."""
        instance = self.instance()
        classes = torch.cat([torch.full_like(self.sprite_choice[:, :1], -1), self.sprite_choice], 1)
        return torch.gather(classes, 1, instance.flatten(1)).view_as(instance) + 1

    def to_arrays(self, image: Tensor) -> dict[str, np.ndarray]:
        """The arrays of ``predictions.h5`` (uint8 images, numpy, on the CPU).

        image: the decomposed batch (B, C, H, W) in [0, 1], for ``instance_fg``.
        ``reconstruction`` (B,H,W,3) uint8, ``instance`` (B,H,W) uint8 (0 = background, l+1 =
        layer l: ARI), ``instance_fg`` (B,H,W) uint8 (1..L, background pixels given to the
        best-coloured layer: ARI-FG), ``semantic`` (B,H,W) uint8 (0 = background, k+1 = sprite
        k: mACC, mIoU), ``layers`` (B,L,H,W,4) uint8 RGBA, ``sprite_choice`` (B,L) int16
        (−1 = empty).
        """

        def to_uint8(x: Tensor) -> np.ndarray:
            return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

        return {
            "reconstruction": to_uint8(self.reconstruction.permute(0, 2, 3, 1)),  # (B, H, W, 3)
            "instance": self.instance().to(torch.uint8).cpu().numpy(),
            "instance_fg": self.instance_fg(image).to(torch.uint8).cpu().numpy(),
            "semantic": self.semantic().to(torch.uint8).cpu().numpy(),
            "layers": to_uint8(self.layers.permute(0, 1, 3, 4, 2)),  # (B, L, H, W, 4)
            "sprite_choice": self.sprite_choice.to(torch.int16).cpu().numpy(),
        }

    def instance_fg(self, image: Tensor) -> Tensor:
        """Instance labels with predicted-background pixels given to the best-fitting layer.

        Used for ARI-FG, as in the paper: a pixel labelled background goes to the non-empty
        layer whose colour is closest to the input there. image (B, C, H, W) -> (B, H, W) in
        1..L.
        """
        instance = self.instance()
        dist = (self.layers[:, :, :-1].detach() - image[:, None]).pow(2).sum(2)  # (B, L, H, W)
        empty = (self.sprite_choice < 0)[..., None, None]
        dist = dist.masked_fill(empty, float("inf"))
        return torch.where(instance > 0, instance, dist.argmin(1) + 1)


class DTISprites(nn.Module):
    """The layered sprite model of DTI-Sprites (Monnier et al., ICCV 2021).

    Multi-object mode (``n_layers`` > 1) selects one sprite per layer by greedy coordinate
    descent; single-object mode (``n_layers`` = 1) takes the best of all sprite × background
    candidates. Selection runs without gradients over all candidates; only the selected
    sprites are rendered with gradients (same gradients as rendering all).

    Args:
        image_size: H = W of the images.
        n_sprites: K0, learned sprites.
        n_layers: L, sprite layers.
        n_backgrounds: M; 0 means a fixed black background.
        sprite_size: h = w of the sprite canvas (≤ image_size).
        mask_std: std of the Gaussian mask initialisation, in pixels.
        empty_sprite: add the empty sprite as a candidate.
        encoder: CIFAR-style ``resnet32`` (small images; ``resnet8``, ``resnet14``, ``resnet20``
            are shallower and faster) or torchvision-style ``resnet18``.
        pool: adaptive pooling size of the encoder output (F = channels · pool²).
        layer_transforms: per-layer transformation, shared by the sprites of a layer.
        sprite_transforms: per (layer, sprite) transformation, applied before the layer's.
        background_transforms: per-background transformation.
        occlusion: ``fixed`` (higher layer in front) or ``predicted``.
        greedy_passes: passes of the greedy selection over the layers.
        empty_penalty: λ, the cost of a non-empty sprite in the selection.
        mask_noise: amplitude of the uniform noise added to warped masks in training.
        sprite_init: initial value of the sprite appearances.
        background_init: ``constant``, ``noise``, or data-dependent ``mean`` / ``sample``.
        background_value: value of the ``constant`` background init.
        hidden: width of the transformation and occlusion heads.
        orientations: with n > 1, every sprite is a candidate at n orientations (turns of
            2πr/n before its predicted similarity / affine transformation, which must be the
            first geometric sprite transformation), and the selection picks the orientation
            with the sprite: the network only has to predict the rest of the rotation (under
            π/n). Not in the paper: a fast-recipe switch (docs/method.md §11); the selection
            scores n times more candidates. Off (0, 1) while that transformation is inactive.
        candidate_sizes: with sizes (s₁, …), every sprite (at every orientation) is also a
            candidate drawn s times the size its similarity / affine transformation predicts
            (scaled about the canvas centre before that transformation, which must come first
            as for ``orientations``), and the selection picks the size with the sprite, so a
            sprite need not stand for a size while the network cannot predict one yet. Not in
            the paper: a fast-recipe switch (docs/method.md §11); the selection scores
            len(sizes) times more candidates. Off (empty) in the paper configs.
        compile: compile the encoder and the greedy selection with ``torch.compile`` (fused
            kernels; the first steps pay the compilation). Same arithmetic up to floating-point
            reassociation, so a near-tie may choose differently: off in the paper configs.
        select_downscale: with f > 1 the selection renders and scores the candidates at
            (H/f)×(W/f) (the image and backgrounds area-averaged, the candidates sampled on
            the coarse grid), f² times fewer pixels; the chosen sprites are then rendered at
            full size, so the loss and its gradients are the paper's for those choices. Not in
            the paper: a fast-recipe switch (docs/method.md §11), 1 (off) in the paper configs.
            f must divide ``image_size``, and ``layer_transforms`` must end with ``position``
            (``color`` may follow it).
        empty_while_frozen: keep the empty sprite a candidate while the sprites are frozen
            (the paper drops it then, λ being off): a layer with no object left to take can
            stay empty instead of drawing a frozen blob over the background or over an object
            that another layer holds. Not in the paper: a fast-recipe switch (docs/method.md
            §11), off in the paper configs; needs ``empty_sprite``.
        placement_search: with r > 0, while the sprites are frozen and in training, every
            layer is also a selection candidate drawn at the offsets of a (2r+1)×(2r+1) grid
            around its predicted position (``placement_step`` pixels apart), and the network's
            predicted translation is pulled toward the offset chosen (``placement_weight`` ×
            the squared distance, in canvas units; moves end at the image's edge, empty layers
            are not pulled): non-local moves for layers whose frozen blob is too far from an
            object for the reconstruction's gradient to reach it.
            Identical frozen sprites are rendered once. Not in the paper: a fast-recipe switch
            (docs/method.md §11), 0 (off) in the paper configs; needs ``position``.
        placement_step: the spacing of the placement search's offsets, in pixels.
        placement_weight: the weight of the placement search's distillation loss.
        placement_fitted_colour: score each placement candidate with its best flat colour
            (the alpha-weighted mean of the image under it) instead of the layer's predicted
            colour, so a blob is judged by its place and shape alone; the layer is still drawn
            in its predicted colour.
        position_head: how the layers' translations are predicted: ``mlp`` (the paper: each
            layer's head reads the pooled features) or ``heatmap`` (each layer's canvas centre
            is the expected location of a heat map over the unpooled feature map, a spatial
            soft-argmax: :class:`~dti_sprites.heatmap.HeatmapPosition`; the MLP still predicts
            the scale). Not in the paper: a fast-recipe switch (docs/method.md §11), ``mlp`` in
            the paper configs; ``heatmap`` needs ``position``.
        heatmap_gain: the factor on the heat maps' logits (their learning speed under Adam).
        heatmap_features: the layer's and its sprites' transformation heads also read the
            layer's glimpse, the features its heat map pools (an object's colour, size and
            rotation are where it is, not in the image's pooled features). Needs
            ``position_head='heatmap'``; a fast-recipe switch, off in the paper configs.
        pose_refinement: in eval mode, refine the selected layers' transformation parameters
            by this many Adam steps on the image's reconstruction error
            (:meth:`set_pose_refinement`): a layer the network draws a pixel off its object
            slides onto it. Training is unchanged. Not in the paper: an inference-time switch
            (docs/method.md §11), 0 (off) in the paper configs.
        pose_refinement_lr: the refinement's Adam learning rate, in parameter units.
        pose_refinement_rounds: select and refine this many times (each selection with the
            layers where the last refinement left them).
        order_search: in eval mode, after each refinement, set each pair of layers' occlusion
            to whichever order explains the image better (:func:`compose.order_search`).
        residual_placement: with t > 0 and rounds > 1, before each new selection every empty
            layer is moved onto a peak of the residual above t, in the image's colour there
            (:meth:`set_pose_refinement`): an object that no layer drew can get its own.
    """

    def __init__(
        self,
        image_size: PositiveInt = 35,
        n_sprites: PositiveInt = 19,
        n_layers: PositiveInt = 3,
        n_backgrounds: NonNegativeInt = 0,
        sprite_size: PositiveInt = 24,
        mask_std: PositiveFloat = 5.0,
        empty_sprite: bool = False,
        encoder: EncoderName = "resnet32",
        pool: PositiveInt = 1,
        layer_transforms: Sequence[TransformName] = ("color", "position"),
        sprite_transforms: Sequence[TransformName] = (),
        background_transforms: Sequence[TransformName] = (),
        occlusion: OcclusionMode = "fixed",
        greedy_passes: PositiveInt = 1,
        empty_penalty: NonNegativeFloat = 1e-4,
        mask_noise: NonNegativeFloat = 0.4,
        sprite_init: float = 0.9,
        background_init: BackgroundInit = "constant",
        background_value: float = 0.5,
        hidden: PositiveInt = 128,
        orientations: NonNegativeInt = 0,
        candidate_sizes: Sequence[PositiveFloat] = (),
        compile: bool = False,
        select_downscale: PositiveInt = 1,
        empty_while_frozen: bool = False,
        placement_search: NonNegativeInt = 0,
        placement_step: PositiveFloat = 8.0,
        placement_weight: NonNegativeFloat = 1.0,
        placement_fitted_colour: bool = False,
        position_head: PositionHead = "mlp",
        heatmap_gain: PositiveFloat = 10.0,
        heatmap_features: bool = False,
        pose_refinement: NonNegativeInt = 0,
        pose_refinement_lr: PositiveFloat = 0.02,
        pose_refinement_rounds: PositiveInt = 1,
        order_search: bool = False,
        residual_placement: NonNegativeFloat = 0.0,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self._check(config)
        # Plain init arguments, stored in checkpoints so a model can be rebuilt without a config.
        self.config = {k: plain(v) for k, v in config.items()}
        size, canvas = (image_size, image_size), (sprite_size, sprite_size)
        self.image_size, self.n_layers = image_size, n_layers
        self.greedy_passes, self.empty_penalty, self.mask_noise = (
            greedy_passes,
            empty_penalty,
            mask_noise,
        )
        self.encoder = Encoder(encoder, pool)
        n_features = self.encoder.out_features
        self.sprites = SpriteBank(n_sprites, canvas, mask_std, empty_sprite, sprite_init)
        self.backgrounds = Backgrounds(n_backgrounds, size, background_init, background_value)
        local = self.encoder.channels if heatmap_features else 0  # F' of the glimpses
        self.layer_transforms = TransformSequence(
            layer_transforms, n_layers, n_features, canvas, size, hidden, local
        )
        self.sprite_transforms = TransformSequence(
            sprite_transforms, n_layers * n_sprites, n_features, canvas, canvas, hidden, local
        )
        self.background_transforms = TransformSequence(
            background_transforms if n_backgrounds else (),
            max(n_backgrounds, 1),
            n_features,
            size,
            size,
            hidden,
        )
        n_pairs = n_layers * (n_layers - 1) // 2
        head = GroupedMLP(1, n_features, n_pairs, hidden) if occlusion == "predicted" else None
        self.occlusion = Occlusion(n_layers, occlusion, head if n_pairs else None)
        self.heatmap = (
            HeatmapPosition(n_layers, self.encoder.channels, heatmap_gain)
            if position_head == "heatmap"
            else None
        )
        self.register_buffer("sprites_frozen", torch.tensor(False))
        self.set_orientations(orientations, candidate_sizes)
        self.select_downscale = int(select_downscale)
        self.empty_while_frozen = bool(empty_while_frozen)
        self.placement_search = int(placement_search)
        self.placement_step = float(placement_step)
        self.placement_weight = float(placement_weight)
        self.placement_fitted_colour = bool(placement_fitted_colour)
        self.placement_at_inference = False  # set_placement_search: a search in eval mode too
        self.set_pose_refinement(
            pose_refinement,
            pose_refinement_lr,
            pose_refinement_rounds,
            order_search,
            residual_placement,
        )
        self.heatmap_features = bool(heatmap_features)
        self._greedy = greedy_select
        if compile:
            self.encoder.compile()  # in place: the state dict keys stay the same
            self._greedy = torch.compile(greedy_select, dynamic=False)

    @staticmethod
    def _check_placement(radius: int, layer_transforms: Sequence[str]) -> None:
        if radius > 0 and "position" not in layer_transforms:
            raise ValueError(
                "placement_search > 0 moves the layers' 'position': add it to layer_transforms, "
                f"got {list(layer_transforms)}"
            )

    @staticmethod
    def _check(args: dict) -> None:
        """Reject inconsistent hyper-parameters, naming the key."""
        if args["n_sprites"] < 1:
            raise ValueError(f"n_sprites must be >= 1, got {args['n_sprites']}")
        if args["empty_penalty"] < 0:
            raise ValueError(f"empty_penalty (λ) must be >= 0, got {args['empty_penalty']}")
        if args["sprite_size"] > args["image_size"]:
            raise ValueError(
                f"sprite_size ({args['sprite_size']}) must not exceed "
                f"image_size ({args['image_size']})"
            )
        for key in ("layer_transforms", "sprite_transforms", "background_transforms"):
            for name in args[key]:
                if name not in TRANSFORM_NAMES:
                    raise ValueError(
                        f"{key}: unknown transformation {name!r}; expected one of {TRANSFORM_NAMES}"
                    )
        if "position" in args["sprite_transforms"] or "position" in args["background_transforms"]:
            raise ValueError("'position' is a layer transformation (canvas → image) only")
        if args["sprite_size"] != args["image_size"] and "position" not in args["layer_transforms"]:
            raise ValueError(
                "layer_transforms needs 'position' when sprite_size != image_size "
                f"({args['sprite_size']} != {args['image_size']})"
            )
        f = args["select_downscale"]
        if f > 1 and args["image_size"] % f:
            raise ValueError(
                f"select_downscale ({f}) must divide image_size ({args['image_size']})"
            )
        if f > 1 and not TransformSequence.can_resize(args["layer_transforms"]):
            raise ValueError(
                f"select_downscale > 1 needs layer_transforms ending with 'position' (then only "
                f"'color'), got {list(args['layer_transforms'])}"
            )
        DTISprites._check_placement(args["placement_search"], args["layer_transforms"])
        if args["position_head"] not in get_args(PositionHead):
            raise ValueError(
                f"position_head: unknown head {args['position_head']!r}; expected one of "
                f"{get_args(PositionHead)}"
            )
        if args["position_head"] == "heatmap" and "position" not in args["layer_transforms"]:
            raise ValueError(
                "position_head='heatmap' places the layers' 'position': add it to "
                f"layer_transforms, got {list(args['layer_transforms'])}"
            )
        if args["heatmap_features"] and args["position_head"] != "heatmap":
            raise ValueError("heatmap_features needs position_head='heatmap'")
        if args["empty_while_frozen"] and not args["empty_sprite"]:
            raise ValueError("empty_while_frozen needs empty_sprite=True")
        if args["occlusion"] == "predicted" and args["n_layers"] < 2:
            raise ValueError("occlusion='predicted' needs n_layers >= 2")

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> DTISprites:
        """Rebuild a trained model from a training checkpoint, or from the weights file of
        :meth:`save_weights` (no config needed)."""
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        if "dti_sprites_model" not in checkpoint:
            raise ValueError(f"{path}: not a dti-sprites training checkpoint")
        model = cls(**checkpoint["dti_sprites_model"])
        prefix = "model."
        state = {
            k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
        }
        model.load_state_dict(state)
        return model.eval()

    def save_weights(self, path: str | Path) -> None:
        """Write the weights alone (no optimizer, callback or training state), in the layout
        :meth:`from_checkpoint` reads: the init arguments and the state dict (buffers included,
        so the layer count in use and the frozen flag come back). Written atomically."""
        state = {f"model.{k}": v.detach().cpu().clone() for k, v in self.state_dict().items()}
        with atomic_write(path) as tmp:
            torch.save({"dti_sprites_model": self.config, "state_dict": state}, tmp)

    # ----------------------------------------------------------------------------- schedule
    @property
    def n_candidates(self) -> int:
        """K, sprites incl. the empty one."""
        return self.sprites.n_candidates

    def freeze_sprites(self, frozen: bool) -> None:
        """Frozen sprites get no gradient; the empty sprite is no candidate and λ is off."""
        self.sprites_frozen.fill_(frozen)

    def transform_groups(self) -> dict[str, TransformSequence]:
        """The three transformation sequences, by the names the curriculum uses."""
        return {
            "layer": self.layer_transforms,
            "sprite": self.sprite_transforms,
            "background": self.background_transforms,
        }

    def sprite_slices(self, k: int) -> list[ParamSlice]:
        """Every parameter slice that belongs to sprite k: appearance, mask, and its heads."""
        slices: list[ParamSlice] = [(self.sprites.appearance, (k,)), (self.sprites.mask, (k,))]
        k0 = self.sprites.n_sprites
        for head in self.sprite_transforms.heads:
            for layer in range(self.n_layers):
                slices += head.group_slices(layer * k0 + k)
        return slices

    @torch.no_grad()
    def reset_layer(self, layer: int) -> list[ParamSlice]:
        """Put layer ``layer`` back at its initial placement and colour, for every image.

        Zeroes the output layer of each of its layer-transformation heads, so they predict zero
        parameters again (the canvas centred on half the image, the colour unchanged) while
        their hidden layers and the shared encoder keep what they learned. Returns the zeroed
        slices, for resetting their optimizer state too.
        """
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {self.n_layers}")
        slices = [s for head in self.layer_transforms.heads for s in head.output_slices(layer)]
        if self.heatmap is not None:
            slices += self.heatmap.output_slices(layer)
        for param, index in slices:
            param[index] = 0
        return slices

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not change now: frozen sprites, heads of inactive modules."""
        idle = [self.sprites.appearance, self.sprites.mask] if bool(self.sprites_frozen) else []
        for sequence in self.transform_groups().values():
            idle += sequence.idle_parameters()
        return idle

    @torch.no_grad()
    def copy_sprite(self, src: int, dst: int, noise: Tensor) -> list[tuple[ParamSlice, ParamSlice]]:
        """Replace sprite ``dst`` by a copy of ``src`` (appearance + ``noise`` (C, h, w)).

        Returns the (source, destination) slice pairs, for copying optimizer state too.
        """
        pairs = list(zip(self.sprite_slices(src), self.sprite_slices(dst), strict=True))
        for (param, i_src), (_, i_dst) in pairs:
            param[i_dst] = param[i_src]
        self.sprites.appearance[dst] += noise.to(self.sprites.appearance)
        return pairs

    def to_canvas(self, stacks: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Image-space stacks of each layer back into its sprite's own frame (the inverse warp).

        stacks (B, L, C', H, W), e.g. the input image or a layer's support repeated per layer;
        params: a :class:`Decomposition`'s ``params`` (its ``layer/*`` and ``sprite/*``
        entries, (B, L, P): those of the selected sprite). Returns (B, L, C', h, w): what the
        selected sprite would have to draw there. Undoes the geometry of the layer
        transformation, then that of the sprite transformation (where active), both through
        ``TransformSequence.inverse``; colour is not undone.
        """
        b, n_layers = stacks.shape[:2]

        def flat(group: str, sequence: TransformSequence) -> list[Tensor | None]:
            found = [params.get(f"{group}/{name}") for name in sequence.names]
            return [None if p is None else p.reshape(b * n_layers, -1) for p in found]

        x = stacks.reshape(b * n_layers, 1, *stacks.shape[2:])  # (B·L, 1, C', H, W)
        x = self.layer_transforms.inverse(x, flat("layer", self.layer_transforms))
        if len(self.sprite_transforms):  # (B·L, 1, C', h, w) canvas -> sprite frame
            x = self.sprite_transforms.inverse(x, flat("sprite", self.sprite_transforms))
        return x.view(b, n_layers, *x.shape[2:])  # (B, L, C', h, w)

    # ------------------------------------------------------------------------------ forward
    @property
    def active_penalty(self) -> float:
        """λ where it applies now: 0 while sprites are frozen (the empty sprite is no candidate)."""
        return 0.0 if bool(self.sprites_frozen) else float(self.empty_penalty)

    def candidate_penalty(self) -> Tensor:
        """λ per candidate (K,): λ for sprites, 0 for the empty one (inf while frozen, unless
        ``empty_while_frozen``)."""
        k0 = self.sprites.n_sprites
        penalty = torch.full((self.n_candidates,), self.active_penalty)
        if self.sprites.empty_sprite:
            dropped = bool(self.sprites_frozen) and not self.empty_while_frozen
            penalty[k0] = float("inf") if dropped else 0.0
        return penalty.to(self.sprites_frozen.device)

    def set_orientations(
        self, orientations: int, candidate_sizes: Sequence[float] | None = None
    ) -> None:
        """Try every sprite at ``orientations`` turns (and, when given, at ``candidate_sizes``)
        in the selection from now on (docs/method.md §11), e.g. a wider search at inference
        than in training; 0 or 1 orientations and no sizes: every sprite as predicted."""
        sizes = self.candidate_sizes if candidate_sizes is None else tuple(candidate_sizes)
        if any(size <= 0 for size in sizes):
            raise ValueError(f"candidate_sizes must be positive, got {list(sizes)}")
        geometric = [
            i for i, name in enumerate(self.sprite_transforms.names) if name != "color"
        ]  # the first one takes the turns and sizes
        posed = orientations > 1 or len(sizes) > 0
        if posed and (
            not geometric
            or self.sprite_transforms.names[geometric[0]] not in ("similarity", "affine")
        ):
            raise ValueError(
                "orientations > 1 or candidate_sizes need 'similarity' or 'affine' as the first "
                f"geometric sprite transformation, got {self.sprite_transforms.names}"
            )
        self._turned = geometric[0] if posed else None
        self.orientations = int(orientations)
        self.candidate_sizes = tuple(float(size) for size in sizes)

    def set_placement_search(self, radius: int, step: float) -> None:
        """Run the placement search (``placement_search`` = ``radius``, ``placement_step`` =
        ``step`` pixels) in eval mode from now on, whatever the sprites' freeze: every layer
        is drawn at the best offset of the grid around its predicted position, e.g. a fine
        grid at inference to see what a more precise placement would give; 0 switches it off.
        The radius and step hold in training too, where the search runs only while the
        sprites are frozen."""
        if radius < 0 or step <= 0:
            raise ValueError(f"need radius >= 0 and step > 0, got {radius} and {step}")
        self._check_placement(radius, self.layer_transforms.names)
        self.placement_search = int(radius)
        self.placement_step = float(step)
        self.placement_at_inference = radius > 0

    def set_pose_refinement(
        self,
        steps: int,
        lr: float = 0.02,
        rounds: int = 1,
        order_search: bool = False,
        residual_placement: float = 0.0,
    ) -> None:
        """Refine the selection in eval mode from now on (docs/method.md §11).

        After the selection, ``steps`` Adam steps (learning rate ``lr``, in parameter units)
        on the selected layers', sprites' and background's transformation parameters (pose
        and colour) at once minimise each image's reconstruction error, the sprites, their
        choice and the occlusion fixed. The network's prediction is the starting point, so a
        layer drawn a pixel off its object slides onto it. With ``order_search`` each pair of
        layers then takes the occlusion order that explains the image better. With
        ``rounds`` > 1 the selection runs again (the layers where the last round left them,
        the chosen candidates' sprite parameters refined) and its choice is refined in turn;
        with ``residual_placement`` t > 0, every layer left empty is first moved onto the
        largest peak of the residual (the squared error summed over channels, averaged over
        5×5 pixels) above t, in the image's colour there, one peak per layer, so that the
        selection can give an object that no layer drew a layer of its own. 0 steps and no
        order search switch it off; training is never refined.
        """
        if steps < 0 or lr <= 0 or rounds < 1 or residual_placement < 0:
            raise ValueError(
                "need pose_refinement >= 0, pose_refinement_lr > 0, pose_refinement_rounds >= 1 "
                f"and residual_placement >= 0, got {steps}, {lr}, {rounds} and "
                f"{residual_placement}"
            )
        self.residual_placement = float(residual_placement)
        self.pose_refinement, self.pose_refinement_lr = int(steps), float(lr)
        self.pose_refinement_rounds, self.order_search = int(rounds), bool(order_search)

    def refinement_settings(self) -> dict[str, int | float | bool]:
        """The refinement in force, by its init arguments' names, in
        :meth:`set_pose_refinement`'s order (``set_pose_refinement(*settings.values())``
        restores it)."""
        return {
            "pose_refinement": self.pose_refinement,
            "pose_refinement_lr": self.pose_refinement_lr,
            "pose_refinement_rounds": self.pose_refinement_rounds,
            "order_search": self.order_search,
            "residual_placement": self.residual_placement,
        }

    @contextmanager
    def unrefined(self) -> Iterator[None]:
        """Inside, eval mode gives the network's own selection, unrefined (training's view, e.g.
        the seeding's crops); the refinement settings are put back on leaving."""
        held = self.refinement_settings()
        self.set_pose_refinement(0, self.pose_refinement_lr, 1, False, 0.0)
        try:
            yield
        finally:
            self.set_pose_refinement(*held.values())

    def _refining(self) -> bool:
        return (self.pose_refinement > 0 or self.order_search) and not self.training

    def _place_on_residual(
        self, image: Tensor, residual: Tensor, empty: Tensor, layer_p: list[Tensor | None]
    ) -> list[Tensor | None]:
        """Move the empty layers (B, L) onto the residual's peaks (:meth:`set_pose_refinement`).

        image (B, C, H, W); residual (B, H, W); layer_p per module (B·L, P). A moved layer
        takes the median scale of its image's drawn (non-empty) layers (the network gives a
        layer it leaves empty any scale, mostly a canvas the size of the image, which no
        sprite then fits; with no drawn layer in the image it keeps its own); its canvas
        centre goes to the peak pixel and, with a ``color`` layer transformation, it is drawn
        flat in the image's colour there (a = −1, b = colour, 3×3 mean). Each peak then
        blanks a disc around it, of radius a tenth of the image size.
        """
        b, n_layers = empty.shape
        size, ip = self.image_size, self._position_index()
        names = self.layer_transforms.names
        ic = (
            names.index("color")
            if "color" in names and layer_p[names.index("color")] is not None
            else None
        )
        heat = F.avg_pool2d(residual[:, None], 5, 1, 2, count_include_pad=False)[:, 0]  # (B, H, W)
        colours = F.avg_pool2d(image, 3, 1, 1, count_include_pad=False)  # (B, C, H, W)
        coords = (torch.arange(size, device=image.device, dtype=image.dtype) * 2 + 1) / size - 1
        ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each
        position = layer_p[ip].view(b, n_layers, -1).clone()  # (B, L, 3)
        colour = None if ic is None else layer_p[ic].view(b, n_layers, -1).clone()  # (B, L, 6)
        rows = torch.arange(b, device=image.device)
        drawn_s = position[..., 0].masked_fill(empty, float("nan")).nanmedian(1).values  # (B,)
        for layer in range(n_layers):
            peak, index = heat.flatten(1).max(1)  # (B,)
            go = empty[:, layer] & (peak > self.residual_placement)  # (B,)
            y, x = index.div(size, rounding_mode="floor"), index % size
            target = torch.stack([coords[x], coords[y]], 1)  # (B, 2)
            s = torch.where(drawn_s.isnan(), position[:, layer, 0], drawn_s)[:, None]  # (B, 1)
            moved = PositionTransform.centred(s, target)  # (B, 3)
            position[:, layer] = torch.where(go[:, None], moved, position[:, layer])
            if colour is not None:
                flat = torch.cat(
                    [-torch.ones_like(target[:, :1]).expand(-1, 3), colours[rows, :, y, x]], 1
                )
                colour[:, layer] = torch.where(go[:, None], flat, colour[:, layer])
            distance = (xs - target[:, :1, None]).pow(2) + (ys - target[:, 1:, None]).pow(2)
            near = distance < 0.2**2  # (B, H, W): within a tenth of the image size
            heat = heat.masked_fill(near & go[:, None, None], 0)  # (B, H, W)
        out = list(layer_p)
        out[ip] = position.view(b * n_layers, -1)
        if colour is not None:
            out[ic] = colour.view(b * n_layers, -1)
        return out

    def _refine_poses(
        self,
        image: Tensor,
        canvases: Tensor,
        choice: Tensor,
        layer_p: list[Tensor | None],
        sprite_p: list[Tensor | None],
        bg_p: list[Tensor | None],
        bg_choice: Tensor,
        occ: Tensor,
    ) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None], Tensor, Tensor]:
        """:meth:`set_pose_refinement`'s descent and order search. canvases (K, C+2, h, w);
        choice (B·L,) the selected sprites; layer_p and sprite_p per module (B·L, P); bg_p per
        module (B, M, P); bg_choice (B,); occ (B, L+1, L+1). Returns the refined parameters
        (detached, same shapes; in bg_p only the chosen background's row changes), occ and the
        squared residual summed over channels (B, H, W)."""
        b, n_layers = len(image), self.n_layers
        # Outside inference mode (Lightning's validation runs in it), on clones: tensors made
        # in inference mode cannot take part in autograd, their clones made outside it can.
        with torch.inference_mode(False):

            def leaves(params: list[Tensor | None]) -> list[Tensor | None]:
                return [None if p is None else p.detach().clone().requires_grad_() for p in params]

            layer_p, sprite_p, bg_p = leaves(layer_p), leaves(sprite_p), leaves(bg_p)
            canvas = canvases[choice][:, None].detach().clone()  # (B·L, 1, C+2, h, w)
            image, occ, bg_choice = image.clone(), occ.detach().clone(), bg_choice.clone()

            def layers() -> tuple[Tensor, Tensor]:  # (B, L+1, C, H, W), (B, L+1, 1, H, W)
                rgb, alpha = self._render(canvas, sprite_p, layer_p, None)  # (B·L, 1, ·, H, W)
                rgb = rgb.view(b, n_layers, *rgb.shape[2:])  # (B, L, C, H, W)
                alpha = alpha.view(b, n_layers, *alpha.shape[2:])  # (B, L, 1, H, W)
                background = self._render_backgrounds(b, bg_p, bg_choice)  # (B, 1, C, H, W)
                ones = torch.ones_like(alpha[:, :1])
                return torch.cat([background, rgb], 1), torch.cat([ones, alpha], 1)

            found = [p for p in (*layer_p, *sprite_p, *bg_p) if p is not None]
            optimizer = torch.optim.Adam(found, lr=self.pose_refinement_lr)
            with torch.enable_grad():
                for _ in range(self.pose_refinement):
                    # summed over the batch: each image's parameters get their own gradient
                    error = (compose(*layers(), occ) - image).pow(2).flatten(1).mean(1)  # (B,)
                    optimizer.zero_grad(set_to_none=True)
                    error.sum().backward()
                    optimizer.step()
            layer_p, sprite_p, bg_p = (
                [None if p is None else p.detach() for p in group]
                for group in (layer_p, sprite_p, bg_p)
            )
            with torch.no_grad():
                all_rgb, all_alpha = layers()
                if self.order_search:
                    occ = order_search(image, all_rgb, all_alpha, occ)
                residual = (compose(all_rgb, all_alpha, occ) - image).pow(2).sum(1)  # (B, H, W)
        return layer_p, sprite_p, bg_p, occ, residual

    def _turns(self, sprite_p: list[Tensor | None]) -> int:
        """R, the poses (orientations × sizes) per sprite this forward: 1 unless
        ``orientations`` > 1 or ``candidate_sizes`` and the transformation that takes the poses
        is active."""
        if self._turned is None or sprite_p[self._turned] is None:
            return 1
        return max(self.orientations, 1) * max(len(self.candidate_sizes), 1)

    def _turned_params(self, sprite_p: list[Tensor | None], turns: int) -> list[Tensor | None]:
        """Per-(layer, sprite) parameters (B, L·K0, P) -> per (layer, sprite, pose)
        (B, L·K0·R, P): the posed transformation's composed with each orientation and size
        (orientation-major), the others repeated."""
        out: list[Tensor | None] = []
        for i, p in enumerate(sprite_p):
            if p is None:
                out.append(None)
            elif i == self._turned:
                module = self.sprite_transforms.transforms[i]
                sizes = self.candidate_sizes or (1.0,)
                flat = p.flatten(0, 1)  # (B·L·K0, P)
                posed = pose_params(module, flat, max(self.orientations, 1), sizes)  # (·, R, P)
                out.append(posed.view(p.shape[0], -1, p.shape[-1]))  # (B, L·K0·R, P)
            else:
                out.append(p.repeat_interleave(turns, dim=1))  # (B, L·K0·R, P)
        return out

    def placement_offsets(self) -> Tensor:
        """The placement search's offsets (O, 2): (x, y) in normalised image units on a
        (2r+1)×(2r+1) grid ``placement_step`` pixels apart, no move first (it wins ties)."""
        r = self.placement_search
        steps = torch.arange(-r, r + 1, dtype=torch.float32) * (
            2 * self.placement_step / self.image_size
        )
        dy, dx = torch.meshgrid(steps, steps, indexing="ij")
        grid = torch.stack([dx.flatten(), dy.flatten()], 1)  # (O, 2)
        centre = len(grid) // 2
        return grid[[centre] + [i for i in range(len(grid)) if i != centre]]

    def _position_index(self) -> int:
        return self.layer_transforms.names.index("position")

    def _searching(self, layer_p: list[Tensor | None]) -> bool:
        """Whether this forward runs the placement search: in training while the sprites are
        frozen, in eval mode after :meth:`set_placement_search`; the layers' position predicted."""
        when = bool(self.sprites_frozen) if self.training else self.placement_at_inference
        return when and self.placement_search > 0 and layer_p[self._position_index()] is not None

    @staticmethod
    def _moves(position: Tensor, offsets: Tensor) -> Tensor:
        """The moves (N, O, 2) of layers at ``position`` (N, 3) by ``offsets`` (O, 2), each
        cut short so that the canvas centre (−t / scale) lands inside the image: a layer that
        the search moves is never taken out of the picture (nor left outside it)."""
        scale = 1 + position[:, :1].exp()  # (N, 1)
        centre = -position[:, None, 1:] / scale[:, None]  # (N, 1, 2)
        return (centre + offsets).clamp(-1, 1) - centre  # (N, O, 2)

    def _moved(self, layer_p: list[Tensor | None], offsets: Tensor) -> list[Tensor | None]:
        """Per-layer parameters (B·L, P) -> per (layer, offset) (B·L·O, P), offset-minor: the
        position moved by each offset (:meth:`_moves`), the others repeated."""
        n_off, ip = len(offsets), self._position_index()
        moves = self._moves(layer_p[ip], offsets).flatten(0, 1)  # (B·L·O, 2)
        out = [None if p is None else p.repeat_interleave(n_off, 0) for p in layer_p]
        out[ip] = PositionTransform.shifted(out[ip], moves)
        return out

    def _canvases(self, noisy: bool) -> Tensor:
        """Sprite canvases (K, C+2, h, w): RGB, mask, and a support channel (0 for empty).

        With mask noise (``noisy``) the masks stay unclipped here and are clipped after the
        noise is added, as in the authors' code: a mask value pushed well beyond [0, 1] is then
        immune to the noise, which is what drives masks to binary values.
        """
        appearance, mask = self.sprites(raw_masks=noisy)
        if bool(self.sprites_frozen):
            appearance, mask = appearance.detach(), mask.detach()
        support = torch.ones_like(mask)
        if self.sprites.empty_sprite:
            support[-1] = 0
        return torch.cat([appearance, mask, support], dim=1)

    def _render(
        self,
        canvas: Tensor,
        sprite_params: list[Tensor | None],
        layer_params: list[Tensor | None],
        noise: Tensor | None,
        out_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sprite then layer transformations, then mask noise.

        canvas (N, S, C+2, h, w); sprite_params per module (N·S, P); layer_params per module
        (N, P); noise broadcastable to (N, S, 1, H, W) or None; ``out_size`` (H, W) if not
        the image's (the coarse grid of ``select_downscale``).
        Returns rgb (N, S, C, H, W) and alpha (N, S, 1, H, W).
        """
        n, s = canvas.shape[:2]
        if len(self.sprite_transforms):
            flat = canvas.reshape(n * s, 1, *canvas.shape[2:])  # (N·S, 1, C+2, h, w)
            canvas = self.sprite_transforms(flat, sprite_params).view(n, s, *canvas.shape[2:])
        out = self.layer_transforms(canvas, layer_params, out_size)  # (N, S, C+2, H, W)
        rgb, alpha, support = out.split([out.shape[2] - 2, 1, 1], dim=2)
        if noise is not None:
            alpha = softclip(alpha + noise * support)
        return rgb, alpha

    def _render_backgrounds(
        self, b: int, params: list[Tensor | None], index: Tensor | None = None
    ) -> Tensor:
        """Transformed backgrounds: all (B, M, C, H, W), or the chosen ones (B, 1, C, H, W).

        params: per module (B, M, P) or None; index: (B,) chosen background or None.
        """
        images = self.backgrounds()  # (M, C, H, W)
        if index is None:
            stack = images[None].expand(b, -1, -1, -1, -1)  # (B, M, C, H, W)
            params = [None if p is None else p.flatten(0, 1) for p in params]  # (B·M, P)
        else:
            stack = images[index][:, None]  # (B, 1, C, H, W)
            rows = torch.arange(b, device=index.device)
            params = [None if p is None else p[rows, index] for p in params]  # (B, P)
        if not len(self.background_transforms):
            return stack
        n, m = stack.shape[:2]
        flat = stack.reshape(n * m, 1, *stack.shape[2:])  # (B·M, 1, C, H, W)
        return self.background_transforms(flat, params).view(stack.shape)

    def _select(
        self,
        image: Tensor,
        canvases: Tensor,
        noise: Tensor | None,
        layer_p: list[Tensor | None],
        sprite_p: list[Tensor | None],
        bg_p: list[Tensor | None],
        occ: Tensor,
        turns: int = 1,
        offsets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Render every candidate (no gradients) and choose: sprites (B, L), background (B,),
        and with ``offsets`` (O, 2) the offset each layer is drawn at (B, L), else None.

        With ``turns`` R > 1, ``sprite_p`` holds (B, L·K0·R, P) and the candidates are the K0·R
        (sprite, orientation) pairs, sprite-major: a choice c < K0·R is sprite c // R at
        orientation c % R, and K0·R is the empty sprite. With offsets, every candidate is
        also drawn at each of them (offset-major, then the empty sprite); identical sprites
        with no sprite transformation are rendered once and count as the first.
        """
        b, n_layers, k0 = len(image), self.n_layers, self.sprites.n_sprites
        k = k0 * turns  # candidates per layer at one placement
        n_off = 1 if offsets is None else len(offsets)
        sprites = canvases[:k0].repeat_interleave(turns, 0) if turns > 1 else canvases[:k0]
        shared = (
            offsets is not None
            and all(p is None for p in sprite_p)
            and bool((canvases[1:k0] == canvases[:1]).all())
        )
        if shared:
            sprites = sprites[:1]
        k_r = len(sprites)  # rendered per layer and placement
        cand_canvas = sprites.expand(b * n_layers * n_off, -1, -1, -1, -1)  # (B·L·O, k_r, …)
        flat_sprite_p = [
            None
            if p is None
            else p.reshape(b * n_layers, 1, k, -1)  # (B·L, 1, K, P)
            .expand(-1, n_off, -1, -1)  # (B·L, O, K, P)
            .reshape(b * n_layers * n_off * k, -1)
            for p in sprite_p
        ]  # (B·L·O·K, P) each
        if offsets is not None:
            layer_p = self._moved(layer_p, offsets)  # (B·L·O, P) each
        f = self.select_downscale  # candidates scored on an (H/f)×(W/f) grid
        out_size = None if f == 1 else (self.image_size // f, self.image_size // f)
        cand_noise = None
        if noise is not None:
            cand_noise = noise[:k0].repeat_interleave(turns, 0) if turns > 1 else noise[:k0]
            cand_noise = cand_noise[None, :k_r, ..., ::f, ::f]  # (1, k_r, 1, H/f, W/f)
        rgb, alpha = self._render(
            cand_canvas, flat_sprite_p, layer_p, cand_noise, out_size
        )  # (B·L·O, k_r, C, H/f, W/f), (B·L·O, k_r, 1, H/f, W/f)
        rgb = rgb.view(b, n_layers, n_off * k_r, *rgb.shape[2:])  # (B, L, O·k_r, C, H/f, W/f)
        alpha = alpha.view(b, n_layers, n_off * k_r, *alpha.shape[2:])  # (B, L, O·k_r, 1, …)
        if offsets is not None and self.placement_fitted_colour:
            target = image if f == 1 else F.avg_pool2d(image, f)  # (B, C, H/f, W/f)
            weight = alpha.sum((-2, -1)).clamp_min(1e-6)  # (B, L, O·k_r, 1)
            colour = (alpha * target[:, None, None]).sum((-2, -1)) / weight  # (B, L, O·k_r, C)
            rgb = colour[..., None, None].expand_as(rgb)  # each candidate in its best flat colour
        backgrounds = self._render_backgrounds(b, bg_p)  # (B, M, C, H, W)
        if f > 1:
            image = F.avg_pool2d(image, f)  # (B, C, H/f, W/f)
            backgrounds = F.avg_pool2d(backgrounds.flatten(0, 1), f).view(
                *backgrounds.shape[:3], *image.shape[2:]
            )  # (B, M, C, H/f, W/f)
        penalty = self.candidate_penalty().to(image.dtype)
        # each sprite's cost for each of its orientations (and placements), then the empty one's
        drawn = penalty[:k0].repeat_interleave(turns)[:k_r].repeat(n_off)  # (O·k_r,)
        penalty = torch.cat([drawn, penalty[k0:]])
        if n_layers == 1:
            choice, bg_choice = exhaustive_select(
                image, rgb[:, 0], alpha[:, 0], backgrounds, penalty
            )
            choice = choice[:, None]
        else:
            choice, bg_choice = self._greedy(
                image, rgb, alpha, backgrounds, occ, self.greedy_passes, penalty
            )
        if offsets is None:
            return choice, bg_choice, None
        empty = choice >= n_off * k_r
        moved = torch.where(empty, 0, choice.div(k_r, rounding_mode="floor"))  # (B, L)
        return torch.where(empty, k, choice % k_r), bg_choice, moved

    def forward(self, image: Tensor) -> Decomposition:
        """Decompose a batch (B, C, H, W) in [0, 1]."""
        b = len(image)
        n_layers, k0 = self.n_layers, self.sprites.n_sprites
        glimpses = None
        if self.heatmap is None:
            features = self.encoder(image)  # (B, F)
            layer_p = self.layer_transforms.predict(features)  # (B, L, P) each
            sprite_p = self.sprite_transforms.predict(features)  # (B, L·K0, P) each
        else:
            features, fmap = self.encoder(image, with_map=True)  # (B, F), (B, C', h', w')
            centres, glimpses = self.heatmap(fmap)  # (B, L, 2), (B, L, C')
            if not self.heatmap_features:
                glimpses = None  # the heads read the pooled features only
            layer_p = self._heatmap_positions(
                self.layer_transforms.predict(features, glimpses), centres
            )
            sprite_glimpses = None if glimpses is None else glimpses.repeat_interleave(k0, 1)
            sprite_p = self.sprite_transforms.predict(features, sprite_glimpses)  # (B, L·K0, P)
        occ = self.occlusion(features)  # (B, L+1, L+1)
        layer_p = [None if p is None else p.reshape(b * n_layers, -1) for p in layer_p]  # (B·L, P)
        turns = self._turns(sprite_p)  # R orientations per sprite (1: plain)
        if turns > 1:
            sprite_p = self._turned_params(sprite_p, turns)  # (B, L·K0·R, P) each
        bg_p = self.background_transforms.predict(features)  # (B, M, P) each
        noisy = self.training and self.mask_noise > 0
        canvases = self._canvases(noisy)  # (K, C+2, h, w)
        noise = None
        if noisy:  # one map per sprite, shared by the batch and the layers
            size = (len(canvases), 1, self.image_size, self.image_size)
            noise = image.new_empty(size).uniform_(-self.mask_noise, self.mask_noise)
        offsets = self.placement_offsets().to(image) if self._searching(layer_p) else None
        with torch.no_grad():
            choice, bg_choice, moved = self._select(
                image, canvases, noise, layer_p, sprite_p, bg_p, occ, turns, offsets
            )
        placement = None
        if moved is not None:  # draw each layer where the search put it; pull the prediction
            ip = self._position_index()
            predicted = layer_p[ip]  # (B·L, 3)
            rows = torch.arange(len(predicted), device=image.device)
            move = self._moves(predicted.detach(), offsets)[rows, moved.flatten()]  # (B·L, 2)
            move = move.masked_fill((choice >= k0 * turns).flatten()[:, None], 0)  # empty: stay
            drawn = PositionTransform.shifted(predicted, move)
            gap = (predicted[:, 1:] - drawn[:, 1:].detach()).pow(2).sum(1)  # (B·L,)
            placement = self.placement_weight * gap.mean()
            layer_p = [drawn if i == ip else p for i, p in enumerate(layer_p)]
        candidate = choice
        choice, picked_sprite_p = self._picked(candidate, sprite_p, turns)
        residual = None  # (B, H, W) after a refinement
        for refinement in range(self.pose_refinement_rounds if self._refining() else 0):
            if refinement > 0:  # choose again with the layers where the last round left them
                if self.residual_placement > 0 and residual is not None:
                    layer_p = self._place_on_residual(image, residual, choice >= k0, layer_p)
                with torch.no_grad():
                    candidate, bg_choice, _ = self._select(
                        image, canvases, noise, layer_p, sprite_p, bg_p, occ, turns
                    )
                choice, picked_sprite_p = self._picked(candidate, sprite_p, turns)
            layer_p, picked_sprite_p, bg_p, occ, residual = self._refine_poses(
                image, canvases, choice.flatten(), layer_p, picked_sprite_p, bg_p, bg_choice, occ
            )
            sprite_p = self._put(sprite_p, candidate, picked_sprite_p, k0 * turns)
        flat_choice = choice.flatten()  # (B·L,) the sprite (K0: empty)
        sel_rgb, sel_alpha = self._render(
            canvases[flat_choice][:, None],  # (B·L, 1, C+2, h, w)
            picked_sprite_p,
            layer_p,
            None if noise is None else noise[flat_choice][:, None],
        )
        sel_rgb = sel_rgb.view(b, n_layers, *sel_rgb.shape[2:])  # (B, L, C, H, W)
        sel_alpha = sel_alpha.view(b, n_layers, *sel_alpha.shape[2:])  # (B, L, 1, H, W)
        background = self._render_backgrounds(b, bg_p, bg_choice)[:, 0]  # (B, C, H, W)

        all_rgb = torch.cat([background[:, None], sel_rgb], 1)  # (B, L+1, C, H, W)
        all_alpha = torch.cat([torch.ones_like(sel_alpha[:, :1]), sel_alpha], 1)
        recon = compose(all_rgb, all_alpha, occ)
        mse = (recon - image).pow(2).flatten(1).mean(1)

        empty = flat_choice.view(b, n_layers) >= k0
        params = self._selected_params(layer_p, picked_sprite_p, bg_p, bg_choice, b)
        return Decomposition(
            reconstruction=recon,
            layers=torch.cat([sel_rgb, sel_alpha], 2),
            background=background,
            occlusion=occ,
            sprite_choice=choice.masked_fill(empty, -1),
            background_choice=bg_choice,
            mse=mse,
            params=params,
            placement=placement,
        )

    def _picked(
        self, choice: Tensor, sprite_p: list[Tensor | None], turns: int
    ) -> tuple[Tensor, list[Tensor | None]]:
        """The selection's candidates (B, L) -> the sprites (B, L) (K0: empty) and the chosen
        candidates' sprite parameters (B·L, P) per module. With orientations, a candidate is
        sprite · R + orientation (K0·R: empty) and picks its composed parameters."""
        k0 = self.sprites.n_sprites
        k = k0 * turns
        rows, heads = self._head_index(choice, k)
        picked = [None if p is None else p[rows, heads] for p in sprite_p]
        if turns > 1:
            choice = torch.where(choice >= k, k0, choice.div(turns, rounding_mode="floor"))
        return choice, picked

    @staticmethod
    def _put(
        sprite_p: list[Tensor | None], candidate: Tensor, picked: list[Tensor | None], k: int
    ) -> list[Tensor | None]:
        """:meth:`_picked` backwards: ``sprite_p`` (B, L·K, P) per module (K candidates per
        layer) with the chosen candidates' (B, L) rows replaced by ``picked`` (B·L, P)."""
        rows, heads = DTISprites._head_index(candidate, k)
        out: list[Tensor | None] = []
        for p, new in zip(sprite_p, picked, strict=True):
            if p is not None:
                p = p.clone()
                p[rows, heads] = new
            out.append(p)
        return out

    @staticmethod
    def _head_index(candidate: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Where the chosen candidates (B, L) of K per layer sit in per-(layer, candidate)
        parameters (B, L·K, P): image rows (B·L,) and columns (B·L,) (the empty one: K − 1)."""
        b, n_layers = candidate.shape
        batch = torch.arange(b * n_layers, device=candidate.device)
        return batch // n_layers, (batch % n_layers) * k + candidate.flatten().clamp(max=k - 1)

    def _heatmap_positions(
        self, layer_p: list[Tensor | None], centre: Tensor
    ) -> list[Tensor | None]:
        """The layers' position parameters (B, L, 3) with the translation that puts each canvas
        centre at ``centre`` (B, L, 2), where its heat map says (the canvas centre lands at
        −t / scale, so t = −scale · centre); the scale stays the MLP's."""
        ip = self._position_index()
        if layer_p[ip] is None:  # position inactive: the initial placement
            return layer_p
        position = PositionTransform.centred(layer_p[ip][..., :1], centre)  # (B, L, 3)
        return [position if i == ip else p for i, p in enumerate(layer_p)]

    def _selected_params(self, layer_p, sprite_p, bg_p, bg_choice, b) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        groups = (
            ("layer", self.layer_transforms, layer_p),
            ("sprite", self.sprite_transforms, sprite_p),
        )
        for group, seq, params in groups:
            for name, p in zip(seq.names, params, strict=True):
                if p is not None:
                    out[f"{group}/{name}"] = p.detach().view(b, self.n_layers, -1)
        batch = torch.arange(b, device=bg_choice.device)
        for name, p in zip(self.background_transforms.names, bg_p, strict=True):
            if p is not None:
                out[f"background/{name}"] = p.detach()[batch, bg_choice]
        return out


def exhaustive_select(
    image: Tensor, rgb: Tensor, alpha: Tensor, backgrounds: Tensor, penalty: Tensor
) -> tuple[Tensor, Tensor]:
    """Single-object selection: the best (sprite, background) pair over all K·M candidates.

    image (B, C, H, W), rgb (B, K0, C, H, W), alpha (B, K0, 1, H, W), backgrounds
    (B, M, C, H, W), penalty (K,); with K = K0 + 1 the last candidate is the empty sprite
    (the background alone). Returns sprite (B,) in [0, K) and background (B,) choices.
    """
    front = (alpha * rgb)[:, :, None]  # (B, K0, 1, C, H, W)
    recon = front + (1 - alpha[:, :, None]) * backgrounds[:, None]  # (B, K0, M, C, H, W)
    err = (image[:, None, None] - recon).pow(2).flatten(3).mean(3)  # (B, K0, M)
    if len(penalty) > rgb.shape[1]:  # the empty sprite: the background alone
        empty = (image[:, None] - backgrounds).pow(2).flatten(2).mean(2)  # (B, M)
        err = torch.cat([err, empty[:, None]], 1)
    best = (err + penalty[:, None]).flatten(1).argmin(1)
    m = backgrounds.shape[1]
    return best // m, best % m
