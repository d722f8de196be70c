"""Shared pieces of the resume tests (issue 19): small versions of the experiment configs, and
callbacks that record a run's final state or hold a step until a signal arrives."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from dti_sprites.callbacks import Preemption

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def small_config(
    name: str,
    out: Path,
    callbacks: dict[str, dict[str, Any]] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> Path:
    """experiments/<name>.yaml with the init_args of its callbacks changed (by class name) and
    ``extra`` callbacks appended, written to ``out``."""
    config = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    for entry in config["trainer"]["callbacks"]:
        cls = entry["class_path"].rpartition(".")[2]
        entry.setdefault("init_args", {}).update((callbacks or {}).get(cls, {}))
    config["trainer"]["callbacks"] += extra or []
    out.write_text(yaml.safe_dump(config))
    return out


class Snapshot(L.Callback):
    """Saves this process's final state to ``<folder>/rank<r>.pt`` when training ends:
    parameters and buffers, optimizer state, epoch, global step, every callback's state, the
    random state."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callbacks = {}
        for cb in trainer.callbacks:
            state = cb.state_dict()
            if state:
                callbacks[type(cb).__name__] = state
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": trainer.optimizers[0].state_dict(),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "callbacks": callbacks,
                "rng": torch.get_rng_state(),
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


class HoldForSignal(L.Callback):
    """At the end of training step ``step``, touches ``<ready>`` and waits (up to ``timeout``
    seconds) until the run's Preemption callback has noted a signal."""

    def __init__(self, step: int, ready: str, timeout: float = 120.0) -> None:
        self.step, self.ready, self.timeout = step, ready, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        Path(self.ready).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.02)
