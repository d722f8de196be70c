"""The optimizer and its surgery, kept in one place: Adam with repeated group updates, and
copying the state of parameter slices."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from dti_sprites.model import ParamSlice


@torch.no_grad()
def copy_optimizer_state(
    optimizer: torch.optim.Optimizer, pairs: Iterable[tuple[ParamSlice, ParamSlice]]
) -> None:
    """For each (source, destination) slice pair, copy every per-element state tensor
    (e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) of the source slice into the destination.

    The destination gets its own copy (never a shared buffer); scalar state such as Adam's
    ``step`` is per parameter and stays as it is.
    """
    for (param, i_src), (dst_param, i_dst) in pairs:
        if dst_param is not param:
            raise ValueError("slices of a pair must belong to the same parameter")
        state = optimizer.state.get(param, {})
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[i_dst] = value[i_src].clone()


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    slices: Iterable[ParamSlice],
    keys: Iterable[str] | None = None,
) -> None:
    """Zero the named per-element state tensors (e.g. Adam's ``exp_avg``) of each slice, or
    all of them when ``keys`` is None; scalar state such as ``step`` stays."""
    keys = None if keys is None else set(keys)
    for param, index in slices:
        for key, value in optimizer.state.get(param, {}).items():
            per_element = torch.is_tensor(value) and value.shape == param.shape
            if per_element and (keys is None or key in keys):
                value[index] = 0


class Adam(torch.optim.Adam):
    """torch's Adam, where a parameter group may take several updates per step.

    A group with ``"updates": n`` gets n successive Adam updates from the same gradient at every
    ``step()`` (its moments, step count and weight decay advance n times); other groups get one.
    This reproduces exactly what the authors' code does to its shared encoder: their optimizer
    lists the encoder once per module that holds it (7 times for Multi-dSprites, 8 for CLEVR6),
    and torch's Adam then updates a listed parameter once per listing, one after the other. The
    paper's numbers come from those dynamics (see ``docs/method.md``).
    """

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = super().step(closure)
        groups = self.param_groups
        try:
            for extra in range(1, max(int(g.get("updates", 1)) for g in groups)):
                self.param_groups = [g for g in groups if int(g.get("updates", 1)) > extra]
                super().step()
        finally:
            self.param_groups = groups
        return loss
