"""Parametric transformations of sprites and backgrounds, their MLP heads, and sequences.

Every transformation acts on a stack of images that share one parameter vector:
``forward(x, params)`` with ``x`` (N, S, C', h, w) and ``params`` (N, P) returns
(N, S, C', H', W'). The first three channels are RGB; further channels (alpha, support) are
only moved, never recoloured. All warps use bilinear ``grid_sample`` with zero padding and one
coordinate convention (``align_corners=False``), and every module except ``position`` is the
exact identity at zero parameters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dti_sprites.sprites import softclip

TransformName = Literal["color", "position", "similarity", "affine", "projective", "tps"]
TRANSFORM_NAMES: tuple[str, ...] = TransformName.__args__  # type: ignore[attr-defined]


def pixel_grid(size: tuple[int, int], like: Tensor) -> Tensor:
    """Normalised (x, y) coordinates of pixel centres, align_corners=False. (H, W, 2)"""
    h, w = size
    ys = (torch.arange(h, dtype=like.dtype, device=like.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=like.dtype, device=like.device) * 2 + 1) / w - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """Sample a stack (N, S, C', h, w) at a grid (N, H', W', 2) → (N, S, C', H', W')."""
    n, s, c, h, w = x.shape
    out = F.grid_sample(
        x.reshape(n, s * c, h, w),  # (N, S·C', h, w)
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out.view(n, s, c, *grid.shape[1:3])  # (N, S, C', H', W')


class Transformation(nn.Module):
    """Base class. ``n_params`` is P; ``out_size`` is None when the size is kept."""

    n_params: int = 0

    def __init__(self, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.out_size = out_size


class ColorTransform(Transformation):
    """y_c = softclip((1 + a_c) · x_c + b_c) on the RGB channels; P = 6 (a, b)."""

    n_params = 6

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        a, b = params.view(-1, 1, 2, 3, 1, 1).unbind(2)  # (N, 1, 3, 1, 1) each
        rgb = softclip((1 + a) * x[:, :, :3] + b)  # (N, S, 3, h, w)
        return torch.cat([rgb, x[:, :, 3:]], dim=2)


class AffineFamily(Transformation):
    """Transformations given by a 2×3 matrix θ mapping output to input coordinates."""

    def theta(self, params: Tensor) -> Tensor:  # (N, P) -> (N, 2, 3)
        raise NotImplementedError

    def forward(self, x: Tensor, params: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """x (N, S, C', h, w) → (N, S, C', H', W'), sampled on an ``out_size`` grid (default:
        the module's) that spans the same normalised frame: a smaller one is the same
        picture at a lower resolution."""
        return self._sample(x, self.theta(params), out_size or self.out_size)

    def inverse(self, y: Tensor, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        """Output-space stacks back to input coordinates: (N, S, C', H', W') -> (N, S, C', h, w).

        Samples y at θ⁻¹(q) for every input pixel q (zero outside the output).
        """
        theta = self.theta(params)  # (N, 2, 3): output -> input coordinates
        a_inv = torch.linalg.inv(theta[:, :, :2])  # (N, 2, 2)
        t_inv = -(a_inv @ theta[:, :, 2:])  # (N, 2, 1)
        return self._sample(y, torch.cat([a_inv, t_inv], 2), in_size)

    @staticmethod
    def _sample(x: Tensor, theta: Tensor, size: tuple[int, int]) -> Tensor:
        """x sampled at θ·[p, 1] for every pixel p of a ``size`` grid. θ (N, 2, 3)"""
        grid = pixel_grid(size, theta) @ theta[:, None, :, :2].transpose(-1, -2)
        grid = grid + theta[:, None, None, :, 2]  # (N, H', W', 2)
        return warp(x, grid)


class PositionTransform(AffineFamily):
    """θ = [[1+eˢ, 0, tx], [0, 1+eˢ, ty]]; maps the h×w canvas onto the H×W image (P = 3).

    At zero parameters the canvas covers half of the image, centred (by design, not an
    identity); the scale factor 1 + eˢ > 1 means a sprite can never be larger than the image.
    """

    n_params = 3

    def theta(self, params: Tensor) -> Tensor:
        s, tx, ty = params.unbind(1)
        scale = 1 + s.exp()
        zero = torch.zeros_like(s)
        return torch.stack([scale, zero, tx, zero, scale, ty], 1).view(-1, 2, 3)

    @staticmethod
    def shifted(params: Tensor, offsets: Tensor) -> Tensor:
        """The parameters (N, 3) that draw the canvas moved by ``offsets`` (N, 2): (x, y) in the
        image's normalised coordinates (2 / W per pixel). The canvas centre lands at image
        point −t / scale, so the shift is t − scale · δ; the scale is unchanged."""
        s, t = params[:, :1], params[:, 1:]  # (N, 1), (N, 2)
        return torch.cat([s, t - (1 + s.exp()) * offsets], 1)

    @staticmethod
    def centred(s: Tensor, centre: Tensor) -> Tensor:
        """The parameters (…, 3) that draw the canvas at scale parameter ``s`` (…, 1) with its
        centre at ``centre`` (…, 2), (x, y) in the image's normalised coordinates: the centre
        lands at −t / scale, so t = −scale · centre."""
        return torch.cat([s, -(1 + s.exp()) * centre], -1)


class SimilarityTransform(AffineFamily):
    """θ = [[1+a, −b, tx], [b, 1+a, ty]] (P = 4)."""

    n_params = 4

    def theta(self, params: Tensor) -> Tensor:
        a, b, tx, ty = params.unbind(1)
        return torch.stack([1 + a, -b, tx, b, 1 + a, ty], 1).view(-1, 2, 3)

    def params(self, theta: Tensor) -> Tensor:
        """The inverse of :meth:`theta` on similarity matrices: (N, 2, 3) -> (N, 4)."""
        return torch.stack([theta[:, 0, 0] - 1, theta[:, 1, 0], theta[:, 0, 2], theta[:, 1, 2]], 1)


class AffineTransform(AffineFamily):
    """θ = I + β (P = 6)."""

    n_params = 6

    def theta(self, params: Tensor) -> Tensor:
        eye = torch.eye(2, 3, dtype=params.dtype, device=params.device)
        return eye + params.view(-1, 2, 3)

    def params(self, theta: Tensor) -> Tensor:
        """The inverse of :meth:`theta`: (N, 2, 3) -> (N, 6)."""
        return (theta - torch.eye(2, 3, dtype=theta.dtype, device=theta.device)).flatten(1)


def rotate_params(module: Transformation, params: Tensor, turns: int) -> Tensor:
    """Parameters of ``module`` that first rotate its input by each of ``turns`` angles 2πr/turns.

    For a similarity or affine θ (output → input coordinates), rotating the input x first by
    R_r (x_r(q) = x(R_r q)) and then warping gives x(R_r θ [p, 1]): the product R_r θ is again
    a similarity (affine) matrix. params (N, P) -> (N, turns, P); r = 0 returns ``params``.
    """
    return pose_params(module, params, turns)


def pose_params(
    module: Transformation, params: Tensor, turns: int, sizes: Sequence[float] = (1.0,)
) -> Tensor:
    """Parameters of ``module`` that first turn its input by 2πr/``turns`` and scale it by each
    of ``sizes`` about the canvas centre: (N, P) -> (N, turns · len(sizes), P), turn-major.

    A size s draws the input s times larger: the warp reads it at R_r θ [p, 1] / s, again a
    similarity (affine) matrix. Turn 0 at size 1 returns ``params``.
    """
    if not isinstance(module, SimilarityTransform | AffineTransform):
        raise TypeError(f"pose_params: {type(module).__name__} is not a similarity or affine")
    angles = torch.arange(turns, dtype=params.dtype, device=params.device) * (2 * math.pi / turns)
    cos, sin = angles.cos(), angles.sin()
    rotations = torch.stack([cos, -sin, sin, cos], 1).view(turns, 1, 2, 2)  # (R, 1, 2, 2)
    shrink = 1 / torch.tensor(sizes, dtype=params.dtype, device=params.device)  # (S,)
    poses = (rotations * shrink.view(1, -1, 1, 1)).flatten(0, 1)  # (R·S, 2, 2)
    theta = module.theta(params)  # (N, 2, 3)
    posed = poses[None] @ theta[:, None]  # (N, R·S, 2, 3)
    return module.params(posed.flatten(0, 1)).view(len(params), len(poses), -1)  # (N, R·S, P)


class ProjectiveTransform(Transformation):
    """Homography H = I₃ + β with H[2, 2] = 1 (P = 8); output size = input size."""

    n_params = 8

    def homography(self, params: Tensor) -> Tensor:
        """H (N, 3, 3), mapping output to input coordinates (homogeneous)."""
        eye = torch.eye(3, dtype=params.dtype, device=params.device)
        return eye + F.pad(params, (0, 1)).view(-1, 3, 3)  # (N, 3, 3)

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        return self._sample(x, self.homography(params), self.out_size)

    def inverse(self, y: Tensor, params: Tensor, in_size: tuple[int, int]) -> Tensor:
        """Output-space stacks back to input coordinates (the homography's inverse matrix):
        (N, S, C', H', W') -> (N, S, C', h, w), zero outside the output."""
        return self._sample(y, torch.linalg.inv(self.homography(params)), in_size)

    @staticmethod
    def _sample(x: Tensor, hom: Tensor, size: tuple[int, int]) -> Tensor:
        """x sampled at H·[p, 1] (dehomogenised) for every pixel p of a ``size`` grid."""
        points = F.pad(pixel_grid(size, hom), (0, 1), value=1.0)  # (H', W', 3)
        mapped = points @ hom[:, None].transpose(-1, -2)  # (N, H', W', 3)
        z = mapped[..., 2:]
        z = torch.where(z >= 0, z.clamp(min=1e-6), z.clamp(max=-1e-6))
        return warp(x, mapped[..., :2] / z)


class TPSTransform(Transformation):
    """Thin-plate spline with a 4×4 grid of control points on [−1, 1]² (P = 32).

    The target points are the control points displaced by β; the warp maps output to input
    coordinates, ``f(p) = p + Σᵢ wᵢ U(|p − cᵢ|) + A·[1, p]`` with U(r) = r² log r, so zero
    displacements give exactly the identity.
    """

    n_params = 32
    grid_size = 4

    def __init__(self, out_size: tuple[int, int]) -> None:
        super().__init__(out_size)
        ticks = torch.linspace(-1, 1, self.grid_size, dtype=torch.float64)
        ctrl = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).view(-1, 2)  # (16, 2)
        n = len(ctrl)
        system = torch.zeros(n + 3, n + 3, dtype=torch.float64)
        system[:n, :n] = self.kernel(ctrl[:, None] - ctrl[None])
        system[:n, n:] = F.pad(ctrl, (1, 0), value=1.0)
        system[n:, :n] = system[:n, n:].T
        # Columns of the inverse that act on the displacements (the last 3 rows of the
        # right-hand side are zeros). (16 + 3, 16)
        self.register_buffer("ctrl", ctrl, persistent=False)
        self.register_buffer("solve", torch.linalg.inv(system)[:, :n], persistent=False)
        self.register_buffer("basis", self.grid_basis(), persistent=False)

    @staticmethod
    def kernel(diff: Tensor) -> Tensor:
        """U(r) = r² log r = ½ r² log r², with U(0) = 0. (..., 2) -> (...)"""
        r2 = diff.pow(2).sum(-1)
        return 0.5 * r2 * torch.log(r2.clamp(min=1e-12))

    def grid_basis(self) -> Tensor:
        """Maps control displacements to pixel displacements of the output grid. (H'·W', 16)"""
        points = pixel_grid(self.out_size, self.ctrl).view(-1, 2)  # (H'·W', 2)
        features = torch.cat(
            [self.kernel(points[:, None] - self.ctrl[None]), F.pad(points, (1, 0), value=1.0)],
            dim=1,
        )  # (H'·W', 16 + 3)
        return features @ self.solve  # float64; cast to the parameters' dtype when used

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        shift = self.basis.to(params.dtype) @ params.view(-1, 16, 2)  # (N, H'·W', 2)
        grid = pixel_grid(self.out_size, params) + shift.view(-1, *self.out_size, 2)
        return warp(x, grid)  # grid: (N, H', W', 2)


def make_transform(
    name: TransformName, in_size: tuple[int, int], out_size: tuple[int, int]
) -> Transformation:
    """One transformation module; only ``position`` may change the size (canvas → image)."""
    if name == "position":
        return PositionTransform(out_size)
    if in_size != out_size:
        raise ValueError(f"transformation {name!r} keeps the size; only 'position' resizes")
    classes: dict[str, type[Transformation]] = {
        "color": ColorTransform,
        "similarity": SimilarityTransform,
        "affine": AffineTransform,
        "projective": ProjectiveTransform,
        "tps": TPSTransform,
    }
    if name not in classes:
        raise ValueError(f"unknown transformation {name!r}; expected one of {TRANSFORM_NAMES}")
    return classes[name](out_size)


class GroupedMLP(nn.Module):
    """G independent MLPs F → hidden → hidden → P with ReLU; the last layer starts at zero.

    ``forward`` maps features (B, F) to parameters (B, G, P). All groups run as one batched
    matmul: the first weight is stored as (F, G, hidden) so that it is one (F, G·hidden) matrix,
    the others as (G, in, out). ``group_slices(g)`` names the slices of group g (reassignment).
    With ``local_features`` = F' > 0 each group also reads features of its own, (B, G, F')
    (``forward(features, local)``): its first layer sees [features, local[:, g]].
    """

    def __init__(
        self,
        n_groups: int,
        in_features: int,
        out_features: int,
        hidden: int = 128,
        local_features: int = 0,
    ):
        super().__init__()
        self.local_weight: nn.Parameter | None = None
        if local_features:  # the first layer's fan-in is then F + F'
            bound = 1 / math.sqrt(in_features + local_features)
            w = torch.empty(n_groups, local_features, hidden).uniform_(-bound, bound)
            self.local_weight = nn.Parameter(w)
        dims = [in_features + local_features, hidden, hidden, out_features]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init
            last = i == len(dims) - 2
            w = torch.zeros(n_groups, fan_in, fan_out)
            b = torch.zeros(n_groups, fan_out)
            if not last:
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)
            if i == 0:
                w = w[:, :in_features].transpose(0, 1).contiguous()  # (F, G, hidden)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def group_slices(self, g: int) -> list[tuple[nn.Parameter, tuple[int | slice, ...]]]:
        """(parameter, index) of every slice that belongs to group g."""
        slices = [(self.weights[0], (slice(None), g))]
        slices += [(w, (g,)) for w in self.weights[1:]]
        if self.local_weight is not None:
            slices.append((self.local_weight, (g,)))
        return slices + [(b, (g,)) for b in self.biases]

    def output_slices(self, g: int) -> list[tuple[nn.Parameter, tuple[int | slice, ...]]]:
        """(parameter, index) of group g's output layer: zeroed, the group predicts zeros."""
        return [(self.weights[-1], (g,)), (self.biases[-1], (g,))]

    def forward(self, features: Tensor, local: Tensor | None = None) -> Tensor:
        f, g, h = self.weights[0].shape
        x = (features @ self.weights[0].view(f, g * h)).view(-1, g, h)  # (B, G, hidden)
        if self.local_weight is not None:
            if local is None:
                raise ValueError("this head reads local features: forward(features, local)")
            x = x + torch.einsum("bgi,gih->bgh", local, self.local_weight)  # (B, G, hidden)
        x = x + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            x = torch.einsum("bgi,gio->bgo", x.relu(), w) + b  # (B, G, out)
        return x


class TransformSequence(nn.Module):
    """An ordered list of transformations, each with its own head, for G independent groups.

    Groups are e.g. the L layers (layer transformation), the L·K0 (layer, sprite) pairs or the
    M backgrounds. ``n_active`` (a buffer, so it is checkpointed) implements the curriculum:
    only the first ``n_active`` modules are applied; a later one is skipped, except a resizing
    ``position`` module which is then applied at zero parameters (its initial placement).
    """

    def __init__(
        self,
        names: Sequence[TransformName],
        n_groups: int,
        in_features: int,
        in_size: tuple[int, int],
        out_size: tuple[int, int],
        hidden: int = 128,
        local_features: int = 0,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.in_size = in_size
        if in_size != out_size and "position" not in self.names:
            raise ValueError(
                f"a sequence from {in_size} to {out_size} needs a 'position' module: {self.names}"
            )
        modules, size = [], in_size
        for name in self.names:
            modules.append(make_transform(name, size, out_size if name == "position" else size))
            size = modules[-1].out_size
        self.transforms = nn.ModuleList(modules)
        self.heads = nn.ModuleList(
            GroupedMLP(n_groups, in_features, t.n_params, hidden, local_features)
            for t in self.transforms
        )
        self.register_buffer("n_active", torch.tensor(len(self.names)))

    def __len__(self) -> int:
        return len(self.names)

    def inverse(self, y: Tensor, params: Sequence[Tensor | None]) -> Tensor:
        """Undo the geometry of the active modules: output-space stacks (N, S, C', H, W) back to
        input coordinates (N, S, C', h, w), e.g. a layer's pixels into its sprite's canvas.

        Colour is not undone (every channel is moved, none recoloured). The affine family
        (``position``, ``similarity``, ``affine``) and ``projective`` (the homography's
        inverse matrix) are inverted in closed form; an active ``tps`` module raises
        ``NotImplementedError``.
        """
        sizes = [self.in_size]
        for transform in self.transforms[:-1]:
            sizes.append(transform.out_size)
        steps = list(zip(self.transforms, params, sizes, strict=True))
        for transform, p, in_size in reversed(steps):
            if p is None and isinstance(transform, PositionTransform):
                p = y.new_zeros(len(y), transform.n_params)
            if p is None or isinstance(transform, ColorTransform):
                continue
            if not isinstance(transform, AffineFamily | ProjectiveTransform):
                raise NotImplementedError(
                    f"{type(transform).__name__} has no closed-form inverse; sprite seeding "
                    "needs transformations of the affine family (position, similarity, "
                    "affine), projective ones and colour"
                )
            y = transform.inverse(y, p, in_size)
        return y

    def set_active(self, n: int) -> None:
        """Switch on the first ``n`` modules (curriculum)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"n_active must be in [0, {len(self)}], got {n}")
        self.n_active.fill_(n)

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters of the heads of inactive modules (they take no part in the output)."""
        return [p for head in self.heads[int(self.n_active) :] for p in head.parameters()]

    def predict(self, features: Tensor, local: Tensor | None = None) -> list[Tensor | None]:
        """Parameters per module, (B, G, P) each; None for an inactive module. ``local``
        (B, G, F'): each group's own features, for heads built with ``local_features``."""
        n_active = int(self.n_active)
        return [
            head(features, local) if i < n_active else None for i, head in enumerate(self.heads)
        ]

    def forward(
        self,
        x: Tensor,
        params: Sequence[Tensor | None],
        out_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Apply to a stack x (N, S, C', h, w) with per-module params (N, P) → (N, S, C', H, W).

        ``out_size`` (H', W') renders the same picture on a coarser grid: the ``position``
        module samples the canvas there. Only ``color`` may follow ``position`` then
        (:meth:`can_resize`).
        """
        for transform, p in zip(self.transforms, params, strict=True):
            if p is None and isinstance(transform, PositionTransform):
                p = x.new_zeros(len(x), transform.n_params)
            if p is None:
                continue
            if out_size is not None and isinstance(transform, PositionTransform):
                x = transform(x, p, out_size)
            else:
                x = transform(x, p)
        return x

    @staticmethod
    def can_resize(names: Sequence[str]) -> bool:
        """Whether ``forward(out_size=…)`` renders these modules on another grid: a
        ``position`` module with nothing but ``color`` after it."""
        if "position" not in names:
            return False
        return all(name == "color" for name in names[list(names).index("position") + 1 :])
