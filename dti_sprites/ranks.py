"""Checkpoint state that differs between DDP processes: random state and per-process counters.

Lightning writes the checkpoint of global rank 0 only, but it builds it on every process
(``on_save_checkpoint`` and the callbacks' ``state_dict`` run everywhere, at the same step). A
value that differs between processes is therefore gathered into a list, one entry per rank
(:func:`gather_ranks`), and each process of the resumed run takes its own (:func:`pick_rank`).
Without DDP the list has one entry.
"""

from __future__ import annotations

import random
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["gather_ranks", "pick_rank", "rank_and_world", "rng_state", "set_rng_state"]

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(this process's global rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_ranks(value: T) -> dict[str, list[T]]:
    """``{"per_rank": [every process's value, in rank order]}`` (a collective: every process
    must call it, at the same point)."""
    _, world = rank_and_world()
    if world == 1:
        return {"per_rank": [value]}
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return {"per_rank": values}


def pick_rank(saved: Any, name: str) -> Any:
    """This process's entry of what :func:`gather_ranks` returned.

    Anything else (a checkpoint from before the per-process lists) is returned as it is. A
    resume with another number of processes cannot continue every process's state: process r
    takes entry r when there is one, else entry 0, and rank 0 warns.
    """
    if not (isinstance(saved, dict) and set(saved) == {"per_rank"}):
        return saved
    values = saved["per_rank"]
    rank, world = rank_and_world()
    if len(values) != world:
        rank_zero_warn(
            f"{name}: the checkpoint holds the state of {len(values)} processes, this run has "
            f"{world}; the resumed run does not continue every process's state exactly"
        )
    return values[rank] if rank < len(values) else values[0]


def rng_state() -> dict[str, Any]:
    """This process's random state: torch (CPU and CUDA devices), NumPy and Python (as
    tensors, tuples and numbers: a checkpoint loads with ``weights_only=True``)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global one)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the parts present)."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    if "python" in state:
        random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            rank_zero_warn(
                f"the checkpoint holds the random state of {len(cuda)} CUDA devices, this "
                f"machine has {torch.cuda.device_count()}: CUDA random state not restored"
            )
