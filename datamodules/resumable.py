"""Training batches that resume mid-epoch, on one process and under DDP.

The order of epoch ``e`` is a permutation of the training set fixed by ``seed + e`` (the order
of ``torch.utils.data.DistributedSampler``), and each process takes its shard of it. The
training loader counts the batches it has handed out in the current epoch; Lightning saves
that count with the epoch in every checkpoint (``state_dict`` / ``load_state_dict``: the
fit loop's ``combined_loader`` state) and a resumed run skips exactly those batches, by index,
without loading them. Nothing here draws from the global random state: the mask noise of a
resumed run continues as if the run had not stopped.

A resume with another number of processes or another batch size cannot continue the
checkpoint's order; it keeps the epoch's length and position (in batches) and warns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "evaluation_loader", "training_loader"]


class ResumableSampler(DistributedSampler):
    """This process's shard of the permutation of epoch ``self.epoch`` (seed ``seed + epoch``).

    A ``DistributedSampler``, so Lightning keeps it under DDP (it replaces only other
    samplers) and sets its epoch at each epoch start. :meth:`resume_at` makes the next
    iteration of that epoch start at a position of the shard.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, position in this shard)

    def resume_at(self, epoch: int, start: int) -> None:
        """Start the next iteration at sample ``start`` of this shard, if it is of ``epoch``."""
        self._resume = (int(epoch), int(start))

    def pending_start(self) -> int:
        """Where the next iteration starts in this shard (0 unless :meth:`resume_at` applies)."""
        if self._resume is None or self._resume[0] != self.epoch:
            return 0
        return self._resume[1]

    def __iter__(self) -> Iterator[int]:
        start = self.pending_start()
        self._resume = None
        indices = list(super().__iter__())  # this shard, num_samples indices
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is checkpointed.

    ``len()`` is the whole epoch's number of batches (what Lightning counts an epoch by); after
    a resume an iteration yields the rest of the epoch. The iterator is lazy: it asks the
    sampler for its epoch at its first batch, after Lightning has set it. An iteration that
    runs to its end moves the sampler to the next epoch (Lightning sets the same epoch again;
    outside a Trainer the order still changes every epoch).
    """

    sampler: ResumableSampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler)}")
        batch_size = self.batch_size or 1
        self._epoch = sampler.epoch
        self._batches_done = sampler.pending_start() // batch_size
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch
        self._epoch, self._batches_done = sampler.epoch + 1, 0
        sampler.set_epoch(self._epoch)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches of it handed out, and what the order depends on."""
        sampler = self.sampler
        return {
            "epoch": getattr(self, "_epoch", sampler.epoch),
            "batches": getattr(self, "_batches_done", 0),
            "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's epoch after its ``batches`` batches (when Lightning
        resumes that epoch; a checkpoint taken at an epoch's end starts the next one)."""
        sampler = self.sampler
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        changed = {
            key: (state_dict.get(key), now)
            for key, now in (
                ("batch_size", self.batch_size),
                ("num_replicas", sampler.num_replicas),
                ("seed", sampler.seed),
                ("shuffle", sampler.shuffle),
            )
            if state_dict.get(key, now) != now
        }
        if changed and batches:
            rank_zero_warn(
                "Resuming the training data mid-epoch with different settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}): the rest "
                f"of epoch {epoch} skips {batches} batches of the new order, so some images of "
                "this epoch are seen twice and some not at all"
            )
        sampler.set_epoch(epoch)
        sampler.resume_at(epoch, batches * (self.batch_size or 1))
        self._epoch, self._batches_done = epoch, batches


def shuffle_seed(seed: int | None) -> int:
    """``seed``, or the seed of ``seed_everything`` (``PL_GLOBAL_SEED``, as Lightning's own
    distributed sampler), or 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)


def _shard(trainer: L.Trainer | None) -> tuple[int, int]:
    """(number of processes, this process's rank) of the trainer's run; (1, 0) without one."""
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def training_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int | None,
    trainer: L.Trainer | None,
) -> ResumableDataLoader:
    """Shuffled, sharded, resumable batches of ``dataset`` (see the module docstring)."""
    num_replicas, rank = _shard(trainer)
    seed = shuffle_seed(seed)
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds; not the global RNG
    )


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of ``dataset`` in order. Its own generator: an evaluation in the middle of
    training leaves the global random state (mask noise) as it was."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
