"""Occlusion, layered composition, batched greedy sprite selection and label maps.

Layers are indexed 0..L with 0 the background (α = 1 everywhere). ``occ[b, j, i]`` ∈ [0, 1] is
how much layer j hides layer i; every sprite layer hides the background, which hides nobody.
The composite is  Î = Σᵢ αᵢ cᵢ Π_{j≠i} (1 − occ[j, i] α_j).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

OcclusionMode = Literal["fixed", "predicted"]


class Occlusion(nn.Module):
    """Occlusion matrix (B, L+1, L+1) over the background and L sprite layers.

    ``fixed``: a higher layer index is in front. ``predicted``: a head F→128→128→L(L−1)/2 with
    a zero last layer; its sigmoids fill the strictly lower triangle (occ[j, i], j > i) and
    occ[i, j] = 1 − occ[j, i], so every pair starts at 0.5.
    """

    def __init__(self, n_layers: int, mode: OcclusionMode, head: nn.Module | None = None):
        super().__init__()
        self.n_layers, self.mode = n_layers, mode
        self.head = head
        if mode == "predicted" and head is None:
            raise ValueError("predicted occlusion needs a head")
        n = n_layers + 1
        fixed = torch.tril(torch.ones(n, n), diagonal=-1)  # occ[j, i] = 1 for j > i
        self.register_buffer("fixed", fixed, persistent=False)
        rows, cols = torch.tril_indices(n_layers, n_layers, offset=-1)
        self.register_buffer("rows", rows + 1, persistent=False)
        self.register_buffer("cols", cols + 1, persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        b = len(features)
        if self.mode == "fixed" or self.n_layers < 2:
            return self.fixed.to(features.dtype).expand(b, -1, -1)  # (B, L+1, L+1)
        lower = torch.sigmoid(self.head(features).view(b, -1))  # (B, L(L-1)/2)
        occ = self.fixed.to(lower.dtype).expand(b, -1, -1).clone()  # (B, L+1, L+1)
        occ[:, self.rows, self.cols] = lower
        occ[:, self.cols, self.rows] = 1 - lower
        return occ


def transmittance(alpha: Tensor, occ: Tensor, skip: int | None = None) -> Tensor:
    """Π_{j≠i, j≠skip} (1 − occ[j, i] α_j) for every layer i.

    alpha (B, L+1, 1, H, W), occ (B, L+1, L+1) -> (B, L+1, 1, H, W).
    """
    out = torch.ones_like(alpha)
    for j in range(alpha.shape[1]):  # one (B, L+1, 1, H, W) factor at a time: cache friendly
        if j != skip:
            out = out * (1 - occ[:, j, :, None, None, None] * alpha[:, j : j + 1])  # occ[i,i] = 0
    return out  # (B, L+1, 1, H, W)


def compose(rgb: Tensor, alpha: Tensor, occ: Tensor) -> Tensor:
    """Î = Σᵢ αᵢ cᵢ Π_{j≠i} (1 − occ[j, i] α_j).

    rgb (B, L+1, C, H, W), alpha (B, L+1, 1, H, W), occ (B, L+1, L+1) -> (B, C, H, W).
    """
    return (alpha * rgb * transmittance(alpha, occ)).sum(1)


def affine_terms(rgb: Tensor, alpha: Tensor, occ: Tensor, layer: int) -> tuple[Tensor, ...]:
    """S, T, P such that replacing layer ``layer`` by (c, α) gives Î = S + α ⊙ (P·c − T).

    S = Σ_{i≠l} Rᵢ, T = Σ_{i≠l} occ[l, i] Rᵢ, P = Π_{j≠l} (1 − occ[j, l] α_j), with
    Rᵢ = αᵢ cᵢ Π_{j≠i, j≠l} (1 − occ[j, i] α_j). S, T: (B, C, H, W); P: (B, 1, H, W).
    """
    trans = transmittance(alpha, occ, skip=layer)  # (B, L+1, 1, H, W)
    others = torch.ones(alpha.shape[1], dtype=torch.bool, device=alpha.device)
    others[layer] = False
    r = (alpha * rgb * trans)[:, others]  # (B, L, C, H, W)
    s = r.sum(1)
    t = (occ[:, layer, others][..., None, None, None] * r).sum(1)
    return s, t, trans[:, layer]


def greedy_select(
    image: Tensor,
    sprite_rgb: Tensor,
    sprite_alpha: Tensor,
    background_rgb: Tensor,
    occ: Tensor,
    passes: int,
    penalty: Tensor,
) -> tuple[Tensor, Tensor]:
    """Greedy coordinate descent over layers, scoring all candidates of a layer at once.

    All layers start empty (α = 0). In each pass the background is chosen first (when there
    are several), then layers 1..L back to front; each decision minimises
    ``mean((x − Î)²) + penalty[k]`` with the other layers fixed.

    Args:
        image: (B, C, H, W) target.
        sprite_rgb: (B, L, K0, C, H, W) rendered candidates per layer.
        sprite_alpha: (B, L, K0, 1, H, W) their alphas.
        background_rgb: (B, M, C, H, W) candidate backgrounds.
        occ: (B, L+1, L+1) occlusion matrix.
        passes: number of passes over the layers.
        penalty: (K,) cost added per candidate (λ for sprites, 0 for the empty one). With
            K = K0 + 1 the last candidate is the empty sprite (α = 0), scored without being
            rendered.

    Returns:
        sprite choice (B, L) in [0, K), background choice (B,) in [0, M).
    """
    b, n_layers, k0 = sprite_rgb.shape[:3]
    k = len(penalty)
    batch = torch.arange(b, device=image.device)
    rgb = image.new_zeros(b, n_layers + 1, *image.shape[1:])  # (B, L+1, C, H, W)
    alpha = image.new_zeros(b, n_layers + 1, 1, *image.shape[2:])  # (B, L+1, 1, H, W)
    alpha[:, 0] = 1
    rgb[:, 0] = background_rgb[:, 0]
    sprite_choice = torch.full((b, n_layers), k - 1, dtype=torch.long, device=image.device)
    bg_choice = torch.zeros(b, dtype=torch.long, device=image.device)
    for _ in range(passes):
        if background_rgb.shape[1] > 1:
            s, _, p = affine_terms(rgb, alpha, occ, 0)
            err = (image[:, None] - s[:, None] - p[:, None] * background_rgb).pow(2)
            bg_choice = err.flatten(2).mean(2).argmin(1)  # (B,)
            rgb[:, 0] = background_rgb[batch, bg_choice]
        for layer in range(1, n_layers + 1):
            s, t, p = affine_terms(rgb, alpha, occ, layer)
            cand_rgb, cand_alpha = sprite_rgb[:, layer - 1], sprite_alpha[:, layer - 1]
            recon = s[:, None] + cand_alpha * (p[:, None] * cand_rgb - t[:, None])  # (B,K0,C,H,W)
            err = (image[:, None] - recon).pow(2).flatten(2).mean(2)  # (B, K0)
            if k > k0:  # the empty sprite leaves Î = S
                err = torch.cat([err, (image - s).pow(2).flatten(1).mean(1, keepdim=True)], 1)
            choice = (err + penalty).argmin(1)  # (B,)
            sprite_choice[:, layer - 1] = choice
            kept = (choice < k0)[:, None, None, None]  # (B, 1, 1, 1)
            rgb[:, layer] = cand_rgb[batch, choice.clamp(max=k0 - 1)] * kept
            alpha[:, layer] = cand_alpha[batch, choice.clamp(max=k0 - 1)] * kept
    return sprite_choice, bg_choice


def order_search(image: Tensor, rgb: Tensor, alpha: Tensor, occ: Tensor, passes: int = 2) -> Tensor:
    """Harden the occlusion pair by pair where it explains the image better.

    Coordinate descent over the pairs of sprite layers: each pair (i, j) takes whichever of
    its current occlusion, i in front and j in front gives the smallest reconstruction error
    per image, the other pairs fixed (ties keep the current one). The background row and
    column are left alone.

    image (B, C, H, W), rgb (B, L+1, C, H, W), alpha (B, L+1, 1, H, W), occ (B, L+1, L+1)
    -> occ (B, L+1, L+1).
    """
    occ = occ.clone()
    batch = torch.arange(len(image), device=image.device)

    def error(o: Tensor) -> Tensor:
        return (compose(rgb, alpha, o) - image).pow(2).flatten(1).mean(1)  # (B,)

    n = alpha.shape[1]
    for _ in range(passes):
        for i in range(1, n):
            for j in range(i + 1, n):
                trials = [occ]
                for front in (0.0, 1.0):  # occ[j, i]: how much j hides i
                    trial = occ.clone()
                    trial[:, j, i], trial[:, i, j] = front, 1 - front
                    trials.append(trial)
                errors = torch.stack([error(t) for t in trials], 1)  # (B, 3)
                occ = torch.stack(trials, 1)[batch, errors.argmin(1)]  # first wins ties
    return occ


def label_maps(alpha: Tensor, occ: Tensor) -> Tensor:
    """Front-most visible layer per pixel: 0 = background, l = sprite layer l (1..L).

    A layer is visible where its binarised mask (α > 0.5) is hidden by no binarised layer in
    front of it under the hardened occlusion (occ > 0.5). Where a cyclic predicted occlusion
    leaves no visible layer above a covered pixel, the layer with the largest soft weight wins.

    alpha (B, L, 1, H, W) sprite layers only, occ (B, L+1, L+1) -> (B, H, W) int64.
    """
    occ_sprites = occ[:, 1:, 1:]  # (B, L, L)
    hard = (alpha > 0.5).to(alpha.dtype)
    visible = hard * transmittance(hard, (occ_sprites > 0.5).to(alpha.dtype))  # (B, L, 1, H, W)
    soft = alpha * transmittance(alpha, occ_sprites)
    covered = hard.amax(1)[:, 0] > 0  # (B, H, W)
    # Ties between visible layers (occ exactly 0.5) go to the larger soft weight.
    score = torch.where(visible.amax(1, keepdim=True) > 0, visible * (1 + soft), soft)
    labels = score[:, :, 0].argmax(1) + 1  # (B, H, W)
    return torch.where(covered, labels, torch.zeros_like(labels))
