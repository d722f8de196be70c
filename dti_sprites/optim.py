"""Optimizer surgery, kept in one place: copy the state of parameter slices."""

from __future__ import annotations

from collections.abc import Iterable

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
